//! `/api/session`: log in with Basic credentials, show the session, log out; and
//! `/api/gateway/security`: what the login throttle counted and holds.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse as _;
use axum::{Extension, Json};
use serde::Serialize;

use super::SessionContext;
use crate::api::error::{ApiError, ErrorKind};
use crate::api::session::{basic_credentials, rfc3339_millis};
use crate::api::ApiState;
use crate::config::Role;
use crate::logins::LoginStats;

/// `POST /api/session` with `Authorization: Basic`: 201 and the token as a JSON string.
pub async fn create(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    let Some((user, password)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(basic_credentials)
    else {
        return Err(ApiError::unauthenticated(
            "log in with a user of the cloud domain in an Authorization: Basic header",
        ));
    };
    let token = state.login(user.clone(), password, peer.ip()).await?;
    let mut response = (StatusCode::CREATED, Json(token)).into_response();
    response.extensions_mut().insert(crate::api::access::AccessUser(user));
    Ok(response)
}

#[derive(Debug, Serialize)]
pub struct SessionInfo {
    pub user: String,
    pub created_time: String,
    pub last_accessed_time: String,
}

/// `GET /api/session`.
pub async fn get(Extension(ctx): Extension<SessionContext>) -> Json<SessionInfo> {
    Json(SessionInfo {
        user: ctx.principal().user.clone(),
        created_time: rfc3339_millis(ctx.session.created),
        last_accessed_time: rfc3339_millis(ctx.session.last_accessed),
    })
}

/// `GET /api/gateway/session`: who the session is and what their role lets them do,
/// for a client that shows or hides actions (the dashboard); vSphere's session info
/// (`GET /api/session`) has no role, and stays as vSphere answers it.
#[derive(Debug, Serialize)]
pub struct Whoami {
    pub user: String,
    pub role: &'static str,
    /// Start, abort (their own, or any as an Administrator) and switch over migrations.
    pub may_migrate: bool,
}

pub async fn whoami(Extension(ctx): Extension<SessionContext>) -> Json<Whoami> {
    let p = ctx.principal();
    Json(Whoami {
        user: p.user.clone(),
        role: p.role.as_str(),
        may_migrate: p.role.may_migrate(),
    })
}

/// `DELETE /api/session`: 204.
pub async fn delete(State(state): State<ApiState>, Extension(ctx): Extension<SessionContext>) -> StatusCode {
    state.sessions.remove(&ctx.token);
    tracing::info!(user = ?ctx.principal().user, "API session ended");
    StatusCode::NO_CONTENT
}

/// `GET /api/gateway/security`, Administrators only: failed, refused and accepted logins
/// since the start, password checks run, lockouts, and the users locked out and client
/// addresses blocked now.
pub async fn security(
    State(state): State<ApiState>,
    Extension(ctx): Extension<SessionContext>,
) -> Result<Json<LoginStats>, ApiError> {
    let principal = ctx.principal();
    if principal.role != Role::Administrator {
        return Err(ApiError::new(
            ErrorKind::Unauthorized,
            format!(
                "user {} has role {}, which may not read the login counters; ask an Administrator",
                principal.user, principal.role
            ),
        ));
    }
    Ok(Json(state.domain.logins.stats()))
}
