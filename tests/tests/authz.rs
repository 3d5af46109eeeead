//! Who may act on a migration, with the real `edge-agent` binary on one edge (one
//! certificate, one state folder) shared by several cloud users: while the owner lifts, a
//! ReadOnly user and a second operator run `edge-agent abort` and `migrate` with the same
//! arguments, and a second edge agent (another certificate, the owner's user) resumes it;
//! after the owner's agent is killed, the second operator tries to take the migration over. Every attempt is refused with a message naming the refused action,
//! and none of them touches the owner's migration: its lift goes on (or resumes) to a
//! disk identical to the source, and its checkpoint stays as it was.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::*;

const MIB: usize = 1 << 20;
/// A second MigrationOperator of the cloud domain.
const OTHER: &str = "other-migrator@cloud.local";

/// The built-in users plus a second operator.
fn users() -> String {
    let user = |name: &str, role: &str| format!("{{name=\"{name}\",password=\"{DEMO_PASSWORD}\",role=\"{role}\"}}");
    format!(
        "[{},{},{},{}]",
        user("administrator@cloud.local", "Administrator"),
        user(MIGRATOR, "MigrationOperator"),
        user(AUDITOR, "ReadOnly"),
        user(OTHER, "MigrationOperator")
    )
}

async fn start_cloud(root: &Path, pki: &Pki) -> Cloud {
    let users = users();
    Cloud::start(
        root,
        pki,
        &[
            ("CLOUD_ENDPOINT_DOMAIN__USERS", users.as_str()),
            // A killed edge's connection is given up soon.
            ("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "3"),
        ],
    )
    .await
}

/// `mib` MiB of random data with a hole every 8 MiB: under a cap, it takes a while.
fn vm(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let regions: Vec<Fill> = (0..mib)
        .map(|i| if i % 8 == 7 { Fill::Zero } else { Fill::Random })
        .collect();
    write_raw_disk(&dir.join(format!("{name}.img")), MIB, &regions, seed);
    write_vmx(dir, name, &[&format!("{name}.img")], &[])
}

/// `edge-agent <command>` as `user`, with the arguments every run on this edge shares:
/// the same VM, endpoint, certificate, state folder and receipt path.
fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, vmx: &Path, state: &Path, command: &str, user: &str) -> Command {
    edge_with(bin, pki, cloud, vmx, state, command, user, "edge")
}

/// [`edge`] with the certificate and key of `cert_stem` (`edge` is the owner's).
#[allow(clippy::too_many_arguments)]
fn edge_with(
    bin: &Path,
    pki: &Pki,
    cloud: &Cloud,
    vmx: &Path,
    state: &Path,
    command: &str,
    user: &str,
    cert_stem: &str,
) -> Command {
    let mut cmd = Command::new(bin.join("edge-agent"));
    cmd.arg(command)
        .arg("--vmx")
        .arg(vmx)
        .arg("--url")
        .arg(format!("quic://127.0.0.1:{}", cloud.addr.port()))
        .arg("--user")
        .arg(user)
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path(&format!("{cert_stem}.pem")))
        .arg("--key")
        .arg(pki.path(&format!("{cert_stem}.key")))
        .arg("--state-dir")
        .arg(state)
        .arg("--receipt")
        .arg(state.join("receipt.json"))
        .env("EDGE_AGENT_PASSWORD", DEMO_PASSWORD)
        .env_remove("EDGE_AGENT_LOG");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The checkpoint files in the state folder, with their contents.
fn checkpoint(state: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json" || x == "chunks") && !p.ends_with("receipt.json"))
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), data)
        })
        .collect();
    files.sort();
    files
}

/// A JSON-lines `edge-agent migrate` running in the background: its events arrive on a
/// channel (a reader thread keeps its stdout drained).
struct Lift {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    migration_id: Option<String>,
    done: u64,
}

impl Lift {
    fn spawn(mut cmd: Command, rate: &str) -> Lift {
        let mut child = cmd
            .args(["--json", "--max-rate", rate])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("lift: {line}"),
                }
            }
        });
        Lift {
            child,
            events,
            migration_id: None,
            done: 0,
        }
    }

    /// Reads events until `fraction` of the disk is done; fails if the lift ends first.
    fn until(&mut self, fraction: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(v) = self.events.recv_timeout(Duration::from_millis(200)) else {
                assert!(self.child.try_wait().unwrap().is_none(), "the lift ended early");
                continue;
            };
            match v["event"].as_str() {
                Some("started") => self.migration_id = v["migration_id"].as_str().map(str::to_owned),
                Some("progress") => {
                    self.done = v["done_bytes"].as_u64().unwrap();
                    if self.done as f64 >= v["total_bytes"].as_f64().unwrap() * fraction {
                        return;
                    }
                }
                Some("summary") => panic!("the lift finished before {fraction} of it: {v}"),
                _ => {}
            }
        }
        panic!("the lift did not reach {fraction} in 60 s");
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the lift to end; its summary.
    fn finish(mut self) -> serde_json::Value {
        let status = self.child.wait().unwrap();
        let events: Vec<serde_json::Value> = self.events.try_iter().collect();
        assert!(status.success(), "the lift failed: {events:?}");
        events
            .into_iter()
            .rev()
            .find(|v| v["event"] == "summary")
            .expect("a summary")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_of_the_edge_cannot_abort_or_take_over_a_running_lift() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = start_cloud(&tmp.path().join("cloud"), &pki).await;
    let vmx = vm(&tmp.path().join("src"), "lift01", 48, 81);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    // The owner lifts at 40 Mbit/s: about 9 s for the 42 MiB of data.
    let mut lift = Lift::spawn(edge(&bin, &pki, &cloud, &vmx, &state, "migrate", MIGRATOR), "40mbit");
    lift.until(0.1);
    let id = lift.migration_id.clone().expect("the lift named its migration");
    assert!(cloud.domain.live.is_live(&id));

    // A second edge agent of the same CA, run by the owner's own user with a copy of the
    // owner's checkpoint: its Resume names the owner's migration.
    pki.ca
        .issue_edge("edge-02", certs::Validity::days(1))
        .unwrap()
        .write(&pki.dir, "edge-02")
        .unwrap();
    let attempts = [
        (
            AUDITOR,
            "abort",
            "refused to abort migration",
            "has role ReadOnly, which may not abort migration",
        ),
        (
            AUDITOR,
            "migrate",
            "does not permit",
            "has role ReadOnly, which may not resume migration",
        ),
        (
            OTHER,
            "abort",
            "refused to abort migration",
            "may abort only their own migrations: ask migrator@cloud.local",
        ),
        (
            OTHER,
            "migrate",
            "does not permit",
            "may resume only their own migrations: ask migrator@cloud.local",
        ),
    ];
    let other_edge = (MIGRATOR, "migrate", "does not permit", "belongs to another edge agent");
    for (user, command, head, says) in attempts.into_iter().chain([other_edge]) {
        let before = checkpoint(&state);
        assert_eq!(before.len(), 2, "the owner's checkpoint: {before:?}");
        let done_before = lift.done;
        let cert = if (user, says) == (other_edge.0, other_edge.3) {
            "edge-02"
        } else {
            "edge"
        };
        let out = edge_with(&bin, &pki, &cloud, &vmx, &state, command, user, cert)
            .output()
            .unwrap();
        let out_text = text(&out);
        println!("{user} {command}: {out_text}");
        assert!(!out.status.success(), "{user} {command} was not refused: {out_text}");
        assert!(
            out_text.contains(head) && out_text.contains(says) && out_text.contains(&id),
            "{user} {command}: {out_text}"
        );
        assert!(out_text.contains("nothing was changed"), "{out_text}");
        // The owner's lift goes on, on its own connection, with its checkpoint: the same
        // files, the chunk record only grown by the owner's own appends.
        assert!(lift.is_running(), "the owner's lift ended after {user} {command}");
        assert!(cloud.domain.live.is_live(&id), "the owner's connection was closed");
        let after = checkpoint(&state);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(after[1], before[1], "the checkpoint header changed");
        assert!(
            after[0].1.starts_with(&before[0].1),
            "the chunk record lost entries: {} -> {} bytes",
            before[0].1.len(),
            after[0].1.len()
        );
        let record = cloud.domain.inventory.resume_info(&id).unwrap().unwrap();
        assert_eq!((record.state.as_str(), record.user.as_str()), ("RUNNING", MIGRATOR));
        // And it still moves.
        lift.until((done_before + MIB as u64) as f64 / (48 * MIB) as f64);
    }

    let summary = lift.finish();
    println!("owner: {summary}");
    assert_eq!(summary["migration_id"], id.as_str());
    assert_eq!(summary["reconnects"], 0, "the owner's connection was never taken over");
    assert!(images_identical(
        &tmp.path().join("src/lift01.img"),
        &cloud.root.join("lift01/lift01.vmdk")
    ));
    let migrations = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(migrations.len(), 1, "no refused attempt left a record: {migrations:?}");
    assert_eq!(migrations[0].state, "SUCCEEDED");
    assert!(checkpoint(&state).is_empty(), "the committed lift's checkpoint is gone");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_takeover_of_a_killed_lift_leaves_it_for_its_owner() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = start_cloud(&tmp.path().join("cloud"), &pki).await;
    let vmx = vm(&tmp.path().join("src"), "kill01", 24, 82);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    let mut lift = Lift::spawn(edge(&bin, &pki, &cloud, &vmx, &state, "migrate", MIGRATOR), "64mbit");
    lift.until(0.4);
    let id = lift.migration_id.clone().unwrap();
    lift.child.kill().unwrap();
    lift.child.wait().unwrap();
    let kept = checkpoint(&state);
    assert_eq!(kept.len(), 2, "a killed lift keeps its checkpoint: {kept:?}");

    // Another operator, same edge, same arguments: refused, and it changes nothing.
    let out = edge(&bin, &pki, &cloud, &vmx, &state, "migrate", OTHER)
        .output()
        .unwrap();
    let out_text = text(&out);
    println!("{OTHER} migrate: {out_text}");
    assert!(!out.status.success(), "{out_text}");
    assert!(
        out_text.contains("may resume only their own migrations") && out_text.contains(&id),
        "{out_text}"
    );
    assert_eq!(checkpoint(&state), kept, "the owner's checkpoint was changed");
    let record = cloud.domain.inventory.resume_info(&id).unwrap().unwrap();
    assert_eq!(record.state, "RUNNING");
    // Its abort is refused the same way; the owner's abort is not needed.
    let out = edge(&bin, &pki, &cloud, &vmx, &state, "abort", OTHER).output().unwrap();
    assert!(
        !out.status.success() && text(&out).contains("refused to abort migration"),
        "{}",
        text(&out)
    );
    assert_eq!(checkpoint(&state), kept);

    // The owner runs the same command again and it resumes: what the cloud held is not
    // sent again.
    let out = edge(&bin, &pki, &cloud, &vmx, &state, "migrate", MIGRATOR)
        .arg("--json")
        .output()
        .unwrap();
    let out_text = text(&out);
    assert!(out.status.success(), "the owner's rerun: {out_text}");
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    println!("owner's rerun: {summary}");
    assert_eq!(summary["migration_id"], id.as_str());
    let total = 24 * MIB as u64;
    let sent = summary["sent_bytes"].as_u64().unwrap();
    assert!(
        sent < total * 3 / 4,
        "the rerun resumed, it did not start over: {summary}"
    );
    assert!(images_identical(
        &tmp.path().join("src/kill01.img"),
        &cloud.root.join("kill01/kill01.vmdk")
    ));
    let migrations = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(migrations.len(), 1, "{migrations:?}");
    assert_eq!(migrations[0].state, "SUCCEEDED");
    cloud.stop().await;
}
