//! Retention: dropping a table's hour partitions once they are older than
//! the table's retention period, and a durable log of every drop.
//!
//! Each process drops its own files of an expired partition (the others
//! drop theirs), and the directory once it is empty. Every drop is appended
//! to `retention-p{process}.jsonl` in the data directory before the files
//! go: which table and hour, how many files, rows and bytes, and the range
//! of write-ahead-log epochs the files held, so `wardflow verify` can tell
//! an audit batch whose rows expired from one whose rows were tampered
//! with.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use wardflow_model::TimestampNs;

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, READINGS_DIR};

/// How long each table is kept; `None` keeps it forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub readings_ns: Option<i64>,
    pub dead_letters_ns: Option<i64>,
}

/// One partition's files of one process, dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub table: String,
    /// `date=…/hour=…`
    pub partition: String,
    pub hour_start_ns: TimestampNs,
    pub process: usize,
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
    /// The flush intervals the files held, by their names: rows with a
    /// `log_epoch` in `[min_epoch, max_epoch + interval)`.
    pub min_epoch: u64,
    pub max_epoch: u64,
    pub dropped_at_ns: TimestampNs,
    pub retention_ns: i64,
}

/// The retention log of a process.
pub fn log_path(root: &Path, process: usize) -> PathBuf {
    root.join(format!("retention-p{process}.jsonl"))
}

/// Every drop recorded under `root`, all processes.
pub fn read_log(root: &Path) -> Result<Vec<Dropped>, StorageError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StorageError::io(root)(e)),
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("retention-p") && name.ends_with(".jsonl")) {
            continue;
        }
        let path = e.path();
        let text = std::fs::read_to_string(&path).map_err(StorageError::io(&path))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // A torn last line after a crash: its drop is made again.
            if let Ok(d) = serde_json::from_str(line) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// Drops this process's files of every partition that ended at least its
/// table's retention before `now_ns`. Returns what was dropped.
pub fn drop_expired(
    root: &Path,
    process: usize,
    now_ns: TimestampNs,
    retention: &Retention,
) -> Result<Vec<Dropped>, StorageError> {
    let mut dropped = Vec::new();
    for (table, keep) in [
        (READINGS_DIR, retention.readings_ns),
        (DEAD_LETTERS_DIR, retention.dead_letters_ns),
    ] {
        let Some(keep) = keep else { continue };
        let dir = root.join(table);
        for (hour, part) in layout::partitions(&dir).map_err(StorageError::io(&dir))? {
            let (start, end) = layout::hour_bounds(hour);
            if end > now_ns.saturating_sub(keep) {
                continue;
            }
            let files: Vec<_> = layout::files_in(hour, &part)
                .map_err(StorageError::io(&part))?
                .into_iter()
                .filter(|f| f.name.process() == process)
                .collect();
            if files.is_empty() {
                remove_if_empty(&part);
                continue;
            }
            let mut d = Dropped {
                table: table.to_string(),
                partition: layout::partition_dir(hour),
                hour_start_ns: start,
                process,
                files: files.len(),
                rows: 0,
                bytes: 0,
                min_epoch: u64::MAX,
                max_epoch: 0,
                dropped_at_ns: now_ns,
                retention_ns: keep,
            };
            for f in &files {
                d.min_epoch = d.min_epoch.min(f.name.min_interval());
                d.max_epoch = d.max_epoch.max(f.name.max_interval());
                d.bytes += std::fs::metadata(&f.path).map_or(0, |m| m.len());
                d.rows += File::open(&f.path)
                    .ok()
                    .and_then(|file| ParquetRecordBatchReaderBuilder::try_new(file).ok())
                    .map_or(0, |b| b.metadata().file_metadata().num_rows() as u64);
            }
            // Logged durably before anything goes.
            let path = log_path(root, process);
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(StorageError::io(&path))?;
            let mut line =
                serde_json::to_vec(&d).map_err(|e| StorageError::Encode(e.to_string()))?;
            line.push(b'\n');
            log.write_all(&line).map_err(StorageError::io(&path))?;
            log.sync_data().map_err(StorageError::io(&path))?;
            for f in &files {
                match std::fs::remove_file(&f.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::io(&f.path)(e)),
                }
            }
            layout::sync_dir(&part).map_err(StorageError::io(&part))?;
            remove_if_empty(&part);
            tracing::info!(
                table,
                partition = %d.partition,
                files = d.files,
                rows = d.rows,
                "retention: dropped an expired partition"
            );
            dropped.push(d);
        }
    }
    Ok(dropped)
}

/// Removes an hour directory and its date directory once they are empty
/// (one still holding another process's files or other hours stays).
fn remove_if_empty(part: &Path) {
    if std::fs::remove_dir(part).is_ok()
        && let Some(date) = part.parent()
    {
        let _ = std::fs::remove_dir(date);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{ReadingQuery, query_readings};
    use crate::{Origin, ShardWriter, StoreConfig};
    use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading};

    const HOUR: i64 = 3_600_000_000_000;

    #[test]
    fn expired_partitions_go_and_the_drop_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_764_079_200_000_000_000; // an hour boundary
        let mut w: ShardWriter<u64> = ShardWriter::new(
            StoreConfig {
                root: dir.path().into(),
                process: 0,
                interval_ms: 1000,
            },
            0,
        );
        let (d, p) = (
            DeviceId::new("mon-1").unwrap(),
            PatientId::new("p-1").unwrap(),
        );
        for h in 0..3i64 {
            let t = t0 + h * HOUR;
            w.append(
                (t / 1_000_000) as u64,
                Origin {
                    device: &d,
                    patient: Some(&p),
                    received_ns: t,
                },
                &[Reading {
                    time_ns: t,
                    metric: Metric::Hr,
                    value: 70.0 + h as f64,
                    seq: None,
                    quality: Quality::default(),
                }],
                [],
                0,
            );
        }
        w.flush_before(None).unwrap();
        let retention = Retention {
            readings_ns: Some(HOUR),
            dead_letters_ns: None,
        };
        // Two hours after the third hour began: the first hour ended more
        // than an hour ago, the second exactly an hour ago.
        let now = t0 + 3 * HOUR;
        let dropped = drop_expired(dir.path(), 0, now, &retention).unwrap();
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert_eq!((dropped[0].rows, dropped[0].files), (1, 1));
        assert_eq!(dropped[0].min_epoch, (t0 / 1_000_000) as u64);
        let left = query_readings(dir.path(), &ReadingQuery::default()).unwrap();
        assert_eq!(left.iter().map(|r| r.value).collect::<Vec<_>>(), vec![72.0]);
        assert_eq!(read_log(dir.path()).unwrap(), dropped);
        // Nothing more to drop; the log is not written again.
        assert!(
            drop_expired(dir.path(), 0, now, &retention)
                .unwrap()
                .is_empty()
        );
        assert_eq!(read_log(dir.path()).unwrap().len(), 2);
    }
}
