//! REST handlers of the vcenter and gateway resources: parse the path and query, run the
//! protocol-neutral operation off the async workers, answer its value as JSON.

use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::query;
use crate::api::error::ApiError;
use crate::api::vcenter::{self, power, vm};
use crate::api::{blocking, gateway, tasks, ApiState};
use crate::Domain;

type Answer<T> = Result<Json<T>, ApiError>;

/// Runs a list operation with the filter of the query string.
async fn list<T: Serialize + Send + 'static>(
    state: &ApiState,
    query: Option<String>,
    allowed: &[&str],
    op: fn(&Domain, &vcenter::Filter) -> Result<T, ApiError>,
) -> Answer<T> {
    let filter = query::filter(query.as_deref(), allowed)?;
    Ok(Json(blocking(&state.domain, move |d| op(d, &filter)).await?))
}

/// Runs a get operation on one id.
async fn one<T: Serialize + Send + 'static>(
    state: &ApiState,
    id: String,
    op: fn(&Domain, &str) -> Result<T, ApiError>,
) -> Answer<T> {
    Ok(Json(blocking(&state.domain, move |d| op(d, &id)).await?))
}

/// One list route and one get route per resource: `(path, list, get)`.
macro_rules! resource {
    ($router:expr, $path:literal, $id:literal, [$($field:literal),*], $list:path, $get:path) => {
        $router
            .route(
                concat!("/api/vcenter/", $path),
                get(|State(s): State<ApiState>, RawQuery(q): RawQuery| async move {
                    list(&s, q, &[$($field),*], $list).await
                }),
            )
            .route(
                concat!("/api/vcenter/", $path, "/{", $id, "}"),
                get(|State(s): State<ApiState>, Path(id): Path<String>| async move { one(&s, id, $get).await }),
            )
    };
}

pub fn routes() -> Router<ApiState> {
    let r = Router::new();
    let r = resource!(
        r,
        "datacenter",
        "datacenter",
        ["datacenters", "names", "folders"],
        vcenter::list_datacenters,
        vcenter::get_datacenter
    );
    let r = resource!(
        r,
        "cluster",
        "cluster",
        [
            "clusters",
            "names",
            "folders",
            "datacenters",
            "ha_enabled",
            "drs_enabled"
        ],
        vcenter::list_clusters,
        vcenter::get_cluster
    );
    let r = resource!(
        r,
        "host",
        "host",
        [
            "hosts",
            "names",
            "folders",
            "datacenters",
            "clusters",
            "connection_states",
            "standalone",
            "host_uuids"
        ],
        vcenter::list_hosts,
        vcenter::get_host
    );
    let r = resource!(
        r,
        "datastore",
        "datastore",
        ["datastores", "names", "types", "folders", "datacenters"],
        vcenter::list_datastores,
        vcenter::get_datastore
    );
    let r = resource!(
        r,
        "network",
        "network",
        ["networks", "names", "types", "folders", "datacenters"],
        vcenter::list_networks,
        vcenter::get_network
    );
    let r = resource!(
        r,
        "folder",
        "folder",
        ["type", "folders", "names", "parent_folders", "datacenters"],
        vcenter::list_folders,
        vcenter::get_folder
    );
    let r = resource!(
        r,
        "resource-pool",
        "resource_pool",
        [
            "resource_pools",
            "names",
            "parent_resource_pools",
            "datacenters",
            "hosts",
            "clusters"
        ],
        vcenter::resource_pool::list,
        vcenter::resource_pool::get
    );
    resource!(
        r,
        "vm",
        "vm",
        [
            "vms",
            "names",
            "folders",
            "datacenters",
            "hosts",
            "clusters",
            "resource_pools",
            "power_states"
        ],
        vm::list,
        vm::get
    )
}

/// `GET /api/cis/tasks/{task}`: a migration as vSphere's task.
pub async fn get_task(State(state): State<ApiState>, Path(id): Path<String>) -> Answer<tasks::TaskInfo> {
    one(&state, id, tasks::get).await
}

pub async fn list_migrations(State(state): State<ApiState>) -> Answer<Vec<crate::inventory::MigrationRecord>> {
    Ok(Json(blocking(&state.domain, gateway::list_migrations).await?))
}

/// `GET /api/gateway/links`: the recent link and progress samples of each migration a
/// connection serves now (`server::links`).
pub async fn list_links(State(state): State<ApiState>) -> Json<Vec<crate::server::links::LinkTrace>> {
    Json(state.domain.links.traces())
}

pub async fn get_migration(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<crate::inventory::MigrationRecord> {
    one(&state, id, gateway::get_migration).await
}

/// The stored document as it is, not re-serialized: its bytes are what the edge got, and a
/// verifier may compare them.
pub async fn get_receipt(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let signed = blocking(&state.domain, move |d| gateway::get_receipt(d, &id)).await?;
    Ok(axum::response::IntoResponse::into_response((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        signed,
    )))
}

/// The stored report as it is (JSON).
pub async fn get_report(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let report = blocking(&state.domain, move |d| gateway::get_report(d, &id)).await?;
    Ok(axum::response::IntoResponse::into_response((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        report,
    )))
}

pub async fn get_vm_firewall(
    State(state): State<ApiState>,
    Path(vm): Path<String>,
) -> Answer<crate::inventory::VmFirewall> {
    one(&state, vm, gateway::get_vm_firewall).await
}

/// `POST /api/gateway/plans`: 200 with what a migration of the plan would create, or
/// 400 (403 for a role that may not migrate) with one message per problem, every
/// problem at once, in vSphere's error shape.
pub async fn check_plan(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let principal = ctx.principal().clone();
    let verdict = blocking(&state.domain, move |d| gateway::check_plan(d, &principal, &body)).await?;
    Ok(match verdict {
        gateway::PlanVerdict::Valid(report) => Json(report).into_response(),
        gateway::PlanVerdict::Refused(kind, problems) => {
            let messages: Vec<serde_json::Value> = problems
                .iter()
                .map(|p| serde_json::json!({"id": kind.message_id(), "default_message": p, "args": []}))
                .collect();
            (
                kind.status(),
                Json(serde_json::json!({"error_type": kind.error_type(), "messages": messages})),
            )
                .into_response()
        }
    })
}

/// `POST /api/gateway/migrations/{id}?action=abort`: aborts a RUNNING migration (the
/// partial files are removed, the VM name freed) and returns its record, FAILED.
/// `?action=rollback` and `?action=confirm` end a switchover awaiting confirmation, as
/// `edge-agent rollback` and `confirm` do, and return `{"message", "migration"}`.
pub async fn migration_action(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let principal = ctx.principal().clone();
    match query.as_deref() {
        Some("action=abort") => {}
        Some(action @ ("action=rollback" | "action=confirm")) => {
            let confirm = action == "action=confirm";
            let ended = gateway::end_switchover(&state.domain, &principal, &id, confirm).await?;
            return Ok(Json(ended).into_response());
        }
        _ => {
            return Err(ApiError::invalid_argument(format!(
                "POST /api/gateway/migrations/{id} needs ?action=abort (a RUNNING migration), ?action=rollback or \
                 ?action=confirm (a switchover awaiting confirmation)"
            )))
        }
    }
    let aborted = id.clone();
    let mut record = blocking(&state.domain, move |d| {
        gateway::abort_migration(d, &principal, &aborted)
    })
    .await?;
    // Its test boot, if any, was a copy of a replica that is gone now.
    if let Err(e) = state.domain.hosts.discard_test_boot(&id).await {
        tracing::warn!(migration = ?id, error = %e, "cannot discard its test boot");
    }
    // A live migration is discarded by its connection's cleanup: wait for it (briefly).
    for _ in 0..100 {
        if record.state != "RUNNING" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let id = id.clone();
        record = blocking(&state.domain, move |d| gateway::get_migration(d, &id)).await?;
    }
    Ok(Json(record).into_response())
}

/// `PATCH /api/gateway/migrations/{id}` with `{"switchover_at": "2026-12-07T02:00:00Z"}`
/// (or `null`): schedules, moves or clears a replication's switchover; returns the record.
pub async fn patch_migration(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer<crate::inventory::MigrationRecord> {
    let principal = ctx.principal().clone();
    let record = blocking(&state.domain, move |d| {
        gateway::patch_migration(d, &principal, &id, &body)
    })
    .await?;
    Ok(Json(record))
}

/// `GET /api/vcenter/vm/{vm}/power`: `{"state":"POWERED_ON"}`.
pub async fn get_power(State(state): State<ApiState>, Path(vm): Path<String>) -> Answer<power::PowerInfo> {
    one(&state, vm, power::get).await
}

/// `POST /api/vcenter/vm/{vm}/power?action=start|stop|reset`: 204 once done.
pub async fn change_power(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(vm): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::http::StatusCode, ApiError> {
    let mut action = None;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "action" => action = Some(power::Action::parse(&value)?),
            // vSphere's optional flag for a task handle; these operations answer when done.
            "vmw-task" => {}
            other => {
                return Err(ApiError::invalid_argument(format!(
                    "POST /api/vcenter/vm/{vm}/power takes ?action=start|stop|reset, not {other:?}"
                )))
            }
        }
    }
    let action = action.ok_or_else(|| {
        ApiError::invalid_argument(format!(
            "POST /api/vcenter/vm/{vm}/power needs ?action=start|stop|reset"
        ))
    })?;
    power::change(&state.domain, ctx.principal(), &vm, action).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `GET /api/gateway/vms/{vm}/console?bytes=N`: the end of the guest's serial console as
/// text (64 KiB unless N says otherwise, at most 1 MiB).
pub async fn get_console(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(vm): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let bytes = power::console_bytes(query.as_deref())?;
    let out = power::console(&state.domain, ctx.principal(), &vm, bytes).await?;
    Ok(axum::response::IntoResponse::into_response((
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&out).into_owned(),
    )))
}

/// `POST /api/gateway/migrations/{id}/test-boot`: boots a disposable copy of the
/// replication's replica (201 with what runs); `GET` shows it; `DELETE` discards it (204).
pub async fn start_test_boot(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<crate::hosts::test_boot::TestBootInfo>), ApiError> {
    let info = gateway::start_test_boot(&state.domain, ctx.principal(), &id).await?;
    Ok((axum::http::StatusCode::CREATED, Json(info)))
}

pub async fn get_test_boot(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Answer<crate::hosts::test_boot::TestBootInfo> {
    Ok(Json(gateway::test_boot(&state.domain, &id).await?))
}

pub async fn discard_test_boot(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    gateway::discard_test_boot(&state.domain, ctx.principal(), &id).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `GET /api/gateway/migrations/{id}/test-boot/console?bytes=N`: as a VM's console.
pub async fn get_test_boot_console(
    State(state): State<ApiState>,
    axum::Extension(ctx): axum::Extension<super::SessionContext>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let bytes = power::console_bytes(query.as_deref())?;
    let out = gateway::test_boot_console(&state.domain, ctx.principal(), &id, bytes).await?;
    Ok(axum::response::IntoResponse::into_response((
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&out).into_owned(),
    )))
}
