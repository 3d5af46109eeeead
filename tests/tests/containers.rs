//! The gateway in containers: both images built from the release binaries
//! (`deploy/build-images.sh`, no registry), the compose deployment of `deploy/compose.yaml`
//! (an endpoint on the cloud network, an edge on the on-prem and cloud networks), and a
//! lift between the containers that survives the endpoint container being killed
//! (`docker kill`) or stopped (`docker stop`: SIGTERM, drain, exit 0 within the grace
//! period) in the middle, the copy compared with `qemu-img compare` each time.
//!
//! A Docker engine and docker-compose are required. Where there is none the tests fail
//! and say why; `GATEWAY_SKIP_CONTAINERS=1 tests/run.sh` leaves them out, and says so, on a machine
//! that cannot run containers (CI never sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use e2e::*;

const MIB: usize = 1 << 20;
/// The source disk: incompressible, so the edge's rate cap makes the lift last.
const DISK_MIB: usize = 12;
/// About 1 MiB/s on the wire: the 12 MiB lift takes ~12 s, time to break it.
const EDGE_RATE: &str = "8mbit";
const ENDPOINT_IMAGE: &str = "gateway/cloud-endpoint:latest";

/// Panics with the reason when there is no engine: a test that did not run must not
/// count as passed. `tests/run.sh` leaves this file out, and says so, when
/// GATEWAY_SKIP_CONTAINERS=1 (a developer's machine without Docker; never in CI).
fn require_engine() {
    let missing = if !command_ok("docker", &["version", "--format", "{{.Server.Version}}"]) {
        Some("no Docker engine answers `docker version` (install docker.io and start dockerd)")
    } else if !command_ok("docker-compose", &["version"]) {
        Some("no docker-compose (Debian: apt-get install docker-compose)")
    } else {
        None
    };
    if let Some(why) = missing {
        panic!(
            "the container tests need a Docker engine: {why}; run `GATEWAY_SKIP_CONTAINERS=1 tests/run.sh` to leave \
             them out on this machine"
        );
    }
}

fn command_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the images once per test process (the script takes a lock of its own, so
/// test processes at once build them one after the other; the base is built once per
/// machine).
fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bin = wan::ensure_binaries();
        let t0 = Instant::now();
        let out = run(Command::new(workspace().join("deploy/build-images.sh")).env("GATEWAY_BIN", &bin));
        eprintln!(
            "images built in {:.1} s:\n{}",
            t0.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
        );
    });
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).trim().to_owned()
}

/// One compose project: its own containers, networks and volumes, all removed on drop.
struct Deployment {
    project: String,
    work: tempfile::TempDir,
}

impl Deployment {
    /// Certificates (the endpoint's named `cloud-endpoint`, as the edge calls it) and a
    /// VM `web01` with an incompressible `DISK_MIB` disk, handed to the containers' user.
    fn new(tag: &str) -> Deployment {
        let work = tempfile::tempdir().unwrap();
        let project = format!("gwtest-{tag}-{}", std::process::id());
        Pki::with_endpoint_names(&work.path().join("pki"), &["cloud-endpoint"]);
        let dir = work.path().join("onprem/web01");
        std::fs::create_dir_all(&dir).unwrap();
        let regions: Vec<Fill> = (0..DISK_MIB)
            .map(|i| if i % 6 == 5 { Fill::Zero } else { Fill::Random })
            .collect();
        write_raw_disk(&dir.join("web01.img"), MIB, &regions, 17);
        // On the network the compose file's edge maps (Prod-DMZ=cloud-web).
        let nic = Nic {
            network: "Prod-DMZ",
            mac: "00:50:56:3f:00:01",
        };
        write_vmx(&dir, "web01", &["web01.img"], &[nic]);
        run(Command::new("chown").args(["-R", "10001:10001"]).arg(work.path()));
        Deployment { project, work }
    }

    fn compose(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.project, "-f"])
            .arg(workspace().join("deploy/compose.yaml"))
            .env("GATEWAY_DEPLOY_DIR", self.work.path())
            // A port of its own on the host: tests at once do not meet.
            .env("GATEWAY_API_PUBLISH", "127.0.0.1:")
            // A killed endpoint says nothing: the edge finds it gone after the idle
            // timeout, 30 s by default; 5 s is plenty on one machine's bridge.
            .env("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "5");
        cmd
    }

    fn endpoint_container(&self) -> String {
        stdout(self.compose().args(["ps", "-q", "cloud-endpoint"]))
    }

    /// Starts the endpoint and waits until its healthcheck (`/readyz`) passes.
    fn up_endpoint(&self) -> String {
        run(self.compose().args(["up", "-d", "cloud-endpoint"]));
        let id = self.endpoint_container();
        self.wait_healthy(&id);
        id
    }

    fn wait_healthy(&self, id: &str) {
        let t0 = Instant::now();
        loop {
            let health = stdout(Command::new("docker").args(["inspect", "-f", "{{.State.Health.Status}}", id]));
            if health == "healthy" {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the endpoint is not healthy after 60 s ({health}):\n{}",
                self.logs(id)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts the edge's lift of web01, capped at `rate`, in the background; returns its container.
    fn start_lift(&self, rate: &str) -> String {
        let name = format!("{}-edge", self.project);
        run(self.compose().args([
            "run",
            "-d",
            "--no-deps",
            "--name",
            &name,
            "edge-agent",
            "migrate",
            "--vmx=/onprem/web01/web01.vmx",
            "--receipt=/onprem/web01.receipt.json",
            "--map-network=Prod-DMZ=cloud-web",
            "--json",
            &format!("--max-rate={rate}"),
        ]));
        name
    }

    fn logs(&self, container: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", container])
            .output()
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Bytes the edge reported durable at the cloud (its last JSON progress line).
    fn lifted_bytes(&self, edge: &str) -> u64 {
        let out = Command::new("docker")
            .args(["logs", edge])
            .output()
            .expect("docker logs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "progress")
            .filter_map(|v| v["done_bytes"].as_u64())
            .next_back()
            .unwrap_or(0)
    }

    fn wait_lifted(&self, edge: &str, bytes: u64) {
        let t0 = Instant::now();
        while self.lifted_bytes(edge) < bytes {
            let running = stdout(Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", edge]));
            assert_eq!(running, "true", "the edge ended early:\n{}", self.logs(edge));
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the lift did not reach {bytes} bytes:\n{}",
                self.logs(edge)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the edge to exit; returns its summary line, panicking unless it succeeded.
    fn wait_edge(&self, edge: &str) -> serde_json::Value {
        let code = stdout(Command::new("timeout").args(["180", "docker", "wait", edge]));
        let logs = self.logs(edge);
        assert_eq!(code, "0", "the edge failed:\n{logs}");
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "summary")
            .unwrap_or_else(|| panic!("no summary from the edge:\n{logs}"))
    }

    /// `qemu-img compare` of the source and the copy in the endpoint's datastore volume,
    /// run in the endpoint's image (as its user, who owns the copy).
    fn assert_copy_identical(&self) {
        let endpoint = self.endpoint_container();
        let volume = stdout(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .Mounts}}{{if eq .Destination \"/var/lib/gateway/datastore\"}}{{.Name}}{{end}}{{end}}",
            &endpoint,
        ]));
        let out = stdout(
            Command::new("docker")
                .args(["run", "--rm", "--network", "none", "--entrypoint", "qemu-img", "-v"])
                .arg(format!("{volume}:/ds:ro"))
                .arg("-v")
                .arg(format!("{}:/onprem:ro", self.work.path().join("onprem").display()))
                .args([
                    ENDPOINT_IMAGE,
                    "compare",
                    "/onprem/web01/web01.img",
                    "/ds/web01/web01.vmdk",
                ]),
        );
        assert!(out.contains("Images are identical"), "{out}");
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &format!("{}-edge", self.project)])
            .output();
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "1"])
            .output();
    }
}

#[test]
fn the_compose_deployment_lifts_a_vm_between_containers() {
    require_engine();
    images();
    let d = Deployment::new("lift");
    // `up` as the README gives it: the edge waits for the endpoint's healthcheck, then lifts.
    run(d.compose().args(["up", "-d"]));
    let edge = stdout(d.compose().args(["ps", "-q", "edge-agent"]));
    let code = stdout(Command::new("timeout").args(["180", "docker", "wait", &edge]));
    assert_eq!(code, "0", "the edge failed:\n{}", d.logs(&edge));
    d.assert_copy_identical();
    // The endpoint's probes, from inside its container (no session needed).
    let endpoint = d.endpoint_container();
    let ready = stdout(Command::new("docker").args([
        "exec",
        &endpoint,
        "curl",
        "-sS",
        "--insecure",
        "https://127.0.0.1:8443/readyz",
    ]));
    assert_eq!(ready, r#"{"status":"ready"}"#);
    // The edge reaches the endpoint over the cloud network only: the endpoint is not on
    // the on-prem network.
    let networks = stdout(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range $n, $_ := .NetworkSettings.Networks}}{{$n}} {{end}}",
        &endpoint,
    ]));
    assert!(
        networks.contains("_cloud") && !networks.contains("_onprem"),
        "{networks}"
    );
}

#[test]
fn a_killed_endpoint_container_is_started_again_and_the_lift_resumes() {
    require_engine();
    images();
    let d = Deployment::new("kill");
    let endpoint = d.up_endpoint();
    let edge = d.start_lift(EDGE_RATE);
    d.wait_lifted(&edge, (DISK_MIB * MIB / 4) as u64);
    run(Command::new("docker").args(["kill", &endpoint]));
    std::thread::sleep(Duration::from_secs(1));
    run(Command::new("docker").args(["start", &endpoint]));
    d.wait_healthy(&endpoint);
    let summary = d.wait_edge(&edge);
    assert!(
        summary["reconnects"].as_u64() >= Some(1),
        "the lift did not resume over a new connection: {summary}"
    );
    d.assert_copy_identical();
}

#[test]
fn a_stopped_endpoint_container_drains_then_the_lift_resumes() {
    require_engine();
    images();
    let d = Deployment::new("stop");
    let endpoint = d.up_endpoint();
    let edge = d.start_lift(EDGE_RATE);
    d.wait_lifted(&edge, (DISK_MIB * MIB / 4) as u64);
    let t0 = Instant::now();
    // docker's own 10 s before SIGKILL: the drain must end well inside it.
    run(Command::new("docker").args(["stop", "-t", "10", &endpoint]));
    let stopped_in = t0.elapsed();
    let exit = stdout(Command::new("docker").args(["inspect", "-f", "{{.State.ExitCode}}", &endpoint]));
    let logs = d.logs(&endpoint);
    assert_eq!(exit, "0", "the endpoint did not exit cleanly on SIGTERM:\n{logs}");
    assert!(
        stopped_in < Duration::from_secs(9),
        "the drain took {stopped_in:?}:\n{logs}"
    );
    assert!(logs.contains("drained"), "no drain in the endpoint's log:\n{logs}");
    assert!(
        logs.contains("kept for a resume"),
        "the migration was not kept for a resume:\n{logs}"
    );
    eprintln!("docker stop took {:.2} s", stopped_in.as_secs_f64());
    run(Command::new("docker").args(["start", &endpoint]));
    d.wait_healthy(&endpoint);
    let summary = d.wait_edge(&edge);
    assert!(
        summary["reconnects"].as_u64() >= Some(1),
        "the lift did not resume over a new connection: {summary}"
    );
    d.assert_copy_identical();
}

/// The scale-out deployment of `deploy/compose.scale-out.yaml` in a compose project of its
/// own: PostgreSQL (`gateway/postgres`) and the endpoints esx-a, esx-b and esx-c on one
/// inventory and one datastore volume, every port published on a free loopback port.
/// Removed, volumes and all, on drop.
struct ScaleOut {
    project: String,
    work: tempfile::TempDir,
    pki: Pki,
    db_password: String,
}

const SCALE_OUT_HOSTS: [&str; 3] = ["esx-a", "esx-b", "esx-c"];
/// The scale-out test's source disk: small, the lift is not what it measures.
const SCALE_OUT_DISK_MIB: usize = 4;

impl ScaleOut {
    /// One endpoint certificate for the three names (as the edge and the other
    /// containers call them) and 127.0.0.1 (as the test calls their published APIs);
    /// a VM `web01`.
    fn new() -> ScaleOut {
        let work = tempfile::tempdir().unwrap();
        let project = format!("gwtest-scale-{}", std::process::id());
        let pki = Pki::with_endpoint_names(&work.path().join("pki"), &["esx-a", "esx-b", "esx-c", "127.0.0.1"]);
        let dir = work.path().join("onprem/web01");
        std::fs::create_dir_all(&dir).unwrap();
        let regions: Vec<Fill> = (0..SCALE_OUT_DISK_MIB)
            .map(|i| if i % 4 == 3 { Fill::Zero } else { Fill::Random })
            .collect();
        write_raw_disk(&dir.join("web01.img"), MIB, &regions, 29);
        let nic = Nic {
            network: "Prod-DMZ",
            mac: "00:50:56:3f:00:02",
        };
        write_vmx(&dir, "web01", &["web01.img"], &[nic]);
        run(Command::new("chown").args(["-R", "10001:10001"]).arg(work.path()));
        let db_password = format!("{:032x}", rand::random::<u128>());
        ScaleOut {
            project,
            work,
            pki,
            db_password,
        }
    }

    fn compose(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.project, "-f"])
            .arg(workspace().join("deploy/compose.scale-out.yaml"))
            .env("GATEWAY_DEPLOY_DIR", self.work.path())
            .env("GATEWAY_DB_PASSWORD", &self.db_password);
        for host in SCALE_OUT_HOSTS {
            let prefix = host.replace('-', "_").to_uppercase();
            cmd.env(format!("{prefix}_QUIC_PUBLISH"), "127.0.0.1:")
                .env(format!("{prefix}_API_PUBLISH"), "127.0.0.1:");
        }
        cmd
    }

    fn container(&self, service: &str) -> String {
        let id = stdout(self.compose().args(["ps", "-q", service]));
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// `https://127.0.0.1:PORT`: where `service`'s API is published on the host.
    fn api_base(&self, service: &str) -> String {
        let published = stdout(self.compose().args(["port", service, "8443"]));
        format!("https://{published}")
    }
}

impl Drop for ScaleOut {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &format!("{}-edge", self.project)])
            .output();
        let _ = self
            .compose()
            .args(["--profile", "edge", "down", "-v", "--remove-orphans", "-t", "1"])
            .output();
    }
}

fn container_logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .expect("docker logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits (60 s at most) until `container`'s healthcheck passes.
fn wait_container_healthy(container: &str) {
    let t0 = Instant::now();
    loop {
        let health = stdout(Command::new("docker").args(["inspect", "-f", "{{.State.Health.Status}}", container]));
        if health == "healthy" {
            return;
        }
        let state = stdout(Command::new("docker").args(["inspect", "-f", "{{.State.Status}}", container]));
        assert!(
            state != "exited" && t0.elapsed() < Duration::from_secs(60),
            "{container} is not healthy ({state}, {health} after {:.0} s):\n{}",
            t0.elapsed().as_secs_f64(),
            container_logs(container)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_scale_out_deployment_shows_one_lift_through_every_endpoint() {
    require_engine();
    images();
    let s = ScaleOut::new();
    let t0 = Instant::now();
    run(s.compose().args(["up", "-d"]));
    for service in ["postgres"].into_iter().chain(SCALE_OUT_HOSTS) {
        wait_container_healthy(&s.container(service));
    }
    let up_in = t0.elapsed();

    // The real edge agent, in its container on the cloud network, lifts web01 through esx-a.
    let edge = format!("{}-edge", s.project);
    run(s.compose().args([
        "run",
        "-d",
        "--no-deps",
        "--name",
        &edge,
        "edge-agent",
        "migrate",
        "--vmx=/onprem/web01/web01.vmx",
        "--receipt=/onprem/web01.receipt.json",
        "--map-network=Prod-DMZ=cloud-web",
        "--json",
    ]));
    let code = stdout(Command::new("timeout").args(["180", "docker", "wait", &edge]));
    let edge_logs = container_logs(&edge);
    assert_eq!(code, "0", "the edge failed:\n{edge_logs}");
    let summary = edge_logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary from the edge:\n{edge_logs}"));
    let vm_id = summary["vm_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no vm_id in the summary: {summary}"))
        .to_owned();

    // Every endpoint's API: the same VM with the same disks, and the cluster's three hosts.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut views = Vec::new();
    for service in SCALE_OUT_HOSTS {
        let api = rest::Rest::at(&s.api_base(service), &s.pki);
        let view = runtime.block_on(async {
            let token = api.token(MIGRATOR).await;
            let vms = api.json("/api/vcenter/vm", &token).await;
            let vm = api.json(&format!("/api/vcenter/vm/{vm_id}"), &token).await;
            let hosts = api.json("/api/vcenter/host", &token).await;
            let clusters = api.json("/api/vcenter/cluster", &token).await;
            (vms, vm, hosts, clusters)
        });
        let (vms, vm, hosts, clusters) = &view;
        let web01: Vec<_> = vms
            .as_array()
            .unwrap_or_else(|| panic!("{vms}"))
            .iter()
            .filter(|v| v["name"] == "web01")
            .collect();
        assert_eq!(web01.len(), 1, "{service} does not list web01 once: {vms}");
        assert_eq!(
            web01[0]["vm"],
            vm_id.as_str(),
            "{service} lists web01 under another id: {vms}"
        );
        let disks = vm["disks"].as_object().unwrap_or_else(|| panic!("{service}: {vm}"));
        assert_eq!(disks.len(), 1, "{service}: {vm}");
        let disk = disks.values().next().unwrap();
        assert_eq!(disk["capacity"], (SCALE_OUT_DISK_MIB * MIB) as u64, "{service}: {vm}");
        let mut names: Vec<&str> = hosts
            .as_array()
            .unwrap_or_else(|| panic!("{hosts}"))
            .iter()
            .filter_map(|h| h["name"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, SCALE_OUT_HOSTS, "{service}'s cluster: {hosts}");
        assert_eq!(
            clusters.as_array().map(Vec::len),
            Some(1),
            "{service}: one cluster: {clusters}"
        );
        views.push((service, view));
    }
    let (_, first) = &views[0];
    for (service, view) in &views[1..] {
        assert_eq!(view.1, first.1, "{service} shows {vm_id} apart from esx-a");
        assert_eq!(view.2, first.2, "{service} shows other hosts than esx-a");
    }

    // The copy, read through esx-c's mount of the shared datastore volume.
    let volume = stdout(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .Mounts}}{{if eq .Destination \"/var/lib/gateway/datastore\"}}{{.Name}}{{end}}{{end}}",
        &s.container("esx-c"),
    ]));
    let disk = first.1["disks"]
        .as_object()
        .and_then(|disks| disks.values().next())
        .and_then(|disk| disk["backing"]["vmdk_file"].as_str())
        .unwrap_or_else(|| panic!("no disk file in {}", first.1));
    let relative = disk
        .split_once("] ")
        .unwrap_or_else(|| panic!("not a datastore path: {disk}"))
        .1;
    let out = stdout(
        Command::new("docker")
            .args(["run", "--rm", "--network", "none", "--entrypoint", "qemu-img", "-v"])
            .arg(format!("{volume}:/ds:ro"))
            .arg("-v")
            .arg(format!("{}:/onprem:ro", s.work.path().join("onprem").display()))
            .args([ENDPOINT_IMAGE, "compare", "/onprem/web01/web01.img"])
            .arg(format!("/ds/{relative}")),
    );
    assert!(out.contains("Images are identical"), "{out}");
    eprintln!(
        "scale-out: up and healthy in {:.1} s, the whole test {:.1} s so far",
        up_in.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
