//! `com.vmware.vcenter.vm.power` (get, start, stop, reset) and the guest console, over
//! the host runtime (`crate::hosts`).
//!
//! Power operations and the console need a role that may operate VMs (Administrator,
//! MigrationOperator): a console shows what the guest prints, secrets included, so
//! ReadOnly users see the power state only, as vSphere's VirtualMachine.Interact
//! privileges do.
//!
//! In a scale-out domain the endpoint of the VM's host serves both; any other endpoint
//! forwards to it (`crate::hosts::peers`), after checking the role here.

use std::sync::Arc;

use serde::Serialize;

use super::not_found;
use crate::api::error::{ApiError, ErrorKind};
use crate::config::Role;
use crate::hosts::{Hosts, PowerOp};
use crate::inventory::Principal;
use crate::Domain;

/// Console bytes answered when the request names no count.
pub const DEFAULT_CONSOLE_BYTES: u64 = 64 << 10;
/// The most console bytes one request may ask for.
pub const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// `GET /api/vcenter/vm/{vm}/power`.
#[derive(Debug, Clone, Serialize)]
pub struct PowerInfo {
    pub state: String,
}

/// What `POST .../power?action=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Reset,
}

impl Action {
    pub fn parse(action: &str) -> Result<Action, ApiError> {
        match action {
            "start" => Ok(Action::Start),
            "stop" => Ok(Action::Stop),
            "reset" => Ok(Action::Reset),
            "suspend" => Err(ApiError::invalid_argument(
                "the cloud hosts cannot suspend VMs; use action=stop",
            )),
            other => Err(ApiError::invalid_argument(format!(
                "power action {other:?} is not one of start, stop, reset"
            ))),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Start => "power on",
            Action::Stop => "power off",
            Action::Reset => "reset",
        }
    }

    pub fn op(self) -> PowerOp {
        match self {
            Action::Start => PowerOp::On,
            Action::Stop => PowerOp::Off,
            Action::Reset => PowerOp::Reset,
        }
    }
}

pub fn get(domain: &Domain, id: &str) -> Result<PowerInfo, ApiError> {
    let vm = domain.inventory.vm(id)?.ok_or_else(|| not_found("VM", id))?;
    Ok(PowerInfo { state: vm.power_state })
}

pub fn may_operate(principal: &Principal, what: &str) -> Result<(), ApiError> {
    match principal.role {
        Role::Administrator | Role::MigrationOperator => Ok(()),
        Role::ReadOnly => Err(ApiError::new(
            ErrorKind::Unauthorized,
            format!(
                "user {} has role {}, which may not {what}; ask a MigrationOperator or Administrator",
                principal.user,
                principal.role.as_str()
            ),
        )),
    }
}

/// Starts, stops or resets VM `id`; returns when it is done.
pub async fn change(domain: &Arc<Domain>, principal: &Principal, id: &str, action: Action) -> Result<(), ApiError> {
    may_operate(principal, &format!("{} VMs", action.verb()))?;
    tracing::info!(vm = ?id, user = ?principal.user, action = action.verb(), "power operation");
    Hosts::power(domain, id, action.op(), &format!("user {}", principal.user)).await?;
    Ok(())
}

/// The number of console bytes a `?bytes=` asks for.
pub fn console_bytes(query: Option<&str>) -> Result<u64, ApiError> {
    let mut bytes = DEFAULT_CONSOLE_BYTES;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != "bytes" {
            return Err(ApiError::invalid_argument(format!(
                "the console takes only ?bytes=N, not {key:?}"
            )));
        }
        bytes = value
            .parse()
            .ok()
            .filter(|n| (1..=MAX_CONSOLE_BYTES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_argument(format!(
                    "bytes={value} is not a number from 1 to {MAX_CONSOLE_BYTES} (1 MiB)"
                ))
            })?;
    }
    Ok(bytes)
}

/// The last `bytes` of the VM's serial console from its current or last power on on its
/// host; empty if it never ran there.
pub async fn console(domain: &Arc<Domain>, principal: &Principal, id: &str, bytes: u64) -> Result<Vec<u8>, ApiError> {
    may_operate(principal, "read VM consoles")?;
    Ok(Hosts::console(domain, id, bytes, &format!("user {}", principal.user)).await?)
}

/// The last `bytes` of a console log; nothing if there is none yet.
pub fn tail(path: &std::path::Path, bytes: u64) -> Result<Vec<u8>, ApiError> {
    crate::hosts::tail(path, bytes).map_err(|e| ApiError::internal("the console log cannot be read", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_and_console_sizes_are_checked() {
        assert_eq!(Action::parse("start").unwrap(), Action::Start);
        assert_eq!(Action::parse("suspend").unwrap_err().kind, ErrorKind::InvalidArgument);
        assert_eq!(Action::parse("START").unwrap_err().kind, ErrorKind::InvalidArgument);
        assert_eq!(console_bytes(None).unwrap(), DEFAULT_CONSOLE_BYTES);
        assert_eq!(console_bytes(Some("bytes=10")).unwrap(), 10);
        for bad in ["bytes=0", "bytes=1048577", "bytes=x", "lines=5"] {
            assert!(console_bytes(Some(bad)).is_err(), "{bad}");
        }
    }
}
