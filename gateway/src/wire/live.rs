//! Live migration on the wire: a running VM's disks and memory cross while it runs.
//!
//! A live migration has its own connection. Its first bidirectional stream is a
//! [`StreamKind::Live`](super::StreamKind::Live) control stream carrying
//! [`LiveEdgeMessage`] and [`LiveCloudMessage`] in the same length-prefixed frames as a
//! cold migration's control stream (see [`super::control`]). Once the cloud has started
//! the destination VM (`Ready`), the edge opens one
//! [`StreamKind::Tunnel`](super::StreamKind::Tunnel) bidirectional stream per connection
//! the source hypervisor makes: the storage mirror's NBD connections and the memory
//! migration stream; since protocol version 10 a tunnel is striped over
//! [`LivePlan::tunnel_lanes`] such streams ("lanes") so a long path is not capped at one
//! stream's window. Each lane starts with a [`TunnelHeader`] naming its tunnel and lane,
//! then carries [`crate::tunnel`] frames (zstd-compressed, sequence-numbered) in both
//! directions.
//!
//! The order, enforced by [`crate::protocol::live`]:
//! edge `Hello` → cloud `Welcome`; edge `Plan` (+ `BootFile` pieces) → cloud `Ready`
//! (the destination runs with `-incoming`, its disks exported); tunnels carry the mirror
//! and the memory; edge `Switchover` once the source has paused with its disks in sync →
//! cloud `Committed` once the destination runs and the VM is registered. Either side may
//! end it with `Abort`/`Refused`: the cloud tears the destination down and removes its
//! files; the edge lets the source run on.

use serde::{Deserialize, Serialize};

use super::control::RefusalCode;
use super::WireError;
use crate::plan::{MigrationPlan, MigrationReport};

/// Largest boot file (kernel or initrd) a live plan may carry.
pub const MAX_BOOT_FILE: u64 = 256 << 20;
/// Largest piece of a boot file in one control frame.
pub const BOOT_PIECE: usize = 512 * 1024;
/// Longest downtime an edge may ask for: past this the guest notices anyway.
pub const MAX_DOWNTIME_MS: u32 = 60_000;
/// Most tunnels one live migration may open (one per NBD connection and the memory stream).
pub const MAX_TUNNELS: u32 = 64;
/// Most streams one tunnel may be striped over: 40 MB of stream windows in flight
/// (150 ms at 2 Gbit/s), and a reorder buffer of at most 32 frames (8 MiB) per tunnel
/// direction on the receiver.
pub const MAX_TUNNEL_LANES: u16 = 32;

/// What the source hypervisor runs: the cold plan (identity, disks, NICs, placement,
/// firewall) plus what a running VM needs to continue elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePlan {
    pub plan: MigrationPlan,
    /// Direct kernel boot of the source (`-kernel/-initrd/-append`). The destination
    /// needs the same files: QEMU sizes its option ROMs from them, and the guest boots
    /// them again after a reboot in the cloud.
    pub boot: Option<DirectBoot>,
    /// The downtime the switchover may cost, in milliseconds (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u32,
    /// Streams each tunnel may be striped over (1..=[`MAX_TUNNEL_LANES`]): the cloud
    /// allows this many per tunnel when the destination waits. The edge sizes it from the
    /// path (see [`crate::tunnel::lanes_for`]).
    pub tunnel_lanes: u16,
}

/// Files of a direct kernel boot; their bytes follow as [`LiveEdgeMessage::BootFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectBoot {
    pub kernel: BootFile,
    pub initrd: Option<BootFile>,
    pub append: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl LivePlan {
    /// Structural limits before the cloud trusts the plan (see
    /// [`MigrationPlan::check_limits`]).
    pub fn check_limits(&self) -> Result<(), WireError> {
        self.plan.check_limits()?;
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > MAX_DOWNTIME_MS {
            return Err(WireError::BadPlan(format!(
                "downtime limit {} ms is outside 1..={MAX_DOWNTIME_MS}",
                self.downtime_limit_ms
            )));
        }
        if self.tunnel_lanes == 0 || self.tunnel_lanes > MAX_TUNNEL_LANES {
            return Err(WireError::BadPlan(format!(
                "{} streams per tunnel is outside 1..={MAX_TUNNEL_LANES}",
                self.tunnel_lanes
            )));
        }
        // Each disk's mirror connection is a tunnel, and so is the memory stream.
        if self.plan.vm.disks.len() >= MAX_TUNNELS as usize {
            return Err(WireError::BadPlan(format!(
                "{} disks: a live migration carries at most {} (one tunnel each, and one for memory); migrate this VM cold",
                self.plan.vm.disks.len(),
                MAX_TUNNELS - 1
            )));
        }
        if let Some(boot) = &self.boot {
            for f in std::iter::once(&boot.kernel).chain(boot.initrd.iter()) {
                if f.len == 0 || f.len > MAX_BOOT_FILE {
                    return Err(WireError::BadPlan(format!(
                        "boot file of {} bytes; a kernel or initrd must hold 1 byte to {MAX_BOOT_FILE}",
                        f.len
                    )));
                }
            }
            if boot.append.len() > 4096 || boot.append.chars().any(char::is_control) {
                return Err(WireError::BadPlan(
                    "the kernel command line is over 4096 bytes or has control characters".into(),
                ));
            }
        }
        Ok(())
    }

    /// Bytes of boot files that follow the plan.
    pub fn boot_bytes(&self) -> u64 {
        self.boot
            .as_ref()
            .map_or(0, |b| b.kernel.len + b.initrd.as_ref().map_or(0, |i| i.len))
    }
}

/// Edge agent to cloud endpoint, on a live migration's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveEdgeMessage {
    Hello {
        agent: String,
        user: String,
        password: String,
    },
    Plan(Box<LivePlan>),
    /// A piece of boot file `file` (0 = kernel, 1 = initrd) at `offset`; pieces come
    /// in order, right after the plan.
    BootFile {
        file: u8,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The source VM is paused, its memory has crossed and its disks are in sync with
    /// the destination's: run the destination and register it.
    Switchover,
    /// The edge gives up (the source runs on): tear the destination down.
    Abort {
        reason: String,
    },
}

/// Cloud endpoint to edge agent, on a live migration's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveCloudMessage {
    Welcome {
        endpoint: String,
        role: String,
    },
    /// The destination VM waits for the memory stream, its new disks exported for the
    /// mirror: `exports[i]` is the NBD export name of the plan's disk `i`.
    Ready {
        migration_id: String,
        exports: Vec<String>,
    },
    /// The destination runs in the cloud and is registered.
    Committed {
        vm_id: String,
        report: Box<MigrationReport>,
    },
    Refused {
        code: RefusalCode,
        problems: Vec<String>,
    },
}

/// What a tunnel stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelKind {
    /// A connection of the storage mirror to the destination's NBD server.
    Nbd,
    /// QEMU's migration stream (RAM and device state).
    Memory,
}

/// First bytes of a tunnel stream, after its preamble: which migration, what for, and
/// which lane of which tunnel it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelHeader {
    pub migration_id: String,
    pub kind: TunnelKind,
    /// The tunnel, numbered by the edge from 0 within the migration; its lanes share it.
    pub tunnel: u32,
    /// This stream's lane: frame `s` of either direction travels on lane `s % lanes`.
    pub lane: u16,
    /// Lanes of the tunnel, 1..=the plan's [`LivePlan::tunnel_lanes`].
    pub lanes: u16,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::control::{decode, encode};
    use crate::wire::Decoded;

    /// A one-disk plan for the live-migration tests here and in `protocol::live`.
    pub(crate) fn sample_plan() -> MigrationPlan {
        MigrationPlan {
            vm: crate::plan::VmSpec {
                name: "web01".into(),
                guest_os: "otherLinux64Guest".into(),
                num_cpus: 1,
                cores_per_socket: None,
                memory_mib: 256,
                firmware: None,
                bios_uuid: None,
                nics: vec![],
                controllers: vec![],
                disks: vec![crate::plan::DiskSpec {
                    key: "scsi0:0".into(),
                    capacity: 64 << 20,
                }],
            },
            network_map: vec![],
            chunk_size: crate::plan::DEFAULT_CHUNK_SIZE,
            disk_format: None,
            firewall: crate::plan::FirewallSpec::default(),
            placement: Default::default(),
            source_descriptor_sha256: Some([0x5d; 32]),
            seed: None,
        }
    }

    fn plan() -> LivePlan {
        LivePlan {
            plan: sample_plan(),
            boot: Some(DirectBoot {
                kernel: BootFile {
                    len: 10,
                    sha256: [1; 32],
                },
                initrd: None,
                append: "console=ttyS0".into(),
            }),
            downtime_limit_ms: 300,
            tunnel_lanes: 4,
        }
    }

    #[test]
    fn the_live_fuzz_seeds_are_whole_messages_of_todays_encoding() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/live_control");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let used = match name.split('-').next() {
                    Some("edge") => match decode::<LiveEdgeMessage>(rest) {
                        Ok(Decoded::Frame(_, used)) => used,
                        other => panic!("{name}: {other:?}"),
                    },
                    Some("cloud") => match decode::<LiveCloudMessage>(rest) {
                        Ok(Decoded::Frame(_, used)) => used,
                        other => panic!("{name}: {other:?}"),
                    },
                    Some("tunnel") => match decode::<TunnelHeader>(rest) {
                        Ok(Decoded::Frame(_, used)) => used,
                        other => panic!("{name}: {other:?}"),
                    },
                    _ => panic!("{name}: seeds are named edge-, cloud- or tunnel-"),
                };
                rest = &rest[used..];
            }
            seeds += 1;
        }
        assert!(seeds >= 5, "the live_control seeds are missing");
    }

    #[test]
    fn live_messages_round_trip() {
        let msgs = [
            LiveEdgeMessage::Plan(Box::new(plan())),
            LiveEdgeMessage::BootFile {
                file: 0,
                offset: 0,
                bytes: vec![7; 100],
            },
            LiveEdgeMessage::Switchover,
        ];
        for m in msgs {
            let frame = encode(&m).unwrap();
            assert_eq!(
                decode::<LiveEdgeMessage>(&frame).unwrap(),
                Decoded::Frame(m, frame.len())
            );
        }
    }

    #[test]
    fn limits_bound_downtime_and_boot_files() {
        assert!(plan().check_limits().is_ok());
        let mut p = plan();
        p.downtime_limit_ms = 0;
        assert!(p.check_limits().is_err());
        let mut p = plan();
        p.boot.as_mut().unwrap().kernel.len = MAX_BOOT_FILE + 1;
        assert!(p.check_limits().is_err());
        let mut p = plan();
        p.boot.as_mut().unwrap().append = "a\nb".into();
        assert!(p.check_limits().is_err());
        for lanes in [0, MAX_TUNNEL_LANES + 1] {
            let mut p = plan();
            p.tunnel_lanes = lanes;
            let e = p.check_limits().unwrap_err();
            assert!(e.to_string().contains("streams per tunnel"), "{e}");
        }
    }
}
