//! `cloud-endpoint`: the cloud side of the migration gateway.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_endpoint::config::Config;
use cloud_endpoint::inventory::Inventory;
use cloud_endpoint::Endpoint;

// mimalloc instead of glibc malloc: chunk buffers and quinn's receive buffers
// are allocated on one thread and freed on another, and glibc's per-thread
// arenas kept that memory, growing a long-running endpoint by ~23 MiB per
// migration. mimalloc returns it.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cloud-endpoint",
    version,
    about = "Receives migrated VMs over QUIC and registers them in its own vCenter-like domain"
)]
struct Cli {
    /// Config file (TOML). Every setting can also come from a CLOUD_ENDPOINT_* variable.
    #[arg(long, short, env = "CLOUD_ENDPOINT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "CLOUD_ENDPOINT_LOG", default_value = "info", global = true)]
    log: String,
    /// Log line format: text, or json (one JSON object per line, for log collectors).
    #[arg(
        long,
        env = "CLOUD_ENDPOINT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: cloud_endpoint::logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve migrations (the default).
    Serve,
    /// List the VMs registered in the cloud domain.
    Inventory {
        #[arg(long)]
        json: bool,
    },
    /// List migrations, running and past, with their errors.
    Migrations {
        #[arg(long)]
        json: bool,
    },
    /// Print an annotated config file with every setting and its default.
    ExampleConfig,
    /// Read a new password from standard input and print the `password_hash` line that
    /// sets it for a user in the config file's [[domain.users]] (the config file is where
    /// users and passwords live; the next start applies it).
    HashPassword,
}

fn main() -> std::process::ExitCode {
    // Everything the endpoint creates (the database, disk images, console logs, .vmx
    // files, journals, receipts, and what QEMU and qemu-img create for it) is its own:
    // 0600 files and 0700 folders, whatever umask the service manager gave.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    cloud_endpoint::logging::init(&cli.log, cli.log_format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-endpoint: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::ExampleConfig = command {
        print!("{}", Config::example_toml());
        return Ok(());
    }
    if let Command::HashPassword = command {
        return hash_password();
    }
    let config = Config::load(cli.config.as_deref())?;
    match command {
        Command::Serve => serve(config),
        Command::Inventory { json } => inventory(&config, json),
        Command::Migrations { json } => migrations(&config, json),
        Command::ExampleConfig | Command::HashPassword => unreachable!("handled above"),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let grace = config.shutdown_grace();
    let result = rt.block_on(async {
        let endpoint = Endpoint::open(config)?;
        let socket = endpoint.bind()?;
        let api = endpoint.bind_api().await?;
        let metrics = endpoint.bind_metrics().await?;
        tracing::info!(
            listen = %socket.local_addr()?,
            datastore = %endpoint.config.datastore_dir.display(),
            database = %endpoint.config.database.display(),
            "cloud endpoint serving"
        );
        match &api {
            Some(listener) => {
                tracing::info!(api = %format!("https://{}/api", listener.local_addr()?), "vSphere REST API serving")
            }
            None => tracing::info!("vSphere REST API off (api_listen = \"off\")"),
        }
        let (signalled, mut stop) = tokio::sync::watch::channel(false);
        let signals = async {
            shutdown_signal().await;
            tracing::info!(grace_secs = grace.as_secs(), "stop asked for: draining");
            signalled.send_replace(true);
            // A second signal: the operator will not wait.
            shutdown_signal().await;
        };
        let serving = endpoint.run_all(socket, api, metrics, async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let mut deadline = signalled.subscribe();
        let overdue = async move {
            let _ = deadline.wait_for(|s| *s).await;
            // The drain keeps to the grace period itself; this catches what it cannot
            // bound (a blocking operation that hangs).
            tokio::time::sleep(grace + Duration::from_secs(1)).await;
        };
        tokio::select! {
            result = serving => result?,
            () = signals => tracing::warn!("second stop signal: exiting at once; migrations resume from their journals"),
            () = overdue => tracing::warn!("grace period over: exiting; migrations resume from their journals"),
        }
        anyhow::Ok(())
    });
    // Blocking work still running (a sync or a commit cut by the grace period) is not
    // waited for: the journal names only what was synced.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn hash_password() -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if std::io::stdin().is_terminal() {
        eprintln!("new password (one line; it is shown as typed, pipe it in to avoid that):");
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("the password is empty; type or pipe in the new password on one line");
    }
    if password == cloud_endpoint::config::DEMO_PASSWORD {
        anyhow::bail!("that is the published demo password; choose another");
    }
    let hash = cloud_endpoint::inventory::hash_password(password)?;
    println!("password_hash = \"{hash}\"");
    Ok(())
}

fn inventory(config: &Config, json: bool) -> anyhow::Result<()> {
    let inv = Inventory::open_configured(config)?;
    let vms = inv.list_vms()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    let ds = inv.datastore()?;
    println!(
        "cloud domain {} / datastore {} ({})",
        config.domain.datacenter, ds.name, ds.id
    );
    if vms.is_empty() {
        println!("no VMs registered");
    }
    for vm in &vms {
        println!(
            "{:<8} {:<24} {:<12} {} vCPU {:>6} MiB  {}  {}",
            vm.id, vm.name, vm.power_state, vm.num_cpus, vm.memory_mib, vm.guest_os, vm.vmx_path
        );
        for d in &vm.disks {
            println!("           disk {:<9} {:>14} B  {}", d.key, d.capacity_bytes, d.path);
        }
        for n in &vm.nics {
            println!(
                "           nic  {:<9} {} ({})  mac {}",
                n.key,
                n.network_name,
                n.network,
                n.mac.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

fn migrations(config: &Config, json: bool) -> anyhow::Result<()> {
    let inv = Inventory::open_configured(config)?;
    let list = inv.list_migrations()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for m in &list {
        println!(
            "{:<14} {:<24} {:<10} {} {} {}{}",
            m.id,
            m.vm_name,
            m.state,
            m.vm.as_deref().unwrap_or("-"),
            m.started,
            if m.has_receipt { "signed receipt " } else { "" },
            m.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
