//! Damaged sources are refused, never lifted as something else. Sources are made by
//! `qemu-img`, then cut short or overwritten: a flat VMDK whose extent lost its second half,
//! a qcow2 and sparse VMDKs whose magic was overwritten, a raw disk under a name that claims
//! nothing (taken only with `--raw-disk`), and sources that turn out damaged mid-transfer
//! (a corrupt compressed grain or cluster, a sparse VMDK cut while it is read). Each ends with
//! no VM in the inventory, nothing in `<datastore>/.staging`, and the name free: a correct
//! lift of the same name then succeeds and `qemu-img compare` says identical.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::*;
use edge_agent::migrate::{self, MigrateOptions};
use edge_agent::report::{Progress, ProgressSink};
use edge_agent::source;
use gateway::transport::Rate;

const MIB: usize = 1 << 20;

/// A raw disk of `mib` MiB regions of `fill`, one region in eight a hole.
fn raw_disk(path: &Path, mib: usize, fill: Fill, seed: u64) {
    let regions: Vec<Fill> = (0..mib).map(|i| if i % 8 == 7 { Fill::Zero } else { fill }).collect();
    write_raw_disk(path, MIB, &regions, seed);
}

/// `raw` converted by qemu-img into `out` with `args`.
fn convert(raw: &Path, out: &Path, args: &[&str]) {
    let mut all = vec!["convert", "-q", "-f", "raw"];
    all.extend_from_slice(args);
    all.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&all);
}

fn truncate(path: &Path, len: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::File::options().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn le32(path: &Path, at: u64) -> u64 {
    u64::from(u32::from_le_bytes(read_at(path, at, 4).try_into().unwrap()))
}

fn be64(path: &Path, at: u64) -> u64 {
    u64::from_be_bytes(read_at(path, at, 8).try_into().unwrap())
}

/// What a user checks after a refused or aborted lift of `name`: no VM, no staging left,
/// and no migration of that name still holding it.
async fn assert_nothing_left(cloud: &Cloud, name: &str) {
    assert!(
        cloud.domain.inventory.vm_by_name(name).unwrap().is_none(),
        "{name} registered"
    );
    let settled = eventually(10, || {
        let staging = cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/"));
        let running = cloud
            .domain
            .inventory
            .list_migrations()
            .unwrap()
            .iter()
            .any(|m| m.vm_name == name && m.state == "RUNNING");
        (!staging && !running).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "left behind: {:?} {:?}",
        cloud.datastore_entries(),
        cloud.domain.inventory.list_migrations().unwrap()
    );
}

/// The cloud's copy of `name`'s first disk is identical to `source`.
fn assert_landed(cloud: &Cloud, name: &str, source: &Path) {
    let vm = cloud.domain.inventory.vm_by_name(name).unwrap().expect("registered");
    assert_eq!(vm.disks.len(), 1);
    assert!(images_identical(
        source,
        &cloud.root.join(name).join(format!("{name}.vmdk"))
    ));
}

/// `edge-agent COMMAND --vmx VMX` with the endpoint, credential and TLS of the tests, and
/// `extra` arguments.
fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, command: &str, vmx: &Path, state: &Path, extra: &[&str]) -> Command {
    edge_command(bin, pki, cloud, vmx, state, &[&[command], extra].concat())
}

/// Runs `cmd` in the blocking pool (the endpoint runs on this runtime); returns whether it
/// succeeded and its stderr.
async fn run(mut cmd: Command) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_vmdk_cut_in_half_is_refused_at_inspect_plan_and_migrate() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let raw = src.join("reference.raw");
    raw_disk(&raw, 8, Fill::Random, 31);
    let vmdk = src.join("web01.vmdk");
    convert(&raw, &vmdk, &["-O", "vmdk", "-o", "subformat=monolithicFlat"]);
    let flat = src.join("web01-flat.vmdk");
    truncate(&flat, 4 * MIB as u64);
    let vmx = write_vmx(&src, "web01", &["web01.vmdk"], &[]);

    let inspect = Command::new(bin.join("edge-agent"))
        .arg("inspect")
        .arg(&vmx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&inspect.stderr);
    assert!(!inspect.status.success());
    let what = "web01-flat.vmdk is 4194304 bytes, but line";
    assert!(
        stderr.contains(what) && stderr.contains("declares 8388608 bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("cut short"), "{stderr}");
    for command in ["plan", "migrate"] {
        let (ok, stderr) = run(edge(&bin, &pki, &cloud, command, &vmx, &state, &[])).await;
        assert!(
            !ok && stderr.contains(what) && stderr.contains("declares 8388608 bytes"),
            "{command}: {stderr}"
        );
    }
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().is_empty(),
        "never reached the cloud"
    );
    assert_nothing_left(&cloud, "web01").await;

    // The whole extent copied again: the same name lifts, identical.
    convert(&raw, &vmdk, &["-O", "vmdk", "-o", "subformat=monolithicFlat"]);
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "migrate", &vmx, &state, &[])).await;
    assert!(ok, "{stderr}");
    assert_landed(&cloud, "web01", &raw);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_magic_is_refused_and_a_raw_disk_is_taken_only_when_asked() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let raw = src.join("reference.raw");
    raw_disk(&raw, 6, Fill::Random, 32);

    // A qcow2 and a sparse VMDK, each with one byte of its magic overwritten.
    for (name, file, args, at, byte, found) in [
        (
            "db01",
            "db01.qcow2",
            vec!["-O", "qcow2"],
            3,
            0u8,
            "its name says a qcow2 image but its content is not",
        ),
        (
            "app01",
            "app01.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=monolithicSparse"],
            0,
            b'X',
            "its name says a VMDK",
        ),
        (
            "ova01",
            "ova01.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
            1,
            b'X',
            "one byte off sparse VMDK's `KDMV` magic",
        ),
    ] {
        let disk = src.join(file);
        convert(&raw, &disk, &args);
        overwrite(&disk, at, &[byte]);
        let vmx = write_vmx(&src, name, &[file], &[]);
        let (ok, stderr) = run(edge(&bin, &pki, &cloud, "migrate", &vmx, &state, &[])).await;
        assert!(!ok, "{name} lifted");
        assert!(stderr.contains(file) && stderr.contains(found), "{name}: {stderr}");
        assert!(stderr.contains("its first bytes are"), "{name}: {stderr}");
        assert!(
            stderr.contains("restore it from the source datastore"),
            "{name}: {stderr}"
        );
        assert_nothing_left(&cloud, name).await;
        // Restored, the same name lifts.
        convert(&raw, &disk, &args);
        let (ok, stderr) = run(edge(&bin, &pki, &cloud, "migrate", &vmx, &state, &[])).await;
        assert!(ok, "{name}: {stderr}");
        assert_landed(&cloud, name, &raw);
    }
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().len() == 3,
        "only the good lifts reached the cloud"
    );

    // A raw disk under a name that claims nothing: refused with the flag to use...
    std::fs::copy(&raw, src.join("export.bin")).unwrap();
    let vmx = write_vmx(&src, "bin01", &["export.bin"], &[]);
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "plan", &vmx, &state, &[])).await;
    assert!(!ok && stderr.contains("no known disk format"), "{stderr}");
    assert!(stderr.contains("take it as one with `--raw-disk scsi0:0`"), "{stderr}");
    // ...a key the VM does not have is a mistake, not ignored...
    let both = ["--raw-disk", "scsi0:0", "--raw-disk", "scsi0:1"];
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "plan", &vmx, &state, &both)).await;
    assert!(
        !ok && stderr.contains("the VM has no disk scsi0:1 (its disks: scsi0:0)"),
        "{stderr}"
    );
    // ...and taken as raw when asked; its receipt verifies with the same flag.
    let inspect = Command::new(bin.join("edge-agent"))
        .args(["inspect", "--raw-disk", "scsi0:0"])
        .arg(&vmx)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        inspect.status.success() && stdout.contains("read as a raw image, as --raw-disk scsi0:0 asks"),
        "{stdout}"
    );
    let (ok, stderr) = run(edge(
        &bin,
        &pki,
        &cloud,
        "migrate",
        &vmx,
        &state,
        &["--raw-disk", "scsi0:0"],
    ))
    .await;
    assert!(ok, "{stderr}");
    assert_landed(&cloud, "bin01", &raw);
    let verify = Command::new(bin.join("edge-agent"))
        .arg("verify-receipt")
        .arg("--receipt")
        .arg(state.join("receipt.json"))
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .args(["--raw-disk", "scsi0:0"])
        .arg(&vmx)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    cloud.stop().await;
}

/// Remembers how far the migration got.
#[derive(Default)]
struct Last(Mutex<u64>);

impl ProgressSink for Last {
    fn started(&self, _: &str, _: &str, _: u64) {}
    fn progress(&self, p: &Progress) {
        *self.0.lock().unwrap() = p.done_bytes;
    }
}

/// Lifts `vmx` in-process and expects the source to be found damaged mid-transfer: the
/// error names `file` and says the cloud discarded the copy and freed the name. `while_running`
/// runs once a tenth of the disk is done (or the lift has ended).
async fn lift_finds_damage(
    cloud: &Cloud,
    pki: &Pki,
    vmx: &Path,
    file: &str,
    opts: MigrateOptions,
    while_running: impl FnOnce(),
) {
    let vm = source::open_vm(vmx).expect("the damage is not visible at open");
    let total: u64 = vm.disks.iter().map(|d| d.capacity).sum();
    let name = vm.name.clone();
    let target = cloud.target(pki, MIGRATOR, DEMO_PASSWORD);
    let sink = Arc::new(Last::default());
    let lift = {
        let sink = sink.clone();
        tokio::spawn(async move { migrate::run(&vm, &target, &opts, sink).await })
    };
    let t0 = Instant::now();
    while *sink.0.lock().unwrap() < total / 10 && !lift.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while_running();
    let err = lift
        .await
        .unwrap()
        .expect_err("a damaged source is not lifted")
        .to_string();
    println!("{file}: {err}");
    assert!(
        err.contains("disk scsi0:0 at offset") && err.contains("is damaged"),
        "{err}"
    );
    assert!(err.contains(file), "{err}");
    assert!(err.contains("the cloud discarded its partial copy"), "{err}");
    assert!(err.contains(&format!("the name \"{name}\" is free again")), "{err}");
    let migration = cloud.domain.inventory.list_migrations().unwrap();
    let last = migration
        .iter()
        .rev()
        .find(|m| m.vm_name == name)
        .expect("it reached the cloud");
    assert_ne!(last.state, "SUCCEEDED");
    assert_nothing_left(cloud, &name).await;
}

/// The byte offset of grain `grain`'s compressed data in a streamOptimized VMDK made by
/// qemu-img (its header records where the grain directory is).
fn stream_grain_data(path: &Path, grain: u64) -> u64 {
    let gd = le32(path, 56) * 512;
    let gt = le32(path, gd + 4 * (grain / 512)) * 512;
    let sector = le32(path, gt + 4 * (grain % 512));
    assert!(sector > 1, "grain {grain} is allocated");
    sector * 512 + 12
}

/// The byte offset of guest cluster `cluster`'s compressed data in a compressed qcow2.
fn qcow2_cluster_data(path: &Path, cluster: u64) -> u64 {
    let cluster_bits = be64(path, 16) & 0xffff_ffff;
    let l1 = be64(path, 40);
    let l2 = be64(path, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(path, l2 + 8 * cluster);
    assert!(entry & (1 << 62) != 0, "cluster {cluster} is compressed");
    entry & ((1 << (62 - (cluster_bits - 8))) - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_found_damaged_mid_transfer_is_aborted_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Compressible, so that qemu-img stores qcow2 clusters compressed.
    let raw = src.join("text.raw");
    raw_disk(&raw, 16, Fill::Text, 33);
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);

    // A streamOptimized grain and a compressed qcow2 cluster at 10 MiB, garbled.
    type Locate = fn(&Path, u64) -> u64;
    let cases: [(&str, &str, Vec<&str>, Locate, u64); 2] = [
        (
            "so01",
            "so01.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
            stream_grain_data,
            160,
        ),
        ("qc01", "qc01.qcow2", vec!["-O", "qcow2", "-c"], qcow2_cluster_data, 160),
    ];
    for (name, file, args, locate, unit) in cases {
        let disk = src.join(file);
        convert(&raw, &disk, &args);
        overwrite(&disk, locate(&disk, unit) + 100, &[0x55; 64]);
        let vmx = write_vmx(&src, name, &[file], &[]);
        lift_finds_damage(&cloud, &pki, &vmx, file, MigrateOptions::default(), || {}).await;
        convert(&raw, &disk, &args);
        migrate(&vmx, &target, &MigrateOptions::default())
            .await
            .expect("the repaired source lifts");
        assert_landed(&cloud, name, &raw);
    }

    // A monolithicSparse VMDK cut in half while it is read (a copy still being made over
    // it, a datastore filling up): what was opened whole ends early. Incompressible, so the
    // rate cap holds the transfer for long enough.
    let raw = src.join("random.raw");
    raw_disk(&raw, 32, Fill::Random, 35);
    let disk = src.join("cut01.vmdk");
    let args = ["-O", "vmdk", "-o", "subformat=monolithicSparse"];
    convert(&raw, &disk, &args);
    let vmx = write_vmx(&src, "cut01", &["cut01.vmdk"], &[]);
    let slow = MigrateOptions {
        max_rate: Some("48mbit".parse::<Rate>().unwrap()),
        // One reader and one stream: what is read ahead of the cap stays a few chunks.
        workers: 1,
        streams: Some(1),
        ..MigrateOptions::default()
    };
    let len = std::fs::metadata(&disk).unwrap().len();
    let cut = disk.clone();
    lift_finds_damage(&cloud, &pki, &vmx, "cut01.vmdk", slow, move || truncate(&cut, len / 2)).await;
    convert(&raw, &disk, &args);
    migrate(&vmx, &target, &MigrateOptions::default())
        .await
        .expect("the whole copy lifts");
    assert_landed(&cloud, "cut01", &raw);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_a_resume_can_fix_pauses_the_migration_and_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // A twoGbMaxExtentFlat-like disk of 80 extents of 256 KiB: more than the agent keeps
    // open, so each read opens its extent, and one taken away mid-transfer is an open
    // error (not found), not damage.
    let raw = src.join("reference.raw");
    raw_disk(&raw, 20, Fill::Random, 34);
    let data = std::fs::read(&raw).unwrap();
    let mut descriptor = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n",
    );
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        let file = format!("big-f{:03}.vmdk", i + 1);
        std::fs::write(src.join(&file), piece).unwrap();
        descriptor.push_str(&format!("RW {} FLAT \"{file}\" 0\n", piece.len() / 512));
    }
    std::fs::write(src.join("big.vmdk"), descriptor).unwrap();
    let vmx = write_vmx(&src, "big01", &["big.vmdk"], &[]);
    let state = tmp.path().join("state");
    let opts = MigrateOptions {
        max_rate: Some("48mbit".parse::<Rate>().unwrap()),
        // One reader and one stream: what is read ahead of the cap stays a few chunks.
        workers: 1,
        streams: Some(1),
        state_dir: Some(state.clone()),
        ..MigrateOptions::default()
    };
    let vm = source::open_vm(&vmx).unwrap();
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let sink = Arc::new(Last::default());
    let lift = {
        let (sink, opts, target) = (sink.clone(), opts.clone(), target.clone());
        tokio::spawn(async move { migrate::run(&vm, &target, &opts, sink).await })
    };
    let t0 = Instant::now();
    while *sink.0.lock().unwrap() < 2 * MIB as u64 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let piece = src.join("big-f070.vmdk");
    let away = src.join("big-f070.vmdk.away");
    std::fs::rename(&piece, &away).unwrap();
    let err = lift.await.unwrap().expect_err("an extent is missing").to_string();
    println!("{err}");
    assert!(
        err.contains("big-f070.vmdk") && err.contains("is paused and kept on both sides"),
        "{err}"
    );
    assert!(err.contains("the name \"big01\" stays reserved"), "{err}");
    let running = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(running[0].state, "RUNNING", "{running:?}");
    assert!(cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")));

    // The extent back, the same command resumes and finishes.
    std::fs::rename(&away, &piece).unwrap();
    let vm = source::open_vm(&vmx).unwrap();
    let summary = migrate::run(&vm, &target, &opts, Arc::new(Last::default()))
        .await
        .expect("resumed");
    assert!(summary.resumed_bytes > 0, "{summary:?}");
    assert_landed(&cloud, "big01", &raw);
    cloud.stop().await;
}

/// A migration left paused (the edge killed), whose source is then found cut short: the
/// next `edge-agent migrate` refuses it before anything moves, and `edge-agent abort` with
/// the same arguments still discards the cloud's partial copy and frees the name, though
/// the source no longer opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_migration_whose_source_was_cut_since_can_still_be_aborted() {
    use std::io::BufRead;
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (src, state) = (tmp.path().join("src"), tmp.path().join("state"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let raw = src.join("reference.raw");
    raw_disk(&raw, 24, Fill::Random, 36);
    let vmdk = src.join("db01.vmdk");
    convert(&raw, &vmdk, &["-O", "vmdk", "-o", "subformat=monolithicFlat"]);
    let vmx = write_vmx(&src, "db01", &["db01.vmdk"], &[]);

    let mut first = edge(
        &bin,
        &pki,
        &cloud,
        "migrate",
        &vmx,
        &state,
        &["--json", "--max-rate", "48mbit"],
    );
    let killed = tokio::task::spawn_blocking(move || {
        let mut child = first.stdout(std::process::Stdio::piped()).spawn().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            assert_ne!(v["event"], "summary", "finished before it could be killed");
            if v["event"] == "progress" && v["done_bytes"].as_u64().unwrap() >= 4 * MIB as u64 {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
    });
    killed.await.unwrap();
    let kept = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(kept[0].state, "RUNNING", "{kept:?}");

    truncate(&src.join("db01-flat.vmdk"), 12 * MIB as u64);
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "migrate", &vmx, &state, &[])).await;
    assert!(!ok && stderr.contains("db01-flat.vmdk is 12582912 bytes"), "{stderr}");
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "abort", &vmx, &state, &[])).await;
    assert!(ok, "{stderr}");
    assert_nothing_left(&cloud, "db01").await;

    convert(&raw, &vmdk, &["-O", "vmdk", "-o", "subformat=monolithicFlat"]);
    let (ok, stderr) = run(edge(&bin, &pki, &cloud, "migrate", &vmx, &state, &[])).await;
    assert!(ok, "{stderr}");
    assert_landed(&cloud, "db01", &raw);
    cloud.stop().await;
}
