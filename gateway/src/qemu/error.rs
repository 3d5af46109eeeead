use std::path::PathBuf;

/// What can go wrong running QEMU or talking QMP to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    #[error(
        "QEMU is not installed: no `{binary}` on PATH and QEMU_SYSTEM is not set; install the Debian package \
         qemu-system-x86 (on bookworm with qemu-utils 10 from bookworm-backports: \
         `apt-get install -t bookworm-backports qemu-system-x86`, or plain apt pulls 7.2 and replaces qemu-utils), \
         or set QEMU_SYSTEM to the binary"
    )]
    NotInstalled { binary: String },

    #[error("QEMU_SYSTEM names {}, which is not an executable file; point it at qemu-system-x86_64", path.display())]
    BadBinary { path: PathBuf },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the machine spec is not usable: {0}")]
    BadSpec(String),

    #[error(
        "no UEFI firmware for an EFI VM: {} has no OVMF_CODE_4M.fd/OVMF_VARS_4M.fd or OVMF_CODE.fd/OVMF_VARS.fd; \
         install Debian's OVMF (`apt-get install ovmf`) or set OVMF_DIR to the folder that holds it", dir.display()
    )]
    NoOvmf { dir: PathBuf },

    #[error(
        "the QMP socket path {} is {len} bytes, more than a unix socket address holds ({max}); \
         use a shorter datastore or VM folder path", path.display()
    )]
    SocketPathTooLong { path: PathBuf, len: usize, max: usize },

    #[error("QEMU exited while starting ({status}); its last output: {output}")]
    ExitedAtStart { status: String, output: String },

    #[error("QEMU did not open its QMP socket {} within {secs} s; it was killed (see {})", socket.display(), log.display())]
    StartTimeout { socket: PathBuf, log: PathBuf, secs: u64 },

    #[error("QMP connection to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("QMP I/O failed: {0}")]
    QmpIo(#[source] std::io::Error),

    #[error("QMP message is malformed: {0}")]
    QmpMalformed(String),

    #[error("QMP message is longer than {max} bytes; the peer is not a sane QEMU")]
    QmpTooLong { max: usize },

    /// QEMU answered the command with an error: its `class` (e.g. `GenericError`,
    /// `CommandNotFound`, `DeviceNotFound`) and `desc`, as it sent them.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },

    #[error("the QMP connection closed (QEMU exited or closed the monitor)")]
    Disconnected,

    #[error("no QMP event {event} within {millis} ms")]
    EventTimeout { event: String, millis: u128 },

    #[error("QEMU (pid {pid}) did not exit within {secs} s of `quit` and could not be killed: {reason}")]
    Kill { pid: u32, secs: u64, reason: String },
}
