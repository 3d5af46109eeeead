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

/// An Administrator, and a second MigrationOperator who does not own the replication.
const ADMIN: &str = "administrator@cloud.local";
const OTHER: &str = "other-migrator@cloud.local";

/// The built-in users plus a second operator.
fn users() -> String {
    let user = |name: &str, role: &str| format!("{{name=\"{name}\",password=\"{DEMO_PASSWORD}\",role=\"{role}\"}}");
    format!(
        "[{},{},{},{}]",
        user(ADMIN, "Administrator"),
        user(MIGRATOR, "MigrationOperator"),
        user(AUDITOR, "ReadOnly"),
        user(OTHER, "MigrationOperator")
    )
}

/// Several requests end one switchover at the same moment, each `(user, token,
/// action)`: exactly one wins; each other one is told, in a 400, that the switchover was
/// already ended (or is being rolled back) and by whom, never the inventory's refusal.
/// Returns the winner's (user, action).
async fn race(cloud: &Cloud, pki: &Pki, id: &str, requests: &[(&'static str, &str, &'static str)]) -> (String, String) {
    // A client each, connected beforehand (separate connections, as separate users'
    // browsers have): the requests then reach the endpoint within a moment of each other,
    // not one TLS handshake apart.
    let mut clients = Vec::new();
    for &(_, token, _) in requests {
        let api = Rest::new(cloud, pki);
        api.json(&format!("/api/gateway/migrations/{id}"), token).await;
        clients.push(api);
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, (api, &(_, token, action))) in clients.into_iter().zip(requests).enumerate() {
        let (id, token) = (id.to_owned(), token.to_owned());
        set.spawn(async move { (i, act(&api, &id, action, &token).await) });
    }
    let answers = set.join_all().await;
    let won: Vec<usize> = answers
        .iter()
        .filter(|(_, (status, _))| *status == StatusCode::OK)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(won.len(), 1, "exactly one of {requests:?} wins: {answers:?}");
    let (winner, _, action) = requests[won[0]];
    for (i, (status, body)) in answers.iter().filter(|(i, _)| *i != won[0]) {
        let (user, _, lost) = requests[*i];
        assert_eq!(*status, StatusCode::BAD_REQUEST, "{user}'s {lost} that lost: {body}");
        assert_eq!(body["error_type"], "NOT_ALLOWED_IN_CURRENT_STATE", "{body}");
        let message = said(body);
        assert!(
            ["was confirmed", "is being rolled back now", "was rolled back"]
                .iter()
                .any(|ended| message.contains(&format!("{ended} by {winner} through the API"))),
            "{user}'s {lost} that lost is told who ended it ({winner}, {action}): {message}"
        );
        assert!(
            !message.contains("not a switchover that is"),
            "the inventory's refusal, not an answer: {message}"
        );
    }
    (winner.to_owned(), action.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_ends_another_operators_switchover_and_of_two_at_once_one_wins() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let users = users();
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_DOMAIN__USERS", users.as_str())],
    )
    .await;
    let (vmx, _disk) = source_vm(&tmp.path().join("src"), "race01", &[Fill::Random, Fill::Zero], 11);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    let api = Rest::new(&cloud, &pki);
    let (owner, admin, other) = (
        api.token(MIGRATOR).await,
        api.token(ADMIN).await,
        api.token(OTHER).await,
    );
    let first = summary(run(edge(&["replicate"])).await);
    let id = first["migration_id"].as_str().unwrap().to_owned();
    let (edge, cloud_, id_) = (&edge, &cloud, id.as_str());
    let switch_over = move || async move {
        let done = summary(run(edge(&["switchover"])).await);
        assert_eq!(done["switchover"]["awaiting_confirm"], true, "{done}");
        assert_eq!(
            shown(cloud_, id_)["replica"]["state"],
            "switched over (awaiting confirm)"
        );
    };
    let pass = move || async move {
        let pass = summary(run(edge(&["replicate"])).await);
        assert_eq!(shown(cloud_, id_)["replica"]["state"], "in sync", "{pass}");
    };

    // Another operator may neither roll back nor confirm the migrator's switchover, and
    // is told whose it is and who may.
    switch_over().await;
    for action in ["rollback", "confirm"] {
        let (status, body) = act(&api, &id, action, &other).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let message = said(&body);
        assert!(
            message.contains(&format!("was started by {MIGRATOR}"))
                && message.contains(&format!("user {OTHER} (role MigrationOperator)"))
                && message.contains("ask an Administrator"),
            "{body}"
        );
    }
    let m = shown(&cloud, &id);
    assert_eq!(
        (&m["replica"]["state"], &m["replica"]["switchover_ended_by"]),
        (&Value::from("switched over (awaiting confirm)"), &Value::Null),
        "a refused request changes nothing"
    );
    assert_eq!(cloud.domain.inventory.list_vms().unwrap().len(), 1);

    // An Administrator may: the rollback is theirs.
    let (status, body) = act(&api, &id, "rollback", &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            &body["migration"]["replica"]["state"],
            &body["migration"]["replica"]["switchover_ended_by"]
        ),
        (
            &Value::from("rolled back"),
            &Value::from(format!("{ADMIN} through the API"))
        ),
        "{body}"
    );
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty(), "unregistered");

    // Four rollbacks at once, the owner's and the Administrator's: one rolls it back.
    pass().await;
    switch_over().await;
    let (winner, _) = race(
        cloud_,
        &pki,
        id_,
        &[
            (MIGRATOR, owner.as_str(), "rollback"),
            (ADMIN, admin.as_str(), "rollback"),
            (MIGRATOR, owner.as_str(), "rollback"),
            (ADMIN, admin.as_str(), "rollback"),
        ],
    )
    .await;
    let m = shown(&cloud, &id);
    assert_eq!(
        (&m["replica"]["state"], &m["replica"]["switchover_ended_by"]),
        (
            &Value::from("rolled back"),
            &Value::from(format!("{winner} through the API"))
        )
    );
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());

    // Confirmations and rollbacks of both at once: the one that wins decides; then, if
    // that was a rollback, four confirmations at once.
    pass().await;
    switch_over().await;
    let (mut winner, mut won) = race(
        cloud_,
        &pki,
        id_,
        &[
            (ADMIN, admin.as_str(), "confirm"),
            (MIGRATOR, owner.as_str(), "rollback"),
            (MIGRATOR, owner.as_str(), "confirm"),
            (ADMIN, admin.as_str(), "rollback"),
        ],
    )
    .await;
    if won == "rollback" {
        assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
        pass().await;
        switch_over().await;
        (winner, won) = race(
            cloud_,
            &pki,
            id_,
            &[
                (MIGRATOR, owner.as_str(), "confirm"),
                (ADMIN, admin.as_str(), "confirm"),
                (MIGRATOR, owner.as_str(), "confirm"),
                (ADMIN, admin.as_str(), "confirm"),
            ],
        )
        .await;
    }
    assert_eq!(won, "confirm");
    let m = shown(&cloud, &id);
    assert_eq!(
        (
            &m["state"],
            &m["replica"]["state"],
            &m["replica"]["switchover_ended_by"]
        ),
        (
            &Value::from("SUCCEEDED"),
            &Value::from("done"),
            &Value::from(format!("{winner} through the API"))
        )
    );
    assert_eq!(cloud.domain.inventory.list_vms().unwrap().len(), 1, "registered, final");
    cloud.stop().await;
}

/// The QEMU pid of VM `name` powered on in `datastore`, from its pid file.
fn qemu_pid(datastore: &std::path::Path, name: &str) -> u32 {
    let file = datastore.join(name).join(format!("{name}.pid"));
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Kills a QEMU a failing test would leave running: it outlives its endpoint on purpose.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_whose_vm_cannot_be_powered_off_changes_nothing_and_says_to_ask_again() {
    use e2e::scale_out::Domain;
    require_qemu();
    let tmp = tempfile::tempdir().unwrap();
    let domain = Domain::new(tmp.path());
    // Two hosts of one domain: the VM runs on esx-a, the API is asked through esx-b, which
    // must have esx-a's endpoint power it off.
    let host_a = domain.endpoint("esx-a");
    let host_b = domain.endpoint("esx-b");
    let (vmx, _disk) = source_vm(&tmp.path().join("src"), "stuck01", &[Fill::Random, Fill::Zero], 12);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |subcommand: &str, args: &[&str]| {
        let mut cmd = edge_to(
            &domain.bin,
            &domain.pki,
            &[format!("quic://{}", host_a.quic)],
            MIGRATOR,
            subcommand,
        );
        cmd.arg("--vmx")
            .arg(&vmx)
            .arg("--state-dir")
            .arg(&state)
            .arg("--receipt")
            .arg(state.join("receipt.json"))
            .args(["--json", "--chunk-kib", CHUNK_KIB])
            .args(args);
        cmd
    };
    let first = summary(run(edge("replicate", &[])).await);
    let id = first["migration_id"].as_str().unwrap().to_owned();
    let done = summary(run(edge("switchover", &["--power-on"])).await);
    assert_eq!(done["switchover"]["awaiting_confirm"], true, "{done}");
    let vm_id = done["vm_id"].as_str().unwrap().to_owned();
    let pid = qemu_pid(&domain.datastore, "stuck01");
    let _kill = KillPid(pid);
    assert!(alive(pid));

    // The endpoint of esx-a dies; its QEMU runs on (it is no child the endpoint takes
    // along), so the VM cannot be powered off until that endpoint is back.
    drop(host_a);
    assert!(alive(pid), "the VM runs on without its endpoint");
    let api = Rest::at(&format!("https://{}", host_b.api), &domain.pki);
    let operator = api.token(MIGRATOR).await;
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let message = said(&body);
    assert!(
        message.contains(&format!("cannot power {vm_id} off"))
            && message.contains("esx-a")
            && message.contains("the switchover stands, awaiting confirmation")
            && message.contains("do not start the source")
            && message.contains(&format!("POST /api/gateway/migrations/{id}?action=rollback again")),
        "{body}"
    );
    // Nothing changed: the VM runs, registered; the switchover awaits confirmation, ended
    // by no one; the source is not told it may start.
    assert!(alive(pid), "QEMU {pid} was stopped after all");
    let m = api.json(&format!("/api/gateway/migrations/{id}"), &operator).await;
    assert_eq!(
        (
            &m["state"],
            &m["vm"],
            &m["replica"]["state"],
            &m["replica"]["switchover_ended_by"]
        ),
        (
            &Value::from("SUCCEEDED"),
            &Value::from(vm_id.as_str()),
            &Value::from("switched over (awaiting confirm)"),
            &Value::Null
        ),
        "{m}"
    );
    let vm = api.json(&format!("/api/vcenter/vm/{vm_id}"), &operator).await;
    assert_eq!(vm["power_state"], "POWERED_ON", "{vm}");
    // The refusal left the switchover as it was: it can still be confirmed, or rolled back.
    let inventory = domain.inventory();
    assert_eq!(
        inventory.power_on_blocked(&vm_id).unwrap(),
        None,
        "power-on is not blocked"
    );

    // esx-a's endpoint is back and finds its VM running; asked again, the rollback is done.
    let host_a = domain.endpoint("esx-a");
    let (status, body) = act(&api, &id, "rollback", &operator).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["message"].as_str().unwrap_or_default().contains("rolled back"),
        "{body}"
    );
    assert!(!alive(pid), "QEMU {pid} still runs after the rollback");
    assert_eq!(body["migration"]["replica"]["state"], "rolled back", "{body}");
    drop(host_a);
    drop(host_b);
}
