//! `/api/session`: log in with Basic credentials, show the session, log out.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::Serialize;
use time::OffsetDateTime;

use super::SessionContext;
use crate::api::error::ApiError;
use crate::api::session::{basic_credentials, Now};
use crate::api::{blocking, ApiState};

/// `POST /api/session` with `Authorization: Basic`: 201 and the token as a JSON string.
pub async fn create(State(state): State<ApiState>, headers: HeaderMap) -> Result<(StatusCode, Json<String>), ApiError> {
    let Some((user, password)) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(basic_credentials)
    else {
        return Err(ApiError::unauthenticated(
            "log in with a user of the cloud domain in an Authorization: Basic header",
        ));
    };
    // argon2 takes tens of milliseconds of CPU: a few logins at a time, each off the
    // async workers, so a flood of logins cannot starve the other requests.
    let _slot = state
        .login_slots
        .acquire()
        .await
        .map_err(|e| ApiError::internal("the login queue is closed", &e))?;
    let name = user.clone();
    let result = blocking(&state.domain, move |domain| {
        Ok(domain.inventory.authenticate(&user, &password)?)
    })
    .await;
    let principal = match result {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(user = %name, error = %e, "API login refused");
            return Err(e);
        }
    };
    tracing::info!(user = %principal.user, role = %principal.role, "API session started");
    let token = state.sessions.create(principal, Now::current());
    Ok((StatusCode::CREATED, Json(token)))
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

/// `DELETE /api/session`: 204.
pub async fn delete(State(state): State<ApiState>, Extension(ctx): Extension<SessionContext>) -> StatusCode {
    state.sessions.remove(&ctx.token);
    tracing::info!(user = %ctx.principal().user, "API session ended");
    StatusCode::NO_CONTENT
}

/// RFC 3339 in UTC with milliseconds, as vCenter writes times (`2024-05-01T10:00:00.123Z`).
fn rfc3339_millis(t: OffsetDateTime) -> String {
    // A fixed three-digit fraction: the well-known RFC 3339 formatter trims
    // trailing zeros (`.060` becomes `.06`), which clients parsing a fixed
    // width reject.
    const FORMAT: &[time::format_description::FormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_with_milliseconds() {
        // 2024-05-01T08:00:00.123456789Z, seen from UTC+2.
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_714_550_400_123_456_789)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.123Z");
        // Trailing zeros of the fraction are kept: always three digits.
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_714_550_400_060_000_000).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.060Z");
        let t = OffsetDateTime::from_unix_timestamp(1_714_550_400).unwrap();
        assert_eq!(rfc3339_millis(t), "2024-05-01T08:00:00.000Z");
    }
}
