//! The ledger's event log: leaves that do not come from the store.
//!
//! Alert transitions are written to the alert log by the engine's alert
//! thread, behind the dataflow, and accesses to a patient's data happen
//! outside it; neither carries a dataflow epoch that is sure to be still
//! unsealed. So the ledger gives each such leaf an epoch when it receives
//! it (the first one not yet sealed), and records it here, one JSON line
//! per leaf, fsynced before the batch holding it is anchored:
//!
//! - an alert transition as the place of its line in the process's alert
//!   log (`offset`, `len`): the leaf is that line, read back from the alert
//!   log, so altering the alert log is caught;
//! - an access as its fields, which this log alone holds.
//!
//! A verifier reads this log, recomputes each leaf and puts it in the
//! batch its epoch falls in, beside the rows of the store.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorError, io_err};
use crate::leaf::{AccessLeaf, AlertTransitionLeaf};
use crate::merkle::{Hash, leaf_hash};

/// Process `process`'s event log in the ledger directory `dir`.
pub fn event_log_path(dir: &Path, process: u32) -> PathBuf {
    dir.join(format!("events-p{process}.jsonl"))
}

/// One leaf of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventRecord {
    /// A line of the process's alert log (without its line break).
    Alert { epoch: u64, offset: u64, len: u32 },
    /// Someone read, exported or was sent a patient's data.
    Access {
        epoch: u64,
        at_ns: i64,
        patient: String,
        actor: String,
        action: String,
        purpose: String,
        detail: String,
    },
}

impl EventRecord {
    pub fn epoch(&self) -> u64 {
        match self {
            EventRecord::Alert { epoch, .. } | EventRecord::Access { epoch, .. } => *epoch,
        }
    }

    /// The record's leaf; an alert line is read from `alert_log`.
    pub fn leaf(&self, alert_log: &mut AlertLogReader) -> Hash {
        let mut buf = Vec::with_capacity(128);
        match self {
            EventRecord::Alert { offset, len, .. } => {
                let line = alert_log.line(*offset, *len);
                AlertTransitionLeaf { log_line: &line }.encode(&mut buf);
            }
            EventRecord::Access {
                at_ns,
                patient,
                actor,
                action,
                purpose,
                detail,
                ..
            } => AccessLeaf {
                at_ns: *at_ns,
                patient,
                actor,
                action,
                purpose,
                detail,
            }
            .encode(&mut buf),
        }
        leaf_hash(&buf)
    }
}

/// Reads lines of an alert log by place. A line that is not there (a
/// shortened or missing file) reads as what is there, so its leaf differs.
pub struct AlertLogReader {
    file: Option<File>,
}

impl AlertLogReader {
    pub fn open(path: &Path) -> Self {
        Self {
            file: File::open(path).ok(),
        }
    }

    pub fn line(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Some(f) = self.file.as_mut()
            && f.seek(SeekFrom::Start(offset)).is_ok()
        {
            let _ = f.take(len as u64).read_to_end(&mut buf);
        }
        buf
    }
}

/// The event log, open for appending.
pub struct EventLog {
    path: PathBuf,
    file: File,
    dirty: bool,
}

impl EventLog {
    /// Opens (creating) the log; a torn last line is cut.
    pub fn open(path: &Path) -> Result<EventLog, AnchorError> {
        let text = std::fs::read(path).unwrap_or_default();
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        if complete < text.len() {
            file.set_len(complete as u64).map_err(io_err(path))?;
        }
        Ok(EventLog {
            path: path.to_path_buf(),
            file,
            dirty: false,
        })
    }

    /// Appends records (not yet durable: see [`EventLog::sync`]).
    pub fn append(&mut self, records: &[EventRecord]) -> Result<(), AnchorError> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).expect("a record serializes");
            buf.push(b'\n');
        }
        self.file.write_all(&buf).map_err(io_err(&self.path))?;
        self.dirty = true;
        Ok(())
    }

    /// Makes what was appended durable (before a batch holding it is
    /// anchored).
    pub fn sync(&mut self) -> Result<(), AnchorError> {
        if self.dirty {
            self.file.sync_data().map_err(io_err(&self.path))?;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Every whole record of an event log, in order.
pub fn read_events(path: &Path) -> Result<Vec<EventRecord>, AnchorError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    text[..complete]
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AnchorError::Bad {
                path: path.to_path_buf(),
                line: i + 1,
                what: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_leaves_follow_the_alert_log() {
        let dir = tempfile::tempdir().unwrap();
        let alerts = dir.path().join("p0.jsonl");
        std::fs::write(&alerts, "{\"a\":1}\n{\"b\":2}\n").unwrap();
        let path = event_log_path(dir.path(), 0);
        let mut log = EventLog::open(&path).unwrap();
        let records = vec![
            EventRecord::Alert {
                epoch: 10,
                offset: 8,
                len: 7,
            },
            EventRecord::Access {
                epoch: 11,
                at_ns: 5,
                patient: "p-1".into(),
                actor: "nurse-1".into(),
                action: "query".into(),
                purpose: "treatment".into(),
                detail: "hr".into(),
            },
        ];
        log.append(&records).unwrap();
        log.sync().unwrap();
        drop(log);
        let read = read_events(&path).unwrap();
        assert_eq!(read, records);

        let mut reader = AlertLogReader::open(&alerts);
        let mut buf = Vec::new();
        AlertTransitionLeaf {
            log_line: b"{\"b\":2}",
        }
        .encode(&mut buf);
        assert_eq!(read[0].leaf(&mut reader), leaf_hash(&buf));
        // The alert log altered: the leaf changes.
        std::fs::write(&alerts, "{\"a\":1}\n{\"b\":3}\n").unwrap();
        let mut reader = AlertLogReader::open(&alerts);
        assert_ne!(read[0].leaf(&mut reader), leaf_hash(&buf));
    }
}
