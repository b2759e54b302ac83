//! Checking a batch against leaves recomputed from storage.
//!
//! The root decides: the recomputed leaves, in canonical order, must hash
//! to the anchored root. When they do not, the leaf index (when it has the
//! batch) tells which recomputed leaves were never sealed (an altered or
//! added row) and how many sealed leaves are gone (a deleted row).

use crate::batch::{BatchHeader, canonical_tree};
use crate::index::prefix;
use crate::merkle::{Hash, ProvingTree, verify_inclusion};

/// The outcome for one batch.
#[derive(Debug)]
pub enum Verdict {
    /// The recomputed leaves hash to the anchored root; the tree is kept
    /// for inclusion proofs.
    Verified(ProvingTree),
    Mismatch(Mismatch),
}

/// How a batch's recomputed leaves differ from what was sealed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Leaves recomputed from storage.
    pub recomputed: u64,
    /// Recomputed leaves that were never sealed in the batch, in canonical
    /// order; empty when the index does not hold the batch.
    pub unsealed: Vec<Hash>,
    /// Sealed leaves not found in storage; `None` without the index.
    pub missing: Option<u64>,
}

/// Checks `recomputed` (the batch's leaves from storage, in any order)
/// against `header`, using the batch's record in the leaf index, if any.
pub fn check_batch(header: &BatchHeader, recomputed: Vec<Hash>, index: Option<&[u64]>) -> Verdict {
    let tree = ProvingTree::new(canonical_tree(recomputed).into_leaf_hashes());
    if tree.len() as u64 == header.leaves && tree.root() == header.root {
        return Verdict::Verified(tree);
    }
    let mut m = Mismatch {
        recomputed: tree.len() as u64,
        ..Mismatch::default()
    };
    if let Some(sealed) = index {
        // Both lists are in ascending order: one merge finds the
        // differences, counting duplicates.
        let ours: Vec<u64> = tree.leaf_hashes().iter().map(prefix).collect();
        let (mut i, mut j, mut missing) = (0, 0, 0u64);
        while i < ours.len() || j < sealed.len() {
            match (ours.get(i), sealed.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a > b => {
                    missing += 1;
                    j += 1;
                }
                (Some(_), _) => {
                    m.unsealed.push(tree.leaf_hashes()[i]);
                    i += 1;
                }
                (None, Some(_)) => {
                    missing += 1;
                    j += 1;
                }
                (None, None) => unreachable!("the loop condition"),
            }
        }
        m.missing = Some(missing);
    }
    Verdict::Mismatch(m)
}

/// Produces and checks the inclusion proof of `leaf` in a verified batch's
/// tree: whether it is in the batch whose root is `root`.
pub fn prove(tree: &ProvingTree, leaf: &Hash, root: &Hash) -> bool {
    let Ok(index) = tree.leaf_hashes().binary_search(leaf) else {
        return false;
    };
    tree.inclusion_proof(index)
        .is_some_and(|proof| verify_inclusion(leaf, index, tree.len(), &proof, root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Sealer;
    use crate::leaf_hash;

    #[test]
    fn names_the_altered_leaf_and_counts_the_deleted_one() {
        let leaves: Vec<Hash> = (0..100u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let batch = Sealer::new(0, None).seal(0, 1000, leaves.clone());
        let index: Vec<u64> = batch.tree.leaf_hashes().iter().map(prefix).collect();

        let Verdict::Verified(tree) = check_batch(&batch.header, leaves.clone(), Some(&index))
        else {
            panic!("the same leaves verify");
        };
        assert!(prove(&tree, &leaves[7], &batch.header.root));
        assert!(!prove(&tree, &leaf_hash(b"never"), &batch.header.root));

        // One row altered, another deleted.
        let mut altered = leaves.clone();
        altered[7] = leaf_hash(b"altered");
        altered.remove(50);
        let Verdict::Mismatch(m) = check_batch(&batch.header, altered.clone(), Some(&index)) else {
            panic!("an altered batch does not verify");
        };
        assert_eq!(m.unsealed, vec![leaf_hash(b"altered")]);
        assert_eq!(
            m.missing,
            Some(2),
            "the altered row's original and the deleted row"
        );
        assert_eq!(m.recomputed, 99);

        // Without the index, only the fact of the mismatch.
        let Verdict::Mismatch(m) = check_batch(&batch.header, altered, None) else {
            panic!("an altered batch does not verify");
        };
        assert!(m.unsealed.is_empty() && m.missing.is_none());
    }
}
