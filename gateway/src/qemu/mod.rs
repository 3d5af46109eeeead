//! QEMU as the hypervisor of the cloud domain's hosts, and later of live migration.
//!
//! ```text
//! confine   the sandbox and the unprivileged user a QEMU process runs with
//! machine   MachineSpec: a VM's devices, and the QEMU command line built from them
//! qmp       an async QMP client (the JSON control protocol over a unix socket)
//! process   starting, attaching to, watching and stopping one QEMU process
//! vm        a plan's VM as a MachineSpec: the one mapping source, destination and host share
//! ```
//!
//! The pieces are shared: cloud-endpoint runs powered-on VMs with them, and a live
//! migration will start its destination from the same [`MachineSpec`] as its source.

pub mod confine;
mod error;
pub mod firmware;
pub mod machine;
pub mod process;
pub mod qmp;
pub mod vm;

pub use confine::{Confinement, RunAs};
pub use error::QemuError;
pub use firmware::Ovmf;
pub use machine::{
    ControllerModel, DirectKernel, DiskAttachment, DiskFormat, Firmware, MachineController, MachineDisk, MachineNic,
    MachineSpec, NicBackend,
};
pub use process::{QemuBinary, QemuProcess};
pub use qmp::{Qmp, QmpEvent};
