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
use indicatif::{ProgressBar, ProgressStyle};

// mimalloc instead of glibc malloc: chunk buffers and quinn's receive buffers
// are allocated on one thread and freed on another, and glibc's per-thread
// arenas kept that memory, growing a long-running endpoint by ~23 MiB per
// migration. mimalloc returns it.
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
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a powered-off VM (cold lift) into the cloud domain.
    Migrate(Box<MigrateArgs>),
    /// Show what would be migrated from a .vmx, .ovf or .ova, without connecting anywhere.
    Inspect {
        /// The VM's .vmx file, OVF descriptor or OVA archive.
        vmx: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct MigrateArgs {
    /// The VM: its .vmx file, or an OVF descriptor (.ovf) or OVA archive (.ova).
    #[arg(long)]
    vmx: PathBuf,
    /// The cloud endpoint: quic://HOST[:PORT] (port 4433 by default).
    #[arg(long, env = "EDGE_AGENT_URL")]
    url: String,
    /// User of the cloud domain (not of the on-prem vCenter).
    #[arg(long, env = "EDGE_AGENT_USER")]
    user: String,
    /// Password of that user; prefer the environment variable over the command line.
    #[arg(long, env = "EDGE_AGENT_PASSWORD", hide_env_values = true)]
    password: String,
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
    /// Name of the VM in the cloud (default: its displayName).
    #[arg(long)]
    name: Option<String>,
    /// Map a source network to a cloud network: `--map-network "VM Network=cloud-web"`.
    /// Unmapped networks go to the cloud network of the same name.
    #[arg(long = "map-network", value_parser = parse_mapping)]
    map_network: Vec<(String, String)>,
    /// Format of the disks in the cloud datastore: vmdk (vSphere layout), qcow2 or raw
    /// (for KVM-based clouds). Default: the datastore's.
    #[arg(long)]
    disk_format: Option<gateway::plan::DiskFormat>,
    /// Parallel data streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    streams: u16,
    /// Chunk size in KiB (64 to 16384, a multiple of 4).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u32,
    /// zstd level: 1 by default; negative levels (down to -7) compress faster and less,
    /// higher ones (up to 19) compress better and pay only on slow links.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-7..=19))]
    zstd_level: i32,
    /// Name of this agent in the cloud's migration records.
    #[arg(long, env = "EDGE_AGENT_NAME", default_value = "edge-agent")]
    agent_name: String,
    /// Print progress and the summary as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
        _ => Err(format!("`{s}` is not SOURCE=CLOUD, e.g. \"VM Network=cloud-web\"")),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let json = matches!(&cli.command, Command::Migrate(a) if a.json)
        || matches!(&cli.command, Command::Inspect { json: true, .. });
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
        Command::Inspect { vmx, json } => inspect(&vmx, json),
        Command::Migrate(args) => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(migrate_cmd(*args))
        }
    }
}

fn inspect(vmx: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let vm = source::open_vm(vmx)?;
    if json {
        let v = serde_json::json!({
            "name": vm.name, "guest_os": vm.guest_os, "num_cpus": vm.num_cpus,
            "memory_mib": vm.memory_mib, "firmware": vm.firmware,
            "disks": vm.disks.iter().map(|d| serde_json::json!({"key": d.key, "path": d.path, "capacity": d.capacity})).collect::<Vec<_>>(),
            "nics": vm.nics.iter().map(|n| serde_json::json!({"key": n.key, "network": n.network, "mac": n.mac})).collect::<Vec<_>>(),
            "notes": vm.notes,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({}, {} vCPU, {} MiB)",
        vm.name, vm.guest_os, vm.num_cpus, vm.memory_mib
    );
    for d in &vm.disks {
        println!("  disk {:<9} {:>28}  {}", d.key, human(d.capacity), d.path.display());
    }
    for n in &vm.nics {
        println!(
            "  nic  {:<9} network {:?} mac {}",
            n.key,
            n.network,
            n.mac.as_deref().unwrap_or("-")
        );
    }
    for note in &vm.notes {
        println!("  note: {note}");
    }
    Ok(())
}

async fn migrate_cmd(a: MigrateArgs) -> anyhow::Result<()> {
    let vm = source::open_vm(&a.vmx)?;
    let (host, port) = target::parse_url(&a.url)?;
    let target = Target {
        addr: target::resolve(&host, port).await?,
        server_name: host,
        user: a.user,
        password: a.password,
        trust: target::server_trust(a.ca_bundle.as_deref(), a.thumbprint.as_deref())?,
        identity: target::identity(&a.cert, &a.key)?,
    };
    let opts = MigrateOptions {
        name: a.name,
        network_map: a.map_network,
        chunk_size: a.chunk_kib.saturating_mul(1024),
        disk_format: a.disk_format,
        streams: a.streams.into(),
        zstd_level: a.zstd_level,
        agent: a.agent_name,
        ..MigrateOptions::default()
    };
    let sink: Arc<dyn ProgressSink> = if a.json {
        Arc::new(JsonLines)
    } else {
        Arc::new(Bar::new())
    };
    let summary = migrate::run(&vm, &target, &opts, sink.clone()).await;
    drop(sink);
    let summary = summary?;
    if a.json {
        let mut v = summary.to_json();
        v["event"] = "summary".into();
        println!("{v}");
    } else {
        for note in &vm.notes {
            eprintln!("note: {note}");
        }
        println!("{}", summary.to_text());
    }
    Ok(())
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
}

/// An indicatif bar on stderr: bytes, rate, ETA.
struct Bar(ProgressBar);

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
        Bar(bar)
    }
}

impl ProgressSink for Bar {
    fn started(&self, vm: &str, _migration_id: &str, total_bytes: u64) {
        self.0.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.set_length(total_bytes);
        self.0.set_message(vm.to_owned());
        self.0.enable_steady_tick(Duration::from_millis(250));
    }
    fn progress(&self, p: &Progress) {
        self.0.set_position(p.done_bytes);
        if p.done_bytes >= p.total_bytes {
            self.0.finish();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish();
    }
}
