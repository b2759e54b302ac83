//! Reading the store back: a patient's readings over a time range, and dead
//! letters.
//!
//! Only partitions overlapping the range are opened; in each file, row
//! groups whose `patient_id` statistics exclude the patient are skipped
//! (files are sorted by patient, metric, time, so a patient's rows are
//! contiguous); the remaining rows are filtered in memory.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, BooleanArray, Float64Array};
use arrow::compute::concat_batches;
use arrow::datatypes::{Float64Type, TimestampNanosecondType, UInt8Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::statistics::Statistics;
use serde::Serialize;
use wardflow_model::{Metric, TimestampNs};

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, READINGS_DIR};
use crate::schema::{self, dead_letters as dl, readings as rd};
use crate::seal::{self, DataKey, KeyError, Keyring, UNBOUND, Unavailable};
use crate::writer::{DEAD_LETTERS_KIND, READINGS_KIND};
use std::sync::Arc;

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

/// Reads the live files of the partitions `keep` selects, handing their
/// batches (after row-group pruning; `prune` is told whether the file is
/// sealed) to `each`: a clear file's as they are read, a sealed file's
/// concatenated into one, so its runs are whole.
fn scan(
    table: &Path,
    keep: impl Fn(i64) -> bool,
    prune: impl Fn(&RowGroupMetaData, bool) -> bool,
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
            let sealed = schema::is_sealed(builder.schema());
            let all = builder.metadata().row_groups();
            let mut groups: Vec<usize> = all
                .iter()
                .enumerate()
                .filter(|(_, rg)| prune(rg, sealed))
                .map(|(i, _)| i)
                .collect();
            // A sealed run may cross a row-group boundary: a file of
            // several groups is read whole, so every run is.
            if sealed && !groups.is_empty() && all.len() > 1 {
                groups = (0..all.len()).collect();
            }
            if groups.is_empty() {
                continue;
            }
            let file_schema = builder.schema().clone();
            let reader = builder.with_row_groups(groups).build().map_err(corrupt)?;
            let batches = reader.map(|b| {
                b.map_err(|e| StorageError::Corrupt {
                    path: f.path.clone(),
                    what: e.to_string(),
                })
            });
            if !sealed {
                for batch in batches {
                    each(batch?)?;
                }
                continue;
            }
            // A sealed run is opened whole: the file's rows in one batch.
            let batches = batches.collect::<Result<Vec<_>, _>>()?;
            let batch = concat_batches(&file_schema, &batches)
                .map_err(|e| StorageError::Encode(e.to_string()))?;
            if batch.num_rows() > 0 {
                each(batch).map_err(|e| match e {
                    StorageError::Encode(what) | StorageError::Keys(KeyError::Open(what)) => {
                        StorageError::Corrupt {
                            path: f.path.clone(),
                            what,
                        }
                    }
                    e => e,
                })?;
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

/// Why stored rows could not be returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WithheldReason {
    /// The patient's data key was destroyed on request (crypto-shredding).
    Erased { generation: u32, erased_at_ns: i64 },
    /// The rows are sealed and no master key was given.
    NoKey,
    /// The keyring has no such key (files from another keyring).
    UnknownKey { generation: u32 },
}

/// Rows matching a query that could not be opened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Withheld {
    pub patient: Option<String>,
    pub rows: u64,
    #[serde(flatten)]
    pub reason: WithheldReason,
}

impl std::fmt::Display for Withheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = self.patient.as_deref().unwrap_or("unbound devices");
        match &self.reason {
            WithheldReason::Erased {
                generation,
                erased_at_ns,
            } => write!(
                f,
                "{} readings of {who} were erased at {} (data key generation {generation} destroyed)",
                self.rows,
                crate::layout::format_ns(*erased_at_ns)
            ),
            WithheldReason::NoKey => write!(
                f,
                "{} readings of {who} are sealed at rest and no master key was given",
                self.rows
            ),
            WithheldReason::UnknownKey { generation } => write!(
                f,
                "{} readings of {who} are sealed with a data key (generation {generation}) this keyring does not hold",
                self.rows
            ),
        }
    }
}

/// What a query found: the rows it could read, and what it could not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer<T> {
    pub rows: Vec<T>,
    pub withheld: Vec<Withheld>,
}

impl<T> Default for Answer<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            withheld: Vec::new(),
        }
    }
}

impl<T> Answer<T> {
    fn withhold(&mut self, patient: Option<&str>, reason: WithheldReason, rows: u64) {
        match self
            .withheld
            .iter_mut()
            .find(|w| w.patient.as_deref() == patient && w.reason == reason)
        {
            Some(w) => w.rows += rows,
            None => self.withheld.push(Withheld {
                patient: patient.map(str::to_string),
                rows,
                reason,
            }),
        }
    }

    /// The rows, or an error naming what was withheld.
    pub fn all(self) -> Result<Vec<T>, StorageError> {
        match self.withheld.first() {
            None => Ok(self.rows),
            Some(w) => Err(StorageError::Withheld(w.to_string())),
        }
    }
}

/// Looks up the key of a sealed run (or row).
fn key_of(
    keys: Option<&Keyring>,
    patient: Option<&str>,
    seal: &[u8],
) -> Result<Result<Arc<DataKey>, WithheldReason>, StorageError> {
    let Some(keys) = keys else {
        return Ok(Err(WithheldReason::NoKey));
    };
    let generation = seal::seal_generation(seal).unwrap_or(0);
    Ok(
        match keys.key_for_read(patient.unwrap_or(UNBOUND), generation)? {
            Ok(k) => Ok(k),
            Err(Unavailable::Erased(e)) => Err(WithheldReason::Erased {
                generation,
                erased_at_ns: e.erased_at_ns,
            }),
            Err(Unavailable::Unknown) => Err(WithheldReason::UnknownKey { generation }),
        },
    )
}

/// A `readings` batch's values: the clear column itself, or the sealed
/// ones opened.
enum Values<'a> {
    Clear(&'a Float64Array),
    Opened(Vec<Result<f64, WithheldReason>>),
}

impl Values<'_> {
    fn get(&self, i: usize) -> Result<f64, &WithheldReason> {
        match self {
            Values::Clear(v) => Ok(v.value(i)),
            Values::Opened(v) => v[i].as_ref().copied(),
        }
    }
}

/// The values of a `readings` batch's rows that `keep` selects: in the
/// clear, or opened run by run (only runs holding a selected row are
/// opened; other rows get NaN and must not be read).
fn reading_values<'a>(
    batch: &'a RecordBatch,
    keys: Option<&Keyring>,
    keep: &BooleanArray,
) -> Result<Values<'a>, StorageError> {
    if !schema::is_sealed(&batch.schema()) {
        return Ok(Values::Clear(
            batch.column(rd::VALUE).as_primitive::<Float64Type>(),
        ));
    }
    let sealed = batch.column(rd::VALUE).as_fixed_size_binary();
    let seals = batch.column(rd::SEAL).as_fixed_size_binary();
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut buf = Vec::new();
    let mut i = 0;
    while i < batch.num_rows() {
        if seals.is_null(i) {
            return Err(StorageError::Encode(format!(
                "row {i} of a sealed batch is not in a run (its first row is missing)"
            )));
        }
        let end = (i + 1..batch.num_rows())
            .find(|&j| seals.is_valid(j))
            .unwrap_or(batch.num_rows());
        if !(i..end).any(|j| keep.value(j)) {
            out.extend((i..end).map(|_| Ok(f64::NAN)));
            i = end;
            continue;
        }
        let patient = string_at(batch, rd::PATIENT, i);
        match key_of(keys, patient, seals.value(i))? {
            Ok(key) => {
                // A run's ciphertext is contiguous in the column's buffer.
                let size = sealed.value_size();
                let (from, to) = (i * size, end * size);
                buf.clear();
                buf.extend_from_slice(&sealed.value_data()[from..to]);
                key.open(READINGS_KIND, seals.value(i), &mut buf)?;
                out.extend(
                    buf.chunks_exact(8)
                        .map(|c| Ok(f64::from_le_bytes(c.try_into().expect("8 bytes")))),
                );
            }
            Err(reason) => out.extend((i..end).map(|_| Err(reason.clone()))),
        }
        i = end;
    }
    Ok(Values::Opened(out))
}

/// Readings matching `q`, ordered by time (then patient and metric). A
/// sealed store needs `keys`; rows that cannot be opened are counted in
/// [`Answer::withheld`] (an erased patient's, for one).
pub fn read_readings(
    root: &Path,
    keys: Option<&Keyring>,
    q: &ReadingQuery,
) -> Result<Answer<StoredReading>, StorageError> {
    let mut answer = Answer::default();
    let metric = q.metric.map(Metric::name);
    scan(
        &root.join(READINGS_DIR),
        hours_in(q.from_ns, q.to_ns),
        |rg, sealed| {
            q.patient
                .as_deref()
                .is_none_or(|p| may_contain(rg, rd::PATIENT, p))
                // A sealed run holds every metric of its patient: a row
                // group is kept whole so the run is.
                && (sealed || metric.is_none_or(|m| may_contain(rg, rd::METRIC, m)))
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
            let values = reading_values(&batch, keys, &keep)?;
            let seq = batch.column(rd::SEQ).as_primitive::<UInt64Type>();
            let quality = batch.column(rd::QUALITY).as_primitive::<UInt8Type>();
            let received = batch
                .column(rd::RECEIVED)
                .as_primitive::<TimestampNanosecondType>();
            for i in (0..batch.num_rows()).filter(|&i| keep.value(i)) {
                let patient = string_at(&batch, rd::PATIENT, i);
                match values.get(i) {
                    Ok(value) => answer.rows.push(StoredReading {
                        time_ns: time.value(i),
                        patient: patient.map(str::to_string),
                        device: string_at(&batch, rd::DEVICE, i)
                            .unwrap_or_default()
                            .to_string(),
                        metric: string_at(&batch, rd::METRIC, i)
                            .unwrap_or_default()
                            .to_string(),
                        value,
                        unit: string_at(&batch, rd::UNIT, i)
                            .unwrap_or_default()
                            .to_string(),
                        seq: (!seq.is_null(i)).then(|| seq.value(i)),
                        quality: quality.value(i),
                        received_ns: received.value(i),
                    }),
                    Err(reason) => answer.withhold(patient, reason.clone(), 1),
                }
            }
            Ok(())
        },
    )?;
    answer.rows.sort_by(|a, b| {
        (a.time_ns, &a.patient, &a.metric, &a.device, a.seq)
            .cmp(&(b.time_ns, &b.patient, &b.metric, &b.device, b.seq))
    });
    Ok(answer)
}

/// Readings matching `q` in a store without sealed rows (or an error
/// saying what could not be read); see [`read_readings`].
pub fn query_readings(root: &Path, q: &ReadingQuery) -> Result<Vec<StoredReading>, StorageError> {
    read_readings(root, None, q)?.all()
}

/// Detail and raw payload of a dead letter, opened if sealed.
fn dead_letter_payload(
    b: &RecordBatch,
    i: usize,
    keys: Option<&Keyring>,
) -> Result<Result<(String, String), WithheldReason>, StorageError> {
    if !schema::is_sealed(&b.schema()) {
        return Ok(Ok((
            string_at(b, dl::DETAIL, i).unwrap_or_default().to_string(),
            string_at(b, dl::RAW, i).unwrap_or_default().to_string(),
        )));
    }
    let seal = b.column(dl::SEAL).as_fixed_size_binary().value(i);
    let key = match key_of(keys, string_at(b, dl::PATIENT, i), seal)? {
        Ok(k) => k,
        Err(reason) => return Ok(Err(reason)),
    };
    let mut buf = b.column(dl::SEALED).as_binary::<i32>().value(i).to_vec();
    key.open(DEAD_LETTERS_KIND, seal, &mut buf)?;
    serde_json::from_slice(&buf)
        .map(Ok)
        .map_err(|e| StorageError::Encode(format!("a sealed dead letter: {e}")))
}

/// Dead letters matching `q`, newest first, in a store without sealed
/// rows; see [`read_dead_letters`].
pub fn query_dead_letters(
    root: &Path,
    q: &DeadLetterQuery,
) -> Result<Vec<StoredDeadLetter>, StorageError> {
    read_dead_letters(root, None, q)?.all()
}

/// Dead letters matching `q`, newest first; sealed ones are opened with
/// `keys`, or withheld.
pub fn read_dead_letters(
    root: &Path,
    keys: Option<&Keyring>,
    q: &DeadLetterQuery,
) -> Result<Answer<StoredDeadLetter>, StorageError> {
    let mut answer = Answer::default();
    scan(
        &root.join(DEAD_LETTERS_DIR),
        hours_in(q.from_ns, q.to_ns),
        |rg, _| {
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
                let patient = string_at(&b, dl::PATIENT, i);
                let (detail, raw) = match dead_letter_payload(&b, i, keys)? {
                    Ok(x) => x,
                    Err(why) => {
                        answer.withhold(patient, why, 1);
                        continue;
                    }
                };
                answer.rows.push(StoredDeadLetter {
                    received_ns: r,
                    device: device.to_string(),
                    patient: patient.map(str::to_string),
                    reason: reason.to_string(),
                    detail,
                    metric: string_at(&b, dl::METRIC, i).map(str::to_string),
                    raw,
                    time_ns: (!time.is_null(i)).then(|| time.value(i)),
                    seq: (!seq.is_null(i)).then(|| seq.value(i)),
                });
            }
            Ok(())
        },
    )?;
    answer.rows.sort_by(|a, b| {
        b.received_ns
            .cmp(&a.received_ns)
            .then_with(|| a.device.cmp(&b.device))
    });
    Ok(answer)
}
