//! The older REST API at `/rest` (vSphere 6.5 to 7.0 U1, still served by vCenter 8), which
//! Ansible's `vmware_rest` modules and many older scripts speak.
//!
//! It is the `/api` API under other names and in another envelope, so each call is
//! translated and handed to the `/api` router, whose answer is rewrapped:
//! - paths: `/rest/com/vmware/cis/session` is `/api/session`, `POST
//!   /rest/vcenter/vm/{vm}/power/start` is `POST /api/vcenter/vm/{vm}/power?action=start`,
//!   and `/rest/vcenter/...`, `/rest/appliance/...`, `/rest/cis/tasks/...` are the same
//!   under `/api`; filters keep their older spelling (`filter.names=a`), which `/api`
//!   takes too;
//! - answers: every result inside `{"value": ...}` with 200 (a login too), an operation
//!   without result as 200 and an empty body; maps as lists of `{"key","value"}` pairs;
//! - errors: `{"type": "com.vmware.vapi.std.errors.not_found", "value": {"messages": [...]}}`
//!   with the same HTTP status as in `/api`.
//!
//! Sessions are the `/api` ones (same header, `vmware-api-session-id`). The login also
//! sets the session as a cookie, as vCenter does, for scripts that keep cookies instead of
//! sending the header; the cookie is `Secure`, `HttpOnly` and `SameSite=Strict` and
//! counts only under `/rest`, so no other site can make a browser use it.

use std::net::SocketAddr;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Extensions, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tower::ServiceExt as _;

use super::error::ApiError;
use super::rest::SESSION_HEADER;
use super::session::Now;
use super::ApiState;

/// The largest `/api` answer rewrapped (a list of 4,000 VMs is well under 1 MiB).
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// The fields of a VM's info that are maps (device key to device).
const VM_INFO_MAPS: &[&str] = &[
    "disks",
    "nics",
    "cdroms",
    "floppies",
    "parallel_ports",
    "serial_ports",
    "sata_adapters",
    "scsi_adapters",
    "nvme_adapters",
];

#[derive(Clone)]
struct Legacy {
    state: ApiState,
    api: Router,
}

/// The `/rest` routes, handing translated calls to `api` (the `/api` router).
pub fn router(state: ApiState, api: Router) -> Router {
    Router::new()
        .route("/rest", any(handle))
        .route("/rest/{*path}", any(handle))
        .with_state(Legacy { state, api })
}

/// What an `/api` answer becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `{"value": ...}`.
    Value,
    /// `{"value": ...}` with the VM info's maps as key/value lists.
    VmInfo,
    /// `{"value": token}` and the session cookie.
    Login,
    /// 200 and the cookie cleared.
    Logout,
}

/// An `/api` call: method, path and query, and what its answer becomes.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    method: Method,
    path_and_query: String,
    answer: Answer,
}

/// The `/api` call of a `/rest` one, `path` without `/rest/`; `None` for a call `/rest`
/// does not answer.
fn translate(method: &Method, path: &str, query: Option<&str>) -> Option<Call> {
    let call = |method: Method, path: String, answer| {
        Some(Call {
            method,
            path_and_query: path,
            answer,
        })
    };
    let with_query = |path: String| match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path,
    };
    if path == "com/vmware/cis/session" {
        // The older API also reads the session with `POST ...?~action=get`.
        let action = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "~action")
            .map(|(_, v)| v.into_owned());
        return match (method, action.as_deref()) {
            (&Method::POST, None) => call(Method::POST, "/api/session".into(), Answer::Login),
            (&Method::POST, Some("get")) | (&Method::GET, None) => {
                call(Method::GET, "/api/session".into(), Answer::Value)
            }
            (&Method::DELETE, None) => call(Method::DELETE, "/api/session".into(), Answer::Logout),
            _ => None,
        };
    }
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["vcenter", "vm", vm, "power", action @ ("start" | "stop" | "reset" | "suspend")] => {
            if *method != Method::POST {
                return None;
            }
            call(
                Method::POST,
                format!("/api/vcenter/vm/{vm}/power?action={action}"),
                Answer::Value,
            )
        }
        ["vcenter", "vm", vm] if !vm.is_empty() => call(
            method.clone(),
            with_query(format!("/api/vcenter/vm/{vm}")),
            Answer::VmInfo,
        ),
        ["vcenter" | "appliance", ..] | ["cis", "tasks", ..] => {
            call(method.clone(), with_query(format!("/api/{path}")), Answer::Value)
        }
        _ => None,
    }
}

/// The session token of a request: the header, else the cookie.
fn session_token(request: &Request) -> Option<String> {
    let header = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if let Some(token) = header {
        return Some(token.to_owned());
    }
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_HEADER)
        .map(|(_, token)| token.trim_matches('"').to_owned())
        .filter(|t| !t.is_empty())
}

async fn handle(State(legacy): State<Legacy>, request: Request) -> Response {
    let path = request.uri().path().strip_prefix("/rest").unwrap_or_default();
    let path = path.strip_prefix('/').unwrap_or(path).to_owned();
    let query = request.uri().query().map(str::to_owned);
    let call = translate(request.method(), &path, query.as_deref());
    let token = session_token(&request);
    // Nothing answers without a session but the login, not even a 404: the API's shape
    // stays hidden from anonymous clients, as under /api.
    if call.as_ref().is_none_or(|c| c.answer != Answer::Login) {
        let live = token
            .as_deref()
            .is_some_and(|t| legacy.state.sessions.touch(t, Now::current()).is_some());
        if !live {
            let message = if token.is_none() {
                format!(
                    "this request needs a session: log in with POST /rest/com/vmware/cis/session and send \
                     its value in the {SESSION_HEADER} header"
                )
            } else {
                "the session is unknown, ended or expired; log in again with POST /rest/com/vmware/cis/session"
                    .to_owned()
            };
            return older_error(ApiError::unauthenticated(message).into_response()).await;
        }
    }
    let Some(call) = call else {
        let e = ApiError::not_found(format!(
            "no resource at {} /rest/{path} (the /rest API here answers the cis session, \
             /rest/vcenter/..., /rest/appliance/system/version and /rest/cis/tasks)",
            request.method()
        ));
        return older_error(e.into_response()).await;
    };
    let (mut parts, body) = request.into_parts();
    parts.method = call.method;
    parts.uri = match Uri::try_from(call.path_and_query.as_str()) {
        Ok(uri) => uri,
        Err(_) => {
            let e = ApiError::invalid_argument(format!("/rest/{path} is not a path this API can read"));
            return older_error(e.into_response()).await;
        }
    };
    // The request goes on with the client's address only: the extensions of this
    // router's match (the `/rest/{*path}` parameter) would add to the path parameters
    // the /api routes extract.
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned();
    parts.extensions = Extensions::new();
    if let Some(peer) = peer {
        parts.extensions.insert(peer);
    }
    // A session from the cookie goes on as the header /api reads.
    if let Some(value) = token.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        parts.headers.insert(SESSION_HEADER, value);
    }
    let response = match legacy.api.oneshot(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if !response.status().is_success() {
        return older_error(response).await;
    }
    older_value(response, call.answer).await
}

/// The body of an `/api` answer as JSON; `Ok(None)` when empty.
async fn json_body(body: Body) -> Result<Option<Value>, ApiError> {
    let bytes = to_bytes(body, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| ApiError::internal("an answer could not be read", &e))?;
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::internal("an answer was not JSON", &e))
}

/// A successful `/api` answer in the older envelope.
async fn older_value(response: Response, answer: Answer) -> Response {
    let value = match json_body(response.into_body()).await {
        Ok(value) => value,
        Err(e) => return older_error(e.into_response()).await,
    };
    let Some(mut value) = value else {
        let mut out = StatusCode::OK.into_response();
        if answer == Answer::Logout {
            out.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "vmware-api-session-id=; Path=/rest; Max-Age=0; Secure; HttpOnly; SameSite=Strict",
                ),
            );
        }
        return out;
    };
    if answer == Answer::VmInfo {
        maps_as_pairs(&mut value, VM_INFO_MAPS);
    }
    let cookie = match (&answer, &value) {
        (Answer::Login, Value::String(token)) => HeaderValue::from_str(&format!(
            "{SESSION_HEADER}={token}; Path=/rest; Secure; HttpOnly; SameSite=Strict"
        ))
        .ok(),
        _ => None,
    };
    let mut out = (StatusCode::OK, Json(json!({ "value": value }))).into_response();
    if let Some(cookie) = cookie {
        out.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    out
}

/// The older API's map encoding: `{"2000": {...}}` becomes `[{"key": "2000", "value": {...}}]`.
fn maps_as_pairs(value: &mut Value, fields: &[&str]) {
    let Some(object) = value.as_object_mut() else { return };
    for field in fields {
        if let Some(Value::Object(map)) = object.get_mut(*field) {
            let pairs = std::mem::take(map)
                .into_iter()
                .map(|(key, value)| json!({"key": key, "value": value}))
                .collect();
            object.insert((*field).to_owned(), Value::Array(pairs));
        }
    }
}

/// An `/api` error answer (`{"error_type","messages"}`) in the older shape, with its
/// status and `Retry-After`.
async fn older_error(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let body = match json_body(body).await {
        Ok(Some(Value::Object(body))) => body,
        // Not an /api error body: nothing to rewrap.
        _ => Map::new(),
    };
    let kind = body
        .get("error_type")
        .and_then(Value::as_str)
        .unwrap_or("ERROR")
        .to_ascii_lowercase();
    let id = format!("com.vmware.vapi.std.errors.{kind}");
    // An answer of /api's that is no error body (none is expected) still says something.
    let messages = body.get("messages").cloned().unwrap_or_else(|| {
        let reason = parts.status.canonical_reason().unwrap_or("the request failed");
        json!([{"id": id, "default_message": reason, "args": []}])
    });
    let shaped = json!({
        "type": id,
        "value": {"messages": messages},
    });
    let mut out = (parts.status, Json(shaped)).into_response();
    if let Some(after) = parts.headers.get(header::RETRY_AFTER) {
        out.headers_mut().insert(header::RETRY_AFTER, after.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(method: Method, path: &str, query: Option<&str>) -> Option<(Method, String, Answer)> {
        translate(&method, path, query).map(|c| (c.method, c.path_and_query, c.answer))
    }

    #[test]
    fn calls_map_to_their_api_twins() {
        use Answer::*;
        let session = "com/vmware/cis/session";
        assert_eq!(
            to(Method::POST, session, None),
            Some((Method::POST, "/api/session".into(), Login))
        );
        assert_eq!(
            to(Method::POST, session, Some("~action=get")),
            Some((Method::GET, "/api/session".into(), Value))
        );
        assert_eq!(
            to(Method::GET, session, None),
            Some((Method::GET, "/api/session".into(), Value))
        );
        assert_eq!(
            to(Method::DELETE, session, None),
            Some((Method::DELETE, "/api/session".into(), Logout))
        );
        assert_eq!(to(Method::PUT, session, None), None);
        assert_eq!(
            to(
                Method::GET,
                "vcenter/vm",
                Some("filter.names.1=web01&filter.power_states=POWERED_ON")
            ),
            Some((
                Method::GET,
                "/api/vcenter/vm?filter.names.1=web01&filter.power_states=POWERED_ON".into(),
                Value
            ))
        );
        assert_eq!(
            to(Method::GET, "vcenter/vm/vm-14", None),
            Some((Method::GET, "/api/vcenter/vm/vm-14".into(), VmInfo))
        );
        assert_eq!(
            to(Method::POST, "vcenter/vm/vm-14/power/start", None),
            Some((Method::POST, "/api/vcenter/vm/vm-14/power?action=start".into(), Value))
        );
        assert_eq!(to(Method::GET, "vcenter/vm/vm-14/power/start", None), None);
        assert_eq!(
            to(Method::GET, "vcenter/vm/vm-14/hardware/disk/2000", None),
            Some((Method::GET, "/api/vcenter/vm/vm-14/hardware/disk/2000".into(), Value))
        );
        assert_eq!(
            to(Method::GET, "appliance/system/version", None),
            Some((Method::GET, "/api/appliance/system/version".into(), Value))
        );
        // The gateway's own resources are /api only.
        assert_eq!(to(Method::GET, "gateway/migrations", None), None);
        assert_eq!(to(Method::GET, "", None), None);
    }

    #[test]
    fn maps_become_key_value_lists() {
        let mut info = json!({"name": "web01", "disks": {"2000": {"capacity": 1}, "2001": {"capacity": 2}},
                              "nics": {}, "cpu": {"count": 2}});
        maps_as_pairs(&mut info, VM_INFO_MAPS);
        assert_eq!(
            info,
            json!({"name": "web01",
                   "disks": [{"key": "2000", "value": {"capacity": 1}}, {"key": "2001", "value": {"capacity": 2}}],
                   "nics": [], "cpu": {"count": 2}})
        );
    }

    #[tokio::test]
    async fn errors_take_the_older_shape() {
        let e = ApiError::not_found("VM vm-99 is not in the inventory").into_response();
        let out = older_error(e).await;
        assert_eq!(out.status(), StatusCode::NOT_FOUND);
        let body = json_body(out.into_body()).await.unwrap().unwrap();
        assert_eq!(
            body,
            json!({"type": "com.vmware.vapi.std.errors.not_found",
                   "value": {"messages": [{"id": "com.vmware.vapi.std.errors.not_found",
                                           "default_message": "VM vm-99 is not in the inventory",
                                           "args": []}]}})
        );
        let busy = ApiError::busy("full", std::time::Duration::from_secs(60)).into_response();
        let out = older_error(busy).await;
        assert_eq!(out.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(out.headers()[header::RETRY_AFTER], "60");
    }

    #[test]
    fn the_header_wins_over_the_cookie() {
        let request = |headers: &[(&str, &str)]| {
            let mut r = Request::new(Body::empty());
            for (k, v) in headers {
                r.headers_mut().append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            r
        };
        let both = request(&[(SESSION_HEADER, "aa"), ("cookie", "vmware-api-session-id=bb")]);
        assert_eq!(session_token(&both).as_deref(), Some("aa"));
        let cookie = request(&[("cookie", "x=1; vmware-api-session-id=\"bb\"; y=2")]);
        assert_eq!(session_token(&cookie).as_deref(), Some("bb"));
        assert_eq!(session_token(&request(&[("cookie", "x=1")])), None);
    }
}
