//! Replays the seeds and saved crash inputs of the API's fuzz targets (api_bodies,
//! soap_request; fuzz/seeds/<target>/, fuzz/regressions/<target>/) through the same entry
//! points, so a fixed bug stays fixed without running the fuzzer.

use std::path::Path;

#[test]
fn api_bodies() {
    replay("api_bodies", cloud_endpoint::api::fuzzing::bodies);
}

#[test]
fn soap_request() {
    replay("soap_request", cloud_endpoint::api::fuzzing::soap_request);
}

fn replay(target: &str, entry: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for file in entries {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no inputs for fuzz target {target}: the seeds are missing"
    );
}
