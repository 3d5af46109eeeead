//! Test helpers: disk images made by the real `qemu-img`, and reproducible pseudo-random data.

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img` with `args`, panicking with its output if it fails.
pub(crate) fn qemu_img(args: &[&str]) {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("these tests need qemu-img on PATH (apt-get install qemu-utils)");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `len` bytes from a xorshift generator seeded with `seed`: incompressible, reproducible,
/// and different at every offset so misplaced reads show.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `text` to `dir/name` and returns the path.
pub(crate) fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The path as a `&str`, for command lines.
pub(crate) fn s(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// Runs `qemu-io` on a VMDK with one `-c` per command (e.g. `write -P 0x11 0 1M`), panicking
/// with its output if it fails.
pub(crate) fn qemu_io(image: &Path, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "vmdk"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = command
        .arg(image)
        .output()
        .expect("these tests need qemu-io on PATH (apt-get install qemu-utils)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // qemu-io reports a failed command on stdout and still exits 0.
    assert!(
        output.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {commands:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What qemu-img reads for the whole disk (or chain) at `top`, as raw bytes.
pub(crate) fn flattened_by_qemu(top: &Path) -> Vec<u8> {
    let raw = top.with_extension("flat.raw");
    qemu_img(&["convert", "-O", "raw", s(top), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

/// Reads the whole disk in chunks of `chunk` bytes.
pub(crate) fn read_all(disk: &dyn crate::source::DiskReader, chunk: usize) -> Vec<u8> {
    let mut out = vec![0; disk.capacity() as usize];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        disk.read_at((i * chunk) as u64, piece).unwrap();
    }
    out
}
