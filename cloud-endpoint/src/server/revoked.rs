//! Revoked edge certificates: a deny list of certificate serial numbers in a file the
//! operator names (`revoked_edge_serials`), checked right after each QUIC handshake, before
//! the edge can say anything. The file is read again whenever its modification time or
//! size changes, so revoking an edge takes effect at its next connection, without a
//! restart.
//!
//! The file: one serial per line, in hex as `openssl x509 -serial -noout` prints it
//! (`serial=3A5F...`), with or without colons or `0x`; `#` starts a comment.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

/// Why the deny list cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokedError {
    #[error("cannot read the revoked edge serials file {}: {source}; check `revoked_edge_serials` (CLOUD_ENDPOINT_REVOKED_EDGE_SERIALS)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line} of the revoked edge serials file {} is not a serial number in hex: {text:?}; write one serial per line as `openssl x509 -serial -noout` prints it", path.display())]
    BadSerial { path: PathBuf, line: usize, text: String },
}

/// What the file held when last read.
#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    serials: HashSet<Vec<u8>>,
}

/// The deny list of one endpoint; empty (and never read) without a file.
#[derive(Debug, Default)]
pub struct RevokedEdges {
    file: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

impl RevokedEdges {
    /// The deny list in `file`, read now: a missing or malformed file stops the start.
    pub fn open(file: Option<&Path>) -> Result<RevokedEdges, RevokedError> {
        let revoked = RevokedEdges {
            file: file.map(Path::to_owned),
            loaded: Mutex::default(),
        };
        if let Some(path) = &revoked.file {
            let loaded = read(path)?;
            tracing::info!(file = %path.display(), serials = loaded.serials.len(), "revoked edge certificates loaded");
            *revoked.lock() = loaded;
        }
        Ok(revoked)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(serial)` (in hex) if the edge certificate `leaf` is revoked. Reads the file
    /// again first if it changed; a file that became unreadable or malformed keeps the
    /// list read last (an error is logged): a typo must not let every revoked edge in.
    pub fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), String> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let serial = serial_of(leaf).unwrap_or_default();
        let mut loaded = self.lock();
        if stamp(path) != loaded.stamp {
            match read(path) {
                Ok(fresh) => {
                    tracing::info!(file = %path.display(), serials = fresh.serials.len(), "revoked edge certificates reloaded");
                    *loaded = fresh;
                }
                Err(e) => {
                    tracing::error!(error = %e, "keeping the revoked edge serials read before");
                    loaded.stamp = stamp(path);
                }
            }
        }
        if loaded.serials.contains(&serial) {
            return Err(hex(&serial));
        }
        Ok(())
    }
}

/// Whether a freshly handshaken edge connection may go on; a revoked edge's connection is
/// closed with a `NotPermitted` code and a reason naming the serial, before it can say
/// anything.
pub fn admit(conn: &quinn::Connection, revoked: &RevokedEdges) -> bool {
    let leaf = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let Some(leaf) = leaf else {
        // rustls requires a client certificate; none here means no mTLS at all.
        return false;
    };
    match revoked.check(&leaf) {
        Ok(()) => true,
        Err(serial) => {
            tracing::warn!(remote = %conn.remote_address(), serial, "edge refused: its certificate is revoked");
            let reason = format!(
                "this edge's certificate (serial {serial}) is revoked by the cloud endpoint; ask its operator for a new certificate"
            );
            conn.close(
                gateway::wire::RefusalCode::NotPermitted.close_code().into(),
                reason.as_bytes(),
            );
            false
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<Loaded, RevokedError> {
    let stamp = stamp(path);
    let text = std::fs::read_to_string(path).map_err(|source| RevokedError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut serials = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let serial = parse_serial(line).ok_or_else(|| RevokedError::BadSerial {
            path: path.to_owned(),
            line: i + 1,
            text: line.to_owned(),
        })?;
        serials.insert(serial);
    }
    Ok(Loaded { stamp, serials })
}

/// A serial in hex (`serial=`, `0x` and colons allowed), as big-endian bytes without
/// leading zeros (how it compares with a certificate's).
fn parse_serial(text: &str) -> Option<Vec<u8>> {
    let text = text.strip_prefix("serial=").unwrap_or(text);
    let text = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes: Vec<u8> = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    Some(strip_zeros(&bytes))
}

fn strip_zeros(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "00".to_owned();
    }
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The serial number of a DER certificate (`Certificate.tbsCertificate.serialNumber`),
/// without leading zeros; `None` if the DER is not a certificate's shape. rustls has
/// verified the chain before this runs, so the DER is well formed.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (tag, certificate, _) = tlv(cert.as_ref())?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = tlv(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let (mut tag, mut content, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        // [0] EXPLICIT version
        (tag, content, rest) = tlv(rest)?;
    }
    let _ = rest;
    (tag == 0x02).then(|| strip_zeros(content))
}

/// One DER tag-length-value: the tag, the content, and what follows.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || input.len() < octets {
            return None;
        }
        let (bytes, rest) = input.split_at(octets);
        input = rest;
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    if input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    Some((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_as_openssl_prints_them() {
        assert_eq!(parse_serial("serial=0A1B"), Some(vec![0x0a, 0x1b]));
        assert_eq!(parse_serial("0x00:0a:1b"), Some(vec![0x0a, 0x1b]));
        assert_eq!(parse_serial("a1b"), Some(vec![0x0a, 0x1b]));
        assert_eq!(parse_serial("xyz"), None);
        assert_eq!(parse_serial(""), None);
    }

    #[test]
    fn a_revoked_serial_is_refused_and_the_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::generate("Test CA").unwrap();
        let edge = ca.issue_edge("edge-01", certs::Validity::days(1)).unwrap();
        edge.write(dir.path(), "edge").unwrap();
        let leaf = certs::load_certs(&dir.path().join("edge.pem")).unwrap().remove(0);
        let serial = hex(&serial_of(&leaf).expect("a serial"));
        assert!(serial.len() >= 8, "{serial}");

        let file = dir.path().join("revoked.txt");
        std::fs::write(&file, "# none yet\n").unwrap();
        let revoked = RevokedEdges::open(Some(&file)).unwrap();
        assert_eq!(revoked.check(&leaf), Ok(()));
        // Revoked without a restart: the file changed (its size, here; else its time).
        std::fs::write(&file, format!("# edge-01, lost laptop\nserial={serial}\n")).unwrap();
        assert_eq!(revoked.check(&leaf), Err(serial.clone()));
        // A broken file keeps the list read last.
        std::fs::write(&file, "not a serial at all, and longer than before\n").unwrap();
        assert_eq!(revoked.check(&leaf), Err(serial));
        // At start, a broken file is an error that names the line.
        let err = RevokedEdges::open(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("openssl x509 -serial"), "{err}");
        assert!(RevokedEdges::open(None).unwrap().check(&leaf).is_ok());
    }
}
