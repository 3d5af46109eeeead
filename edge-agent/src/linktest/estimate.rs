//! How long a given VM would take to lift over the measured link: sample the
//! disks as a migration would read them (holes and zero chunks are never
//! sent; the rest is hashed and compressed), then scale to the whole disk.
//!
//! `migrate` does not compress at one level: its adaptive zstd level
//! ([`crate::compression::LevelController`]) climbs while the link is the
//! bottleneck, so on a slow link it sends far fewer bytes than level 1 would.
//! The forecast therefore seals a few sampled chunks at every level the
//! controller may pick, and replays the controller second by second against
//! the measured rate and the cores' speed at each level ([`simulate`]). A lift
//! also pays fixed costs besides the transfer (handshake, plan, the first
//! round trips of the congestion controller, the cloud's read-back of the
//! staged disks, the commit), counted in round trips and local speeds
//! ([`FixedCosts`]); the whole model is in docs/long-links.md.

use std::time::{Duration, Instant};

use gateway::chunk::{chunk_hash, is_zero, Sealer};
use serde::Serialize;

use super::stats::transfer_secs;
use crate::compression::{Compression, LevelController, Pressure};
use crate::source::DiskReader;

/// Most chunks sampled per disk: 256 MiB read at most with 1 MiB chunks, and
/// a zero fraction and ratio within a few percent on a realistic disk.
pub const MAX_SAMPLES: u64 = 256;

/// Cores the edge's sealing workers share: the bulk-lift estimate assumes a
/// small edge VM of 2 vCPUs, as the benchmark machine has.
pub const CORES: u32 = 2;

/// Bytes of a chunk frame's header on a data stream.
const FRAME_HEADER: u64 = gateway::wire::CHUNK_HEADER_LEN as u64;

/// Chunks per disk sealed at every zstd level for the level curve: 16 MiB
/// at each of 12 levels is a few seconds of one core, and the ratio of one
/// level to another varies far less across a disk than the ratio itself
/// (which the full sample at level 1 measures).
pub const LEVEL_SAMPLES: u64 = 16;

/// What sealing a few chunks at one zstd level cost and gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LevelSample {
    pub level: i32,
    pub plain_bytes: u64,
    pub payload_bytes: u64,
    pub seal_secs: f64,
}

/// What sampling one disk found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskSample {
    pub key: String,
    pub capacity: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub sampled: u64,
    /// Sampled chunks that were holes or all zero.
    pub zero: u64,
    /// Plaintext and payload bytes of the sampled non-zero chunks.
    pub plain_bytes: u64,
    pub payload_bytes: u64,
    /// CPU time sealing them (SHA-256 + zstd), in seconds.
    pub seal_secs: f64,
    /// CPU time hashing them alone (SHA-256), in seconds: the cloud's
    /// read-back before the commit.
    pub hash_secs: f64,
    /// A subset of the non-zero sampled chunks sealed at each level `auto`
    /// may choose, lowest first.
    pub levels: Vec<LevelSample>,
}

/// `n` chunk indexes spread evenly over `chunks`, first chunk included.
pub fn sample_indexes(chunks: u64, max: u64) -> impl Iterator<Item = u64> {
    let n = chunks.min(max);
    (0..n).map(move |i| (u128::from(i) * u128::from(chunks) / u128::from(n)) as u64)
}

/// Samples up to `max_samples` chunks of `disk` evenly and seals each non-zero
/// one as a migration would (at `sealer`'s level); then seals up to
/// `level_samples` of those, spread evenly, at each of `levels`.
pub fn sample_disk(
    key: &str,
    disk: &dyn DiskReader,
    chunk_size: u64,
    max_samples: u64,
    sealer: &mut Sealer,
    levels: &[i32],
    level_samples: u64,
) -> std::io::Result<DiskSample> {
    let capacity = disk.capacity();
    let chunks = capacity.div_ceil(chunk_size);
    let mut s = DiskSample {
        key: key.to_owned(),
        capacity,
        chunk_size,
        chunks,
        ..DiskSample::default()
    };
    let mut plain = Vec::new();
    let mut payload = Vec::new();
    let mut data_offsets = Vec::new();
    for index in sample_indexes(chunks, max_samples) {
        let offset = index * chunk_size;
        let len = chunk_size.min(capacity - offset);
        s.sampled += 1;
        if disk.is_hole(offset, len) {
            s.zero += 1;
            continue;
        }
        plain.resize(len as usize, 0);
        disk.read_at(offset, &mut plain)?;
        if is_zero(&plain) {
            s.zero += 1;
            continue;
        }
        let started = Instant::now();
        let header = sealer.seal(0, offset, &plain, &mut payload);
        s.seal_secs += started.elapsed().as_secs_f64();
        let started = Instant::now();
        std::hint::black_box(chunk_hash(&plain));
        s.hash_secs += started.elapsed().as_secs_f64();
        s.plain_bytes += len;
        s.payload_bytes += u64::from(header.payload_len);
        data_offsets.push((offset, len));
    }
    let base_level = sealer.level();
    let picked: Vec<(u64, u64)> = sample_indexes(data_offsets.len() as u64, level_samples)
        .map(|i| data_offsets[i as usize])
        .collect();
    let mut picked_plain = Vec::with_capacity(picked.len());
    for &(offset, len) in &picked {
        let mut buf = vec![0; len as usize];
        disk.read_at(offset, &mut buf)?;
        picked_plain.push((offset, buf));
    }
    for &level in levels {
        // A level this zstd refuses is left out of the curve.
        if sealer.set_level(level).is_err() {
            continue;
        }
        let mut l = LevelSample {
            level,
            ..LevelSample::default()
        };
        for (offset, buf) in &picked_plain {
            let started = Instant::now();
            let header = sealer.seal(0, *offset, buf, &mut payload);
            l.seal_secs += started.elapsed().as_secs_f64();
            l.plain_bytes += buf.len() as u64;
            l.payload_bytes += u64::from(header.payload_len);
        }
        s.levels.push(l);
    }
    sealer.set_level(base_level)?;
    Ok(s)
}

/// How much of `cores` x one core's sealing speed the machine gives now:
/// seals `chunks` on one thread, then on `cores` threads at once, and
/// compares. A busy edge host (other VMs, a backup) leaves a lift less than
/// its nominal cores, and `migrate`'s level follows what it gets.
pub fn parallel_share(chunks: &[Vec<u8>], level: i32, cores: u32) -> f64 {
    let seal_all = || -> f64 {
        let Ok(mut sealer) = Sealer::new(level) else {
            return 0.0;
        };
        let mut payload = Vec::new();
        let started = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            std::hint::black_box(sealer.seal(0, i as u64, c, &mut payload));
        }
        started.elapsed().as_secs_f64()
    };
    if chunks.is_empty() || cores <= 1 {
        return 1.0;
    }
    let alone = seal_all();
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(seal_all);
        }
    });
    let together = started.elapsed().as_secs_f64();
    if alone <= 0.0 || together <= 0.0 {
        return 1.0;
    }
    // cores x the work in `together`, against cores x the work in `alone`.
    (alone / together).clamp(0.05, 1.0)
}

/// Round trips before the first chunk moves: the QUIC handshake with the
/// edge certificate (2), the login with the plan right behind it (1, protocol
/// version 11: no round trip of its own for the plan), the data streams'
/// first flight (1).
pub const SETUP_RTTS: f64 = 4.0;
/// A lift's delivery rate in its first round trips, Mbit/s: measured on the
/// emulated 150 ms links (tests/wan-bench.sh), the first second after the
/// plan moves 4-5 Mbit/s at 100 Mbit/s and 16 at 20, whatever `--link-rate`
/// says: the pipeline and the congestion controller leave startup early on
/// a path whose queue delays the first burst.
pub const RAMP_START_MBIT_S: f64 = 4.5;
/// ...from which it grows by this factor per round trip (fitted to the same
/// runs: 4.5, 19, 33, 57, 92 Mbit/s in seconds 1-5 at 100 Mbit/s and 150 ms,
/// ~2.1x a second), until the link's rate.
pub const RAMP_GROWTH_PER_RTT: f64 = 1.12;
/// Weight of that climb in the forecast. It was 0.6 while 6 of 10 lifts at
/// 100 Mbit/s and 150 ms climbed so: a burst of late acknowledgements from a
/// busy host ended the congestion controller's startup with the control
/// phase's bandwidth. Startup now ends only on a queue that persists, and a
/// path given by `--link-rate` keeps its first window (transport/congestion.rs):
/// none of 11 lifts since climbed, so no climb is counted.
pub const RAMP_SLOW_SHARE: f64 = 0.0;
/// Round trips after the last chunk is sent: the commit request (sent with the
/// last chunk's seal since protocol version 12, no longer after its
/// acknowledgement) and the read-back's answer, the registration's answer.
pub const COMMIT_RTTS: f64 = 3.0;
/// Seconds of local work on both sides whatever the link: starting the agent,
/// reading the VM and its checkpoint, creating the staged files, the
/// inventory's transactions, the receipt's signature. Fitted to the emulated
/// links' lifts: 0.6 s beyond the round trips while lifts climbed and the
/// commit waited for the last acknowledgements; with neither, the 100 Mbit/s
/// lifts of the 256 MiB image took 0.9-1.0 s beyond their transfer, about
/// the 7 round trips alone, so 0.3 s is kept for a busier machine.
pub const LOCAL_SECS: f64 = 0.3;
/// How fast the endpoint's datastore makes the staged data durable at the
/// commit (its fsync of what the page cache still holds): this machine's
/// virtual disk, ~400 MB/s.
pub const SYNC_BYTES_PER_SEC: f64 = 400e6;
/// The endpoint makes written chunks durable every 250 ms while they flow,
/// so the commit waits only for the last interval's data, not the disk's.
const ENDPOINT_SYNC_INTERVAL_SECS: f64 = 0.25;
/// How fast the cloud's read-back checks a chunk that should be zero (holes
/// of the staged file read as zeros at memory speed).
const ZERO_READBACK_BYTES_PER_SEC: f64 = 4e9;

/// What a lift costs besides moving the chunks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FixedCosts {
    /// Handshake, login, plan: [`SETUP_RTTS`] round trips.
    pub setup_secs: f64,
    /// Time lost while the rate climbs to the link's ([`ramp_secs`]).
    pub ramp_secs: f64,
    /// The cloud reading the staged disks back before the commit: the data
    /// at this machine's SHA-256 speed on the cores, zeros at memory speed.
    pub readback_secs: f64,
    /// The commit's round trips ([`COMMIT_RTTS`]), the local work of both
    /// sides ([`LOCAL_SECS`]) and the datastore's sync ([`SYNC_BYTES_PER_SEC`]).
    pub commit_secs: f64,
    pub total_secs: f64,
}

/// Seconds a lift loses while its rate climbs from [`RAMP_START_MBIT_S`] by
/// [`RAMP_GROWTH_PER_RTT`] a round trip to `link_mbit_s`: the climb takes
/// T = ln(R/R0)/k (k = ln(growth)/RTT) and moves what R would in
/// (R - R0)/(R k), so T less that is lost; weighted by [`RAMP_SLOW_SHARE`].
pub fn ramp_secs(link_mbit_s: f64, rtt_secs: f64) -> f64 {
    RAMP_SLOW_SHARE * slow_climb_secs(link_mbit_s, rtt_secs)
}

/// Seconds a lift that climbs slowly loses (see [`ramp_secs`]).
pub fn slow_climb_secs(link_mbit_s: f64, rtt_secs: f64) -> f64 {
    if link_mbit_s <= RAMP_START_MBIT_S || rtt_secs <= 0.0 {
        return 0.0;
    }
    let k = RAMP_GROWTH_PER_RTT.ln() / rtt_secs;
    let climb = (link_mbit_s / RAMP_START_MBIT_S).ln() / k;
    climb - (1.0 - RAMP_START_MBIT_S / link_mbit_s) / k
}

impl FixedCosts {
    pub fn new(rtt_secs: f64, link_mbit_s: f64, data_bytes: f64, zero_bytes: f64, hash_bytes_per_sec: f64) -> Self {
        let setup_secs = SETUP_RTTS * rtt_secs;
        let ramp_secs = if data_bytes > 0.0 {
            ramp_secs(link_mbit_s, rtt_secs)
        } else {
            0.0
        };
        let readback_secs = if data_bytes > 0.0 && hash_bytes_per_sec.is_finite() && hash_bytes_per_sec > 0.0 {
            data_bytes / hash_bytes_per_sec
        } else {
            0.0
        } + zero_bytes / ZERO_READBACK_BYTES_PER_SEC;
        let unsynced = data_bytes.min(link_mbit_s * 1e6 / 8.0 * ENDPOINT_SYNC_INTERVAL_SECS);
        let commit_secs = COMMIT_RTTS * rtt_secs + LOCAL_SECS + unsynced / SYNC_BYTES_PER_SEC;
        FixedCosts {
            setup_secs,
            ramp_secs,
            readback_secs,
            commit_secs,
            total_secs: setup_secs + ramp_secs + readback_secs + commit_secs,
        }
    }
}

/// One zstd level as the forecast sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LevelModel {
    pub level: i32,
    /// Data bytes per payload byte.
    pub ratio: f64,
    /// Bytes of data one core seals per second (SHA-256 + zstd).
    pub bytes_per_sec_per_core: f64,
}

/// How the transfer went in [`simulate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Simulated {
    pub secs: f64,
    pub payload_bytes: f64,
    /// Seconds of the transfer the cores, not the link, set the pace.
    pub cpu_limited_secs: f64,
    /// Core-seconds of sealing.
    pub cpu_secs: f64,
    /// The lowest and highest level used, and the one it settled at.
    pub lowest_level: i32,
    pub highest_level: i32,
    pub final_level: i32,
}

/// The level model nearest to `level` (`curve` sorted by level, non-empty).
fn at_level(curve: &[LevelModel], level: i32) -> LevelModel {
    *curve
        .iter()
        .min_by_key(|m| (m.level - level).abs())
        .expect("a non-empty curve")
}

/// Replays `migrate`'s adaptive level against a link that takes
/// `payload_bytes_per_sec` and `cores` sealing at each level's speed: in each
/// one-second window the data moved is the smaller of what the link takes
/// (its payload rate times the level's ratio) and what the cores seal, and
/// the controller sees the pressure that leaves (sealers idle for the share
/// of the cores the link does not need, senders idle for the share of the
/// link the cores do not fill), as `migrate`'s pipeline reports it.
pub fn simulate(
    data_bytes: f64,
    payload_bytes_per_sec: f64,
    curve: &[LevelModel],
    cores: u32,
    mode: Compression,
) -> Simulated {
    let mut ctl = LevelController::new(mode);
    let mut sim = Simulated {
        secs: 0.0,
        payload_bytes: 0.0,
        cpu_limited_secs: 0.0,
        cpu_secs: 0.0,
        lowest_level: ctl.level(),
        highest_level: ctl.level(),
        final_level: ctl.level(),
    };
    if data_bytes <= 0.0 {
        return sim;
    }
    if payload_bytes_per_sec <= 0.0 || curve.is_empty() {
        sim.secs = f64::INFINITY;
        return sim;
    }
    let mut left = data_bytes;
    loop {
        let m = at_level(curve, ctl.level());
        let link = payload_bytes_per_sec * m.ratio;
        let cpu = m.bytes_per_sec_per_core * f64::from(cores.max(1));
        let rate = link.min(cpu);
        // A level that no longer changes stays: the rest moves at its rate.
        let settled = {
            let pressure = Pressure {
                sealers_blocked: (1.0 - link / cpu).max(0.0),
                senders_starved: (1.0 - cpu / link).max(0.0),
            };
            let before = ctl.level();
            let after = ctl.update(pressure);
            // `update` already moved it for the next window; undo nothing:
            // this window ran at `before`.
            before == after
        };
        let secs = if settled { left / rate } else { (left / rate).min(1.0) };
        let moved = rate * secs;
        sim.secs += secs;
        sim.payload_bytes += moved / m.ratio;
        sim.cpu_secs += moved / m.bytes_per_sec_per_core;
        if cpu < link {
            sim.cpu_limited_secs += secs;
        }
        left -= moved;
        if settled || left <= data_bytes * 1e-12 {
            sim.final_level = m.level;
            break;
        }
    }
    let (lo, hi) = ctl.range();
    (sim.lowest_level, sim.highest_level) = (lo, hi);
    sim
}

/// The link as the link test measured it, and how `migrate` compresses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Stream goodput in Mbit/s (QUIC overhead already paid).
    pub upload_mbit_s: f64,
    /// UDP bytes per stream byte seen in the upload.
    pub wire_overhead: f64,
    /// The path's round trip (the pings' minimum).
    pub rtt: Duration,
    pub compression: Compression,
}

/// The lift of a whole VM at a measured upload rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiftEstimate {
    pub logical_bytes: u64,
    /// Holes and all-zero chunks: announced, never sent.
    pub zero_bytes: u64,
    pub zero_fraction: f64,
    /// Non-zero bytes, read, hashed and compressed.
    pub data_bytes: u64,
    /// data / payload over the whole lift, at the levels it would use.
    pub compression_ratio: f64,
    /// data / payload of the sampled non-zero chunks at level 1.
    pub level1_ratio: f64,
    /// The zstd levels `migrate --zstd-level auto` would use, and the one it
    /// settles at on this link.
    pub zstd_levels: (i32, i32),
    pub zstd_final_level: i32,
    /// Each level's ratio and speed, from the level samples.
    pub level_curve: Vec<LevelModel>,
    /// Stream bytes: compressed payloads plus chunk headers.
    pub payload_bytes: u64,
    /// UDP bytes: payload times the QUIC/TLS overhead measured in the upload.
    pub wire_bytes: u64,
    /// Time the link needs for the payload at the measured upload rate.
    pub network_secs: f64,
    /// SHA-256 + zstd speed of one core on the sampled chunks at level 1, MB/s.
    pub seal_mb_s_per_core: f64,
    pub cores: u32,
    /// Core-seconds of sealing at the levels used, over the cores.
    pub cpu_secs: f64,
    /// Share of `cores` x one core's speed that sealing on all cores at once
    /// reached when sampled (below 1 when other work shares the machine).
    pub cpu_share: f64,
    /// Moving the chunks: link and cores overlap, each window at the slower.
    pub transfer_secs: f64,
    pub fixed: FixedCosts,
    /// The whole lift, as `migrate`'s wall time: transfer plus fixed costs.
    pub lift_secs: f64,
    /// "link" or "CPU": what sets the transfer's pace most of the time.
    pub limit: &'static str,
}

/// Each level's ratio and speed: the level samples give each level's ratio
/// and speed relative to the lowest sampled level, scaled to what the full
/// sample measured there (the full sample sees more of the disk).
pub fn level_curve(disks: &[DiskSample], base_ratio: f64, base_speed: f64) -> Vec<LevelModel> {
    let mut by_level: Vec<LevelSample> = Vec::new();
    for d in disks {
        for l in &d.levels {
            match by_level.iter_mut().find(|x| x.level == l.level) {
                Some(x) => {
                    x.plain_bytes += l.plain_bytes;
                    x.payload_bytes += l.payload_bytes;
                    x.seal_secs += l.seal_secs;
                }
                None => by_level.push(l.clone()),
            }
        }
    }
    by_level.retain(|l| l.plain_bytes > 0 && l.payload_bytes > 0 && l.seal_secs > 0.0);
    by_level.sort_by_key(|l| l.level);
    let Some(first) = by_level.first().cloned() else {
        return vec![LevelModel {
            level: gateway::chunk::DEFAULT_ZSTD_LEVEL,
            ratio: base_ratio,
            bytes_per_sec_per_core: base_speed,
        }];
    };
    let ratio = |l: &LevelSample| l.plain_bytes as f64 / l.payload_bytes as f64;
    let speed = |l: &LevelSample| l.plain_bytes as f64 / l.seal_secs;
    by_level
        .iter()
        .map(|l| LevelModel {
            level: l.level,
            ratio: base_ratio * ratio(l) / ratio(&first),
            bytes_per_sec_per_core: base_speed * speed(l) / speed(&first),
        })
        .collect()
}

/// Scales each disk's sample to the disk, replays the transfer against the
/// link and the cores ([`simulate`]), and adds the fixed costs.
pub fn estimate(disks: &[DiskSample], link: &LinkModel, cores: u32) -> LiftEstimate {
    estimate_with_share(disks, link, cores, 1.0)
}

/// As [`estimate`], with `cpu_share` of the cores' speed measured alone
/// available to the lift ([`parallel_share`]: other work on the machine).
pub fn estimate_with_share(disks: &[DiskSample], link: &LinkModel, cores: u32, cpu_share: f64) -> LiftEstimate {
    let (mut logical, mut zero, mut data, mut frames) = (0u64, 0f64, 0f64, 0f64);
    let (mut plain_sampled, mut payload_sampled, mut seal_secs, mut hash_secs) = (0u64, 0u64, 0f64, 0f64);
    for d in disks {
        logical += d.capacity;
        let zero_fraction = if d.sampled == 0 {
            0.0
        } else {
            d.zero as f64 / d.sampled as f64
        };
        let disk_zero = d.capacity as f64 * zero_fraction;
        let disk_data = d.capacity as f64 - disk_zero;
        frames += (disk_data / d.chunk_size.max(1) as f64).ceil();
        zero += disk_zero;
        data += disk_data;
        plain_sampled += d.plain_bytes;
        payload_sampled += d.payload_bytes;
        seal_secs += d.seal_secs;
        hash_secs += d.hash_secs;
    }
    let level1_ratio = if payload_sampled == 0 {
        1.0
    } else {
        plain_sampled as f64 / payload_sampled as f64
    };
    let share = if cpu_share.is_finite() {
        cpu_share.clamp(0.05, 1.0)
    } else {
        1.0
    };
    let seal_rate = if seal_secs > 0.0 {
        plain_sampled as f64 / seal_secs * share
    } else {
        f64::INFINITY
    };
    let hash_rate = if hash_secs > 0.0 {
        plain_sampled as f64 / hash_secs * share
    } else {
        f64::INFINITY
    };
    let curve = level_curve(disks, level1_ratio, seal_rate);
    // Chunk headers share the link with the payloads: the link's payload rate
    // is its goodput less their share.
    let goodput = link.upload_mbit_s * 1e6 / 8.0;
    let header_share = if data > 0.0 {
        frames * FRAME_HEADER as f64 / (data / level1_ratio + frames * FRAME_HEADER as f64)
    } else {
        0.0
    };
    let sim = simulate(data, goodput * (1.0 - header_share), &curve, cores, link.compression);
    let payload = sim.payload_bytes + frames * FRAME_HEADER as f64;
    let fixed = FixedCosts::new(
        link.rtt.as_secs_f64(),
        link.upload_mbit_s,
        data,
        zero,
        hash_rate * f64::from(cores.max(1)),
    );
    let limit = if sim.cpu_limited_secs * 2.0 > sim.secs {
        "CPU"
    } else {
        "link"
    };
    LiftEstimate {
        logical_bytes: logical,
        zero_bytes: zero.round() as u64,
        zero_fraction: if logical == 0 { 0.0 } else { zero / logical as f64 },
        data_bytes: data.round() as u64,
        compression_ratio: if sim.payload_bytes > 0.0 {
            data / sim.payload_bytes
        } else {
            level1_ratio
        },
        level1_ratio,
        zstd_levels: (sim.lowest_level, sim.highest_level),
        zstd_final_level: sim.final_level,
        level_curve: curve,
        payload_bytes: payload.round() as u64,
        wire_bytes: (payload * link.wire_overhead.max(1.0)).round() as u64,
        network_secs: transfer_secs(payload, link.upload_mbit_s),
        seal_mb_s_per_core: if seal_rate.is_finite() { seal_rate / 1e6 } else { 0.0 },
        cores,
        cpu_secs: sim.cpu_secs / f64::from(cores.max(1)),
        cpu_share: share,
        transfer_secs: sim.secs,
        lift_secs: sim.secs + fixed.total_secs,
        fixed,
        limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory; `holes` lists chunk indexes reported as holes.
    #[derive(Debug)]
    struct MemDisk {
        data: Vec<u8>,
        holes: Vec<u64>,
        chunk: u64,
    }

    impl DiskReader for MemDisk {
        fn capacity(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn is_hole(&self, offset: u64, _len: u64) -> bool {
            self.holes.contains(&(offset / self.chunk))
        }
    }

    #[test]
    fn samples_spread_evenly_and_cover_small_disks() {
        assert_eq!(sample_indexes(4, 256).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(sample_indexes(1024, 4).collect::<Vec<_>>(), [0, 256, 512, 768]);
        assert_eq!(sample_indexes(0, 256).count(), 0);
        let big: Vec<_> = sample_indexes(1 << 40, 256).collect();
        assert_eq!(big.len(), 256);
        assert!(big.windows(2).all(|w| w[1] - w[0] == 1 << 32));
    }

    #[test]
    fn sampling_finds_holes_zeros_and_compressible_data() {
        let chunk = 64 * 1024u64;
        // 8 chunks: a hole, zeros, text x3, random x2, a short text tail.
        let mut data = vec![0u8; (7 * chunk + 1000) as usize];
        let text = b"legacy VM data 0123456789 ";
        for (i, b) in data[(2 * chunk) as usize..(5 * chunk) as usize].iter_mut().enumerate() {
            *b = text[i % text.len()];
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in &mut data[(5 * chunk) as usize..(7 * chunk) as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for b in &mut data[(7 * chunk) as usize..] {
            *b = b'x';
        }
        data[10] = 1; // chunk 0 is a hole by metadata even though it holds a byte
        let disk = MemDisk {
            data,
            holes: vec![0],
            chunk,
        };
        let mut sealer = Sealer::new(gateway::chunk::DEFAULT_ZSTD_LEVEL).unwrap();
        let s = sample_disk("scsi0:0", &disk, chunk, 256, &mut sealer, &[1, 6, 12], 4).unwrap();
        assert_eq!((s.chunks, s.sampled, s.zero), (8, 8, 2));
        assert_eq!(s.plain_bytes, 5 * chunk + 1000);
        assert!(s.payload_bytes > 2 * chunk && s.payload_bytes < 3 * chunk, "{s:?}");
        assert!(s.hash_secs > 0.0);
        // 4 of the 6 data chunks, at each level; the sealer is left at its own.
        assert_eq!(s.levels.iter().map(|l| l.level).collect::<Vec<_>>(), [1, 6, 12]);
        assert!(s
            .levels
            .iter()
            .all(|l| l.plain_bytes == s.levels[0].plain_bytes && l.seal_secs > 0.0));
        assert!(s.levels[2].payload_bytes <= s.levels[0].payload_bytes, "{:?}", s.levels);
        assert_eq!(sealer.level(), gateway::chunk::DEFAULT_ZSTD_LEVEL);
    }

    const MB: f64 = 1e6;

    /// A curve like this machine's on a realistic disk: ratio and speed fall
    /// as the level rises.
    fn curve() -> Vec<LevelModel> {
        (1..=12)
            .map(|level| LevelModel {
                level,
                ratio: 3.0 + 0.1 * f64::from(level - 1),
                bytes_per_sec_per_core: 500.0 * MB / f64::from(level),
            })
            .collect()
    }

    fn link(mbit_s: f64, rtt_ms: u64) -> LinkModel {
        LinkModel {
            upload_mbit_s: mbit_s,
            wire_overhead: 1.03,
            rtt: Duration::from_millis(rtt_ms),
            compression: Compression::default(),
        }
    }

    #[test]
    fn a_slow_link_climbs_to_the_levels_the_cores_afford() {
        // 100 Mbit/s: 12.5 MB/s of payload, 37.5 MB/s of data at level 1
        // against 1000 MB/s of cores: the level climbs while the cores are
        // less than half busy; at 11 they are 55 % busy (4.0 x 12.5 MB/s of
        // 2 x 500/11), and it stays there.
        let sim = simulate(10_000.0 * MB, 12.5 * MB, &curve(), 2, Compression::default());
        assert_eq!((sim.lowest_level, sim.highest_level, sim.final_level), (1, 11, 11));
        // Ten one-second windows climbing, then the rest at level 11.
        let climbed: f64 = (1..=10).map(|l| 12.5 * MB * (3.0 + 0.1 * f64::from(l - 1))).sum();
        let expect = 10.0 + (10_000.0 * MB - climbed) / (12.5 * MB * 4.0);
        assert!((sim.secs - expect).abs() < 1e-6, "{} vs {expect}", sim.secs);
        assert_eq!(sim.cpu_limited_secs, 0.0);

        // A fixed level stays put.
        let sim = simulate(10_000.0 * MB, 12.5 * MB, &curve(), 2, Compression::Fixed(1));
        assert_eq!(sim.final_level, 1);
        assert!((sim.secs - 10_000.0 / 37.5).abs() < 1e-6);
    }

    #[test]
    fn a_fast_link_keeps_the_level_the_cores_can_feed() {
        // 1 Gbit/s: 125 MB/s of payload needs 375 MB/s of data at level 1;
        // the cores seal 1000 MB/s: 62 % idle, one step up to level 2
        // (needs 387.5 of 500: 22 % idle, below the controller's 50 %).
        let sim = simulate(10_000.0 * MB, 125.0 * MB, &curve(), 2, Compression::default());
        assert_eq!((sim.highest_level, sim.final_level), (2, 2));
        // 10 Gbit/s: the cores are the limit at level 1 and it stays there.
        let sim = simulate(10_000.0 * MB, 1250.0 * MB, &curve(), 2, Compression::default());
        assert_eq!((sim.highest_level, sim.final_level), (1, 1));
        assert!(
            (sim.secs - 10.0).abs() < 1e-6 && sim.cpu_limited_secs == sim.secs,
            "{sim:?}"
        );
    }

    #[test]
    fn estimate_scales_samples_to_the_disk_and_adds_the_fixed_costs() {
        const SEAL_SECS: f64 = (64u64 << 20) as f64 / 500e6;
        let gib = 1u64 << 30;
        let levels: Vec<LevelSample> = curve()
            .iter()
            .map(|m| LevelSample {
                level: m.level,
                plain_bytes: 16 << 20,
                payload_bytes: ((16 << 20) as f64 / m.ratio) as u64,
                seal_secs: (16 << 20) as f64 / m.bytes_per_sec_per_core,
            })
            .collect();
        let disk = DiskSample {
            key: "scsi0:0".into(),
            capacity: 100 * gib,
            chunk_size: 1 << 20,
            chunks: 102_400,
            sampled: 256,
            zero: 192, // 75 % zero
            plain_bytes: 64 << 20,
            payload_bytes: 16 << 20, // ratio 4 at level 1 over the full sample
            seal_secs: SEAL_SECS,    // 500 MB/s per core, as the curve's level 1
            hash_secs: 0.04,         // ~1.68 GB/s per core
            levels,
        };
        let e = estimate(std::slice::from_ref(&disk), &link(100.0, 150), 2);
        assert_eq!(e.logical_bytes, 100 * gib);
        assert_eq!(e.zero_fraction, 0.75);
        assert_eq!(e.data_bytes, 25 * gib);
        assert_eq!(e.level1_ratio, 4.0);
        // The curve is scaled to the full sample: level 1 is 4.0, level 12
        // 4.0 x 4.1 / 3.0.
        assert!((e.level_curve[0].ratio - 4.0).abs() < 1e-3, "{:?}", e.level_curve[0]);
        assert!((e.level_curve[11].ratio - 4.0 * 4.1 / 3.0).abs() < 1e-3);
        // Cores 49 % busy at level 8 (12.5 MB/s x 4.93 of 2 x 500/8), 57 % at 9.
        assert_eq!((e.zstd_levels, e.zstd_final_level), ((1, 9), 9));
        assert!(e.compression_ratio > 5.0 && e.compression_ratio < 5.07, "{e:?}");
        assert_eq!(e.limit, "link");
        // Fixed costs: 7 round trips of 150 ms (4 to set up, 3 to commit), the ramp,
        // the read-back of 25 GiB of data at 2 x 1.68 GB/s and 75 GiB of zeros at
        // 4 GB/s, local work, the sync of the last 250 ms of data.
        let f = &e.fixed;
        let sync = 100e6 / 8.0 * 0.25 / SYNC_BYTES_PER_SEC;
        assert!((f.setup_secs + f.commit_secs - 7.0 * 0.15 - LOCAL_SECS - sync).abs() < 1e-9);
        assert_eq!(f.ramp_secs, ramp_secs(100.0, 0.15));
        let readback = 25.0 * gib as f64 / (2.0 * (64 << 20) as f64 / 0.04) + 75.0 * gib as f64 / 4e9;
        assert!((f.readback_secs - readback).abs() < 1e-6, "{f:?}");
        assert!((e.lift_secs - e.transfer_secs - f.total_secs).abs() < 1e-9);
        // Link-limited: the transfer is the payload at the link's rate (chunk
        // headers apportioned at level 1's ratio, hence not to the byte).
        assert!(
            (e.transfer_secs - e.network_secs).abs() < e.network_secs * 1e-3,
            "{e:?}"
        );
        // Both from the unrounded payload: within a byte of each other.
        assert!(e.wire_bytes.abs_diff((e.payload_bytes as f64 * 1.03).round() as u64) <= 1);

        // On a 10 Gbit/s link the two cores are the limit, at level 1.
        let e = estimate(std::slice::from_ref(&disk), &link(10_000.0, 1), 2);
        assert_eq!((e.limit, e.zstd_final_level), ("CPU", 1));
        assert!(
            (e.transfer_secs - 25.0 * gib as f64 / (2.0 * 500e6)).abs() < 1e-3,
            "{e:?}"
        );

        // An all-zero disk costs only the fixed part.
        let empty = DiskSample {
            capacity: gib,
            chunk_size: 1 << 20,
            chunks: 1024,
            sampled: 256,
            zero: 256,
            ..Default::default()
        };
        let e = estimate(&[empty], &link(100.0, 150), 2);
        assert_eq!((e.data_bytes, e.payload_bytes, e.transfer_secs), (0, 0, 0.0));
        assert!((e.lift_secs - e.fixed.total_secs).abs() < 1e-12 && e.lift_secs > 1.6);
        assert_eq!(e.fixed.ramp_secs, 0.0, "nothing to send, no ramp");
    }

    #[test]
    fn the_ramp_costs_what_the_emulated_links_showed() {
        // 100 Mbit/s at 150 ms: 4.5 -> 92 Mbit/s over seconds 1-5 lost ~2.7 s.
        let r = slow_climb_secs(89.0, 0.15);
        assert!((r - 2.7).abs() < 0.1, "{r}");
        assert_eq!(ramp_secs(89.0, 0.15), r * RAMP_SLOW_SHARE);
        // A slower link is reached sooner; a short path at once.
        assert!(ramp_secs(20.0, 0.15) < 1.0);
        assert!(ramp_secs(1000.0, 0.001) < 0.05);
        assert_eq!(ramp_secs(3.0, 0.15), 0.0);
    }

    #[test]
    fn an_idle_machine_gives_its_cores() {
        let chunks = vec![vec![7u8; 1 << 20]; 4];
        let share = parallel_share(&chunks, 1, 1);
        assert_eq!(share, 1.0);
        let share = parallel_share(&chunks, 1, 2);
        assert!(share > 0.0 && share <= 1.0, "{share}");
    }
}
