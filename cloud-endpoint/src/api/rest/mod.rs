//! The REST protocol at `/api` (vSphere 7.0U2+): plain JSON, errors as HTTP statuses with
//! `{"error_type","messages"}` bodies, the session token in `vmware-api-session-id`.
//!
//! Every request but the login needs a live session, checked by [`require_session`] in
//! front of all routes and of the 404 fallback, so nothing about the API's shape leaks
//! to anonymous clients. vAPI JSON-RPC calls (`POST /api`) pass it: they carry the
//! session in their body, and `api::vapi` holds them to the same rule.

mod hardware;
mod peer;
mod query;
mod session;
mod vcenter;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::error::{ApiError, ErrorKind};
use super::session::Now;
use super::ApiState;
use crate::inventory::Principal;

/// The header that carries the session token.
pub const SESSION_HEADER: &str = "vmware-api-session-id";

/// A request body larger than this is refused (413) before a handler reads it.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request not answered within this time gets TIMED_OUT (503). Generous: a list goes
/// through SQLite and a login through argon2, each a few milliseconds when healthy.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The session a request arrived with; handlers take it as an extension.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub token: String,
    pub session: super::session::Session,
}

impl SessionContext {
    pub fn principal(&self) -> &Principal {
        &self.session.principal
    }
}

/// The API's router: `/api`, and the older `/rest` in front of it.
pub fn router(state: ApiState) -> Router {
    let api = api_router(state.clone());
    super::legacy_rest::router(state, api.clone()).fallback_service(api)
}

/// The `/api` router.
fn api_router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/api/session",
            get(session::get).post(session::create).delete(session::delete),
        )
        .merge(vcenter::routes())
        .merge(hardware::routes())
        .route("/api/cis/tasks/{task}", get(vcenter::get_task))
        .route("/api", post(super::vapi::invoke))
        .route("/api/gateway/migrations", get(vcenter::list_migrations))
        .route(
            "/api/gateway/migrations/{migration}",
            get(vcenter::get_migration)
                .post(vcenter::migration_action)
                .patch(vcenter::patch_migration),
        )
        .route("/api/gateway/migrations/{migration}/receipt", get(vcenter::get_receipt))
        .route("/api/gateway/migrations/{migration}/report", get(vcenter::get_report))
        .route(
            "/api/gateway/migrations/{migration}/test-boot",
            get(vcenter::get_test_boot)
                .post(vcenter::start_test_boot)
                .delete(vcenter::discard_test_boot),
        )
        .route(
            "/api/gateway/migrations/{migration}/test-boot/console",
            get(vcenter::get_test_boot_console),
        )
        .route("/api/gateway/vms/{vm}/firewall", get(vcenter::get_vm_firewall))
        .route(
            "/api/vcenter/vm/{vm}/power",
            get(vcenter::get_power).post(vcenter::change_power),
        )
        .route("/api/gateway/vms/{vm}/console", get(vcenter::get_console))
        .route("/api/gateway/peer/vms/{vm}/power", post(peer::power))
        .route("/api/gateway/peer/vms/{vm}/console", get(peer::console))
        .route("/api/gateway/plans", post(vcenter::check_plan))
        .route("/api/gateway/security", get(session::security))
        .route("/api/gateway/session", get(session::whoami))
        .route("/api/gateway/links", get(vcenter::list_links))
        .merge(super::dashboard::routes())
        .merge(super::soap::routes())
        .route("/metrics", get(super::metrics::authorized))
        .fallback(not_found)
        .method_not_allowed_fallback(operation_not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(super::dashboard::no_store))
        .layer(middleware::from_fn_with_state(state.clone(), require_session))
        .layer(middleware::from_fn(time_limit))
        .layer(middleware::from_fn_with_state(state.clone(), super::access::log))
        .with_state(state)
}

/// The requests that need no session here: the login, vAPI calls, whose credentials
/// or session travel in the body and are checked by `api::vapi`, the metrics, which
/// take a session or a bearer token (`api::metrics`), and the dashboard's files, which
/// hold no data (they log in and read the rest through this API). The SOAP API at
/// `/sdk` checks its own sessions (`api::soap`), with its own cookie. Another endpoint
/// of the domain calls `/api/gateway/peer/` with a token of its own (`rest::peer`).
fn is_public(method: &Method, path: &str) -> bool {
    (method == Method::POST && (path == "/api/session" || path == "/api"))
        || path == "/sdk"
        || path.starts_with("/sdk/")
        || path.starts_with(crate::hosts::peers::PEER_PATH)
        || (method == Method::GET && path == "/metrics")
        || super::dashboard::is_asset(method, path)
}

async fn require_session(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    if is_public(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let Some(token) = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return ApiError::unauthenticated(format!(
            "this request needs a session: log in with POST /api/session and send its token in the {SESSION_HEADER} header"
        ))
        .into_response();
    };
    let token = token.to_owned();
    let Some(session) = state.sessions.touch(&token, Now::current()) else {
        return ApiError::unauthenticated(
            "the session is unknown, ended or expired; log in again with POST /api/session",
        )
        .into_response();
    };
    let user = super::access::AccessUser(session.principal.user.clone());
    request.extensions_mut().insert(SessionContext { token, session });
    let mut response = next.run(request).await;
    response.extensions_mut().insert(user);
    response
}

async fn time_limit(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            ErrorKind::TimedOut,
            format!("the request took longer than {} s", REQUEST_TIMEOUT.as_secs()),
        )
        .into_response(),
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no resource at {method} {}", uri.path()))
}

async fn operation_not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorKind::OperationNotFound,
        format!("{} has no operation for {method}", uri.path()),
    )
}
