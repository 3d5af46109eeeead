//! The qcow2 header and its extensions: what an image is and where its tables lie, checked
//! before any table is read.
//!
//! Layout (big-endian, QEMU's docs/interop/qcow2.txt): a 72-byte v2 header, extended to
//! `header_length` (at least 104) bytes in v3, followed by header extensions (type, length,
//! data padded to 8 bytes) and the backing file name, all within the first cluster.

use crate::source::slice::FileSlice;
use crate::source::vmx::quote;
use crate::source::SourceError;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";

const V2_HEADER_LEN: u64 = 72;
const V3_HEADER_LEN: u64 = 104;
/// 512 B to 2 MiB clusters, as QEMU allows.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// QEMU's limit on a backing file name.
const MAX_BACKING_NAME: u64 = 1023;
/// QEMU's limit on the active L1 table (QCOW_MAX_L1_SIZE): 4 Mi entries.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
const EXT_CRYPTO: u32 = 0x0537_BE77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const CONVERT: &str = "convert it with `qemu-img convert -O qcow2 SOURCE DEST.qcow2` (or `-O raw`) \
                       and point the .vmx at the result";
const DECRYPT: &str = "decrypt it first, e.g. `qemu-img convert --object secret,id=sec0,file=PASSFILE \
                       --image-opts driver=qcow2,file.filename=SOURCE.qcow2,encrypt.key-secret=sec0 \
                       -O qcow2 DEST.qcow2`, and point the .vmx at the decrypted copy";

/// How compressed clusters are compressed (the v3 `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    /// Raw deflate, no zlib header: type 0, and every v2 image.
    Deflate,
    Zstd,
}

/// What the header says, checked.
#[derive(Debug)]
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The disk's size in bytes (not 0).
    pub size: u64,
    pub l1_table_offset: u64,
    /// L1 entries that map the disk; the table may be longer (room for VM state).
    pub l1_entries: u64,
    pub compression: Compression,
    /// The backing file name as stored (not necessarily UTF-8).
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format, from the header extension, lower-cased.
    pub backing_format: Option<String>,
    /// What is readable but worth telling the operator.
    pub warnings: Vec<String>,
}

/// A named feature bit from the feature name table extension.
struct FeatureName {
    kind: u8,
    bit: u8,
    name: String,
}

/// Reads and checks the header of the qcow2 image in `file`.
pub(super) fn parse(file: &FileSlice) -> Result<Header, SourceError> {
    let path = &file.path;
    let bad = |message: String| SourceError::BadImage {
        path: path.clone(),
        message,
    };
    let unsupported = |what: String, advice: &str| SourceError::Unsupported {
        path: path.clone(),
        what,
        advice: advice.to_owned(),
    };
    if file.len < V2_HEADER_LEN {
        return Err(bad(format!(
            "{} bytes is too short for a qcow2 header ({V2_HEADER_LEN} bytes at least): the file is \
             truncated; copy it again",
            file.len
        )));
    }
    let fixed = Fields(file.read_vec(0, file.len.min(V3_HEADER_LEN + 8) as usize)?);
    let version = fixed.u32(4);
    match version {
        2 | 3 => {}
        1 => {
            return Err(unsupported(
                "a qcow image (version 1, the format before qcow2)".to_owned(),
                CONVERT,
            ))
        }
        v => return Err(unsupported(format!("qcow2 version {v} (only 2 and 3 are)"), CONVERT)),
    }
    let cluster_bits = fixed.u32(20);
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(bad(format!(
            "the header's cluster_bits is {cluster_bits}, but qcow2 clusters are 2^9 to 2^21 bytes: \
             the header is damaged; check the image with `qemu-img check`"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;

    // The first cluster holds the header, its extensions and the backing file name.
    let first = Fields(file.read_vec(0, file.len.min(cluster_size) as usize)?);
    let (incompatible, header_length) = if version == 3 {
        if first.len() < V3_HEADER_LEN {
            return Err(bad(format!(
                "{} bytes is too short for a qcow2 v3 header ({V3_HEADER_LEN} bytes at least): the \
                 file is truncated; copy it again",
                file.len
            )));
        }
        let header_length = u64::from(first.u32(100));
        if !(V3_HEADER_LEN..=first.len()).contains(&header_length) {
            return Err(bad(format!(
                "the header's header_length is {header_length}, outside {V3_HEADER_LEN}..={}: the \
                 header is damaged; check the image with `qemu-img check`",
                first.len()
            )));
        }
        (first.u64(72), header_length)
    } else {
        (0, V2_HEADER_LEN)
    };

    let backing_offset = first.u64(8);
    let backing_len = u64::from(first.u32(16));
    if backing_offset != 0 && backing_offset > cluster_size {
        return Err(bad(format!(
            "the backing file name is at offset {backing_offset}, outside the first cluster \
             ({cluster_size} bytes): the header is damaged; check the image with `qemu-img check`"
        )));
    }
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    }
    .min(first.len());
    let extensions = read_extensions(&first, header_length, ext_end).map_err(bad)?;

    let crypt_method = first.u32(32);
    if crypt_method != 0 || extensions.encrypted {
        let kind = match crypt_method {
            1 => "AES, the legacy qcow2 encryption",
            2 => "LUKS",
            0 => "a LUKS header extension",
            _ => "an unknown encryption method",
        };
        return Err(unsupported(format!("an encrypted qcow2 image ({kind})"), DECRYPT));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(bad(
            "QEMU has marked this qcow2 image corrupt (incompatible feature bit 1): its metadata is \
             inconsistent. Repair a copy with `qemu-img check -r all COPY.qcow2` and migrate the copy"
                .to_owned(),
        ));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bits: Vec<String> = (0..64)
            .filter(|bit| unknown & (1 << bit) != 0)
            .map(|bit| {
                match extensions
                    .features
                    .iter()
                    .find(|f| f.kind == 0 && u32::from(f.bit) == bit)
                {
                    Some(feature) => format!("bit {bit} \"{}\"", quote(&feature.name)),
                    None => format!("bit {bit}"),
                }
            })
            .collect();
        return Err(unsupported(
            format!(
                "a qcow2 image with incompatible features this agent does not know ({})",
                bits.join(", ")
            ),
            "convert it with a qemu-img that knows them: `qemu-img convert -O qcow2 SOURCE DEST.qcow2` \
             (or `-O raw`), and point the .vmx at the result",
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        let name = extensions
            .data_file
            .as_deref()
            .map(|name| format!(" ({})", quote(name)))
            .unwrap_or_default();
        return Err(unsupported(
            format!("a qcow2 image with an external data file{name}"),
            "convert it to a self-contained image with `qemu-img convert -O qcow2 SOURCE DEST.qcow2` \
             and point the .vmx at the result",
        ));
    }
    if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
        return Err(unsupported(
            "a qcow2 image with extended L2 entries (subclusters, extended_l2=on)".to_owned(),
            "convert it with `qemu-img convert -O qcow2 SOURCE DEST.qcow2` (extended_l2 is off by \
             default) and point the .vmx at the result",
        ));
    }
    // A compression type other than deflate must come with incompatible bit 3.
    let compression_byte = (header_length > V3_HEADER_LEN).then(|| first.0[V3_HEADER_LEN as usize]);
    let compression = match (incompatible & INCOMPAT_COMPRESSION != 0, compression_byte) {
        (false, None | Some(0)) => Compression::Deflate,
        (false, Some(other)) => {
            return Err(bad(format!(
                "the header's compression_type is {other} but the compression type feature bit \
                 is not set: the header is damaged; check the image with `qemu-img check`"
            )))
        }
        (true, None) => {
            return Err(bad(format!(
                "the compression type feature bit is set but the header ({header_length} bytes) \
                 has no compression_type field: the header is damaged; check the image with \
                 `qemu-img check`"
            )))
        }
        (true, Some(0)) => Compression::Deflate,
        (true, Some(1)) => Compression::Zstd,
        (true, Some(other)) => {
            return Err(unsupported(
                format!("qcow2 compression type {other} (deflate and zstd are)"),
                CONVERT,
            ))
        }
    };

    let mut warnings = Vec::new();
    if incompatible & INCOMPAT_DIRTY != 0 {
        warnings.push(format!(
            "{} is marked dirty: it was not closed cleanly (a VM may still be running on it, or it \
             crashed). Its reference counts may be stale, which does not affect reading, but shut \
             down any VM using it before migrating, or the copy will not be consistent",
            path.display()
        ));
    }
    let snapshots = first.u32(60);
    if snapshots > 0 {
        warnings.push(format!(
            "{} has {snapshots} internal snapshot(s) (`qemu-img snapshot -l` lists them); only the \
             image's current state is migrated, not the snapshots",
            path.display()
        ));
    }

    let backing_file = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME || backing_offset + backing_len > cluster_size {
            return Err(bad(format!(
                "the backing file name is {backing_len} bytes long at offset {backing_offset}; \
                 qcow2 allows at most {MAX_BACKING_NAME} bytes within the first cluster: the \
                 header is damaged; check the image with `qemu-img check`"
            )));
        }
        let name = first.bytes(backing_offset, backing_len).ok_or_else(|| {
            bad(format!(
                "the backing file name at offset {backing_offset} lies past the end of the file \
                 ({} bytes): the file is truncated; copy it again",
                file.len
            ))
        })?;
        if name.contains(&0) {
            return Err(bad(
                "the backing file name contains a NUL byte: the header is damaged; check the image \
                 with `qemu-img check`"
                    .to_owned(),
            ));
        }
        Some(name.to_vec())
    };

    let size = first.u64(24);
    if size == 0 {
        return Err(SourceError::EmptyImage { path: path.clone() });
    }
    if size > i64::MAX as u64 {
        return Err(bad(format!(
            "the header says the disk is {size} bytes, more than 2^63: the header is damaged; \
             check the image with `qemu-img check`"
        )));
    }
    // Each L1 entry maps one L2 table of cluster_size / 8 entries.
    let bytes_per_l1_entry = 1u64 << (2 * cluster_bits - 3);
    let l1_entries = size.div_ceil(bytes_per_l1_entry);
    let l1_size = u64::from(first.u32(36));
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(bad(format!(
            "a {size}-byte disk with {cluster_size}-byte clusters needs an L1 table of {l1_entries} \
             entries, more than qcow2's limit of {}: the header is damaged; check the image with \
             `qemu-img check`",
            MAX_L1_BYTES / 8
        )));
    }
    if l1_size < l1_entries {
        return Err(bad(format!(
            "the L1 table has {l1_size} entries but a {size}-byte disk with {cluster_size}-byte \
             clusters needs {l1_entries}: the header is damaged; check the image with `qemu-img check`"
        )));
    }
    let l1_table_offset = first.u64(40);
    if l1_table_offset == 0 || !l1_table_offset.is_multiple_of(cluster_size) {
        return Err(bad(format!(
            "the L1 table offset {l1_table_offset} is not a non-zero multiple of the cluster size \
             ({cluster_size}): the header is damaged; check the image with `qemu-img check`"
        )));
    }
    if l1_table_offset
        .checked_add(l1_entries * 8)
        .is_none_or(|end| end > file.len)
    {
        return Err(bad(format!(
            "the L1 table ({} bytes at offset {l1_table_offset}) lies past the end of the file \
             ({} bytes): the image is truncated; copy it again",
            l1_entries * 8,
            file.len
        )));
    }

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_table_offset,
        l1_entries,
        compression,
        backing_file,
        backing_format: extensions.backing_format,
        warnings,
    })
}

/// What the header extensions say.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    features: Vec<FeatureName>,
    encrypted: bool,
    data_file: Option<String>,
}

/// Walks the extensions in `[start, end)` of the first cluster; `Err` says what is damaged.
fn read_extensions(first: &Fields, start: u64, end: u64) -> Result<Extensions, String> {
    let mut found = Extensions::default();
    let mut offset = start;
    while offset + 8 <= end {
        let kind = first.u32(offset as usize);
        let len = u64::from(first.u32(offset as usize + 4));
        offset += 8;
        if kind == EXT_END {
            break;
        }
        let data = first
            .bytes(offset, len)
            .filter(|_| offset + len <= end)
            .ok_or_else(|| {
                format!(
                    "header extension {kind:#010x} of {len} bytes at offset {} runs past the header \
                 area ({end} bytes): the header is damaged; check the image with `qemu-img check`",
                    offset - 8
                )
            })?;
        match kind {
            EXT_BACKING_FORMAT => {
                let name = text(data);
                if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "the backing file format extension holds `{}`, not a format name: the header \
                         is damaged; check the image with `qemu-img check`",
                        quote(&name)
                    ));
                }
                found.backing_format = Some(name.to_ascii_lowercase());
            }
            EXT_FEATURE_TABLE => {
                found.features = data
                    .chunks_exact(48)
                    .map(|entry| FeatureName {
                        kind: entry[0],
                        bit: entry[1],
                        name: text(&entry[2..]),
                    })
                    .collect();
            }
            EXT_CRYPTO => found.encrypted = true,
            EXT_DATA_FILE => found.data_file = Some(text(data)),
            // Bitmaps and anything newer: nothing a reader of the active state needs.
            _ => {}
        }
        offset += len.next_multiple_of(8);
    }
    Ok(found)
}

/// A NUL-padded string field, lossily decoded.
fn text(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// Big-endian fields of a buffer; reads past its end give 0 (callers check lengths first).
struct Fields(Vec<u8>);

impl Fields {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.0.get(start..end)
    }

    fn u32(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, at: usize) -> u64 {
        (u64::from(self.u32(at)) << 32) | u64::from(self.u32(at + 4))
    }
}
