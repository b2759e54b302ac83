//! The QuestDB sink: readings, alert transitions and dead letters sent
//! over the InfluxDB line protocol (ILP) with questdb-rs, to QuestDB or to
//! any receiver of the line protocol (docs/questdb.md).
//!
//! ```text
//! flush threads ──submit(Batch)──▶ queue ──▶ sender thread ──ILP (HTTP/TCP)──▶ QuestDB
//!  (one per worker,    │  (bounded)            │ on any error, or while the
//!   at the frontier)   │                       │ receiver is down
//!                      └── queue full ──▶ spool (files on disk, bounded) ◀┘
//!                                           └── drained oldest first when it is back
//! ```
//!
//! A [`Batch`] carries everything needed to send its rows again identically
//! (same table, symbols, fields and designated timestamp), so a replay after
//! an ambiguous failure writes the same rows, which the receiver collapses:
//! QuestDB through the tables' deduplication keys (`DEDUP UPSERT KEYS`),
//! VictoriaMetrics through `-dedup.minScrapeInterval`. Rows are never lost:
//! a submitter's [`Receipt`] completes only once its rows were accepted by
//! the receiver or written to the spool (fsynced); when neither is possible
//! (the spool is at its byte limit) it fails, and the engine keeps the rows
//! in its write-ahead log and tries again later.
//!
//! Batching: the engine submits the rows of its complete flush intervals
//! (at the dataflow frontier) and waits for them; they go out at once,
//! together with whatever else is queued, in requests of at most
//! `batch_rows` rows. Rows submitted without waiting (alert transitions)
//! wait up to `max_batch_age` for company.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use questdb::ingress::{Buffer, ProtocolVersion, Sender, SenderBuilder, TimestampNanos};
use serde::{Deserialize, Serialize};
use std::sync::{Condvar, Mutex, MutexGuard};
use wardflow_model::{DeadLetter, Metric, TimestampNs};

use crate::spool::{Spool, SpoolError};
use crate::writer::Interner;

/// Table of readings.
pub const READINGS_TABLE: &str = "readings";
/// Table of alert transitions.
pub const ALERTS_TABLE: &str = "alerts";
/// Table of dead letters.
pub const DEAD_LETTERS_TABLE: &str = "deadletters";

/// Why the sink could not take rows.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The connection string is not usable; the message names the key and
    /// never repeats a secret.
    #[error("storage.questdb.conf: {0}")]
    Conf(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The rows were neither sent nor spooled (the spool is full); the
    /// caller keeps them.
    #[error("{0}")]
    NotStored(String),
}

/// Locks, also after a panic elsewhere (the data stays consistent: every
/// critical section here is a single assignment or a whole spool write).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the sink reaches its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// ILP over HTTP(S): each request is answered, so a batch counts as
    /// sent once the receiver accepted it.
    Http,
    /// ILP over TCP (TLS with `tcps`): no answers; a batch counts as sent
    /// once it is in the socket, and batches sent in the last
    /// [`SinkConfig::tcp_replay`] are sent again after a connection fails.
    Tcp,
}

/// The sink's settings.
#[derive(Clone)]
pub struct SinkConfig {
    /// The questdb-rs configuration string (`http::addr=host:9000;` ...).
    /// It may hold credentials: it is never logged or printed.
    pub conf: String,
    /// Where batches wait while the receiver is down.
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold.
    pub spool_max_bytes: u64,
    /// Most rows in one request.
    pub batch_rows: usize,
    /// How long rows submitted without waiting (alerts) may wait for a
    /// fuller request.
    pub max_batch_age: Duration,
    /// Batches queued in memory for the sender thread; more go to the spool.
    pub queue_batches: usize,
    /// How long a submitter waits for the receiver before its rows go to
    /// the spool instead (a slow receiver does not hold the dataflow back).
    pub spool_after: Duration,
    /// TCP only: how far back batches are sent again after a failure.
    pub tcp_replay: Duration,
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("conf", &redact(&self.conf))
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("batch_rows", &self.batch_rows)
            .field("max_batch_age", &self.max_batch_age)
            .field("queue_batches", &self.queue_batches)
            .field("spool_after", &self.spool_after)
            .field("tcp_replay", &self.tcp_replay)
            .finish()
    }
}

impl SinkConfig {
    /// Settings with the defaults for everything but the connection string
    /// and the spool directory.
    pub fn new(conf: impl Into<String>, spool_dir: impl Into<PathBuf>) -> SinkConfig {
        SinkConfig {
            conf: conf.into(),
            spool_dir: spool_dir.into(),
            spool_max_bytes: 1 << 30,
            batch_rows: 50_000,
            max_batch_age: Duration::from_millis(1000),
            queue_batches: 64,
            spool_after: Duration::from_secs(2),
            tcp_replay: Duration::from_secs(5),
        }
    }
}

/// Keys of a questdb-rs configuration string whose values are secrets.
const SECRET_KEYS: [&str; 5] = [
    "password",
    "token",
    "token_x",
    "token_y",
    "tls_roots_password",
];

/// The configuration string with the values of secret keys replaced by
/// `***`, fit for logs and error messages.
pub fn redact(conf: &str) -> String {
    let mut out = String::with_capacity(conf.len());
    let (service, params) = match conf.split_once("::") {
        Some((s, p)) => (s, p),
        None => return "***".into(),
    };
    out.push_str(service);
    out.push_str("::");
    // Values escape ';' by doubling it.
    let mut rest = params;
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            out.push_str(rest);
            break;
        };
        let mut end = 0;
        let bytes = after.as_bytes();
        while end < bytes.len() {
            if bytes[end] == b';' {
                if bytes.get(end + 1) == Some(&b';') {
                    end += 2;
                    continue;
                }
                break;
            }
            end += 1;
        }
        out.push_str(key);
        out.push('=');
        if SECRET_KEYS.contains(&key.trim()) {
            out.push_str("***");
        } else {
            out.push_str(&after[..end]);
        }
        if end < bytes.len() {
            out.push(';');
            end += 1;
        }
        rest = &after[end..];
    }
    out
}

/// The values of the secret keys in `conf`, to be scrubbed from messages.
fn secrets(conf: &str) -> Vec<String> {
    let params = conf.split_once("::").map_or("", |(_, p)| p);
    params
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, v)| SECRET_KEYS.contains(&k.trim()) && !v.is_empty())
        .map(|(_, v)| v.to_string())
        .collect()
}

fn scrub(msg: &str, conf: &str) -> String {
    let mut msg = msg.to_string();
    for s in secrets(conf) {
        msg = msg.replace(&s, "***");
    }
    msg
}

/// Checks a configuration string without connecting: it parses, names a
/// transport the sink supports, and questdb-rs accepts its keys.
pub fn check_conf(conf: &str) -> Result<Transport, SinkError> {
    let service = conf.split_once("::").map(|(s, _)| s).ok_or_else(|| {
        SinkError::Conf("expected `http::addr=HOST:PORT;` or `tcp::addr=HOST:PORT;`".into())
    })?;
    let transport = match service {
        "http" | "https" => Transport::Http,
        "tcp" | "tcps" => Transport::Tcp,
        other => {
            return Err(SinkError::Conf(format!(
                "the sink speaks ILP over http, https, tcp or tcps, not `{other}`"
            )));
        }
    };
    SenderBuilder::from_conf(conf).map_err(|e| SinkError::Conf(scrub(e.msg(), conf)))?;
    Ok(transport)
}

/// A reading for the `readings` table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRow<'a> {
    pub time_ns: TimestampNs,
    pub patient: Option<&'a str>,
    pub device: &'a str,
    pub metric: Metric,
    pub value: f64,
    pub seq: Option<u64>,
    pub quality: u8,
    pub received_ns: TimestampNs,
}

/// An alert transition for the `alerts` table: the alert log's record,
/// flattened (storage knows nothing of the rules crate; the engine
/// converts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRow {
    /// Time of the transition (the designated timestamp).
    pub at_ns: TimestampNs,
    pub alert_id: String,
    /// The transition's number within the alert, from 1.
    pub seq: u32,
    pub event: String,
    pub state: String,
    pub priority: String,
    pub base_priority: String,
    pub rule: String,
    pub subject: String,
    pub subject_kind: String,
    pub patient: Option<String>,
    pub device: Option<String>,
    pub care_unit: Option<String>,
    pub bed: Option<String>,
    pub description: String,
    pub technical: bool,
    pub condition: bool,
    pub raised_ns: TimestampNs,
    pub first_reading_ns: TimestampNs,
    pub by: Option<String>,
}

/// A dead letter for the `deadletters` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// When its publish arrived (the designated timestamp).
    pub received_ns: TimestampNs,
    pub device: String,
    pub patient: Option<String>,
    pub reason: String,
    pub metric: Option<String>,
    pub detail: String,
    pub raw: String,
    pub time_ns: Option<TimestampNs>,
    pub seq: Option<u64>,
    /// Its place among the dead letters of its publish (same device and
    /// arrival time): part of the deduplication key.
    pub ordinal: u32,
}

/// A reading as batched: ids interned per batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Reading(i64, u32, u32, Metric, f64, Option<u64>, u8, i64);

const NONE: u32 = u32::MAX;

/// Rows on their way to the receiver, in one piece: what a submitter
/// hands over, what a spool file holds, what one request sends (up to
/// `batch_rows` at a time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    names: Interner,
    readings: Vec<Reading>,
    dead_letters: Vec<DeadLetterRow>,
    alerts: Vec<AlertRow>,
}

impl Batch {
    fn intern(&mut self, s: &str) -> u32 {
        self.names.intern(s)
    }

    pub fn push_reading(&mut self, r: &ReadingRow<'_>) {
        let patient = r.patient.map_or(NONE, |p| self.intern(p));
        let device = self.intern(r.device);
        self.readings.push(Reading(
            r.time_ns,
            patient,
            device,
            r.metric,
            r.value,
            r.seq,
            r.quality,
            r.received_ns,
        ));
    }

    pub fn push_alert(&mut self, a: AlertRow) {
        self.alerts.push(a);
    }

    pub fn push_dead_letter(&mut self, d: DeadLetterRow) {
        self.dead_letters.push(d);
    }

    /// Adds dead letters in the order of their publishes, numbering those
    /// of one publish (same device, same arrival) from 0.
    pub fn extend_dead_letters<'d>(&mut self, dead: impl IntoIterator<Item = &'d DeadLetter>) {
        let mut last: Option<(String, i64)> = None;
        let mut ordinal = 0;
        for d in dead {
            let key = (d.device.as_str(), d.received_ns);
            if last
                .as_ref()
                .is_some_and(|(dev, t)| (dev.as_str(), *t) == key)
            {
                ordinal += 1;
            } else {
                ordinal = 0;
                last = Some((d.device.as_str().to_string(), d.received_ns));
            }
            self.dead_letters.push(DeadLetterRow {
                received_ns: d.received_ns,
                device: d.device.as_str().to_string(),
                patient: d.patient.as_ref().map(|p| p.as_str().to_string()),
                reason: d.reason.code().to_string(),
                metric: d.metric.as_deref().map(str::to_string),
                detail: d.detail.clone(),
                raw: d.raw.clone(),
                time_ns: d.time_ns,
                seq: d.seq,
                ordinal,
            });
        }
    }

    /// The rows of a writer's buffered intervals (what its flush writes to
    /// the embedded store), for the engine to send to QuestDB as well.
    pub fn from_writer<S: Serialize>(writer: &crate::ShardWriter<S>) -> Batch {
        let mut batch = Batch::default();
        let mut dead = Vec::new();
        writer.visit_rows(|r| batch.push_reading(&r), |d| dead.push(d));
        batch.extend_dead_letters(dead);
        batch
    }

    pub fn readings(&self) -> usize {
        self.readings.len()
    }

    pub fn alerts(&self) -> usize {
        self.alerts.len()
    }

    pub fn dead_letters(&self) -> usize {
        self.dead_letters.len()
    }

    /// Rows of all tables.
    pub fn rows(&self) -> usize {
        self.readings.len() + self.dead_letters.len() + self.alerts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Moves `other`'s rows into this batch.
    pub fn append(&mut self, other: Batch) {
        if self.is_empty() && self.names.names.is_empty() {
            *self = other;
            return;
        }
        let map: Vec<u32> = other.names.names.iter().map(|n| self.intern(n)).collect();
        let remap = |i: u32| if i == NONE { NONE } else { map[i as usize] };
        self.readings.extend(
            other
                .readings
                .into_iter()
                .map(|Reading(t, p, d, m, v, s, q, r)| {
                    Reading(t, remap(p), remap(d), m, v, s, q, r)
                }),
        );
        self.dead_letters.extend(other.dead_letters);
        self.alerts.extend(other.alerts);
    }

    /// Encodes rows `from..` (numbered across readings, dead letters, then
    /// alerts) into `buf` until it holds `max_rows` rows; returns where it
    /// stopped.
    pub fn encode(&self, buf: &mut Buffer, from: usize, max_rows: usize) -> questdb::Result<usize> {
        let (nr, nd) = (self.readings.len(), self.dead_letters.len());
        let mut i = from;
        while i < self.rows() && buf.row_count() < max_rows {
            if i < nr {
                self.encode_reading(buf, &self.readings[i])?;
            } else if i < nr + nd {
                encode_dead_letter(buf, &self.dead_letters[i - nr])?;
            } else {
                encode_alert(buf, &self.alerts[i - nr - nd])?;
            }
            i += 1;
        }
        Ok(i)
    }

    /// One reading: symbols first (ILP requires it), then fields, then the
    /// designated timestamp.
    fn encode_reading(&self, buf: &mut Buffer, r: &Reading) -> questdb::Result<()> {
        let &Reading(time_ns, patient, device, metric, value, seq, quality, received_ns) = r;
        buf.table(READINGS_TABLE)?;
        if patient != NONE {
            buf.symbol("patient_id", self.names.names[patient as usize].as_str())?;
        }
        buf.symbol("device_id", self.names.names[device as usize].as_str())?
            .symbol("metric", metric.name())?
            .symbol("unit", metric.canonical_unit().ucum())?
            .column_f64("value", value)?;
        if let Some(seq) = seq {
            buf.column_i64("seq", seq as i64)?;
        }
        buf.column_i64("quality", i64::from(quality))?
            .column_ts("received_at", TimestampNanos::new(received_ns))?
            .at(TimestampNanos::new(time_ns))
    }
}

fn encode_dead_letter(buf: &mut Buffer, d: &DeadLetterRow) -> questdb::Result<()> {
    buf.table(DEAD_LETTERS_TABLE)?
        .symbol("device_id", d.device.as_str())?;
    if let Some(p) = &d.patient {
        buf.symbol("patient_id", p.as_str())?;
    }
    buf.symbol("reason", d.reason.as_str())?;
    if let Some(m) = &d.metric {
        buf.symbol("metric", m.as_str())?;
    }
    buf.column_i64("ordinal", i64::from(d.ordinal))?
        .column_str("detail", d.detail.as_str())?
        .column_str("raw", d.raw.as_str())?;
    if let Some(t) = d.time_ns {
        buf.column_ts("reading_time", TimestampNanos::new(t))?;
    }
    if let Some(s) = d.seq {
        buf.column_i64("seq", s as i64)?;
    }
    buf.at(TimestampNanos::new(d.received_ns))
}

fn encode_alert(buf: &mut Buffer, a: &AlertRow) -> questdb::Result<()> {
    buf.table(ALERTS_TABLE)?;
    if let Some(p) = &a.patient {
        buf.symbol("patient_id", p.as_str())?;
    }
    if let Some(u) = &a.care_unit {
        buf.symbol("care_unit", u.as_str())?;
    }
    if let Some(b) = &a.bed {
        buf.symbol("bed", b.as_str())?;
    }
    if let Some(d) = &a.device {
        buf.symbol("device_id", d.as_str())?;
    }
    buf.symbol("rule", a.rule.as_str())?
        .symbol("priority", a.priority.as_str())?
        .symbol("event", a.event.as_str())?
        .symbol("state", a.state.as_str())?
        .symbol("alert_id", a.alert_id.as_str())?
        .column_i64("seq", i64::from(a.seq))?
        .column_str("base_priority", a.base_priority.as_str())?
        .column_str("subject", a.subject.as_str())?
        .column_str("subject_kind", a.subject_kind.as_str())?
        .column_str("description", a.description.as_str())?
        .column_bool("technical", a.technical)?
        .column_bool("condition", a.condition)?
        .column_ts("raised_at", TimestampNanos::new(a.raised_ns))?
        .column_ts("first_reading_at", TimestampNanos::new(a.first_reading_ns))?;
    if let Some(by) = &a.by {
        buf.column_str("by", by.as_str())?;
    }
    buf.at(TimestampNanos::new(a.at_ns))
}

/// What the sink did, for `/metrics` (the engine exports these).
#[derive(Debug, Default)]
pub struct SinkStats {
    pub readings_sent: AtomicU64,
    pub alerts_sent: AtomicU64,
    pub dead_letters_sent: AtomicU64,
    /// Requests the receiver accepted.
    pub batches_sent: AtomicU64,
    /// Failed requests (their rows went to the spool).
    pub send_errors: AtomicU64,
    /// Rows written to the spool, in total.
    pub rows_spooled: AtomicU64,
    /// Spooled rows the receiver has since accepted, in total.
    pub rows_drained: AtomicU64,
    /// Batches refused because the spool was full (kept upstream).
    pub spool_full: AtomicU64,
    pub spool_files: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub spool_rows: AtomicU64,
    /// Creation time (ms since the epoch) of the oldest spooled batch; 0
    /// when the spool is empty.
    pub spool_oldest_ms: AtomicU64,
    /// 1 while the receiver takes requests, 0 after a failure until one
    /// succeeds again.
    pub receiver_up: AtomicU64,
}

impl SinkStats {
    /// Age of the oldest spooled batch, seconds (0 when none).
    pub fn oldest_spooled_age_s(&self) -> f64 {
        match self.spool_oldest_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            t => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                now.saturating_sub(t) as f64 / 1000.0
            }
        }
    }
}

/// Where a submitted batch stands.
#[derive(Debug)]
enum State {
    Queued,
    /// Accepted by the receiver, or durable in the spool.
    Done,
    Failed(String),
}

struct Item {
    batch: Batch,
    state: Mutex<State>,
    changed: Condvar,
    queued_at: Instant,
    /// A submitter waits for this one: send at once.
    waited: bool,
}

impl Item {
    fn finish(&self, s: State) {
        let mut st = lock(&self.state);
        if matches!(*st, State::Queued) {
            *st = s;
            self.changed.notify_all();
        }
    }

    fn is_queued(&self) -> bool {
        matches!(*lock(&self.state), State::Queued)
    }
}

/// A submitted batch, to wait for.
pub struct Receipt {
    item: Option<Arc<Item>>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<SinkStats>,
    spool_after: Duration,
}

impl Receipt {
    /// Waits until the rows were accepted by the receiver or spooled. A
    /// receiver slower than `spool_after` has its rows spooled here (the
    /// request still in flight may deliver them too: the receiver
    /// deduplicates). Fails only when the spool is full.
    pub fn wait(self) -> Result<(), SinkError> {
        let Some(item) = self.item else {
            return Ok(());
        };
        let deadline = item.queued_at + self.spool_after;
        let mut st = lock(&item.state);
        loop {
            match &*st {
                State::Done => return Ok(()),
                State::Failed(e) => return Err(SinkError::NotStored(e.clone())),
                State::Queued => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = item
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if matches!(*st, State::Queued) {
            let pushed = lock(&self.spool).push(&item.batch);
            match pushed {
                Ok(()) => *st = State::Done,
                Err(e) => {
                    self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        }
        match &*st {
            State::Failed(e) => Err(SinkError::NotStored(e.clone())),
            _ => Ok(()),
        }
    }
}

enum Msg {
    Item(Arc<Item>),
    Stop,
}

/// A handle to submit batches with; cheap to clone, one per flush thread.
#[derive(Clone)]
pub struct SinkHandle {
    tx: crossbeam_channel::Sender<Msg>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<SinkStats>,
    spool_after: Duration,
    max_batch_age: Duration,
}

impl SinkHandle {
    /// Hands `batch` over; wait on the receipt before treating its rows as
    /// stored. Never blocks: when the queue is full, the batch is spooled
    /// here (or refused if the spool is full too).
    pub fn submit(&self, batch: Batch) -> Result<Receipt, SinkError> {
        self.enqueue(batch, true)
    }

    /// Hands `batch` over to go out within `max_batch_age`, with whatever
    /// else comes (alert transitions); its receipt completes after that.
    pub fn submit_later(&self, batch: Batch) -> Result<Receipt, SinkError> {
        self.enqueue(batch, false)
    }

    fn enqueue(&self, batch: Batch, waited: bool) -> Result<Receipt, SinkError> {
        let receipt = |item| Receipt {
            item,
            spool: self.spool.clone(),
            stats: self.stats.clone(),
            spool_after: self.spool_after
                + if waited {
                    Duration::ZERO
                } else {
                    self.max_batch_age
                },
        };
        if batch.is_empty() {
            return Ok(receipt(None));
        }
        let item = Arc::new(Item {
            batch,
            state: Mutex::new(State::Queued),
            changed: Condvar::new(),
            queued_at: Instant::now(),
            waited,
        });
        match self.tx.try_send(Msg::Item(item.clone())) {
            Ok(()) => Ok(receipt(Some(item))),
            Err(_) => {
                // Queue full, or the sender thread is gone: to disk.
                let pushed = lock(&self.spool).push(&item.batch);
                if let Err(e) = pushed {
                    self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                    return Err(e.into());
                }
                Ok(receipt(None))
            }
        }
    }

    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.stats
    }
}

/// The sink: its sender thread and the handle to feed it.
pub struct QuestDbSink {
    handle: SinkHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QuestDbSink {
    /// Opens the spool (whatever a previous run left there drains first)
    /// and starts the sender thread. Does not connect: a receiver that is
    /// down at start is retried like one that goes down later.
    pub fn start(config: SinkConfig, stats: Arc<SinkStats>) -> Result<QuestDbSink, SinkError> {
        let transport = check_conf(&config.conf)?;
        let spool = Arc::new(Mutex::new(Spool::open(
            &config.spool_dir,
            config.spool_max_bytes,
            stats.clone(),
        )?));
        stats.receiver_up.store(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(config.queue_batches.max(1));
        let handle = SinkHandle {
            tx,
            spool: spool.clone(),
            stats: stats.clone(),
            spool_after: config.spool_after,
            max_batch_age: config.max_batch_age,
        };
        let mut worker = SenderThread {
            config,
            transport,
            spool,
            stats,
            sender: None,
            buf: None,
            pending: Vec::new(),
            down_until: None,
            backoff: MIN_BACKOFF,
            recent: VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("questdb-sink".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| SinkError::Conf(format!("starting the sender thread: {e}")))?;
        Ok(QuestDbSink {
            handle,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> SinkHandle {
        self.handle.clone()
    }

    pub fn stats(&self) -> &Arc<SinkStats> {
        &self.handle.stats
    }

    /// Sends what is queued (or spools it) and stops the sender thread;
    /// the spool keeps what the receiver did not take, for the next start.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.handle.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for QuestDbSink {
    fn drop(&mut self) {
        self.stop();
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Spool files sent per turn before new batches get their turn again.
const DRAIN_PER_TURN: usize = 4;

struct SenderThread {
    config: SinkConfig,
    transport: Transport,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<SinkStats>,
    sender: Option<Sender>,
    buf: Option<Buffer>,
    pending: Vec<Arc<Item>>,
    /// While the receiver is down: when to try it again.
    down_until: Option<Instant>,
    backoff: Duration,
    /// TCP: batches sent lately, sent again if the connection fails.
    recent: VecDeque<(Instant, Batch)>,
}

impl SenderThread {
    fn run(&mut self, rx: crossbeam_channel::Receiver<Msg>) {
        let mut stopping = false;
        loop {
            let timeout = self.next_wake();
            match rx.recv_timeout(timeout) {
                Ok(Msg::Item(i)) => self.pending.push(i),
                Ok(Msg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    stopping = true
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Item(i) => self.pending.push(i),
                    Msg::Stop => stopping = true,
                }
            }
            // Submitters that gave up waiting spooled their own rows.
            self.pending.retain(|i| i.is_queued());
            if stopping || self.pending_due() {
                self.send_pending();
            }
            if !stopping {
                self.drain_spool();
            } else if self.pending.is_empty() {
                // What the spool holds waits for the next start.
                break;
            }
        }
    }

    fn pending_rows(&self) -> usize {
        self.pending.iter().map(|i| i.batch.rows()).sum()
    }

    fn pending_due(&self) -> bool {
        !self.pending.is_empty()
            && (self.pending.iter().any(|i| i.waited)
                || self.pending_rows() >= self.config.batch_rows
                || self
                    .pending
                    .iter()
                    .any(|i| i.queued_at.elapsed() >= self.config.max_batch_age))
    }

    fn next_wake(&self) -> Duration {
        let mut wake = Duration::from_secs(1);
        if let Some(oldest) = self.pending.iter().map(|i| i.queued_at).min() {
            wake = wake.min(
                (oldest + self.config.max_batch_age).saturating_duration_since(Instant::now()),
            );
        }
        if !lock(&self.spool).is_empty() {
            let retry = self.down_until.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            wake = wake.min(retry);
        }
        wake
    }

    fn is_down(&self) -> bool {
        self.down_until.is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&mut self, why: &str) {
        self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
        if self.stats.receiver_up.swap(0, Ordering::Relaxed) == 1 {
            tracing::warn!(
                "QuestDB sink: the receiver failed, rows go to the spool until it is back: {why}"
            );
        }
        self.down_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        // A failed connection is not used again.
        self.sender = None;
        self.buf = None;
        // TCP sends without answers: what went out lately may be lost.
        if self.transport == Transport::Tcp && !self.recent.is_empty() {
            let mut again = Batch::default();
            for (_, b) in self.recent.drain(..) {
                again.append(b);
            }
            if let Err(e) = lock(&self.spool).push(&again) {
                tracing::error!(
                    "QuestDB sink: could not spool the last {} rows sent over TCP to send them again: {e}",
                    again.rows()
                );
            }
        }
    }

    fn mark_up(&mut self) {
        if self.stats.receiver_up.swap(1, Ordering::Relaxed) == 0 {
            tracing::info!("QuestDB sink: the receiver is back");
        }
        self.down_until = None;
        self.backoff = MIN_BACKOFF;
    }

    /// Sends the pending batches as one (in requests of `batch_rows`), or
    /// spools them if the receiver is down or the send fails.
    fn send_pending(&mut self) {
        let items = std::mem::take(&mut self.pending);
        if items.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        for i in &items {
            batch.append(i.batch.clone());
        }
        let result = if self.is_down() {
            Err("the receiver is down".to_string())
        } else {
            self.send(&batch)
        };
        match result {
            Ok(()) => {
                self.mark_up();
                for i in &items {
                    i.finish(State::Done);
                }
                self.remember(batch);
            }
            Err(e) => {
                if !self.is_down() {
                    self.mark_down(&e);
                }
                // Only the rows no submitter spooled in the meantime.
                let mut left = Batch::default();
                let waiting: Vec<&Arc<Item>> = items.iter().filter(|i| i.is_queued()).collect();
                for i in &waiting {
                    left.append(i.batch.clone());
                }
                if left.is_empty() {
                    return;
                }
                let pushed = lock(&self.spool).push(&left);
                match pushed {
                    Ok(()) => waiting.iter().for_each(|i| i.finish(State::Done)),
                    Err(e) => {
                        self.stats.spool_full.fetch_add(1, Ordering::Relaxed);
                        let msg = e.to_string();
                        if waiting.iter().any(|i| !i.waited) {
                            tracing::error!("QuestDB sink: alert transitions not stored: {msg}");
                        }
                        waiting
                            .iter()
                            .for_each(|i| i.finish(State::Failed(msg.clone())));
                    }
                }
            }
        }
    }

    /// Sends the oldest spooled batches while the receiver takes them.
    fn drain_spool(&mut self) {
        for _ in 0..DRAIN_PER_TURN {
            if self.is_down() {
                return;
            }
            let next = lock(&self.spool).peek();
            let batch = match next {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    let aside = lock(&self.spool).quarantine();
                    tracing::error!(
                        "QuestDB sink: an unreadable spool file was moved aside ({aside:?}): {e}"
                    );
                    continue;
                }
            };
            match self.send(&batch) {
                Ok(()) => {
                    self.mark_up();
                    if let Err(e) = lock(&self.spool).pop() {
                        tracing::error!("QuestDB sink: {e}");
                        return;
                    }
                    self.stats
                        .rows_drained
                        .fetch_add(batch.rows() as u64, Ordering::Relaxed);
                    self.remember(batch);
                }
                Err(e) => {
                    self.mark_down(&e);
                    return;
                }
            }
        }
    }

    fn remember(&mut self, batch: Batch) {
        if self.transport != Transport::Tcp {
            return;
        }
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.config.tcp_replay)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, batch));
    }

    /// Sends one batch in requests of at most `batch_rows` rows. An error
    /// part-way leaves the earlier requests delivered: the whole batch is
    /// sent again later, and the receiver deduplicates.
    fn send(&mut self, batch: &Batch) -> Result<(), String> {
        let conf = self.config.conf.clone();
        let fail = |e: questdb::Error| scrub(e.msg(), &conf);
        if self.sender.is_none() {
            let sender = Sender::from_conf(&conf).map_err(fail)?;
            self.buf = Some(sender.new_buffer());
            self.sender = Some(sender);
        }
        let (sender, buf) = (
            self.sender.as_mut().expect("connected"),
            self.buf.as_mut().expect("with a buffer"),
        );
        let mut at = 0;
        while at < batch.rows() {
            buf.clear();
            at = batch
                .encode(buf, at, self.config.batch_rows.max(1))
                .map_err(fail)?;
            sender.flush_and_keep(buf).map_err(fail)?;
            self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
        }
        buf.clear();
        self.stats
            .readings_sent
            .fetch_add(batch.readings() as u64, Ordering::Relaxed);
        self.stats
            .dead_letters_sent
            .fetch_add(batch.dead_letters() as u64, Ordering::Relaxed);
        self.stats
            .alerts_sent
            .fetch_add(batch.alerts() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A buffer of the protocol version a configuration string asks for (1
/// when it names none), for encoding without a connection (benchmarks).
pub fn buffer_for(conf: &str) -> Buffer {
    let version = if conf.contains("protocol_version=3") {
        ProtocolVersion::V3
    } else if conf.contains("protocol_version=2") {
        ProtocolVersion::V2
    } else {
        ProtocolVersion::V1
    };
    Buffer::new(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(i: i64) -> ReadingRow<'static> {
        ReadingRow {
            time_ns: 1_764_000_000_000_000_000 + i * 1_000_000,
            patient: Some("p-1"),
            device: "mon-1",
            metric: Metric::Hr,
            value: 72.5,
            seq: Some(i as u64),
            quality: 0,
            received_ns: 1_764_000_000_500_000_000,
        }
    }

    #[test]
    fn readings_encode_as_ilp_with_symbols_fields_and_designated_time() {
        let mut b = Batch::default();
        b.push_reading(&reading(0));
        let mut buf = Buffer::new(ProtocolVersion::V1);
        assert_eq!(b.encode(&mut buf, 0, 10).unwrap(), 1);
        let line = std::str::from_utf8(buf.as_bytes()).unwrap();
        assert_eq!(
            line,
            "readings,patient_id=p-1,device_id=mon-1,metric=hr,unit=/min value=72.5,seq=0i,quality=0i,received_at=1764000000500000t 1764000000000000000\n"
        );
    }

    #[test]
    fn encoding_stops_at_the_request_size_and_resumes() {
        let mut b = Batch::default();
        for i in 0..5 {
            b.push_reading(&reading(i));
        }
        b.push_alert(AlertRow {
            at_ns: 1,
            alert_id: "a-1".into(),
            seq: 1,
            event: "raised".into(),
            state: "active".into(),
            priority: "high".into(),
            base_priority: "high".into(),
            rule: "hr-high".into(),
            subject: "p-1".into(),
            subject_kind: "patient".into(),
            patient: Some("p-1".into()),
            device: None,
            care_unit: Some("icu".into()),
            bed: None,
            description: "HR > 120".into(),
            technical: false,
            condition: true,
            raised_ns: 1,
            first_reading_ns: 1,
            by: None,
        });
        let mut buf = Buffer::new(ProtocolVersion::V1);
        let mut at = 0;
        let mut requests = 0;
        while at < b.rows() {
            buf.clear();
            at = b.encode(&mut buf, at, 4).unwrap();
            requests += 1;
        }
        assert_eq!((at, requests), (6, 2));
        assert!(
            std::str::from_utf8(buf.as_bytes())
                .unwrap()
                .contains("alerts,patient_id=p-1")
        );
    }

    #[test]
    fn merged_batches_keep_their_ids() {
        let mut a = Batch::default();
        a.push_reading(&reading(0));
        let mut b = Batch::default();
        b.push_reading(&ReadingRow {
            device: "mon-2",
            patient: None,
            ..reading(1)
        });
        a.append(b);
        let mut buf = Buffer::new(ProtocolVersion::V1);
        a.encode(&mut buf, 0, 10).unwrap();
        let text = std::str::from_utf8(buf.as_bytes()).unwrap();
        assert!(
            text.contains("readings,device_id=mon-2,metric=hr"),
            "{text}"
        );
        let back: Batch = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn secrets_never_show() {
        let conf = "https::addr=db:9000;username=admin;password=s3cr;;et;token=abc;";
        assert_eq!(
            redact(conf),
            "https::addr=db:9000;username=admin;password=***;token=***;"
        );
        let err =
            check_conf("http::addr=db:9000;username=u;password=hunter2;request_timeout=soon;")
                .map(|_| ())
                .unwrap_err()
                .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(matches!(
            check_conf("udp::addr=x:1;"),
            Err(SinkError::Conf(_))
        ));
        assert_eq!(
            check_conf("tcp::addr=localhost:9009;").unwrap(),
            Transport::Tcp
        );
        let debug = format!("{:?}", SinkConfig::new(conf, "/tmp/s"));
        assert!(!debug.contains("s3cr") && !debug.contains("abc"), "{debug}");
    }
}
