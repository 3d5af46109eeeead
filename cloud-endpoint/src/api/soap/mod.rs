//! The vim25 SOAP API at `/sdk`, the API pyvmomi, govmomi and PowerCLI speak: enough of
//! it for the everyday scripts (docs/soap.md lists the calls).
//!
//! ```text
//! xml        bounded request parsing (size, nodes, depth), the response envelope
//! value      vim25 values and their xsi:types
//! fault      vim25 faults (InvalidLogin, NotAuthenticated, NotSupported, ...)
//! model      the managed objects over one snapshot of the inventory, their properties
//! vm         a VirtualMachine's config, runtime and summary, devices included
//! host       a HostSystem's runtime, summary and hardware, and its uuid
//! schema     vim25's fields a property path steps through (generated from pyvmomi)
//! collector  the PropertyCollector's selection (traversal specs) and property paths
//! tasks      Tasks: the power operations' and the migrations'; the TaskManager's lists
//! calls      the methods: service content, sessions, property collector, views, search,
//!            power
//! ```
//!
//! A SOAP session is apart from the REST sessions (its own store, its own cookie,
//! `vmware_soap_session`) but logs in through the same users and the same login
//! throttle.

mod calls;
mod collector;
mod fault;
mod host;
mod model;
mod schema;
mod tasks;
mod value;
mod vm;
mod xml;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::session::SessionStore;
use super::ApiState;
use crate::config::ApiSettings;
pub use fault::Fault;

/// The cookie a SOAP session travels in, as vCenter names it.
pub const COOKIE: &str = "vmware_soap_session";

/// The vim25 version announced, and the earlier ones clients may ask for: pyvmomi picks
/// the newest it knows from this list.
pub const API_VERSION: &str = "8.0.3.0";
const PRIOR_VERSIONS: &[&str] = &[
    "8.0.2.0", "8.0.1.0", "8.0.0.2", "8.0.0.1", "8.0.0.0", "7.0.3.0", "7.0.2.0", "7.0.1.0", "7.0.0.0", "6.7.3",
    "6.7.2", "6.7.1", "6.7", "6.5", "6.0", "5.5", "5.1", "5.0",
];

/// What one session holds besides its login: views, filters, paged retrievals.
#[derive(Debug, Default)]
struct SessionObjects {
    /// `UserSession.key`: not the cookie, which must not be shown back.
    key: String,
    source: Option<IpAddr>,
    views: HashMap<String, model::View>,
    filters: HashMap<String, calls::Filter>,
    retrievals: HashMap<String, calls::Retrieval>,
    /// The last version `WaitForUpdates` answered.
    update_version: u64,
}

/// The SOAP side's state, shared by every request.
#[derive(Debug)]
pub struct SoapState {
    sessions: SessionStore,
    objects: Mutex<HashMap<String, SessionObjects>>,
    tasks: tasks::TaskTable,
    counter: AtomicU64,
    instance_uuid: String,
}

impl SoapState {
    pub fn new(settings: &ApiSettings) -> SoapState {
        use rand::TryRngCore as _;
        let mut b = [0u8; 16];
        // Without the OS generator the uuid is still unique enough for one endpoint.
        let _ = rand::rngs::OsRng.try_fill_bytes(&mut b);
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        SoapState {
            sessions: SessionStore::new(settings),
            objects: Mutex::new(HashMap::new()),
            tasks: tasks::TaskTable::default(),
            counter: AtomicU64::new(0),
            instance_uuid: format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            ),
        }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionObjects>> {
        // Each statement leaves the map whole: a panic elsewhere cannot tear it.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The method name a request called, for the access log: a vim25 identifier or `-`.
#[derive(Debug, Clone)]
pub(crate) struct SoapMethod(pub String);

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/sdk", post(invoke))
        .route("/sdk/vimServiceVersions.xml", get(versions))
}

/// `GET /sdk/vimServiceVersions.xml`: how pyvmomi's SmartConnect picks its version.
async fn versions() -> Response {
    let mut body = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n<namespaces version=\"1.0\">\n <namespace>\n  <name>urn:vim25</name>\n");
    body.push_str(&format!("  <version>{API_VERSION}</version>\n  <priorVersions>\n"));
    for v in PRIOR_VERSIONS {
        body.push_str(&format!("   <version>{v}</version>\n"));
    }
    body.push_str("  </priorVersions>\n </namespace>\n</namespaces>\n");
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// The session cookie's value from a `Cookie` header (pyvmomi sends back the whole
/// `Set-Cookie` line, attributes and quotes included).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|part| part.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .find(|v| !v.is_empty())
}

/// What a call answers: the response body's inner XML (`returnval`, or nothing) and, for
/// a login, the new session's cookie.
pub(crate) struct Reply {
    body: String,
    cookie: Option<String>,
    user: Option<String>,
}

async fn invoke(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (method, result) = match axum::body::to_bytes(body, xml::MAX_BODY_BYTES).await {
        Err(_) => (
            "-".to_owned(),
            Err(Fault::invalid_request(format!(
                "the request body is larger than the {} bytes a SOAP call may hold, or was cut off",
                xml::MAX_BODY_BYTES
            ))),
        ),
        Ok(bytes) => match xml::parse_call(&bytes) {
            Err(fault) => ("-".to_owned(), Err(fault)),
            Ok(call) => {
                let method = call.method.clone();
                (
                    method,
                    calls::dispatch(&state, peer.ip(), session_cookie(&headers), call).await,
                )
            }
        },
    };
    let label =
        if !method.is_empty() && method.len() <= 64 && method.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            method.clone()
        } else {
            "-".to_owned()
        };
    let mut response = match result {
        Ok(reply) => {
            let mut text = String::from(xml::ENVELOPE_START);
            text.push_str(&format!("<{label}Response xmlns=\"urn:vim25\">"));
            text.push_str(&reply.body);
            text.push_str(&format!("</{label}Response>\n"));
            text.push_str(xml::ENVELOPE_END);
            let mut response = (StatusCode::OK, text).into_response();
            if let Some(cookie) = reply.cookie {
                let value = format!("{COOKIE}=\"{cookie}\"; Path=/; HttpOnly; Secure;");
                if let Ok(v) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(header::SET_COOKIE, v);
                }
            }
            if let Some(user) = reply.user {
                response.extensions_mut().insert(super::access::AccessUser(user));
            }
            response
        }
        Err(fault) => (StatusCode::INTERNAL_SERVER_ERROR, fault.to_xml()).into_response(),
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    response.extensions_mut().insert(SoapMethod(label));
    response
}

/// Entry point of the fuzz target of the SOAP request parser
/// (`fuzz/fuzz_targets/soap_request.rs`): parses a body and reads every filter spec in
/// it as `RetrievePropertiesEx` would. Must never panic.
pub fn fuzz_request(data: &[u8]) {
    if let Ok(call) = xml::parse_call(data) {
        for spec in call.body.all("specSet") {
            let _ = collector::parse_filter_spec(spec);
        }
        let _ = call.body.child("spec").map(collector::parse_filter_spec);
    }
}

#[cfg(test)]
mod tests;
