//! `com.vmware.vcenter.vm.hardware` and `vm.guest.Identity`: a VM's devices one resource
//! at a time. Each answer is a part of the VM's [`VmInfo`], so the two views cannot
//! disagree; only the lists (`{"disk": "2000"}`, `{"nic": "4000"}`) are shaped here.

use serde::Serialize;

use super::vm::{self, Boot, Cpu, Disk, Hardware, Memory, Nic, VmInfo};
use crate::api::error::{ApiError, ErrorKind};
use crate::Domain;

/// `GET /api/vcenter/vm/{vm}/hardware/disk`: one item per virtual disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    pub disk: String,
}

/// `GET /api/vcenter/vm/{vm}/hardware/ethernet`: one item per NIC.
#[derive(Debug, Clone, Serialize)]
pub struct NicSummary {
    pub nic: String,
}

fn info(domain: &Domain, vm: &str) -> Result<VmInfo, ApiError> {
    vm::get(domain, vm)
}

pub fn hardware(domain: &Domain, vm: &str) -> Result<Hardware, ApiError> {
    Ok(info(domain, vm)?.hardware)
}

pub fn cpu(domain: &Domain, vm: &str) -> Result<Cpu, ApiError> {
    Ok(info(domain, vm)?.cpu)
}

pub fn memory(domain: &Domain, vm: &str) -> Result<Memory, ApiError> {
    Ok(info(domain, vm)?.memory)
}

pub fn boot(domain: &Domain, vm: &str) -> Result<Boot, ApiError> {
    Ok(info(domain, vm)?.boot)
}

pub fn list_disks(domain: &Domain, vm: &str) -> Result<Vec<DiskSummary>, ApiError> {
    Ok(info(domain, vm)?
        .disks
        .into_keys()
        .map(|disk| DiskSummary { disk })
        .collect())
}

pub fn get_disk(domain: &Domain, vm: &str, disk: &str) -> Result<Disk, ApiError> {
    info(domain, vm)?
        .disks
        .remove(disk)
        .ok_or_else(|| device_not_found("virtual disk", disk, vm))
}

pub fn list_nics(domain: &Domain, vm: &str) -> Result<Vec<NicSummary>, ApiError> {
    Ok(info(domain, vm)?
        .nics
        .into_keys()
        .map(|nic| NicSummary { nic })
        .collect())
}

pub fn get_nic(domain: &Domain, vm: &str, nic: &str) -> Result<Nic, ApiError> {
    info(domain, vm)?
        .nics
        .remove(nic)
        .ok_or_else(|| device_not_found("virtual Ethernet adapter", nic, vm))
}

/// `GET /api/vcenter/vm/{vm}/guest/identity`. vCenter reads the guest's identity (host
/// name, IP address, OS as the guest reports it) from VMware Tools, and answers
/// SERVICE_UNAVAILABLE while Tools is not running or has told nothing. The cloud host
/// runs no Tools and no guest agent, so that is every VM's answer here: the identity
/// requires a host name only the guest knows, and a made-up one would mislead scripts.
/// What the .vmx declares is in `GET /api/vcenter/vm/{vm}` (`guest_OS`).
pub fn guest_identity(domain: &Domain, vm: &str) -> Result<(), ApiError> {
    let info = info(domain, vm)?;
    let why = if info.power_state == crate::hosts::POWERED_ON {
        "the cloud host runs no VMware Tools to ask"
    } else {
        "the VM is powered off"
    };
    Err(ApiError::new(
        ErrorKind::ServiceUnavailable,
        format!(
            "VMware Tools is not running in VM {vm} ({why}), so the guest's identity is unknown; \
             the guest OS its configuration declares is {} (GET /api/vcenter/vm/{vm})",
            info.guest_os
        ),
    ))
}

fn device_not_found(kind: &str, device: &str, vm: &str) -> ApiError {
    ApiError::not_found(format!("VM {vm} has no {kind} {device}"))
}
