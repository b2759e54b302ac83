//! The per-worker writer: buffers a flush interval in memory, then writes it
//! as Parquet in one go.
//!
//! Each dataflow worker owns one [`ShardWriter`]. Readings arrive per publish
//! (`append`, one call per batch, no allocation per reading: ids are interned
//! per interval) and are kept as compact rows. When the dataflow's frontier
//! passes the end of an interval, [`ShardWriter::flush_before`] sorts the
//! interval's rows by (hour, patient, metric, time), writes one Parquet file
//! per hour partition, the dead letters likewise, and the device states as
//! of the interval's end, each file fsynced and renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BinaryArray, FixedSizeBinaryArray, Float64Array, StringArray, StringBuilder,
    TimestampNanosecondArray, UInt8Array, UInt64Array,
};
use arrow::buffer::{Buffer, NullBuffer};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use serde::Serialize;
use wardflow_model::{DeadLetter, DeviceId, Metric, PatientId, Reading, TimestampNs};

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, FileName, READINGS_DIR, STATE_DIR};
use crate::schema::{self, dead_letters as dl};
use crate::seal::{Keyring, SEAL_LEN, UNBOUND};

/// What sealed values are bound to (associated data and nonce input).
pub(crate) const READINGS_KIND: &[u8] = b"wardflow/readings/value";
pub(crate) const DEAD_LETTERS_KIND: &[u8] = b"wardflow/deadletters/payload";

/// Store settings shared by all writers of a process.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory.
    pub root: PathBuf,
    /// This process's index (timely `--process`).
    pub process: usize,
    /// Length of a flush interval, in epoch milliseconds.
    pub interval_ms: u64,
}

impl StoreConfig {
    pub fn interval_of(&self, epoch: u64) -> u64 {
        epoch - epoch % self.interval_ms
    }
}

/// Sealed columns are random bytes: no dictionary (it would only grow and
/// be dropped), no compression (ciphertext does not compress), no
/// statistics (min and max of ciphertext say nothing).
fn sealed_columns(b: WriterPropertiesBuilder) -> WriterPropertiesBuilder {
    ["value_sealed", "seal", "sealed"]
        .into_iter()
        .fold(b, |b, c| {
            let path = ColumnPath::from(c);
            b.set_column_dictionary_enabled(path.clone(), false)
                .set_column_compression(path.clone(), Compression::UNCOMPRESSED)
                .set_column_statistics_enabled(path, EnabledStatistics::None)
        })
}

pub(crate) fn writer_properties() -> WriterProperties {
    sealed_columns(WriterProperties::builder())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_sorting_columns(Some(vec![
            SortingColumn {
                column_idx: schema::readings::PATIENT as i32,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: schema::readings::METRIC as i32,
                descending: false,
                nulls_first: false,
            },
            SortingColumn {
                column_idx: schema::readings::TIME as i32,
                descending: false,
                nulls_first: false,
            },
        ]))
        .build()
}

/// The properties of a compacted sealed `readings` file: sorted by patient
/// only (its runs keep the order they were sealed in).
pub(crate) fn sealed_writer_properties() -> WriterProperties {
    sealed_columns(WriterProperties::builder())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: schema::readings::PATIENT as i32,
            descending: false,
            nulls_first: false,
        }]))
        .build()
}

/// Strings numbered in order of first sight, so rows carry a `u32` per id
/// (written and read back as the list of names).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(from = "Vec<String>", into = "Vec<String>")]
pub(crate) struct Interner {
    ids: HashMap<String, u32>,
    pub(crate) names: Vec<String>,
}

impl PartialEq for Interner {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names
    }
}

impl From<Vec<String>> for Interner {
    fn from(names: Vec<String>) -> Self {
        let ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Interner { ids, names }
    }
}

impl From<Interner> for Vec<String> {
    fn from(i: Interner) -> Self {
        i.names
    }
}

impl Interner {
    pub(crate) fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_string());
        self.ids.insert(s.to_string(), i);
        i
    }

    /// Rank of each id in sorted order of the names.
    fn ranks(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.names.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| self.names[a as usize].cmp(&self.names[b as usize]));
        let mut rank = vec![0; order.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        rank
    }
}

const NO_PATIENT: u32 = u32::MAX;

/// One buffered reading.
#[derive(Clone, Copy)]
struct Row {
    /// The write-ahead log epoch of the row's publish (its dataflow time).
    epoch: u64,
    time_ns: TimestampNs,
    received_ns: TimestampNs,
    value: f64,
    seq: Option<u64>,
    patient: u32,
    device: u32,
    metric: Metric,
    quality: u8,
}

struct Interval<S> {
    patients: Interner,
    devices: Interner,
    rows: Vec<Row>,
    /// Dead letters, with the log epoch of their publish.
    dead: Vec<(u64, DeadLetter)>,
    states: HashMap<DeviceId, S>,
}

impl<S> Default for Interval<S> {
    fn default() -> Self {
        Self {
            patients: Interner::default(),
            devices: Interner::default(),
            rows: Vec::new(),
            dead: Vec::new(),
            states: HashMap::new(),
        }
    }
}

/// Who sent a publish, for whom, and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub device: &'a DeviceId,
    pub patient: Option<&'a PatientId>,
    pub received_ns: TimestampNs,
}

/// What one flush wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub intervals: usize,
    pub readings: u64,
    pub dead_letters: u64,
    pub files: usize,
    pub bytes: u64,
    pub micros: u64,
}

/// Buffers and writes one worker's share of the store.
pub struct ShardWriter<S> {
    config: StoreConfig,
    worker: usize,
    pending: BTreeMap<u64, Interval<S>>,
    props: WriterProperties,
    /// The leaves of rows written, when collected.
    leaves: Option<Vec<(u64, wardflow_ledger_bridge::Hash)>>,
    /// Seals values at rest when set.
    keys: Option<Arc<Keyring>>,
}

impl<S: Serialize> ShardWriter<S> {
    /// `worker` is the dataflow worker's global index.
    pub fn new(config: StoreConfig, worker: usize) -> Self {
        Self {
            config,
            worker,
            pending: BTreeMap::new(),
            props: writer_properties(),
            leaves: None,
            keys: None,
        }
    }

    /// Seals every value written from now on under its patient's data key
    /// ([`crate::seal`]).
    pub fn with_keyring(mut self, keys: Option<Arc<Keyring>>) -> Self {
        self.keys = keys;
        self
    }

    /// Makes every flush compute the audit-trail leaves of the rows it
    /// writes, from the record batches as written ([`crate::leaves`]), to
    /// be taken with [`ShardWriter::take_leaves`].
    pub fn collect_leaves(mut self, on: bool) -> Self {
        self.leaves = on.then(Vec::new);
        self
    }

    /// The leaves of the rows written since the last call, with their
    /// `log_epoch`: of every file completed, even when a later one failed.
    pub fn take_leaves(&mut self) -> Vec<(u64, wardflow_ledger_bridge::Hash)> {
        self.leaves.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Adds one publish's outcome at dataflow time `epoch`: its readings, its
    /// dead letters, and the device's validation state after it.
    pub fn append(
        &mut self,
        epoch: u64,
        origin: Origin<'_>,
        readings: &[Reading],
        dead: impl IntoIterator<Item = DeadLetter>,
        state: S,
    ) {
        let Origin {
            device,
            patient,
            received_ns,
        } = origin;
        let interval = self.config.interval_of(epoch);
        let buf = self.pending.entry(interval).or_default();
        let p = patient.map_or(NO_PATIENT, |p| buf.patients.intern(p.as_str()));
        let d = buf.devices.intern(device.as_str());
        buf.rows.extend(readings.iter().map(|r| Row {
            epoch,
            time_ns: r.time_ns,
            received_ns,
            value: r.value,
            seq: r.seq,
            patient: p,
            device: d,
            metric: r.metric,
            quality: r.quality.0,
        }));
        buf.dead.extend(dead.into_iter().map(|d| (epoch, d)));
        match buf.states.get_mut(device) {
            Some(s) => *s = state,
            None => {
                buf.states.insert(device.clone(), state);
            }
        }
    }

    /// The start of the earliest interval with buffered data.
    pub fn earliest_pending(&self) -> Option<u64> {
        self.pending.keys().next().copied()
    }

    /// Buffered readings not yet written.
    pub fn pending_rows(&self) -> usize {
        self.pending.values().map(|i| i.rows.len()).sum()
    }

    /// Moves every interval that ends at or before `frontier` into a writer
    /// of its own, to be written elsewhere (another thread) while this one
    /// takes new data.
    pub fn split_before(&mut self, frontier: Option<u64>) -> ShardWriter<S> {
        let keep = match frontier {
            Some(f) => self
                .pending
                .keys()
                .find(|&&start| start + self.config.interval_ms > f)
                .copied(),
            None => None,
        };
        let complete = match keep {
            Some(k) => {
                let rest = self.pending.split_off(&k);
                std::mem::replace(&mut self.pending, rest)
            }
            None => std::mem::take(&mut self.pending),
        };
        ShardWriter {
            config: self.config.clone(),
            worker: self.worker,
            pending: complete,
            props: self.props.clone(),
            leaves: self.leaves.as_ref().map(|_| Vec::new()),
            keys: self.keys.clone(),
        }
    }

    /// Takes back intervals another writer did not write.
    pub fn absorb(&mut self, other: ShardWriter<S>) {
        self.pending.extend(other.pending);
    }

    /// The starts of the buffered intervals.
    pub fn intervals(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.keys().copied()
    }

    /// Writes every interval that ends at or before `frontier` (all its data
    /// has arrived). An empty frontier (`None`) writes everything.
    pub fn flush_before(&mut self, frontier: Option<u64>) -> Result<FlushStats, StorageError> {
        let started = Instant::now();
        let mut stats = FlushStats::default();
        let mut dirs = Vec::new();
        if let Some(keys) = &self.keys {
            // An erasure made from the command line takes effect here.
            keys.refresh()?;
        }
        while let Some((&start, _)) = self.pending.first_key_value() {
            if frontier.is_some_and(|f| start + self.config.interval_ms > f) {
                break;
            }
            let mut buf = self.pending.remove(&start).expect("present");
            if let Err(e) = self.write_interval(start, &mut buf, &mut stats, &mut dirs) {
                // Kept for the next attempt: its files are written whole
                // (temporary name, then rename) or not at all.
                self.pending.insert(start, buf);
                return Err(e);
            }
            stats.intervals += 1;
        }
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            layout::sync_dir(dir).map_err(StorageError::io(dir))?;
        }
        stats.micros = started.elapsed().as_micros() as u64;
        Ok(stats)
    }

    fn write_interval(
        &mut self,
        start: u64,
        buf: &mut Interval<S>,
        stats: &mut FlushStats,
        dirs: &mut Vec<PathBuf>,
    ) -> Result<(), StorageError> {
        let name = FileName::Interval {
            start,
            process: self.config.process,
            worker: self.worker,
        };
        let root = &self.config.root;

        // The rows' leaves count once every file of the interval is in
        // place: a failed interval is written again, whole.
        let mut leaves = self.leaves.as_ref().map(|_| Vec::new());

        // Readings, one file per hour partition.
        sort_rows(buf);
        for group in buf
            .rows
            .chunk_by(|a, b| layout::hour_of(a.time_ns) == layout::hour_of(b.time_ns))
        {
            let hour = layout::hour_of(group[0].time_ns);
            let part = layout::partition_dir(hour);
            let dir = root.join(READINGS_DIR).join(&part);
            let sealed = match &self.keys {
                Some(keys) => Some(seal_values(
                    keys,
                    group,
                    &buf.patients,
                    &format!("{part}/{}", name.render("parquet")),
                )?),
                None => None,
            };
            // Arrow arrays are built a slice at a time, so a large interval
            // does not hold a second copy of itself while it is encoded.
            let batches = group.chunks(BATCH_ROWS).enumerate().map(|(i, rows)| {
                let at = i * BATCH_ROWS;
                let sealed = sealed.as_ref().map(|s| s.slice(at, rows.len()));
                let batch = readings_batch(rows, &buf.patients, &buf.devices, sealed)?;
                if let Some(out) = leaves.as_mut() {
                    crate::leaves::reading_leaves(&batch, out)?;
                }
                Ok(batch)
            });
            let schema = match sealed {
                Some(_) => schema::READINGS_SEALED.clone(),
                None => schema::READINGS.clone(),
            };
            stats.bytes += write_parquet_batches(&dir, &name, schema, batches, self.props.clone())?;
            stats.readings += group.len() as u64;
            stats.files += 1;
            dirs.push(dir);
        }

        // Dead letters, by the hour of receipt.
        for group in buf.dead.chunk_by(|(_, a), (_, b)| {
            layout::hour_of(a.received_ns) == layout::hour_of(b.received_ns)
        }) {
            let hour = layout::hour_of(group[0].1.received_ns);
            let context = format!("{}/{}", layout::partition_dir(hour), name.render("parquet"));
            let batch = dead_letters_batch(group, self.keys.as_deref(), &context)?;
            if let Some(out) = leaves.as_mut() {
                crate::leaves::dead_letter_leaves(&batch, out)?;
            }
            let dir = root
                .join(DEAD_LETTERS_DIR)
                .join(layout::partition_dir(hour));
            stats.bytes += self.write_parquet(&dir, &name, &batch)?;
            stats.dead_letters += group.len() as u64;
            stats.files += 1;
            dirs.push(dir);
        }

        // Device states as of the end of the interval.
        if !buf.states.is_empty() {
            let dir = root.join(STATE_DIR);
            std::fs::create_dir_all(&dir).map_err(StorageError::io(&dir))?;
            let path = dir.join(name.render("json"));
            let file = StateFile {
                interval: start,
                devices: buf.states.iter().map(|(d, s)| (d.clone(), s)).collect(),
            };
            let json =
                serde_json::to_vec(&file).map_err(|e| StorageError::Encode(e.to_string()))?;
            layout::write_atomically(&path, |f| f.write_all(&json))
                .map_err(StorageError::io(&path))?;
            stats.files += 1;
            dirs.push(dir);
        }
        if let (Some(all), Some(mine)) = (self.leaves.as_mut(), leaves) {
            all.extend(mine);
        }
        Ok(())
    }

    fn write_parquet(
        &self,
        dir: &Path,
        name: &FileName,
        batch: &RecordBatch,
    ) -> Result<u64, StorageError> {
        write_parquet_batches(
            dir,
            name,
            batch.schema(),
            std::iter::once(Ok(batch.clone())),
            self.props.clone(),
        )
    }
}

/// Rows per Arrow batch when writing.
const BATCH_ROWS: usize = 128 * 1024;

/// Writes record batches as one Parquet file named `name` in `dir`,
/// atomically. Returns its size.
fn write_parquet_batches(
    dir: &Path,
    name: &FileName,
    schema: arrow::datatypes::SchemaRef,
    batches: impl Iterator<Item = Result<RecordBatch, StorageError>>,
    props: WriterProperties,
) -> Result<u64, StorageError> {
    std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
    let path = dir.join(name.render("parquet"));
    let mut size = 0;
    let mut failure = None;
    let written = layout::write_atomically(&path, |f: &mut File| {
        let out = layout::SteadyWriter::new(f.try_clone()?);
        let mut w =
            ArrowWriter::try_new(out, schema, Some(props)).map_err(std::io::Error::other)?;
        for batch in batches {
            let batch = batch.map_err(|e| {
                failure = Some(e);
                std::io::Error::other("building a record batch failed")
            })?;
            w.write(&batch).map_err(std::io::Error::other)?;
        }
        w.close().map_err(std::io::Error::other)?;
        size = f.metadata()?.len();
        Ok(())
    });
    match (written, failure) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(StorageError::io(&path)(e)),
        (Ok(()), None) => Ok(size),
    }
}

/// Writes one record batch as a Parquet file, atomically. Returns its size.
pub(crate) fn write_parquet_file(
    path: &Path,
    batch: &RecordBatch,
    props: WriterProperties,
) -> Result<u64, StorageError> {
    let dir = path.parent().expect("a file in a directory");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(FileName::parse)
        .expect("a data file name");
    write_parquet_batches(
        dir,
        &name,
        batch.schema(),
        std::iter::once(Ok(batch.clone())),
        props,
    )
}

/// Device states written with an interval.
#[derive(Serialize, serde::Deserialize)]
pub(crate) struct StateFile<S> {
    pub interval: u64,
    pub devices: Vec<(DeviceId, S)>,
}

/// An hour group's values sealed: the ciphertext, 8 bytes per row, and
/// the seal of each run by the index of its first row.
struct SealedValues {
    ciphertext: Vec<u8>,
    seals: Vec<(usize, [u8; SEAL_LEN])>,
}

struct SealedSlice<'a> {
    ciphertext: &'a [u8],
    /// Seals by row index within the slice.
    seals: Vec<(usize, &'a [u8; SEAL_LEN])>,
}

impl SealedValues {
    fn slice(&self, at: usize, len: usize) -> SealedSlice<'_> {
        let lo = self.seals.partition_point(|(i, _)| *i < at);
        let hi = self.seals.partition_point(|(i, _)| *i < at + len);
        SealedSlice {
            ciphertext: &self.ciphertext[at * 8..(at + len) * 8],
            seals: self.seals[lo..hi]
                .iter()
                .map(|(i, s)| (i - at, s))
                .collect(),
        }
    }
}

/// Seals the values of sorted rows, one run per patient (one AES-256-GCM
/// call each; see [`crate::seal`]). `context` names the file.
fn seal_values(
    keys: &Keyring,
    rows: &[Row],
    patients: &Interner,
    context: &str,
) -> Result<SealedValues, StorageError> {
    let mut ciphertext = Vec::with_capacity(rows.len() * 8);
    let mut seals = Vec::new();
    let mut at = 0;
    let mut run = 0;
    for patient_rows in rows.chunk_by(|a, b| a.patient == b.patient) {
        let name = match patient_rows[0].patient {
            NO_PATIENT => UNBOUND,
            p => patients.names[p as usize].as_str(),
        };
        // Rows received before an erasure of the patient are sealed with a
        // throwaway key of the erased generation: erased like the rest.
        let erasures = keys.erasures(name);
        let erased = |r: &Row| Keyring::erased_after(&erasures, r.received_ns);
        for group in patient_rows.chunk_by(|a, b| erased(a) == erased(b)) {
            let key = match erased(&group[0]) {
                Some(generation) => keys.shredded_key(name, generation)?,
                None => keys.key_for_write(name)?,
            };
            let start = ciphertext.len();
            for r in group {
                ciphertext.extend_from_slice(&r.value.to_le_bytes());
            }
            let ctx = format!("{context}#{run}");
            let seal = key.seal(READINGS_KIND, ctx.as_bytes(), &mut ciphertext[start..]);
            seals.push((at, seal));
            at += group.len();
            run += 1;
        }
    }
    Ok(SealedValues { ciphertext, seals })
}

fn fixed_binary(size: usize, values: Vec<u8>, nulls: Option<NullBuffer>) -> ArrayRef {
    Arc::new(FixedSizeBinaryArray::new(
        size as i32,
        Buffer::from_vec(values),
        nulls,
    ))
}

fn readings_batch(
    rows: &[Row],
    patients: &Interner,
    devices: &Interner,
    sealed: Option<SealedSlice<'_>>,
) -> Result<RecordBatch, StorageError> {
    let n = rows.len();
    let mut patient = StringBuilder::with_capacity(n, n * 8);
    let mut device = StringBuilder::with_capacity(n, n * 8);
    let mut metric = StringBuilder::with_capacity(n, n * 4);
    let mut unit = StringBuilder::with_capacity(n, n * 4);
    for r in rows {
        if r.patient == NO_PATIENT {
            patient.append_null();
        } else {
            patient.append_value(&patients.names[r.patient as usize]);
        }
        device.append_value(&devices.names[r.device as usize]);
        metric.append_value(r.metric.name());
        unit.append_value(r.metric.canonical_unit().ucum());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.time_ns))
                .with_timezone("UTC"),
        ),
        Arc::new(patient.finish()),
        Arc::new(device.finish()),
        Arc::new(metric.finish()),
        match &sealed {
            Some(s) => fixed_binary(8, s.ciphertext.to_vec(), None),
            None => Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
        },
        Arc::new(unit.finish()),
        Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.seq))),
        Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| r.quality))),
        Arc::new(
            TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.received_ns))
                .with_timezone("UTC"),
        ),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.epoch))),
    ];
    let Some(sealed) = sealed else {
        return RecordBatch::try_new(schema::READINGS.clone(), columns)
            .map_err(|e| StorageError::Encode(e.to_string()));
    };
    let mut columns = columns;
    let mut seal_bytes = vec![0u8; n * SEAL_LEN];
    let mut valid = vec![false; n];
    for (i, s) in &sealed.seals {
        seal_bytes[i * SEAL_LEN..(i + 1) * SEAL_LEN].copy_from_slice(*s);
        valid[*i] = true;
    }
    columns.push(fixed_binary(
        SEAL_LEN,
        seal_bytes,
        Some(NullBuffer::from(valid)),
    ));
    RecordBatch::try_new(schema::READINGS_SEALED.clone(), columns)
        .map_err(|e| StorageError::Encode(e.to_string()))
}

fn dead_letters_batch(
    rows: &[(u64, DeadLetter)],
    keys: Option<&Keyring>,
    context: &str,
) -> Result<RecordBatch, StorageError> {
    let strings = |f: &dyn Fn(&DeadLetter) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::new();
        for (_, d) in rows {
            b.append_option(f(d));
        }
        Arc::new(b.finish())
    };
    let epochs = UInt64Array::from_iter_values(rows.iter().map(|(e, _)| *e));
    let rows = || rows.iter().map(|(_, d)| d);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampNanosecondArray::from_iter_values(rows().map(|d| d.received_ns))
                .with_timezone("UTC"),
        ),
        strings(&|d| Some(d.device.as_str())),
        strings(&|d| d.patient.as_ref().map(|p| p.as_str())),
        strings(&|d| Some(d.reason.code())),
        strings(&|d| Some(d.detail.as_str())),
        strings(&|d| d.metric.as_deref()),
        strings(&|d| Some(d.raw.as_str())),
        Arc::new(
            TimestampNanosecondArray::from_iter(rows().map(|d| d.time_ns)).with_timezone("UTC"),
        ),
        Arc::new(UInt64Array::from_iter(rows().map(|d| d.seq))),
        Arc::new(epochs),
    ];
    let Some(keys) = keys else {
        return RecordBatch::try_new(schema::DEAD_LETTERS.clone(), columns)
            .map_err(|e| StorageError::Encode(e.to_string()));
    };
    // Detail and raw payload may carry the patient's values: sealed, one
    // row at a time (dead letters are few), and left empty in the clear.
    let mut columns = columns;
    let empty: ArrayRef = Arc::new(StringArray::from_iter_values(rows().map(|_| "")));
    columns[dl::DETAIL] = empty.clone();
    columns[dl::RAW] = empty;
    let mut seals = Vec::with_capacity(rows().len() * SEAL_LEN);
    let mut sealed = Vec::with_capacity(rows().len());
    for (i, d) in rows().enumerate() {
        let name = d.patient.as_ref().map_or(UNBOUND, |p| p.as_str());
        let key = match Keyring::erased_after(&keys.erasures(name), d.received_ns) {
            Some(generation) => keys.shredded_key(name, generation)?,
            None => keys.key_for_write(name)?,
        };
        let mut buf = serde_json::to_vec(&(&d.detail, &d.raw))
            .map_err(|e| StorageError::Encode(e.to_string()))?;
        let ctx = format!("{context}#{i}");
        seals.extend_from_slice(&key.seal(DEAD_LETTERS_KIND, ctx.as_bytes(), &mut buf));
        sealed.push(buf);
    }
    columns.push(fixed_binary(SEAL_LEN, seals, None));
    columns.push(Arc::new(BinaryArray::from_iter_values(sealed)));
    RecordBatch::try_new(schema::DEAD_LETTERS_SEALED.clone(), columns)
        .map_err(|e| StorageError::Encode(e.to_string()))
}

/// For a second sink (QuestDB, [`crate::questdb`]): the buffered rows, and
/// a flush that writes only what the engine itself reads back.
impl<S: Serialize> ShardWriter<S> {
    /// Every buffered reading and dead letter, interval by interval.
    pub(crate) fn visit_rows<'s>(
        &'s self,
        mut reading: impl FnMut(crate::questdb::ReadingRow<'s>),
        mut dead: impl FnMut(&'s DeadLetter),
    ) {
        for buf in self.pending.values() {
            for r in &buf.rows {
                reading(crate::questdb::ReadingRow {
                    time_ns: r.time_ns,
                    patient: (r.patient != NO_PATIENT)
                        .then(|| buf.patients.names[r.patient as usize].as_str()),
                    device: &buf.devices.names[r.device as usize],
                    metric: r.metric,
                    value: r.value,
                    seq: r.seq,
                    quality: r.quality,
                    received_ns: r.received_ns,
                });
            }
            for (_, d) in &buf.dead {
                dead(d);
            }
        }
    }

    /// Like [`ShardWriter::flush_before`], for when the readings and dead
    /// letters go to QuestDB alone: writes no Parquet, only the device
    /// states (a restart validates from them) and, when collected, the
    /// audit-trail leaves of the rows, computed from the same record
    /// batches a Parquet flush would write.
    pub fn flush_states_before(
        &mut self,
        frontier: Option<u64>,
    ) -> Result<FlushStats, StorageError> {
        let started = Instant::now();
        let mut stats = FlushStats::default();
        let mut synced = false;
        while let Some((&start, _)) = self.pending.first_key_value() {
            if frontier.is_some_and(|f| start + self.config.interval_ms > f) {
                break;
            }
            let mut buf = self.pending.remove(&start).expect("present");
            if let Some(out) = self.leaves.as_mut() {
                let mut mine = Vec::new();
                let result = interval_leaves(&mut buf, &mut mine);
                if let Err(e) = result {
                    self.pending.insert(start, buf);
                    return Err(e);
                }
                out.extend(mine);
            }
            stats.readings += buf.rows.len() as u64;
            stats.dead_letters += buf.dead.len() as u64;
            if !buf.states.is_empty() {
                let dir = self.config.root.join(STATE_DIR);
                let name = FileName::Interval {
                    start,
                    process: self.config.process,
                    worker: self.worker,
                };
                let path = dir.join(name.render("json"));
                let file = StateFile {
                    interval: start,
                    devices: buf.states.iter().map(|(d, s)| (d.clone(), s)).collect(),
                };
                let written = std::fs::create_dir_all(&dir)
                    .and_then(|()| {
                        let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
                        layout::write_atomically(&path, |f| f.write_all(&json))
                    })
                    .map_err(StorageError::io(&path));
                if let Err(e) = written {
                    self.pending.insert(start, buf);
                    return Err(e);
                }
                stats.files += 1;
                synced = true;
            }
            stats.intervals += 1;
        }
        if synced {
            let dir = self.config.root.join(STATE_DIR);
            layout::sync_dir(&dir).map_err(StorageError::io(&dir))?;
        }
        stats.micros = started.elapsed().as_micros() as u64;
        Ok(stats)
    }
}

/// Sorts an interval's rows as they are written: by hour, patient, metric,
/// time (rows of unbound devices last in their hour), then by device name,
/// sequence, receipt and value, a total order that does not depend on the
/// order rows arrived in: a replay of the write-ahead log writes the same
/// file, so sealed runs get the same bytes and leaves. The same goes for
/// dead letters.
fn sort_rows<S>(buf: &mut Interval<S>) {
    let rank = buf.patients.ranks();
    let device_rank = buf.devices.ranks();
    sort_readings(&mut buf.rows, &rank, &device_rank);
    buf.dead.sort_by(|(ea, a), (eb, b)| {
        (
            a.received_ns,
            &a.device,
            a.time_ns,
            a.seq,
            &a.metric,
            a.reason.code(),
            &a.detail,
            &a.raw,
            ea,
        )
            .cmp(&(
                b.received_ns,
                &b.device,
                b.time_ns,
                b.seq,
                &b.metric,
                b.reason.code(),
                &b.detail,
                &b.raw,
                eb,
            ))
    });
}

/// The order rows are stored in: see [`sort_rows`].
type RowOrder = (
    i64,
    u32,
    Metric,
    TimestampNs,
    u32,
    Option<u64>,
    TimestampNs,
    u64,
    u8,
);

fn row_order(r: &Row, rank: &[u32], device_rank: &[u32]) -> RowOrder {
    (
        layout::hour_of(r.time_ns),
        patient_rank(r.patient, rank),
        r.metric,
        r.time_ns,
        device_rank[r.device as usize],
        r.seq,
        r.received_ns,
        r.value.to_bits(),
        r.quality,
    )
}

/// A patient's place in name order; rows of unbound devices come last.
fn patient_rank(patient: u32, rank: &[u32]) -> u32 {
    if patient == NO_PATIENT {
        u32::MAX
    } else {
        rank[patient as usize]
    }
}

/// Sorts rows in [`row_order`]. Building that nine-field key at each
/// comparison made sorting the largest part of a flush; instead each row's
/// first four fields are packed once into two words (hour from the
/// interval's first, 16 bits; patient rank, 32; metric, 16; then time, its
/// sign bit flipped so that unsigned order is time order), the packed keys
/// are sorted with the rows' indices, only rows equal in all four are
/// compared on the rest, and the rows are then moved into place. Rows
/// spread over more than 65,536 hours (device clocks years apart) are
/// sorted on the full key.
///
/// The keys take 24 bytes a row beside the rows, not charged to the
/// memory budget; the rows are permuted in place rather than copied, so a
/// flush at full rate holds no second copy of its interval.
fn sort_readings(rows: &mut [Row], rank: &[u32], device_rank: &[u32]) {
    let Some((first, last)) =
        rows.iter()
            .map(|r| layout::hour_of(r.time_ns))
            .fold(None, |span, h| match span {
                None => Some((h, h)),
                Some((lo, hi)) => Some((h.min(lo), h.max(hi))),
            })
    else {
        return;
    };
    if last - first > i64::from(u16::MAX) {
        rows.sort_unstable_by_key(|r| row_order(r, rank, device_rank));
        return;
    }
    let mut keyed: Vec<(u64, u64, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let hour = (layout::hour_of(r.time_ns) - first) as u64;
            let patient = u64::from(patient_rank(r.patient, rank));
            let metric = u64::from(r.metric as u8);
            let time = r.time_ns as u64 ^ (1 << 63);
            ((hour << 48) | (patient << 16) | metric, time, i)
        })
        .collect();
    keyed.sort_unstable_by_key(|&(high, low, _)| (high, low));
    for ties in keyed.chunk_by_mut(|a, b| (a.0, a.1) == (b.0, b.1)) {
        if ties.len() > 1 {
            ties.sort_unstable_by_key(|&(_, _, i)| row_order(&rows[i], rank, device_rank));
        }
    }
    // Position i takes the row at keyed[i].2: follow each cycle of that
    // permutation once, marking each position done by pointing it at
    // itself.
    for start in 0..rows.len() {
        if keyed[start].2 == start {
            continue;
        }
        let held = rows[start];
        let mut at = start;
        loop {
            let from = std::mem::replace(&mut keyed[at].2, at);
            if from == start {
                rows[at] = held;
                break;
            }
            rows[at] = rows[from];
            at = from;
        }
    }
}

/// The leaves of one interval's rows, in the order and batches
/// `write_interval` writes them.
fn interval_leaves<S>(
    buf: &mut Interval<S>,
    out: &mut Vec<(u64, wardflow_ledger_bridge::Hash)>,
) -> Result<(), StorageError> {
    sort_rows(buf);
    for group in buf
        .rows
        .chunk_by(|a, b| layout::hour_of(a.time_ns) == layout::hour_of(b.time_ns))
    {
        for rows in group.chunks(BATCH_ROWS) {
            // Rows not stored here are not sealed here either.
            let batch = readings_batch(rows, &buf.patients, &buf.devices, None)?;
            crate::leaves::reading_leaves(&batch, out)?;
        }
    }
    for group in buf
        .dead
        .chunk_by(|(_, a), (_, b)| layout::hour_of(a.received_ns) == layout::hour_of(b.received_ns))
    {
        let batch = dead_letters_batch(group, None, "")?;
        crate::leaves::dead_letter_leaves(&batch, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with many ties on the packed fields (few patients, metrics and
    /// times), unbound devices among them, over the hours given.
    fn rows(n: usize, hours: &[i64], seed: u64) -> Vec<Row> {
        let mut x = seed;
        let mut next = move |m: u64| {
            // SplitMix64: any well-spread sequence will do.
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % m
        };
        (0..n)
            .map(|_| {
                let hour = hours[next(hours.len() as u64) as usize];
                let time_ns = layout::hour_bounds(hour).0 + next(3) as i64 * 1_000_000_000;
                Row {
                    epoch: 1,
                    time_ns,
                    received_ns: time_ns + next(2) as i64,
                    value: next(3) as f64,
                    seq: (next(2) == 1).then(|| next(3)),
                    patient: if next(5) == 0 {
                        NO_PATIENT
                    } else {
                        next(4) as u32
                    },
                    device: next(6) as u32,
                    metric: Metric::ALL[next(3) as usize],
                    quality: next(2) as u8,
                }
            })
            .collect()
    }

    fn check(hours: &[i64], seed: u64) {
        // Ranks that are not the identity, as names' order seldom is.
        let rank = [3, 0, 2, 1];
        let device_rank = [5, 4, 0, 1, 3, 2];
        let mut packed = rows(20_000, hours, seed);
        let mut plain = packed.clone();
        sort_readings(&mut packed, &rank, &device_rank);
        plain.sort_unstable_by_key(|r| row_order(r, &rank, &device_rank));
        let order = |v: &[Row]| -> Vec<RowOrder> {
            v.iter()
                .map(|r| row_order(r, &rank, &device_rank))
                .collect()
        };
        assert_eq!(packed.len(), plain.len());
        assert_eq!(order(&packed), order(&plain));
    }

    #[test]
    fn the_packed_sort_keeps_the_full_order() {
        // Around the epoch (negative times), and one hour apart.
        check(&[-1, 0], 1);
        check(&[493_000, 493_001], 2);
        // Too far apart to pack: the full key.
        check(&[0, 70_000], 3);
        // Just close enough to pack.
        check(&[10, 10 + i64::from(u16::MAX)], 4);
    }
}
