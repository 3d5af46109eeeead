//! One QEMU process: started from a [`MachineSpec`] (or found again by its pid and QMP
//! socket), watched until it exits, stopped with `quit` and killed if it will not go.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Confinement, MachineSpec, QemuError, Qmp};

/// How long QEMU may take to open its QMP socket. Generous: on a loaded 2-core machine
/// starting TCG and loading the firmware takes a second or two.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The `qemu-system-x86_64` to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary(PathBuf);

impl QemuBinary {
    pub const NAME: &'static str = "qemu-system-x86_64";

    /// `QEMU_SYSTEM` if set, else `qemu-system-x86_64` on `PATH`.
    pub fn from_env() -> Result<QemuBinary, QemuError> {
        QemuBinary::find(std::env::var_os("QEMU_SYSTEM"), std::env::var_os("PATH"))
    }

    /// `explicit` if given (it must be an executable file), else the first
    /// `qemu-system-x86_64` in `path` (a `PATH`-style list).
    pub fn find(explicit: Option<OsString>, path: Option<OsString>) -> Result<QemuBinary, QemuError> {
        if let Some(explicit) = explicit.filter(|e| !e.is_empty()) {
            let p = PathBuf::from(explicit);
            return if is_executable(&p) {
                Ok(QemuBinary(p))
            } else {
                Err(QemuError::BadBinary { path: p })
            };
        }
        path.iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(Self::NAME))
            .find(|p| is_executable(p))
            .map(QemuBinary)
            .ok_or_else(|| QemuError::NotInstalled {
                binary: Self::NAME.into(),
            })
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running (or finished) QEMU.
#[derive(Debug)]
pub struct QemuProcess {
    pid: u32,
    qmp: Qmp,
    /// `Some(how it ended)` once the process is gone.
    exited: watch::Receiver<Option<String>>,
}

impl QemuProcess {
    /// Starts QEMU for `spec`, its stdout and stderr going to `output_log`, and connects
    /// to its QMP socket. QEMU runs in its own process group: a Ctrl-C meant for the
    /// endpoint does not reach the guests, and they outlive an endpoint restart.
    pub async fn spawn(binary: &QemuBinary, spec: &MachineSpec, output_log: &Path) -> Result<QemuProcess, QemuError> {
        QemuProcess::spawn_confined(binary, spec, output_log, &Confinement::default()).await
    }

    /// [`QemuProcess::spawn`], confined by `confinement` (its sandbox arguments follow the
    /// spec's; its user must reach the spec's files itself).
    pub async fn spawn_confined(
        binary: &QemuBinary,
        spec: &MachineSpec,
        output_log: &Path,
        confinement: &Confinement,
    ) -> Result<QemuProcess, QemuError> {
        spec.validate()?;
        let socket = &spec.qmp_socket;
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(QemuError::SocketPathTooLong {
                path: socket.clone(),
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        // A socket file left by an earlier run would be mistaken for this one's.
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(QemuError::Io {
                    action: "remove the old QMP socket",
                    path: socket.clone(),
                    source,
                })
            }
        }
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| QemuError::Io { action, path, source }
        };
        let log = std::fs::File::create(output_log).map_err(io("create", output_log))?;
        let log2 = log.try_clone().map_err(io("open", output_log))?;
        let mut command = tokio::process::Command::new(binary.path());
        command
            .args(spec.argv())
            .args(confinement.argv())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(user) = confinement.run_as {
            // The standard library also drops the supplementary groups when a root
            // parent sets the user.
            command.uid(user.uid).gid(user.gid);
        }
        let mut child = command.spawn().map_err(io("start", binary.path()))?;
        let pid = child.id().ok_or(QemuError::Disconnected)?;
        let (tx, mut exited) = watch::channel(None);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            tx.send_replace(Some(how));
        });
        let started = Instant::now();
        loop {
            if let Some(status) = exited.borrow_and_update().clone() {
                return Err(QemuError::ExitedAtStart {
                    status,
                    output: tail(output_log, 2048),
                });
            }
            if socket.exists() {
                match Qmp::connect(socket).await {
                    Ok(qmp) => return Ok(QemuProcess { pid, qmp, exited }),
                    // QEMU made the file but does not accept yet: try again.
                    Err(QemuError::Connect { .. }) => {}
                    Err(e) => {
                        // Usually QEMU opened the socket, then refused the command line
                        // and exited: its output says why, better than a reset connection.
                        let ended = tokio::time::timeout(Duration::from_secs(2), exited.wait_for(Option::is_some))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .and_then(|s| s.clone());
                        if let Some(status) = ended {
                            return Err(QemuError::ExitedAtStart {
                                status,
                                output: tail(output_log, 2048),
                            });
                        }
                        let _ = kill(pid);
                        return Err(e);
                    }
                }
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = kill(pid);
                return Err(QemuError::StartTimeout {
                    socket: socket.clone(),
                    log: output_log.to_owned(),
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds a QEMU started earlier (by a previous run of this program) again: `pid` must
    /// be a live QEMU whose command line names `socket`, or this is
    /// [`QemuError::Disconnected`]. Not being its parent, we learn that it exited from
    /// the QMP connection ending and its pid vanishing.
    pub async fn attach(pid: u32, socket: &Path) -> Result<QemuProcess, QemuError> {
        if !is_qemu_serving(pid, socket) {
            return Err(QemuError::Disconnected);
        }
        let qmp = Qmp::connect(socket).await?;
        let (tx, exited) = watch::channel(None);
        let watched = qmp.clone();
        tokio::spawn(async move {
            watched.closed().await;
            while Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tx.send_replace(Some("exited (not our child: no status)".to_owned()));
        });
        Ok(QemuProcess { pid, qmp, exited })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// `Some(how it ended)` once the process is gone.
    pub fn exit_status(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Waits until the process is gone; returns how it ended.
    pub async fn wait(&self) -> String {
        let mut rx = self.exited.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(status) => status.clone().unwrap_or_default(),
            // The watcher task ended without a word: only if the runtime is shutting down.
            Err(_) => "unknown (the watcher stopped)".to_owned(),
        };
        status
    }

    /// Stops QEMU: `quit` over QMP (the guest gets no say, as with a power cut), then
    /// SIGKILL if it is still there after `grace`. Returns how it ended.
    pub async fn stop(&self, grace: Duration) -> Result<String, QemuError> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        // `quit` may lose its reply to the exit it causes; the wait below is what counts.
        let _ = tokio::time::timeout(grace, self.qmp.execute("quit", serde_json::Value::Null)).await;
        if let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
            return Ok(status);
        }
        tracing::warn!(pid = self.pid, "QEMU ignored quit; killing it");
        kill(self.pid).map_err(|reason| QemuError::Kill {
            pid: self.pid,
            secs: grace.as_secs(),
            reason,
        })?;
        tokio::time::timeout(Duration::from_secs(10), self.wait())
            .await
            .map_err(|_| QemuError::Kill {
                pid: self.pid,
                secs: grace.as_secs(),
                reason: "still running 10 s after SIGKILL".into(),
            })
    }
}

fn kill(pid: u32) -> Result<(), String> {
    let pid = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `pid` is a running QEMU whose command line names `socket`: a pid file can
/// outlive its process, and the pid be reused by another.
pub fn is_qemu_serving(pid: u32, socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_qemu = args
        .first()
        .is_some_and(|a| a.windows(b"qemu-system".len()).any(|w| w == b"qemu-system"));
    let wanted = format!("path={},", socket.to_string_lossy().replace(',', ",,"));
    is_qemu
        && args
            .iter()
            .any(|a| a.windows(wanted.len()).any(|w| w == wanted.as_bytes()))
}

/// The last `max` bytes of a file, as text, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;
