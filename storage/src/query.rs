//! Reading the store back: a patient's readings over a time range, and dead
//! letters.
//!
//! Only partitions overlapping the range are opened; in each file, row
//! groups whose `patient_id` statistics exclude the patient are skipped
//! (files are sorted by patient, metric, time, so a patient's rows are
//! contiguous); the remaining rows are filtered in memory.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Float64Type, TimestampNanosecondType, UInt8Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::statistics::Statistics;
use serde::Serialize;
use wardflow_model::{Metric, TimestampNs};

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, READINGS_DIR};
use crate::schema::{dead_letters as dl, readings as rd};

/// Which readings to return.
#[derive(Debug, Clone, Default)]
pub struct ReadingQuery {
    pub patient: Option<String>,
    pub device: Option<String>,
    pub metric: Option<Metric>,
    /// Inclusive lower bound on the reading's time.
    pub from_ns: Option<TimestampNs>,
    /// Exclusive upper bound on the reading's time.
    pub to_ns: Option<TimestampNs>,
}

/// A stored reading as read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredReading {
    pub time_ns: TimestampNs,
    pub patient: Option<String>,
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub seq: Option<u64>,
    pub quality: u8,
    pub received_ns: TimestampNs,
}

/// Which dead letters to return.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub device: Option<String>,
    pub reason: Option<String>,
    pub from_ns: Option<TimestampNs>,
    pub to_ns: Option<TimestampNs>,
}

/// A dead letter as read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDeadLetter {
    pub received_ns: TimestampNs,
    pub device: String,
    pub patient: Option<String>,
    pub reason: String,
    pub detail: String,
    pub metric: Option<String>,
    pub raw: String,
    pub time_ns: Option<TimestampNs>,
    pub seq: Option<u64>,
}

fn hours_in(from: Option<TimestampNs>, to: Option<TimestampNs>) -> impl Fn(i64) -> bool {
    let lo = from.map(layout::hour_of);
    let hi = to.map(|t| layout::hour_of(t.saturating_sub(1)));
    move |h| lo.is_none_or(|lo| h >= lo) && hi.is_none_or(|hi| h <= hi)
}

/// Whether a row group may hold rows with `column == value`, by its statistics.
fn may_contain(rg: &RowGroupMetaData, column: usize, value: &str) -> bool {
    match rg.column(column).statistics() {
        Some(Statistics::ByteArray(s)) => {
            let v = value.as_bytes();
            s.min_bytes_opt().is_none_or(|min| min <= v)
                && s.max_bytes_opt().is_none_or(|max| v <= max)
        }
        _ => true,
    }
}

/// Reads the live files of the partitions `keep` selects, handing each
/// batch (after row-group pruning) to `each`.
fn scan(
    table: &Path,
    keep: impl Fn(i64) -> bool,
    prune: impl Fn(&RowGroupMetaData) -> bool,
    mut each: impl FnMut(RecordBatch) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    for (hour, dir) in layout::partitions(table).map_err(StorageError::io(table))? {
        if !keep(hour) {
            continue;
        }
        for f in layout::live_files(hour, &dir).map_err(StorageError::io(&dir))? {
            let file = match File::open(&f.path) {
                Ok(file) => file,
                // Compaction may delete a covered file between listing and opening.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StorageError::io(&f.path)(e)),
            };
            let corrupt = |e: parquet::errors::ParquetError| StorageError::Corrupt {
                path: f.path.clone(),
                what: e.to_string(),
            };
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(corrupt)?;
            let groups: Vec<usize> = builder
                .metadata()
                .row_groups()
                .iter()
                .enumerate()
                .filter(|(_, rg)| prune(rg))
                .map(|(i, _)| i)
                .collect();
            if groups.is_empty() {
                continue;
            }
            let reader = builder.with_row_groups(groups).build().map_err(corrupt)?;
            for batch in reader {
                let batch = batch.map_err(|e| StorageError::Corrupt {
                    path: f.path.clone(),
                    what: e.to_string(),
                })?;
                each(batch)?;
            }
        }
    }
    Ok(())
}

fn mask(batch: &RecordBatch, keep: impl Fn(usize) -> bool) -> BooleanArray {
    (0..batch.num_rows()).map(|i| Some(keep(i))).collect()
}

fn string_at(batch: &RecordBatch, col: usize, i: usize) -> Option<&str> {
    let a = batch.column(col).as_string::<i32>();
    (!a.is_null(i)).then(|| a.value(i))
}

/// Readings matching `q`, ordered by time (then patient and metric).
pub fn query_readings(root: &Path, q: &ReadingQuery) -> Result<Vec<StoredReading>, StorageError> {
    let mut out = Vec::new();
    let metric = q.metric.map(Metric::name);
    scan(
        &root.join(READINGS_DIR),
        hours_in(q.from_ns, q.to_ns),
        |rg| {
            q.patient
                .as_deref()
                .is_none_or(|p| may_contain(rg, rd::PATIENT, p))
                && metric.is_none_or(|m| may_contain(rg, rd::METRIC, m))
        },
        |batch| {
            let time = batch
                .column(rd::TIME)
                .as_primitive::<TimestampNanosecondType>();
            let keep = mask(&batch, |i| {
                let t = time.value(i);
                q.from_ns.is_none_or(|f| t >= f)
                    && q.to_ns.is_none_or(|to| t < to)
                    && q.patient
                        .as_deref()
                        .is_none_or(|p| string_at(&batch, rd::PATIENT, i) == Some(p))
                    && q.device
                        .as_deref()
                        .is_none_or(|d| string_at(&batch, rd::DEVICE, i) == Some(d))
                    && metric.is_none_or(|m| string_at(&batch, rd::METRIC, i) == Some(m))
            });
            let b = filter_record_batch(&batch, &keep)
                .map_err(|e| StorageError::Encode(e.to_string()))?;
            let time = b.column(rd::TIME).as_primitive::<TimestampNanosecondType>();
            let value = b.column(rd::VALUE).as_primitive::<Float64Type>();
            let seq = b.column(rd::SEQ).as_primitive::<UInt64Type>();
            let quality = b.column(rd::QUALITY).as_primitive::<UInt8Type>();
            let received = b
                .column(rd::RECEIVED)
                .as_primitive::<TimestampNanosecondType>();
            for i in 0..b.num_rows() {
                out.push(StoredReading {
                    time_ns: time.value(i),
                    patient: string_at(&b, rd::PATIENT, i).map(str::to_string),
                    device: string_at(&b, rd::DEVICE, i).unwrap_or_default().to_string(),
                    metric: string_at(&b, rd::METRIC, i).unwrap_or_default().to_string(),
                    value: value.value(i),
                    unit: string_at(&b, rd::UNIT, i).unwrap_or_default().to_string(),
                    seq: (!seq.is_null(i)).then(|| seq.value(i)),
                    quality: quality.value(i),
                    received_ns: received.value(i),
                });
            }
            Ok(())
        },
    )?;
    out.sort_by(|a, b| {
        (a.time_ns, &a.patient, &a.metric, &a.device, a.seq)
            .cmp(&(b.time_ns, &b.patient, &b.metric, &b.device, b.seq))
    });
    Ok(out)
}

/// Dead letters matching `q`, newest first.
pub fn query_dead_letters(
    root: &Path,
    q: &DeadLetterQuery,
) -> Result<Vec<StoredDeadLetter>, StorageError> {
    let mut out = Vec::new();
    scan(
        &root.join(DEAD_LETTERS_DIR),
        hours_in(q.from_ns, q.to_ns),
        |rg| {
            q.device
                .as_deref()
                .is_none_or(|d| may_contain(rg, dl::DEVICE, d))
        },
        |b| {
            let received = b
                .column(dl::RECEIVED)
                .as_primitive::<TimestampNanosecondType>();
            let time = b.column(dl::TIME).as_primitive::<TimestampNanosecondType>();
            let seq = b.column(dl::SEQ).as_primitive::<UInt64Type>();
            for i in 0..b.num_rows() {
                let r = received.value(i);
                if q.from_ns.is_some_and(|f| r < f) || q.to_ns.is_some_and(|t| r >= t) {
                    continue;
                }
                let device = string_at(&b, dl::DEVICE, i).unwrap_or_default();
                let reason = string_at(&b, dl::REASON, i).unwrap_or_default();
                if q.device.as_deref().is_some_and(|d| d != device)
                    || q.reason.as_deref().is_some_and(|x| x != reason)
                {
                    continue;
                }
                out.push(StoredDeadLetter {
                    received_ns: r,
                    device: device.to_string(),
                    patient: string_at(&b, dl::PATIENT, i).map(str::to_string),
                    reason: reason.to_string(),
                    detail: string_at(&b, dl::DETAIL, i).unwrap_or_default().to_string(),
                    metric: string_at(&b, dl::METRIC, i).map(str::to_string),
                    raw: string_at(&b, dl::RAW, i).unwrap_or_default().to_string(),
                    time_ns: (!time.is_null(i)).then(|| time.value(i)),
                    seq: (!seq.is_null(i)).then(|| seq.value(i)),
                });
            }
            Ok(())
        },
    )?;
    out.sort_by(|a, b| {
        b.received_ns
            .cmp(&a.received_ns)
            .then_with(|| a.device.cmp(&b.device))
    });
    Ok(out)
}
