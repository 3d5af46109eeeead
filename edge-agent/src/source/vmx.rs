//! The `.vmx` file format: `key = "value"` lines, keys case-insensitive, values with `|XX`
//! escapes. This module only turns text into entries; what the entries mean is in `vm.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::SourceError;

/// Real `.vmx` files are a few KiB; anything near this is not one.
pub(crate) const VMX_SIZE_LIMIT: u64 = 1024 * 1024;

/// How much of an offending line an error message quotes.
const QUOTE_LIMIT: usize = 80;

/// One `key = "value"` line.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The key as written (the map key is lower-cased).
    pub key: String,
    /// The value with quotes removed and `|XX` escapes decoded.
    pub value: String,
    /// 1-based line number, for error messages.
    pub line: usize,
}

/// A parsed `.vmx`: entries by lower-cased key; a later line overrides an earlier one, as in
/// VMware.
#[derive(Debug)]
pub(crate) struct VmxFile {
    pub path: PathBuf,
    entries: HashMap<String, Entry>,
    /// SHA-256 of the bytes parsed (see [`super::SourceVm::descriptor_sha256`]).
    pub sha256: [u8; 32],
}

impl VmxFile {
    /// Reads and parses `path`, refusing files over [`VMX_SIZE_LIMIT`] before reading them.
    pub fn read(path: &Path) -> Result<Self, SourceError> {
        let io_err = |action| {
            move |source| SourceError::Io {
                path: path.to_owned(),
                action,
                source,
            }
        };
        let file = File::open(path).map_err(io_err("open the .vmx file"))?;
        let meta = file.metadata().map_err(io_err("inspect the .vmx file"))?;
        if meta.is_dir() {
            return Err(SourceError::NotVmx {
                path: path.to_owned(),
                reason: "it is a directory".into(),
            });
        }
        let too_large = |size| SourceError::TooLarge {
            path: path.to_owned(),
            what: ".vmx file",
            size,
            limit: VMX_SIZE_LIMIT,
        };
        if meta.len() > VMX_SIZE_LIMIT {
            return Err(too_large(meta.len()));
        }
        // The file may grow between stat and read (or be a pipe): bound the read too.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(VMX_SIZE_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read the .vmx file"))?;
        if bytes.len() as u64 > VMX_SIZE_LIMIT {
            return Err(too_large(bytes.len() as u64));
        }
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of a `.vmx`; `path` is only for messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SourceError> {
        // Of the bytes as read, before anything is stripped.
        let sha256 = gateway::chunk::sha256(bytes);
        let not_vmx = |reason: &str| SourceError::NotVmx {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(not_vmx("the file is empty"));
        }
        if bytes.contains(&0) {
            return Err(not_vmx("it contains binary data"));
        }
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let latin1 = declares_non_utf8_encoding(bytes);

        let mut entries = HashMap::new();
        let mut first_error = None;
        for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            let text = match std::str::from_utf8(raw) {
                Ok(text) => text.to_owned(),
                // Older VMware products write the host's code page and say so in `.encoding`.
                Err(_) if latin1 => raw.iter().map(|&b| char::from(b)).collect(),
                Err(_) => {
                    first_error.get_or_insert((
                        line,
                        "is not valid UTF-8; fix the line or set `.encoding` to the file's real encoding".to_owned(),
                    ));
                    continue;
                }
            };
            match parse_line(&text) {
                Ok(Some((key, value))) => {
                    let entry = Entry {
                        key: key.to_owned(),
                        value,
                        line,
                    };
                    entries.insert(key.to_ascii_lowercase(), entry);
                }
                Ok(None) => {}
                Err(message) => {
                    first_error.get_or_insert((line, message));
                }
            }
        }

        if entries.is_empty() {
            return Err(not_vmx("it has no `key = \"value\"` lines"));
        }
        // Checked before syntax errors: for some other `key = value` file (an .ini, a .vmsd),
        // "not a .vmx" helps more than the first line it would trip over.
        let looks_like_vm = ["config.version", "virtualhw.version", "displayname"]
            .iter()
            .any(|key| entries.contains_key(*key))
            || entries.keys().any(|key| key.ends_with(".filename"));
        if !looks_like_vm {
            return Err(not_vmx(
                "it has none of config.version, virtualHW.version, displayName or disks",
            ));
        }
        if let Some((line, message)) = first_error {
            return Err(SourceError::VmxSyntax {
                path: path.to_owned(),
                line,
                message,
            });
        }
        Ok(VmxFile {
            path: path.to_owned(),
            entries,
            sha256,
        })
    }

    /// The entry for `key` (any case).
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(&key.to_ascii_lowercase())
    }

    /// The value for `key`, treating an empty value as absent.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.get(key)
            .map(|entry| entry.value.as_str())
            .filter(|value| !value.is_empty())
    }

    /// All entries, keyed by lower-cased key, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(key, entry)| (key.as_str(), entry))
    }

    /// A boolean such as `present = "TRUE"`; absent or empty gives `None`.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, SourceError> {
        let Some(entry) = self.get(key).filter(|entry| !entry.value.is_empty()) else {
            return Ok(None);
        };
        match entry.value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Ok(Some(true)),
            "false" | "no" | "0" => Ok(Some(false)),
            _ => Err(self.bad_value(entry, "is not a boolean; use \"TRUE\" or \"FALSE\"")),
        }
    }

    /// A number that must be at least `min`; absent or empty gives `None`.
    pub fn number<T>(&self, key: &str, min: T) -> Result<Option<T>, SourceError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display,
    {
        let Some(entry) = self.get(key).filter(|entry| !entry.value.is_empty()) else {
            return Ok(None);
        };
        match entry.value.trim().parse::<T>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(self.bad_value(
                entry,
                &format!("is not a valid number; use a whole number of at least {min}"),
            )),
        }
    }

    /// A [`SourceError::VmxValue`] for `entry`.
    pub fn bad_value(&self, entry: &Entry, problem: &str) -> SourceError {
        SourceError::VmxValue {
            path: self.path.clone(),
            line: entry.line,
            key: entry.key.clone(),
            value: quote(&entry.value),
            problem: problem.to_owned(),
        }
    }
}

/// True when a `.encoding` line names something other than UTF-8, in which case lines that
/// are not UTF-8 are read as Latin-1 (close enough to windows-1252 for names and paths).
fn declares_non_utf8_encoding(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b'\n').any(|raw| {
        let text = String::from_utf8_lossy(raw);
        match parse_line(&text) {
            Ok(Some((key, value))) if key.eq_ignore_ascii_case(".encoding") => {
                let value = value.to_ascii_lowercase();
                value != "utf-8" && value != "utf8"
            }
            _ => false,
        }
    })
}

/// Parses one line: `Ok(None)` for blank lines and comments, `Err` with a message for anything
/// that is not `key = "value"` (or `key = value`).
fn parse_line(text: &str) -> Result<Option<(&str, String)>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let expected = || format!("expected `key = \"value\"`, found `{}`", quote(trimmed));
    let Some((key, rest)) = trimmed.split_once('=') else {
        return Err(expected());
    };
    let key = key.trim();
    if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c == '"') {
        return Err(expected());
    }
    let rest = rest.trim();
    let raw_value = if let Some(quoted) = rest.strip_prefix('"') {
        let Some(end) = quoted.find('"') else {
            return Err(format!(
                "the value of {key} has no closing `\"`; the file may be truncated"
            ));
        };
        let after = quoted[end + 1..].trim_start();
        if !after.is_empty() && !after.starts_with('#') {
            return Err(format!(
                "unexpected `{}` after the closing `\"` of {key}'s value",
                quote(after)
            ));
        }
        &quoted[..end]
    } else {
        rest
    };
    let value = unescape(raw_value).map_err(|bad| {
        format!("invalid escape `{bad}` in {key}'s value; VMware writes `|` as `|7C` and `\"` as `|22`")
    })?;
    Ok(Some((key, value)))
}

/// Decodes VMware's `|XX` escapes (a byte in hex); returns the bad escape on error.
fn unescape(raw: &str) -> Result<String, String> {
    if !raw.contains('|') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'|' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match hex {
            Some(byte) => out.push(byte),
            None => {
                let end = (i + 3).min(bytes.len());
                return Err(String::from_utf8_lossy(&bytes[i..end]).into_owned());
            }
        }
        i += 3;
    }
    // Escaped bytes may spell UTF-8 sequences; anything else is replaced rather than refused,
    // since a name with one odd character is still usable.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `text` cut to a length fit for an error message.
pub(crate) fn quote(text: &str) -> String {
    if text.chars().count() <= QUOTE_LIMIT {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(QUOTE_LIMIT).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmxFile, SourceError> {
        VmxFile::parse(Path::new("/vms/web01/web01.vmx"), text.as_bytes())
    }

    #[test]
    fn parses_keys_case_insensitively_and_skips_comments() {
        let vmx = parse(
            ".encoding = \"UTF-8\"\n# a comment\n\n  config.version = \"8\"\r\nDisplayName = \"web01\"\nnumvcpus=2\n",
        )
        .unwrap();
        assert_eq!(vmx.value("displayname"), Some("web01"));
        assert_eq!(vmx.value("DISPLAYNAME"), Some("web01"));
        assert_eq!(vmx.get("displayName").unwrap().key, "DisplayName");
        assert_eq!(vmx.get("displayName").unwrap().line, 5);
        assert_eq!(vmx.value("config.version"), Some("8"));
        // Unquoted values are accepted.
        assert_eq!(vmx.number::<u32>("numvcpus", 1).unwrap(), Some(2));
    }

    #[test]
    fn later_lines_override_earlier_ones() {
        let vmx = parse("displayName = \"a\"\ndisplayname = \"b\"\n").unwrap();
        assert_eq!(vmx.value("displayName"), Some("b"));
    }

    #[test]
    fn decodes_escapes() {
        let vmx = parse("displayName = \"say |22hi|22 |7C pipe |23 hash\"\nannotation = \"caf|C3|A9\"\n").unwrap();
        assert_eq!(vmx.value("displayName"), Some("say \"hi\" | pipe # hash"));
        assert_eq!(vmx.value("annotation"), Some("café"));
    }

    #[test]
    fn invalid_escape_names_the_line() {
        let err = parse("config.version = \"8\"\ndisplayName = \"a|zz\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SourceError::VmxSyntax { line: 2, .. }), "{msg}");
        assert!(msg.contains("`|zz`"), "{msg}");
    }

    #[test]
    fn malformed_line_is_reported_with_its_number() {
        let text = "config.version = \"8\"\ndisplayName = \"web01\"\nnumvcpus 2\n";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, SourceError::VmxSyntax { line: 3, .. }));
        assert_eq!(
            err.to_string(),
            "/vms/web01/web01.vmx line 3: expected `key = \"value\"`, found `numvcpus 2`"
        );
    }

    #[test]
    fn unterminated_quote_is_reported() {
        let err = parse("config.version = \"8\"\ndisplayName = \"web01\n").unwrap_err();
        assert!(matches!(err, SourceError::VmxSyntax { line: 2, .. }));
        assert!(err.to_string().contains("no closing"), "{err}");
    }

    #[test]
    fn text_after_the_value_is_refused() {
        let err = parse("config.version = \"8\"\ndisplayName = \"a\" junk\n").unwrap_err();
        assert!(matches!(err, SourceError::VmxSyntax { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("`junk`"), "{err}");
    }

    #[test]
    fn long_offending_lines_are_cut() {
        let text = format!("config.version = \"8\"\n{}\n", "x".repeat(10_000));
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn refuses_files_that_are_not_vmx() {
        for (text, reason) in [
            (&b""[..], "empty"),
            (b"\x7fELF\x02\x01\x01\0\0\0", "binary"),
            (b"just some\ntext without equals\n", "no `key"),
            (b"[section]\nname = value\n", "none of config.version"),
        ] {
            let err = VmxFile::parse(Path::new("/x.vmx"), text).unwrap_err();
            assert!(matches!(err, SourceError::NotVmx { .. }), "{err}");
            assert!(err.to_string().contains(reason), "{err}");
        }
    }

    #[test]
    fn reads_latin1_when_the_encoding_says_so() {
        let bytes = b".encoding = \"windows-1252\"\ndisplayName = \"caf\xe9\"\n";
        let vmx = VmxFile::parse(Path::new("/x.vmx"), bytes).unwrap();
        assert_eq!(vmx.value("displayName"), Some("café"));

        let bytes = b"config.version = \"8\"\ndisplayName = \"caf\xe9\"\n";
        let err = VmxFile::parse(Path::new("/x.vmx"), bytes).unwrap_err();
        assert!(matches!(err, SourceError::VmxSyntax { line: 2, .. }), "{err}");
    }

    #[test]
    fn booleans_and_numbers_are_checked() {
        let vmx = parse("config.version = \"8\"\na = \"TRUE\"\nb = \"false\"\nc = \"maybe\"\nn = \"0\"\n").unwrap();
        assert_eq!(vmx.bool("a").unwrap(), Some(true));
        assert_eq!(vmx.bool("b").unwrap(), Some(false));
        assert_eq!(vmx.bool("missing").unwrap(), None);
        let err = vmx.bool("c").unwrap_err();
        assert!(matches!(err, SourceError::VmxValue { line: 4, .. }), "{err}");
        let err = vmx.number::<u32>("n", 1).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn read_enforces_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.vmx");
        let line = "annotation = \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"\n";
        let text = line.repeat((VMX_SIZE_LIMIT as usize / line.len()) + 1);
        std::fs::write(&path, text).unwrap();
        let err = VmxFile::read(&path).unwrap_err();
        assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");

        let err = VmxFile::read(&dir.path().join("absent.vmx")).unwrap_err();
        assert!(matches!(err, SourceError::Io { .. }), "{err}");
        let err = VmxFile::read(dir.path()).unwrap_err();
        assert!(matches!(err, SourceError::NotVmx { .. }), "{err}");
    }
}
