//! Rollback and confirmation of a switchover through the HTTPS API, with the real
//! binaries: a ReadOnly user is refused; an operator's rollback powers the cloud VM off
//! and keeps its disks as the replica; the edge that ran the switchover learns of it at
//! its next pass (replication goes on, its receipt superseded); a switchover again,
//! confirmed through the API, which the edge's rollback then refuses, naming who
//! confirmed it. Also: the downtime of a source whose files were last written before the
//! last pass counts from that pass, not from the files.
//!
//! Needs `qemu-system-x86_64` (tests/setup.sh installs it).

use std::time::{Duration, Instant, SystemTime};

use e2e::rest::{Rest, SESSION};
use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::switchover::{alive, last_written_at, shown, source_vm, write_at, KillVm, CHUNK_KIB, MIB};

/// `POST /api/gateway/migrations/{id}?action=ACTION` as `token`: (status, JSON body).
async fn act(api: &Rest, id: &str, action: &str, token: &str) -> (StatusCode, Value) {
    let r = api
        .request(Method::POST, &format!("/api/gateway/migrations/{id}?action={action}"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// The first message of an API error body.
fn said(body: &Value) -> String {
    body["messages"][0]["default_message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_is_rolled_back_and_confirmed_through_the_api_and_the_edge_follows() {
    require_qemu();
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (vmx, disk) = source_vm(
        &tmp.path().join("src"),
        "api03",
        &[Fill::Random, Fill::Zero, Fill::Random],
        96,
    );
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    let api = Rest::new(&cloud, &pki);
    let operator = api.token(MIGRATOR).await;
    let auditor = api.token(AUDITOR).await;

    let pass_began = Instant::now();
    let first = summary(run(edge(&["replicate"])).await);
    let id = first["migration_id"].as_str().unwrap().to_owned();
    // Nothing to roll back or confirm yet: the answer says to switch over first.
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error_type"], "NOT_ALLOWED_IN_CURRENT_STATE", "{body}");
    assert!(
        said(&body).contains("has not switched over") && said(&body).contains("edge-agent switchover"),
        "{body}"
    );
    let (status, body) = act(&api, &id, "undo", &operator).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(said(&body).contains("?action=rollback"), "{body}");

    // The source's files were last written long before the last pass (a copy, say): the
    // downtime counts from that pass, not from an hour ago.
    last_written_at(&[&vmx, &disk], SystemTime::now() - Duration::from_secs(3600));
    let done = summary(run(edge(&["switchover", "--power-on"])).await);
    let vm_id = done["vm_id"].as_str().unwrap().to_owned();
    let _kill = KillVm(cloud.domain.clone(), vm_id.clone());
    let s = &done["switchover"];
    assert_eq!(s["downtime_from"], "source files last written", "{done}");
    let downtime = s["downtime_ms"].as_u64().expect("powered on: a downtime");
    let bound = pass_began.elapsed().as_millis() as u64 + 1000;
    assert!(
        downtime <= bound,
        "downtime {downtime} ms, not before the last pass ({bound} ms ago at most)"
    );
    let pid = cloud.domain.hosts.pid(&vm_id).await.expect("the VM runs in the cloud");

    // A ReadOnly user may look, not act.
    let (status, body) = act(&api, &id, "rollback", &auditor).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        said(&body).contains("ReadOnly") && said(&body).contains("ask a MigrationOperator or Administrator"),
        "{body}"
    );
    assert!(alive(pid), "a refused rollback changes nothing");
    assert_eq!(
        shown(&cloud, &id)["replica"]["state"],
        "switched over (awaiting confirm)"
    );

    // The operator rolls it back: the VM is off before the answer, its disks the replica.
    let flat = cloud.root.join("api03/api03-flat.vmdk");
    write_at(&flat, 100, b"written by the cloud VM");
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("rolled back") && message.contains("source can be started again"),
        "{body}"
    );
    assert!(message.contains("changed 1 chunk"), "{body}");
    assert!(!alive(pid), "QEMU {pid} still runs");
    let m = &body["migration"];
    assert_eq!(
        (
            &m["state"],
            &m["replica"]["state"],
            &m["replica"]["switchover_ended_by"]
        ),
        (
            &Value::from("RUNNING"),
            &Value::from("rolled back"),
            &Value::from(format!("{MIGRATOR} through the API"))
        ),
        "{body}"
    );
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty(), "unregistered");
    // Asked again: nothing awaits confirmation, and the answer says what comes next.
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        said(&body).contains("was rolled back by") && said(&body).contains("edge-agent replicate"),
        "{body}"
    );

    // The edge learns it at its next pass: replication goes on, the chunk the cloud VM
    // wrote and the one the source changed are sent, its receipt is superseded.
    write_at(&disk, 2 * MIB as u64 + 9, b"the source ran again");
    let pass = summary(run(edge(&["replicate"])).await);
    assert_eq!(pass["sent_bytes"].as_u64(), Some(2 * 256 * 1024), "{pass}");
    let note = pass["earlier_switchover"].as_str().unwrap_or_default();
    assert!(
        note.contains("rolled back") && note.contains("through the API"),
        "{pass}"
    );
    assert!(state.join("receipt.json.superseded").is_file(), "{pass}");
    assert!(!state.join("receipt.json").exists());
    assert_eq!(shown(&cloud, &id)["replica"]["state"], "in sync");

    // Switched over again, confirmed through the API: final.
    let again = summary(run(edge(&["switchover"])).await);
    assert_eq!(again["switchover"]["awaiting_confirm"], true, "{again}");
    let (status, body) = act(&api, &id, "confirm", &operator).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["message"].as_str().unwrap().contains("confirmed"), "{body}");
    assert_eq!(
        (&body["migration"]["state"], &body["migration"]["replica"]["state"]),
        (&Value::from("SUCCEEDED"), &Value::from("done")),
        "{body}"
    );
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(said(&body).contains("final"), "{body}");

    // The edge's record still says "awaiting": its rollback and its passes are refused,
    // naming who confirmed it; its confirm brings the record in line.
    let late = run(edge(&["rollback"])).await;
    assert!(!late.status.success());
    let text = String::from_utf8_lossy(&late.stderr);
    assert!(
        text.contains(&format!("confirmed by {MIGRATOR} through the API")) && text.contains("final"),
        "{text}"
    );
    let pass = run(edge(&["replicate"])).await;
    assert!(!pass.status.success());
    let text = String::from_utf8_lossy(&pass.stderr);
    assert!(
        text.contains("was confirmed by") && text.contains("edge-agent confirm"),
        "{text}"
    );
    let confirmed = summary(run(edge(&["confirm"])).await);
    assert!(
        confirmed["message"].as_str().unwrap().contains("confirmed already"),
        "{confirmed}"
    );
    std::fs::remove_file(state.join("receipt.json.superseded")).unwrap();
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    assert!(images_identical(&disk, &flat));
    cloud.stop().await;
}
