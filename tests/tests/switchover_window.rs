//! A replication's switchover window (`replicate --switchover-window`, the API's
//! `switchover_window`): a switchover whose time has come waits while the window is
//! closed, says when a pass ended after its window closed, and runs at the first pass
//! inside a window the API opened. Real binaries over QUIC on loopback.

use cloud_endpoint::config::Role;
use cloud_endpoint::inventory::Principal;
use e2e::*;

const MIB: usize = 1 << 20;

/// `HH:MM-HH:MM` from minutes after midnight UTC (wrapping).
fn window(start_min: i64, end_min: i64) -> String {
    let hhmm = |m: i64| {
        let m = m.rem_euclid(24 * 60);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", hhmm(start_min), hhmm(end_min))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_switchover_waits_for_its_window_and_runs_inside_it() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let disk = src.join("win01.img");
    write_raw_disk(&disk, MIB, &[Fill::Random, Fill::Zero, Fill::Random, Fill::Random], 71);
    let vmx = write_vmx(&src, "win01", &["win01.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--json", "--chunk-kib", "256"]);
        edge_command(&bin, &pki, &cloud, &vmx, &state, &all)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let minute = now.rem_euclid(24 * 3600) / 60;
    // Due an hour ago, inside a window that closed half an hour ago: missed, so it waits
    // for tomorrow's opening, and the pass (the source is a plain file, stopped) says so.
    let at = edge_agent::migrate::rfc3339(now - 3600).unwrap();
    let closed = window(minute - 90, minute - 30);
    let out = run(edge(&[
        "replicate",
        "--switchover-at",
        &at,
        "--switchover-window",
        &closed,
    ]))
    .await;
    let first = summary(&out);
    assert_eq!(first["replica"], true, "{first}");
    assert_eq!(first["switchover_window"], closed.as_str(), "{first}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("missed its window") && said.contains("waits for the next opening"),
        "{said}"
    );
    assert!(
        cloud.domain.inventory.list_vms().unwrap().is_empty(),
        "no switchover outside the window"
    );
    let id = first["migration_id"].as_str().unwrap().to_owned();
    let record =
        serde_json::to_value(cloud_endpoint::api::gateway::get_migration(&cloud.domain, &id).unwrap()).unwrap();
    assert_eq!(record["replica"]["switchover_window"], closed.as_str(), "{record}");

    // A window that opens later today: still waiting, nothing said of a missed window.
    let later = window(minute + 120, minute + 180);
    let operator = Principal {
        user: MIGRATOR.into(),
        role: Role::MigrationOperator,
    };
    let patch =
        |body: String| cloud_endpoint::api::gateway::patch_migration(&cloud.domain, &operator, &id, body.as_bytes());
    patch(format!(r#"{{"switchover_window": "{later}"}}"#)).unwrap();
    let out = run(edge(&["replicate"])).await;
    let second = summary(&out);
    assert_eq!(second["switchover_window"], later.as_str(), "{second}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("missed"));
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    // A window that is not one is refused, saying what a window is.
    let bad = patch(r#"{"switchover_window": "2am-4am"}"#.into()).unwrap_err();
    assert!(format!("{bad:?}").contains("02:00-04:00"), "{bad:?}");

    // The API opens a window around now: the next pass learns it and switches over.
    let open = window(minute - 10, minute + 50);
    patch(format!(r#"{{"switchover_window": "{open}"}}"#)).unwrap();
    let out = run(edge(&["replicate"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let vms = cloud.domain.inventory.list_vms().unwrap();
    assert_eq!(vms.len(), 1, "switched over inside the window");
    assert!(images_identical(&disk, &cloud.root.join("win01/win01-flat.vmdk")));
    cloud.stop().await;
}
