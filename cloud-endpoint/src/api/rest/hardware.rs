//! REST routes of a VM's hardware resources, its guest identity, and the appliance's
//! version.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::api::error::ApiError;
use crate::api::vcenter::hardware;
use crate::api::{appliance, blocking, ApiState};
use crate::Domain;

type Answer<T> = Result<Json<T>, ApiError>;

/// Runs a get on one VM.
async fn of_vm<T: Serialize + Send + 'static>(
    state: &ApiState,
    vm: String,
    op: fn(&Domain, &str) -> Result<T, ApiError>,
) -> Answer<T> {
    Ok(Json(blocking(&state.domain, move |d| op(d, &vm)).await?))
}

/// Runs a get on one device of a VM.
async fn of_device<T: Serialize + Send + 'static>(
    state: &ApiState,
    (vm, device): (String, String),
    op: fn(&Domain, &str, &str) -> Result<T, ApiError>,
) -> Answer<T> {
    Ok(Json(blocking(&state.domain, move |d| op(d, &vm, &device)).await?))
}

/// A route of a get on one VM: `GET /api/vcenter/vm/{vm}/<path>`.
macro_rules! vm_get {
    ($router:expr, $path:literal, $op:path) => {
        $router.route(
            concat!("/api/vcenter/vm/{vm}/", $path),
            get(|State(s): State<ApiState>, Path(vm): Path<String>| async move { of_vm(&s, vm, $op).await }),
        )
    };
}

pub fn routes() -> Router<ApiState> {
    let r = Router::new();
    let r = vm_get!(r, "hardware", hardware::hardware);
    let r = vm_get!(r, "hardware/cpu", hardware::cpu);
    let r = vm_get!(r, "hardware/memory", hardware::memory);
    let r = vm_get!(r, "hardware/boot", hardware::boot);
    let r = vm_get!(r, "hardware/disk", hardware::list_disks);
    let r = vm_get!(r, "hardware/ethernet", hardware::list_nics);
    let r = vm_get!(r, "guest/identity", hardware::guest_identity);
    r.route(
        "/api/vcenter/vm/{vm}/hardware/disk/{disk}",
        get(
            |State(s): State<ApiState>, Path(ids): Path<(String, String)>| async move {
                of_device(&s, ids, hardware::get_disk).await
            },
        ),
    )
    .route(
        "/api/vcenter/vm/{vm}/hardware/ethernet/{nic}",
        get(
            |State(s): State<ApiState>, Path(ids): Path<(String, String)>| async move {
                of_device(&s, ids, hardware::get_nic).await
            },
        ),
    )
    .route(
        "/api/appliance/system/version",
        get(|State(s): State<ApiState>| async move {
            Ok::<_, ApiError>(Json(blocking(&s.domain, appliance::system_version).await?))
        }),
    )
}
