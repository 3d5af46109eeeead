//! Where a VM goes: the cloud endpoint, as vSphere's ServiceLocator names a
//! remote vCenter (url, credential, SSL thumbprint), plus this agent's own
//! client certificate.

use std::net::SocketAddr;
use std::path::Path;

use certs::Thumbprint;
use gateway::transport::{self, Identity, ServerTrust, TransportError, TransportTuning};

use crate::MigrateError;

/// Default UDP port of a cloud endpoint.
pub const DEFAULT_PORT: u16 = 4433;

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Name the endpoint's certificate must carry (host of the URL).
    pub server_name: String,
    pub user: String,
    pub password: String,
    pub trust: ServerTrust,
    pub identity: Identity,
}

impl Target {
    /// A QUIC endpoint on a fresh UDP socket and a connection to the target
    /// with the handshake done: the edge always initiates, so only the
    /// cloud's UDP port must be reachable.
    pub async fn connect(
        &self,
        tuning: &TransportTuning,
    ) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
        let crypto = transport::client_crypto(self.identity.clone(), self.trust.clone())?;
        let bind: SocketAddr = if self.addr.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let endpoint = transport::client_endpoint(bind, crypto, tuning)?;
        let conn =
            transport::connect_within(&endpoint, self.addr, &self.server_name, tuning.handshake_timeout()).await?;
        Ok((endpoint, conn))
    }
}

/// Splits `quic://host:port`, `host:port` or `host` into host and port.
pub fn parse_url(url: &str) -> Result<(String, u16), MigrateError> {
    let bad = |why: &str| {
        MigrateError::Target(format!(
            "endpoint URL `{url}` {why}; write it as quic://HOST[:PORT], e.g. quic://cloud-gw.example.com:{DEFAULT_PORT}"
        ))
    };
    let rest = match url.split_once("://") {
        Some(("quic", rest)) => rest,
        Some((scheme, _)) => return Err(bad(&format!("has scheme `{scheme}`, not `quic`"))),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(bad("is not a host and port"));
    }
    // [v6]:port, [v6], host:port, host
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(|| bad("has an unclosed `[`"))?;
        (h.to_owned(), tail.strip_prefix(':'))
    } else if rest.matches(':').count() > 1 {
        (rest.to_owned(), None)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (rest.to_owned(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| bad(&format!("has port `{p}`, not a number 1-65535")))?,
        None => DEFAULT_PORT,
    };
    if host.is_empty() || port == 0 {
        return Err(bad("has no host or port 0"));
    }
    Ok((host, port))
}

/// Resolves the URL's host (DNS or literal IP).
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr, MigrateError> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| MigrateError::Target(format!("cannot resolve endpoint host `{host}`: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| MigrateError::Target(format!("endpoint host `{host}` resolves to no address")))
}

/// Builds the trust decision from the user's options: at least one of a CA
/// bundle and a thumbprint.
pub fn server_trust(ca_bundle: Option<&Path>, thumbprint: Option<&str>) -> Result<ServerTrust, MigrateError> {
    let pin = thumbprint
        .map(|t| t.parse::<Thumbprint>())
        .transpose()
        .map_err(|e| MigrateError::Target(format!("--thumbprint: {e}")))?;
    let cas = ca_bundle.map(certs::load_certs).transpose()?;
    match (cas, pin) {
        (Some(cas), Some(pin)) => Ok(ServerTrust::CaAndPinned(cas, pin)),
        (Some(cas), None) => Ok(ServerTrust::Ca(cas)),
        (None, Some(pin)) => Ok(ServerTrust::Pinned(pin)),
        (None, None) => Err(MigrateError::Target(
            "no way to trust the endpoint: pass --ca-bundle FILE (the CA that issued the endpoint's certificate) \
             or --thumbprint AA:BB:... (its SHA-256 thumbprint, as `certs thumbprint endpoint.pem` prints it)"
                .into(),
        )),
    }
}

/// Loads this agent's client certificate and key.
pub fn identity(cert: &Path, key: &Path) -> Result<Identity, MigrateError> {
    Ok(Identity {
        chain: certs::load_certs(cert)?,
        key: certs::load_key(key)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("quic://gw.example:9000").unwrap(),
            ("gw.example".into(), 9000)
        );
        assert_eq!(parse_url("gw.example").unwrap(), ("gw.example".into(), DEFAULT_PORT));
        assert_eq!(parse_url("127.0.0.1:1").unwrap(), ("127.0.0.1".into(), 1));
        assert_eq!(parse_url("quic://[::1]:7").unwrap(), ("::1".into(), 7));
        assert_eq!(parse_url("::1").unwrap(), ("::1".into(), DEFAULT_PORT));
        for bad in ["https://x/sdk", "quic://", "x:port", "x:0", "x:70000", "user@x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
