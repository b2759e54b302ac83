//! Certificate Transparency's Merkle tree (RFC 6962 §2.1, RFC 9162 §2.1):
//! leaf and node hashes with distinct prefixes, trees of any size, audit
//! paths and their verification.

use ring::digest::{Context, SHA256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

pub(crate) fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The hash of a leaf: SHA-256(0x00 || data) (RFC 6962 §2.1).
pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

/// The hash of an interior node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0x01; 65];
    buf[1..33].copy_from_slice(left);
    buf[33..].copy_from_slice(right);
    ring::digest::digest(&SHA256, &buf)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The largest power of two smaller than `n` (n > 1): where RFC 6962 splits.
fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// A Merkle tree over leaf hashes.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    leaves: Vec<Hash>,
}

impl MerkleTree {
    /// A tree over the given leaf data.
    pub fn from_leaves<'a>(data: impl IntoIterator<Item = &'a [u8]>) -> Self {
        Self {
            leaves: data.into_iter().map(leaf_hash).collect(),
        }
    }

    /// A tree over already hashed leaves.
    pub fn from_leaf_hashes(leaves: Vec<Hash>) -> Self {
        Self { leaves }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.leaves.push(leaf_hash(data));
    }

    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// The leaf hashes, in tree order.
    pub fn leaf_hashes(&self) -> &[Hash] {
        &self.leaves
    }

    /// The leaf hashes, giving up the tree.
    pub fn into_leaf_hashes(self) -> Vec<Hash> {
        self.leaves
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The Merkle Tree Hash (MTH) of all leaves; of no leaves, SHA-256 of
    /// the empty string.
    pub fn root(&self) -> Hash {
        if self.leaves.is_empty() {
            return sha256(&[]);
        }
        mth(&self.leaves)
    }

    /// The audit path of leaf `index` (RFC 6962 §2.1.1), leaf to root.
    pub fn inclusion_proof(&self, index: usize) -> Option<Vec<Hash>> {
        (index < self.leaves.len()).then(|| {
            let mut path = Vec::new();
            audit_path(index, &self.leaves, &mut path);
            path
        })
    }
}

/// A tree with every level kept, for many inclusion proofs: built in one
/// pass (n − 1 node hashes), then each proof is O(log n) lookups.
///
/// RFC 6962's tree splits at the largest power of two below n; built from
/// the leaves up, that is pairing nodes left to right and carrying an odd
/// last node up a level unchanged, and its audit path is, level by level,
/// the node's sibling where it has one.
#[derive(Debug, Clone)]
pub struct ProvingTree {
    levels: Vec<Vec<Hash>>,
}

impl ProvingTree {
    pub fn new(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().expect("a level");
            let up = below
                .chunks(2)
                .map(|p| match p {
                    [l, r] => node_hash(l, r),
                    [one] => *one,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(up);
        }
        Self { levels }
    }

    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels[0].is_empty()
    }

    /// The leaf hashes, in tree order.
    pub fn leaf_hashes(&self) -> &[Hash] {
        &self.levels[0]
    }

    /// The root, as [`MerkleTree::root`].
    pub fn root(&self) -> Hash {
        match self.levels.last().and_then(|l| l.first()) {
            Some(r) if !self.is_empty() => *r,
            _ => sha256(&[]),
        }
    }

    /// The audit path of leaf `index`, as [`MerkleTree::inclusion_proof`].
    pub fn inclusion_proof(&self, index: usize) -> Option<Vec<Hash>> {
        if index >= self.len() {
            return None;
        }
        let mut path = Vec::with_capacity(self.levels.len());
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sibling) = level.get(i ^ 1) {
                path.push(*sibling);
            }
            i >>= 1;
        }
        Some(path)
    }
}

fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

fn audit_path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        audit_path(m, &leaves[..k], out);
        out.push(mth(&leaves[k..]));
    } else {
        audit_path(m - k, &leaves[k..], out);
        out.push(mth(&leaves[..k]));
    }
}

/// Checks that `leaf` is leaf `index` of a tree of `size` leaves with
/// `root`, given its audit path (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: usize,
    size: usize,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proving_tree_has_the_same_root_and_proofs_as_the_recursive_definition() {
        for n in 1..=40u32 {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect();
            let tree = MerkleTree::from_leaf_hashes(leaves.clone());
            let proving = ProvingTree::new(leaves.clone());
            assert_eq!(proving.root(), tree.root(), "n = {n}");
            for (i, leaf) in leaves.iter().enumerate() {
                let proof = proving.inclusion_proof(i).unwrap();
                assert_eq!(
                    Some(&proof),
                    tree.inclusion_proof(i).as_ref(),
                    "n = {n}, i = {i}"
                );
                assert!(verify_inclusion(leaf, i, n as usize, &proof, &tree.root()));
            }
            assert!(proving.inclusion_proof(n as usize).is_none());
        }
        assert_eq!(
            ProvingTree::new(Vec::new()).root(),
            MerkleTree::default().root()
        );
    }

    use crate::hex;

    /// The eight leaves of Certificate Transparency's reference test vectors.
    fn reference_leaves() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            (0x50..0x58).collect(),
            (0x60..0x70).collect(),
        ]
    }

    #[test]
    fn roots_match_the_certificate_transparency_vectors() {
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves = reference_leaves();
        for (n, want) in expected.iter().enumerate() {
            let tree = MerkleTree::from_leaves(leaves[..=n].iter().map(Vec::as_slice));
            assert_eq!(hex(&tree.root()), *want, "tree of {} leaves", n + 1);
        }
        assert_eq!(
            hex(&MerkleTree::default().root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn every_proof_verifies_and_no_other_leaf_or_index_does() {
        let leaves = reference_leaves();
        for size in 1..=leaves.len() {
            let tree = MerkleTree::from_leaves(leaves[..size].iter().map(Vec::as_slice));
            let root = tree.root();
            for (i, data) in leaves.iter().take(size).enumerate() {
                let proof = tree.inclusion_proof(i).unwrap();
                let leaf = leaf_hash(data);
                assert!(
                    verify_inclusion(&leaf, i, size, &proof, &root),
                    "size {size} index {i}"
                );
                for j in (0..size).filter(|&j| j != i) {
                    assert!(
                        !verify_inclusion(&leaf, j, size, &proof, &root),
                        "index {j} must fail"
                    );
                }
                assert!(!verify_inclusion(&leaf_hash(b"x"), i, size, &proof, &root));
                if !proof.is_empty() {
                    assert!(
                        !verify_inclusion(&leaf, i, size, &proof[1..], &root),
                        "short proof"
                    );
                }
            }
            assert!(tree.inclusion_proof(size).is_none());
        }
    }

    #[test]
    fn a_leaf_cannot_pose_as_a_node() {
        // Without domain separation, the concatenation of two leaf hashes
        // hashed as a leaf would equal the node: RFC 6962's prefixes prevent it.
        let a = leaf_hash(b"a");
        let b = leaf_hash(b"b");
        let forged: Vec<u8> = [a, b].concat();
        assert_ne!(leaf_hash(&forged), node_hash(&a, &b));
    }

    #[test]
    fn large_trees_prove_every_leaf() {
        let data: Vec<Vec<u8>> = (0u32..1000).map(|i| i.to_le_bytes().to_vec()).collect();
        let tree = MerkleTree::from_leaves(data.iter().map(Vec::as_slice));
        let root = tree.root();
        for i in [0, 1, 511, 512, 513, 998, 999] {
            let proof = tree.inclusion_proof(i).unwrap();
            assert!(proof.len() <= 10);
            assert!(verify_inclusion(
                &leaf_hash(&data[i]),
                i,
                1000,
                &proof,
                &root
            ));
        }
    }
}
