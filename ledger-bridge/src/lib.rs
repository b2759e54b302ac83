//! Wardflow's audit trail, starting from its foundation: Merkle trees over
//! what Wardflow stored, with inclusion proofs anyone can check.
//!
//! This crate owns the hashing and proof rules (Certificate Transparency's
//! Merkle tree, RFC 6962 §2.1, as restated in RFC 9162 §2.1): leaves and
//! interior nodes are hashed with distinct prefixes so that no leaf can pose
//! as a node, trees of any size are supported, and a proof is the audit path
//! from a leaf to the root. On it: the canonical encoding of every kind of
//! leaf ([`leaf`]), batches sealed over a process's leaves and chained by
//! hash ([`batch`]), the signed local anchor log of local mode
//! ([`anchor`]) and a process's ledger that seals and anchors leaves below
//! a watermark ([`local`]), the event log of leaves that do not come from
//! the store ([`events`]), verification against the store's rows
//! ([`verify`]), anchoring batch hashes on a Substrate chain with subxt
//! ([`chain`]), and patients' consent: the records patients sign on the
//! chain and the book that decides them ([`consent`]), read from finalized
//! blocks ([`follow`]). It does not read the store (the engine hands it the
//! leaves), nor enforce consent: the engine's dataflow joins the accesses
//! in force with what it delivers.
//!
//! ```
//! use wardflow_ledger_bridge::{MerkleTree, leaf_hash, verify_inclusion};
//!
//! let leaves: Vec<&[u8]> = vec![b"reading 1", b"reading 2", b"reading 3"];
//! let tree = MerkleTree::from_leaves(leaves.iter().copied());
//! let proof = tree.inclusion_proof(1).unwrap();
//! assert!(verify_inclusion(&leaf_hash(b"reading 2"), 1, tree.len(), &proof, &tree.root()));
//! assert!(!verify_inclusion(&leaf_hash(b"tampered"), 1, tree.len(), &proof, &tree.root()));
//! ```

pub mod anchor;
pub mod batch;
pub mod chain;
pub mod consent;
pub mod events;
pub mod follow;
pub mod index;
pub mod leaf;
pub mod local;
mod merkle;
pub mod verify;

/// Lower-case hex, as every file and report of the ledger writes hashes
/// and keys.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Now, Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use anchor::{Anchor, AnchorError, AnchorLog, NodeKey};
pub use batch::{BatchHeader, ChainError, SealedBatch, Sealer, canonical_tree, check_chain};
pub use index::LeafIndex;
pub use local::{LocalLedger, anchor_log_path, leaf_index_path};
pub use merkle::{Hash, MerkleTree, ProvingTree, leaf_hash, node_hash, verify_inclusion};
pub use verify::{Mismatch, Verdict, check_batch, prove};
