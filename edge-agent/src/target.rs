//! Where a VM goes: the cloud endpoint, as vSphere's ServiceLocator names a
//! remote vCenter (url, credential, SSL thumbprint), plus this agent's own
//! client certificate.
//!
//! A target may name several endpoints of one domain (several URLs, or one name that
//! resolves to several addresses): they share the domain's inventory and staging, and
//! its CA or thumbprint. A connection goes to the first of them that answers, from the
//! one a [`crate::failover::Rotation`] says is next; a migration whose endpoint is lost resumes on the
//! next one.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use certs::Thumbprint;
use gateway::transport::{self, Identity, ServerTrust, TransportError, TransportTuning};

use crate::MigrateError;

/// Default UDP port of a cloud endpoint.
pub const DEFAULT_PORT: u16 = 4433;

/// One address of a target: where to send UDP, and the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Name the endpoint's certificate must carry (host of the URL).
    pub server_name: String,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, server_name: impl Into<String>) -> Endpoint {
        Endpoint {
            addr,
            server_name: server_name.into(),
        }
    }
}

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    /// Every address that serves the target's domain, in the order the URLs name them
    /// (a name's addresses in the resolver's order), without repeats. Never empty once
    /// [`resolve_all`] made it.
    pub endpoints: Vec<Endpoint>,
    /// The URLs as given, `host:port` (see [`Target::record_keys`]); empty when the
    /// target was built from addresses.
    pub names: Vec<String>,
    pub user: String,
    pub password: String,
    pub trust: ServerTrust,
    pub identity: Identity,
}

/// A connection to one endpoint of a target, with the handshake done.
#[derive(Debug)]
pub struct Connected {
    /// Which of [`Target::endpoints`].
    pub index: usize,
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl Target {
    /// A target of one endpoint.
    pub fn single(
        addr: SocketAddr,
        server_name: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
        trust: ServerTrust,
        identity: Identity,
    ) -> Target {
        Target {
            endpoints: vec![Endpoint::new(addr, server_name)],
            names: Vec::new(),
            user: user.into(),
            password: password.into(),
            trust,
            identity,
        }
    }

    /// The endpoints for people: `10.0.0.1:4433` or `10.0.0.1:4433, 10.0.0.2:4433`.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self.endpoints.iter().map(|e| e.addr.to_string()).collect();
        addrs.join(", ")
    }

    /// The address of endpoint `index` (of [`Target::endpoints`]), for logs.
    pub fn addr(&self, index: usize) -> String {
        self.endpoints
            .get(index)
            .map_or_else(|| "no endpoint".to_owned(), |e| e.addr.to_string())
    }

    /// The keys the edge's records (checkpoints) of migrations to this target may be
    /// filed under, the one new records take first. One address is keyed by that address,
    /// as agents always did, so a single-endpoint target finds its records as before.
    /// Several are the target as a whole (the URLs as given, sorted, so that a migration
    /// started on one endpoint resumes from another with the same record, and a name whose
    /// addresses change keeps its key); then each address alone, where a run that named
    /// one endpoint of the target (or an older agent) filed it.
    pub fn record_keys(&self) -> Vec<String> {
        let addrs: Vec<String> = self.endpoints.iter().map(|e| e.addr.to_string()).collect();
        let whole = if self.names.is_empty() {
            let mut sorted = addrs.clone();
            sorted.sort();
            sorted.join(",")
        } else {
            let mut names = self.names.clone();
            names.sort();
            names.dedup();
            names.join(",")
        };
        let mut keys = Vec::with_capacity(addrs.len() + 2);
        if addrs.len() == 1 {
            keys.extend(addrs.first().cloned());
        }
        keys.push(whole);
        keys.extend(addrs);
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(k.clone()));
        keys
    }

    /// A QUIC endpoint on a fresh UDP socket and a connection to the target with the
    /// handshake done, to the first of its endpoints that answers (see
    /// [`Target::connect_from`]): the edge always initiates, so only the cloud's UDP port
    /// must be reachable.
    pub async fn connect(
        &self,
        tuning: &TransportTuning,
    ) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
        let c = self.connect_from(0, tuning).await?;
        Ok((c.endpoint, c.conn))
    }

    /// Connects to endpoint `first`, or the first after it (round robin) that answers.
    /// The next one is tried alongside once the previous had [`stagger`] to answer, or
    /// at once when it failed: a dead address costs about a second, not a handshake
    /// timeout, while a live first endpoint keeps the connection on a long link. The
    /// first handshake to complete wins; the others are dropped.
    pub async fn connect_from(&self, first: usize, tuning: &TransportTuning) -> Result<Connected, TransportError> {
        let count = self.endpoints.len();
        if count == 0 {
            return Err(TransportError::Unreachable(Vec::new()));
        }
        let crypto = transport::client_crypto(self.identity.clone(), self.trust.clone())?;
        let mut order = (0..count).map(|k| (first + k) % count);
        let mut tries = tokio::task::JoinSet::new();
        let mut failures: Vec<(usize, TransportError)> = Vec::new();
        let delay = stagger(tuning);
        let mut next_at = tokio::time::Instant::now();
        let mut pending = order.next();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next_at), if pending.is_some() => {
                    let index = pending.take().expect("guarded");
                    let e = self.endpoints[index].clone();
                    let (crypto, tuning) = (crypto.clone(), tuning.clone());
                    tries.spawn(async move { (index, connect_one(&e, crypto, &tuning).await) });
                    pending = order.next();
                    next_at = tokio::time::Instant::now() + delay;
                }
                Some(done) = tries.join_next() => {
                    let (index, result) = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    match result {
                        Ok((endpoint, conn)) => {
                            // Said once it matters: an endpoint of the list is down.
                            for (failed, e) in &failures {
                                tracing::warn!(
                                    endpoint = %self.endpoints[*failed].addr,
                                    error = %e,
                                    "could not connect to this endpoint; connected to {} instead",
                                    self.endpoints[index].addr
                                );
                            }
                            return Ok(Connected { index, endpoint, conn });
                        }
                        Err(e) => {
                            tracing::debug!(endpoint = %self.endpoints[index].addr, error = %e, "could not connect to this endpoint");
                            failures.push((index, e));
                            if tries.is_empty() {
                                next_at = tokio::time::Instant::now();
                            }
                        }
                    }
                }
                else => break,
            }
        }
        if failures.len() == 1 {
            return Err(failures.pop().expect("one").1);
        }
        // In the order tried, so that the message reads as what happened.
        failures.sort_by_key(|(index, _)| (index + count - first % count) % count);
        Err(TransportError::Unreachable(
            failures
                .into_iter()
                .map(|(index, e)| (self.endpoints[index].addr, e))
                .collect(),
        ))
    }
}

/// How long one endpoint has to complete its handshake before the next is tried
/// alongside: a few round trips of the link (a handshake takes one or two), at least
/// half a second, at most three.
fn stagger(tuning: &TransportTuning) -> Duration {
    (tuning.initial_rtt * 4).clamp(Duration::from_millis(500), Duration::from_secs(3))
}

/// A fresh UDP socket of the address's family, and the handshake with `e`.
async fn connect_one(
    e: &Endpoint,
    crypto: rustls::ClientConfig,
    tuning: &TransportTuning,
) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
    let bind: SocketAddr = if e.addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let endpoint = transport::client_endpoint(bind, crypto, tuning)?;
    let conn = transport::connect_within(&endpoint, e.addr, &e.server_name, tuning.handshake_timeout()).await?;
    Ok((endpoint, conn))
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

/// Resolves every URL of a target (`--url` may be repeated, or list several separated
/// by commas) to its endpoints: each address a name resolves to counts as one endpoint,
/// in the resolver's order after the URLs before it; an address named twice counts once.
/// Returns them and the URLs as `host:port`, the target's name in the edge's records.
pub async fn resolve_all(urls: &[String]) -> Result<(Vec<Endpoint>, Vec<String>), MigrateError> {
    let urls: Vec<&str> = urls
        .iter()
        .flat_map(|u| u.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(MigrateError::Target(format!(
            "no cloud endpoint given: pass --url quic://HOST[:PORT] (repeat it, or separate URLs with commas, \
             for several endpoints of one domain), e.g. quic://cloud-gw.example.com:{DEFAULT_PORT}"
        )));
    }
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut names = Vec::with_capacity(urls.len());
    for url in urls {
        let (host, port) = parse_url(url)?;
        names.push(if host.contains(':') {
            format!("[{}]:{port}", host.to_ascii_lowercase())
        } else {
            format!("{}:{port}", host.to_ascii_lowercase())
        });
        for addr in resolve(&host, port).await? {
            if !endpoints.iter().any(|e| e.addr == addr) {
                endpoints.push(Endpoint::new(addr, host.clone()));
            }
        }
    }
    Ok((endpoints, names))
}

/// Every address the URL's host resolves to (DNS or literal IP), without repeats.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, MigrateError> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| MigrateError::Target(format!("cannot resolve endpoint host `{host}`: {e}")))?
    {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(MigrateError::Target(format!(
            "endpoint host `{host}` resolves to no address"
        )));
    }
    Ok(addrs)
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn addrs(t: &[Endpoint]) -> Vec<String> {
        t.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn several_urls_repeated_or_separated_by_commas_are_one_target() {
        let urls = |u: &[&str]| rt().block_on(resolve_all(&u.iter().map(|s| s.to_string()).collect::<Vec<_>>()));
        let (endpoints, names) = urls(&["quic://10.0.0.2:4433,quic://10.0.0.1", "10.0.0.3:9"]).unwrap();
        assert_eq!(addrs(&endpoints), ["10.0.0.2:4433", "10.0.0.1:4433", "10.0.0.3:9"]);
        assert_eq!(names, ["10.0.0.2:4433", "10.0.0.1:4433", "10.0.0.3:9"]);
        assert_eq!(endpoints[0].server_name, "10.0.0.2");
        // The old single form, and an address named twice counting once.
        let (one, _) = urls(&["quic://[::1]:7"]).unwrap();
        assert_eq!(addrs(&one), ["[::1]:7"]);
        let (twice, _) = urls(&["10.0.0.1", " quic://10.0.0.1:4433 ", ""]).unwrap();
        assert_eq!(addrs(&twice), ["10.0.0.1:4433"]);
        // A bad URL among good ones is named; none at all says how to give one.
        let bad = urls(&["10.0.0.1", "https://10.0.0.2"]).unwrap_err().to_string();
        assert!(bad.contains("https://10.0.0.2") && bad.contains("quic://"), "{bad}");
        let none = urls(&[",", ""]).unwrap_err().to_string();
        assert!(none.contains("--url"), "{none}");
    }

    #[test]
    fn a_name_that_resolves_to_several_addresses_is_several_endpoints() {
        let (endpoints, names) = rt().block_on(resolve_all(&["quic://localhost:4433".into()])).unwrap();
        assert_eq!(names, ["localhost:4433"]);
        let expected = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 4433))
            .unwrap()
            .fold(Vec::<String>::new(), |mut v, a| {
                if !v.contains(&a.to_string()) {
                    v.push(a.to_string());
                }
                v
            });
        assert_eq!(addrs(&endpoints), expected);
        assert!(endpoints.iter().all(|e| e.server_name == "localhost"));
    }

    fn target(endpoints: &[&str], names: &[&str]) -> Target {
        let pki = certs::Ca::generate("test CA").unwrap();
        let edge = pki.issue_edge("edge", certs::Validity::days(1)).unwrap();
        Target {
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint::new(a.parse().unwrap(), "localhost"))
                .collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
            user: String::new(),
            password: String::new(),
            trust: ServerTrust::Ca(vec![pki.cert_der()]),
            identity: Identity {
                chain: vec![edge.cert_der()],
                key: edge.key_der(),
            },
        }
    }

    #[test]
    fn records_are_keyed_by_the_target_as_a_whole_and_found_under_one_address() {
        // One address: its own key, as agents always filed it.
        assert_eq!(
            target(&["127.0.0.1:4433"], &["localhost:4433"]).record_keys(),
            ["127.0.0.1:4433", "localhost:4433"]
        );
        assert_eq!(target(&["127.0.0.1:4433"], &[]).record_keys(), ["127.0.0.1:4433"]);
        // Several: the URLs sorted (any order names the same target), then each address.
        let ab = target(
            &["10.0.0.2:4433", "10.0.0.1:4433"],
            &["b.example:4433", "a.example:4433"],
        );
        let ba = target(
            &["10.0.0.1:4433", "10.0.0.2:4433"],
            &["a.example:4433", "b.example:4433"],
        );
        assert_eq!(ab.record_keys()[0], "a.example:4433,b.example:4433");
        assert_eq!(ab.record_keys()[0], ba.record_keys()[0]);
        assert_eq!(ab.record_keys()[1..], ["10.0.0.2:4433", "10.0.0.1:4433"]);
        // Built from addresses alone: the sorted addresses.
        assert_eq!(
            target(&["10.0.0.2:1", "10.0.0.1:1"], &[]).record_keys(),
            ["10.0.0.1:1,10.0.0.2:1", "10.0.0.2:1", "10.0.0.1:1"]
        );
    }

    #[test]
    fn no_endpoint_answering_names_each_in_the_order_tried() {
        let silent: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let a = silent[0].local_addr().unwrap().to_string();
        let b = silent[1].local_addr().unwrap().to_string();
        let t = target(&[&a, &b], &[]);
        let tuning = TransportTuning {
            idle_timeout: Duration::from_secs(1),
            ..TransportTuning::default()
        };
        let started = std::time::Instant::now();
        let e = rt().block_on(t.connect_from(1, &tuning)).unwrap_err();
        // Tried side by side, not one handshake timeout after the other.
        assert!(
            started.elapsed() < Duration::from_millis(1900),
            "{:?}",
            started.elapsed()
        );
        let text = e.to_string();
        assert!(
            text.starts_with("none of the 2 endpoint addresses could be reached"),
            "{text}"
        );
        assert!(text.find(&b).unwrap() < text.find(&a).unwrap(), "{text}");
        // One address: its own error, as before.
        let one = target(&[&a], &[]);
        let e = rt().block_on(one.connect(&tuning)).unwrap_err();
        assert!(matches!(e, TransportError::NoAnswer { .. }), "{e}");
    }
}
