//! The OVF manifest (`.mf`): one `SHA256(file)= hex` line per file of the package (also
//! `SHA1` and `SHA512`), checked before anything is sent, so an altered or truncated package
//! is refused up front rather than after the cloud has stored half of it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ring::digest;

use super::ovf::Package;
use super::slice::FileSlice;
use super::SourceError;

/// A manifest is one short line per file; this bounds the read.
pub(crate) const SIZE_LIMIT: u64 = 1024 * 1024;

/// Files are hashed in reads of this size, sequentially.
const READ_SIZE: usize = 1024 * 1024;

/// At most this many files are hashed at once (each on its own thread).
const MAX_PARALLEL: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn ring(self) -> &'static digest::Algorithm {
        match self {
            // OVF 1.x manifests (and ovftool's default before 4.x) use SHA-1; it is only
            // compared against, never used to sign anything.
            Algorithm::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Algorithm::Sha256 => &digest::SHA256,
            Algorithm::Sha512 => &digest::SHA512,
        }
    }
}

/// One line of a manifest.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The file's name in the package, as written.
    pub file: String,
    pub algorithm: Algorithm,
    /// The expected digest, lower-case hex.
    pub digest: String,
    /// 1-based line number in the manifest.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Manifest {
    /// The `.mf` file, or the `.ova` holding it.
    pub path: PathBuf,
    /// The manifest's name, e.g. `web01.mf`, for messages.
    pub name: String,
    /// Set when the manifest is an archive member.
    pub member: Option<String>,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Parses a manifest's bytes; `path` and `member` are for messages.
    pub fn parse(path: &Path, member: Option<&str>, bytes: &[u8]) -> Result<Manifest, SourceError> {
        let name = member.map(str::to_owned).unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut manifest = Manifest {
            path: path.to_owned(),
            name,
            member: member.map(str::to_owned),
            entries: Vec::new(),
        };
        let text =
            std::str::from_utf8(bytes).map_err(|_| manifest.error(0, "the manifest is not UTF-8 text".to_owned()))?;
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let entry = parse_line(line, line_no).map_err(|problem| manifest.error(line_no, problem))?;
            if manifest.entry(&entry.file).is_some() {
                return Err(manifest.error(line_no, format!("{} is listed twice", entry.file)));
            }
            manifest.entries.push(entry);
        }
        if manifest.entries.is_empty() {
            return Err(manifest.error(0, "the manifest lists no files".to_owned()));
        }
        Ok(manifest)
    }

    /// The entry for `file`, if listed.
    pub fn entry(&self, file: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.file == file)
    }

    /// A problem with the manifest itself at `line` (0: no particular line).
    pub fn error(&self, line: usize, message: String) -> SourceError {
        // For an OVA the location names the member; otherwise `path` is the .mf itself.
        SourceError::BadOvf {
            path: self.path.clone(),
            member: self.member.clone(),
            line: (line > 0).then_some(line),
            message,
        }
    }

    /// Checks bytes already in memory (the descriptor) against the entry for `file`, if any.
    pub fn check_bytes(&self, package: &Package, file: &str, bytes: &[u8]) -> Result<(), SourceError> {
        let Some(entry) = self.entry(file) else {
            return Ok(());
        };
        let actual = hex(digest::digest(entry.algorithm.ring(), bytes).as_ref());
        self.compare(package, entry, actual)
    }

    fn compare(&self, package: &Package, entry: &Entry, actual: String) -> Result<(), SourceError> {
        if actual == entry.digest {
            return Ok(());
        }
        Err(SourceError::ManifestMismatch {
            path: package.path.clone(),
            file: entry.file.clone(),
            algorithm: entry.algorithm.name(),
            expected: entry.digest.clone(),
            actual,
        })
    }
}

/// `ALGO(file)= hex`, as ovftool writes it; spaces around `=` and before `(` are accepted
/// (`sha256sum --tag` writes `SHA256 (file) = hex`).
fn parse_line(line: &str, line_no: usize) -> Result<Entry, String> {
    let bad = || format!("{line:?} is not of the form SHA256(file)= digest");
    let (algorithm, rest) = line.split_once('(').ok_or_else(bad)?;
    let (file, digest) = rest.rsplit_once('=').ok_or_else(bad)?;
    let file = file.trim_end().strip_suffix(')').ok_or_else(bad)?;
    let algorithm = match algorithm.trim().to_ascii_uppercase().as_str() {
        "SHA1" => Algorithm::Sha1,
        "SHA256" => Algorithm::Sha256,
        "SHA512" => Algorithm::Sha512,
        other => {
            return Err(format!(
                "digest algorithm {other:?} is not supported; expected SHA1, SHA256 or SHA512"
            ))
        }
    };
    let digest = digest.trim().to_ascii_lowercase();
    let expected_len = algorithm.ring().output_len() * 2;
    if digest.len() != expected_len || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the {} digest of {file} is {digest:?}, not {expected_len} hex digits",
            algorithm.name()
        ));
    }
    if file.is_empty() {
        return Err(bad());
    }
    Ok(Entry {
        file: file.to_owned(),
        algorithm,
        digest,
        line: line_no,
    })
}

/// Hashes every `(entry, file)` and compares with the manifest; the first mismatch (in the
/// order given) is the error.
///
/// Every byte of every listed file is read once: for a multi-GiB OVA this is a full read of
/// the archive before the first byte is sent. That is the price of refusing an altered or
/// truncated package before the cloud has stored any of it, and it is always paid.
pub(crate) fn verify(package: &Package, manifest: &Manifest, jobs: &[(&Entry, FileSlice)]) -> Result<(), SourceError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<String, SourceError>>>> = Mutex::new(jobs.iter().map(|_| None).collect());
    let threads = jobs.len().clamp(1, MAX_PARALLEL);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((entry, slice)) = jobs.get(i) else {
                    break;
                };
                let result = digest_of(slice, entry.algorithm);
                let mut results = results.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                results[i] = Some(result);
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    for ((entry, _), result) in jobs.iter().zip(results) {
        let actual = result.expect("every job ran")?;
        manifest.compare(package, entry, actual)?;
    }
    Ok(())
}

/// The digest of a whole slice, lower-case hex, from sequential [`READ_SIZE`] reads.
fn digest_of(slice: &FileSlice, algorithm: Algorithm) -> Result<String, SourceError> {
    let mut context = digest::Context::new(algorithm.ring());
    let mut buf = vec![0; READ_SIZE.min(usize::try_from(slice.len).unwrap_or(READ_SIZE))];
    let mut offset = 0u64;
    while offset < slice.len {
        let n = usize::try_from(slice.len - offset).map_or(buf.len(), |left| left.min(buf.len()));
        slice
            .read_exact_at(&mut buf[..n], offset)
            .map_err(|source| SourceError::Io {
                path: slice.path.clone(),
                action: "read a file to check its manifest digest",
                source,
            })?;
        context.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hex(context.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
