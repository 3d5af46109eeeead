//! A throwaway PostgreSQL server for a test: its own data folder (a copy of one
//! `initdb` made once per machine), listening on a Unix socket only, killed when the test
//! ends. Debian's `postgresql` package provides the binaries (tests/setup.sh installs
//! it); a machine without them fails the test with that instruction rather than skip it.
//! The end-to-end tests use it too (cargo feature `test-postgres`), for endpoints that
//! share one domain.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running server and the URL of its `postgres` database.
pub struct TestPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub url: String,
}

impl std::fmt::Debug for TestPg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPg").field("url", &self.url).finish()
    }
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/postgres): run tests/setup.sh")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `program` from `bin`, as the `postgres` user when this test runs as root (the server
/// refuses to run as root).
fn command(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(program));
        command
    } else {
        Command::new(bin.join(program))
    }
}

fn give_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .expect("chown runs");
        assert!(status.success(), "cannot give {} to the postgres user", path.display());
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .expect(what);
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The data folder `initdb` made, shared by every test of this machine.
fn template(bin: &Path) -> PathBuf {
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("x")
        .to_owned();
    let template = std::env::temp_dir().join(format!("cloud-endpoint-test-pg-{version}-{}", nix::unistd::geteuid()));
    if template.join("PG_VERSION").exists() {
        return template;
    }
    // Made aside and renamed into place: tests starting together each make one, and
    // the first rename wins.
    let making = tempfile::Builder::new()
        .prefix("cloud-endpoint-test-pg-")
        .tempdir()
        .expect("temp dir");
    give_to_postgres(making.path());
    let data = making.path().join("data");
    let mut initdb = command(bin, "initdb");
    initdb.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "--no-sync",
        "--no-instructions",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    ]);
    run(initdb, "initdb");
    let _ = std::fs::rename(&data, &template);
    template
}

impl TestPg {
    pub fn start() -> TestPg {
        let bin = bin_dir();
        let template = template(&bin);
        let dir = tempfile::Builder::new().prefix("test-pg-").tempdir().expect("temp dir");
        let data = dir.path().join("data");
        run(
            {
                let mut cp = Command::new("cp");
                cp.arg("-a").arg(&template).arg(&data);
                cp
            },
            "copying the PostgreSQL template",
        );
        give_to_postgres(dir.path());
        let options = format!(
            "-k {} -c listen_addresses= -p 5432 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            dir.path().display()
        );
        let mut start = command(&bin, "pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(options)
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "start"]);
        run(start, "starting PostgreSQL");
        let url = format!("host={} port=5432 user=postgres dbname=postgres", dir.path().display());
        TestPg { dir, bin, url }
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let mut stop = command(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}
