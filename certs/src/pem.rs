//! Reading and writing PEM files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Thumbprint};

const CERT_HINT: &str = "create it with `certs endpoint`, `certs edge` or `certs quickstart`, or pass the right path";
const KEY_HINT: &str = "the key is written next to its certificate as <name>.key; pass the right path";

/// All certificates in a PEM file, in file order. Fails if the file holds none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let text = read(path, "certificate", CERT_HINT)?;
    let certs = rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let text = read(path, "private key", KEY_HINT)?;
    rustls_pemfile::private_key(&mut text.as_slice())
        .map_err(|source| Error::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| Error::NoKey { path: path.to_owned() })
}

/// Thumbprint of the first certificate in a PEM file.
pub fn thumbprint_of_pem_file(path: &Path) -> Result<Thumbprint, Error> {
    let certs = load_certs(path)?;
    Ok(Thumbprint::of_der(&certs[0]))
}

/// The DER of the first certificate in PEM text, if any.
pub(crate) fn first_cert_der(pem: &str) -> Option<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()
}

/// The first private key in PEM text, if any.
pub(crate) fn first_key_der(pem: &str) -> Option<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes()).ok()?
}

pub(crate) fn read(path: &Path, what: &'static str, hint: &'static str) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        hint,
        source,
    })
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Whether a file holds a secret, which decides its permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrecy {
    Public,
    Secret,
}

/// Writes `contents` to `path`, replacing it. A secret file is readable by its owner only,
/// and its permissions are narrowed before anything is written, so an existing file that was
/// world-readable never holds the new key with its old permissions.
pub(crate) fn write_file(path: &Path, contents: &str, secrecy: Secrecy) -> Result<PathBuf, Error> {
    let to_error = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secrecy == Secrecy::Secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(to_error)?;
    #[cfg(unix)]
    if secrecy == Secrecy::Secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(to_error)?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(to_error)?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_error_names_path_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pem");
        let msg = load_certs(&path).unwrap_err().to_string();
        assert!(msg.contains("cannot read certificate"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("certs endpoint"), "{msg}");
    }

    #[test]
    fn file_without_certificate_or_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        fs::write(&path, "just text\n").unwrap();
        assert!(matches!(load_certs(&path), Err(Error::NoCertificate { .. })));
        assert!(matches!(load_key(&path), Err(Error::NoKey { .. })));
        assert!(matches!(
            thumbprint_of_pem_file(&path),
            Err(Error::NoCertificate { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn secret_file_is_owner_only_even_when_it_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.key");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&path, "new", Secrecy::Secret).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    }
}
