//! What each stage of a lift costs alone, on one core, over the same disk image the
//! profile lifts (`tests/profile.sh`): the roof each stage of the lift is compared with.
//!
//! Usage: stage-roofs IMAGE [CHUNK_MIB]
//! Prints one JSON object: per stage, the bytes it handles for this image (the lift skips
//! zero chunks, so hashing and compression see only the data chunks; AEAD sees the
//! compressed bytes), its rate on one core (CPU time, not wall), and its CPU-s per GiB of
//! the image.

use std::time::Duration;

use anyhow::{bail, Context};
use gateway::chunk::{is_zero, sha256, ChunkHash};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};

/// CPU time this thread has run, from the scheduler's own count (ns, not clock ticks):
/// on a busy machine wall time would bill the stage for other processes' turns.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("/proc/thread-self/schedstat (Linux)");
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat's first field is ns on CPU");
    Duration::from_nanos(ns)
}

/// Runs `f` until it has used at least half a second of CPU (at least once) and returns
/// the CPU time of one run: short stages are repeated so the clock's grain does not matter.
fn time_of(mut f: impl FnMut()) -> Duration {
    let start = thread_cpu();
    let mut runs = 0u32;
    while runs == 0 || thread_cpu() - start < Duration::from_millis(500) {
        f();
        runs += 1;
    }
    (thread_cpu() - start) / runs
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        bail!("usage: stage-roofs IMAGE [CHUNK_MIB]: IMAGE is the raw disk the profile lifts");
    };
    let chunk_mib: usize = args
        .get(2)
        .map_or(Ok(1), |s| s.parse())
        .context("CHUNK_MIB is a number")?;
    let image = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let logical_gib = image.len() as f64 / f64::from(1u32 << 30);
    let chunks: Vec<&[u8]> = image.chunks(chunk_mib << 20).collect();
    let data: Vec<&[u8]> = chunks.iter().copied().filter(|c| !is_zero(c)).collect();
    let data_bytes: usize = data.iter().map(|c| c.len()).sum();

    let mut compressor = zstd::bulk::Compressor::new(gateway::chunk::DEFAULT_ZSTD_LEVEL)?;
    let compressed: Vec<Vec<u8>> = data.iter().map(|c| compressor.compress(c)).collect::<Result<_, _>>()?;
    let compressed_bytes: usize = compressed.iter().map(Vec::len).sum();
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    let mut plain = vec![0u8; chunk_mib << 20];
    let mut scratch = Vec::with_capacity(compressed_bytes);
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).expect("16-byte key"));
    let mut packet = vec![0u8; 1200];

    let stages: Vec<(&str, usize, Duration)> = vec![
        (
            "zero test (every chunk)",
            image.len(),
            time_of(|| {
                std::hint::black_box(chunks.iter().filter(|c| is_zero(c)).count());
            }),
        ),
        (
            "chunk hash BLAKE3 (data chunks)",
            data_bytes,
            time_of(|| {
                for c in &data {
                    std::hint::black_box(ChunkHash::Blake3.digest(c));
                }
            }),
        ),
        (
            "  SHA-256 instead (protocol 7 and before)",
            data_bytes,
            time_of(|| {
                for c in &data {
                    std::hint::black_box(sha256(c));
                }
            }),
        ),
        (
            "compress zstd level 1 (data chunks)",
            data_bytes,
            time_of(|| {
                for c in &data {
                    std::hint::black_box(compressor.compress(c).expect("compresses"));
                }
            }),
        ),
        (
            "decompress zstd (data chunks)",
            data_bytes,
            time_of(|| {
                for c in &compressed {
                    std::hint::black_box(decompressor.decompress_to_buffer(c, &mut plain).expect("decompresses"));
                }
            }),
        ),
        (
            "AEAD AES-128-GCM, 1200 B packets (compressed bytes)",
            compressed_bytes,
            time_of(|| {
                for (i, c) in compressed.iter().enumerate() {
                    for (j, piece) in c.chunks(1200).enumerate() {
                        packet[..piece.len()].copy_from_slice(piece);
                        let mut nonce = [0u8; 12];
                        nonce[..8].copy_from_slice(&((i as u64) << 20 | j as u64).to_be_bytes());
                        let tag = key
                            .seal_in_place_separate_tag(
                                Nonce::assume_unique_for_key(nonce),
                                Aad::empty(),
                                &mut packet[..piece.len()],
                            )
                            .expect("seals");
                        std::hint::black_box(tag.as_ref()[0]);
                    }
                }
            }),
        ),
        (
            "one copy (memcpy) of the compressed bytes",
            compressed_bytes,
            time_of(|| {
                scratch.clear();
                for c in &compressed {
                    scratch.extend_from_slice(c);
                }
                std::hint::black_box(&scratch);
            }),
        ),
    ];

    let rows: Vec<serde_json::Value> = stages
        .iter()
        .map(|(stage, bytes, took)| {
            serde_json::json!({
                "stage": stage,
                "bytes": bytes,
                "mb_per_s": *bytes as f64 / took.as_secs_f64() / 1e6,
                "cpu_s_per_gib": took.as_secs_f64() / logical_gib,
            })
        })
        .collect();
    let out = serde_json::json!({
        "image": path,
        "logical_bytes": image.len(),
        "data_bytes": data_bytes,
        "compressed_bytes": compressed_bytes,
        "chunk_mib": chunk_mib,
        "stages": rows,
    });
    println!("{out}");
    Ok(())
}
