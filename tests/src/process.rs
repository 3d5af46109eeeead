//! The real `cloud-endpoint` binary as a child process: started with a config file and
//! `CLOUD_ENDPOINT_*` variables, its addresses read from its log, its log kept for the
//! test, its CPU time read from /proc, and killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `cloud-endpoint serve`.
#[derive(Debug)]
pub struct EndpointProcess {
    child: Child,
    /// The QUIC (migration) address it serves.
    pub quic: SocketAddr,
    /// The HTTPS API address it serves.
    pub api: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl EndpointProcess {
    /// Runs `bin_dir/cloud-endpoint [--config FILE] serve` in `dir` with `env` and waits
    /// (at most 30 s) until it says both its QUIC and API addresses; panics with its log if
    /// it exits or stays silent instead.
    pub fn serve(bin_dir: &Path, dir: &Path, config: Option<&Path>, env: &[(&str, String)]) -> EndpointProcess {
        let mut cmd = Command::new(bin_dir.join("cloud-endpoint"));
        if let Some(file) = config {
            cmd.arg("--config").arg(file);
        }
        cmd.arg("serve")
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .env("CLOUD_ENDPOINT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .expect("cloud-endpoint starts (built by wan::ensure_binaries)");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                let _ = tx.send(line.clone());
                lines.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut quic, mut api) = (None, None);
        while quic.is_none() || api.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    // Text lines (`listen=ADDR`) or JSON lines (`"listen":"ADDR"`).
                    if line.contains("cloud endpoint serving") {
                        quic = field(&line, "listen=")
                            .or_else(|| json_field(&line, "listen"))
                            .and_then(|a| a.parse().ok());
                    }
                    if line.contains("vSphere REST API serving") {
                        api = field(&line, "api=https://")
                            .or_else(|| json_field(&line, "api").and_then(|a| a.strip_prefix("https://")))
                            .and_then(|a| a.strip_suffix("/api"))
                            .and_then(|a| a.parse().ok());
                    }
                }
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "cloud-endpoint did not come up within 30 s (exit status {status:?}); its log:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        EndpointProcess {
            child,
            quic: quic.expect("set above"),
            api: api.expect("set above"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User plus system CPU time the process used so far (/proc/PID/stat, in clock ticks
    /// of 1/100 s, as Linux reports them to user space).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("/proc/PID/stat");
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("comm in parentheses") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    /// The log lines so far (ANSI colours removed).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The log lines once one of them satisfies `wanted`: the endpoint's stderr is read
    /// by another thread, so a line may come a moment after the request that caused it.
    /// Panics with the log after 10 s without it.
    pub async fn log_with(&self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let t0 = std::time::Instant::now();
        loop {
            let log = self.log();
            if log.iter().any(|l| wanted(l)) {
                return log;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no such line in {log:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EndpointProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `key` up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()
}

/// The string value of `key` in a JSON log line (`"key":"value"`).
fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":\"");
    let at = line.find(&pattern)? + pattern.len();
    line[at..].split('"').next()
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case colours are on anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
