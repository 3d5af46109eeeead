//! Replays the fuzz seeds and every saved crash or hang input of the fuzz
//! targets (fuzz/seeds/<target>/, fuzz/regressions/<target>/) through the same
//! entry points, so a fixed bug stays fixed without running the fuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no inputs for fuzz target {target}: the seeds are missing"
    );
}

#[test]
fn control_frame() {
    replay("control_frame", gateway::fuzzing::control_frame);
}

#[test]
fn chunk_frame() {
    replay("chunk_frame", gateway::fuzzing::chunk_frame);
}

#[test]
fn receiver_session() {
    replay("receiver_session", gateway::fuzzing::receiver);
}

#[test]
fn live_control() {
    replay("live_control", gateway::fuzzing::live_control);
}

#[test]
fn tunnel_reorder() {
    replay("tunnel_reorder", gateway::fuzzing::tunnel_reorder);
}
