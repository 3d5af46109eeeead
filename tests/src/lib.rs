//! Shared pieces of the end-to-end tests: a PKI made at run time, a cloud
//! endpoint served in-process on a real UDP socket on 127.0.0.1, source VMs
//! written into temp dirs, and `qemu-img` to check what arrived.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use certs::{Ca, Validity};
use cloud_endpoint::config::Config;
use cloud_endpoint::{Domain, Endpoint};
use edge_agent::report::Silent;
use edge_agent::target::Target;
use gateway::transport::{Identity, ServerTrust};
use rand::{Rng, SeedableRng};

pub mod browser;
pub mod guest;
pub mod process;
pub mod python;
pub mod relay;
pub mod scale_out;
pub mod wan;

pub use cloud_endpoint::config::DEMO_PASSWORD;
pub const MIGRATOR: &str = "migrator@cloud.local";
pub const AUDITOR: &str = "auditor@cloud.local";

/// A CA with an endpoint certificate for localhost/127.0.0.1 and an edge
/// certificate, written under `dir`.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        Pki::with_endpoint_names(dir, &["localhost", "127.0.0.1"])
    }

    /// The same with the endpoint certificate issued for `names` (DNS names or addresses).
    pub fn with_endpoint_names(dir: &Path, names: &[&str]) -> Pki {
        let ca = Ca::generate("Test Gateway CA").unwrap();
        ca.write(dir).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        ca.issue_endpoint(&names, Validity::days(30))
            .unwrap()
            .write(dir, "endpoint")
            .unwrap();
        ca.issue_edge("edge-01", Validity::days(30))
            .unwrap()
            .write(dir, "edge")
            .unwrap();
        Pki {
            dir: dir.to_owned(),
            ca,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn edge_identity(&self) -> Identity {
        Identity {
            chain: certs::load_certs(&self.path("edge.pem")).unwrap(),
            key: certs::load_key(&self.path("edge.key")).unwrap(),
        }
    }

    /// The identity of another edge agent of the same CA (its own certificate, so the
    /// endpoint counts its connections apart from `edge_identity`'s).
    pub fn other_edge(&self, name: &str) -> Identity {
        let issued = self.ca.issue_edge(name, certs::Validity::days(1)).unwrap();
        Identity {
            chain: vec![issued.cert_der()],
            key: issued.key_der(),
        }
    }

    pub fn trust_ca(&self) -> ServerTrust {
        ServerTrust::Ca(vec![self.ca.cert_der()])
    }
}

/// A cloud endpoint running in this process.
#[derive(Debug)]
pub struct Cloud {
    pub addr: SocketAddr,
    /// The HTTPS API (`https://{api_addr}/api`), unless the test turned it off with
    /// `CLOUD_ENDPOINT_API_LISTEN=off`.
    pub api_addr: Option<SocketAddr>,
    /// The plain-HTTP metrics listener (`http://{metrics_addr}/metrics`), when the test
    /// set `CLOUD_ENDPOINT_METRICS__LISTEN`.
    pub metrics_addr: Option<SocketAddr>,
    pub domain: Arc<Domain>,
    pub root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cloud {
    /// Starts an endpoint with the built-in domain; `env` overrides settings
    /// as CLOUD_ENDPOINT_* variables would.
    pub async fn start(root: &Path, pki: &Pki, env: &[(&str, &str)]) -> Cloud {
        let mut vars: Vec<(String, String)> = vec![
            ("CLOUD_ENDPOINT_LISTEN".into(), "127.0.0.1:0".into()),
            ("CLOUD_ENDPOINT_API_LISTEN".into(), "127.0.0.1:0".into()),
            (
                "CLOUD_ENDPOINT_CERT".into(),
                pki.path("endpoint.pem").display().to_string(),
            ),
            (
                "CLOUD_ENDPOINT_KEY".into(),
                pki.path("endpoint.key").display().to_string(),
            ),
            (
                "CLOUD_ENDPOINT_EDGE_CA".into(),
                pki.path("ca.pem").display().to_string(),
            ),
            (
                "CLOUD_ENDPOINT_DATASTORE_DIR".into(),
                root.join("datastore").display().to_string(),
            ),
            (
                "CLOUD_ENDPOINT_DATABASE".into(),
                root.join("inventory.sqlite3").display().to_string(),
            ),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // A test's temp folder is 0700; a VM's QEMU runs as its own user when the tests
        // run as root (docs/hosts.md), and must pass through it to the datastore.
        if let Some(parent) = root.parent() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let config = Config::load_with_env(None, &vars).expect("config");
        let endpoint = Endpoint::open(config).expect("endpoint opens");
        let socket = endpoint.bind().unwrap();
        let addr = socket.local_addr().unwrap();
        let api = endpoint.bind_api().await.unwrap();
        let api_addr = api.as_ref().map(|l| l.local_addr().unwrap());
        let metrics = endpoint.bind_metrics().await.unwrap();
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
        let domain = endpoint.domain.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            endpoint
                .run_all(socket, api, metrics, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Cloud {
            addr,
            api_addr,
            metrics_addr,
            domain,
            root: root.join("datastore"),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn target(&self, pki: &Pki, user: &str, password: &str) -> Target {
        Target::single(
            self.addr,
            "localhost",
            user,
            password,
            pki.trust_ca(),
            pki.edge_identity(),
        )
    }

    /// Entries of the datastore folder, `.staging` contents included.
    pub fn datastore_entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name == ".staging" {
                for s in std::fs::read_dir(self.root.join(".staging")).unwrap() {
                    out.push(format!(".staging/{}", s.unwrap().file_name().to_string_lossy()));
                }
            } else {
                out.push(name);
            }
        }
        out.sort();
        out
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// What a region of a generated disk holds.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Random,
    Text,
    Zero,
}

/// Writes a raw disk of `regions` (each `region` bytes) into `path`; zero
/// regions are left as holes.
pub fn write_raw_disk(path: &Path, region: usize, regions: &[Fill], seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap();
    let text = b"Lorem ipsum dolor sit amet, legacy VM data 0123456789\n";
    let mut buf = vec![0u8; region];
    for (i, fill) in regions.iter().enumerate() {
        match fill {
            Fill::Random => rng.fill(&mut buf[..]),
            Fill::Text => {
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = text[(j + i) % text.len()];
                }
                // A few random bytes so compression has work to do.
                for _ in 0..64 {
                    let at = rng.random_range(0..region);
                    buf[at] = rng.random();
                }
            }
            Fill::Zero => {
                f.seek(SeekFrom::Current(region as i64)).unwrap();
                continue;
            }
        }
        f.write_all(&buf).unwrap();
    }
    f.set_len((region * regions.len()) as u64).unwrap();
}

/// A NIC line set for a .vmx.
#[derive(Debug, Clone)]
pub struct Nic<'a> {
    pub network: &'a str,
    pub mac: &'a str,
}

/// Writes `<dir>/<name>.vmx` naming `disks` (file names relative to dir) on
/// scsi0:0.. and `nics` on ethernet0..
pub fn write_vmx(dir: &Path, name: &str, disks: &[&str], nics: &[Nic<'_>]) -> PathBuf {
    let mut vmx = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"14\"\n\
         displayName = \"{name}\"\nguestOS = \"debian12-64\"\nnumvcpus = \"2\"\nmemsize = \"2048\"\n\
         firmware = \"efi\"\nuuid.bios = \"56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc\"\n\
         scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n"
    );
    for (i, d) in disks.iter().enumerate() {
        vmx.push_str(&format!(
            "scsi0:{i}.present = \"TRUE\"\nscsi0:{i}.fileName = \"{d}\"\nscsi0:{i}.deviceType = \"scsi-hardDisk\"\n"
        ));
    }
    vmx.push_str("ide1:0.present = \"TRUE\"\nide1:0.deviceType = \"cdrom-image\"\nide1:0.fileName = \"debian.iso\"\n");
    for (i, n) in nics.iter().enumerate() {
        vmx.push_str(&format!(
            "ethernet{i}.present = \"TRUE\"\nethernet{i}.virtualDev = \"vmxnet3\"\nethernet{i}.networkName = \"{}\"\n\
             ethernet{i}.addressType = \"static\"\nethernet{i}.address = \"{}\"\n",
            n.network, n.mac
        ));
    }
    let path = dir.join(format!("{name}.vmx"));
    std::fs::write(&path, vmx).unwrap();
    path
}

/// Shrinks a .vmx from [`write_vmx`] to what a test host boots quickly under TCG: 1 vCPU,
/// 64 MiB, BIOS (the boot-sector guests have no UEFI loader).
pub fn small_enough_to_boot(vmx: &Path) {
    let text = std::fs::read_to_string(vmx)
        .expect("the .vmx")
        .replace("memsize = \"2048\"", "memsize = \"64\"")
        .replace("numvcpus = \"2\"", "numvcpus = \"1\"")
        .replace("firmware = \"efi\"", "firmware = \"bios\"");
    std::fs::write(vmx, text).expect("the .vmx written");
}

/// `qemu-img compare` of two images (formats probed): true if identical.
pub fn images_identical(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img on PATH");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `qemu-img` with arguments; panics with its output on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img on PATH");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Migrates with default options and no progress output.
pub async fn migrate(
    vmx: &Path,
    target: &Target,
    opts: &edge_agent::migrate::MigrateOptions,
) -> Result<edge_agent::report::Summary, edge_agent::MigrateError> {
    let vm = edge_agent::source::open_vm(vmx)?;
    edge_agent::migrate::run(&vm, target, opts, Arc::new(Silent)).await
}

/// Runs `cmd` to its end on a blocking thread: the endpoint under test runs on the
/// runtime's threads and must go on answering meanwhile.
pub async fn run(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("the command starts"))
        .await
        .expect("the blocking task ends")
}

/// The JSON summary (the last line of standard output) of an edge-agent command run with
/// `--json`, which must have succeeded; what it printed is shown otherwise.
pub fn summary(out: impl std::borrow::Borrow<std::process::Output>) -> serde_json::Value {
    let out = out.borrow();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON summary line")
}

/// A `kB` field of this process's /proc/self/status (`VmHWM`, `VmRSS`), in KiB. The
/// endpoint runs in-process, so its memory is in these figures (beside the test's own).
pub fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `secs` seconds: the
/// endpoint records a refusal in its inventory just after it answers the edge.
pub async fn eventually<T>(secs: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `qemu-system-x86_64` (or `QEMU_SYSTEM`). A test that needs it fails without it and
/// says how to install it: a test that did not run must not pass.
pub fn require_qemu() -> gateway::qemu::QemuBinary {
    gateway::qemu::QemuBinary::from_env().unwrap_or_else(|e| {
        panic!(
            "this test boots a VM and needs qemu-system-x86_64, which is missing ({e}): run tests/setup.sh \
             (installs qemu-system-x86 from bookworm-backports, beside qemu-utils), or set QEMU_SYSTEM to the binary"
        )
    })
}

pub mod raw;
pub mod rest;

/// An `edge-agent` command line against `cloud` as the migrator, with the test PKI, a
/// state folder and a receipt in it: `args[0]` is the subcommand (`migrate`,
/// `replicate`, `switchover`, `abort`...), the rest is appended after the common options.
pub fn edge_command(
    bin: &Path,
    pki: &Pki,
    cloud: &Cloud,
    vmx: &Path,
    state: &Path,
    args: &[&str],
) -> std::process::Command {
    let mut cmd = edge_at(
        bin,
        pki,
        cloud.addr.port(),
        MIGRATOR,
        args.first().copied().unwrap_or("migrate"),
    );
    cmd.arg("--vmx")
        .arg(vmx)
        .arg("--state-dir")
        .arg(state)
        .arg("--receipt")
        .arg(state.join("receipt.json"))
        .args(&args[1.min(args.len())..]);
    cmd
}

/// [`edge_command`] with a JSON summary and chunks of `chunk_kib` KiB: the replication
/// tests' edge, whose summaries they read.
pub fn edge_json(
    bin: &Path,
    pki: &Pki,
    cloud: &Cloud,
    vmx: &Path,
    state: &Path,
    chunk_kib: &str,
    args: &[&str],
) -> std::process::Command {
    let mut all = args.to_vec();
    all.extend(["--json", "--chunk-kib", chunk_kib]);
    edge_command(bin, pki, cloud, vmx, state, &all)
}

/// `edge-agent <subcommand>` connected to the endpoint on loopback port `quic_port` as
/// `user` (the demo password), with the test PKI's CA bundle, edge certificate and key;
/// the edge's own log settings are left out so that its output is what a test expects.
pub fn edge_at(bin: &Path, pki: &Pki, quic_port: u16, user: &str, subcommand: &str) -> std::process::Command {
    edge_to(bin, pki, &[format!("quic://127.0.0.1:{quic_port}")], user, subcommand)
}

/// The same with one `--url` per item of `urls`: a target of several endpoints.
pub fn edge_to(bin: &Path, pki: &Pki, urls: &[String], user: &str, subcommand: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin.join("edge-agent"));
    cmd.arg(subcommand);
    for url in urls {
        cmd.arg("--url").arg(url);
    }
    cmd.arg("--user")
        .arg(user)
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("edge.pem"))
        .arg("--key")
        .arg(pki.path("edge.key"))
        .env("EDGE_AGENT_PASSWORD", DEMO_PASSWORD)
        .env_remove("EDGE_AGENT_LOG");
    cmd
}

/// After a lift run with [`edge_command`]: the receipt it wrote into `state` verifies
/// against the source `vmx` under the test CA (`edge-agent verify-receipt`), and nothing
/// else is left in `state` (no checkpoint of a finished migration).
pub fn assert_receipt_verifies_and_no_checkpoint_left(bin: &Path, pki: &Pki, vmx: &Path, state: &Path) {
    let verify = std::process::Command::new(bin.join("edge-agent"))
        .arg("verify-receipt")
        .arg("--receipt")
        .arg(state.join("receipt.json"))
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .arg(vmx)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let left: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "receipt.json")
        .collect();
    assert!(left.is_empty(), "no checkpoint left: {left:?}");
}

/// `field` of /proc/PID/status (`Uid`, `Seccomp`), its first value.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .to_owned()
}

/// A progress sink that remembers the last progress report and what the edge said while
/// it waited (a failover, a busy endpoint): what a failover test asserts on.
#[derive(Debug, Default)]
pub struct Watch {
    pub last: std::sync::Mutex<Option<edge_agent::report::Progress>>,
    pub said: std::sync::Mutex<Vec<String>>,
}

impl edge_agent::report::ProgressSink for Watch {
    fn started(&self, _: &str, _: &str, _: u64) {}
    fn progress(&self, p: &edge_agent::report::Progress) {
        *self.last.lock().unwrap() = Some(p.clone());
    }
    fn waiting(&self, why: &str) {
        self.said.lock().unwrap().push(why.to_owned());
    }
}

impl Watch {
    /// The bytes done as last reported.
    pub fn done(&self) -> u64 {
        self.last.lock().unwrap().as_ref().map_or(0, |p| p.done_bytes)
    }

    /// Waits until the edge reports `bytes` done (a point mid-transfer to cut something
    /// at); panics after `within` without it. Returns the bytes done then.
    pub async fn until_done(&self, bytes: u64, within: std::time::Duration) -> u64 {
        let t0 = std::time::Instant::now();
        while self.done() < bytes {
            assert!(
                t0.elapsed() < within,
                "no progress: {} of {bytes} bytes after {within:?}",
                self.done()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.done()
    }
}

/// Kills `child` (SIGKILL: a crash, nothing flushed) and reaps it.
pub fn kill_now(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}
