//! Whole-disk integrity: each chunk's hash is checked on arrival, and each
//! disk's Merkle root over every chunk hash in offset order (zero chunks
//! included, see [`crate::merkle`]) is computed on both sides and compared
//! before commit. A chunk that went missing, arrived twice at the wrong place
//! or was skipped as "zero" when it was not changes the root. The same root is
//! what the endpoint's signed receipt states for the disk.

use crate::chunk::chunk_hash;
use crate::merkle;

/// Chunk hashes of one disk, filled in any order.
#[derive(Debug, Clone)]
pub struct DiskHashes {
    capacity: u64,
    chunk_size: u32,
    hashes: Vec<[u8; 32]>,
    known: Vec<bool>,
    missing: u64,
    zero_full: [u8; 32],
}

impl DiskHashes {
    /// Memory: 33 bytes per chunk (33 KiB per GiB of disk at 1 MiB chunks).
    pub fn new(capacity: u64, chunk_size: u32) -> Self {
        let n = capacity.div_ceil(u64::from(chunk_size));
        DiskHashes {
            capacity,
            chunk_size,
            hashes: vec![[0; 32]; n as usize],
            known: vec![false; n as usize],
            missing: n,
            zero_full: chunk_hash(&vec![0u8; chunk_size as usize]),
        }
    }

    /// The disk's capacity and chunk size: two tables of the same shape hold the same chunks.
    pub fn shape(&self) -> (u64, u32) {
        (self.capacity, self.chunk_size)
    }

    /// Chunks whose hash is known.
    pub fn known(&self) -> u64 {
        self.chunk_count() - self.missing
    }

    pub fn chunk_count(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn missing(&self) -> u64 {
        self.missing
    }

    pub fn is_known(&self, index: u64) -> bool {
        self.known[index as usize]
    }

    pub fn get(&self, index: u64) -> Option<[u8; 32]> {
        self.known[index as usize].then(|| self.hashes[index as usize])
    }

    /// Records a chunk's hash; returns false if it was already known.
    pub fn set(&mut self, index: u64, hash: [u8; 32]) -> bool {
        let i = index as usize;
        self.hashes[i] = hash;
        if self.known[i] {
            return false;
        }
        self.known[i] = true;
        self.missing -= 1;
        true
    }

    /// Forgets a chunk's hash (a write failed verification and will be redone).
    pub fn unset(&mut self, index: u64) {
        let i = index as usize;
        if self.known[i] {
            self.known[i] = false;
            self.missing += 1;
        }
    }

    /// Hash of an all-zero chunk at this index (the last chunk may be short).
    pub fn zero_hash(&self, index: u64) -> [u8; 32] {
        let offset = index * u64::from(self.chunk_size);
        let len = (self.capacity - offset).min(u64::from(self.chunk_size));
        if len == u64::from(self.chunk_size) {
            self.zero_full
        } else {
            chunk_hash(&vec![0u8; len as usize])
        }
    }

    /// The disk's Merkle root, once every chunk's hash is known. The capacity
    /// and chunk size are not hashed in: the leaf count and the short last
    /// chunk's hash already depend on them, and the receipt states both.
    pub fn merkle_root(&self) -> Option<[u8; 32]> {
        (self.missing == 0).then(|| merkle::root(&self.hashes))
    }
}

/// Lowercase hex, for logs and reports.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_depends_on_every_chunk_and_order() {
        let mut a = DiskHashes::new(3 * 65536 + 10, 65536);
        assert_eq!(a.chunk_count(), 4);
        for i in 0..4 {
            assert_eq!(a.merkle_root(), None);
            a.set(i, [i as u8; 32]);
        }
        let d = a.merkle_root().unwrap();
        assert_eq!(d, merkle::root(&[[0; 32], [1; 32], [2; 32], [3; 32]]));
        let mut b = a.clone();
        b.set(1, [2; 32]);
        b.set(2, [1; 32]);
        assert_ne!(b.merkle_root().unwrap(), d);
        b.unset(1);
        assert_eq!(b.missing(), 1);
        assert_eq!(b.merkle_root(), None);
    }

    #[test]
    fn zero_hash_of_the_short_tail() {
        let h = DiskHashes::new(65536 + 512, 65536);
        assert_eq!(h.zero_hash(0), chunk_hash(&[0u8; 65536]));
        assert_eq!(h.zero_hash(1), chunk_hash(&[0u8; 512]));
    }
}
