//! What a disk file's name claims it is, and the refusal when its bytes disagree.
//!
//! A file whose first bytes show a known format is read as that format. A file whose bytes
//! show none is read as a raw image only if it claims to be one: its name (`.img`, `.raw`, a
//! `-flat.vmdk` or `-f001.vmdk` extent), or the operator (`--raw-disk KEY`), or it is a block
//! device. Anything else is refused: a `.qcow2` or `.vmdk` whose magic was damaged would
//! otherwise be lifted as a "raw disk" of header bytes and registered as a VM that cannot boot.

use std::path::Path;

use super::SourceError;

/// The format a file's name says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// `.img`, `.raw`, or a flat VMDK extent (`-flat.vmdk`, `-f001.vmdk`).
    Raw,
    Qcow2,
    /// A `.vmdk` that is not a flat extent: a descriptor or a sparse (KDMV) file.
    Vmdk,
    /// `.vhd`, `.vhdx`, `.vdi`: formats this agent recognises by their bytes but does not read.
    Foreign {
        what: &'static str,
        /// How its files start.
        expected: &'static str,
    },
    /// No extension, or one that says nothing (`.dat`, `.bin`, `.disk`).
    Unclaimed,
}

impl Claim {
    /// What the name of `path` claims.
    pub(crate) fn of(path: &Path) -> Claim {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let Some((stem, extension)) = name.rsplit_once('.') else {
            return Claim::Unclaimed;
        };
        match extension {
            "img" | "raw" => Claim::Raw,
            "qcow2" | "qcow" => Claim::Qcow2,
            "vmdk" if is_flat_extent_name(stem) => Claim::Raw,
            "vmdk" => Claim::Vmdk,
            "vhd" => Claim::Foreign {
                what: "a VHD image",
                expected: "VHD images end (or start) with a `conectix` footer",
            },
            "vhdx" => Claim::Foreign {
                what: "a VHDX image",
                expected: "VHDX images start with `vhdxfile`",
            },
            "vdi" => Claim::Foreign {
                what: "a VirtualBox VDI image",
                expected: "VDI images carry the signature 7f 10 da be at byte 64",
            },
            _ => Claim::Unclaimed,
        }
    }

    /// The format, as a sentence names it.
    fn what(self) -> &'static str {
        match self {
            Claim::Raw => "a raw image",
            Claim::Qcow2 => "a qcow2 image",
            Claim::Vmdk => "a VMDK (a text descriptor or a sparse VMDK)",
            Claim::Foreign { what, .. } => what,
            Claim::Unclaimed => "no format",
        }
    }

    /// How that format's files start.
    fn expected(self) -> &'static str {
        match self {
            Claim::Qcow2 => "qcow2 images start with `QFI\\xfb`",
            Claim::Vmdk => {
                "a VMDK descriptor starts with `# Disk DescriptorFile`, a sparse or streamOptimized \
                 VMDK with `KDMV`"
            }
            Claim::Foreign { expected, .. } => expected,
            Claim::Raw | Claim::Unclaimed => "",
        }
    }
}

/// `disk-flat.vmdk` (monolithicFlat, vmfs) or `disk-f001.vmdk` (twoGbMaxExtentFlat): extents
/// that hold the disk's bytes as they are.
fn is_flat_extent_name(stem: &str) -> bool {
    if stem.ends_with("-flat") {
        return true;
    }
    stem.rsplit_once("-f")
        .is_some_and(|(_, n)| n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Who the refused file is to the operator, for the advice of the refusal.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role<'a> {
    /// A disk of the VM, with its key (`scsi0:0`) if known: `--raw-disk KEY` applies to it.
    Disk(Option<&'a str>),
    /// A backing file that an image names; no flag applies to it.
    Backing,
}

/// The refusal of a file whose bytes show no format it may be read as: its name claims a
/// format its bytes are not, or (for a disk of the VM) claims none at all.
pub(crate) fn refuse(path: &Path, claim: Claim, head: &[u8], role: Role<'_>) -> SourceError {
    let found = describe_head(head);
    let flag = match role {
        Role::Disk(Some(key)) => Some(format!("`--raw-disk {key}`")),
        Role::Disk(None) => {
            Some("`--raw-disk KEY` (KEY: the disk as `edge-agent inspect` names it, e.g. scsi0:0)".to_owned())
        }
        Role::Backing => None,
    };
    let restore = "restore it from the source datastore (`qemu-img check` shows what is wrong)";
    let (problem, advice) = match (claim, flag) {
        (Claim::Unclaimed | Claim::Raw, flag) => (
            format!(
                "no known disk format: {found}, and the file's name does not say it is a raw image \
                 (.img, .raw, -flat.vmdk)"
            ),
            format!(
                "if it is a raw disk image, take it as one with {} (or name it .img or .raw); \
                 otherwise convert it with `qemu-img convert -O raw` and point the .vmx at the result",
                flag.as_deref().unwrap_or("`--raw-disk KEY`")
            ),
        ),
        (claim, flag) => (
            format!(
                "its name says {} but its content is not: {found} ({}); the file is damaged or misnamed",
                claim.what(),
                claim.expected()
            ),
            match flag {
                Some(flag) => format!("{restore}; only if it really is a raw disk image, take it as one with {flag}"),
                None => restore.to_owned(),
            },
        ),
    };
    SourceError::NotItsFormat {
        path: path.to_owned(),
        problem,
        advice,
    }
}

/// Magic numbers a damaged header may be one byte away from.
const MAGICS: [(&[u8], &str); 3] = [
    (b"QFI\xfb", "qcow2's `QFI\\xfb`"),
    (b"KDMV", "sparse VMDK's `KDMV`"),
    (b"COWD", "ESX sparse VMDK's `COWD`"),
];

/// What the first bytes of a file look like, for a person: zeros, text, or bytes in hex,
/// and a magic number they are one byte away from.
pub(crate) fn describe_head(head: &[u8]) -> String {
    let shown = &head[..head.len().min(16)];
    let mut out = if head.iter().all(|&b| b == 0) {
        format!("its first {} bytes are all zeros", head.len())
    } else if shown.iter().all(|&b| b.is_ascii_graphic() || b == b' ') {
        format!("it starts with the text `{}`", String::from_utf8_lossy(shown))
    } else {
        let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
        format!("its first bytes are {}", hex.join(" "))
    };
    if head.len() >= 4 {
        for (magic, name) in MAGICS {
            let differing = head[..4].iter().zip(magic).filter(|(a, b)| a != b).count();
            if differing == 1 {
                out.push_str(&format!(", one byte off {name} magic"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_claim_formats() {
        for (name, claim) in [
            ("web01.img", Claim::Raw),
            ("WEB01.RAW", Claim::Raw),
            ("web01-flat.vmdk", Claim::Raw),
            ("web01-f001.vmdk", Claim::Raw),
            ("web01.vmdk", Claim::Vmdk),
            ("web01-s001.vmdk", Claim::Vmdk),
            ("web01-000001.vmdk", Claim::Vmdk),
            ("web01-flatter.vmdk", Claim::Vmdk),
            ("web01.qcow2", Claim::Qcow2),
            ("web01.dat", Claim::Unclaimed),
            ("web01", Claim::Unclaimed),
        ] {
            assert_eq!(Claim::of(Path::new(name)), claim, "{name}");
        }
        assert!(matches!(
            Claim::of(Path::new("web01.vhdx")),
            Claim::Foreign {
                what: "a VHDX image",
                ..
            }
        ));
    }

    #[test]
    fn heads_are_described_for_a_person() {
        assert_eq!(describe_head(&[0; 512]), "its first 512 bytes are all zeros");
        assert_eq!(
            describe_head(b"hello world, this is a disk"),
            "it starts with the text `hello world, thi`"
        );
        let msg = describe_head(b"QFI\xfa\0\0\0\x03");
        assert!(msg.starts_with("its first bytes are 51 46 49 fa 00"), "{msg}");
        assert!(msg.contains("one byte off qcow2's `QFI\\xfb` magic"), "{msg}");
        assert!(describe_head(b"KDMW....").contains("one byte off sparse VMDK's `KDMV` magic"));
    }

    #[test]
    fn the_advice_names_the_flag_with_the_disk_key() {
        let err = refuse(
            Path::new("/src/web01.qcow2"),
            Claim::Qcow2,
            &[0; 64],
            Role::Disk(Some("scsi0:1")),
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("/src/web01.qcow2: its name says a qcow2 image"),
            "{msg}"
        );
        assert!(
            msg.contains("all zeros") && msg.contains("`--raw-disk scsi0:1`"),
            "{msg}"
        );
        let msg = refuse(
            Path::new("/src/web01.dat"),
            Claim::Unclaimed,
            &[1; 64],
            Role::Disk(None),
        )
        .to_string();
        assert!(
            msg.contains("no known disk format") && msg.contains("`--raw-disk KEY`"),
            "{msg}"
        );
        let msg = refuse(Path::new("/src/base.qcow2"), Claim::Qcow2, &[1; 64], Role::Backing).to_string();
        assert!(msg.contains("restore it") && !msg.contains("--raw-disk"), "{msg}");
    }
}
