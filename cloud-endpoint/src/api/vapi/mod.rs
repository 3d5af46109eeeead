//! vAPI JSON-RPC at `POST /api`: the protocol of the vSphere Automation SDKs
//! (`create_vsphere_client` in Python). Every call is one JSON-RPC 2.0 `invoke` naming a
//! service and an operation; its input, output and errors are vAPI values (see
//! [`value`]). Errors travel inside HTTP 200 as the SDK expects, as standard errors
//! (`com.vmware.vapi.std.errors.not_found`, ...) it raises as typed exceptions.
//!
//! The operations are the REST ones: the same filters ([`Filter`]), the same
//! protocol-neutral queries in `api::vcenter`, the same sessions. A token from
//! `POST /api/session` works here and one from `com.vmware.cis.session` create works in
//! REST. Credentials and the session travel in the body's security context, so the REST
//! session check lets `POST /api` through and every operation but session create checks
//! the session here.

mod shapes;
pub mod value;

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};

use self::value::{encode, secret, struct_fields, unwrap_optional, Shape};
use super::error::{ApiError, ErrorKind};
use super::session::{rfc3339_millis, Now, Session};
use super::vcenter::{self, hardware, power, vm, Filter};
use super::{appliance, blocking, tasks, ApiState};
use crate::Domain;

/// JSON-RPC's own error codes, for requests that are not vAPI calls at all.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;
/// vAPI's: the `vapi-service`/`vapi-operation` headers name another call than the body.
const INVALID_OPERATION: i64 = -31001;

const USER_PASS_SCHEME: &str = "com.vmware.vapi.std.security.user_pass";
const SESSION_SCHEME: &str = "com.vmware.vapi.std.security.session_id";

/// The services and operations served, for the OPERATION_NOT_FOUND message. Gets the
/// SDK has no binding for (host, network, folder) are not offered: vCenter has none.
const OPERATIONS: &[(&str, &[&str])] = &[
    ("com.vmware.cis.session", &["create", "get", "delete"]),
    ("com.vmware.cis.tasks", &["get"]),
    ("com.vmware.vcenter.VM", &["list", "get"]),
    ("com.vmware.vcenter.vm.power", &["get", "start", "stop", "reset"]),
    ("com.vmware.vcenter.host", &["list"]),
    ("com.vmware.vcenter.datastore", &["list", "get"]),
    ("com.vmware.vcenter.network", &["list"]),
    ("com.vmware.vcenter.datacenter", &["list", "get"]),
    ("com.vmware.vcenter.cluster", &["list", "get"]),
    ("com.vmware.vcenter.folder", &["list"]),
    ("com.vmware.vcenter.resource_pool", &["list", "get"]),
    ("com.vmware.vcenter.vm.hardware", &["get"]),
    ("com.vmware.vcenter.vm.hardware.cpu", &["get"]),
    ("com.vmware.vcenter.vm.hardware.memory", &["get"]),
    ("com.vmware.vcenter.vm.hardware.boot", &["get"]),
    ("com.vmware.vcenter.vm.hardware.disk", &["list", "get"]),
    ("com.vmware.vcenter.vm.hardware.ethernet", &["list", "get"]),
    ("com.vmware.vcenter.vm.guest.identity", &["get"]),
    ("com.vmware.appliance.system.version", &["get"]),
];

/// The filter spec fields of each list, as the SDK's `FilterSpec` classes name them.
const VM_FILTER: &[&str] = &[
    "vms",
    "names",
    "folders",
    "datacenters",
    "hosts",
    "clusters",
    "resource_pools",
    "power_states",
];
const HOST_FILTER: &[&str] = &[
    "hosts",
    "names",
    "folders",
    "datacenters",
    "standalone",
    "clusters",
    "connection_states",
    "host_uuids",
];
const DATASTORE_FILTER: &[&str] = &["datastores", "names", "types", "folders", "datacenters"];
const NETWORK_FILTER: &[&str] = &["networks", "names", "types", "folders", "datacenters"];
const DATACENTER_FILTER: &[&str] = &["datacenters", "names", "folders"];
const CLUSTER_FILTER: &[&str] = &[
    "clusters",
    "names",
    "folders",
    "datacenters",
    "ha_enabled",
    "drs_enabled",
];
const FOLDER_FILTER: &[&str] = &["type", "folders", "names", "parent_folders", "datacenters"];
const RESOURCE_POOL_FILTER: &[&str] = &[
    "resource_pools",
    "names",
    "parent_resource_pools",
    "datacenters",
    "hosts",
    "clusters",
];

/// A JSON-RPC response: `result` (a vAPI output or error) or a JSON-RPC `error`.
#[derive(Debug, Serialize)]
pub struct Response {
    jsonrpc: &'static str,
    id: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

fn rpc_error(id: Value, code: i64, message: String) -> Json<Response> {
    Json(Response {
        jsonrpc: "2.0",
        id,
        result: None,
        error: Some(json!({ "code": code, "message": message })),
    })
}

/// `POST /api`: one vAPI call.
pub async fn invoke(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Json<Response> {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return rpc_error(
                Value::Null,
                PARSE_ERROR,
                format!("the body is not JSON ({e}); POST /api takes vAPI JSON-RPC 2.0 calls"),
            )
        }
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    if request["jsonrpc"] != "2.0" || request["method"] != "invoke" || !request["params"].is_object() {
        return rpc_error(
            Value::Null,
            INVALID_REQUEST,
            "POST /api takes JSON-RPC 2.0 requests with method \"invoke\" and params {serviceId, operationId, input, ctx}"
                .into(),
        );
    }
    let params = &request["params"];
    let (Some(service), Some(operation)) = (params["serviceId"].as_str(), params["operationId"].as_str()) else {
        return rpc_error(
            id,
            INVALID_PARAMS,
            "params need serviceId and operationId strings".into(),
        );
    };
    // Proxies may route by these headers; a call whose headers say something else than
    // its body must not run as either.
    for (header, named) in [("vapi-service", service), ("vapi-operation", operation)] {
        if let Some(value) = headers.get(header) {
            if value.to_str().ok().map(str::trim) != Some(named) {
                return rpc_error(
                    id,
                    INVALID_OPERATION,
                    format!("the {header} header does not match the body's {named:?}"),
                );
            }
        }
    }
    let security = params["ctx"].get("securityCtx");
    let result = match call(&state, service, operation, &params["input"], security, peer.ip()).await {
        Ok(output) => json!({ "output": output }),
        Err(e) => {
            if e.kind == ErrorKind::Unauthenticated {
                tracing::debug!(service, operation, error = %e, "vAPI call refused");
            }
            json!({ "error": e.vapi_value() })
        }
    };
    Json(Response {
        jsonrpc: "2.0",
        id,
        result: Some(result),
        error: None,
    })
}

async fn call(
    state: &ApiState,
    service: &str,
    operation: &str,
    input: &Value,
    security: Option<&Value>,
    source: IpAddr,
) -> Result<Value, ApiError> {
    let scheme = security.and_then(|s| s["schemeId"].as_str());
    if (service, operation) == ("com.vmware.cis.session", "create") {
        if scheme != Some(USER_PASS_SCHEME) {
            return Err(ApiError::unauthenticated(
                "log in with com.vmware.cis.session create and a user name and password of the cloud domain (security scheme com.vmware.vapi.std.security.user_pass)",
            ));
        }
        let security = security.unwrap_or(&Value::Null);
        let user = security["userName"].as_str().unwrap_or_default().to_owned();
        let password = security["password"].as_str().unwrap_or_default().to_owned();
        let token = state.login(user, password, source).await?;
        return Ok(secret(&token));
    }
    // Nothing else answers without a live session, not even an unknown operation.
    let token = match (scheme, security.and_then(|s| s["sessionId"].as_str())) {
        (Some(SESSION_SCHEME), Some(token)) => token,
        _ => {
            return Err(ApiError::unauthenticated(
                "this call needs a session: log in with com.vmware.cis.session create and send its id (security scheme com.vmware.vapi.std.security.session_id)",
            ))
        }
    };
    let Some(session) = state.sessions.touch(token, Now::current()) else {
        return Err(ApiError::unauthenticated(
            "the session is unknown, ended or expired; log in again with com.vmware.cis.session create",
        ));
    };
    match (service, operation) {
        ("com.vmware.cis.session", "get") => session_info(&session),
        ("com.vmware.cis.session", "delete") => {
            state.sessions.remove(token);
            tracing::info!(user = ?session.principal.user, "API session ended (vAPI)");
            Ok(Value::Null)
        }
        ("com.vmware.cis.tasks", "get") => get(state, input, "task", tasks::get, &shapes::TASK_INFO).await,
        ("com.vmware.vcenter.VM", "list") => list(state, input, VM_FILTER, vm::list, &shapes::VM_SUMMARY).await,
        ("com.vmware.vcenter.VM", "get") => get(state, input, "vm", vm_info, &shapes::VM_INFO).await,
        ("com.vmware.vcenter.vm.power", "get") => get(state, input, "vm", power::get, &shapes::POWER_INFO).await,
        ("com.vmware.vcenter.vm.power", action @ ("start" | "stop" | "reset")) => {
            let action = power::Action::parse(action)?;
            let vm = input_fields(input)?
                .get("vm")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid_argument("the call needs the VM's id in \"vm\""))?;
            power::change(&state.domain, &session.principal, vm, action).await?;
            Ok(Value::Null)
        }
        ("com.vmware.vcenter.host", "list") => {
            list(state, input, HOST_FILTER, vcenter::list_hosts, &shapes::HOST_SUMMARY).await
        }
        ("com.vmware.vcenter.datastore", "list") => {
            list(
                state,
                input,
                DATASTORE_FILTER,
                vcenter::list_datastores,
                &shapes::DATASTORE_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.datastore", "get") => {
            get(
                state,
                input,
                "datastore",
                vcenter::get_datastore,
                &shapes::DATASTORE_INFO,
            )
            .await
        }
        ("com.vmware.vcenter.network", "list") => {
            list(
                state,
                input,
                NETWORK_FILTER,
                vcenter::list_networks,
                &shapes::NETWORK_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.datacenter", "list") => {
            list(
                state,
                input,
                DATACENTER_FILTER,
                vcenter::list_datacenters,
                &shapes::DATACENTER_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.datacenter", "get") => {
            get(
                state,
                input,
                "datacenter",
                vcenter::get_datacenter,
                &shapes::DATACENTER_INFO,
            )
            .await
        }
        ("com.vmware.vcenter.cluster", "list") => {
            list(
                state,
                input,
                CLUSTER_FILTER,
                vcenter::list_clusters,
                &shapes::CLUSTER_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.cluster", "get") => {
            get(state, input, "cluster", vcenter::get_cluster, &shapes::CLUSTER_INFO).await
        }
        ("com.vmware.vcenter.folder", "list") => {
            list(
                state,
                input,
                FOLDER_FILTER,
                vcenter::list_folders,
                &shapes::FOLDER_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.resource_pool", "list") => {
            list(
                state,
                input,
                RESOURCE_POOL_FILTER,
                vcenter::resource_pool::list,
                &shapes::RESOURCE_POOL_SUMMARY,
            )
            .await
        }
        ("com.vmware.vcenter.resource_pool", "get") => {
            get(
                state,
                input,
                "resource_pool",
                vcenter::resource_pool::get,
                &shapes::RESOURCE_POOL_INFO,
            )
            .await
        }
        ("com.vmware.vcenter.vm.hardware", "get") => {
            get(state, input, "vm", hardware::hardware, &shapes::HARDWARE_INFO).await
        }
        ("com.vmware.vcenter.vm.hardware.cpu", "get") => {
            get(state, input, "vm", hardware::cpu, &shapes::CPU_INFO).await
        }
        ("com.vmware.vcenter.vm.hardware.memory", "get") => {
            get(state, input, "vm", hardware::memory, &shapes::MEMORY_INFO).await
        }
        ("com.vmware.vcenter.vm.hardware.boot", "get") => get(state, input, "vm", boot_info, &shapes::BOOT_INFO).await,
        ("com.vmware.vcenter.vm.hardware.disk", "list") => {
            get(state, input, "vm", hardware::list_disks, &shapes::DISK_SUMMARY_LIST).await
        }
        ("com.vmware.vcenter.vm.hardware.disk", "get") => {
            get_device(state, input, "disk", hardware::get_disk, &shapes::DISK_INFO).await
        }
        ("com.vmware.vcenter.vm.hardware.ethernet", "list") => {
            get(state, input, "vm", hardware::list_nics, &shapes::NIC_SUMMARY_LIST).await
        }
        ("com.vmware.vcenter.vm.hardware.ethernet", "get") => {
            get_device(state, input, "nic", nic_info, &shapes::NIC_INFO).await
        }
        ("com.vmware.vcenter.vm.guest.identity", "get") => {
            get(state, input, "vm", hardware::guest_identity, &value::Shape::Never).await
        }
        ("com.vmware.appliance.system.version", "get") => {
            let version = blocking(&state.domain, appliance::system_version).await?;
            encode(&to_json(&version)?, &shapes::APPLIANCE_VERSION, "version")
        }
        _ => Err(operation_not_found(service, operation)),
    }
}

fn operation_not_found(service: &str, operation: &str) -> ApiError {
    let message = match OPERATIONS.iter().find(|(s, _)| *s == service) {
        Some((_, ops)) => format!(
            "{service} has no operation {operation:?} here; it offers {}",
            ops.join(", ")
        ),
        None => format!(
            "no service {service:?} here; this endpoint offers {}",
            OPERATIONS.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
        ),
    };
    ApiError::new(ErrorKind::OperationNotFound, message)
}

fn session_info(session: &Session) -> Result<Value, ApiError> {
    let info = json!({
        "user": session.principal.user,
        "created_time": rfc3339_millis(session.created),
        "last_accessed_time": rfc3339_millis(session.last_accessed),
    });
    encode(&info, &shapes::SESSION_INFO, "session")
}

/// Fuzzing entry for a `POST /api` body (fuzz/fuzz_targets/api_bodies.rs): what the
/// endpoint does with it before anything reaches the inventory (the JSON, the envelope,
/// the input structure, a list filter with every field any list takes) must answer, never
/// panic, whatever the bytes.
pub(crate) fn fuzz_body(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let params = &request["params"];
    let _ = (params["serviceId"].as_str(), params["operationId"].as_str());
    let _ = params["ctx"].get("securityCtx");
    let input = &params["input"];
    let _ = input_fields(input);
    let _ = filter(
        input,
        &[
            "names",
            "vms",
            "hosts",
            "folders",
            "datastores",
            "clusters",
            "datacenters",
            "power_states",
        ],
    );
}

/// The fields of the operation input structure.
fn input_fields(input: &Value) -> Result<&Map<String, Value>, ApiError> {
    struct_fields(input).map(|(_, fields)| fields).ok_or_else(|| {
        ApiError::invalid_argument("the call's input is not a structure ({\"STRUCTURE\":{\"operation-input\":{...}}})")
    })
}

/// The list filter of the input's `filter` field: each set field of the filter spec adds
/// its values, as REST's repeated query keys do. An unset or empty field matches all, as
/// vSphere documents; a field this endpoint does not know is refused when set, so a
/// filter never silently widens to everything.
fn filter(input: &Value, allowed: &[&str]) -> Result<Filter, ApiError> {
    let mut filter = Filter::default();
    let Some(spec) = input_fields(input)?.get("filter").and_then(unwrap_optional) else {
        return Ok(filter);
    };
    let (_, fields) =
        struct_fields(spec).ok_or_else(|| ApiError::invalid_argument("filter: not a filter spec structure"))?;
    for (name, value) in fields {
        let Some(value) = unwrap_optional(value) else { continue };
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::invalid_argument(format!(
                "filter field {name:?} is not supported here; this list takes {}",
                allowed.join(", ")
            )));
        }
        let values = match value {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in values {
            match v {
                Value::String(s) => filter.add(name, s),
                Value::Bool(b) => filter.add(name, if *b { "true" } else { "false" }),
                other => {
                    return Err(ApiError::invalid_argument(format!(
                        "filter field {name:?}: {other} is not a string, id, enum value or boolean"
                    )))
                }
            }
        }
    }
    Ok(filter)
}

async fn list<T: Serialize + Send + 'static>(
    state: &ApiState,
    input: &Value,
    allowed: &[&str],
    op: fn(&Domain, &Filter) -> Result<Vec<T>, ApiError>,
    shape: &'static Shape,
) -> Result<Value, ApiError> {
    let filter = filter(input, allowed)?;
    let items = blocking(&state.domain, move |d| op(d, &filter)).await?;
    let items = items
        .iter()
        .enumerate()
        .map(|(i, item)| encode(&to_json(item)?, shape, &format!("[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(items))
}

async fn get<T: Serialize + Send + 'static>(
    state: &ApiState,
    input: &Value,
    arg: &'static str,
    op: fn(&Domain, &str) -> Result<T, ApiError>,
    shape: &'static Shape,
) -> Result<Value, ApiError> {
    let id = input_fields(input)?
        .get(arg)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_argument(format!("the call needs the id of the object in {arg:?}")))?
        .to_owned();
    let info = blocking(&state.domain, move |d| op(d, &id)).await?;
    encode(&to_json(&info)?, shape, arg)
}

/// A get on one device of a VM: the VM's id in `vm`, the device's key in `arg`.
async fn get_device<T: Serialize + Send + 'static>(
    state: &ApiState,
    input: &Value,
    arg: &'static str,
    op: fn(&Domain, &str, &str) -> Result<T, ApiError>,
    shape: &'static Shape,
) -> Result<Value, ApiError> {
    let fields = input_fields(input)?;
    let id = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ApiError::invalid_argument(format!("the call needs the id of the object in {name:?}")))
    };
    let (vm, device) = (id("vm")?, id(arg)?);
    let info = blocking(&state.domain, move |d| op(d, &vm, &device)).await?;
    encode(&to_json(&info)?, shape, arg)
}

/// A boot as REST shows it, with the fields vAPI requires of an EFI boot (see [`vm_info`]).
fn boot_info(domain: &Domain, vm: &str) -> Result<Value, ApiError> {
    let mut boot = to_json(&hardware::boot(domain, vm)?)?;
    complete_boot(&mut boot);
    Ok(boot)
}

/// A NIC as REST shows it, with the fields vAPI requires of a VMXNET3 one (see [`vm_info`]).
fn nic_info(domain: &Domain, vm: &str, nic: &str) -> Result<Value, ApiError> {
    let mut info = to_json(&hardware::get_nic(domain, vm, nic)?)?;
    complete_nic(&mut info);
    Ok(info)
}

fn complete_boot(boot: &mut Value) {
    if let Some(boot) = boot.as_object_mut() {
        if boot.get("type").is_some_and(|t| t == "EFI") {
            boot.entry("efi_legacy_boot").or_insert(json!(false));
            boot.entry("network_protocol").or_insert(json!("IPV4"));
        }
    }
}

fn complete_nic(nic: &mut Value) {
    if let Some(nic) = nic.as_object_mut() {
        if nic.get("type").is_some_and(|t| t == "VMXNET3") {
            nic.entry("upt_compatibility_enabled").or_insert(json!(false));
        }
    }
}

/// A VM as REST shows it, with the fields vAPI requires and REST leaves out:
/// - identity's BIOS UUID: a VM whose source had none shows an empty one rather than
///   losing its name and instance UUID, or getting a made-up UUID;
/// - the fields the SDK's unions require for one case: an EFI boot's legacy-boot flag and
///   network-boot protocol, a VMXNET3 NIC's UPT flag, at the values a VM that never set
///   them has (no legacy boot, IPv4, UPT off).
fn vm_info(domain: &Domain, id: &str) -> Result<Value, ApiError> {
    let mut info = to_json(&vm::get(domain, id)?)?;
    if let Some(identity) = info.get_mut("identity").and_then(Value::as_object_mut) {
        identity.entry("bios_uuid").or_insert_with(|| json!(""));
    }
    if let Some(boot) = info.get_mut("boot") {
        complete_boot(boot);
    }
    if let Some(nics) = info.get_mut("nics").and_then(Value::as_object_mut) {
        nics.values_mut().for_each(complete_nic);
    }
    Ok(info)
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal("a result could not be serialised", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(filter: Value) -> Value {
        json!({"STRUCTURE": {"operation-input": {"filter": filter}}})
    }

    #[test]
    fn filter_specs_become_filters() {
        let spec = json!({"OPTIONAL": {"STRUCTURE": {"com.vmware.vcenter.VM.filter_spec": {
            "names": {"OPTIONAL": ["web01", "db01"]},
            "power_states": {"OPTIONAL": ["POWERED_OFF"]},
            "vms": {"OPTIONAL": null},
            "hosts": {"OPTIONAL": []},
        }}}});
        let f = filter(&input(spec), VM_FILTER).unwrap();
        assert_eq!(f.get("names").unwrap(), ["web01", "db01"]);
        assert_eq!(f.get("power_states").unwrap(), ["POWERED_OFF"]);
        assert!(f.get("vms").is_none(), "unset matches all");
        assert!(f.get("hosts").is_none(), "empty matches all, as vSphere documents");
        assert_eq!(
            filter(&input(json!({"OPTIONAL": null})), VM_FILTER).unwrap(),
            Filter::default()
        );
    }

    #[test]
    fn single_values_and_booleans() {
        let spec = json!({"OPTIONAL": {"STRUCTURE": {"com.vmware.vcenter.folder.filter_spec": {
            "type": {"OPTIONAL": "VIRTUAL_MACHINE"},
        }}}});
        assert_eq!(
            filter(&input(spec), FOLDER_FILTER).unwrap().get("type").unwrap(),
            ["VIRTUAL_MACHINE"]
        );
        let spec = json!({"OPTIONAL": {"STRUCTURE": {"com.vmware.vcenter.host.filter_spec": {
            "standalone": {"OPTIONAL": false},
        }}}});
        assert_eq!(
            filter(&input(spec), HOST_FILTER).unwrap().get("standalone").unwrap(),
            ["false"]
        );
    }

    #[test]
    fn unknown_set_fields_are_refused() {
        let spec =
            json!({"OPTIONAL": {"STRUCTURE": {"x": {"colour": {"OPTIONAL": ["red"]}, "other": {"OPTIONAL": null}}}}});
        let e = filter(&input(spec), VM_FILTER).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("colour"), "{}", e.message);
    }

    #[test]
    fn device_lists_and_efi_boots_take_the_sdks_shapes() {
        let disks = json!([{"disk": "2000"}, {"disk": "2001"}]);
        assert_eq!(
            encode(&disks, &shapes::DISK_SUMMARY_LIST, "disks").unwrap(),
            json!([
                {"STRUCTURE": {"com.vmware.vcenter.vm.hardware.disk.summary": {"disk": "2000"}}},
                {"STRUCTURE": {"com.vmware.vcenter.vm.hardware.disk.summary": {"disk": "2001"}}},
            ])
        );
        let mut boot =
            json!({"type": "EFI", "delay": 0, "retry": false, "retry_delay": 10000, "enter_setup_mode": false});
        complete_boot(&mut boot);
        let encoded = encode(&boot, &shapes::BOOT_INFO, "boot").unwrap();
        let fields = &encoded["STRUCTURE"]["com.vmware.vcenter.vm.hardware.boot.info"];
        assert_eq!(fields["efi_legacy_boot"], json!({"OPTIONAL": false}));
        assert_eq!(fields["network_protocol"], json!({"OPTIONAL": "IPV4"}));
        let mut nic = json!({"type": "E1000E"});
        complete_nic(&mut nic);
        assert!(nic.get("upt_compatibility_enabled").is_none(), "only VMXNET3 has UPT");
    }

    #[test]
    fn unknown_operations_name_what_is_offered() {
        let e = operation_not_found("com.vmware.vcenter.host", "get");
        assert_eq!(e.kind, ErrorKind::OperationNotFound);
        assert!(e.message.contains("list"), "{}", e.message);
        let e = operation_not_found("com.vmware.nope", "get");
        assert!(e.message.contains("com.vmware.vcenter.VM"), "{}", e.message);
    }
}
