//! The scale-out benchmark (issue 18), run by `tests/scale-out-bench.sh`: not a timed
//! test, it reports and does not judge.
//!
//! 1. Lifts: SCALE_BENCH_VMS small VMs lifted by SCALE_BENCH_EDGES concurrent
//!    `edge-agent migrate` processes, through 1 endpoint on SQLite, then 1, 2 and 3
//!    endpoint processes on one PostgreSQL sharing one datastore folder. Each edge names
//!    every endpoint (`--url`), the list rotated by the VM's number, so migrations spread
//!    over the endpoints (an edge connects to the first that answers).
//! 2. Inventory operations per second through the library, SQLite against PostgreSQL
//!    (durable, as in service; and with the tests' fsync=off, to show what syncing costs).
//! 3. Failover: two endpoints, one rate-limited lift through `--url A,B`, A killed with
//!    SIGKILL at ~30 %: the time until the migration moves on at B, split into the part the
//!    edge needs to notice (the transport idle timeout) and the part it waits for A's
//!    lease to expire.
//!
//! Prints the tables and writes `SCALE_BENCH_DIR/results.json`. Settings: see [`Settings`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cloud_endpoint::config::{DomainConfig, Role};
use cloud_endpoint::inventory::store::test_pg::TestPg;
use cloud_endpoint::inventory::{Inventory, LeaseClock, NewDisk, NewNic, NewVm, Principal};
use e2e::process::EndpointProcess;
use e2e::scale_out::{postgres_cpu, proc_ticks, ticks, Domain, MIB};
use e2e::{images_identical, write_raw_disk, write_vmx, Fill, MIGRATOR};
use serde_json::{json, Value};

/// What to run and how big; each from its environment variable.
struct Settings {
    /// SCALE_BENCH_VMS (12): VMs lifted in each phase of part 1.
    vms: usize,
    /// SCALE_BENCH_VM_MIB (32): each VM's disk; half random, a quarter text, a quarter
    /// zero (a hole), so compression and zero detection both run.
    vm_mib: usize,
    /// SCALE_BENCH_EDGES (4): concurrent `edge-agent migrate` processes.
    edges: usize,
    /// SCALE_BENCH_ENDPOINTS (1,2,3): endpoint counts on PostgreSQL (SQLite runs 1).
    endpoints: Vec<usize>,
    /// SCALE_BENCH_OPS_THREADS (4): threads calling the inventory at once.
    ops_threads: usize,
    /// SCALE_BENCH_OPS_SECS (3): seconds of each kind of inventory operation.
    ops_secs: f64,
    /// SCALE_BENCH_FAILOVER_MIB (48): the failover lift's disk, all random so its
    /// progress is even.
    failover_mib: usize,
    /// SCALE_BENCH_FAILOVER_RATE (64mbit): its `--max-rate`, so the kill lands mid-way.
    failover_rate: String,
    /// SCALE_BENCH_FAILOVER (10:30,10:3,3:3): lease period : endpoint idle timeout, in
    /// seconds, one failover per pair; 10:30 are the service's defaults.
    failover_cases: Vec<(u64, u64)>,
    /// SCALE_BENCH_PARTS (lifts,ops,failover).
    parts: Vec<String>,
    /// SCALE_BENCH_DIR (/tmp/gateway-scale-out-bench): the run's folder and results.json.
    dir: PathBuf,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(v) => v.parse().map_err(|_| anyhow::anyhow!("{key}={v} is not valid")),
        Err(_) => Ok(default),
    }
}

fn list(key: &str, default: &str) -> Vec<String> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let endpoints = list("SCALE_BENCH_ENDPOINTS", "1,2,3")
            .iter()
            .map(|n| n.parse().context("SCALE_BENCH_ENDPOINTS: numbers"))
            .collect::<anyhow::Result<Vec<usize>>>()?;
        let failover_cases = list("SCALE_BENCH_FAILOVER", "10:30,10:3,3:3")
            .iter()
            .map(|pair| {
                let (l, i) = pair.split_once(':').context("SCALE_BENCH_FAILOVER: LEASE:IDLE pairs")?;
                Ok((l.parse()?, i.parse()?))
            })
            .collect::<anyhow::Result<Vec<(u64, u64)>>>()?;
        let s = Settings {
            vms: env_or("SCALE_BENCH_VMS", 12)?,
            vm_mib: env_or("SCALE_BENCH_VM_MIB", 32)?,
            edges: env_or("SCALE_BENCH_EDGES", 4)?,
            endpoints,
            ops_threads: env_or("SCALE_BENCH_OPS_THREADS", 4)?,
            ops_secs: env_or("SCALE_BENCH_OPS_SECS", 3.0)?,
            failover_mib: env_or("SCALE_BENCH_FAILOVER_MIB", 48)?,
            failover_rate: env_or("SCALE_BENCH_FAILOVER_RATE", "64mbit".to_owned())?,
            failover_cases,
            parts: list("SCALE_BENCH_PARTS", "lifts,ops,failover"),
            dir: env_or("SCALE_BENCH_DIR", PathBuf::from("/tmp/gateway-scale-out-bench"))?,
        };
        ensure!(
            s.vms > 0 && s.edges > 0 && s.vm_mib >= 4,
            "VMS and EDGES > 0, VM_MIB >= 4"
        );
        ensure!(s.endpoints.iter().all(|&n| (1..=8).contains(&n)), "1 to 8 endpoints");
        Ok(s)
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

fn main() -> anyhow::Result<()> {
    let s = Settings::from_env()?;
    std::fs::create_dir_all(&s.dir)?;
    let run = tempfile::Builder::new().prefix("run.").tempdir_in(&s.dir)?;
    // The endpoints' QEMU user and PostgreSQL pass through the run's folder (0700 from
    // tempfile) to the datastore and sockets under it, as the tests' Cloud allows.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o711))?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results = json!({
        "unix_time": time_now(),
        "cores": cores,
        "load_average_before": load_average(),
        "settings": {
            "vms": s.vms, "vm_mib": s.vm_mib, "edges": s.edges, "ops_threads": s.ops_threads,
            "ops_secs": s.ops_secs, "failover_mib": s.failover_mib, "failover_rate": s.failover_rate,
        },
    });
    if s.runs("lifts") {
        results["lifts"] = lifts(&s, run.path(), cores)?;
    }
    if s.runs("ops") {
        results["inventory_ops"] = inventory_ops(&s, run.path())?;
    }
    if s.runs("failover") {
        results["failover"] = failovers(&s, run.path())?;
    }
    results["load_average_after"] = json!(load_average());
    let file = s.dir.join("results.json");
    std::fs::write(&file, serde_json::to_string_pretty(&results)? + "\n")?;
    print_tables(&results);
    println!("results: {}", file.display());
    Ok(())
}

/// The machine's 1-minute load average: other work on the same cores takes CPU from the
/// phases, which their "cores busy" (this run's processes only) does not show.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Seconds since the Unix epoch: when the run was, for results.json.
fn time_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// --- part 1: lifts -------------------------------------------------------------------

/// A VM for part 1: 1 MiB regions cycling random, text, random, zero.
fn lift_vm(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cycle = [Fill::Random, Fill::Text, Fill::Random, Fill::Zero];
    let regions: Vec<Fill> = (0..mib).map(|i| cycle[i % cycle.len()]).collect();
    let disk = format!("{name}.img");
    write_raw_disk(&dir.join(&disk), MIB, &regions, seed);
    write_vmx(dir, name, &[&disk], &[])
}

/// CPU time of the children this process has waited for (cutime + cstime of
/// /proc/self/stat): the edge processes of a phase, read before its endpoints are reaped.
fn reaped_children_cpu() -> Duration {
    let (_, reaped, _) = proc_ticks(std::process::id()).expect("/proc/self/stat");
    ticks(reaped)
}

/// Starts `n` endpoints esx-a, esx-b, ... of `domain`, each with `extra` settings on top
/// (and on SQLite, one endpoint with its own file instead of the database).
fn endpoints(domain: &Domain, n: usize, sqlite: bool, extra: &[(&'static str, String)]) -> Vec<EndpointProcess> {
    (0..n)
        .map(|i| {
            let host = format!("esx-{}", (b'a' + i as u8) as char);
            let mut env = domain.endpoint_env(&host);
            if sqlite {
                env.retain(|(k, _)| *k != "CLOUD_ENDPOINT_DATABASE_URL");
                let file = domain.root.join(&host).join("inventory.sqlite3");
                env.push(("CLOUD_ENDPOINT_DATABASE", file.display().to_string()));
            }
            env.extend(extra.iter().cloned());
            domain.start(&host, &env)
        })
        .collect()
}

fn lifts(s: &Settings, root: &Path, cores: usize) -> anyhow::Result<Value> {
    eprintln!(
        "[scale-out-bench] part 1: {} VMs of {} MiB, {} edges at once",
        s.vms, s.vm_mib, s.edges
    );
    let sources = root.join("vms");
    let vms: Vec<(String, PathBuf)> = (0..s.vms)
        .map(|i| {
            let name = format!("small{i:02}");
            let vmx = lift_vm(&sources.join(&name), &name, s.vm_mib, 1000 + i as u64);
            (name, vmx)
        })
        .collect();
    let mut phases = vec![("sqlite", 1)];
    phases.extend(s.endpoints.iter().map(|&n| ("postgresql", n)));
    let mut rows = Vec::new();
    for (engine, n) in phases {
        let label = format!("{n} endpoint{} on {engine}", if n > 1 { "s" } else { "" });
        eprintln!("[scale-out-bench]   {label}");
        let domain = Domain::with_binaries(&root.join(format!("lifts-{engine}-{n}")), e2e::wan::bin_dir());
        // The service's lease period and idle timeout: nothing fails over here.
        let service = [
            ("CLOUD_ENDPOINT_MIGRATION_LEASE_SECS", "10".to_owned()),
            ("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "30".to_owned()),
        ];
        let eps = endpoints(&domain, n, engine == "sqlite", &service);
        let addrs: Vec<SocketAddr> = eps.iter().map(|e| e.quic).collect();
        let cpu_ep0: Duration = eps.iter().map(EndpointProcess::cpu_time).sum();
        let cpu_edges0 = reaped_children_cpu();
        let cpu_db0 = if engine == "sqlite" {
            Duration::ZERO
        } else {
            domain.database_cpu()
        };
        let next = AtomicUsize::new(0);
        let start = Instant::now();
        let outcomes: Vec<(usize, std::process::Output)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..s.edges)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((name, vmx)) = vms.get(i) else { break };
                            // VM i names the endpoints starting at i mod n: the edge
                            // connects to the first that answers, so they take turns.
                            let order: Vec<SocketAddr> = (0..n).map(|k| addrs[(i + k) % n]).collect();
                            let state = domain.root.join("edges").join(name);
                            std::fs::create_dir_all(&state).expect("the edge's state folder");
                            let out = domain.migrate(&state, vmx, &order).output().expect("edge-agent starts");
                            done.push((i, out));
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        let wall = start.elapsed();
        let cpu_edges = reaped_children_cpu() - cpu_edges0;
        let cpu_ep = eps.iter().map(EndpointProcess::cpu_time).sum::<Duration>() - cpu_ep0;
        let cpu_db = if engine == "sqlite" {
            Duration::ZERO
        } else {
            domain.database_cpu() - cpu_db0
        };
        let mut per_endpoint = vec![0usize; n];
        for (i, out) in &outcomes {
            let (name, _) = &vms[*i];
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "{label}: the lift of {name} failed:\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
            let at = summary["endpoint"].as_str().unwrap_or_default();
            if let Some(k) = addrs.iter().position(|a| a.to_string() == at) {
                per_endpoint[k] += 1;
            }
            let copy = domain.datastore.join(name).join(format!("{name}.vmdk"));
            ensure!(
                images_identical(&sources.join(name).join(format!("{name}.img")), &copy),
                "{label}: {name} differs from its source"
            );
        }
        drop(eps);
        let bytes = (s.vms * s.vm_mib * MIB) as f64;
        let gib = bytes / f64::from(1u32 << 30);
        let busy = (cpu_ep + cpu_edges + cpu_db).as_secs_f64() / wall.as_secs_f64();
        rows.push(json!({
            "setup": label, "engine": engine, "endpoints": n,
            "wall_s": wall.as_secs_f64(),
            "migrations_per_min": s.vms as f64 * 60.0 / wall.as_secs_f64(),
            "logical_MBps": bytes / wall.as_secs_f64() / 1e6,
            "endpoints_cpu_s": cpu_ep.as_secs_f64(),
            "edges_cpu_s": cpu_edges.as_secs_f64(),
            "database_cpu_s": cpu_db.as_secs_f64(),
            "endpoints_cpu_s_per_gib": cpu_ep.as_secs_f64() / gib,
            "edges_cpu_s_per_gib": cpu_edges.as_secs_f64() / gib,
            "cores_busy": busy,
            "cores": cores,
            "migrations_per_endpoint": per_endpoint,
        }));
    }
    Ok(Value::Array(rows))
}

// --- part 2: inventory operations ----------------------------------------------------

/// A PostgreSQL server set up as a service would be (fsync and synchronous commit on),
/// unlike the tests' `TestPg` (off, for speed): the durable one is what the inventory's
/// figures should be compared against, since SQLite syncs its WAL at every commit.
struct DurablePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    url: String,
}

impl DurablePg {
    fn start() -> anyhow::Result<DurablePg> {
        let bin = pg_bin()?;
        let dir = tempfile::Builder::new().prefix("scale-out-bench-pg-").tempdir()?;
        if is_root() {
            // The server refuses to run as root: it runs as `postgres`, which owns its folder.
            check(Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()), "chown")?;
        }
        let data = dir.path().join("data");
        let mut initdb = as_postgres(&bin, "initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        check(&mut initdb, "initdb")?;
        let mut start = as_postgres(&bin, "pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!("-k {} -c listen_addresses= -p 5432", dir.path().display()))
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "start"]);
        check(&mut start, "pg_ctl start")?;
        let url = format!("host={} port=5432 user=postgres dbname=postgres", dir.path().display());
        Ok(DurablePg { dir, bin, url })
    }
}

impl Drop for DurablePg {
    fn drop(&mut self) {
        let mut stop = as_postgres(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The newest PostgreSQL server's binaries (Debian's layout, as `TestPg` finds them).
fn pg_bin() -> anyhow::Result<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL's server is not installed: run tests/setup.sh")?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .max()
        .map(|(_, bin)| bin)
        .context("no /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    proc_uid() == Some(0)
}

fn proc_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn as_postgres(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(program));
        cmd
    } else {
        Command::new(bin.join(program))
    }
}

fn check(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{what} starts"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn operator() -> Principal {
    Principal {
        user: MIGRATOR.into(),
        role: Role::MigrationOperator,
    }
}

const LEASE: Duration = Duration::from_secs(10);

/// A migration begun as the endpoint begins one: its name reserved and its first lease
/// written in one transaction.
fn begin(inv: &Inventory, name: &str, owner: &str) -> anyhow::Result<String> {
    Ok(inv.begin_migration_on(
        &operator(),
        "bench-edge",
        name,
        1 << 30,
        &[],
        &|_, _| Ok(u64::MAX),
        Some((owner, LEASE)),
    )?)
}

/// `VMS` registered VMs (two disks, two NICs) and `MIGRATIONS` failed migrations, so that
/// the reads list the same rows on both engines.
const SEED_VMS: usize = 50;
const SEED_MIGRATIONS: usize = 200;

fn seed(inv: &Inventory) -> anyhow::Result<()> {
    let nets = inv.networks()?;
    for i in 0..SEED_VMS {
        let name = format!("seed{i:03}");
        let disk = |slot: &str, file: &str| NewDisk {
            key: slot.into(),
            path: format!("[cloud-ds1] {name}/{file}"),
            capacity_bytes: 1 << 30,
            datastore: None,
        };
        let nic = |k: usize| NewNic {
            key: format!("ethernet{k}"),
            network_id: nets[k % nets.len()].id.clone(),
            mac: Some(format!("00:50:56:{k:02x}:00:{i:02x}")),
            virtual_dev: Some("vmxnet3".into()),
            address_type: Some("static".into()),
            source_network: "VM Network".into(),
        };
        let vm = NewVm {
            name: name.clone(),
            guest_os: "debian12-64".into(),
            num_cpus: 2,
            cores_per_socket: Some(1),
            memory_mib: 2048,
            firmware: Some("bios".into()),
            bios_uuid: None,
            vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
            disks: vec![
                disk("scsi0:0", &format!("{name}.vmdk")),
                disk("scsi0:1", &format!("{name}_1.vmdk")),
            ],
            controllers: Vec::new(),
            nics: vec![nic(0), nic(1)],
            firewall: Default::default(),
            placement: Default::default(),
        };
        let migration = begin(inv, &name, "seeder")?;
        inv.register_vm(&migration, &vm, |_| Ok("benchmark seed: no receipt".into()))?;
    }
    for i in 0..SEED_MIGRATIONS {
        let id = begin(inv, &format!("seed-failed{i:03}"), "seeder")?;
        inv.fail_migration(&id, "benchmark seed")?;
    }
    Ok(())
}

/// Runs `op` on `threads` threads for `secs`; `op(thread, iteration)` returns the
/// operations it did. Returns (operations per second, errors, the first error).
fn timed(
    threads: usize,
    secs: f64,
    op: impl Fn(usize, usize) -> anyhow::Result<usize> + Sync,
) -> (f64, usize, Option<String>) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let counts: Vec<(usize, usize, Option<String>)> = std::thread::scope(|scope| {
        let op = &op;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let (mut ops, mut errors, mut first) = (0, 0, None);
                    let mut i = 0;
                    while Instant::now() < end {
                        match op(t, i) {
                            Ok(n) => ops += n,
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                        }
                        i += 1;
                    }
                    (ops, errors, first)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let ops: usize = counts.iter().map(|c| c.0).sum();
    let errors = counts.iter().map(|c| c.1).sum();
    let first = counts.into_iter().find_map(|c| c.2);
    (ops as f64 / elapsed, errors, first)
}

/// Leases each renewal round renews: one endpoint's keeper renews every lease it holds
/// in one transaction.
const LEASES_PER_ROUND: usize = 50;

/// (commits, rollbacks) of the PostgreSQL server at `url` so far (pg_stat_database, all
/// databases): a rollback is a transaction that lost a race and ran again, or failed.
fn pg_xacts(url: &str) -> Option<(u64, u64)> {
    let host = url.split_whitespace().find_map(|kv| kv.strip_prefix("host="))?;
    let out = Command::new(pg_bin().ok()?.join("psql"))
        .args(["-h", host, "-U", "postgres", "-d", "postgres", "-At", "-c"])
        .arg("SELECT sum(xact_commit), sum(xact_rollback) FROM pg_stat_database")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (c, r) = text.trim().split_once('|')?;
    Some((c.parse().ok()?, r.parse().ok()?))
}

/// One kind of operation's figures: per second, errors (after the store's own retries),
/// and on PostgreSQL the transactions rolled back per operation (lost races run again).
fn op_row(
    kind: &str,
    (per_s, errors, first): (f64, usize, Option<String>),
    xacts: Option<((u64, u64), (u64, u64))>,
) -> Value {
    let (commits, rollbacks) = xacts.map_or((None, None), |((c0, r0), (c1, r1))| (Some(c1 - c0), Some(r1 - r0)));
    json!({"op": kind, "per_s": per_s, "errors": errors, "first_error": first,
           "commits": commits, "rollbacks": rollbacks})
}

fn ops_on(
    label: &str,
    inv: Inventory,
    url: Option<&str>,
    threads: usize,
    secs: f64,
    cpu: &dyn Fn() -> Duration,
) -> anyhow::Result<Value> {
    eprintln!("[scale-out-bench]   {label}");
    seed(&inv)?;
    let inv = Arc::new(inv);
    let xacts = || url.and_then(pg_xacts);
    let cpu0 = cpu();
    let mut ops = Vec::new();
    // Reads: what the API and dashboard ask most.
    let before = xacts();
    let reads = timed(threads, secs, |_, i| {
        if i % 2 == 0 {
            inv.list_vms()?;
        } else {
            inv.list_migrations()?;
        }
        Ok(1)
    });
    ops.push(op_row("reads", reads, before.zip(xacts())));
    // A migration begun (name reserved, first lease) and failed: two write transactions.
    let before = xacts();
    let begins = timed(threads, secs, |t, i| {
        let id = begin(&inv, &format!("ops-{t}-{i}"), "esx-bench")?;
        inv.fail_migration(&id, "benchmark")?;
        Ok(1)
    });
    ops.push(op_row("begin+fail", begins, before.zip(xacts())));
    // One renewal round of 50 leases per call, as each endpoint's keeper runs it; each
    // thread is another endpoint, renewing its own leases.
    let held: Vec<Vec<(String, i64)>> = (0..threads)
        .map(|t| {
            (0..LEASES_PER_ROUND)
                .map(|k| Ok((begin(&inv, &format!("lease-{t}-{k}"), &format!("keeper-{t}"))?, 1)))
                .collect::<anyhow::Result<_>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let before = xacts();
    let rounds = timed(threads, secs, |t, _| {
        let answers = inv.renew_leases(&held[t], &format!("keeper-{t}"), LEASE, LeaseClock::Database)?;
        ensure!(
            answers.iter().all(Result::is_ok),
            "a lease was not renewed: {answers:?}"
        );
        Ok(1)
    });
    ops.push(op_row("renew 50 leases", rounds, before.zip(xacts())));
    Ok(json!({
        "engine": label,
        "ops": ops,
        "server_cpu_s": (cpu() - cpu0).as_secs_f64(),
    }))
}

fn inventory_ops(s: &Settings, root: &Path) -> anyhow::Result<Value> {
    eprintln!(
        "[scale-out-bench] part 2: inventory operations, {} threads, {} s each",
        s.ops_threads, s.ops_secs
    );
    let mut domain = DomainConfig::default();
    domain.host.name = "esx-bench".into();
    let none = || Duration::ZERO;
    let sqlite = Inventory::open(&root.join("ops.sqlite3"), &domain)?;
    let mut rows = vec![ops_on("SQLite (WAL)", sqlite, None, s.ops_threads, s.ops_secs, &none)?];
    let durable = DurablePg::start()?;
    let data = durable.dir.path().join("data");
    let pg_cpu = || postgres_cpu(&data);
    let pg = Inventory::open_postgres(&durable.url, &domain)?;
    rows.push(ops_on(
        "PostgreSQL",
        pg,
        Some(&durable.url),
        s.ops_threads,
        s.ops_secs,
        &pg_cpu,
    )?);
    drop(durable);
    let test = TestPg::start();
    let pg = Inventory::open_postgres(&test.url, &domain)?;
    let test_data = Path::new(
        test.url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("host="))
            .unwrap_or("/"),
    )
    .join("data");
    let test_cpu = || postgres_cpu(&test_data);
    rows.push(ops_on(
        "PostgreSQL fsync=off",
        pg,
        Some(&test.url),
        s.ops_threads,
        s.ops_secs,
        &test_cpu,
    )?);
    Ok(Value::Array(rows))
}

// --- part 3: failover ----------------------------------------------------------------

/// A line of the edge's standard output, and when it came.
struct Said {
    at: Instant,
    line: Value,
}

fn failovers(s: &Settings, root: &Path) -> anyhow::Result<Value> {
    eprintln!(
        "[scale-out-bench] part 3: failover of a {} MiB lift at {}",
        s.failover_mib, s.failover_rate
    );
    let mut rows = Vec::new();
    for &(lease, idle) in &s.failover_cases {
        eprintln!("[scale-out-bench]   lease {lease} s, idle timeout {idle} s");
        rows.push(failover(
            s,
            &root.join(format!("failover-{lease}-{idle}")),
            lease,
            idle,
        )?);
    }
    Ok(Value::Array(rows))
}

fn failover(s: &Settings, root: &Path, lease: u64, idle: u64) -> anyhow::Result<Value> {
    let domain = Domain::with_binaries(root, e2e::wan::bin_dir());
    let extra = [
        ("CLOUD_ENDPOINT_MIGRATION_LEASE_SECS", lease.to_string()),
        ("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", idle.to_string()),
    ];
    let mut eps = endpoints(&domain, 2, false, &extra);
    let (a, b) = (eps[0].quic, eps[1].quic);
    let name = "big01";
    let src = root.join("src");
    let vmx = e2e::scale_out::vm(&src, name, s.failover_mib, 77);
    let total = (s.failover_mib * MIB) as u64;
    let mut cmd = domain.migrate(root, &vmx, &[a, b]);
    cmd.arg("--max-rate")
        .arg(&s.failover_rate)
        .arg("--retry-for")
        .arg("300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut edge = cmd.spawn().context("edge-agent starts")?;
    let (tx, rx) = mpsc::channel();
    let stdout = edge.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = serde_json::from_str(&line).unwrap_or(Value::String(line));
            let _ = tx.send(Said {
                at: Instant::now(),
                line,
            });
        }
    });
    let stderr = edge.stderr.take().expect("piped");
    let err_log = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut all);
        all
    });
    let reader = domain.inventory();
    let mut said: Vec<Said> = Vec::new();
    let done = |said: &[Said]| {
        said.iter()
            .filter(|l| l.line["event"] == "progress")
            .filter_map(|l| l.line["done_bytes"].as_u64())
            .max()
            .unwrap_or(0)
    };
    // The kill: at 30 % of the disk, as the edge reports it (one line a second).
    let started = Instant::now();
    while done(&said) < total * 3 / 10 {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the lift made no progress"
        );
        ensure!(edge.try_wait()?.is_none(), "the lift ended before 30 %");
        said.extend(rx.recv_timeout(Duration::from_millis(100)).ok());
    }
    let done_at_kill = done(&said);
    let killed = Instant::now();
    // Dropping the process sends SIGKILL: no drain, no release of its lease.
    drop(eps.remove(0));
    let mut resumed_at: Option<Instant> = None;
    let mut lease_gone_at: Option<Instant> = None;
    loop {
        while let Ok(line) = rx.try_recv() {
            said.push(line);
        }
        if resumed_at.is_none() && eps[0].log().iter().any(|l| l.contains("migration resumed")) {
            resumed_at = Some(Instant::now());
        }
        if lease_gone_at.is_none() && reader.leases_held_by("esx-a", LeaseClock::Database)?.is_empty() {
            lease_gone_at = Some(Instant::now());
        }
        if edge.try_wait()?.is_some() {
            break;
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(300),
            "the lift did not end 300 s after the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    said.extend(rx.iter());
    let status = edge.wait()?;
    let stderr = err_log.join().unwrap_or_default();
    let summary = said
        .iter()
        .rev()
        .find(|l| l.line["event"] == "summary")
        .map(|l| l.line.clone());
    let Some(summary) = summary.filter(|_| status.success()) else {
        let lines: Vec<String> = said.iter().map(|l| l.line.to_string()).collect();
        bail!("the failover lift failed:\n{}\n{stderr}", lines.join("\n"));
    };
    ensure!(
        images_identical(
            &src.join(format!("{name}.img")),
            &domain.datastore.join(name).join(format!("{name}.vmdk"))
        ),
        "the failed-over copy differs from its source"
    );
    let after = |at: Instant| at.checked_duration_since(killed).map(|d| d.as_secs_f64());
    let waiting: Vec<&Said> = said
        .iter()
        .filter(|l| l.line["event"] == "waiting" && l.at >= killed)
        .collect();
    let message = |l: &&Said| l.line["message"].as_str().unwrap_or_default().to_owned();
    let noticed = waiting.iter().find(|l| message(l).starts_with("lost endpoint"));
    let busy = waiting
        .iter()
        .filter(|l| message(l).contains("refused to resume it yet"))
        .count();
    let progress_again = said
        .iter()
        .filter(|l| l.at >= killed && l.line["event"] == "progress")
        .find(|l| l.line["done_bytes"].as_u64().unwrap_or(0) > done_at_kill);
    Ok(json!({
        "lease_s": lease,
        "idle_timeout_s": idle,
        "killed_at_fraction": done_at_kill as f64 / total as f64,
        "edge_noticed_s": noticed.and_then(|l| after(l.at)),
        "lease_expired_s": lease_gone_at.and_then(after),
        "resumed_at_b_s": resumed_at.and_then(after),
        "progress_again_s": progress_again.and_then(|l| after(l.at)),
        "busy_refusals": busy,
        "target_s": 2 * lease,
        "finished_at": summary["endpoint"],
        "endpoint_b": b.to_string(),
        "failovers": summary["failovers"],
        "resumed_bytes": summary["resumed_bytes"],
        "resent_bytes": summary["resent_bytes"],
        "messages": waiting.iter().map(message).collect::<Vec<_>>(),
    }))
}

// --- the tables ----------------------------------------------------------------------

fn f(v: &Value, key: &str, digits: usize) -> String {
    v[key]
        .as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn print_tables(r: &Value) {
    let cores = r["cores"].as_u64().unwrap_or(0);
    if let Some(rows) = r["lifts"].as_array() {
        let st = &r["settings"];
        println!(
            "\n1. Lifts: {} VMs of {} MiB by {} edge processes at once ({cores} cores)",
            st["vms"], st["vm_mib"], st["edges"]
        );
        println!(
            "{:<26} {:>7} {:>9} {:>7} {:>12} {:>12} {:>9} {:>10} {:>10}",
            "setup", "wall s", "migr/min", "MB/s", "endpoints s", "edges CPU s", "db CPU s", "cores busy", "spread"
        );
        for row in rows {
            let spread: Vec<String> = row["migrations_per_endpoint"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| n.to_string())
                .collect();
            println!(
                "{:<26} {:>7} {:>9} {:>7} {:>12} {:>12} {:>9} {:>10} {:>10}",
                row["setup"].as_str().unwrap_or_default(),
                f(row, "wall_s", 2),
                f(row, "migrations_per_min", 1),
                f(row, "logical_MBps", 1),
                f(row, "endpoints_cpu_s", 2),
                f(row, "edges_cpu_s", 2),
                f(row, "database_cpu_s", 2),
                format!("{} of {cores}", f(row, "cores_busy", 2)),
                spread.join("/"),
            );
        }
        println!(
            "load average (every process of the machine) before / after the run: {} / {}",
            r["load_average_before"], r["load_average_after"]
        );
        let busiest = rows.iter().filter_map(|r| r["cores_busy"].as_f64()).fold(0.0, f64::max);
        println!(
            "Every endpoint, edge and the database share these {cores} cores (nproc): more endpoint processes \
             add no CPU, so the ceiling here is the CPU, not the endpoint count; the busiest phase kept {busiest:.2} \
             of {cores} cores busy{}.",
            if busiest < 0.8 * cores as f64 {
                " (below the ceiling: each small migration's fixed steps, login, plan, commit and its syncs, \
                 leave cores idle; bigger VMs or more edges reach it)"
            } else {
                ""
            }
        );
    }
    if let Some(rows) = r["inventory_ops"].as_array() {
        println!(
            "\n2. Inventory operations per second ({} threads on one Inventory; a renewal round is one \
             transaction renewing 50 leases)",
            r["settings"]["ops_threads"]
        );
        println!(
            "{:<22} {:<16} {:>9} {:>12} {:>7} {:>20}",
            "engine", "operation", "per s", "vs SQLite", "errors", "rollbacks per op"
        );
        let sqlite = rows.first().cloned().unwrap_or_default();
        for row in rows {
            let engine = row["engine"].as_str().unwrap_or_default();
            for (k, op) in row["ops"].as_array().into_iter().flatten().enumerate() {
                let base = sqlite["ops"][k]["per_s"].as_f64().filter(|b| *b > 0.0);
                let ratio = base
                    .zip(op["per_s"].as_f64())
                    .map_or("-".into(), |(b, p)| format!("{:.2}x", p / b));
                let per_op = match (op["rollbacks"].as_f64(), op["per_s"].as_f64()) {
                    (Some(rb), Some(p)) if p > 0.0 => {
                        let n = p * r["settings"]["ops_secs"].as_f64().unwrap_or(1.0);
                        format!("{:.2}", rb / n)
                    }
                    _ => "-".into(),
                };
                println!(
                    "{:<22} {:<16} {:>9} {:>12} {:>7} {:>20}",
                    if k == 0 { engine } else { "" },
                    op["op"].as_str().unwrap_or_default(),
                    f(op, "per_s", 0),
                    ratio,
                    op["errors"],
                    per_op
                );
                if let Some(e) = op["first_error"].as_str() {
                    println!("    first error: {e}");
                }
            }
        }
    }
    if let Some(rows) = r["failover"].as_array() {
        println!(
            "\n3. Failover: endpoint A killed (SIGKILL) at ~30 % of a {} MiB lift at {}; seconds after the kill",
            r["settings"]["failover_mib"],
            r["settings"]["failover_rate"].as_str().unwrap_or_default()
        );
        println!(
            "{:>7} {:>6} {:>14} {:>14} {:>12} {:>14} {:>6} {:>9} {:>8}",
            "lease s",
            "idle s",
            "edge noticed",
            "lease expired",
            "resumed at B",
            "progress again",
            "busy",
            "target s",
            "verdict"
        );
        for row in rows {
            let resumed = row["resumed_at_b_s"].as_f64();
            let target = row["target_s"].as_f64().unwrap_or(0.0);
            let verdict = match resumed {
                Some(t) if t < target => "under",
                Some(_) => "OVER",
                None => "?",
            };
            println!(
                "{:>7} {:>6} {:>14} {:>14} {:>12} {:>14} {:>6} {:>9} {:>8}",
                row["lease_s"],
                row["idle_timeout_s"],
                f(row, "edge_noticed_s", 2),
                f(row, "lease_expired_s", 2),
                f(row, "resumed_at_b_s", 2),
                f(row, "progress_again_s", 2),
                row["busy_refusals"],
                target,
                verdict
            );
        }
        println!(
            "edge noticed: the edge's 'lost endpoint' line (the transport idle timeout, the smaller of both sides'); \
             lease expired: A's lease gone from the database; resumed at B: B's 'migration resumed' log line; \
             progress again: the edge's next progress line past the kill point (one a second); busy: resumes \
             B refused while A's lease was live; target: 2x the lease period."
        );
    }
}
