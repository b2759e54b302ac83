//! Wardflow's time-series sinks: the embedded store (no server, just files
//! in the data directory that standard tools can read), and the QuestDB
//! sink ([`questdb`]) that sends the same rows, plus alert transitions, over
//! the InfluxDB line protocol with questdb-rs, spooling them to local disk
//! ([`spool`]) while the receiver is down. Both can run at once: the
//! embedded store for the hot window, QuestDB for history.
//!
//! This crate owns the on-disk layout ([`layout`]), the Parquet schemas of
//! the `readings` and `deadletters` tables ([`schema`]), the per-worker
//! writer that turns a flush interval into sorted Parquet files
//! ([`writer`]), the checkpoint that tells the write-ahead log what it may
//! forget and what to replay ([`checkpoint`]), compaction ([`compact`]),
//! queries ([`query`]), the patient's export as FHIR, CSV or Parquet
//! ([`export`]), retention ([`retention`]), encryption at rest with
//! per-patient keys and crypto-shredding ([`seal`]) and the audit-trail
//! leaves of stored rows ([`leaves`]; their encoding and the batches they
//! go into belong to `ledger-bridge`). It does not decide *when* to flush (the
//! engine does, from the dataflow's frontier), validate readings
//! (`ingest`), or evaluate alerts (`rules`: the engine turns its
//! transitions into [`questdb::AlertRow`]s).
//!
//! Writing one interval and reading it back:
//!
//! ```
//! use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading};
//! use wardflow_storage::{Origin, ShardWriter, StoreConfig, query};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let config = StoreConfig { root: dir.path().into(), process: 0, interval_ms: 1000 };
//! let mut writer: ShardWriter<u64> = ShardWriter::new(config, 0);
//! let (device, patient) = (DeviceId::new("mon-1").unwrap(), PatientId::new("p-1").unwrap());
//! let t = 1_764_000_000_000_000_000;
//! let reading = Reading { time_ns: t, metric: Metric::Hr, value: 72.0, seq: Some(1), quality: Quality::default() };
//! writer.append(1_764_000_000_000, Origin { device: &device, patient: Some(&patient), received_ns: t }, &[reading], [], 1);
//! writer.flush_before(None).unwrap();
//!
//! let q = query::ReadingQuery { patient: Some("p-1".into()), ..Default::default() };
//! let rows = query::query_readings(dir.path(), &q).unwrap();
//! assert_eq!(rows.len(), 1);
//! assert_eq!((rows[0].metric.as_str(), rows[0].value, rows[0].unit.as_str()), ("hr", 72.0, "/min"));
//! ```

use std::path::{Path, PathBuf};

pub mod checkpoint;
pub mod compact;
pub mod export;
pub mod layout;
pub mod leaves;
pub mod query;
pub mod questdb;
pub mod retention;
pub mod schema;
pub mod seal;
pub mod spool;
pub mod writer;

pub use writer::{FlushStats, Origin, ShardWriter, StoreConfig};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unreadable ({what})")]
    Corrupt { path: PathBuf, what: String },
    #[error("encoding: {0}")]
    Encode(String),
    #[error(transparent)]
    Keys(#[from] seal::KeyError),
    #[error("{0}")]
    Withheld(String),
}

impl StorageError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
