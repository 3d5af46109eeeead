//! The chunk hash on one core: SHA-256 (ring, as protocol version 7 hashed chunks) against
//! BLAKE3 (the `blake3` crate, protocol version 8), over 1 MiB chunks of incompressible
//! data, in GB/s. The figures behind the choice in docs/how-it-works.md ("The chunk hash").
//!
//! ```sh
//! cargo run --release -p gateway --example chunk_hash           # 2 GiB per hash
//! taskset -c 1 target/release/examples/chunk_hash 4096          # pinned, 4 GiB per hash
//! ```

use std::time::Instant;

use gateway::chunk::ChunkHash;

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2048);
    let mut chunk = vec![0u8; 1 << 20];
    // xorshift: data no hash can shortcut, made without a dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in chunk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut rates = Vec::new();
    for alg in [ChunkHash::Sha256, ChunkHash::Blake3] {
        let mut acc = 0u8;
        // Warm up caches and the CPU's clock before timing.
        for _ in 0..64 {
            acc ^= alg.digest(&chunk)[0];
        }
        let start = Instant::now();
        for _ in 0..mib {
            acc ^= alg.digest(&chunk)[0];
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = (mib << 20) as f64 / secs / 1e9;
        println!(
            "{:<7} 1 MiB chunks, one thread: {rate:.2} GB/s ({mib} MiB in {secs:.2} s, check {acc})",
            alg.name()
        );
        rates.push(rate);
    }
    println!("blake3 / sha256: {:.2}x", rates[1] / rates[0]);
}
