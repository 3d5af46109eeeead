//! How long a given VM would take to lift over the measured link: sample the
//! disks as a migration would read them (holes and zero chunks are never
//! sent; the rest is hashed and compressed), then scale to the whole disk.

use std::time::Instant;

use gateway::chunk::{is_zero, Sealer};
use serde::Serialize;

use super::stats::transfer_secs;
use crate::source::DiskReader;

/// Most chunks sampled per disk: 256 MiB read at most with 1 MiB chunks, and
/// a zero fraction and ratio within a few percent on a realistic disk.
pub const MAX_SAMPLES: u64 = 256;

/// Cores the edge's sealing workers share: the bulk-lift estimate assumes a
/// small edge VM of 2 vCPUs, as the benchmark machine has.
pub const CORES: u32 = 2;

/// Bytes of a chunk frame's header on a data stream.
const FRAME_HEADER: u64 = gateway::wire::CHUNK_HEADER_LEN as u64;

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
}

/// `n` chunk indexes spread evenly over `chunks`, first chunk included.
pub fn sample_indexes(chunks: u64, max: u64) -> impl Iterator<Item = u64> {
    let n = chunks.min(max);
    (0..n).map(move |i| (u128::from(i) * u128::from(chunks) / u128::from(n)) as u64)
}

/// Samples up to `max_samples` chunks of `disk` evenly and seals each non-zero
/// one as a migration would.
pub fn sample_disk(
    key: &str,
    disk: &dyn DiskReader,
    chunk_size: u64,
    max_samples: u64,
    sealer: &mut Sealer,
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
        s.plain_bytes += len;
        s.payload_bytes += u64::from(header.payload_len);
    }
    Ok(s)
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
    /// data / payload of the sampled non-zero chunks.
    pub compression_ratio: f64,
    /// Stream bytes: compressed payloads plus chunk headers.
    pub payload_bytes: u64,
    /// UDP bytes: payload times the QUIC/TLS overhead measured in the upload.
    pub wire_bytes: u64,
    /// Time the link needs at the measured upload rate.
    pub network_secs: f64,
    /// SHA-256 + zstd speed of one core on the sampled chunks, MB/s.
    pub seal_mb_s_per_core: f64,
    pub cores: u32,
    /// Time the cores need to seal the data.
    pub cpu_secs: f64,
    /// The larger of the two: they overlap in a migration.
    pub lift_secs: f64,
    /// "link" or "CPU".
    pub limit: &'static str,
}

/// Scales each disk's sample to the disk, then the VM to the link and CPU.
/// `upload_mbit_s` is stream goodput (QUIC overhead already paid), and
/// `wire_overhead` the ratio of UDP bytes to stream bytes seen in the upload.
pub fn estimate(disks: &[DiskSample], upload_mbit_s: f64, wire_overhead: f64, cores: u32) -> LiftEstimate {
    let (mut logical, mut zero, mut data, mut payload) = (0u64, 0f64, 0f64, 0f64);
    let (mut plain_sampled, mut payload_sampled, mut seal_secs) = (0u64, 0u64, 0f64);
    for d in disks {
        logical += d.capacity;
        let zero_fraction = if d.sampled == 0 {
            0.0
        } else {
            d.zero as f64 / d.sampled as f64
        };
        let disk_zero = d.capacity as f64 * zero_fraction;
        let disk_data = d.capacity as f64 - disk_zero;
        let ratio = if d.payload_bytes == 0 {
            1.0
        } else {
            d.plain_bytes as f64 / d.payload_bytes as f64
        };
        let frames = (disk_data / d.chunk_size.max(1) as f64).ceil();
        zero += disk_zero;
        data += disk_data;
        payload += disk_data / ratio + frames * FRAME_HEADER as f64;
        plain_sampled += d.plain_bytes;
        payload_sampled += d.payload_bytes;
        seal_secs += d.seal_secs;
    }
    let seal_rate = if seal_secs > 0.0 {
        plain_sampled as f64 / seal_secs
    } else {
        f64::INFINITY
    };
    let cpu_secs = if data > 0.0 {
        data / (seal_rate * f64::from(cores.max(1)))
    } else {
        0.0
    };
    let network_secs = transfer_secs(payload, upload_mbit_s);
    let (lift_secs, limit) = if cpu_secs > network_secs {
        (cpu_secs, "CPU")
    } else {
        (network_secs, "link")
    };
    LiftEstimate {
        logical_bytes: logical,
        zero_bytes: zero.round() as u64,
        zero_fraction: if logical == 0 { 0.0 } else { zero / logical as f64 },
        data_bytes: data.round() as u64,
        compression_ratio: if payload_sampled == 0 {
            1.0
        } else {
            plain_sampled as f64 / payload_sampled as f64
        },
        payload_bytes: payload.round() as u64,
        wire_bytes: (payload * wire_overhead.max(1.0)).round() as u64,
        network_secs,
        seal_mb_s_per_core: if seal_rate.is_finite() { seal_rate / 1e6 } else { 0.0 },
        cores,
        cpu_secs,
        lift_secs,
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
        let s = sample_disk("scsi0:0", &disk, chunk, 256, &mut sealer).unwrap();
        assert_eq!((s.chunks, s.sampled, s.zero), (8, 8, 2));
        assert_eq!(s.plain_bytes, 5 * chunk + 1000);
        assert!(s.payload_bytes > 2 * chunk && s.payload_bytes < 3 * chunk, "{s:?}");
    }

    #[test]
    fn estimate_scales_samples_to_the_disk_and_finds_the_limit() {
        let gib = 1u64 << 30;
        let disk = DiskSample {
            key: "scsi0:0".into(),
            capacity: 100 * gib,
            chunk_size: 1 << 20,
            chunks: 102_400,
            sampled: 256,
            zero: 192, // 75 % zero
            plain_bytes: 64 << 20,
            payload_bytes: 16 << 20, // ratio 4
            seal_secs: 0.16,         // ~419 MB/s per core
        };
        let e = estimate(std::slice::from_ref(&disk), 1000.0, 1.03, 2);
        assert_eq!(e.logical_bytes, 100 * gib);
        assert_eq!(e.zero_fraction, 0.75);
        assert_eq!(e.data_bytes, 25 * gib);
        assert_eq!(e.compression_ratio, 4.0);
        let frames = 25 * 1024;
        assert_eq!(e.payload_bytes, 25 * gib / 4 + frames * 52);
        assert_eq!(e.wire_bytes, (e.payload_bytes as f64 * 1.03).round() as u64);
        assert!((e.network_secs - e.payload_bytes as f64 * 8.0 / 1e9).abs() < 1e-6);
        assert!((e.cpu_secs - 25.0 * gib as f64 / (419.43e6 * 2.0)).abs() < 0.1, "{e:?}");
        // 53.7 s of link vs ~32 s of CPU: the link limits.
        assert_eq!(e.limit, "link");
        assert_eq!(e.lift_secs, e.network_secs);

        // On a 10 Gbit/s link the two cores are the limit.
        let e = estimate(&[disk], 10_000.0, 1.03, 2);
        assert_eq!(e.limit, "CPU");
        assert_eq!(e.lift_secs, e.cpu_secs);

        // An all-zero disk costs nothing.
        let empty = DiskSample {
            capacity: gib,
            chunk_size: 1 << 20,
            chunks: 1024,
            sampled: 256,
            zero: 256,
            ..Default::default()
        };
        let e = estimate(&[empty], 100.0, 1.0, 2);
        assert_eq!((e.data_bytes, e.payload_bytes, e.lift_secs), (0, 0, 0.0));
    }
}
