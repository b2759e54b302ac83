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
        /// The access request it came from (not part of the leaf).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        request: String,
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

    /// A reader with no alert log (for records that need none).
    pub fn none() -> Self {
        Self { file: None }
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

/// The file where tools outside the engine (the command line) request
/// that an access be recorded: `ledger/access-requests.jsonl`. The engine
/// (process 0) records each request once, by its id.
pub fn access_requests_path(dir: &Path) -> PathBuf {
    dir.join("access-requests.jsonl")
}

/// An access to a patient's data, as a tool reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// Unique per request (random), so it is recorded once.
    pub id: String,
    pub at_ns: i64,
    pub patient: String,
    pub actor: String,
    pub action: String,
    pub purpose: String,
    pub detail: String,
}

impl AccessRequest {
    /// A request with a fresh random id.
    pub fn new(
        at_ns: i64,
        patient: &str,
        actor: &str,
        action: &str,
        purpose: &str,
        detail: &str,
    ) -> Self {
        let mut id = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        AccessRequest {
            id: crate::chain::hex(&id),
            at_ns,
            patient: patient.into(),
            actor: actor.into(),
            action: action.into(),
            purpose: purpose.into(),
            detail: detail.into(),
        }
    }

    /// Appends the request durably to the requests file in `dir`.
    pub fn submit(&self, dir: &Path) -> Result<(), AnchorError> {
        crate::anchor::append_json_lines(&access_requests_path(dir), std::slice::from_ref(self))
    }

    /// The event record of this request at `epoch`.
    pub fn record(&self, epoch: u64) -> EventRecord {
        EventRecord::Access {
            epoch,
            request: self.id.clone(),
            at_ns: self.at_ns,
            patient: self.patient.clone(),
            actor: self.actor.clone(),
            action: self.action.clone(),
            purpose: self.purpose.clone(),
            detail: self.detail.clone(),
        }
    }
}

/// Follows the requests file: each call returns the requests appended
/// since the last.
pub struct RequestTail(crate::anchor::JsonLinesTail);

impl RequestTail {
    pub fn new(dir: &Path) -> Self {
        Self(crate::anchor::JsonLinesTail::new(access_requests_path(dir)))
    }

    /// New requests; a line that does not parse is skipped with a warning.
    pub fn poll(&mut self) -> Vec<AccessRequest> {
        self.0.poll()
    }
}

/// Every whole record of an event log, in order.
pub fn read_events(path: &Path) -> Result<Vec<EventRecord>, AnchorError> {
    crate::anchor::read_json_lines(path)
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
                request: "r1".into(),
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

    #[test]
    fn access_requests_are_read_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = RequestTail::new(dir.path());
        assert!(tail.poll().is_empty());
        let a = AccessRequest::new(1, "p-1", "cli:ann", "query", "treatment", "hr");
        let b = AccessRequest::new(2, "p-2", "cli:bob", "export", "research:s1", "");
        assert_ne!(a.id, b.id);
        a.submit(dir.path()).unwrap();
        assert_eq!(tail.poll(), vec![a.clone()]);
        b.submit(dir.path()).unwrap();
        assert_eq!(tail.poll(), vec![b]);
        assert!(tail.poll().is_empty());
        // The leaf does not depend on the request id.
        let mut r = AlertLogReader::open(&dir.path().join("none"));
        let mut other = a.clone();
        other.id = "x".into();
        assert_eq!(a.record(5).leaf(&mut r), other.record(5).leaf(&mut r));
    }
}
