//! The other endpoints of a scale-out domain. Each endpoint is one host of the cluster
//! and runs the VMs placed on it (their QEMU, their pid files and QMP sockets, their
//! consoles); any endpoint serves the whole domain's API. A power operation or console
//! asked of an endpoint for a VM on another host is forwarded to that host's endpoint,
//! which answers as if asked itself (docs/scale-out.md says why forward, not redirect).
//!
//! Each endpoint records at start, in its host's row of the shared inventory, the URL
//! its API answers at, its certificate's thumbprint and a fresh random token. A caller
//! pins the thumbprint (no CA to configure, as vSphere's `sslThumbprint`) and presents
//! the token; the callee admits a request only with its current token and its own host
//! name, so a misconfigured URL pointing at the wrong endpoint is refused, not followed.
//! Anyone who can read the database could call with the token; such a reader can also
//! rewrite the inventory, so the token grants nothing more.
//!
//! The callee serves a forwarded request on its own host only: it never forwards
//! again, so a request crosses at most one hop.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, Method, Request, StatusCode};
use bytes::Bytes;
use certs::Thumbprint;
use http_body_util::BodyExt as _;

use super::HostError;
use crate::inventory::store::Dialect;
use crate::inventory::{HostApi, Inventory, InventoryError, VmHost};
use crate::Domain;

/// The path prefix of the routes peers call (`api::rest::peer`).
pub const PEER_PATH: &str = "/api/gateway/peer/";
/// The host a forwarded request is for: the callee checks it is its own.
pub const HOST_HEADER: &str = "x-gateway-peer-host";
/// The host that forwarded it, and on whose behalf (a user, a migration), for the log.
pub const FROM_HEADER: &str = "x-gateway-peer-from";
pub const FOR_HEADER: &str = "x-gateway-peer-for";

/// A peer that does not answer within this is reported unreachable. Under the API's
/// own request limit (30 s), so the client hears why, not a bare timeout; above a power
/// off's 10 s grace before QEMU is killed.
const CALL_TIMEOUT: Duration = Duration::from_secs(25);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from a peer: a console of at most 1 MiB, or an error.
const MAX_ANSWER_BYTES: usize = (1 << 20) + (64 << 10);

/// What a forwarded power operation asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOp {
    On,
    Off,
    Reset,
}

impl PowerOp {
    /// The REST action (`?action=`) of the operation.
    pub fn action(self) -> &'static str {
        match self {
            PowerOp::On => "start",
            PowerOp::Off => "stop",
            PowerOp::Reset => "reset",
        }
    }
}

/// This endpoint among the domain's hosts.
#[derive(Clone)]
pub struct ThisHost {
    /// `domain.host.name`.
    pub name: String,
    /// Its host's id (`host-N`); `None` for a single endpoint whose stored host has
    /// another name (it runs every host's VMs anyway).
    pub id: Option<String>,
    /// Whether other endpoints share the inventory (PostgreSQL). Only then does a VM on
    /// another host belong to another endpoint: a single endpoint (SQLite) runs the VMs
    /// of every host its domain lists.
    pub shared: bool,
    /// The API certificate's thumbprint, recorded for the peers to pin.
    pub thumbprint: Option<Thumbprint>,
    token: String,
}

// The token stays out of logs.
impl std::fmt::Debug for ThisHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThisHost")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Default for ThisHost {
    /// A single endpoint that runs every VM of its domain.
    fn default() -> Self {
        ThisHost::new(String::new(), None, false, None)
    }
}

impl ThisHost {
    /// Host `name` (`id`), sharing its inventory with other endpoints or not, with a new
    /// random token.
    pub fn new(name: String, id: Option<String>, shared: bool, thumbprint: Option<Thumbprint>) -> ThisHost {
        use base64::Engine as _;
        use rand::TryRngCore as _;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .expect("the operating system's random source");
        ThisHost {
            name,
            id,
            shared,
            thumbprint,
            token: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// Whether this endpoint runs the VMs of host `host_id`.
    pub fn runs(&self, host_id: &str) -> bool {
        !self.shared || self.id.as_deref() == Some(host_id)
    }

    /// What this endpoint records of itself for its peers, answering at `url`.
    pub fn record(&self, url: Option<String>) -> Option<HostApi> {
        Some(HostApi {
            url,
            thumbprint: self.thumbprint?.to_string(),
            token: self.token.clone(),
        })
    }

    /// Whether `token` is this endpoint's current peer token. Compares digests so that
    /// the time taken tells nothing about how much of a guess was right.
    pub fn admits(&self, token: &str) -> bool {
        let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
        let (a, b) = (digest(token), digest(&self.token));
        a.as_ref().iter().zip(b.as_ref()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// This endpoint as host `name` of the domain in `inventory`, its API certificate of
/// thumbprint `thumbprint`.
pub fn this_host(inventory: &Inventory, name: &str, thumbprint: Thumbprint) -> Result<ThisHost, InventoryError> {
    let shared = inventory.dialect() == Dialect::Postgres;
    let id = inventory
        .domain()?
        .hosts
        .into_iter()
        .find(|h| h.name == name)
        .map(|h| h.id);
    Ok(ThisHost::new(name.to_owned(), id, shared, Some(thumbprint)))
}

/// Records in the inventory where this endpoint's API answers the other endpoints
/// (`url`, none if it has no address they can dial), with its thumbprint and token.
/// Before the endpoint serves: a peer holding the previous run's token is refused.
pub async fn announce(domain: &Arc<Domain>, url: Option<String>) -> Result<(), HostError> {
    let this = domain.hosts.this();
    let Some(api) = this.record(url.clone()) else {
        return Ok(());
    };
    if this.shared && url.is_none() {
        tracing::warn!(
            host = %this.name,
            "the other endpoints cannot reach this one's API (it is off, or listens on 0.0.0.0 or [::]): power \
             operations and consoles of this host's VMs asked of them fail; set domain.host.api_url"
        );
    }
    let (d, name) = (domain.clone(), this.name.clone());
    let recorded = tokio::task::spawn_blocking(move || d.inventory.record_host_api(&name, &api))
        .await
        .map_err(|e| HostError::Worker(e.to_string()))??;
    if this.shared {
        tracing::info!(host = %this.name, url = ?url, recorded, "recorded where the other endpoints reach this host");
    }
    Ok(())
}

/// Where a VM's power operations and console are served.
#[derive(Debug)]
pub enum Route {
    /// This endpoint runs the VM.
    Here,
    /// The endpoint of the VM's host does.
    Peer(Peer),
}

/// Decides who serves VM `vm_id`, placed on `host`: this endpoint if it runs that host's
/// VMs, else the endpoint that recorded itself for the host. An error names the host
/// and what its operator must do when no endpoint can be called.
pub fn route(this: &ThisHost, vm_id: &str, host: &VmHost) -> Result<Route, HostError> {
    if this.runs(&host.id) {
        return Ok(Route::Here);
    }
    let no_peer = |reason: &'static str| HostError::NoPeer {
        vm: vm_id.to_owned(),
        host: host.name.clone(),
        reason,
    };
    let api = host.api.as_ref().ok_or_else(|| no_peer(NEVER_STARTED))?;
    let url = api.url.clone().ok_or_else(|| no_peer(NO_ADDRESS))?;
    let thumbprint = api.thumbprint.parse().map_err(|_| no_peer(BAD_THUMBPRINT))?;
    Ok(Route::Peer(Peer {
        host: host.name.clone(),
        url,
        thumbprint,
        token: api.token.clone(),
    }))
}

const NEVER_STARTED: &str = "no endpoint of that host has started on this database with this version: start the \
     cloud endpoint whose `domain.host.name` is that host";
const NO_ADDRESS: &str = "its endpoint recorded no address the other endpoints can reach (its API is off, or \
     listens on 0.0.0.0 or [::]): set `domain.host.api_url` (CLOUD_ENDPOINT_DOMAIN__HOST__API_URL) in that endpoint's \
     configuration and restart it";
const BAD_THUMBPRINT: &str = "its endpoint recorded a certificate thumbprint that is not one: restart that endpoint";

/// The endpoint of another host, as it recorded itself.
pub struct Peer {
    /// The host's name.
    pub host: String,
    /// Its API's URL, `https://name:port`.
    pub url: String,
    thumbprint: Thumbprint,
    token: String,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("host", &self.host)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Has the peer power VM `vm_id` on, off or reset; returns once it is done.
    pub async fn power(&self, vm_id: &str, op: PowerOp, from: &ThisHost, on_behalf: &str) -> Result<(), HostError> {
        let path = format!("{PEER_PATH}vms/{}/power?action={}", segment(vm_id), op.action());
        self.call(Method::POST, &path, from, on_behalf).await.map(drop)
    }

    /// The last `bytes` of VM `vm_id`'s console, as the peer reads it.
    pub async fn console(
        &self,
        vm_id: &str,
        bytes: u64,
        from: &ThisHost,
        on_behalf: &str,
    ) -> Result<Vec<u8>, HostError> {
        let path = format!("{PEER_PATH}vms/{}/console?bytes={bytes}", segment(vm_id));
        Ok(self.call(Method::GET, &path, from, on_behalf).await?.to_vec())
    }

    async fn call(&self, method: Method, path: &str, from: &ThisHost, on_behalf: &str) -> Result<Bytes, HostError> {
        let unreachable = |reason: String| HostError::PeerUnreachable {
            host: self.host.clone(),
            url: self.url.clone(),
            reason,
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, from, on_behalf))
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))?
            .map_err(unreachable)?;
        if status.is_success() {
            return Ok(body);
        }
        // The peer's own error, as the REST API renders one: passed on as it said it.
        match serde_json::from_slice::<RestError>(&body) {
            Ok(e) => Err(HostError::Peer {
                host: self.host.clone(),
                error_type: e.error_type,
                message: e
                    .messages
                    .into_iter()
                    .next()
                    .map(|m| m.default_message)
                    .unwrap_or_default(),
            }),
            Err(_) => Err(unreachable(format!("it answered HTTP {status}, not the API's error"))),
        }
    }

    /// One request on a connection of its own: these calls are rare (a power operation,
    /// a console read), so no pool to keep healthy.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        from: &ThisHost,
        on_behalf: &str,
    ) -> Result<(StatusCode, Bytes), String> {
        let uri: axum::http::Uri = self.url.parse().map_err(|e| format!("its URL is not one: {e}"))?;
        let authority = uri.authority().ok_or("its URL names no host")?.clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = gateway::transport::pinned_https_client(self.thumbprint).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| format!("its host is not a name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(HOST_HEADER, &self.host)
            .header(FROM_HEADER, &from.name)
            .header(FOR_HEADER, header_text(on_behalf))
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading its answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// A VM id as one path segment.
fn segment(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

/// A header value from free text (a user name): visible ASCII only.
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect()
}

#[derive(serde::Deserialize)]
struct RestError {
    error_type: String,
    #[serde(default)]
    messages: Vec<RestMessage>,
}

#[derive(serde::Deserialize)]
struct RestMessage {
    default_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(name: &str, id: &str) -> ThisHost {
        ThisHost::new(name.into(), Some(id.into()), true, Some(Thumbprint::from([7; 32])))
    }

    fn host(id: &str, name: &str, api: Option<HostApi>) -> VmHost {
        VmHost {
            id: id.into(),
            name: name.into(),
            api,
        }
    }

    fn recorded(url: Option<&str>) -> Option<HostApi> {
        Some(HostApi {
            url: url.map(Into::into),
            thumbprint: Thumbprint::from([9; 32]).to_string(),
            token: "t0ken".into(),
        })
    }

    #[test]
    fn a_vm_is_served_by_its_hosts_endpoint_and_a_single_endpoint_serves_every_host() {
        let b = shared("esx-b", "host-12");
        // Its own host's VM: here, whatever the others recorded.
        assert!(matches!(
            route(&b, "vm-1", &host("host-12", "esx-b", None)),
            Ok(Route::Here)
        ));
        // Another host's: that host's endpoint, at the URL and thumbprint it recorded.
        let Ok(Route::Peer(peer)) = route(
            &b,
            "vm-2",
            &host("host-9", "esx-a", recorded(Some("https://esx-a:8443"))),
        ) else {
            panic!("not forwarded")
        };
        assert_eq!((peer.host.as_str(), peer.url.as_str()), ("esx-a", "https://esx-a:8443"));
        assert_eq!(peer.thumbprint, Thumbprint::from([9; 32]));
        // A single endpoint (SQLite) runs the VMs of every host its domain lists.
        let alone = ThisHost::new("esx-b".into(), Some("host-12".into()), false, None);
        assert!(matches!(
            route(&alone, "vm-2", &host("host-9", "esx-a", None)),
            Ok(Route::Here)
        ));
        assert!(ThisHost::default().runs("host-9"));
    }

    #[test]
    fn a_host_without_a_reachable_endpoint_is_named_with_what_to_do() {
        let b = shared("esx-b", "host-12");
        for (api, expected) in [
            (None, "start the cloud endpoint whose `domain.host.name` is that host"),
            (recorded(None), "set `domain.host.api_url`"),
        ] {
            let e = route(&b, "vm-3", &host("host-9", "esx-c", api)).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("vm-3") && text.contains("esx-c") && text.contains(expected),
                "{text}"
            );
        }
        let mut bad = recorded(Some("https://esx-c:8443"));
        bad.as_mut().unwrap().thumbprint = "not a thumbprint".into();
        assert!(route(&b, "vm-3", &host("host-9", "esx-c", bad)).is_err());
    }

    #[test]
    fn only_the_current_token_is_admitted() {
        let a = shared("esx-a", "host-9");
        let recorded = a.record(Some("https://esx-a:8443".into())).unwrap();
        assert!(a.admits(&recorded.token));
        assert!(!a.admits("guess"));
        assert!(!a.admits(""));
        // A restart draws a new one.
        assert!(!shared("esx-a", "host-9").admits(&recorded.token));
        assert!(!format!("{a:?}{recorded:?}").contains(&recorded.token));
    }
}
