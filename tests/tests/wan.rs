//! A real lift across an emulated WAN link (tests/wan/wan.sh): the `cloud-endpoint`
//! binary serves in the cloud namespace, the `edge-agent` binary migrates from the
//! on-prem namespace, and every packet between them is delayed, sometimes lost and
//! rate-limited by the router namespace. Needs root and iproute2/iptables (tests/setup.sh
//! installs them); fails and says so otherwise.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::wan::{self, Side, WanConfig, WanLink, CLOUD_ADDR};
use e2e::{write_raw_disk, write_vmx, Fill, Nic, Pki, DEMO_PASSWORD, MIGRATOR};

const DELAY_MS: u32 = 25;
const LOSS: f64 = 0.01;
const RATE: &str = "100mbit";
const PORT: u16 = 4433;

fn endpoint_env(cmd: &mut Command, pki: &Pki, cloud: &Path) {
    cmd.env("CLOUD_ENDPOINT_LISTEN", format!("{CLOUD_ADDR}:{PORT}"))
        .env("CLOUD_ENDPOINT_API_LISTEN", "off")
        // The emulated WAN's address is not loopback; the demo users are a test's own.
        .env("CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS", "true")
        .env("CLOUD_ENDPOINT_CERT", pki.path("endpoint.pem"))
        .env("CLOUD_ENDPOINT_KEY", pki.path("endpoint.key"))
        .env("CLOUD_ENDPOINT_EDGE_CA", pki.path("ca.pem"))
        .env("CLOUD_ENDPOINT_DATASTORE_DIR", cloud.join("datastore"))
        .env("CLOUD_ENDPOINT_DATABASE", cloud.join("inventory.sqlite3"))
        .env("CLOUD_ENDPOINT_LOG", "info");
}

#[test]
fn lift_across_an_emulated_wan_link() {
    if let Some(why) = WanLink::unavailable() {
        panic!("this test needs an emulated WAN link and cannot make one: {why}; run it as root after tests/setup.sh");
    }
    let t0 = Instant::now();
    let bin = wan::ensure_binaries();
    eprintln!("binaries ready in {:.1} s", t0.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::with_endpoint_names(&dir.path().join("pki"), &[CLOUD_ADDR]);
    // A 64 MiB disk: 4 MiB of random data, 12 MiB of compressible text, the rest zeros
    // (holes, never sent). Small enough for a lossy link, big enough for many round trips.
    let onprem = dir.path().join("onprem");
    std::fs::create_dir_all(&onprem).unwrap();
    let mut regions = vec![Fill::Zero; 32];
    for i in [1, 9] {
        regions[i] = Fill::Random;
    }
    for i in [3, 4, 5, 12, 13, 20] {
        regions[i] = Fill::Text;
    }
    write_raw_disk(&onprem.join("wanvm.img"), 2 << 20, &regions, 7);
    let nics = [Nic {
        network: "VM Network",
        mac: "00:50:56:3f:00:77",
    }];
    let vmx = write_vmx(&onprem, "wanvm", &["wanvm.img"], &nics);
    let cloud = dir.path().join("cloud");

    let mut config = WanConfig::new("e2ewan", DELAY_MS, LOSS, RATE);
    config.relay = Some(env!("CARGO_BIN_EXE_wan-relay").into());
    let mut link = WanLink::up(config);

    // The link delays: a ping's RTT is at least the two one-way delays.
    let rtts = link.ping_rtts_ms(5);
    eprintln!("ping RTTs over the link, ms: {rtts:?}");
    assert!(!rtts.is_empty(), "no ping got through the link");
    let min_rtt = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(
        min_rtt >= f64::from(2 * DELAY_MS) && min_rtt < f64::from(2 * DELAY_MS) + 20.0,
        "ping RTT {min_rtt} ms on a link with {DELAY_MS} ms each way"
    );

    // The real cloud endpoint, in the cloud namespace.
    std::fs::create_dir_all(&cloud).unwrap();
    let log_path = cloud.join("cloud-endpoint.log");
    let mut serve = link.command(Side::Cloud, bin.join("cloud-endpoint"));
    endpoint_env(&mut serve, &pki, &cloud);
    let mut endpoint = serve
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(cloud.join("cloud-endpoint.out")).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("cloud-endpoint");
    let started = Instant::now();
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("cloud endpoint serving")
    {
        if let Some(status) = endpoint.try_wait().unwrap() {
            panic!(
                "cloud-endpoint exited ({status}): {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "cloud-endpoint did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The real edge agent, in the on-prem namespace, over the link.
    let lift_started = Instant::now();
    let lift = wan::run_timeout(
        link.command(Side::Onprem, bin.join("edge-agent"))
            .arg("migrate")
            .arg("--vmx")
            .arg(&vmx)
            .arg("--url")
            .arg(format!("quic://{CLOUD_ADDR}:{PORT}"))
            .args(["--user", MIGRATOR, "--password", DEMO_PASSWORD])
            .arg("--ca-bundle")
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("edge.pem"))
            .arg("--key")
            .arg(pki.path("edge.key"))
            .arg("--receipt")
            .arg(dir.path().join("wanvm.receipt.json"))
            .arg("--json"),
        Duration::from_secs(120),
    );
    let lift_secs = lift_started.elapsed().as_secs_f64();
    let endpoint_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        lift.status.is_some_and(|s| s.success()),
        "edge-agent {} after {lift_secs:.1} s:\n{}\n{}\ncloud-endpoint log:\n{}\nlink:\n{}",
        lift.status.map_or("timed out".into(), |s| s.to_string()),
        lift.stdout,
        lift.stderr,
        endpoint_log(),
        link.status()
    );
    let summary: serde_json::Value = lift
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary line in:\n{}", lift.stdout));
    eprintln!(
        "lift over {RATE}, {DELAY_MS} ms each way, {} % loss: {lift_secs:.1} s, summary {summary}",
        LOSS * 100.0
    );
    assert_eq!(summary["vm"], "wanvm");

    // The disk arrived intact and the VM is registered.
    let disk = cloud.join("datastore/wanvm/wanvm.vmdk");
    assert!(
        e2e::images_identical(&onprem.join("wanvm.img"), &disk),
        "the cloud's disk differs from the source"
    );
    let mut inventory = Command::new(bin.join("cloud-endpoint"));
    endpoint_env(&mut inventory, &pki, &cloud);
    let inv = inventory.args(["inventory", "--json"]).output().unwrap();
    assert!(inv.status.success(), "{}", String::from_utf8_lossy(&inv.stderr));
    let vms: serde_json::Value = serde_json::from_slice(&inv.stdout).unwrap();
    let vm = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "wanvm")
        .unwrap_or_else(|| panic!("wanvm not in the inventory: {vms}"));
    assert_eq!(vm["id"], summary["vm_id"]);

    // The relays really carried (and delayed) the lift's packets, and dropped some.
    std::thread::sleep(Duration::from_millis(1100)); // one more stats line
    let up = wan::last_relay_stats(&link.relay_log("up"));
    let down = wan::last_relay_stats(&link.relay_log("down"));
    eprintln!("relay onprem->cloud: {up:?}\nrelay cloud->onprem: {down:?}");
    let get = |s: &[(String, u64)], k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or(0);
    let wire = summary["wire_bytes"].as_u64().unwrap();
    assert!(
        get(&up, "released") * 1500 >= wire,
        "the relay released fewer packets than the lift needed: {up:?}"
    );
    assert!(get(&up, "dropped") > 0, "no loss on a {LOSS} loss link: {up:?}");
    link.down();
    drop(endpoint.kill());
    let _ = endpoint.wait();
    eprintln!("whole test: {:.1} s", t0.elapsed().as_secs_f64());
}
