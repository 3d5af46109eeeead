//! How fast the agent reads a source disk alone (no hashing, no network): the CPU a format
//! costs before the lift's own stages. Zero ranges the reader reports as holes are skipped,
//! as the lift skips them.
//!
//! Usage: cargo run --release -p edge-agent --example read_rate -- DISK [DISK ...]
//! e.g. the sample disk of tests/bench.sh as raw, streamOptimized and compressed qcow2.

use std::path::Path;
use std::time::{Duration, Instant};

use edge_agent::source::open_disk;

/// CPU time of this thread, from the scheduler's count (ns): wall time on a busy machine
/// would bill the reader for other processes' turns.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("/proc/thread-self/schedstat (Linux)");
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat's first field is ns");
    Duration::from_nanos(ns)
}

fn main() -> anyhow::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: read_rate DISK [DISK ...]");
    for path in paths {
        let disk = open_disk(Path::new(&path))?;
        let mut buf = vec![0u8; 1 << 20];
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let mut offset = 0;
        while offset < disk.capacity() {
            let n = (disk.capacity() - offset).min(buf.len() as u64);
            if !disk.is_hole(offset, n) {
                disk.read_at(offset, &mut buf[..n as usize])?;
            }
            offset += n;
        }
        let (wall, cpu) = (wall.elapsed().as_secs_f64(), (thread_cpu() - cpu).as_secs_f64());
        let gib = disk.capacity() as f64 / f64::from(1u32 << 30);
        println!(
            "{path}: {wall:.2} s wall, {cpu:.2} CPU-s, {:.2} CPU-s per GiB",
            cpu / gib
        );
    }
    Ok(())
}
