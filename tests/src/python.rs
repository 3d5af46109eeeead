//! The Python clients the API tests run (the vSphere Automation SDK and pyvmomi, pinned in
//! tests/vapi/requirements.txt) in the virtualenv tests/vapi/venv.sh makes under
//! target/vapi-venv; later runs reuse it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtualenv's python, made first if it is missing or its requirements changed.
pub async fn venv_python() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vapi/venv.sh");
    let out = tokio::task::spawn_blocking(move || Command::new("bash").arg(&script).output())
        .await
        .unwrap()
        .expect("bash runs tests/vapi/venv.sh");
    assert!(
        out.status.success(),
        "tests/vapi/venv.sh could not make the virtualenv of the vSphere SDK and pyvmomi; these \
         tests need PyPI (run tests/setup.sh on a machine that reaches PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("venv.sh prints the python").trim())
}

/// Runs the check `script` (a path under tests/) with the JSON file `expected` as its
/// argument, asserts it succeeded and printed `passed` (its last word that all went well),
/// and returns what it printed.
pub async fn run_check(python: &Path, script: &str, expected: &Path, passed: &str) -> String {
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let (python, expected) = (python.to_owned(), expected.to_owned());
    let out = tokio::task::spawn_blocking(move || Command::new(&python).arg(&script_path).arg(&expected).output())
        .await
        .unwrap()
        .expect("the virtualenv's python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(passed), "{stdout}\n{stderr}");
    println!("{stdout}");
    stdout
}
