//! Seal a batch of stored readings into a Merkle tree, then prove one of
//! them to someone who holds only the root.
//!
//! Run with `cargo run -p wardflow-ledger-bridge --example merkle_proof`.

use wardflow_ledger_bridge::{MerkleTree, hex, leaf_hash, verify_inclusion};

fn main() {
    let readings: Vec<String> = (0..5)
        .map(|i| format!("p-4711|hr|1764000000{i}|{}", 70 + i))
        .collect();
    let tree = MerkleTree::from_leaves(readings.iter().map(|r| r.as_bytes()));
    let root = tree.root();
    println!("root of {} leaves: {}", tree.len(), hex(&root));

    let index = 3;
    let proof = tree.inclusion_proof(index).expect("leaf exists");
    println!(
        "proof for leaf {index} ({}): {} hashes",
        readings[index],
        proof.len()
    );
    let ok = verify_inclusion(
        &leaf_hash(readings[index].as_bytes()),
        index,
        tree.len(),
        &proof,
        &root,
    );
    println!("verifies: {ok}");
    let forged = verify_inclusion(
        &leaf_hash(b"p-4711|hr|17640000003|99"),
        index,
        tree.len(),
        &proof,
        &root,
    );
    println!("a changed value verifies: {forged}");
}
