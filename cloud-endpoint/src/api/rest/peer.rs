//! The routes another endpoint of a scale-out domain calls to have this one power or
//! read the console of a VM on its host (`crate::hosts::peers`). They take no session:
//! the caller presents this endpoint's current peer token and names this host, and has
//! checked the user's role itself. They serve on this host only, never forwarding again.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::access::AccessUser;
use crate::api::error::ApiError;
use crate::api::vcenter::power;
use crate::api::ApiState;
use crate::hosts::peers::{FOR_HEADER, FROM_HEADER, HOST_HEADER};
use crate::hosts::Hosts;

/// Who forwarded a request, once admitted.
struct Caller {
    from: String,
    on_behalf: String,
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").trim()
}

/// Admits a request that names this host and carries its current peer token.
fn admit(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let this = state.domain.hosts.this();
    let host = text(headers, HOST_HEADER);
    if host != this.name {
        return Err(ApiError::unauthenticated(format!(
            "this is the endpoint of host {}, not of host {host:?}: the address recorded for host {host:?} leads \
             here; set `domain.host.api_url` of {host:?}'s endpoint to its own address",
            this.name
        )));
    }
    let token = text(headers, header::AUTHORIZATION.as_str())
        .strip_prefix("Bearer ")
        .unwrap_or("");
    if !this.shared || !this.admits(token.trim()) {
        return Err(ApiError::unauthenticated(format!(
            "not this endpoint's current peer token: the calling endpoint read it before host {} restarted; \
             ask again",
            this.name
        )));
    }
    Ok(Caller {
        from: text(headers, FROM_HEADER).to_owned(),
        on_behalf: text(headers, FOR_HEADER).to_owned(),
    })
}

/// The access log names who the peer acted for.
fn logged(caller: &Caller, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response
        .extensions_mut()
        .insert(AccessUser(format!("{} via {}", caller.on_behalf, caller.from)));
    response
}

/// `POST /api/gateway/peer/vms/{vm}/power?action=start|stop|reset`: 204 once done.
pub async fn power(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = admit(&state, &headers)?;
    let action = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "action")
        .map(|(_, v)| power::Action::parse(&v))
        .transpose()?
        .ok_or_else(|| ApiError::invalid_argument("a forwarded power operation needs ?action=start|stop|reset"))?;
    tracing::info!(vm = ?vm, from = %caller.from, on_behalf = %caller.on_behalf, op = action.op().action(), "power operation forwarded by another endpoint");
    Hosts::power_here(&state.domain, &vm, action.op()).await?;
    Ok(logged(&caller, StatusCode::NO_CONTENT))
}

/// `GET /api/gateway/peer/vms/{vm}/console?bytes=N`: as `/api/gateway/vms/{vm}/console`.
pub async fn console(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = admit(&state, &headers)?;
    let bytes = power::console_bytes(query.as_deref())?;
    let out = Hosts::console_here(&state.domain, &vm, bytes).await?;
    Ok(logged(
        &caller,
        ([(header::CONTENT_TYPE, "application/octet-stream")], out),
    ))
}
