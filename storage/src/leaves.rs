//! The audit-trail leaves of stored rows (docs/ledger.md): one leaf per
//! reading and per dead letter, computed from the Arrow columns as written,
//! so the writer (at flush) and a verifier (reading the Parquet files back)
//! compute them the same way. Each leaf comes with its row's `log_epoch`,
//! which assigns it to a ledger batch.

use arrow::array::{
    Array, BinaryArray, FixedSizeBinaryArray, Float64Array, StringArray, TimestampNanosecondArray,
    UInt8Array, UInt64Array,
};
use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use wardflow_ledger_bridge::Hash;
use wardflow_ledger_bridge::leaf::{
    DeadLetterLeaf, ReadingLeaf, SealedDeadLetterLeaf, SealedReadingLeaf,
};

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, READINGS_DIR};
use crate::schema::{dead_letters as dl, readings as rd};

/// The two tables whose rows are leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Readings,
    DeadLetters,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Readings, Table::DeadLetters];

    pub fn dir(self) -> &'static str {
        match self {
            Table::Readings => READINGS_DIR,
            Table::DeadLetters => DEAD_LETTERS_DIR,
        }
    }

    /// Appends `(log_epoch, leaf hash)` for every row of one of this
    /// table's batches.
    pub fn leaves(
        self,
        batch: &RecordBatch,
        out: &mut Vec<(u64, Hash)>,
    ) -> Result<(), StorageError> {
        match self {
            Table::Readings => reading_leaves(batch, out),
            Table::DeadLetters => dead_letter_leaves(batch, out),
        }
    }
}

/// The live data files of `table` written by `process` that may hold rows
/// with a `log_epoch` in `epochs` (judged from their names: a file holds the
/// flush intervals its name gives, each `interval_ms` long).
pub fn files_for_epochs(
    root: &Path,
    table: Table,
    process: usize,
    epochs: &Range<u64>,
    interval_ms: u64,
) -> Result<Vec<PathBuf>, StorageError> {
    let dir = root.join(table.dir());
    let mut out = Vec::new();
    for (hour, part) in layout::partitions(&dir).map_err(StorageError::io(&dir))? {
        for f in layout::live_files(hour, &part).map_err(StorageError::io(&part))? {
            if f.name.process() == process
                && f.name.min_interval() < epochs.end
                && f.name.max_interval() + interval_ms > epochs.start
            {
                out.push(f.path);
            }
        }
    }
    Ok(out)
}

/// Calls `f` with every record batch of a Parquet file.
pub fn for_each_batch(
    path: &Path,
    mut f: impl FnMut(&RecordBatch) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let corrupt = |what: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let file = std::fs::File::open(path).map_err(StorageError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| corrupt(e.to_string()))?;
    for batch in reader {
        f(&batch.map_err(|e| corrupt(e.to_string()))?)?;
    }
    Ok(())
}

/// One stored row, as a verifier meets it.
pub struct StoredRow<'a> {
    pub table: Table,
    pub path: &'a Path,
    pub batch: &'a RecordBatch,
    /// The row's index in `batch`.
    pub row: usize,
    pub epoch: u64,
    pub leaf: Hash,
}

impl StoredRow<'_> {
    /// The row's columns as `name=value` pairs, for a report.
    pub fn describe(&self) -> String {
        use arrow::util::display::{ArrayFormatter, FormatOptions};
        let options = FormatOptions::default().with_null("null");
        let schema = self.batch.schema();
        let mut out = Vec::with_capacity(schema.fields().len());
        for (field, column) in schema.fields().iter().zip(self.batch.columns()) {
            let value = ArrayFormatter::try_new(column.as_ref(), &options)
                .map(|f| f.value(self.row).to_string())
                .unwrap_or_else(|_| "?".into());
            out.push(format!("{}={value}", field.name()));
        }
        out.join(" ")
    }

    /// A column's value as a string, if the column is a string column.
    pub fn string(&self, name: &str) -> Option<&str> {
        let i = self.batch.schema().index_of(name).ok()?;
        let a = self
            .batch
            .column(i)
            .as_any()
            .downcast_ref::<StringArray>()?;
        opt_str(a, self.row)
    }

    /// A timestamp column's value, ns.
    pub fn time_ns(&self, name: &str) -> Option<i64> {
        let i = self.batch.schema().index_of(name).ok()?;
        let a = self
            .batch
            .column(i)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()?;
        a.is_valid(self.row).then(|| a.value(self.row))
    }
}

/// Calls `f` with every row `process` stored in `tables` with a
/// `log_epoch` in `epochs`, with its leaf.
pub fn scan_rows(
    root: &Path,
    process: usize,
    tables: &[Table],
    epochs: Range<u64>,
    interval_ms: u64,
    mut f: impl FnMut(&StoredRow<'_>),
) -> Result<(), StorageError> {
    let mut leaves = Vec::new();
    for &table in tables {
        for path in files_for_epochs(root, table, process, &epochs, interval_ms)? {
            for_each_batch(&path, |batch| {
                leaves.clear();
                table.leaves(batch, &mut leaves)?;
                for (row, &(epoch, leaf)) in leaves.iter().enumerate() {
                    if epochs.contains(&epoch) {
                        f(&StoredRow {
                            table,
                            path: &path,
                            batch,
                            row,
                            epoch,
                            leaf,
                        });
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Appends the leaves of every row `process` stored with a `log_epoch` in
/// `epochs`, read back from its files: what a restart seals when its ledger
/// lags the store, and what a verifier recomputes.
pub fn stored_leaves(
    root: &Path,
    process: usize,
    epochs: Range<u64>,
    interval_ms: u64,
    out: &mut Vec<(u64, Hash)>,
) -> Result<(), StorageError> {
    scan_rows(root, process, &Table::ALL, epochs, interval_ms, |r| {
        out.push((r.epoch, r.leaf))
    })
}

fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

fn opt_u64(a: &UInt64Array, i: usize) -> Option<u64> {
    a.is_valid(i).then(|| a.value(i))
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    index: usize,
    what: &str,
) -> Result<&'a T, StorageError> {
    batch
        .columns()
        .get(index)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| StorageError::Encode(format!("column {index} ({what}) has the wrong type")))
}

/// Appends `(log_epoch, leaf hash)` for every row of a `readings` batch.
pub fn reading_leaves(batch: &RecordBatch, out: &mut Vec<(u64, Hash)>) -> Result<(), StorageError> {
    if crate::schema::is_sealed(&batch.schema()) {
        return sealed_reading_leaves(batch, out);
    }
    let time: &TimestampNanosecondArray = column(batch, rd::TIME, "time")?;
    let patient: &StringArray = column(batch, rd::PATIENT, "patient_id")?;
    let device: &StringArray = column(batch, rd::DEVICE, "device_id")?;
    let metric: &StringArray = column(batch, rd::METRIC, "metric")?;
    let value: &Float64Array = column(batch, rd::VALUE, "value")?;
    let unit: &StringArray = column(batch, rd::UNIT, "unit")?;
    let seq: &UInt64Array = column(batch, rd::SEQ, "seq")?;
    let quality: &UInt8Array = column(batch, rd::QUALITY, "quality")?;
    let received: &TimestampNanosecondArray = column(batch, rd::RECEIVED, "received_at")?;
    let epoch: &UInt64Array = column(batch, rd::LOG_EPOCH, "log_epoch")?;
    let mut buf = Vec::with_capacity(96);
    out.reserve(batch.num_rows());
    for i in 0..batch.num_rows() {
        ReadingLeaf {
            time_ns: time.value(i),
            patient: opt_str(patient, i),
            device: device.value(i),
            metric: metric.value(i),
            value: value.value(i),
            unit: unit.value(i),
            seq: opt_u64(seq, i),
            quality: quality.value(i),
            received_ns: received.value(i),
        }
        .encode(&mut buf);
        out.push((epoch.value(i), wardflow_ledger_bridge::leaf_hash(&buf)));
    }
    Ok(())
}

fn sealed_reading_leaves(
    batch: &RecordBatch,
    out: &mut Vec<(u64, Hash)>,
) -> Result<(), StorageError> {
    let time: &TimestampNanosecondArray = column(batch, rd::TIME, "time")?;
    let patient: &StringArray = column(batch, rd::PATIENT, "patient_id")?;
    let device: &StringArray = column(batch, rd::DEVICE, "device_id")?;
    let metric: &StringArray = column(batch, rd::METRIC, "metric")?;
    let value: &FixedSizeBinaryArray = column(batch, rd::VALUE, "value_sealed")?;
    let unit: &StringArray = column(batch, rd::UNIT, "unit")?;
    let seq: &UInt64Array = column(batch, rd::SEQ, "seq")?;
    let quality: &UInt8Array = column(batch, rd::QUALITY, "quality")?;
    let received: &TimestampNanosecondArray = column(batch, rd::RECEIVED, "received_at")?;
    let epoch: &UInt64Array = column(batch, rd::LOG_EPOCH, "log_epoch")?;
    let seal: &FixedSizeBinaryArray = column(batch, rd::SEAL, "seal")?;
    let mut buf = Vec::with_capacity(128);
    out.reserve(batch.num_rows());
    for i in 0..batch.num_rows() {
        SealedReadingLeaf {
            time_ns: time.value(i),
            patient: opt_str(patient, i),
            device: device.value(i),
            metric: metric.value(i),
            value_sealed: value.value(i),
            unit: unit.value(i),
            seq: opt_u64(seq, i),
            quality: quality.value(i),
            received_ns: received.value(i),
            seal: seal.is_valid(i).then(|| seal.value(i)),
        }
        .encode(&mut buf);
        out.push((epoch.value(i), wardflow_ledger_bridge::leaf_hash(&buf)));
    }
    Ok(())
}

/// Appends `(log_epoch, leaf hash)` for every row of a `deadletters` batch.
pub fn dead_letter_leaves(
    batch: &RecordBatch,
    out: &mut Vec<(u64, Hash)>,
) -> Result<(), StorageError> {
    if crate::schema::is_sealed(&batch.schema()) {
        return sealed_dead_letter_leaves(batch, out);
    }
    let received: &TimestampNanosecondArray = column(batch, dl::RECEIVED, "received_at")?;
    let device: &StringArray = column(batch, dl::DEVICE, "device_id")?;
    let patient: &StringArray = column(batch, dl::PATIENT, "patient_id")?;
    let reason: &StringArray = column(batch, dl::REASON, "reason")?;
    let detail: &StringArray = column(batch, dl::DETAIL, "detail")?;
    let metric: &StringArray = column(batch, dl::METRIC, "metric")?;
    let raw: &StringArray = column(batch, dl::RAW, "raw")?;
    let time: &TimestampNanosecondArray = column(batch, dl::TIME, "time")?;
    let seq: &UInt64Array = column(batch, dl::SEQ, "seq")?;
    let epoch: &UInt64Array = column(batch, dl::LOG_EPOCH, "log_epoch")?;
    let mut buf = Vec::with_capacity(160);
    for i in 0..batch.num_rows() {
        DeadLetterLeaf {
            received_ns: received.value(i),
            device: device.value(i),
            patient: opt_str(patient, i),
            reason: reason.value(i),
            detail: detail.value(i),
            metric: opt_str(metric, i),
            raw: raw.value(i),
            time_ns: time.is_valid(i).then(|| time.value(i)),
            seq: opt_u64(seq, i),
        }
        .encode(&mut buf);
        out.push((epoch.value(i), wardflow_ledger_bridge::leaf_hash(&buf)));
    }
    Ok(())
}

fn sealed_dead_letter_leaves(
    batch: &RecordBatch,
    out: &mut Vec<(u64, Hash)>,
) -> Result<(), StorageError> {
    let received: &TimestampNanosecondArray = column(batch, dl::RECEIVED, "received_at")?;
    let device: &StringArray = column(batch, dl::DEVICE, "device_id")?;
    let patient: &StringArray = column(batch, dl::PATIENT, "patient_id")?;
    let reason: &StringArray = column(batch, dl::REASON, "reason")?;
    let metric: &StringArray = column(batch, dl::METRIC, "metric")?;
    let time: &TimestampNanosecondArray = column(batch, dl::TIME, "time")?;
    let seq: &UInt64Array = column(batch, dl::SEQ, "seq")?;
    let epoch: &UInt64Array = column(batch, dl::LOG_EPOCH, "log_epoch")?;
    let seal: &FixedSizeBinaryArray = column(batch, dl::SEAL, "seal")?;
    let sealed: &BinaryArray = column(batch, dl::SEALED, "sealed")?;
    let mut buf = Vec::with_capacity(256);
    for i in 0..batch.num_rows() {
        SealedDeadLetterLeaf {
            received_ns: received.value(i),
            device: device.value(i),
            patient: opt_str(patient, i),
            reason: reason.value(i),
            metric: opt_str(metric, i),
            time_ns: time.is_valid(i).then(|| time.value(i)),
            seq: opt_u64(seq, i),
            seal: seal.value(i),
            sealed: sealed.value(i),
        }
        .encode(&mut buf);
        out.push((epoch.value(i), wardflow_ledger_bridge::leaf_hash(&buf)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use wardflow_ledger_bridge::leaf_hash;
    use wardflow_model::{DeadLetter, DeviceId, Metric, PatientId, Quality, Reading, RejectReason};

    use super::*;
    use crate::{Origin, ShardWriter, StoreConfig};

    fn parquet_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(parquet_files(&p));
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
        out
    }

    type LeavesOf = fn(&RecordBatch, &mut Vec<(u64, Hash)>) -> Result<(), StorageError>;

    fn read_back(dir: &Path, f: LeavesOf) -> Vec<(u64, Hash)> {
        let mut out = Vec::new();
        for path in parquet_files(dir) {
            let file = std::fs::File::open(path).unwrap();
            for batch in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                f(&batch.unwrap(), &mut out).unwrap();
            }
        }
        out.sort();
        out
    }

    #[test]
    fn leaves_read_back_from_parquet_are_the_leaves_of_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            root: dir.path().into(),
            process: 0,
            interval_ms: 1000,
        };
        let mut writer: ShardWriter<u64> = ShardWriter::new(config, 0).collect_leaves(true);
        let (device, patient) = (
            DeviceId::new("mon-1").unwrap(),
            PatientId::new("p-1").unwrap(),
        );
        let t = 1_764_000_000_000_000_000;
        let epoch = 1_764_000_000_250;
        let readings = [
            Reading {
                time_ns: t,
                metric: Metric::Hr,
                value: 72.5,
                seq: Some(1),
                quality: Quality::default(),
            },
            Reading {
                time_ns: t + 1,
                metric: Metric::Spo2,
                value: 97.0,
                seq: None,
                quality: Quality(1),
            },
        ];
        let dead = DeadLetter {
            received_ns: t + 5,
            device: device.clone(),
            patient: None,
            reason: RejectReason::UnknownMetric,
            detail: "metric \"xyz\" is not known".into(),
            metric: Some("xyz".into()),
            raw: "1".into(),
            time_ns: None,
            seq: Some(2),
        };
        writer.append(
            epoch,
            Origin {
                device: &device,
                patient: Some(&patient),
                received_ns: t + 5,
            },
            &readings,
            [dead],
            1,
        );
        writer.flush_before(None).unwrap();
        let mut at_flush = writer.take_leaves();
        at_flush.sort();

        let mut buf = Vec::new();
        let mut want: Vec<(u64, Hash)> = readings
            .iter()
            .map(|r| {
                ReadingLeaf {
                    time_ns: r.time_ns,
                    patient: Some("p-1"),
                    device: "mon-1",
                    metric: r.metric.name(),
                    value: r.value,
                    unit: r.metric.canonical_unit().ucum(),
                    seq: r.seq,
                    quality: r.quality.0,
                    received_ns: t + 5,
                }
                .encode(&mut buf);
                (epoch, leaf_hash(&buf))
            })
            .collect();
        want.sort();
        assert_eq!(
            read_back(&dir.path().join("readings"), reading_leaves),
            want
        );

        DeadLetterLeaf {
            received_ns: t + 5,
            device: "mon-1",
            patient: None,
            reason: RejectReason::UnknownMetric.code(),
            detail: "metric \"xyz\" is not known",
            metric: Some("xyz"),
            raw: "1",
            time_ns: None,
            seq: Some(2),
        }
        .encode(&mut buf);
        let dead_leaf = (epoch, leaf_hash(&buf));
        assert_eq!(
            read_back(&dir.path().join("deadletters"), dead_letter_leaves),
            vec![dead_leaf]
        );

        // The flush computed the same leaves as it wrote them.
        want.push(dead_leaf);
        want.sort();
        assert_eq!(at_flush, want);

        // Read back by epoch range, as a restart or a verifier does.
        let mut got = Vec::new();
        stored_leaves(dir.path(), 0, epoch..epoch + 1, 1000, &mut got).unwrap();
        got.sort();
        assert_eq!(got, want);
        got.clear();
        stored_leaves(dir.path(), 0, epoch + 1..epoch + 5000, 1000, &mut got).unwrap();
        stored_leaves(dir.path(), 1, epoch..epoch + 1, 1000, &mut got).unwrap();
        assert!(got.is_empty(), "other epochs, another process: {got:?}");
    }
}
