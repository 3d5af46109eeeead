//! A scale-out domain of endpoint processes, shared by the `scale_out::` tests and the
//! scale-out benchmark (`tests/scale-out-bench.sh`): one throwaway PostgreSQL server holds
//! the inventory, one folder is the datastore they all write (a shared volume's
//! stand-in), each endpoint is a host of the cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_endpoint::inventory::store::test_pg::TestPg;

use crate::process::EndpointProcess;
use crate::{edge_to, wan, write_raw_disk, write_vmx, Fill, Pki, MIGRATOR};

pub const MIB: usize = 1 << 20;

/// The seconds of a migration's lease here: a dead endpoint's migrations move on after it.
pub const LEASE_SECS: u64 = 3;

/// The transport idle timeout of the endpoints here: an edge notices a dead endpoint
/// after it (QUIC uses the smaller of both sides' values), so short here.
pub const IDLE_TIMEOUT_SECS: u64 = 3;

/// One domain's shared pieces: the database, the certificates, the datastore folder.
#[derive(Debug)]
pub struct Domain {
    pub pg: TestPg,
    pub pki: Pki,
    pub datastore: PathBuf,
    pub root: PathBuf,
    pub bin: PathBuf,
}

impl Domain {
    pub fn new(root: &Path) -> Domain {
        Domain::with_binaries(root, wan::ensure_binaries())
    }

    /// [`Self::new`] with the release binaries in `bin`, as they are: the benchmark's
    /// script builds them first, and its own executable, beside them and newer, would
    /// make `ensure_binaries` run cargo again at every domain.
    pub fn with_binaries(root: &Path, bin: PathBuf) -> Domain {
        let datastore = root.join("datastore");
        std::fs::create_dir_all(&datastore).unwrap();
        Domain {
            pg: TestPg::start(),
            pki: Pki::new(&root.join("pki")),
            datastore,
            root: root.to_owned(),
            bin,
        }
    }

    /// Starts the endpoint that is host `host` of the domain, on free loopback ports.
    pub fn endpoint(&self, host: &str) -> EndpointProcess {
        self.start(host, &self.endpoint_env(host))
    }

    /// The settings of host `host`'s endpoint, for a caller that changes some first (the
    /// benchmark's lease period, idle timeout, or a SQLite inventory instead).
    pub fn endpoint_env(&self, host: &str) -> Vec<(&'static str, String)> {
        let pki = &self.pki;
        vec![
            ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_CERT", pki.path("endpoint.pem").display().to_string()),
            ("CLOUD_ENDPOINT_KEY", pki.path("endpoint.key").display().to_string()),
            ("CLOUD_ENDPOINT_EDGE_CA", pki.path("ca.pem").display().to_string()),
            ("CLOUD_ENDPOINT_DATASTORE_DIR", self.datastore.display().to_string()),
            ("CLOUD_ENDPOINT_DATABASE_URL", self.pg.url.clone()),
            ("CLOUD_ENDPOINT_DOMAIN__HOST__NAME", host.to_owned()),
            ("CLOUD_ENDPOINT_MIGRATION_LEASE_SECS", LEASE_SECS.to_string()),
            (
                "CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS",
                IDLE_TIMEOUT_SECS.to_string(),
            ),
        ]
    }

    /// Starts host `host`'s endpoint with `env` (from [`Self::endpoint_env`]), in its own
    /// folder under the domain's root.
    pub fn start(&self, host: &str, env: &[(&str, String)]) -> EndpointProcess {
        let dir = self.root.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        EndpointProcess::serve(&self.bin, &dir, None, env)
    }

    /// The inventory as the endpoints keep it, read directly.
    pub fn inventory(&self) -> cloud_endpoint::inventory::Inventory {
        let mut domain = cloud_endpoint::config::DomainConfig::default();
        domain.host.name = "reader".into();
        cloud_endpoint::inventory::Inventory::open_postgres(&self.pg.url, &domain).unwrap()
    }

    /// What is left under the datastore's `.staging`.
    pub fn staging_left(&self) -> Vec<String> {
        std::fs::read_dir(self.datastore.join(".staging"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// CPU time the domain's PostgreSQL server used so far: the postmaster, the backends
    /// it reaped, and those still running (every endpoint's pooled connections).
    pub fn database_cpu(&self) -> Duration {
        let dir = self
            .pg
            .url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("host="))
            .expect("the test server's URL names its socket folder");
        postgres_cpu(&Path::new(dir).join("data"))
    }
}

/// A VM of one raw disk of `mib` MiB of random bytes, named `name`, under `dir`.
pub fn vm(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let disk = format!("{name}.img");
    write_raw_disk(&dir.join(&disk), MIB, &vec![Fill::Random; mib], seed);
    write_vmx(dir, name, &[&disk], &[])
}

/// (utime + stime, cutime + cstime, parent pid) of process `pid` in clock ticks, from
/// /proc/PID/stat; `None` once it is gone.
pub fn proc_ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces:
    // ppid is field 4 of the line (2 after the name), utime..cstime fields 14-17.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .take(15)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Some((f[10] + f[11], f[12] + f[13], u32::try_from(f[0]).ok()?))
}

/// Linux reports CPU times to user space in ticks of 1/100 s.
pub fn ticks(t: u64) -> Duration {
    Duration::from_millis(t * 10)
}

/// CPU time of the PostgreSQL server whose data folder is `data` (its postmaster.pid
/// names the postmaster): its own, its reaped children's, and its live children's.
pub fn postgres_cpu(data: &Path) -> Duration {
    let Some(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    else {
        return Duration::ZERO;
    };
    let Some((own, reaped, _)) = proc_ticks(pid) else {
        return Duration::ZERO;
    };
    let live: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_ticks)
        .filter(|(_, _, ppid)| *ppid == pid)
        .map(|(t, _, _)| t)
        .sum();
    ticks(own + reaped + live)
}

impl Domain {
    /// `edge-agent migrate --json` of `vmx` to the domain through `endpoints` (the first
    /// tried first), its checkpoint under `dir/state` and its receipt in `dir`.
    pub fn migrate(&self, dir: &Path, vmx: &Path, endpoints: &[std::net::SocketAddr]) -> std::process::Command {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("quic://{e}")).collect();
        let mut cmd = edge_to(&self.bin, &self.pki, &urls, MIGRATOR, "migrate");
        cmd.arg("--vmx")
            .arg(vmx)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--receipt")
            .arg(dir.join("receipt.json"))
            .arg("--json")
            .env_remove("EDGE_AGENT_LOG_FORMAT")
            .stdin(std::process::Stdio::null());
        cmd
    }
}
