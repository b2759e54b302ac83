//! One process's ledger in local mode: leaves come in tagged with their
//! dataflow epoch, and everything below a watermark (the stored frontier)
//! is sealed into batches of `anchor_interval_ms` and anchored in the
//! process's signed anchor log.
//!
//! Restart-safe by construction: it resumes after the last anchored batch,
//! and leaves of epochs that batch already covers (the write-ahead log
//! replays from the storage checkpoint, which may lie before it) are
//! dropped, so no leaf is sealed twice. Epochs without leaves are covered by
//! the next batch's range, so ranges follow on without gaps and an idle
//! process writes no batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::anchor::{Anchor, AnchorError, AnchorLog, NodeKey};
use crate::batch::Sealer;
use crate::index::LeafIndex;
use crate::merkle::Hash;

/// Process `process`'s anchor log in the ledger directory `dir`.
pub fn anchor_log_path(dir: &Path, process: u32) -> PathBuf {
    dir.join(format!("anchors-p{process}.jsonl"))
}

/// Process `process`'s leaf index in the ledger directory `dir`.
pub fn leaf_index_path(dir: &Path, process: u32) -> PathBuf {
    dir.join(format!("leaves-p{process}.idx"))
}

pub struct LocalLedger {
    key: NodeKey,
    log: AnchorLog,
    index: LeafIndex,
    sealer: Sealer,
    interval_ms: u64,
    /// Where the last anchored batch ended: leaves before it are sealed.
    sealed_to: Option<u64>,
    /// Leaves waiting for the watermark, by anchor interval start.
    pending: BTreeMap<u64, Vec<Hash>>,
    /// The epoch from which the ledger covers the store (`start-p{process}`).
    start_path: PathBuf,
    start: Option<u64>,
}

impl LocalLedger {
    /// Opens process `process`'s ledger in the directory `dir`: its anchor
    /// log (checked in full) and leaf index, signed with the key at
    /// `key_path` (created if missing).
    pub fn open(
        process: u32,
        dir: &Path,
        key_path: &Path,
        anchor_interval_ms: u64,
    ) -> Result<LocalLedger, AnchorError> {
        assert!(anchor_interval_ms > 0, "an anchor interval of zero");
        let key = NodeKey::load_or_create(key_path)?;
        let log_path = anchor_log_path(dir, process);
        let anchors = AnchorLog::read(&log_path, Some(&key.public_key()))?;
        let last = anchors.last().map(Anchor::header);
        let next_batch = last.as_ref().map_or(0, |h| h.number + 1);
        let start_path = dir.join(format!("start-p{process}"));
        let start = match std::fs::read_to_string(&start_path) {
            Ok(t) => Some(t.trim().parse().map_err(|_| AnchorError::Bad {
                path: start_path.clone(),
                line: 1,
                what: format!("not an epoch: {t:?}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(AnchorError::Io {
                    path: start_path,
                    source: e,
                });
            }
        };
        Ok(LocalLedger {
            start_path,
            start,
            sealer: Sealer::new(process, last.as_ref()),
            sealed_to: last.as_ref().map(|h| h.to_ms),
            log: AnchorLog::open(&log_path)?,
            index: LeafIndex::open(&leaf_index_path(dir, process), next_batch)?,
            key,
            interval_ms: anchor_interval_ms,
            pending: BTreeMap::new(),
        })
    }

    /// Where the store's unsealed rows begin: the end of the last batch,
    /// or, before the first, the epoch the ledger began at. On its very
    /// first start the ledger begins at `checkpoint` (the point the
    /// write-ahead log replays from, so every later row reaches it) and
    /// records that durably.
    pub fn resume_point(&mut self, checkpoint: u64) -> Result<u64, AnchorError> {
        if let Some(to) = self.sealed_to {
            return Ok(to);
        }
        if let Some(s) = self.start {
            return Ok(s);
        }
        let io = |source| AnchorError::Io {
            path: self.start_path.clone(),
            source,
        };
        let tmp = self.start_path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            writeln!(f, "{checkpoint}").map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.start_path).map_err(io)?;
        if let Some(dir) = self.start_path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        self.start = Some(checkpoint);
        Ok(checkpoint)
    }

    /// Adds leaves of dataflow epoch `epoch_ms`. Leaves of epochs already
    /// sealed are dropped (a replay after a restart); returns how many.
    pub fn add(&mut self, epoch_ms: u64, leaves: impl IntoIterator<Item = Hash>) -> usize {
        self.add_tagged(leaves.into_iter().map(|h| (epoch_ms, h)))
    }

    /// Adds leaves tagged with their epochs, as a flush produces them.
    /// Returns how many were dropped as already sealed.
    pub fn add_tagged(&mut self, leaves: impl IntoIterator<Item = (u64, Hash)>) -> usize {
        let mut dropped = 0;
        let (sealed_to, interval) = (self.sealed_to, self.interval_ms);
        // Rows come in runs of one interval: one map lookup per run, and
        // each leaf is pushed where it stays until sealed.
        let mut run: Option<(u64, &mut Vec<Hash>)> = None;
        for (epoch, leaf) in leaves {
            if sealed_to.is_some_and(|to| epoch < to) {
                dropped += 1;
                continue;
            }
            let start = epoch - epoch % interval;
            if !matches!(&run, Some((s, _)) if *s == start) {
                run = Some((start, self.pending.entry(start).or_default()));
            }
            if let Some((_, v)) = run.as_mut() {
                v.push(leaf);
            }
        }
        dropped
    }

    /// Seals and anchors every whole anchor interval below `watermark_ms`
    /// that holds leaves (the epochs before it are final: stored and not to
    /// be replayed). Returns the anchors written. On an error, what was not
    /// anchored stays pending for the next call.
    pub fn seal_until(&mut self, watermark_ms: u64) -> Result<Vec<Anchor>, AnchorError> {
        let mut out = Vec::new();
        while let Some((&start, _)) = self.pending.first_key_value() {
            let end = start.saturating_add(self.interval_ms);
            if end > watermark_ms {
                break;
            }
            let leaves = self.pending.remove(&start).expect("the first key");
            let from = self.sealed_to.unwrap_or(start);
            let before = self.sealer.clone();
            let batch = self.sealer.seal(from, end, leaves);
            match self.log.append(&self.key, &batch.header) {
                Ok(anchor) => out.push(anchor),
                Err(e) => {
                    self.sealer = before;
                    self.pending.insert(start, batch.tree.into_leaf_hashes());
                    return Err(e);
                }
            }
            self.sealed_to = Some(end);
            if let Err(e) = self
                .index
                .append(batch.header.number, batch.tree.leaf_hashes())
            {
                // The batch is anchored; only naming its rows is lost.
                tracing::warn!("leaf index: {e}");
            }
        }
        Ok(out)
    }

    /// Where the last anchored batch ended: every leaf of an earlier epoch
    /// is sealed. `None` before the first batch.
    pub fn sealed_to(&self) -> Option<u64> {
        self.sealed_to
    }

    /// The first epoch a new leaf may take: nothing before it is open
    /// (the end of the last batch, or where the ledger began).
    pub fn open_from(&self) -> u64 {
        self.sealed_to.or(self.start).unwrap_or(0)
    }

    /// Leaves waiting for the watermark.
    pub fn pending_leaves(&self) -> usize {
        self.pending.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::canonical_tree;
    use crate::leaf_hash;

    fn leaves(epoch: u64, n: u32) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("{epoch}/{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn seals_whole_intervals_below_the_watermark_and_resumes_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.pk8");
        let log = anchor_log_path(dir.path(), 0);
        let mut ledger = LocalLedger::open(0, dir.path(), &key, 1000).unwrap();
        ledger.add(10_100, leaves(10_100, 3));
        ledger.add(10_900, leaves(10_900, 2));
        ledger.add(13_500, leaves(13_500, 4)); // 11 000–13 000 hold nothing
        assert!(
            ledger.seal_until(10_999).unwrap().is_empty(),
            "the interval is not whole yet"
        );
        let a = ledger.seal_until(12_000).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].batch, a[0].from_ms, a[0].to_ms, a[0].leaves),
            (0, 10_000, 11_000, 5)
        );
        let mut both = leaves(10_100, 3);
        both.extend(leaves(10_900, 2));
        assert_eq!(a[0].root, canonical_tree(both).root());
        assert_eq!(ledger.pending_leaves(), 4);
        drop(ledger);

        // A restart: the log replays from a checkpoint before 11 000, so
        // the sealed leaves come again and are dropped; the rest is sealed
        // again from the replay, the range covering the empty seconds.
        let mut ledger = LocalLedger::open(0, dir.path(), &key, 1000).unwrap();
        assert_eq!(ledger.sealed_to(), Some(11_000));
        assert_eq!(ledger.add(10_100, leaves(10_100, 3)), 3, "already sealed");
        let replay = leaves(10_900, 2).into_iter().map(|h| (10_900, h));
        let replay = replay.chain(leaves(13_500, 4).into_iter().map(|h| (13_500, h)));
        assert_eq!(ledger.add_tagged(replay), 2, "already sealed");
        let b = ledger.seal_until(20_000).unwrap();
        assert_eq!(
            (b[0].batch, b[0].from_ms, b[0].to_ms, b[0].leaves),
            (1, 11_000, 14_000, 4)
        );
        let all = AnchorLog::read(&log, None).unwrap();
        assert_eq!(all.len(), 2, "one chain across the restart");
        let index = LeafIndex::read(&leaf_index_path(dir.path(), 0), |_| true).unwrap();
        let mut want: Vec<u64> = leaves(13_500, 4).iter().map(crate::index::prefix).collect();
        want.sort();
        assert_eq!(
            index[&1], want,
            "the index holds each batch's leaves in order"
        );
    }

    #[test]
    fn a_log_signed_by_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = LocalLedger::open(0, dir.path(), &dir.path().join("a.pk8"), 1000).unwrap();
        ledger.add(0, leaves(0, 1));
        ledger.seal_until(1000).unwrap();
        drop(ledger);
        let err = LocalLedger::open(0, dir.path(), &dir.path().join("b.pk8"), 1000)
            .err()
            .expect("another key");
        assert!(err.to_string().contains("signed by another key"), "{err}");
    }
}
