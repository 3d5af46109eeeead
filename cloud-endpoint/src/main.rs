//! `cloud-endpoint`: the cloud side of the migration gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloud_endpoint::config::Config;
use cloud_endpoint::inventory::Inventory;
use cloud_endpoint::Endpoint;

// mimalloc instead of glibc malloc: chunk buffers and quinn's receive buffers
// are allocated on one thread and freed on another, and glibc's per-thread
// arenas kept that memory, growing a long-running endpoint by ~23 MiB per
// migration. mimalloc returns it.
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
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
    let config = Config::load(cli.config.as_deref())?;
    match command {
        Command::Serve => serve(config),
        Command::Inventory { json } => inventory(&config, json),
        Command::Migrations { json } => migrations(&config, json),
        Command::ExampleConfig => unreachable!("handled above"),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let endpoint = Endpoint::open(config)?;
        let socket = endpoint.bind()?;
        let api = endpoint.bind_api().await?;
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
        endpoint.run_with_api(socket, api, shutdown_signal()).await?;
        Ok(())
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn inventory(config: &Config, json: bool) -> anyhow::Result<()> {
    let inv = Inventory::open(&config.database, &config.domain)?;
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
    let inv = Inventory::open(&config.database, &config.domain)?;
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
