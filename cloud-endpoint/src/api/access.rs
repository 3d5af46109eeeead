//! One access log line per API request (target `access`, level info) and the request
//! metrics. The line says the method, the route template and the path (never the query
//! string), the status, the user when the request had a session or logged in, and the
//! time taken. Credentials never reach it: passwords, session tokens and Authorization
//! headers are not read here, and the user comes from the session, not from a header.
//! For the SOAP API (`/sdk`) the line names the vim25 method called (`call`), never its
//! arguments (a Login's password stays out).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::ApiState;

/// The user a request acted as, put on its response by the session check (or by the
/// login) for the access log.
#[derive(Debug, Clone)]
pub(crate) struct AccessUser(pub String);

/// The route label of requests no route matched: one value, however many paths a
/// scanner tries.
const UNMATCHED: &str = "unmatched";

pub(super) async fn log(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned());
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    let user = response.extensions_mut().remove::<AccessUser>().map(|u| u.0);
    let call = response
        .extensions_mut()
        .remove::<super::soap::SoapMethod>()
        .map(|m| m.0);
    state.domain.metrics.api_request(method, &route, status, started);
    // Peer-chosen text (path, user) with `?`: escaped, so it cannot forge a line.
    tracing::info!(
        target: "access",
        method,
        route = %route,
        path = ?path,
        status,
        user = ?user.as_deref().unwrap_or("-"),
        call = ?call.as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "API request"
    );
    response
}

/// The method as a label: the standard ones by name, anything else as OTHER, so a
/// client cannot grow the label's values.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}
