//! Manual observations (consciousness on the ACVPU scale, air or oxygen,
//! the SpO2 scale), which NEWS2 needs and monitors cannot measure. They are
//! appended to `observations.jsonl` in the data directory, by the
//! `wardflow observe` command or by the server for a clinician's MQTT
//! publish, and the server follows the file into the dataflow.

use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wardflow_model::PatientId;
use wardflow_rules::eval::ManualObservation;
use wardflow_rules::news2::{Acvpu, Oxygen, Spo2Scale};

use crate::jsonstore::{StoreError, io_err};

pub const OBSERVATIONS_FILE: &str = "observations.jsonl";

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservationRecord {
    pub patient: PatientId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consciousness: Option<Acvpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oxygen: Option<Oxygen>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spo2_scale: Option<Spo2Scale>,
    pub time_ns: i64,
    /// Who observed: a clinician id, or `cli`.
    pub by: String,
}

impl ObservationRecord {
    pub fn observation(&self) -> ManualObservation {
        ManualObservation {
            consciousness: self.consciousness,
            oxygen: self.oxygen,
            spo2_scale: self.spo2_scale,
            time_ns: self.time_ns,
        }
    }
}

/// The body of an observation publish or request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationBody {
    pub consciousness: Option<String>,
    pub oxygen: Option<String>,
    pub spo2_scale: Option<u8>,
}

impl ObservationBody {
    /// Checks the values; at least one must be given.
    pub fn into_record(
        self,
        patient: PatientId,
        by: &str,
        time_ns: i64,
    ) -> Result<ObservationRecord, String> {
        let consciousness =
            match &self.consciousness {
                Some(c) => Some(Acvpu::parse(c).ok_or_else(|| {
                    format!("consciousness must be one of A, C, V, P, U, not {c:?}")
                })?),
                None => None,
            };
        let oxygen = match &self.oxygen {
            Some(o) => Some(
                Oxygen::parse(o).ok_or_else(|| format!("oxygen must be air or o2, not {o:?}"))?,
            ),
            None => None,
        };
        let spo2_scale = match self.spo2_scale {
            Some(n) => Some(
                Spo2Scale::from_number(n)
                    .ok_or_else(|| format!("spo2_scale must be 1 or 2, not {n}"))?,
            ),
            None => None,
        };
        if consciousness.is_none() && oxygen.is_none() && spo2_scale.is_none() {
            return Err("give consciousness, oxygen or spo2_scale".into());
        }
        Ok(ObservationRecord {
            patient,
            consciousness,
            oxygen,
            spo2_scale,
            time_ns,
            by: by.to_string(),
        })
    }
}

/// Appends a record durably (one write of one line, then fsync).
pub fn append(dir: &Path, record: &ObservationRecord) -> Result<(), StoreError> {
    let path = dir.join(OBSERVATIONS_FILE);
    let mut line = serde_json::to_vec(record).map_err(|e| io_err(&path)(e.into()))?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(&line).map_err(io_err(&path))?;
    f.sync_data().map_err(io_err(&path))
}

/// Follows the file: each call returns the complete lines added since the
/// last one.
pub struct ObservationTail {
    path: PathBuf,
    offset: u64,
}

impl ObservationTail {
    pub fn new(dir: &Path) -> ObservationTail {
        ObservationTail {
            path: dir.join(OBSERVATIONS_FILE),
            offset: 0,
        }
    }

    pub fn poll(&mut self) -> Result<Vec<ObservationRecord>, StoreError> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let len = f.metadata().map_err(io_err(&self.path))?.len();
        if len < self.offset {
            // Replaced by a shorter file: read it again from the start.
            self.offset = 0;
        }
        f.seek(SeekFrom::Start(self.offset))
            .map_err(io_err(&self.path))?;
        let mut reader = BufReader::new(f.take(len - self.offset));
        let mut out = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io_err(&self.path))?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a line still being written
            }
            self.offset += n as u64;
            match serde_json::from_str::<ObservationRecord>(&line) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(
                    "{}: skipping a malformed observation at byte {}: {e}",
                    self.path.display(),
                    self.offset - n as u64
                ),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_follow() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = ObservationTail::new(dir.path());
        assert!(tail.poll().unwrap().is_empty());
        let body = ObservationBody {
            consciousness: Some("V".into()),
            oxygen: Some("o2".into()),
            spo2_scale: None,
        };
        let r = body
            .into_record(PatientId::new("p-1").unwrap(), "rn-1", 5)
            .unwrap();
        append(dir.path(), &r).unwrap();
        assert_eq!(tail.poll().unwrap(), vec![r.clone()]);
        assert!(tail.poll().unwrap().is_empty());
        append(dir.path(), &r).unwrap();
        assert_eq!(tail.poll().unwrap().len(), 1);
        let bad = ObservationBody {
            consciousness: Some("X".into()),
            oxygen: None,
            spo2_scale: None,
        };
        assert!(bad.into_record(r.patient.clone(), "x", 1).is_err());
    }
}
