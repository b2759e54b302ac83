//! Batches: leaves sealed into a Merkle root that also commits to the batch
//! before, so that a missing, altered or reordered batch breaks the chain.
//!
//! A batch holds the leaf hashes of one process for a range of dataflow
//! epochs, in ascending order of hash: the order is canonical whatever order
//! the leaves were produced or stored in (compaction re-sorts rows), so a
//! verifier that recomputes the leaves from storage rebuilds the same tree.
//! The batch hash is
//!
//! ```text
//! SHA-256(0x02 || "WFB1" || process u32 || number u64 || from_ms u64 ||
//!         to_ms u64 || leaves u64 || root || prev)
//! ```
//!
//! (integers big-endian; `root` is the RFC 6962 tree hash of the leaves,
//! `prev` the previous batch's hash, 32 zero bytes for batch 0). The `0x02`
//! prefix keeps a batch hash apart from RFC 6962's leaf (`0x00`) and node
//! (`0x01`) hashes. Batch hashes are what is anchored.

use crate::merkle::{Hash, MerkleTree, sha256};

/// What a batch commits to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    pub process: u32,
    /// Consecutive per process, from 0.
    pub number: u64,
    /// The dataflow epochs (ms) its leaves belong to: `[from_ms, to_ms)`.
    pub from_ms: u64,
    pub to_ms: u64,
    pub leaves: u64,
    pub root: Hash,
    pub prev: Hash,
}

impl BatchHeader {
    /// The batch hash (see the module documentation).
    pub fn hash(&self) -> Hash {
        sha256(&[
            &[0x02],
            b"WFB1",
            &self.process.to_be_bytes(),
            &self.number.to_be_bytes(),
            &self.from_ms.to_be_bytes(),
            &self.to_ms.to_be_bytes(),
            &self.leaves.to_be_bytes(),
            &self.root,
            &self.prev,
        ])
    }
}

/// A sealed batch: its header and its tree (for inclusion proofs).
#[derive(Debug, Clone)]
pub struct SealedBatch {
    pub header: BatchHeader,
    pub tree: MerkleTree,
}

impl SealedBatch {
    /// The index of a leaf in the batch's canonical order, if it is there.
    pub fn index_of(&self, leaf: &Hash) -> Option<usize> {
        self.tree.leaf_hashes().binary_search(leaf).ok()
    }
}

/// Puts leaf hashes in a batch's canonical order and builds its tree.
pub fn canonical_tree(mut leaves: Vec<Hash>) -> MerkleTree {
    // Byte order; the leading eight bytes as one integer settle almost
    // every comparison without a call to memcmp.
    let head = |h: &Hash| u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    leaves.sort_unstable_by(|a, b| head(a).cmp(&head(b)).then_with(|| a.cmp(b)));
    MerkleTree::from_leaf_hashes(leaves)
}

/// Seals the batches of one process, chaining each to the one before.
#[derive(Debug, Clone)]
pub struct Sealer {
    process: u32,
    next: u64,
    prev: Hash,
    /// Where the last batch ended: the next one must start there.
    next_from: Option<u64>,
}

impl Sealer {
    /// A sealer that continues after `last` (the last batch sealed before a
    /// restart), or starts the chain.
    pub fn new(process: u32, last: Option<&BatchHeader>) -> Self {
        match last {
            Some(h) => Self {
                process,
                next: h.number + 1,
                prev: h.hash(),
                next_from: Some(h.to_ms),
            },
            None => Self {
                process,
                next: 0,
                prev: [0; 32],
                next_from: None,
            },
        }
    }

    /// Seals the leaves of epochs `[from_ms, to_ms)`; ranges must follow on
    /// from one another.
    pub fn seal(&mut self, from_ms: u64, to_ms: u64, leaves: Vec<Hash>) -> SealedBatch {
        assert!(from_ms < to_ms, "an empty epoch range");
        if let Some(f) = self.next_from {
            assert_eq!(from_ms, f, "batches must cover consecutive epochs");
        }
        let tree = canonical_tree(leaves);
        let header = BatchHeader {
            process: self.process,
            number: self.next,
            from_ms,
            to_ms,
            leaves: tree.len() as u64,
            root: tree.root(),
            prev: self.prev,
        };
        self.next += 1;
        self.prev = header.hash();
        self.next_from = Some(to_ms);
        SealedBatch { header, tree }
    }
}

/// Why a sequence of batch headers is not one unbroken chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("batch {found} follows batch {after}: batch {} is missing", after + 1)]
    Missing { after: u64, found: u64 },
    #[error("batch {number} does not commit to batch {}'s hash", number - 1)]
    Broken { number: u64 },
    #[error("batch {number} covers epochs from {from_ms}, but batch {} ended at {expected}", number - 1)]
    Gap {
        number: u64,
        from_ms: u64,
        expected: u64,
    },
    #[error("the chain must start at batch 0, not {0}")]
    BadStart(u64),
}

/// Checks that `headers` (one process, in order) form one chain from batch 0.
pub fn check_chain(headers: &[BatchHeader]) -> Result<(), ChainError> {
    let Some(first) = headers.first() else {
        return Ok(());
    };
    if first.number != 0 || first.prev != [0; 32] {
        return Err(ChainError::BadStart(first.number));
    }
    for w in headers.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.number != a.number + 1 {
            return Err(ChainError::Missing {
                after: a.number,
                found: b.number,
            });
        }
        if b.prev != a.hash() {
            return Err(ChainError::Broken { number: b.number });
        }
        if b.from_ms != a.to_ms {
            return Err(ChainError::Gap {
                number: b.number,
                from_ms: b.from_ms,
                expected: a.to_ms,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{leaf_hash, verify_inclusion};

    fn leaves(n: u32, salt: &str) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("{salt}-{i}").as_bytes()))
            .collect()
    }

    fn chain(n: u64) -> Vec<BatchHeader> {
        let mut s = Sealer::new(0, None);
        (0..n)
            .map(|i| {
                s.seal(i * 1000, (i + 1) * 1000, leaves(5, &i.to_string()))
                    .header
            })
            .collect()
    }

    #[test]
    fn the_root_does_not_depend_on_leaf_order() {
        let mut a = leaves(100, "x");
        let b = canonical_tree(a.clone()).root();
        a.reverse();
        assert_eq!(canonical_tree(a).root(), b);
    }

    #[test]
    fn a_sealed_leaf_proves_its_inclusion() {
        let mut s = Sealer::new(3, None);
        let l = leaves(37, "p");
        let batch = s.seal(0, 1000, l.clone());
        for leaf in &l {
            let i = batch.index_of(leaf).unwrap();
            let proof = batch.tree.inclusion_proof(i).unwrap();
            assert!(verify_inclusion(
                leaf,
                i,
                batch.header.leaves as usize,
                &proof,
                &batch.header.root
            ));
        }
        assert!(batch.index_of(&leaf_hash(b"absent")).is_none());
    }

    #[test]
    fn an_unbroken_chain_checks_and_a_restart_continues_it() {
        let h = chain(4);
        check_chain(&h).unwrap();
        let mut s = Sealer::new(0, h.last());
        let next = s.seal(4000, 5000, leaves(1, "n")).header;
        let mut all = h.clone();
        all.push(next);
        check_chain(&all).unwrap();
    }

    #[test]
    fn a_missing_altered_or_reordered_batch_is_detected() {
        let h = chain(5);
        let mut missing = h.clone();
        missing.remove(2);
        assert_eq!(
            check_chain(&missing),
            Err(ChainError::Missing { after: 1, found: 3 })
        );

        let mut altered = h.clone();
        altered[2].root[0] ^= 1;
        assert_eq!(check_chain(&altered), Err(ChainError::Broken { number: 3 }));

        let mut reordered = h.clone();
        reordered.swap(1, 2);
        assert!(check_chain(&reordered).is_err());

        let mut headless = h.clone();
        headless.remove(0);
        assert_eq!(check_chain(&headless), Err(ChainError::BadStart(1)));
    }

    #[test]
    fn the_batch_hash_covers_every_field() {
        let h = chain(1).remove(0);
        let base = h.hash();
        let mut variants = vec![h.clone(); 7];
        variants[0].process = 1;
        variants[1].number = 1;
        variants[2].from_ms = 1;
        variants[3].to_ms = 1;
        variants[4].leaves = 6;
        variants[5].root[31] ^= 1;
        variants[6].prev[0] = 1;
        for v in variants {
            assert_ne!(v.hash(), base, "{v:?}");
        }
    }
}
