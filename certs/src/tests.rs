//! The certificates checked the way the gateway uses them: by rustls/webpki.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::*;

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies `cert` as a server certificate for `name`, as the edge agent will.
fn verify_server(ca: &Ca, cert: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(name).unwrap();
    verifier
        .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// Verifies `cert` as a client certificate, as the cloud endpoint will.
fn verify_client(ca: &Ca, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .unwrap();
    verifier.verify_client_cert(cert, &[], UnixTime::now()).map(|_| ())
}

fn cert_error(result: Result<(), rustls::Error>) -> CertificateError {
    match result {
        Err(rustls::Error::InvalidCertificate(e)) => e,
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn endpoint_certificate_is_accepted_for_its_dns_names_and_ips_only() {
    let ca = Ca::generate("Test CA").unwrap();
    let endpoint = ca
        .issue_endpoint(
            &names(&["localhost", "127.0.0.1", "::1", "gw.example.com"]),
            Validity::default(),
        )
        .unwrap();
    let cert = endpoint.cert_der();
    for name in ["localhost", "127.0.0.1", "::1", "gw.example.com"] {
        verify_server(&ca, &cert, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for wrong in ["other.example.com", "10.0.0.1", "::2"] {
        let err = cert_error(verify_server(&ca, &cert, wrong));
        assert!(
            matches!(
                err,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ),
            "{wrong}: {err:?}"
        );
    }
}

#[test]
fn certificates_from_another_ca_are_rejected() {
    let ca = Ca::generate("Test CA").unwrap();
    // A CA with another name is unknown; one that copies our CA's name is caught by the
    // signature check.
    for (other_name, expected) in [
        ("Other CA", CertificateError::UnknownIssuer),
        ("Test CA", CertificateError::BadSignature),
    ] {
        let other = Ca::generate(other_name).unwrap();
        let endpoint = other
            .issue_endpoint(&names(&["localhost"]), Validity::default())
            .unwrap();
        let edge = other.issue_edge("edge-01", Validity::default()).unwrap();
        assert_eq!(
            cert_error(verify_server(&ca, &endpoint.cert_der(), "localhost")),
            expected
        );
        assert_eq!(cert_error(verify_client(&ca, &edge.cert_der())), expected);
    }
}

#[test]
fn edge_certificate_is_a_client_certificate_only() {
    let ca = Ca::generate("Test CA").unwrap();
    let edge = ca.issue_edge("edge-01", Validity::default()).unwrap();
    let endpoint = ca.issue_endpoint(&names(&["edge-01"]), Validity::default()).unwrap();
    verify_client(&ca, &edge.cert_der()).unwrap();
    // Each certificate is good for its own side of the connection only.
    let is_purpose_error = |e: &CertificateError| {
        matches!(
            e,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    };
    let e = cert_error(verify_server(&ca, &edge.cert_der(), "edge-01"));
    assert!(is_purpose_error(&e), "{e:?}");
    let e = cert_error(verify_client(&ca, &endpoint.cert_der()));
    assert!(is_purpose_error(&e), "{e:?}");
}

#[test]
fn reloaded_ca_issues_certificates_that_chain_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("Gateway CA").unwrap();
    ca.write(dir.path()).unwrap();
    let reloaded = Ca::load(dir.path()).unwrap();
    assert_eq!(reloaded.thumbprint(), ca.thumbprint());
    assert_eq!(reloaded.cert_pem(), ca.cert_pem());

    let endpoint = reloaded
        .issue_endpoint(&names(&["localhost"]), Validity::default())
        .unwrap();
    let edge = reloaded.issue_edge("edge-01", Validity::default()).unwrap();
    verify_server(&ca, &endpoint.cert_der(), "localhost").unwrap();
    verify_client(&ca, &edge.cert_der()).unwrap();

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    }
}

#[test]
fn expired_certificate_is_rejected_as_expired() {
    let ca = Ca::generate("Test CA").unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let endpoint = ca.issue_endpoint(&names(&["localhost"]), expired).unwrap();
    let e = cert_error(verify_server(&ca, &endpoint.cert_der(), "localhost"));
    assert!(
        matches!(e, CertificateError::Expired | CertificateError::ExpiredContext { .. }),
        "{e:?}"
    );
}

#[test]
fn issued_files_load_back_and_the_key_signs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("Test CA").unwrap();
    let edge = ca.issue_edge("edge-01", Validity::days(30)).unwrap();
    let (cert_path, key_path) = edge.write(&dir.path().join("sub"), "edge").unwrap();
    assert_eq!(cert_path, dir.path().join("sub/edge.pem"));
    assert_eq!(key_path, dir.path().join("sub/edge.key"));

    assert_eq!(load_certs(&cert_path).unwrap(), vec![edge.cert_der()]);
    assert_eq!(load_key(&key_path).unwrap(), edge.key_der());
    assert_eq!(thumbprint_of_pem_file(&cert_path).unwrap(), edge.thumbprint());
    assert!(rustls::crypto::ring::sign::any_supported_type(&edge.key_der()).is_ok());
    assert!(!format!("{edge:?}").contains("PRIVATE KEY"));
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn thumbprint_matches_openssl() {
    let ca = Ca::generate("Test CA").unwrap();
    let endpoint = ca.issue_endpoint(&names(&["localhost"]), Validity::default()).unwrap();
    let expected = Thumbprint::of_der(&endpoint.cert_der());
    assert_eq!(endpoint.thumbprint(), expected);
    assert_eq!(ca.thumbprint(), Thumbprint::of_der(&ca.cert_der()));

    let dir = tempfile::tempdir().unwrap();
    let (cert_path, _) = endpoint.write(dir.path(), "endpoint").unwrap();
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert_path)
        .output()
        .unwrap_or_else(|e| {
            panic!("this test compares with openssl, which cannot run ({e}): run tests/setup.sh (installs openssl)")
        });
    assert!(output.status.success(), "{output:?}");
    // "sha256 Fingerprint=AA:BB:..." (the label's case varies between versions)
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (_, value) = stdout.trim().split_once('=').unwrap();
    assert_eq!(value, expected.to_string());
    assert_eq!(value.parse::<Thumbprint>().unwrap(), expected);
}

#[test]
fn bad_names_are_rejected_with_a_clear_message() {
    let ca = Ca::generate("Test CA").unwrap();
    let v = Validity::default();
    assert!(matches!(ca.issue_endpoint(&[], v), Err(Error::NoNames)));
    for bad in ["", "bad name", "*.example.com", "host:443", "[::1]", "-x.example.com"] {
        let err = ca.issue_endpoint(&names(&["localhost", bad]), v).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad}: {err:?}");
        assert!(err.to_string().contains("DNS name or IP address"), "{err}");
        assert!(ca.issue_edge(bad, v).is_err(), "{bad}");
    }
    let backwards = Validity {
        not_before: v.not_after,
        not_after: v.not_before,
    };
    assert!(matches!(
        ca.issue_edge("edge-01", backwards),
        Err(Error::InvalidValidity { .. })
    ));
    assert!(Ca::generate(" ").is_err());
    // A huge lifetime saturates at the latest date X.509 can express instead of overflowing.
    let forever = Validity::days(u32::MAX);
    assert_eq!(forever.not_after.year(), 9999);
    let edge = ca.issue_edge("edge-01", forever).unwrap();
    verify_client(&ca, &edge.cert_der()).unwrap();
}

#[test]
fn ca_from_mismatched_or_non_ca_pem_is_rejected() {
    let ca = Ca::generate("Test CA").unwrap();
    let other = Ca::generate("Test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    other.write(dir.path()).unwrap();
    let other_key = std::fs::read_to_string(dir.path().join("ca.key")).unwrap();

    let err = Ca::from_pem(ca.cert_pem(), &other_key).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");

    let leaf = ca.issue_edge("edge-01", Validity::default()).unwrap();
    let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(err.to_string().contains("keyCertSign"), "{err}");

    let err = Ca::from_pem("garbage", &other_key).unwrap_err();
    assert!(matches!(err, Error::InvalidCa { .. }), "{err}");

    let missing = dir.path().join("missing");
    let err = Ca::load(&missing).unwrap_err().to_string();
    assert!(err.contains("cannot read CA certificate"), "{err}");
    assert!(err.contains(&missing.join("ca.pem").display().to_string()), "{err}");
    assert!(err.contains("certs ca --out"), "{err}");
}
