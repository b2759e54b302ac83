//! The leaf index: for every sealed batch, the first eight bytes of each of
//! its leaf hashes, in the batch's canonical order.
//!
//! The anchored root proves *whether* a batch's recomputed leaves are the
//! ones sealed; the index tells *which* differ, so a verifier can name the
//! altered row and count the deleted ones. It is a locator, not evidence:
//! eight bytes make a false match among a batch's leaves a chance of about
//! one in 2^64 / leaves, and whoever alters the index only loses the
//! naming, never the root check. Inclusion proofs are rebuilt from the
//! leaves recomputed from storage, since the tree is a function of them.
//!
//! The file (`leaves-p{process}.idx`) is a sequence of records, each
//! `"WFX1" || batch u64 || count u64 || count × 8 bytes` (big-endian). It
//! is written after the batch's anchor and not fsynced: after a crash its
//! torn or missing tail only means those batches cannot name rows.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::anchor::{AnchorError, io_err};
use crate::merkle::Hash;

const MAGIC: &[u8; 4] = b"WFX1";

/// The eight leading bytes of a leaf hash, as kept in the index.
pub fn prefix(h: &Hash) -> u64 {
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// The index file, open for appending.
pub struct LeafIndex {
    path: PathBuf,
    file: File,
}

impl LeafIndex {
    /// Opens the index at `path`, keeping only whole records of batches
    /// before `next_batch` (the first batch not anchored).
    pub fn open(path: &Path, next_batch: u64) -> Result<LeafIndex, AnchorError> {
        let mut good = 0u64;
        if let Ok(f) = File::open(path) {
            let mut r = BufReader::new(f);
            while let Some((batch, count)) = read_header(&mut r).map_err(io_err(path))? {
                if batch >= next_batch || !skip(&mut r, count * 8).map_err(io_err(path))? {
                    break;
                }
                good += 20 + count * 8;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        file.set_len(good).map_err(io_err(path))?;
        let mut index = LeafIndex {
            path: path.to_path_buf(),
            file,
        };
        use std::io::Seek;
        index
            .file
            .seek(std::io::SeekFrom::Start(good))
            .map_err(io_err(path))?;
        Ok(index)
    }

    /// Appends batch `batch`'s leaves (in canonical order).
    pub fn append(&mut self, batch: u64, leaves: &[Hash]) -> Result<(), AnchorError> {
        let mut buf = Vec::with_capacity(20 + leaves.len() * 8);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&batch.to_be_bytes());
        buf.extend_from_slice(&(leaves.len() as u64).to_be_bytes());
        for h in leaves {
            buf.extend_from_slice(&h[..8]);
        }
        self.file.write_all(&buf).map_err(io_err(&self.path))
    }

    /// Reads the prefixes of the batches `wanted` accepts, by batch.
    pub fn read(
        path: &Path,
        mut wanted: impl FnMut(u64) -> bool,
    ) -> Result<BTreeMap<u64, Vec<u64>>, AnchorError> {
        let mut out = BTreeMap::new();
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut r = BufReader::new(f);
        while let Some((batch, count)) = read_header(&mut r).map_err(io_err(path))? {
            if !wanted(batch) {
                if !skip(&mut r, count * 8).map_err(io_err(path))? {
                    break;
                }
                continue;
            }
            let mut bytes = vec![0u8; (count * 8) as usize];
            if r.read_exact(&mut bytes).is_err() {
                break; // a torn tail
            }
            out.insert(
                batch,
                bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// The next record's batch and count, or `None` at the end or a torn or
/// foreign tail.
fn read_header(r: &mut impl Read) -> std::io::Result<Option<(u64, u64)>> {
    let mut head = [0u8; 20];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &head[..4] != MAGIC {
        return Ok(None);
    }
    let batch = u64::from_be_bytes(head[4..12].try_into().expect("8 bytes"));
    let count = u64::from_be_bytes(head[12..20].try_into().expect("8 bytes"));
    Ok(Some((batch, count)))
}

/// Skips `n` bytes; false if the file ends first.
fn skip(r: &mut impl Read, n: u64) -> std::io::Result<bool> {
    Ok(std::io::copy(&mut r.take(n), &mut std::io::sink())? == n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leaf_hash;

    #[test]
    fn keeps_whole_records_of_anchored_batches_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaves-p0.idx");
        let leaves: Vec<Hash> = (0..5u8).map(|i| leaf_hash(&[i])).collect();
        let mut idx = LeafIndex::open(&path, 0).unwrap();
        idx.append(0, &leaves[..2]).unwrap();
        idx.append(1, &leaves[2..]).unwrap();
        idx.append(2, &leaves[..1]).unwrap();
        drop(idx);
        // Batch 2 was never anchored (a crash between the two writes), and
        // a torn record follows it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"WFX1\0\0").unwrap();
        drop(f);
        let mut idx = LeafIndex::open(&path, 2).unwrap();
        idx.append(2, &leaves[4..]).unwrap();
        drop(idx);

        let all = LeafIndex::read(&path, |_| true).unwrap();
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(all[&1], leaves[2..].iter().map(prefix).collect::<Vec<_>>());
        assert_eq!(all[&2], vec![prefix(&leaves[4])]);
        let one = LeafIndex::read(&path, |b| b == 1).unwrap();
        assert_eq!(one.len(), 1);
    }
}
