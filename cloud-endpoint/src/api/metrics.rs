//! `GET /metrics`: on the HTTPS API port for a client with a session or the configured
//! bearer token, and on the plain-HTTP metrics listener (`metrics.listen`) for anyone who
//! reaches it (config/metrics.rs says why both).

use std::future::Future;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::rest::SESSION_HEADER;
use super::session::Now;
use super::ApiState;

/// The scrape: the exposition text, rendered on the blocking pool (it reads the inventory).
async fn render(state: &ApiState) -> Response {
    let domain = state.domain.clone();
    let sessions = state.sessions.clone();
    match tokio::task::spawn_blocking(move || domain.metrics.render(&domain, Some(sessions.len()))).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => ApiError::internal("the metrics could not be gathered", &e).into_response(),
    }
}

/// `GET /metrics` on the API port: a live session (any role), or `Authorization: Bearer`
/// with the configured token.
pub(super) async fn authorized(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .and_then(|token| state.sessions.touch(token, Now::current()));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let token_ok = match (&state.metrics_token, bearer) {
        (Some(expected), Some(given)) => constant_time_eq(expected.as_bytes(), given.as_bytes()),
        _ => false,
    };
    if session.is_none() && !token_ok {
        return ApiError::unauthenticated(
            "reading the metrics needs a session (the vmware-api-session-id header) or the bearer token set as `metrics.bearer_token`",
        )
        .into_response();
    }
    let mut response = render(&state).await;
    if let Some(session) = session {
        response
            .extensions_mut()
            .insert(super::access::AccessUser(session.principal.user.clone()));
    }
    response
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `GET /metrics` over plain HTTP on `listener`, without credentials, until
/// `shutdown` completes. Anything else is 404.
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(state): State<ApiState>| async move { render(&state).await }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(metrics = %format!("http://{addr}/metrics"), "Prometheus metrics serving");
    }
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}
