//! Merkle trees over a disk's chunk hashes, shaped as RFC 6962 (Certificate
//! Transparency) defines them. The leaves are the SHA-256 of each chunk's
//! plaintext in offset order, all-zero chunks included (their leaf is the hash
//! of that many zero bytes, see [`crate::integrity::DiskHashes::zero_hash`]).
//!
//! Leaves and inner nodes are hashed with different one-byte prefixes (0x00 and
//! 0x01), so a leaf can never be passed off as an inner node (the second
//! preimage attack on plain Merkle trees), and a root can never be mistaken for
//! a plain SHA-256 over the chunk hashes, which has no prefix. A tree of n > 1
//! leaves splits at the largest power of two below n: the same root comes out
//! whether the tree is built from a slice or streamed leaf by leaf, and a
//! later proof that one chunk belongs to a disk (an audit path of log2(n)
//! hashes) is possible without changing the root.

use ring::digest::{Context, SHA256};

/// Prefix of a leaf hash: `SHA-256(0x00 || chunk hash)`.
pub const LEAF_PREFIX: u8 = 0x00;
/// Prefix of an inner node: `SHA-256(0x01 || left || right)`.
pub const NODE_PREFIX: u8 = 0x01;

fn leaf_of(data: &[u8]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[LEAF_PREFIX]);
    ctx.update(data);
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The leaf hash of one chunk, given the SHA-256 of its plaintext.
pub fn leaf_hash(chunk_sha256: &[u8; 32]) -> [u8; 32] {
    leaf_of(chunk_sha256)
}

/// The hash of an inner node.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[NODE_PREFIX]);
    ctx.update(left);
    ctx.update(right);
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The root of a tree without leaves: SHA-256 of nothing, as RFC 6962 says. A
/// plan never has an empty disk; this only keeps the function total.
pub fn empty_root() -> [u8; 32] {
    crate::chunk::sha256(&[])
}

/// The root over chunk hashes in offset order.
pub fn root(chunk_hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut tree = MerkleBuilder::new();
    for h in chunk_hashes {
        tree.push(h);
    }
    tree.root()
}

/// Builds a root from leaves given in order, holding only one hash per level
/// (at most 64): a disk of any size is verified in constant memory.
#[derive(Debug, Clone, Default)]
pub struct MerkleBuilder {
    /// Roots of complete subtrees, largest first, with their heights; their
    /// sizes are the binary digits of the leaf count.
    stack: Vec<(u32, [u8; 32])>,
    leaves: u64,
}

impl MerkleBuilder {
    pub fn new() -> Self {
        MerkleBuilder::default()
    }

    /// Adds the next chunk, given the SHA-256 of its plaintext.
    pub fn push(&mut self, chunk_sha256: &[u8; 32]) {
        self.push_leaf(leaf_hash(chunk_sha256));
    }

    fn push_leaf(&mut self, leaf: [u8; 32]) {
        let (mut height, mut hash) = (0, leaf);
        // Two complete subtrees of one height make one of the next height.
        while let Some(&(h, left)) = self.stack.last() {
            if h != height {
                break;
            }
            self.stack.pop();
            hash = node_hash(&left, &hash);
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
            return empty_root();
        };
        for (_, left) in subtrees {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::hex;

    /// RFC 6962's recursive definition, written out as the RFC states it.
    fn reference(leaves: &[[u8; 32]]) -> [u8; 32] {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                // The largest power of two smaller than n.
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node_hash(&reference(&leaves[..k]), &reference(&leaves[k..]))
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
        let mut tree = MerkleBuilder::new();
        for (input, want) in inputs.iter().zip(roots) {
            let data: Vec<u8> = (0..input.len() / 2)
                .map(|i| u8::from_str_radix(&input[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            tree.push_leaf(leaf_of(&data));
            assert_eq!(hex(&tree.root()), want, "{} leaves", tree.len());
        }
        assert_eq!(
            hex(&MerkleBuilder::new().root()),
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
            assert_eq!(hex(&root(&leaves[..n])), want, "{n} leaves");
        }
    }

    #[test]
    fn single_leaf_is_its_prefixed_hash_not_the_chunk_hash() {
        let c = chunk(7);
        assert_eq!(root(&[c]), leaf_hash(&c));
        assert_ne!(root(&[c]), c);
        assert_eq!(leaf_hash(&c), {
            let mut data = vec![LEAF_PREFIX];
            data.extend_from_slice(&c);
            crate::chunk::sha256(&data)
        });
    }

    #[test]
    fn streamed_roots_match_the_recursive_definition_for_odd_counts() {
        let leaves: Vec<_> = (0..=70).map(chunk).collect();
        let mut tree = MerkleBuilder::new();
        for n in 1..=leaves.len() {
            tree.push(&leaves[n - 1]);
            assert_eq!(tree.root(), reference(&leaves[..n]), "{n} leaves");
        }
        // Three leaves: the split is 2 + 1, not 1 + 2.
        let (a, b, c) = (leaf_hash(&leaves[0]), leaf_hash(&leaves[1]), leaf_hash(&leaves[2]));
        assert_eq!(root(&leaves[..3]), node_hash(&node_hash(&a, &b), &c));
    }

    #[test]
    fn order_and_leaf_node_confusion_change_the_root() {
        let (a, b) = (chunk(1), chunk(2));
        assert_ne!(root(&[a, b]), root(&[b, a]));
        // A "leaf" whose value is an inner node does not give that node's tree.
        let inner = node_hash(&leaf_hash(&a), &leaf_hash(&b));
        assert_ne!(root(&[inner]), root(&[a, b]));
    }
}
