//! `edge-agent`: the on-prem side of the migration gateway.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use edge_agent::migrate::{self, MigrateOptions};
use edge_agent::report::{human, Progress, ProgressSink};
use edge_agent::source;
use edge_agent::target::{self, Target};
use gateway::transport::{PathEstimate, TransportTuning};
use indicatif::{ProgressBar, ProgressStyle};

// mimalloc instead of glibc malloc: chunk buffers and quinn's receive buffers
// are allocated on one thread and freed on another, and glibc's per-thread
// arenas kept that memory, growing a long-running endpoint by ~23 MiB per
// migration. mimalloc returns it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Streams on-prem VMs to a cloud endpoint over QUIC with mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `edge_agent=debug`.
    #[arg(long, env = "EDGE_AGENT_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log line format on standard error: text, or json (one JSON object per line, with
    /// the migration's id in the `span` of each line of a migration).
    #[arg(
        long,
        env = "EDGE_AGENT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The agent's metrics, once `--metrics-listen` serves them (the progress sinks feed them).
static METRICS: std::sync::OnceLock<Arc<edge_agent::metrics::EdgeMetrics>> = std::sync::OnceLock::new();

/// Serves the agent's metrics on `addr` from now until the process ends.
fn serve_metrics(rt: &tokio::runtime::Runtime, addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = rt.block_on(edge_agent::metrics::bind(addr))?;
    let metrics = METRICS.get_or_init(Default::default).clone();
    tracing::info!(metrics = %format!("http://{}/metrics", listener.local_addr()?), "Prometheus metrics serving");
    rt.spawn(edge_agent::metrics::serve(listener, metrics, std::future::pending()));
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a powered-off VM (cold lift) into the cloud domain. An unfinished
    /// migration of the same VM to the same endpoint is resumed.
    Migrate(Box<MigrateArgs>),
    /// Abort the unfinished migration of a VM (same arguments as `migrate`): the
    /// endpoint removes its partial files and frees the name.
    Abort(Box<MigrateArgs>),
    /// Replicate a VM that keeps running (same arguments as `migrate`): the first pass
    /// sends everything into a replica the cloud keeps (not a registered VM); each later
    /// pass reads the source again and sends only the chunks that changed. With
    /// --every, a pass runs every N minutes until stopped. `abort` drops the replica.
    Replicate(Box<ReplicateArgs>),
    /// Finish a replication (same arguments as `migrate`): the source must be powered
    /// off; a last pass sends what changed since the previous one, the cloud reads every
    /// disk back, registers the VM and signs a receipt, as for a cold lift; with
    /// --power-on it runs the VM and reports the downtime. Until `confirm` (or
    /// --confirm) it can be rolled back.
    Switchover(Box<SwitchoverArgs>),
    /// Undo a switchover that awaits confirmation (same arguments as `switchover`): the
    /// cloud powers its VM off, unregisters it and keeps its disks as the replica; the
    /// source can be started again and `replicate` goes on. Rolled back through the API
    /// already: the endpoint says so, and the edge's record follows.
    Rollback(Box<MigrateArgs>),
    /// Make a switchover final (same arguments as `switchover`): no rollback afterwards;
    /// the edge's record of the replication is removed (also when it was confirmed
    /// through the API already, which the endpoint says).
    Confirm(Box<MigrateArgs>),
    /// Check a migration before anything moves (same arguments as `migrate`): the
    /// endpoint validates the plan (name, capacity on datastore and host, network
    /// mapping, role, firewall rules) and says what would be created, or lists every
    /// problem. Nothing is staged or recorded. Exits non-zero on problems.
    Plan(Box<MigrateArgs>),
    /// Migrate a running QEMU VM without stopping it: its disks are mirrored and its
    /// memory copied through the tunnel while it runs, then it continues in the cloud
    /// after a pause of at most --downtime-ms. The source stops only once the cloud runs
    /// it; on any failure it runs on.
    LiveMigrate(Box<LiveArgs>),
    /// Print the QEMU command line that runs a .vmx's VM on-prem so that it can be
    /// live-migrated (the cloud starts its destination with the same devices).
    #[command(name = "qemu-command")]
    SourceQemu(QemuCommandArgs),
    /// Measure the path to a cloud endpoint (RTT, jitter, loss, MTU, throughput both ways)
    /// over the migration port, and say what kind of migration it carries.
    LinkTest(Box<LinkTestArgs>),
    /// Show what would be migrated from a .vmx, .ovf or .ova, without connecting anywhere.
    Inspect {
        /// The VM's .vmx file, OVF descriptor or OVA archive.
        vmx: PathBuf,
        #[arg(long)]
        json: bool,
        /// Read this disk as a raw image whatever its file's name or first bytes say, e.g.
        /// `--raw-disk scsi0:1` (repeatable; keys as `edge-agent inspect` shows them). Without
        /// it, a file that shows no known format is read as raw only if its name says so
        /// (.img, .raw, -flat.vmdk); a .qcow2 or .vmdk whose header is damaged is refused.
        #[arg(long = "raw-disk", value_name = "DISK")]
        raw_disk: Vec<String>,
    },
    /// Check a migration receipt: the endpoint's signature and identity, then every disk's
    /// Merkle root recomputed from the source VM. Exits non-zero on any failure.
    VerifyReceipt(VerifyReceiptArgs),
}

#[derive(Args)]
struct ReplicateArgs {
    #[command(flatten)]
    migrate: MigrateArgs,
    /// Run a pass at this interval (the recovery point objective: `15m`, `1h`, `30s`; a
    /// bare number is minutes) until the process is stopped; a pass that fails is tried
    /// again at the next one. Without it, one pass.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_interval)]
    every: Option<Duration>,
    /// Switch over at this time (RFC 3339, e.g. 2026-12-07T02:00:00Z), or at the first
    /// pass after it: the endpoint holds the time (the API can move or clear it; a pass
    /// learns it). The source must be stopped by then; while it runs, the switchover is
    /// refused, said, and passes go on.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    switchover_at: Option<i64>,
    /// Switch over only inside this daily window, UTC (`02:00-04:00`; `22:00-01:00`
    /// crosses midnight): at --switchover-at if it falls inside, else at the window's next
    /// opening; without --switchover-at, at the next opening. A pass that ends after the
    /// window closed waits for the next day's, and says so. The endpoint holds it (the
    /// API can move or clear it).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    switchover_window: Option<gateway::schedule::SwitchoverWindow>,
    #[command(flatten)]
    switchover: SwitchoverFlags,
    /// The QMP socket of the QEMU that runs the VM: each pass reads a point-in-time
    /// backup QEMU makes, and after the first only the chunks its dirty bitmap marks
    /// (docs/replication.md).
    #[arg(long, value_name = "SOCKET")]
    qmp: Option<PathBuf>,
    /// A VM the cloud holds (its name or `vm-N` id) that seeds the first pass: chunks
    /// its disks hold, at the same offset or anywhere, are copied inside the cloud
    /// instead of sent. It must be a VM this user or edge lifted (or registered), with
    /// as many disks of the same sizes; the cloud hashes it at this pass's chunk size
    /// first if it must. Later passes ignore it.
    #[arg(long, value_name = "VM")]
    seed: Option<String>,
}

#[derive(Args)]
struct SwitchoverArgs {
    #[command(flatten)]
    migrate: MigrateArgs,
    #[command(flatten)]
    flags: SwitchoverFlags,
    /// The QMP socket of the QEMU that runs the VM: the switchover stops the guest
    /// (`stop`), sends what changed, and quits QEMU once the cloud registered the VM;
    /// if it fails before that, the guest is resumed (`cont`). Without it, power the VM
    /// off first.
    #[arg(long, value_name = "SOCKET")]
    qmp: Option<PathBuf>,
}

/// What a switchover does beyond registering the VM.
#[derive(Args, Clone, Copy)]
struct SwitchoverFlags {
    /// Power the VM on in the cloud once it is registered; the summary gives the downtime.
    #[arg(long)]
    power_on: bool,
    /// Make the switchover final at once: no `edge-agent rollback` afterwards.
    #[arg(long)]
    confirm: bool,
}

impl SwitchoverFlags {
    fn options(self) -> migrate::SwitchoverOptions {
        migrate::SwitchoverOptions {
            power_on: self.power_on,
            confirm: self.confirm,
            // This command does not stop the source: the operator did, before (the
            // downtime counts from its files' last write, see `migrate::run`).
            source_stopped_at: None,
        }
    }
}

/// RFC 3339 as Unix seconds.
fn parse_time(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("`{s}` is not an RFC 3339 time ({e}): write it like 2026-12-07T02:00:00Z"))
}

#[derive(Args)]
struct VerifyReceiptArgs {
    /// The signed receipt `edge-agent migrate` wrote (or the API returned).
    #[arg(long)]
    receipt: PathBuf,
    /// The source VM the receipt is checked against: its .vmx, .ovf or .ova.
    source: PathBuf,
    /// CA bundle (PEM) that issued the endpoint's certificate.
    #[arg(long, env = "EDGE_AGENT_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// The endpoint certificate's SHA-256 thumbprint (AA:BB:...).
    #[arg(long, env = "EDGE_AGENT_THUMBPRINT")]
    thumbprint: Option<String>,
    /// Read this disk as a raw image whatever its file's name or first bytes say, e.g.
    /// `--raw-disk scsi0:1` (repeatable; keys as `edge-agent inspect` shows them). Without
    /// it, a file that shows no known format is read as raw only if its name says so
    /// (.img, .raw, -flat.vmdk); a .qcow2 or .vmdk whose header is damaged is refused.
    #[arg(long = "raw-disk", value_name = "DISK")]
    raw_disk: Vec<String>,
}

/// Mutual TLS with the endpoint: how the agent trusts it (a CA, a pinned
/// thumbprint, or both) and proves who it is; the same for every command
/// that connects.
#[derive(Args, Clone)]
struct TlsArgs {
    /// CA bundle (PEM) that issued the endpoint's certificate.
    #[arg(long, env = "EDGE_AGENT_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// The endpoint certificate's SHA-256 thumbprint to pin (AA:BB:...).
    #[arg(long, env = "EDGE_AGENT_THUMBPRINT")]
    thumbprint: Option<String>,
    /// This agent's client certificate (PEM), issued by the CA the endpoint trusts.
    #[arg(long, env = "EDGE_AGENT_CERT")]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "EDGE_AGENT_KEY")]
    key: PathBuf,
}

impl TlsArgs {
    fn trust(&self) -> anyhow::Result<gateway::transport::ServerTrust> {
        Ok(target::server_trust(
            self.ca_bundle.as_deref(),
            self.thumbprint.as_deref(),
        )?)
    }

    fn identity(&self) -> anyhow::Result<gateway::transport::Identity> {
        Ok(target::identity(&self.cert, &self.key)?)
    }
}

/// The source's direct kernel boot, if it boots that way.
#[derive(Args)]
struct BootArgs {
    /// The kernel the source QEMU boots directly (-kernel); the cloud gets a copy.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Its initrd (-initrd).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Its command line (-append).
    #[arg(long, requires = "kernel")]
    append: Option<String>,
}

impl BootArgs {
    fn direct_kernel(&self) -> Option<gateway::qemu::DirectKernel> {
        self.kernel.as_ref().map(|k| gateway::qemu::DirectKernel {
            kernel: k.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
        })
    }
}

#[derive(Args)]
struct LiveArgs {
    /// The source QEMU's QMP socket (a unix socket path).
    #[arg(long)]
    qmp: PathBuf,
    #[command(flatten)]
    boot: BootArgs,
    /// The longest pause the switchover may cost, in milliseconds (QEMU's downtime-limit).
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Memory passes before the migration is given up as not converging.
    #[arg(long, default_value_t = 30)]
    max_passes: u64,
    /// Let QEMU slow the guest's vCPUs when it dirties memory faster than the link
    /// carries it (otherwise such a migration is refused by the forecast).
    #[arg(long)]
    auto_converge: bool,
    /// Print the forecast (link, dirty rate, passes, time, pause) and stop.
    #[arg(long)]
    forecast_only: bool,
    /// zstd level of the disk and memory tunnels (-7 fastest to 19 smallest).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    tunnel_zstd_level: i32,
    /// QUIC streams each tunnel (the memory stream, each disk's mirror connection) is
    /// striped over, 1 to 32. Default: enough 1.25 MB stream windows for twice the
    /// path's bandwidth-delay product (--link-rate and --link-rtt, or the measured
    /// link), so a long path is not capped at one window per round trip. 1 is the
    /// single stream of earlier versions (about 67 Mbit/s at 150 ms).
    #[arg(long, env = "EDGE_AGENT_TUNNEL_STREAMS", value_parser = clap::value_parser!(u16).range(1..=32))]
    tunnel_streams: Option<u16>,
    #[command(flatten)]
    lift: MigrateArgs,
}

#[derive(Args)]
struct QemuCommandArgs {
    /// The VM's .vmx file.
    #[arg(long)]
    vmx: PathBuf,
    /// Where its QMP socket goes.
    #[arg(long)]
    qmp: PathBuf,
    /// Where its serial console is written.
    #[arg(long)]
    serial_log: PathBuf,
    #[command(flatten)]
    boot: BootArgs,
}

#[derive(Args, Clone)]
struct MigrateArgs {
    /// The VM: its .vmx file, or an OVF descriptor (.ovf) or OVA archive (.ova).
    #[arg(long)]
    vmx: PathBuf,
    /// Read this disk as a raw image whatever its file's name or first bytes say, e.g.
    /// `--raw-disk scsi0:1` (repeatable; keys as `edge-agent inspect` shows them). Without
    /// it, a file that shows no known format is read as raw only if its name says so
    /// (.img, .raw, -flat.vmdk); a .qcow2 or .vmdk whose header is damaged is refused.
    #[arg(long = "raw-disk", value_name = "DISK")]
    raw_disk: Vec<String>,
    /// The cloud endpoint: quic://HOST[:PORT] (port 4433 by default). Several endpoints
    /// of one domain: repeat --url, or separate URLs with commas (a name that resolves to
    /// several addresses counts as several); a migration whose endpoint is lost resumes
    /// on the next.
    #[arg(
        long,
        env = "EDGE_AGENT_URL",
        required = true,
        value_delimiter = ',',
        value_name = "URL"
    )]
    url: Vec<String>,
    /// User of the cloud domain (not of the on-prem vCenter).
    #[arg(long, env = "EDGE_AGENT_USER")]
    user: String,
    /// Password of that user; prefer the environment variable over the command line.
    #[arg(long, env = "EDGE_AGENT_PASSWORD", hide_env_values = true)]
    password: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name of the VM in the cloud (default: its displayName).
    #[arg(long)]
    name: Option<String>,
    /// The VM's distributed-firewall rules (JSON, NSX DFW-like; see the README). Default:
    /// `<stem>.dfw.json` next to the VM file, if it exists.
    #[arg(long)]
    firewall: Option<PathBuf>,
    /// Map a source network to a cloud network: `--map-network "VM Network=cloud-web"`.
    /// Unmapped networks go to the cloud network of the same name.
    #[arg(long = "map-network", value_parser = parse_mapping)]
    map_network: Vec<(String, String)>,
    /// Format of the disks in the cloud datastore: vmdk (vSphere layout), qcow2 or raw
    /// (for KVM-based clouds). Default: the datastore's.
    #[arg(long)]
    disk_format: Option<gateway::plan::DiskFormat>,
    /// VM folder in the cloud, by name or id (`group-v5`). Default: the domain's.
    #[arg(long)]
    folder: Option<String>,
    /// Cluster, by name or id (`domain-c7`). Default: the domain's.
    #[arg(long)]
    cluster: Option<String>,
    /// Host of the cluster, by name or id (`host-12`). Default: the domain's.
    #[arg(long)]
    host: Option<String>,
    /// Resource pool of the cluster, by name or id (`resgroup-8`). Default: the
    /// cluster's root pool.
    #[arg(long)]
    resource_pool: Option<String>,
    /// Datastore of the VM (its folder and .vmx, and every disk not placed with
    /// --disk-datastore), by name or id (`datastore-9`). Default: the domain's.
    #[arg(long)]
    datastore: Option<String>,
    /// Put one disk on another datastore: `--disk-datastore scsi0:1=cloud-ds2`
    /// (repeatable).
    #[arg(long = "disk-datastore", value_parser = parse_disk_datastore)]
    disk_datastore: Vec<(String, String)>,
    /// Parallel QUIC data streams. Default: enough to fill --link-rate x --link-rtt
    /// (4 to 16), or without --link-rate, 1gbit x the RTT the handshake measured.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16))]
    streams: Option<u16>,
    /// Chunk size in KiB (64 to 16384, a multiple of 4). Default 1024; 64 for
    /// `replicate` and `switchover`, where a chunk is the unit a change costs on the wire.
    #[arg(long)]
    chunk_kib: Option<u32>,
    /// zstd level: `auto` (default) starts at 1 and compresses harder while the link,
    /// not the CPU, is the bottleneck (up to 12); `auto:MIN-MAX` bounds it; a number
    /// from -7 (fastest) to 19 (smallest) fixes it.
    #[arg(long, default_value = "auto", allow_negative_numbers = true)]
    zstd_level: edge_agent::compression::Compression,
    /// Bandwidth cap for this migration, e.g. `200mbit` or `25MB/s`, so a lift does
    /// not crowd out the traffic it shares the link with. Default: no cap.
    #[arg(long, env = "EDGE_AGENT_MAX_RATE")]
    max_rate: Option<gateway::transport::Rate>,
    /// Send every chunk even when the cloud offers to copy those it holds already
    /// (deduplication: by default a chunk of a disk this user or edge lifted before is
    /// copied inside the cloud instead of crossing the link). Each chunk is then read once.
    #[arg(long, env = "EDGE_AGENT_NO_DEDUP")]
    no_dedup: bool,
    /// The link's rate, e.g. `100mbit`, to size QUIC windows and UDP buffers
    /// (bandwidth x RTT) and to start at half of that in flight instead of
    /// probing up from 15 kB; `edge-agent link-test` measures it. Without it, windows
    /// are sized for 1gbit and the start is the standard one.
    #[arg(long, env = "EDGE_AGENT_LINK_RATE")]
    link_rate: Option<gateway::transport::Rate>,
    /// The link's round-trip time, e.g. `150ms`; see --link-rate.
    #[arg(long, env = "EDGE_AGENT_LINK_RTT", default_value = "150ms", value_parser = parse_rtt)]
    link_rtt: Duration,
    /// Congestion controller: bdp (default: fills long links, ignores random loss,
    /// backs off when a bottleneck queue overflows), bbr (quinn's), cubic (yields to
    /// TCP on a shared, congested link) or newreno.
    #[arg(long, env = "EDGE_AGENT_CONGESTION", default_value = "bdp")]
    congestion: gateway::transport::Congestion,
    /// Name of this agent in the cloud's migration records.
    #[arg(long, env = "EDGE_AGENT_NAME", default_value = "edge-agent")]
    agent_name: String,
    /// Where to write the endpoint's signed migration receipt (default: <VM name>.receipt.json
    /// in the current directory, replaced if it exists); check it later with
    /// `edge-agent verify-receipt`.
    #[arg(long)]
    receipt: Option<PathBuf>,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    /// Folder of the checkpoints that let a restarted agent resume an unfinished
    /// migration (default: $XDG_STATE_HOME/edge-agent or ~/.local/state/edge-agent).
    #[arg(long, env = "EDGE_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Seconds to keep reconnecting when the link to the endpoint is lost before
    /// giving up (the migration stays resumable).
    #[arg(long, env = "EDGE_AGENT_RETRY_FOR", default_value_t = 300)]
    retry_for: u64,
    /// Serve Prometheus metrics (bytes read and sent, rate, ETA, RTT, loss, congestion
    /// window, reconnects) over plain HTTP at http://ADDR/metrics while `migrate`,
    /// `replicate`, `switchover` or `live-migrate` runs, e.g. 127.0.0.1:9465.
    #[arg(long, env = "EDGE_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// `150ms`, `0.15s`, `2s`.
fn parse_rtt(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a round-trip time: write it like 150ms or 0.2s");
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let d = Duration::try_from_secs_f64(v * scale).map_err(|_| bad())?;
    if d < Duration::from_micros(10) || d > Duration::from_secs(10) {
        return Err(format!("`{s}` is outside 10us to 10s"));
    }
    Ok(d)
}

/// The chunk size of a replication unless --chunk-kib says otherwise: a write of a few
/// KiB in the guest costs one chunk on the wire at each pass (measured: 1 % of a 1 GiB
/// disk's 64 KiB blocks rewritten cost 1.2 % of the first pass's wire bytes with 64 KiB
/// chunks; with 1 MiB chunks the same change touches about 15 % of the chunks).
const REPLICATION_CHUNK_KIB: u32 = 64;

/// `15m`, `1h`, `30s`, or minutes.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not an interval: write it like 15m, 1h or 30s");
    let (num, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), "m"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(format!("`{s}`: the interval between passes must be at least 1s"));
    }
    Ok(Duration::from_secs(secs))
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!("`{s}` is not SOURCE=CLOUD, e.g. \"VM Network=cloud-web\"")),
    }
}

/// `scsi0:1=cloud-ds2`.
fn parse_disk_datastore(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!(
            "`{s}` is not DISK=DATASTORE, e.g. \"scsi0:1=cloud-ds2\" (disk keys as `edge-agent inspect` shows them)"
        )),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let json = matches!(&cli.command, Command::Migrate(a) | Command::Plan(a) | Command::Rollback(a) | Command::Confirm(a) if a.json)
        || matches!(&cli.command, Command::Switchover(a) if a.migrate.json)
        || matches!(&cli.command, Command::Replicate(a) if a.migrate.json)
        || matches!(&cli.command, Command::Inspect { json: true, .. })
        || matches!(&cli.command, Command::LinkTest(a) if a.json);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"event": "error", "message": e.to_string()}));
            }
            eprintln!("edge-agent: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { vmx, json, raw_disk } => inspect(&vmx, json, &source_options(raw_disk)),
        Command::Migrate(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            serve_metrics(&rt, args.metrics_listen)?;
            rt.block_on(migrate_cmd(*args, Mode::Migrate))
        }
        Command::Abort(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(migrate_cmd(*args, Mode::Abort))
        }
        Command::Replicate(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            serve_metrics(&rt, args.migrate.metrics_listen)?;
            let ReplicateArgs {
                migrate,
                every,
                switchover_at,
                switchover_window,
                switchover,
                qmp,
                seed,
            } = *args;
            if seed.is_some() && migrate.no_dedup {
                anyhow::bail!(
                    "--seed and --no-dedup contradict each other: a seed's chunks are copied inside the cloud, which --no-dedup forbids; drop one"
                );
            }
            let schedule = Schedule {
                at: switchover_at,
                window: switchover_window,
            };
            rt.block_on(replicate_cmd(migrate, every, schedule, switchover, qmp, seed))
        }
        Command::Switchover(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            serve_metrics(&rt, args.migrate.metrics_listen)?;
            let SwitchoverArgs { migrate, flags, qmp } = *args;
            let extra = Extra {
                switchover: flags.options(),
                qmp,
                ..Extra::default()
            };
            rt.block_on(migrate_cmd_with(migrate, Mode::Switchover, extra))
                .map(drop)
        }
        Command::Rollback(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(migrate_cmd(*args, Mode::Rollback))
        }
        Command::Confirm(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(migrate_cmd(*args, Mode::Confirm))
        }
        Command::Plan(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(migrate_cmd(*args, Mode::Plan))
        }
        Command::LiveMigrate(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            serve_metrics(&rt, args.lift.metrics_listen)?;
            rt.block_on(live_cmd(*args))
        }
        Command::SourceQemu(a) => {
            let vm = source::open_vm(&a.vmx)?;
            let spec = edge_agent::live::source_machine(&vm, a.boot.direct_kernel(), &a.serial_log, &a.qmp)?;
            spec.validate()?;
            let argv = spec.argv();
            let quoted: Vec<String> = argv
                .iter()
                .map(|s| {
                    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_=,./:".contains(c)) {
                        s.clone()
                    } else {
                        format!("'{}'", s.replace('\'', "'\\''"))
                    }
                })
                .collect();
            println!("qemu-system-x86_64 {}", quoted.join(" "));
            Ok(())
        }
        Command::LinkTest(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(link_test_cmd(*args))
        }
        Command::VerifyReceipt(args) => verify_receipt_cmd(&args),
    }
}

fn verify_receipt_cmd(a: &VerifyReceiptArgs) -> anyhow::Result<()> {
    let trust = target::server_trust(a.ca_bundle.as_deref(), a.thumbprint.as_deref())?;
    let options = source_options(a.raw_disk.clone());
    let verdict = edge_agent::receipt::verify_with(&a.receipt, &a.source, &options, &trust)?;
    print!("{verdict}");
    if let Some(why) = &verdict.vm_mismatch {
        anyhow::bail!(
            "{why}: the receipt is of what the cloud registered as {}, not of this source",
            verdict.receipt.vm_id
        );
    }
    if !verdict.ok() {
        anyhow::bail!(
            "{} of {} disks do not match the receipt: the source is not what the cloud received and registered as {}",
            verdict.failures(),
            verdict.disks.len(),
            verdict.receipt.vm_id
        );
    }
    println!("receipt verified: every disk of the source matches what the cloud registered");
    Ok(())
}

/// How disks are read, from the `--raw-disk` flags.
fn source_options(raw_disks: Vec<String>) -> source::SourceOptions {
    source::SourceOptions {
        raw_disks,
        ..Default::default()
    }
}

fn inspect(vmx: &std::path::Path, json: bool, options: &source::SourceOptions) -> anyhow::Result<()> {
    let vm = source::open_vm_with(vmx, options)?;
    if json {
        let v = serde_json::json!({
            "name": vm.name, "guest_os": vm.guest_os, "num_cpus": vm.num_cpus,
            "memory_mib": vm.memory_mib, "firmware": vm.firmware,
            "disks": vm.disks.iter().map(|d| serde_json::json!({"key": d.key, "path": d.path, "capacity": d.capacity})).collect::<Vec<_>>(),
            "controllers": vm.controllers.iter().map(|c| serde_json::json!({"key": c.key, "type": c.kind.display_name()})).collect::<Vec<_>>(),
            "nics": vm.nics.iter().map(|n| serde_json::json!({
                "key": n.key, "network": n.network, "mac": n.mac,
                "virtual_dev": n.virtual_dev, "address_type": n.address_type,
            })).collect::<Vec<_>>(),
            "notes": vm.notes,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({}, {} vCPU, {} MiB)",
        vm.name, vm.guest_os, vm.num_cpus, vm.memory_mib
    );
    println!("  firmware {}", vm.firmware.as_deref().unwrap_or("bios"));
    for c in &vm.controllers {
        println!("  controller {:<6} {}", c.key, c.kind.display_name());
    }
    for d in &vm.disks {
        println!("  disk {:<9} {:>28}  {}", d.key, human(d.capacity), d.path.display());
    }
    for n in &vm.nics {
        println!(
            "  nic  {:<9} network {:?} model {} mac {} ({})",
            n.key,
            n.network,
            n.virtual_dev.as_deref().unwrap_or("-"),
            n.mac.as_deref().unwrap_or("-"),
            n.address_type.as_deref().unwrap_or("-")
        );
    }
    for note in &vm.notes {
        println!("  note: {note}");
    }
    Ok(())
}

/// What `migrate_cmd` does with the VM and the target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Migrate,
    Abort,
    Plan,
    Replicate,
    Switchover,
    Rollback,
    Confirm,
}

/// What a pass or a switchover asks beyond its mode.
#[derive(Clone, Default)]
struct Extra {
    switchover: migrate::SwitchoverOptions,
    schedule: Option<Option<i64>>,
    /// The socket of the QEMU that runs the source (`replicate` and `switchover`).
    qmp: Option<PathBuf>,
    /// The VM that seeds a replication's first pass (`replicate --seed`).
    seed: Option<String>,
    /// A replication pass: set or clear the switchover window the endpoint holds.
    schedule_window: Option<Option<gateway::schedule::SwitchoverWindow>>,
}

/// `replicate`'s switchover schedule as given on its command line.
struct Schedule {
    at: Option<i64>,
    window: Option<gateway::schedule::SwitchoverWindow>,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `edge-agent replicate`: one pass, or one every `every` until stopped. With a time
/// and/or a daily window (sent with the first pass), or the ones the endpoint holds (set
/// through the API), the switchover runs once it is due ([`gateway::schedule::switchover_due`]):
/// at its time, inside its window. A switchover refused because the source runs is said,
/// and passes go on; one whose window closed before a pass ended waits for the next
/// opening, and says so.
async fn replicate_cmd(
    a: MigrateArgs,
    every: Option<Duration>,
    given: Schedule,
    flags: SwitchoverFlags,
    qmp: Option<PathBuf>,
    mut seed: Option<String>,
) -> anyhow::Result<()> {
    use gateway::schedule::{switchover_due, SwitchoverDue};
    let mut schedule = given.at.map(Some);
    let mut schedule_window = given.window.map(Some);
    // The endpoint's values, as the last pass learned them.
    let mut held: Option<i64> = None;
    let mut held_window: Option<gateway::schedule::SwitchoverWindow> = None;
    let switchover = Extra {
        switchover: flags.options(),
        qmp: qmp.clone(),
        ..Extra::default()
    };
    let say_at = |at: i64| migrate::rfc3339(at).unwrap_or_else(|| at.to_string());
    let say_schedule = |at: Option<i64>, window: Option<gateway::schedule::SwitchoverWindow>| match (at, window) {
        (Some(at), Some(w)) => format!("scheduled at {} inside the window {w} UTC", say_at(at)),
        (Some(at), None) => format!("scheduled at {}", say_at(at)),
        (None, Some(w)) => format!("of the window {w} UTC"),
        (None, None) => "asked for".to_owned(),
    };
    let mut said_missed = None;
    loop {
        if switchover_due(held, held_window, unix_now()) == SwitchoverDue::Now {
            match migrate_cmd_with(a.clone(), Mode::Switchover, switchover.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => eprintln!(
                    "edge-agent: the switchover {} did not run: {e:#}; replication goes on",
                    say_schedule(held, held_window)
                ),
            }
        }
        let extra = Extra {
            schedule,
            schedule_window,
            qmp: qmp.clone(),
            seed: seed.clone(),
            ..Extra::default()
        };
        match migrate_cmd_with(a.clone(), Mode::Replicate, extra).await {
            Ok(summary) => {
                schedule = None;
                schedule_window = None;
                // The seed shaped the first pass; the replica seeds the next ones.
                seed = None;
                let summary = summary.as_ref();
                held = summary
                    .and_then(|s| s.switchover_at.as_deref())
                    .and_then(|t| parse_time(t).ok());
                held_window = summary
                    .and_then(|s| s.switchover_window.as_deref())
                    .and_then(|w| w.parse().ok());
            }
            Err(e) if every.is_none() => return Err(e),
            // A failed pass (the endpoint down, the link lost for longer than --retry-for)
            // leaves the replica and the checkpoint as they were: the next pass continues.
            Err(e) => eprintln!(
                "edge-agent: pass failed: {e:#}; the next pass runs in {} s",
                every.unwrap_or_default().as_secs()
            ),
        }
        let due = switchover_due(held, held_window, unix_now());
        if let (
            SwitchoverDue::At {
                at,
                missed_window: true,
            },
            Some(w),
        ) = (due, held_window)
        {
            // Said once per missed opening, not at every pass of the day.
            if said_missed != Some(at) {
                eprintln!(
                    "edge-agent: the switchover {} missed its window: the pass ended after the window {w} UTC closed; \
                     it waits for the next opening, at {} (move or clear the window through the API to change that)",
                    say_schedule(held, held_window),
                    say_at(at)
                );
                said_missed = Some(at);
            }
        }
        let Some(period) = every else {
            // One pass; a switchover that is due runs now.
            return match due {
                SwitchoverDue::Now => migrate_cmd_with(a, Mode::Switchover, switchover).await.map(drop),
                _ => Ok(()),
            };
        };
        // Wake for the scheduled switchover if it comes before the next pass.
        let until = match due {
            // Due but not run (refused: the source runs): the next pass, as before.
            SwitchoverDue::Now | SwitchoverDue::NotScheduled => None,
            SwitchoverDue::At { at, .. } => Some(Duration::from_secs((at - unix_now()).max(0).unsigned_abs())),
        };
        tokio::time::sleep(until.map_or(period, |u| u.min(period))).await;
    }
}

async fn live_cmd(a: LiveArgs) -> anyhow::Result<()> {
    let json = a.lift.json;
    let link = a.lift.link_rate.map(|rate| PathEstimate {
        rate_bps: rate.bps(),
        rtt: a.lift.link_rtt,
    });
    let (vm, target, lift) = prepare(a.lift, false, false).await?;
    let opts = edge_agent::live::LiveOptions {
        qmp: a.qmp,
        kernel: a.boot.direct_kernel(),
        downtime: Duration::from_millis(a.downtime_ms),
        max_passes: a.max_passes,
        auto_converge: a.auto_converge,
        link,
        forecast_only: a.forecast_only,
        zstd_level: a.tunnel_zstd_level,
        tunnel_streams: a.tunnel_streams,
        lift,
    };
    let metrics = METRICS.get().cloned();
    let progress = move |p: edge_agent::live::LiveProgress| {
        if let Some(m) = &metrics {
            match &p {
                edge_agent::live::LiveProgress::Storage { done, total, .. } => m.progress(*done, *total),
                edge_agent::live::LiveProgress::Memory {
                    transferred, remaining, ..
                } => m.memory(*transferred, *remaining),
                _ => {}
            }
        }
        if json {
            println!("{}", serde_json::to_value(&p).expect("plain enum"));
        } else {
            eprintln!("{}", edge_agent::live::describe(&p));
        }
    };
    let summary = edge_agent::live::run(&vm, &target, &opts, &progress).await?;
    if json {
        let mut v = serde_json::to_value(&summary).expect("plain struct");
        v["event"] = "summary".into();
        println!("{v}");
    } else {
        println!("{}", edge_agent::live::summary_text(&summary));
    }
    Ok(())
}

async fn migrate_cmd(a: MigrateArgs, mode: Mode) -> anyhow::Result<()> {
    migrate_cmd_with(a, mode, Extra::default()).await.map(drop)
}

/// Runs `mode`; returns the summary of a pass, lift or switchover.
async fn migrate_cmd_with(
    a: MigrateArgs,
    mode: Mode,
    extra: Extra,
) -> anyhow::Result<Option<edge_agent::report::Summary>> {
    let json = a.json;
    // An abort, a rollback or a confirmation needs the VM's name, not its disks, which
    // may have been damaged (or be running again) since.
    let (vm, target, mut opts) = prepare(
        a,
        matches!(mode, Mode::Abort | Mode::Rollback | Mode::Confirm),
        matches!(
            mode,
            Mode::Replicate | Mode::Switchover | Mode::Rollback | Mode::Confirm
        ),
    )
    .await?;
    opts.switchover = extra.switchover;
    opts.schedule = extra.schedule;
    opts.seed = extra.seed;
    opts.schedule_window = extra.schedule_window;
    let qmp = extra.qmp;
    match mode {
        Mode::Migrate => {}
        Mode::Rollback | Mode::Confirm => {
            let said = migrate::end_switchover(&vm, &target, &opts, mode == Mode::Confirm).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": if mode == Mode::Confirm { "confirmed" } else { "rolled back" }, "message": said})
                );
            } else {
                println!("{said}");
            }
            return Ok(None);
        }
        Mode::Replicate => opts.replication = migrate::Replication::Sync,
        Mode::Switchover => {
            if let Some(lock) = edge_agent::source::running_lock(&vm) {
                anyhow::bail!(
                    "{} still runs ({} exists): power the VM off, then run the switchover again; the replica in the cloud is unchanged",
                    vm.name,
                    lock.display()
                );
            }
            opts.replication = migrate::Replication::Switchover;
        }
        Mode::Abort => {
            println!("{}", migrate::abort(&vm, &target, &opts).await?);
            return Ok(None);
        }
        Mode::Plan => {
            let check = edge_agent::plan::check(&vm, &target, &opts).await?;
            if json {
                let mut v = check.to_json();
                v["event"] = "plan".into();
                println!("{v}");
            } else {
                for note in &vm.notes {
                    eprintln!("note: {note}");
                }
                print!("{}", check.to_text());
            }
            if !check.ok() {
                anyhow::bail!(
                    "the endpoint refused the plan with {} problem(s); fix them and run `edge-agent plan` again",
                    check.problems.len()
                );
            }
            return Ok(None);
        }
    }
    let sink: Arc<dyn ProgressSink> = if json {
        Arc::new(JsonLines)
    } else {
        Arc::new(Bar::new())
    };
    let sink: Arc<dyn ProgressSink> = match METRICS.get() {
        Some(metrics) => Arc::new(edge_agent::metrics::MetricsSink {
            metrics: metrics.clone(),
            inner: sink,
        }),
        None => sink,
    };
    let summary = match &qmp {
        Some(socket) => qemu_pass(&vm, &target, &mut opts, sink.clone(), socket).await,
        None => migrate::run(&vm, &target, &opts, sink.clone())
            .await
            .map_err(Into::into),
    };
    drop(sink);
    let summary = summary?;
    if json {
        let mut v = summary.to_json();
        v["event"] = "summary".into();
        println!("{v}");
    } else {
        for note in &vm.notes {
            eprintln!("note: {note}");
        }
        println!("{}", summary.to_text());
    }
    Ok(Some(summary))
}

/// A pass (or the switchover) of a replication whose source QEMU runs behind `socket`:
/// the source is read from QEMU's backup, only what its dirty bitmap marks after the
/// first pass (edge_agent::tracking). A switchover stops the guest first, quits QEMU once
/// the cloud registered the VM, and resumes the guest if it fails before the commit.
async fn qemu_pass(
    vm: &source::SourceVm,
    target: &Target,
    opts: &mut MigrateOptions,
    sink: Arc<dyn ProgressSink>,
    socket: &std::path::Path,
) -> anyhow::Result<edge_agent::report::Summary> {
    let switchover = opts.replication == migrate::Replication::Switchover;
    let (record, replica) = migrate::replica_record(vm, target, opts);
    if switchover && !replica {
        anyhow::bail!(
            "no replication of {} to this endpoint is recorded in {}: start one with `edge-agent replicate`; the source VM was not stopped",
            vm.vmx_path.display(),
            record.parent().unwrap_or(&record).display()
        );
    }
    let chunk_size = migrate::build_plan(vm, opts).chunk_size;
    let mut qemu = edge_agent::tracking::QemuSource::connect(socket, vm, chunk_size, &record).await?;
    // Listened to before the guest stops, so that no signal can end the process between
    // the stop and the pass with the guest left paused.
    let mut interruption = match switchover.then(Interruption::listen).transpose() {
        Ok(i) => i,
        Err(e) => {
            qemu.close().await;
            return Err(e);
        }
    };
    if switchover {
        match qemu.stop().await {
            // The downtime counts from here (the stop itself takes milliseconds).
            Ok(at) => opts.switchover.source_stopped_at = at.map(|_| std::time::Instant::now()),
            Err(e) => {
                qemu.close().await;
                return Err(e.into());
            }
        }
    }
    let (pass, source) = match qemu.begin_pass(replica).await {
        Ok(p) => p,
        Err(e) => {
            let resumed = if switchover {
                format!("; {}", qemu.resume().await)
            } else {
                String::new()
            };
            qemu.close().await;
            anyhow::bail!("{e}{resumed}");
        }
    };
    eprintln!("edge-agent: {}", pass.report.describe());
    let commit_sent = source.commit_sent.clone();
    let report = pass.report.clone();
    // Interrupted (Ctrl-C, SIGTERM) while the guest is stopped, the process would exit
    // and leave it paused: the pass is given up as a failure instead, which resumes the
    // guest unless the commit went out.
    let result = tokio::select! {
        r = migrate::run_pass(vm, target, opts, sink, Some(source)) => r.map_err(anyhow::Error::from),
        Some(signal) = async {
            match interruption.as_mut() {
                Some(i) => Some(i.wait().await),
                None => None,
            }
        } => Err(anyhow::anyhow!("the switchover was interrupted ({signal})")),
    };
    let outcome = match result {
        Ok(mut summary) => {
            summary.tracking = Some(report);
            if switchover {
                qemu.discard(&pass);
                if let Err(e) = qemu.finish_switchover().await {
                    eprintln!(
                        "edge-agent: warning: the VM is registered in the cloud, but the source QEMU could not be quit ({e}): it is paused; quit it, never resume it"
                    );
                }
                Ok(summary)
            } else {
                qemu.pass_succeeded(pass).await.map(|()| summary).map_err(Into::into)
            }
        }
        Err(e) => {
            qemu.pass_failed(pass).await;
            let what = if !switchover {
                "QEMU's record of what changed is kept for the next pass".to_owned()
            } else if commit_sent.load(std::sync::atomic::Ordering::SeqCst) {
                "the commit was sent before the failure, so the cloud may have registered the VM: the source QEMU is left paused so that the VM never runs in both places; look at the migration in the cloud (`GET /api/gateway/migrations`): if it SUCCEEDED, quit the source QEMU; if it did not, run the switchover again or resume the source with QMP `cont`"
 .to_owned()
            } else {
                qemu.resume().await
            };
            Err(anyhow::anyhow!("{e:#}\n{what}"))
        }
    };
    qemu.close().await;
    outcome
}

/// Ctrl-C and SIGTERM, caught from the moment this is made: one that comes before the
/// wait (while the guest is being stopped, or before the pass starts) is kept for it,
/// instead of killing the process with the guest paused.
struct Interruption {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interruption {
    fn listen() -> anyhow::Result<Interruption> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind| signal(kind).context("listening for Ctrl-C and SIGTERM before stopping the source VM");
        Ok(Interruption {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
        })
    }

    /// Says which came.
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// The VM, the endpoint and the options every migrating command shares. With
/// `configuration_only`, the VM's disks are not read (see [`source::SourceOptions`]).
async fn prepare(
    a: MigrateArgs,
    configuration_only: bool,
    replication: bool,
) -> anyhow::Result<(source::SourceVm, Target, MigrateOptions)> {
    let options = source::SourceOptions {
        configuration_only,
        ..source_options(a.raw_disk.clone())
    };
    let mut vm = source::open_vm_with(&a.vmx, &options)?;
    if let Some(rules) = &a.firewall {
        vm.firewall = source::firewall::read(rules, &vm.name)?;
    }
    let receipt = a.receipt.clone().unwrap_or_else(|| {
        let name = a.name.as_deref().unwrap_or(&vm.name).replace(['/', '\\'], "_");
        PathBuf::from(format!("{name}.receipt.json"))
    });
    // Found now, not after the VM is registered: the receipt would have nowhere to go.
    if let Some(dir) = receipt.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        anyhow::bail!(
            "--receipt {}: folder {} does not exist; create it or choose another path",
            receipt.display(),
            dir.display()
        );
    }
    let (endpoints, names) = target::resolve_all(&a.url).await?;
    let target = Target {
        endpoints,
        names,
        user: a.user,
        password: a.password,
        trust: a.tls.trust()?,
        identity: a.tls.identity()?,
    };
    // A cap below the link rate needs no more window than the cap fills.
    let capped = |rate: u64| rate.min(a.max_rate.map_or(u64::MAX, |r| r.bps()));
    let base = match a.link_rate {
        Some(rate) => TransportTuning::for_known_path(PathEstimate {
            rate_bps: capped(rate.bps()),
            rtt: a.link_rtt,
        }),
        None => TransportTuning::for_path(PathEstimate {
            rate_bps: capped(PathEstimate::DEFAULT.rate_bps),
            rtt: a.link_rtt,
        }),
    };
    let tuning = TransportTuning {
        congestion: a.congestion,
        ..base
    };
    let opts = MigrateOptions {
        name: a.name,
        network_map: a.map_network,
        chunk_size: a
            .chunk_kib
            .unwrap_or(if replication { REPLICATION_CHUNK_KIB } else { 1024 })
            .saturating_mul(1024),
        disk_format: a.disk_format,
        placement: gateway::plan::Placement {
            folder: a.folder,
            cluster: a.cluster,
            host: a.host,
            resource_pool: a.resource_pool,
            datastore: a.datastore,
            disk_datastores: a.disk_datastore,
        },
        // A link the operator described sizes the streams; otherwise the measured RTT does.
        streams: match (a.streams, a.link_rate) {
            (Some(n), _) => Some(usize::from(n)),
            (None, Some(_)) => Some(tuning.data_streams),
            (None, None) => None,
        },
        compression: a.zstd_level,
        max_rate: a.max_rate,
        agent: a.agent_name,
        tuning,
        receipt_path: Some(receipt),
        state_dir: Some(a.state_dir.unwrap_or_else(edge_agent::checkpoint::default_state_dir)),
        retry_for: Duration::from_secs(a.retry_for),
        dedup: !a.no_dedup,
        ..MigrateOptions::default()
    };
    Ok((vm, target, opts))
}

/// Progress as JSON lines on stdout, at most one per second.
struct JsonLines;

impl ProgressSink for JsonLines {
    fn started(&self, vm: &str, migration_id: &str, total_bytes: u64) {
        println!(
            "{}",
            serde_json::json!({"event": "started", "vm": vm, "migration_id": migration_id, "total_bytes": total_bytes})
        );
    }
    fn progress(&self, p: &Progress) {
        let mut v = serde_json::to_value(p).expect("plain struct");
        v["event"] = "progress".into();
        println!("{v}");
    }
    fn waiting(&self, why: &str) {
        println!("{}", serde_json::json!({"event": "waiting", "message": why}));
    }
}

/// An indicatif bar on stderr: bytes, rate, ETA; while the migration waits to resume,
/// what it waits for in place of the VM's name.
struct Bar(ProgressBar, std::sync::Mutex<BarState>);

#[derive(Default)]
struct BarState {
    vm: String,
    waiting: bool,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar(bar, Default::default())
    }
}

impl ProgressSink for Bar {
    fn started(&self, vm: &str, _migration_id: &str, total_bytes: u64) {
        self.0.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.set_length(total_bytes);
        self.0.set_message(vm.to_owned());
        self.0.enable_steady_tick(Duration::from_millis(250));
        *self.1.lock().expect("bar state lock") = BarState {
            vm: vm.to_owned(),
            waiting: false,
        };
    }
    fn progress(&self, p: &Progress) {
        let mut state = self.1.lock().expect("bar state lock");
        if std::mem::take(&mut state.waiting) {
            self.0.set_message(state.vm.clone());
        }
        drop(state);
        self.0.set_position(p.done_bytes);
        if p.done_bytes >= p.total_bytes {
            self.0.finish();
        }
    }
    /// Shown in the bar once it is drawn (the log line says it too, from the start).
    fn waiting(&self, why: &str) {
        let mut state = self.1.lock().expect("bar state lock");
        state.waiting = true;
        self.0.set_message(format!("{}: {why}", state.vm));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[derive(Args)]
struct LinkTestArgs {
    /// The cloud endpoint: quic://HOST[:PORT] (port 4433 by default), as for `migrate`;
    /// of several, the first that answers is measured.
    #[arg(
        long,
        env = "EDGE_AGENT_URL",
        required = true,
        value_delimiter = ',',
        value_name = "URL"
    )]
    url: Vec<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Seconds of throughput measurement per direction (the endpoint may clamp it).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    seconds: u32,
    /// Application pings for RTT and jitter (at least 20).
    #[arg(long, default_value_t = edge_agent::linktest::MIN_PINGS,
          value_parser = clap::value_parser!(u32).range(i64::from(edge_agent::linktest::MIN_PINGS)..=1000))]
    pings: u32,
    /// Traffic streams per direction, 1 to 16. Default: as many as a migration opens on
    /// this path (4 on a LAN, 16 at 150 ms), from the handshake's round trip.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
    streams: Option<u8>,
    /// A VM (.vmx, .ovf or .ova) whose lift time over this link to estimate.
    #[arg(long)]
    vm: Option<PathBuf>,
    /// Name of this agent in the endpoint's logs.
    #[arg(long, env = "EDGE_AGENT_NAME", default_value = "edge-agent")]
    agent_name: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

async fn link_test_cmd(a: LinkTestArgs) -> anyhow::Result<()> {
    let (endpoints, names) = target::resolve_all(&a.url).await?;
    let target = Target {
        endpoints,
        names,
        // A link test is authenticated by the edge certificate alone.
        user: String::new(),
        password: String::new(),
        trust: a.tls.trust()?,
        identity: a.tls.identity()?,
    };
    let opts = edge_agent::linktest::LinkTestOptions {
        seconds: a.seconds,
        pings: a.pings,
        streams: a.streams,
        vm: a.vm,
        agent: a.agent_name,
        ..Default::default()
    };
    let report = edge_agent::linktest::run(&target, &opts).await?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
