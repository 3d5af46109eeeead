//! TLS 1.3 with mutual authentication, for quinn. Only the ring provider, only
//! TLS 1.3, no 0-RTT (a replayed 0-RTT hello could replay a migration request).

use std::sync::Arc;

use certs::Thumbprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::TransportError;
use crate::wire::ALPN;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TransportError> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store
            .add(ca.clone())
            .map_err(|e| TransportError::Tls(format!("CA certificate not usable as a trust anchor: {e}")))?;
    }
    if store.is_empty() {
        return Err(TransportError::Tls("the CA bundle holds no certificate".into()));
    }
    Ok(Arc::new(store))
}

/// How the edge agent decides to trust a cloud endpoint, as vSphere's
/// ServiceLocator does: a CA, a pinned SHA-256 thumbprint, or both (then both
/// must match).
#[derive(Debug, Clone)]
pub enum ServerTrust {
    Ca(Vec<CertificateDer<'static>>),
    Pinned(Thumbprint),
    CaAndPinned(Vec<CertificateDer<'static>>, Thumbprint),
}

/// The edge agent's identity: its client certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// rustls client configuration for an edge agent.
pub fn client_crypto(identity: Identity, trust: ServerTrust) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let ca_verifier = |cas: &[CertificateDer<'static>]| {
        WebPkiServerVerifier::builder_with_provider(roots(cas)?, provider.clone())
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))
    };
    let builder = match trust {
        ServerTrust::Ca(cas) => builder.with_webpki_verifier(ca_verifier(&cas)?),
        ServerTrust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin,
                ca: None,
                algorithms: provider.signature_verification_algorithms,
            })),
        ServerTrust::CaAndPinned(cas, pin) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pin,
                    ca: Some(ca_verifier(&cas)?),
                    algorithms: provider.signature_verification_algorithms,
                }))
        }
    };
    let mut config = builder
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|e| TransportError::Tls(format!("edge certificate or key not usable: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// rustls client configuration for one cloud endpoint calling another's HTTPS API (a
/// scale-out domain's VM is powered on by its host's endpoint): the peer's certificate
/// thumbprint, which the peer recorded in the shared inventory, is pinned; no client
/// certificate (a token the peer recorded there authenticates the caller); HTTP/1.1.
pub fn pinned_https_client(pin: Thumbprint) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            pin,
            ca: None,
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// rustls server configuration for a cloud endpoint: only clients whose
/// certificate chains to one of `edge_cas` get in.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    edge_cas: &[CertificateDer<'static>],
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(edge_cas)?, provider.clone())
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Tls(format!("endpoint certificate or key not usable: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Accepts the server certificate whose SHA-256 thumbprint is pinned, and, if a
/// CA is given too, only if it also chains to that CA. The handshake signature
/// is always verified, so the peer must hold the pinned certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: Thumbprint,
    ca: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

struct PinMismatch {
    expected: Thumbprint,
    got: Thumbprint,
}

// rustls shows the error with Debug: make that the readable sentence too.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the endpoint's certificate has thumbprint {}, not the pinned {}",
            self.got, self.expected
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Thumbprint::of_der(end_entity);
        if got != self.pin {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    expected: self.pin,
                    got,
                })),
            )));
        }
        match &self.ca {
            Some(ca) => ca.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
