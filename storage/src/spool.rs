//! The QuestDB sink's spool: a bounded queue of files on local disk that
//! holds the batches the receiver could not take, oldest first.
//!
//! Each file is one [`Batch`] as JSON, named
//! `{created_ms:013}-{seq:010}-{rows}.batch`, so that the names sort oldest
//! first and tell how long a batch has waited and how many rows it holds. A file is written under a temporary name, fsynced, renamed into
//! place and its directory fsynced, so a crash leaves either the whole
//! batch or nothing; a restart finds the spool as it was and drains it. A
//! file is removed only after the receiver accepted its batch.
//!
//! The spool never grows past its byte limit: a batch that does not fit is
//! refused ([`SpoolError::Full`]) and the caller keeps it (the engine holds
//! its interval in the write-ahead log and tries again later).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::layout;
use crate::questdb::{Batch, SinkStats};

/// Why a batch could not be spooled or read back.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool holds `used` bytes of its `limit`; the batch needs `needed` more.
    #[error(
        "the QuestDB spool is full ({used} of {limit} bytes used, {needed} more needed); the rows stay in the write-ahead log"
    )]
    Full { used: u64, limit: u64, needed: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a spooled batch ({what})")]
    Corrupt { path: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One spooled batch on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolFile {
    pub path: PathBuf,
    pub created_ms: u64,
    pub seq: u64,
    pub bytes: u64,
    pub rows: u64,
}

/// The spool directory and what it holds (kept in memory, rebuilt from the
/// directory on open).
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    files: std::collections::VecDeque<SpoolFile>,
    next_seq: u64,
    bytes: u64,
    rows: u64,
    stats: Arc<SinkStats>,
}

const EXT: &str = "batch";

fn parse_name(name: &str) -> Option<(u64, u64, u64)> {
    // {created_ms}-{seq}-{rows}.batch
    let stem = name.strip_suffix(".batch")?;
    let mut parts = stem.split('-');
    let created = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let rows = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((created, seq, rows))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, limited to `limit`
    /// bytes. Temporary files of an interrupted write are removed.
    pub fn open(dir: &Path, limit: u64, stats: Arc<SinkStats>) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let Some((created_ms, seq, rows)) = parse_name(name) else {
                continue;
            };
            let bytes = entry.metadata().map_err(io(&path))?.len();
            files.push(SpoolFile {
                path,
                created_ms,
                seq,
                bytes,
                rows,
            });
        }
        files.sort_by_key(|f| (f.seq, f.created_ms));
        let next_seq = files.last().map_or(0, |f| f.seq + 1);
        let spool = Spool {
            dir: dir.to_path_buf(),
            limit,
            bytes: files.iter().map(|f| f.bytes).sum(),
            rows: files.iter().map(|f| f.rows).sum(),
            files: files.into(),
            next_seq,
            stats,
        };
        spool.publish();
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The oldest spooled batch.
    pub fn oldest(&self) -> Option<&SpoolFile> {
        self.files.front()
    }

    /// Writes `batch` as the newest file, durably, or refuses it when it
    /// would take the spool past its limit.
    pub fn push(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(batch).map_err(|e| SpoolError::Corrupt {
            path: self.dir.clone(),
            what: e.to_string(),
        })?;
        let needed = json.len() as u64;
        if self.bytes + needed > self.limit {
            return Err(SpoolError::Full {
                used: self.bytes,
                limit: self.limit,
                needed,
            });
        }
        let (created_ms, seq, rows) = (now_ms(), self.next_seq, batch.rows() as u64);
        let path = self
            .dir
            .join(format!("{created_ms:013}-{seq:010}-{rows}.{EXT}"));
        layout::write_atomically(&path, |f| std::io::Write::write_all(f, &json))
            .map_err(io(&path))?;
        layout::sync_dir(&self.dir).map_err(io(&self.dir))?;
        self.next_seq += 1;
        self.bytes += needed;
        self.rows += rows;
        self.files.push_back(SpoolFile {
            path,
            created_ms,
            seq,
            bytes: needed,
            rows,
        });
        self.stats.rows_spooled.fetch_add(rows, Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    /// Reads the oldest batch back (it stays spooled until [`Spool::pop`]).
    pub fn peek(&self) -> Result<Option<Batch>, SpoolError> {
        let Some(f) = self.files.front() else {
            return Ok(None);
        };
        let bytes = std::fs::read(&f.path).map_err(io(&f.path))?;
        let batch = serde_json::from_slice(&bytes).map_err(|e| SpoolError::Corrupt {
            path: f.path.clone(),
            what: e.to_string(),
        })?;
        Ok(Some(batch))
    }

    /// Removes the oldest file: its batch reached the receiver.
    pub fn pop(&mut self) -> Result<(), SpoolError> {
        let Some(f) = self.files.front() else {
            return Ok(());
        };
        std::fs::remove_file(&f.path).map_err(io(&f.path))?;
        let f = self.files.pop_front().expect("present");
        self.bytes -= f.bytes;
        self.rows -= f.rows;
        self.publish();
        Ok(())
    }

    /// Moves the oldest file aside as `.corrupt` (it cannot be read back),
    /// so the files behind it still drain.
    pub fn quarantine(&mut self) -> Result<PathBuf, SpoolError> {
        let Some(f) = self.files.pop_front() else {
            return Ok(self.dir.clone());
        };
        let aside = f.path.with_extension("corrupt");
        std::fs::rename(&f.path, &aside).map_err(io(&f.path))?;
        self.bytes -= f.bytes;
        self.rows -= f.rows;
        self.publish();
        Ok(aside)
    }

    fn publish(&self) {
        let s = &self.stats;
        s.spool_files
            .store(self.files.len() as u64, Ordering::Relaxed);
        s.spool_bytes.store(self.bytes, Ordering::Relaxed);
        s.spool_rows.store(self.rows, Ordering::Relaxed);
        s.spool_oldest_ms.store(
            self.files.front().map_or(0, |f| f.created_ms),
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::questdb::ReadingRow;
    use wardflow_model::Metric;

    fn batch(n: usize) -> Batch {
        let mut b = Batch::default();
        for i in 0..n {
            b.push_reading(&ReadingRow {
                time_ns: 1_764_000_000_000_000_000 + i as i64,
                patient: Some("p-1"),
                device: "mon-1",
                metric: Metric::Hr,
                value: 60.0 + i as f64,
                seq: Some(i as u64),
                quality: 0,
                received_ns: 1_764_000_000_000_000_000,
            });
        }
        b
    }

    #[test]
    fn batches_come_back_oldest_first_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(SinkStats::default());
        let mut spool = Spool::open(dir.path(), 1 << 20, stats.clone()).unwrap();
        spool.push(&batch(3)).unwrap();
        spool.push(&batch(5)).unwrap();
        assert_eq!((spool.len(), spool.rows()), (2, 8));
        assert_eq!(stats.spool_rows.load(Ordering::Relaxed), 8);
        drop(spool);
        std::fs::write(dir.path().join("x.tmp"), b"torn").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20, stats.clone()).unwrap();
        assert!(!dir.path().join("x.tmp").exists());
        assert_eq!(spool.peek().unwrap().unwrap(), batch(3));
        spool.pop().unwrap();
        assert_eq!(spool.peek().unwrap().unwrap(), batch(5));
        spool.pop().unwrap();
        assert!(spool.is_empty());
        assert_eq!(stats.spool_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.spool_oldest_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_spool_refuses_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 2000, Arc::default()).unwrap();
        spool.push(&batch(2)).unwrap();
        let err = spool.push(&batch(100)).unwrap_err();
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        assert!(err.to_string().contains("write-ahead log"));
        assert_eq!(spool.len(), 1);
    }
}
