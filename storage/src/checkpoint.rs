//! The storage checkpoint and recovery.
//!
//! The checkpoint is an epoch `C` with a promise: every publish logged with
//! an epoch below `C` is in the store, durably, in every process. The engine
//! advances it from the dataflow's frontier after the storage stage (each
//! worker flushes only whole intervals, so that frontier moves in interval
//! steps) and writes it to `checkpoint-p{process}.json`.
//!
//! On start, a process removes what it wrote at or after `C` (interval files
//! of a half-finished flush, temporary files, files a finished compaction
//! made redundant) and the write-ahead log replays from `C`, so every
//! publish ends up stored exactly once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wardflow_model::DeviceId;

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, FileName, READINGS_DIR, STATE_DIR};
use crate::writer::StateFile;

fn checkpoint_path(root: &Path, process: usize) -> PathBuf {
    root.join(format!("checkpoint-p{process}.json"))
}

#[derive(Serialize, Deserialize)]
struct CheckpointFile {
    epoch: u64,
}

/// The process's checkpoint epoch; 0 when there is none yet.
pub fn read_checkpoint(root: &Path, process: usize) -> Result<u64, StorageError> {
    let path = checkpoint_path(root, process);
    if !path.exists() {
        return Ok(0);
    }
    read_json::<CheckpointFile>(&path).map(|c| c.epoch)
}

/// Durably records the checkpoint.
pub fn write_checkpoint(root: &Path, process: usize, epoch: u64) -> Result<(), StorageError> {
    let path = checkpoint_path(root, process);
    let json = serde_json::to_vec(&CheckpointFile { epoch })
        .map_err(|e| StorageError::Encode(e.to_string()))?;
    layout::write_atomically(&path, |f| std::io::Write::write_all(f, &json))
        .map_err(StorageError::io(&path))?;
    layout::sync_dir(root).map_err(StorageError::io(root))
}

/// What [`recover`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Interval files at or after the checkpoint (they will be rewritten).
    pub uncommitted: usize,
    /// Files made redundant by a compaction.
    pub covered: usize,
    /// Leftover temporary files.
    pub temporary: usize,
}

/// Removes this process's files that the log replay from `checkpoint` will
/// write again, and leftovers of interrupted writes and compactions.
pub fn recover(root: &Path, process: usize, checkpoint: u64) -> Result<Recovery, StorageError> {
    let mut report = Recovery::default();
    for table in [READINGS_DIR, DEAD_LETTERS_DIR] {
        let table = root.join(table);
        for (hour, dir) in layout::partitions(&table).map_err(StorageError::io(&table))? {
            remove_temporary(&dir, &mut report)?;
            let files = layout::files_in(hour, &dir).map_err(StorageError::io(&dir))?;
            let compacted: Vec<FileName> = files
                .iter()
                .map(|f| f.name)
                .filter(|n| matches!(n, FileName::Compacted { .. }))
                .collect();
            for f in &files {
                if f.name.process() != process {
                    continue;
                }
                if f.name.max_interval() >= checkpoint
                    && matches!(f.name, FileName::Interval { .. })
                {
                    remove(&f.path)?;
                    report.uncommitted += 1;
                } else if compacted.iter().any(|c| f.name.covered_by(c)) {
                    remove(&f.path)?;
                    report.covered += 1;
                }
            }
        }
    }
    let state = root.join(STATE_DIR);
    if state.exists() {
        remove_temporary(&state, &mut report)?;
        for entry in std::fs::read_dir(&state).map_err(StorageError::io(&state))? {
            let entry = entry.map_err(StorageError::io(&state))?;
            if let Some(FileName::Interval {
                start, process: p, ..
            }) = entry.file_name().to_str().and_then(FileName::parse)
                && p == process
                && start >= checkpoint
            {
                remove(&entry.path())?;
                report.uncommitted += 1;
            }
        }
    }
    Ok(report)
}

fn remove(path: &Path) -> Result<(), StorageError> {
    std::fs::remove_file(path).map_err(StorageError::io(path))
}

fn remove_temporary(dir: &Path, report: &mut Recovery) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let entry = entry.map_err(StorageError::io(dir))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".tmp"))
        {
            remove(&entry.path())?;
            report.temporary += 1;
        }
    }
    Ok(())
}

fn base_path(root: &Path, process: usize) -> PathBuf {
    root.join(STATE_DIR).join(format!("base-p{process}.json"))
}

/// Consolidated device states: device -> (interval, state).
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "S: Serialize", deserialize = "S: DeserializeOwned"))]
struct BaseFile<S> {
    below: u64,
    devices: Vec<(DeviceId, u64, S)>,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StorageError> {
    let bytes = std::fs::read(path).map_err(StorageError::io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// The newest state of each device, by the interval it was written with.
struct Latest<S>(HashMap<DeviceId, (u64, S)>);

impl<S> Latest<S> {
    fn offer(&mut self, device: DeviceId, interval: u64, state: S) {
        if self.0.get(&device).is_none_or(|(i, _)| *i < interval) {
            self.0.insert(device, (interval, state));
        }
    }

    fn offer_base(&mut self, base: BaseFile<S>) {
        for (d, i, s) in base.devices {
            self.offer(d, i, s);
        }
    }

    fn offer_interval(&mut self, file: StateFile<S>) {
        for (d, s) in file.devices {
            self.offer(d, file.interval, s);
        }
    }
}

/// The state directory's files: (name as parsed, whether a base file, path).
fn state_files(root: &Path) -> Result<Vec<(Option<FileName>, bool, PathBuf)>, StorageError> {
    let dir = root.join(STATE_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(&dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StorageError::io(&dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !name.ends_with(".json") {
            continue;
        }
        out.push((
            FileName::parse(&name),
            name.starts_with("base-p"),
            entry.path(),
        ));
    }
    Ok(out)
}

/// Device states as of `checkpoint`, from every process's state files: for
/// each device, the state written with the latest interval before the
/// checkpoint.
pub fn load_states<S: DeserializeOwned>(
    root: &Path,
    checkpoint: u64,
) -> Result<HashMap<DeviceId, S>, StorageError> {
    let mut latest = Latest(HashMap::new());
    for (name, base, path) in state_files(root)? {
        match name {
            _ if base => latest.offer_base(read_json::<BaseFile<S>>(&path)?),
            Some(FileName::Interval { start, .. }) if start < checkpoint => {
                latest.offer_interval(read_json::<StateFile<S>>(&path)?)
            }
            _ => {}
        }
    }
    Ok(latest.0.into_iter().map(|(d, (_, s))| (d, s)).collect())
}

/// Folds this process's state files below `checkpoint` into its base file
/// and deletes them. Returns how many files it folded.
pub fn consolidate_states<S: Serialize + DeserializeOwned>(
    root: &Path,
    process: usize,
    checkpoint: u64,
) -> Result<usize, StorageError> {
    let base_file = base_path(root, process);
    let mut latest = Latest(HashMap::new());
    if base_file.exists() {
        latest.offer_base(read_json::<BaseFile<S>>(&base_file)?);
    }
    let mut folded = Vec::new();
    for (name, _, path) in state_files(root)? {
        if let Some(FileName::Interval {
            start, process: p, ..
        }) = name
            && p == process
            && start < checkpoint
        {
            latest.offer_interval(read_json::<StateFile<S>>(&path)?);
            folded.push(path);
        }
    }
    if folded.is_empty() {
        return Ok(0);
    }
    let base = BaseFile {
        below: checkpoint,
        devices: latest.0.into_iter().map(|(d, (i, s))| (d, i, s)).collect(),
    };
    let json = serde_json::to_vec(&base).map_err(|e| StorageError::Encode(e.to_string()))?;
    layout::write_atomically(&base_file, |f| std::io::Write::write_all(f, &json))
        .map_err(StorageError::io(&base_file))?;
    let dir = root.join(STATE_DIR);
    layout::sync_dir(&dir).map_err(StorageError::io(&dir))?;
    // The base file now holds everything they held; a crash before the
    // deletes below only leaves files that load_states reads redundantly.
    for path in &folded {
        remove(path)?;
    }
    Ok(folded.len())
}
