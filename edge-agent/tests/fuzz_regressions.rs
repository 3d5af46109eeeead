//! Replays the seeds and every saved crash input of the source-parser fuzz
//! targets (fuzz/seeds/<target>/, fuzz/regressions/<target>/) through the same
//! entry points the fuzzer calls.

use std::path::Path;

use edge_agent::source::fuzzing;

fn replay(target: &str, run: &dyn Fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
            assert!(outcome.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no inputs for fuzz target {target}: the seeds are missing"
    );
}

// The entry points share a scratch folder per process: run them one at a time.
#[test]
fn source_parsers() {
    replay("source_vmx", &fuzzing::vmx);
    replay("disk_vmdk", &|d| fuzzing::disk_image(d, "vmdk"));
    replay("disk_qcow2", &|d| fuzzing::disk_image(d, "qcow2"));
    replay("source_ovf", &|d| fuzzing::package(d, "ovf"));
    replay("source_ova", &|d| fuzzing::package(d, "ova"));
    fuzzing::remove_scratch();
}
