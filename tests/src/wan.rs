//! An emulated WAN link for end-to-end tests: a guard around `tests/wan/wan.sh` (three
//! network namespaces, NFQUEUE delay/loss by `wan-relay`, tbf rate limit), and helpers to
//! run the real binaries on either side of it.
//!
//! ```text
//! <prefix>-onprem 10.77.1.2  <->  <prefix>-router  <->  10.77.2.2 <prefix>-cloud
//! ```
//!
//! Needs root. [`WanLink::unavailable`] says why a test cannot run (and so fails).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The on-prem side's address.
pub const ONPREM_ADDR: &str = "10.77.1.2";
/// The cloud side's address.
pub const CLOUD_ADDR: &str = "10.77.2.2";

/// One of the link's namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Onprem,
    Router,
    Cloud,
}

impl Side {
    fn suffix(self) -> &'static str {
        match self {
            Side::Onprem => "onprem",
            Side::Router => "router",
            Side::Cloud => "cloud",
        }
    }
}

/// The link's shape; each field is the `wan.sh` knob of the same name.
#[derive(Debug, Clone)]
pub struct WanConfig {
    /// Namespace prefix: unique per run, so concurrent runs never collide.
    pub prefix: String,
    /// One-way delay (RTT = 2x).
    pub delay_ms: u32,
    /// Per-packet loss probability, each direction.
    pub loss: f64,
    /// Bottleneck rate, tc syntax (`100mbit`).
    pub rate: String,
    /// Relay stats interval.
    pub stats_secs: u32,
    /// The `wan-relay` binary (`WAN_RELAY`); `None`: the script's default.
    pub relay: Option<PathBuf>,
}

impl WanConfig {
    /// A link named after this process, so parallel test binaries never share one.
    pub fn new(tag: &str, delay_ms: u32, loss: f64, rate: &str) -> WanConfig {
        WanConfig {
            prefix: format!("{tag}{}", std::process::id()),
            delay_ms,
            loss,
            rate: rate.to_owned(),
            stats_secs: 1,
            relay: None,
        }
    }
}

/// A link that is up; `Drop` tears it down (and ends every process in its namespaces).
#[derive(Debug)]
pub struct WanLink {
    pub config: WanConfig,
    state: PathBuf,
    up: bool,
}

/// `tests/wan/wan.sh` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("wan/wan.sh")
}

/// Effective uid of this process, from /proc (no libc call needed).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

impl WanLink {
    /// Why a link cannot be made here (not root, no `ip`, namespaces refused), or `None`.
    pub fn unavailable() -> Option<String> {
        if euid() != Some(0) {
            return Some("not root: the WAN link needs network namespaces, veth, tc and iptables".into());
        }
        let probe = format!("wanprobe{}", std::process::id());
        match Command::new("ip").args(["netns", "add", &probe]).output() {
            Err(e) => return Some(format!("cannot run `ip` (iproute2): {e}")),
            Ok(o) if !o.status.success() => {
                return Some(format!(
                    "network namespaces cannot be created here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Ok(_) => {}
        }
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        None
    }

    /// Brings the link up (`wan.sh up`); panics with the script's output if that fails.
    pub fn up(config: WanConfig) -> WanLink {
        let state = PathBuf::from(format!("/run/wan-{}", config.prefix));
        let mut link = WanLink {
            config,
            state,
            up: true,
        };
        let out = link.script_cmd("up").output().expect("running tests/wan/wan.sh");
        if !out.status.success() {
            link.up = false;
            panic!(
                "wan.sh up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
        link
    }

    fn script_cmd(&self, verb: &str) -> Command {
        let c = &self.config;
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .arg(verb)
            .env("WAN_PREFIX", &c.prefix)
            .env("DELAY_MS", c.delay_ms.to_string())
            .env("LOSS", c.loss.to_string())
            .env("RATE", &c.rate)
            .env("RELAY_STATS_SECS", c.stats_secs.to_string())
            .stdin(Stdio::null());
        if let Some(relay) = &c.relay {
            cmd.env("WAN_RELAY", relay);
        }
        cmd
    }

    /// Name of a namespace of this link.
    pub fn netns(&self, side: Side) -> String {
        format!("{}-{}", self.config.prefix, side.suffix())
    }

    /// `program` to be run inside `side`'s namespace (`ip netns exec`, which execs, so
    /// the child's pid is the program's).
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(self.netns(side)).arg(program);
        cmd
    }

    /// Round-trip times of `count` pings from on-prem to the cloud side, in ms.
    pub fn ping_rtts_ms(&self, count: u32) -> Vec<f64> {
        let out = self
            .command(Side::Onprem, "ping")
            .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "5", CLOUD_ADDR])
            .output()
            .expect("ping (iputils-ping)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// The log of the relay of one direction (`up`: onprem->cloud, `down`: back):
    /// a start line, then a stats line every `stats_secs`.
    pub fn relay_log(&self, direction: &str) -> String {
        std::fs::read_to_string(self.state.join(format!("relay-{direction}.log"))).unwrap_or_default()
    }

    /// `wan.sh status`: qdisc counters, NFQUEUE counters, the relays' last lines.
    pub fn status(&self) -> String {
        let out = self.script_cmd("status").output().expect("wan.sh status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Tears the link down now (also done on drop).
    pub fn down(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        match self.script_cmd("down").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("wan.sh down: {}{}", o.status, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("wan.sh down: {e}"),
        }
        // The relay logs `down` keeps for a post-mortem: a test's prefix is never reused.
        for direction in ["up", "down"] {
            let _ = std::fs::remove_file(format!("/run/wan-{}.relay-{direction}.last.log", self.config.prefix));
        }
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.down();
    }
}

/// The last stats line of a relay log, parsed into (key, value) pairs: `packets`,
/// `dropped`, `released`, `late_max_total_us`, ...
pub fn last_relay_stats(log: &str) -> Vec<(String, u64)> {
    let Some(line) = log.lines().rev().find(|l| l.contains(" packets ")) else {
        return Vec::new();
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter_map(|w| Some((w[0].to_owned(), w[1].parse().ok()?)))
        .collect()
}

/// Directory of the release binaries that belong to this test executable
/// (`target/release/deps/<test>` -> `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable in a directory");
    if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps has a parent").to_owned()
    } else {
        deps.to_owned()
    }
}

/// Makes sure the release binaries of the workspace (`edge-agent`, `cloud-endpoint`,
/// `certs`, `wan-relay`) are built and current, and returns their directory. `cargo test`
/// builds only the binaries of packages whose own integration tests need them, so the
/// binaries may be missing or older than the libraries this test was built from.
/// Binaries newer than this test executable are current (CI builds them right after the
/// test executables); otherwise `cargo build --workspace` (the demo's build) brings them up to date.
pub fn ensure_binaries() -> PathBuf {
    let dir = bin_dir();
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let test_exe = std::env::current_exe().ok().and_then(|e| modified(&e));
    let current = ["edge-agent", "cloud-endpoint", "certs", "wan-relay"]
        .iter()
        .all(|b| matches!((modified(&dir.join(b)), test_exe), (Some(bin), Some(exe)) if bin >= exe));
    if current {
        return dir;
    }
    let release = dir.file_name() == Some(OsStr::new("release"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The same build as the demo's (and CI's, before the tests), so this is
    // a no-op there; `--tests` would unify features differently and rebuild.
    cmd.args(["build", "--quiet", "--workspace"]);
    if release {
        cmd.arg("--release");
    }
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    // Not the test's environment: cargo and nextest set CARGO_*, LD_LIBRARY_PATH and
    // NEXTEST_* for a test, and build scripts that watch them would see another build
    // than the demo's and CI's, and rebuild (then the demo would rebuild again).
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let keep = k == "CARGO_HOME" || k == "CARGO_TARGET_DIR";
        if !keep && (k.starts_with("CARGO_") || k.starts_with("NEXTEST") || k == "LD_LIBRARY_PATH" || k == "OUT_DIR") {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "cargo build --workspace --bins failed: {status}");
    dir
}

/// Waits for `child` at most `timeout`; kills it when the time is up.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What [`run_timeout`] saw: the exit status (`None`: killed at the timeout) and the output.
#[derive(Debug)]
pub struct Ran {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, or kills it after `timeout`, collecting its output either way.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let status = wait_timeout(&mut child, timeout);
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Ran {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}
