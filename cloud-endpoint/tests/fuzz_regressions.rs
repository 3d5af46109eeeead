//! Replays the seeds and saved crash inputs of the API bodies' fuzz target
//! (fuzz/seeds/api_bodies/, fuzz/regressions/api_bodies/) through the same entry point,
//! so a fixed bug stays fixed without running the fuzzer.

use std::path::Path;

#[test]
fn api_bodies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("api_bodies")) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| cloud_endpoint::api::fuzzing::bodies(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no inputs for fuzz target api_bodies: the seeds are missing"
    );
}
