//! Merkle trees over a disk's chunk hashes, shaped as RFC 6962 (Certificate
//! Transparency) defines them. The leaves are the chunk hash of each chunk's
//! plaintext in offset order, all-zero chunks included (their leaf is the hash
//! of that many zero bytes, see [`crate::integrity::DiskHashes::zero_hash`]).
//! Leaves and inner nodes are hashed with the chunk hash too
//! ([`ChunkHash::CURRENT`]; a receipt of format 1 or 2 was built with SHA-256, and
//! [`MerkleBuilder::with`] rebuilds it so).
//!
//! Leaves and inner nodes are hashed with different one-byte prefixes (0x00 and
//! 0x01), so a leaf can never be passed off as an inner node (the second
//! preimage attack on plain Merkle trees), and a root can never be mistaken for
//! a plain hash over the chunk hashes, which has no prefix. A tree of n > 1
//! leaves splits at the largest power of two below n: the same root comes out
//! whether the tree is built from a slice or streamed leaf by leaf, and a
//! later proof that one chunk belongs to a disk (an audit path of log2(n)
//! hashes) is possible without changing the root.

use crate::chunk::ChunkHash;

/// Prefix of a leaf hash: `H(0x00 || chunk hash)`.
pub const LEAF_PREFIX: u8 = 0x00;
/// Prefix of an inner node: `H(0x01 || left || right)`.
pub const NODE_PREFIX: u8 = 0x01;

fn leaf_of(alg: ChunkHash, data: &[u8]) -> [u8; 32] {
    alg.digest_parts(&[&[LEAF_PREFIX], data])
}

/// The leaf hash of one chunk, given the hash of its plaintext.
pub fn leaf_hash(alg: ChunkHash, chunk_hash: &[u8; 32]) -> [u8; 32] {
    leaf_of(alg, chunk_hash)
}

/// The hash of an inner node.
pub fn node_hash(alg: ChunkHash, left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    alg.digest_parts(&[&[NODE_PREFIX], left, right])
}

/// The root of a tree without leaves: the hash of nothing, as RFC 6962 says. A
/// plan never has an empty disk; this only keeps the function total.
pub fn empty_root(alg: ChunkHash) -> [u8; 32] {
    alg.digest(&[])
}

/// The root over chunk hashes in offset order, with this build's chunk hash.
pub fn root(chunk_hashes: &[[u8; 32]]) -> [u8; 32] {
    root_with(ChunkHash::CURRENT, chunk_hashes)
}

/// The root over chunk hashes in offset order, built with `alg`.
pub fn root_with(alg: ChunkHash, chunk_hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut tree = MerkleBuilder::with(alg);
    for h in chunk_hashes {
        tree.push(h);
    }
    tree.root()
}

/// Builds a root from leaves given in order, holding only one hash per level
/// (at most 64): a disk of any size is verified in constant memory.
#[derive(Debug, Clone)]
pub struct MerkleBuilder {
    alg: ChunkHash,
    /// Roots of complete subtrees, largest first, with their heights; their
    /// sizes are the binary digits of the leaf count.
    stack: Vec<(u32, [u8; 32])>,
    leaves: u64,
}

impl Default for MerkleBuilder {
    fn default() -> Self {
        MerkleBuilder::new()
    }
}

impl MerkleBuilder {
    /// A tree hashed with this build's chunk hash.
    pub fn new() -> Self {
        MerkleBuilder::with(ChunkHash::CURRENT)
    }

    /// A tree hashed with `alg`: an older receipt's root is rebuilt with its own hash.
    pub fn with(alg: ChunkHash) -> Self {
        MerkleBuilder {
            alg,
            stack: Vec::new(),
            leaves: 0,
        }
    }

    /// Adds the next chunk, given the hash of its plaintext.
    pub fn push(&mut self, chunk_hash: &[u8; 32]) {
        self.push_leaf(leaf_hash(self.alg, chunk_hash));
    }

    fn push_leaf(&mut self, leaf: [u8; 32]) {
        let (mut height, mut hash) = (0, leaf);
        // Two complete subtrees of one height make one of the next height.
        while let Some(&(h, left)) = self.stack.last() {
            if h != height {
                break;
            }
            self.stack.pop();
            hash = node_hash(self.alg, &left, &hash);
            height += 1;
        }
        self.stack.push((height, hash));
        self.leaves += 1;
    }

    /// Leaves pushed so far.
    pub fn len(&self) -> u64 {
        self.leaves
    }

    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The root over the leaves pushed so far. Folding the complete subtrees
    /// from the right is RFC 6962's split at the largest power of two.
    pub fn root(&self) -> [u8; 32] {
        let mut subtrees = self.stack.iter().rev();
        let Some(&(_, mut acc)) = subtrees.next() else {
            return empty_root(self.alg);
        };
        for (_, left) in subtrees {
            acc = node_hash(self.alg, left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::hex;

    const SHA: ChunkHash = ChunkHash::Sha256;

    /// RFC 6962's recursive definition, written out as the RFC states it.
    fn reference(alg: ChunkHash, leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => empty_root(alg),
            1 => leaf_hash(alg, &leaves[0]),
            n => {
                // The largest power of two smaller than n.
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node_hash(alg, &reference(alg, &leaves[..k]), &reference(alg, &leaves[k..]))
            }
        }
    }

    fn chunk(i: u8) -> [u8; 32] {
        crate::chunk::sha256(&[i; 10])
    }

    #[test]
    fn certificate_transparency_test_vectors() {
        // The leaf inputs and roots of the CT reference implementation's tests
        // (certificate-transparency, merkle_tree_test), for 1 to 8 leaves.
        let inputs = [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        // SHA-256 trees: what receipts of formats 1 and 2 hold.
        let mut tree = MerkleBuilder::with(SHA);
        for (input, want) in inputs.iter().zip(roots) {
            let data: Vec<u8> = (0..input.len() / 2)
                .map(|i| u8::from_str_radix(&input[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            tree.push_leaf(leaf_of(SHA, &data));
            assert_eq!(hex(&tree.root()), want, "{} leaves", tree.len());
        }
        assert_eq!(
            hex(&MerkleBuilder::with(SHA).root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn chunk_hash_leaves_match_an_independent_computation() {
        // Computed with a 10-line Python RFC 6962 implementation over
        // sha256(bytes([i]) * 10) for i in 0..5.
        let want = [
            "4d6a9c37526849fe66caf75a9846fd72063fd0f81743f1a944de2dbfa6328a09",
            "8bf44960a540f211ee5dc144e8a21eef5f11835b62ff402d4a07d2c117121fa7",
            "eb65758b234613577c8fed513ebe52d8a9a0ddbf1091fe8f9055c24167b3af16",
            "efad53d45375d0ae84d923debefd90de89721a76b375ffd2460127faaf2cca50",
            "3137e8d77a19594f4b6b5f64d3faf8760972ff6721b746171ed996118e7a71cb",
        ];
        let leaves: Vec<_> = (0..5).map(chunk).collect();
        for (n, want) in (1..=5).zip(want) {
            assert_eq!(hex(&root_with(SHA, &leaves[..n])), want, "{n} leaves");
        }
    }

    #[test]
    fn single_leaf_is_its_prefixed_hash_not_the_chunk_hash() {
        let c = chunk(7);
        for alg in [SHA, ChunkHash::Blake3] {
            assert_eq!(root_with(alg, &[c]), leaf_hash(alg, &c));
            assert_ne!(root_with(alg, &[c]), c);
            assert_eq!(leaf_hash(alg, &c), {
                let mut data = vec![LEAF_PREFIX];
                data.extend_from_slice(&c);
                alg.digest(&data)
            });
        }
        // The two hashes give different roots: a receipt's format decides which one to rebuild.
        assert_ne!(root_with(SHA, &[c]), root_with(ChunkHash::Blake3, &[c]));
        assert_eq!(root(&[c]), root_with(ChunkHash::CURRENT, &[c]));
    }

    #[test]
    fn blake3_matches_its_reference_vector() {
        // The BLAKE3 paper's test vector for the empty input: the crate is the algorithm.
        assert_eq!(
            hex(&ChunkHash::Blake3.digest(&[])),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            ChunkHash::Blake3.digest_parts(&[b"ab", b"c"]),
            ChunkHash::Blake3.digest(b"abc")
        );
    }

    #[test]
    fn streamed_roots_match_the_recursive_definition_for_odd_counts() {
        let leaves: Vec<_> = (0..=70).map(chunk).collect();
        for alg in [SHA, ChunkHash::Blake3] {
            let mut tree = MerkleBuilder::with(alg);
            for n in 1..=leaves.len() {
                tree.push(&leaves[n - 1]);
                assert_eq!(tree.root(), reference(alg, &leaves[..n]), "{n} leaves");
            }
            // Three leaves: the split is 2 + 1, not 1 + 2.
            let leaf = |i: usize| leaf_hash(alg, &leaves[i]);
            let (a, b, c) = (leaf(0), leaf(1), leaf(2));
            assert_eq!(
                root_with(alg, &leaves[..3]),
                node_hash(alg, &node_hash(alg, &a, &b), &c)
            );
        }
    }

    #[test]
    fn order_and_leaf_node_confusion_change_the_root() {
        let (a, b) = (chunk(1), chunk(2));
        assert_ne!(root(&[a, b]), root(&[b, a]));
        // A "leaf" whose value is an inner node does not give that node's tree.
        let alg = ChunkHash::CURRENT;
        let inner = node_hash(alg, &leaf_hash(alg, &a), &leaf_hash(alg, &b));
        assert_ne!(root(&[inner]), root(&[a, b]));
    }
}
