//! The write-ahead log: a publish is durable once it is here.
//!
//! One writer thread per process appends publishes to segment files in
//! `wal/`: it takes every request waiting in its queue, writes them with
//! one `write`, and hands the envelopes to the dataflow at once. A syncer
//! thread makes them durable with group commit: it takes every batch
//! written since its last `fdatasync`, calls `fdatasync` once, and only
//! then acknowledges their QoS 1 publishes, so the PUBACK follows
//! durability. While one fsync runs, the next batches are written and
//! gather, so one fsync covers many publishes.
//!
//! The dataflow, and so the alert rules, see a publish once it is written,
//! without waiting for the disk: an `fdatasync` mostly takes well under a
//! millisecond (`wardflow_wal_fsync_seconds`) but now and then tens of
//! milliseconds, and alerts do not wait for those. A publish seen but
//! never made durable (a crash, or a failed fsync, before the syncer got
//! to it) was never acknowledged; the device sends it again. Whatever the
//! dataflow stored of it stays stored (recovery may drop it with the rest
//! of an interval after the checkpoint, and the resend brings it back), so
//! nothing acknowledged is lost either way.
//!
//! Each written batch is stamped with an epoch (milliseconds since the
//! epoch, monotone even if the clock steps back); that epoch is the publish's
//! dataflow time. The writer also advances every dataflow shard to the
//! current epoch when idle, so time moves on without traffic.
//!
//! Record layout (all integers little-endian):
//!
//! ```text
//! u32 body length | u32 CRC-32 (IEEE) of body | body:
//!   u64 epoch | i64 received ns | u8 device id length | device id |
//!   u8 patient id length (0 = none) | patient id | payload (the rest)
//! ```
//!
//! Segments are named by the log position (LSN, a byte offset over all
//! segments) of their first record. A segment ends where a zero record
//! header begins (or at the end of the file), and the LSNs between its end
//! and the next segment's name are unused.
//!
//! Segments are prepared ahead of the writer: once the current segment is
//! half full, a helper thread creates the next one at its full size, filled
//! with zeros and fsynced, with its directory entry fsynced too. Writing
//! over blocks that are already allocated and written lets `fdatasync`
//! flush data alone, with no file-system journal commit for a grown file
//! size; a journal commit waits for every other file's data in it (the
//! store's Parquet files, on ext4 in its default ordered mode), and that
//! was the tail of a publish's latency under load. For the same reason
//! segments are deleted on the helper thread, and starting a segment costs
//! the writer one fsync of the segment it leaves (so a later segment never
//! holds records while an earlier one may still lose some) and no other
//! unless no prepared one was ready.
//!
//! On start the log is scanned: a torn record at the end of the last
//! segment (a crash mid-write; never acknowledged) is overwritten with
//! zeros; damage anywhere else stops the start with the file and offset,
//! since acknowledged data would be at stake. Records at or after the
//! storage checkpoint's epoch are replayed into the dataflow, and whole
//! segments below the checkpoint are deleted as it advances.

use std::fs::{self, File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ntex_bytes::Bytes;
use wardflow_model::{DeviceId, PatientId, TimestampNs};

use crate::budget::{MemoryBudget, Permit};
use crate::envelope::{Envelope, Payload};
use crate::metrics::IngestMetrics;
use crate::priority::AlertPathScheduling;

const RECORD_HEADER: usize = 8;
const SEGMENT_SUFFIX: &str = ".wal";

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "write-ahead log {path} is damaged at offset {offset} ({what}); it is not the last segment, so acknowledged readings may follow: refusing to start. Move the file aside to start without it."
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    #[error("the write-ahead log stopped after an I/O error; no publish is accepted")]
    Failed,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write-ahead log settings.
#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// Start a new segment past this size.
    pub segment_bytes: u64,
    /// How often shards are advanced when no publish arrives.
    pub idle_tick: Duration,
    /// Most payload bytes in one group commit.
    pub max_batch_bytes: usize,
    /// New commits get epochs at or after this one (besides the replay
    /// point and every logged epoch): the audit ledger's sealed ranges.
    pub min_epoch: u64,
    /// Begin writing in a new segment rather than the last one found, so
    /// what was logged before the start is deleted once stored (encryption
    /// at rest turns this on: the log holds payloads in the clear).
    pub fresh_segment_on_start: bool,
    /// How the writer thread, which is on the way of every publish to its
    /// alerts, is scheduled.
    pub scheduling: AlertPathScheduling,
}

impl WalConfig {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            segment_bytes: 64 << 20,
            idle_tick: Duration::from_millis(20),
            max_batch_bytes: 8 << 20,
            min_epoch: 0,
            fresh_segment_on_start: false,
            scheduling: AlertPathScheduling::default(),
        }
    }
}

/// What the dataflow's input shards receive.
#[derive(Debug)]
pub enum InputEvent {
    Data(Envelope),
    /// No more data before this epoch will follow.
    Advance(u64),
}

/// Wakes a parked dataflow worker when its shard has input.
#[derive(Default)]
pub struct Wake(OnceLock<Thread>);

impl Wake {
    /// Called by the worker thread once, before it parks for the first time.
    pub fn register_current(&self) {
        let _ = self.0.set(std::thread::current());
    }

    pub fn wake(&self) {
        if let Some(t) = self.0.get() {
            t.unpark();
        }
    }
}

/// The receiving end of one shard.
pub struct ShardSource {
    pub rx: Receiver<InputEvent>,
    pub wake: Arc<Wake>,
}

/// The sending ends of all shards of a process.
#[derive(Clone)]
pub struct Shards {
    senders: Vec<Sender<InputEvent>>,
    wakes: Vec<Arc<Wake>>,
}

impl Shards {
    /// Channels for `n` shards (one per local dataflow worker).
    pub fn new(n: usize) -> (Shards, Vec<ShardSource>) {
        assert!(n > 0);
        let mut senders = Vec::new();
        let mut wakes = Vec::new();
        let mut sources = Vec::new();
        for _ in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(Wake::default());
            senders.push(tx);
            wakes.push(wake.clone());
            sources.push(ShardSource { rx, wake });
        }
        (Shards { senders, wakes }, sources)
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// The shard a publish goes to: the worker the dataflow exchanges it to
    /// (by patient, else device), so in one process it stays on its worker.
    /// A hop between workers would wait for the receiving worker to wake
    /// (up to its 20 ms park), which alert latency cannot afford.
    pub fn shard_of(&self, env: &Envelope) -> usize {
        (env.route() % self.senders.len() as u64) as usize
    }

    fn send(&self, env: Envelope) {
        let s = self.shard_of(&env);
        // A closed shard means the dataflow is shutting down.
        let _ = self.senders[s].send(InputEvent::Data(env));
    }

    fn advance_all(&self, epoch: u64) {
        for (tx, wake) in self.senders.iter().zip(&self.wakes) {
            let _ = tx.send(InputEvent::Advance(epoch));
            wake.wake();
        }
    }

    fn wake_all(&self) {
        for w in &self.wakes {
            w.wake();
        }
    }
}

/// One publish to make durable.
pub struct WalRequest {
    pub received_ns: TimestampNs,
    pub device: DeviceId,
    pub patient: Option<PatientId>,
    pub payload: Bytes,
    pub permit: Permit,
    /// Completed once durable, for QoS 1.
    pub done: Option<tokio::sync::oneshot::Sender<Result<(), ()>>>,
}

struct WalShared {
    failed: AtomicBool,
    /// Asks the writer to start a new segment.
    roll: AtomicBool,
    truncate_below: AtomicU64,
    durable_lsn: AtomicU64,
    epoch: AtomicU64,
}

/// A cheap, cloneable handle for submitting publishes.
#[derive(Clone)]
pub struct WalHandle {
    tx: Sender<WalRequest>,
    shared: Arc<WalShared>,
}

impl WalHandle {
    /// Queues a publish. The caller holds its memory permit in the request.
    pub fn submit(&self, req: WalRequest) -> Result<(), WalError> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(WalError::Failed);
        }
        self.tx.send(req).map_err(|_| WalError::Failed)
    }

    /// A handle for watching and trimming the log that does not keep it open.
    pub fn control(&self) -> WalControl {
        WalControl {
            shared: self.shared.clone(),
        }
    }
}

/// Watches and trims the log; unlike [`WalHandle`], holding one does not
/// keep the writer running.
#[derive(Clone)]
pub struct WalControl {
    shared: Arc<WalShared>,
}

impl WalControl {
    /// Starts a new segment, so the current one is deleted once the
    /// checkpoint passes it: after a patient's data key is destroyed, the
    /// publishes logged before are gone from the log within a flush or two.
    pub fn roll(&self) {
        self.shared.roll.store(true, Ordering::Relaxed);
    }

    /// Allows segments whose records all have epochs below `epoch` to be deleted.
    pub fn truncate_below(&self, epoch: u64) {
        self.shared
            .truncate_below
            .fetch_max(epoch, Ordering::Relaxed);
    }

    pub fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// The LSN up to which the log is durable.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable_lsn.load(Ordering::Relaxed)
    }

    /// The epoch of the latest commit or idle tick.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Relaxed)
    }
}

/// The running log: a handle and the writer thread.
pub struct Wal {
    pub handle: WalHandle,
    thread: Option<JoinHandle<()>>,
}

impl Wal {
    /// Opens the log in `config.dir`, replays every record with an epoch at
    /// or after `replay_from` into `shards` (on the writer thread, before it
    /// accepts new publishes), then serves requests.
    pub fn start(
        config: WalConfig,
        replay_from: u64,
        shards: Shards,
        budget: Arc<MemoryBudget>,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Wal, WalError> {
        fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        let segments = recover(&config.dir)?;
        let config_dir = config.dir.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        // New epochs never fall below the checkpoint, even if the clock
        // stepped back across the restart: recovery replays only from it.
        let last_epoch = segments
            .iter()
            .map(|s| s.max_epoch)
            .max()
            .unwrap_or(0)
            .max(replay_from)
            .max(config.min_epoch);
        let next_lsn = segments.last().map_or(0, |s| s.base_lsn + s.len);
        let shared = Arc::new(WalShared {
            failed: AtomicBool::new(false),
            roll: AtomicBool::new(config.fresh_segment_on_start),
            truncate_below: AtomicU64::new(0),
            durable_lsn: AtomicU64::new(next_lsn),
            epoch: AtomicU64::new(last_epoch),
        });
        let syncer = start_syncer(shared.clone(), metrics.clone())?;
        let mut writer = Writer {
            config,
            rx,
            shards,
            shared: shared.clone(),
            metrics,
            budget,
            segments,
            current: None,
            syncer,
            next_lsn,
            last_epoch,
            buf: Vec::with_capacity(1 << 20),
            offsets: Vec::new(),
            truncated_below: 0,
            helper: Helper::start(config_dir)?,
            preparing: None,
            prepared: None,
        };
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                writer.metrics.enter_alert_path(writer.config.scheduling);
                if let Err(e) = writer.replay(replay_from) {
                    tracing::error!("write-ahead log replay failed: {e}");
                    writer.shared.failed.store(true, Ordering::SeqCst);
                    return;
                }
                writer.run();
                writer.syncer.finish();
                writer.helper.jobs.finish();
            })
            .map_err(|e| io_err(Path::new("wal-writer thread"))(e))?;
        Ok(Wal {
            handle: WalHandle { tx, shared },
            thread: Some(thread),
        })
    }

    /// Stops accepting, finishes the queue, and waits for the writer. Every
    /// clone of the handle must have been dropped first.
    pub fn shutdown(self) {
        let Wal { handle, thread } = self;
        drop(handle);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone)]
struct Segment {
    base_lsn: u64,
    path: PathBuf,
    len: u64,
    max_epoch: u64,
}

fn segment_path(dir: &Path, base_lsn: u64) -> PathBuf {
    dir.join(format!("{base_lsn:020}{SEGMENT_SUFFIX}"))
}

/// A record read back from disk.
struct RawRecord<'a> {
    epoch: u64,
    received_ns: i64,
    device: &'a str,
    patient: &'a str,
    payload_at: usize,
    payload_len: usize,
}

/// Parses the record at the start of `b`. `Ok(None)` at a clean end;
/// `Err` names what is wrong with a damaged or torn record.
fn parse_record(b: &[u8]) -> Result<Option<(RawRecord<'_>, usize)>, &'static str> {
    if b.is_empty() {
        return Ok(None);
    }
    if b.len() < RECORD_HEADER {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        return Err("short record header");
    }
    let len = u32::from_le_bytes(b[0..4].try_into().expect("4")) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4"));
    if len == 0 && crc == 0 {
        // The zeros of a prepared segment: no record has an empty body.
        return Ok(None);
    }
    let Some(body) = b.get(RECORD_HEADER..RECORD_HEADER + len) else {
        return Err("record runs past the end of the file");
    };
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    let bad = "record body is inconsistent";
    if body.len() < 18 {
        return Err(bad);
    }
    let epoch = u64::from_le_bytes(body[0..8].try_into().expect("8"));
    let received_ns = i64::from_le_bytes(body[8..16].try_into().expect("8"));
    let dl = body[16] as usize;
    let device = body.get(17..17 + dl).ok_or(bad)?;
    let pl = *body.get(17 + dl).ok_or(bad)? as usize;
    let patient = body.get(18 + dl..18 + dl + pl).ok_or(bad)?;
    let payload_at = RECORD_HEADER + 18 + dl + pl;
    let device = std::str::from_utf8(device).map_err(|_| bad)?;
    let patient = std::str::from_utf8(patient).map_err(|_| bad)?;
    Ok(Some((
        RawRecord {
            epoch,
            received_ns,
            device,
            patient,
            payload_at,
            payload_len: RECORD_HEADER + len - payload_at,
        },
        RECORD_HEADER + len,
    )))
}

fn encode_record(buf: &mut Vec<u8>, epoch: u64, req: &WalRequest) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER]);
    buf.extend_from_slice(&epoch.to_le_bytes());
    buf.extend_from_slice(&req.received_ns.to_le_bytes());
    let d = req.device.as_str().as_bytes();
    buf.push(d.len() as u8);
    buf.extend_from_slice(d);
    let p = req
        .patient
        .as_ref()
        .map_or(&b""[..], |p| p.as_str().as_bytes());
    buf.push(p.len() as u8);
    buf.extend_from_slice(p);
    buf.extend_from_slice(&req.payload);
    let body = &buf[start + RECORD_HEADER..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn read_file(path: &Path) -> Result<Vec<u8>, WalError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// Scans the segments in `dir`, cutting a torn tail off the last one.
fn recover(dir: &Path) -> Result<Vec<Segment>, WalError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        bases.push(base);
    }
    bases.sort_unstable();
    let mut segments = Vec::new();
    let count = bases.len();
    for (i, base) in bases.into_iter().enumerate() {
        let path = segment_path(dir, base);
        let bytes = read_file(&path)?;
        let mut at = 0usize;
        let mut max_epoch = 0;
        let last = i + 1 == count;
        let damage = loop {
            match parse_record(&bytes[at..]) {
                // The records end; only zeros may follow.
                Ok(None) => match bytes[at..].iter().position(|&b| b != 0) {
                    None => break None,
                    Some(_) => break Some("data after the end of the records"),
                },
                Ok(Some((rec, used))) => {
                    max_epoch = max_epoch.max(rec.epoch);
                    at += used;
                }
                Err(what) => break Some(what),
            }
        };
        if let Some(what) = damage {
            if !last {
                return Err(WalError::Corrupt {
                    path,
                    offset: at as u64,
                    what,
                });
            }
            tracing::warn!(
                "write-ahead log {}: overwriting a torn record at offset {at} ({what}) with zeros; it was never acknowledged",
                path.display()
            );
            let end = bytes.iter().rposition(|&b| b != 0).map_or(at, |p| p + 1);
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.write_all_at(&vec![0u8; end - at], at as u64)
                .map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
        }
        segments.push(Segment {
            base_lsn: base,
            path,
            len: at as u64,
            max_epoch,
        });
    }
    Ok(segments)
}

struct Writer {
    config: WalConfig,
    rx: Receiver<WalRequest>,
    shards: Shards,
    shared: Arc<WalShared>,
    metrics: Arc<IngestMetrics>,
    budget: Arc<MemoryBudget>,
    segments: Vec<Segment>,
    current: Option<Arc<OpenSegment>>,
    /// Makes written batches durable and acknowledges them.
    syncer: JobThread<SyncJob>,
    next_lsn: u64,
    last_epoch: u64,
    buf: Vec<u8>,
    /// Each record's offset in `buf`.
    offsets: Vec<u64>,
    truncated_below: u64,
    helper: Helper,
    /// The base LSN of the segment being prepared, and of a prepared one.
    preparing: Option<u64>,
    prepared: Option<u64>,
}

fn now_ms() -> u64 {
    (wardflow_model::now_ns() / 1_000_000).max(0) as u64
}

impl Writer {
    /// Replays records with epoch >= `from` into the shards.
    fn replay(&mut self, from: u64) -> Result<(), WalError> {
        let started = Instant::now();
        let mut replayed = 0u64;
        for seg in self.segments.clone() {
            if seg.max_epoch < from || seg.len == 0 {
                continue;
            }
            let mut bytes = read_file(&seg.path)?;
            bytes.truncate(seg.len as usize);
            let whole = Bytes::from(bytes);
            let mut at = 0usize;
            while let Ok(Some((rec, used))) = parse_record(&whole[at..]) {
                if rec.epoch >= from {
                    let (Ok(device), patient) = (
                        DeviceId::new(rec.device),
                        (!rec.patient.is_empty()).then(|| PatientId::new(rec.patient)),
                    ) else {
                        at += used;
                        continue;
                    };
                    let payload =
                        whole.slice(at + rec.payload_at..at + rec.payload_at + rec.payload_len);
                    let permit = self.budget.charge_blocking(crate::budget::weight(&payload));
                    self.shards.send(Envelope {
                        epoch: rec.epoch,
                        lsn: seg.base_lsn + at as u64,
                        received_ns: rec.received_ns,
                        device,
                        patient: patient.and_then(Result::ok),
                        payload: Payload(payload),
                        permit: Some(Arc::new(permit)),
                    });
                    replayed += 1;
                    if replayed.is_multiple_of(1024) {
                        self.shards.wake_all();
                    }
                }
                at += used;
            }
        }
        self.shards.advance_all(self.last_epoch);
        self.metrics.wal_replayed.inc_by(replayed);
        if replayed > 0 {
            tracing::info!(
                publishes = replayed,
                from_epoch = from,
                "replayed the write-ahead log in {:?}",
                started.elapsed()
            );
        }
        Ok(())
    }

    fn next_epoch(&mut self) -> u64 {
        self.last_epoch = self.last_epoch.max(now_ms());
        self.shared.epoch.store(self.last_epoch, Ordering::Relaxed);
        self.last_epoch
    }

    fn run(&mut self) {
        let mut batch: Vec<WalRequest> = Vec::new();
        loop {
            if self.shared.roll.swap(false, Ordering::Relaxed)
                && self.segments.last().is_some_and(|s| s.len > 0)
                && let Err(e) = self.start_segment()
            {
                tracing::warn!("could not start a new write-ahead log segment: {e}");
            }
            self.maybe_truncate();
            self.poll_helper();
            let first = match self.rx.recv_timeout(self.config.idle_tick) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    let e = self.next_epoch();
                    self.shards.advance_all(e);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut bytes = first.payload.len();
            batch.push(first);
            while bytes < self.config.max_batch_bytes {
                match self.rx.try_recv() {
                    Ok(r) => {
                        bytes += r.payload.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let epoch = self.next_epoch();
            match self.write(epoch, &batch) {
                Ok(lsns) => {
                    let mut acks = Vec::new();
                    for (req, lsn) in batch.drain(..).zip(lsns) {
                        acks.extend(req.done);
                        self.shards.send(Envelope {
                            epoch,
                            lsn,
                            received_ns: req.received_ns,
                            device: req.device,
                            patient: req.patient,
                            payload: Payload(req.payload),
                            permit: Some(Arc::new(req.permit)),
                        });
                    }
                    self.shards.advance_all(epoch);
                    let segment = self.current.clone().expect("written above");
                    self.syncer.send(SyncJob {
                        segment,
                        end_lsn: self.next_lsn,
                        acks,
                    });
                    if self.shared.failed.load(Ordering::SeqCst) {
                        // The syncer's fsync failed: it said why.
                        self.refuse_the_rest(&mut batch);
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("{e}; the write-ahead log stops accepting publishes");
                    self.shared.failed.store(true, Ordering::SeqCst);
                    self.metrics.wal_failed.set(1);
                    self.refuse_the_rest(&mut batch);
                    break;
                }
            }
        }
        if let Some(s) = self.current.take() {
            let _ = s.file.sync_all();
        }
    }

    /// After a failure: refuses `batch` and everything still queued (submit()
    /// refuses the rest), until every handle is dropped.
    fn refuse_the_rest(&mut self, batch: &mut Vec<WalRequest>) {
        for req in batch.drain(..) {
            if let Some(done) = req.done {
                let _ = done.send(Err(()));
            }
        }
        while let Ok(req) = self.rx.recv() {
            if let Some(done) = req.done {
                let _ = done.send(Err(()));
            }
        }
    }

    /// Writes one batch (the syncer makes it durable); returns each
    /// request's LSN.
    fn write(&mut self, epoch: u64, batch: &[WalRequest]) -> Result<Vec<u64>, WalError> {
        self.buf.clear();
        self.offsets.clear();
        for req in batch {
            self.offsets.push(self.buf.len() as u64);
            encode_record(&mut self.buf, epoch, req);
        }
        self.segment_for(self.buf.len() as u64)?;
        let seg = self.segments.last_mut().expect("a current segment");
        let file = &self.current.as_ref().expect("opened above").file;
        file.write_all_at(&self.buf, seg.len)
            .map_err(io_err(&seg.path))?;
        let start = seg.base_lsn + seg.len;
        let n = self.buf.len() as u64;
        seg.len += n;
        seg.max_epoch = seg.max_epoch.max(epoch);
        self.next_lsn = start + n;
        self.metrics.wal_bytes.inc_by(n);
        self.metrics.wal_records.inc_by(batch.len() as u64);
        self.maybe_prepare();
        Ok(self.offsets.iter().map(|o| start + o).collect())
    }

    /// Opens the segment that `bytes` more will be written to: the current
    /// one while they fit (or it is empty), else the next.
    fn segment_for(&mut self, bytes: u64) -> Result<(), WalError> {
        let fits = |s: &Segment| s.len == 0 || s.len + bytes <= self.config.segment_bytes;
        match self.segments.last() {
            Some(s) if fits(s) => {
                if self.current.is_none() {
                    // The last segment found on start: writing goes on in it.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&s.path)
                        .map_err(io_err(&s.path))?;
                    self.current = Some(Arc::new(OpenSegment {
                        file: f,
                        path: s.path.clone(),
                    }));
                }
                Ok(())
            }
            _ => self.start_segment(),
        }
    }

    /// Starts the next segment at or after `next_lsn`: a prepared one if
    /// ready, else one created here.
    fn start_segment(&mut self) -> Result<(), WalError> {
        if let Some(s) = self.current.take() {
            // Recovery trusts every segment but the last to be whole: the
            // one left is durable before the next holds a record.
            s.file.sync_data().map_err(io_err(&s.path))?;
        }
        let dir = self.config.dir.clone();
        let end = self.next_lsn;
        self.poll_helper();
        if self.prepared.is_none() && self.preparing == Some(end) {
            // The helper is preparing the very file this segment needs
            // (the last one ended exactly at its planned size): wait for it.
            if let Ok(report) = self.helper.done.recv() {
                self.take_report(report);
            }
        }
        let base = match self.prepared.take() {
            Some(base) if base >= end => base,
            Some(base) => {
                // Only when one batch outgrew a whole segment.
                let path = segment_path(&dir, end);
                fs::rename(segment_path(&dir, base), &path).map_err(io_err(&path))?;
                sync_dir(&dir)?;
                end
            }
            None => {
                self.metrics.wal_segments_unprepared.inc();
                let path = segment_path(&dir, end);
                File::create(&path).map_err(io_err(&path))?;
                sync_dir(&dir)?;
                end
            }
        };
        let path = segment_path(&dir, base);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.current = Some(Arc::new(OpenSegment {
            file: f,
            path: path.clone(),
        }));
        self.segments.push(Segment {
            base_lsn: base,
            path,
            len: 0,
            max_epoch: 0,
        });
        self.next_lsn = base;
        self.metrics.wal_segments.set(self.segments.len() as i64);
        Ok(())
    }

    /// Asks the helper for the next segment once the current one is half full.
    fn maybe_prepare(&mut self) {
        let Some(s) = self.segments.last() else {
            return;
        };
        if self.preparing.is_some()
            || self.prepared.is_some()
            || s.len < self.config.segment_bytes / 2
        {
            return;
        }
        let base = s.base_lsn + s.len.max(self.config.segment_bytes);
        self.preparing = Some(base);
        self.helper.jobs.send(HelperJob::Prepare {
            base,
            path: segment_path(&self.config.dir, base),
            bytes: self.config.segment_bytes,
        });
    }

    /// Takes the helper's report on a segment it prepared.
    fn poll_helper(&mut self) {
        while let Ok(report) = self.helper.done.try_recv() {
            self.take_report(report);
        }
    }

    fn take_report(&mut self, (base, result): (u64, Result<(), WalError>)) {
        if self.preparing == Some(base) {
            self.preparing = None;
        }
        match result {
            Ok(()) => {
                self.metrics.wal_segments_prepared.inc();
                self.prepared = Some(base);
            }
            Err(e) => tracing::warn!("could not prepare a write-ahead log segment: {e}"),
        }
    }

    fn maybe_truncate(&mut self) {
        let below = self.shared.truncate_below.load(Ordering::Relaxed);
        if below <= self.truncated_below {
            return;
        }
        self.truncated_below = below;
        let keep_from = self.segments.len().saturating_sub(1); // never the current one
        let removed = self.segments[..keep_from]
            .iter()
            .take_while(|s| s.max_epoch < below)
            .count();
        if removed > 0 {
            let paths = self.segments.drain(..removed).map(|s| s.path).collect();
            self.helper.jobs.send(HelperJob::Delete(paths));
            self.metrics.wal_segments_deleted.inc_by(removed as u64);
        }
        self.metrics.wal_segments.set(self.segments.len() as i64);
    }
}

/// The segment the writer writes to.
struct OpenSegment {
    file: File,
    path: PathBuf,
}

/// Batches written to a segment, to make durable.
struct SyncJob {
    segment: Arc<OpenSegment>,
    /// The LSN just past the batch.
    end_lsn: u64,
    /// The batch's QoS 1 publishes, answered once it is durable.
    acks: Vec<tokio::sync::oneshot::Sender<Result<(), ()>>>,
}

/// A thread that works through the jobs sent to it, in order.
struct JobThread<J> {
    tx: Option<Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> JobThread<J> {
    fn spawn(
        name: &'static str,
        work: impl FnOnce(Receiver<J>) + Send + 'static,
    ) -> Result<Self, WalError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(rx))
            .map_err(io_err(Path::new(name)))?;
        Ok(JobThread {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, job: J) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Lets the thread finish the jobs sent and waits for it.
    fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The syncer: fsyncs what the writer wrote (group commit), then
/// acknowledges it.
fn start_syncer(
    shared: Arc<WalShared>,
    metrics: Arc<IngestMetrics>,
) -> Result<JobThread<SyncJob>, WalError> {
    JobThread::spawn("wal-syncer", move |rx: Receiver<SyncJob>| {
        let mut jobs = Vec::new();
        while let Ok(first) = rx.recv() {
            jobs.push(first);
            jobs.extend(rx.try_iter());
            let result = if shared.failed.load(Ordering::SeqCst) {
                Err(())
            } else {
                sync_jobs(&jobs, &shared, &metrics)
            };
            for job in jobs.drain(..) {
                for ack in job.acks {
                    let _ = ack.send(result);
                }
            }
        }
    })
}

/// One group commit: fsyncs each file the jobs wrote to (two when the
/// writer moved to a new segment), in order. On failure the log stops.
fn sync_jobs(jobs: &[SyncJob], shared: &WalShared, metrics: &IngestMetrics) -> Result<(), ()> {
    let t = Instant::now();
    for (i, job) in jobs.iter().enumerate() {
        let last_of_file = jobs
            .get(i + 1)
            .is_none_or(|next| !Arc::ptr_eq(&next.segment, &job.segment));
        if !last_of_file {
            continue;
        }
        if let Err(e) = job.segment.file.sync_data() {
            let e = io_err(&job.segment.path)(e);
            tracing::error!("{e}; the write-ahead log stops accepting publishes");
            shared.failed.store(true, Ordering::SeqCst);
            metrics.wal_failed.set(1);
            return Err(());
        }
    }
    metrics.wal_fsync_seconds.observe(t.elapsed().as_secs_f64());
    metrics.wal_commits.inc();
    let end = jobs.last().map_or(0, |j| j.end_lsn);
    shared.durable_lsn.fetch_max(end, Ordering::Relaxed);
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

enum HelperJob {
    Prepare {
        base: u64,
        path: PathBuf,
        bytes: u64,
    },
    Delete(Vec<PathBuf>),
}

/// The writer's helper thread: it prepares segments and deletes old ones,
/// so that the writer itself only writes.
struct Helper {
    jobs: JobThread<HelperJob>,
    done: Receiver<(u64, Result<(), WalError>)>,
}

impl Helper {
    fn start(dir: PathBuf) -> Result<Helper, WalError> {
        let (done_tx, done) = crossbeam_channel::unbounded();
        let jobs = JobThread::spawn("wal-helper", move |rx: Receiver<HelperJob>| {
            crate::priority::lower_current_thread(crate::priority::BackgroundIo::Lowest);
            for job in rx {
                match job {
                    HelperJob::Prepare { base, path, bytes } => {
                        let result = prepare_segment(&dir, &path, bytes);
                        let _ = done_tx.send((base, result));
                    }
                    HelperJob::Delete(paths) => {
                        for p in paths {
                            if let Err(e) = fs::remove_file(&p) {
                                tracing::warn!(
                                    "could not delete write-ahead log segment {}: {e}",
                                    p.display()
                                );
                            }
                        }
                    }
                }
            }
        })?;
        Ok(Helper { jobs, done })
    }
}

/// Creates a segment of `bytes` zeros and makes it and its name durable.
/// It is written in steps with an fsync each, so that no large burst of
/// writes queues ahead of the writer's own fsyncs.
fn prepare_segment(dir: &Path, path: &Path, bytes: u64) -> Result<(), WalError> {
    const STEP: u64 = 1 << 20;
    const SYNC_EVERY: u64 = 8 << 20;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let zeros = vec![0u8; STEP as usize];
    let mut at = 0;
    while at < bytes {
        let n = STEP.min(bytes - at);
        f.write_all_at(&zeros[..n as usize], at)
            .map_err(io_err(path))?;
        at += n;
        if at % SYNC_EVERY == 0 {
            f.sync_data().map_err(io_err(path))?;
        }
    }
    f.sync_all().map_err(io_err(path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn request(budget: &Arc<MemoryBudget>, device: &str, payload: &'static [u8]) -> WalRequest {
        WalRequest {
            received_ns: 7,
            device: DeviceId::new(device).unwrap(),
            patient: Some(PatientId::new("p-1").unwrap()),
            payload: Bytes::from_static(payload),
            permit: budget.charge(payload.len()),
            done: None,
        }
    }

    fn drain(sources: &[ShardSource]) -> Vec<Envelope> {
        let mut out = Vec::new();
        for s in sources {
            while let Ok(ev) = s.rx.try_recv() {
                if let InputEvent::Data(e) = ev {
                    out.push(e);
                }
            }
        }
        out.sort_by_key(|e| e.lsn);
        out
    }

    fn wait_for(sources: &[ShardSource], n: usize) -> Vec<Envelope> {
        let mut got = Vec::new();
        for _ in 0..500 {
            got.extend(drain(sources));
            if got.len() >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got.sort_by_key(|e| e.lsn);
        got
    }

    #[test]
    fn commits_replays_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let metrics = Arc::new(IngestMetrics::default());
        let (shards, sources) = Shards::new(2);
        let wal = Wal::start(
            WalConfig::new(dir.path().into()),
            0,
            shards,
            budget.clone(),
            metrics.clone(),
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut req = request(&budget, "mon-1", b"[1]");
        req.done = Some(tx);
        wal.handle.submit(req).unwrap();
        wal.handle
            .submit(request(&budget, "mon-2", b"[2]"))
            .unwrap();
        assert_eq!(rx.blocking_recv().unwrap(), Ok(()));
        let got = wait_for(&sources, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(&*got[0].payload, b"[1]");
        let epoch = got[1].epoch;
        drop(got);
        let handle = wal.handle.clone();
        drop(handle);
        wal.shutdown();
        assert_eq!(budget.in_use(), 0, "permits return when envelopes drop");

        // A torn record at the tail is cut, the rest replays.
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(
            WalConfig::new(dir.path().into()),
            0,
            shards,
            budget.clone(),
            metrics.clone(),
        )
        .unwrap();
        let got = wait_for(&sources, 2);
        assert_eq!(
            got.iter().map(|e| e.device.as_str()).collect::<Vec<_>>(),
            ["mon-1", "mon-2"]
        );
        assert_eq!(got[1].patient.as_ref().unwrap().as_str(), "p-1");
        drop(got);
        wal.shutdown();

        // Replay starts at the requested epoch.
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(
            WalConfig::new(dir.path().into()),
            epoch + 1,
            shards,
            budget.clone(),
            metrics,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(drain(&sources).is_empty());
        wal.shutdown();
    }

    #[test]
    fn acknowledgements_follow_durability_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let metrics = Arc::new(IngestMetrics::default());
        let mut config = WalConfig::new(dir.path().into());
        // A few records per segment: the writer moves on many times.
        config.segment_bytes = 512;
        let (shards, sources) = Shards::new(2);
        let wal = Wal::start(config.clone(), 0, shards, budget.clone(), metrics.clone()).unwrap();
        let control = wal.handle.control();
        // Rounds of ten publishes; after each round's acknowledgements, how
        // far the log is durable.
        let mut durable = Vec::new();
        for round in 0..30 {
            let mut acks = Vec::new();
            for i in 0..10 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let device = format!("mon-{}", (round * 10 + i) % 7);
                let mut req = request(&budget, &device, b"[1,2,3,4,5,6,7,8]");
                req.done = Some(tx);
                wal.handle.submit(req).unwrap();
                acks.push(rx);
            }
            for ack in acks {
                assert_eq!(ack.blocking_recv().unwrap(), Ok(()));
            }
            durable.push(control.durable_lsn());
        }
        let got = wait_for(&sources, 300);
        assert_eq!(got.len(), 300);
        for (i, env) in got.iter().enumerate() {
            assert!(
                env.lsn < durable[i / 10],
                "publish {i} acknowledged at LSN {} with the log durable to {}",
                env.lsn,
                durable[i / 10]
            );
        }
        assert!(metrics.wal_commits.get() >= 1);
        drop(got);
        wal.shutdown();
        let segments = fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 10, "{segments} segments");

        // Every acknowledged publish replays, in order, from every segment.
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(config, 0, shards, budget.clone(), metrics).unwrap();
        let got = wait_for(&sources, 300);
        assert_eq!(got.len(), 300);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.device.as_str(), format!("mon-{}", i % 7));
        }
        drop(got);
        wal.shutdown();
    }

    #[test]
    fn epochs_never_fall_below_the_checkpoint() {
        // As if the clock stepped back a day across a restart.
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let (shards, sources) = Shards::new(1);
        let checkpoint = now_ms() + 86_400_000;
        let wal = Wal::start(
            WalConfig::new(dir.path().into()),
            checkpoint,
            shards,
            budget.clone(),
            Arc::new(IngestMetrics::default()),
        )
        .unwrap();
        wal.handle
            .submit(request(&budget, "mon-1", b"[1]"))
            .unwrap();
        let got = wait_for(&sources, 1);
        assert!(
            got[0].epoch >= checkpoint,
            "{} < {checkpoint}",
            got[0].epoch
        );
        drop(got);
        wal.shutdown();
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(segment_path(dir.path(), 0), [9u8; 20]).unwrap();
        fs::write(segment_path(dir.path(), 20), []).unwrap();
        let err = recover(dir.path()).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { offset: 0, .. }), "{err}");
    }

    #[test]
    fn old_segments_are_deleted_below_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let metrics = Arc::new(IngestMetrics::default());
        let (shards, _sources) = Shards::new(1);
        let mut config = WalConfig::new(dir.path().into());
        config.segment_bytes = 1; // every commit starts a new segment
        let wal = Wal::start(config, 0, shards, budget.clone(), metrics).unwrap();
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut req = request(&budget, "mon-1", b"[1]");
            req.done = Some(tx);
            wal.handle.submit(req).unwrap();
            rx.blocking_recv().unwrap().unwrap();
        }
        // Segments holding records; a prepared segment holds zeros only.
        // The helper thread prepares and deletes files meanwhile, so one
        // listed may be gone when it is read: it holds no records then.
        let count = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let bytes = e
                        .as_ref()
                        .ok()
                        .and_then(|e| fs::read(e.path()).ok())
                        .unwrap_or_default();
                    bytes.iter().any(|&b| b != 0)
                })
                .count()
        };
        assert_eq!(count(), 3);
        wal.handle.control().truncate_below(u64::MAX);
        for _ in 0..100 {
            if count() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(count(), 1, "all but the current segment go");
        wal.shutdown();
    }

    #[test]
    fn a_rolled_segment_goes_below_the_checkpoint_even_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let metrics = Arc::new(IngestMetrics::default());
        let (shards, _sources) = Shards::new(1);
        let wal = Wal::start(
            WalConfig::new(dir.path().into()),
            0,
            shards,
            budget.clone(),
            metrics,
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut req = request(&budget, "mon-1", b"[\"secret-72.125\"]");
        req.done = Some(tx);
        wal.handle.submit(req).unwrap();
        rx.blocking_recv().unwrap().unwrap();
        let holds_it = || {
            fs::read_dir(dir.path()).unwrap().any(|e| {
                e.ok()
                    .and_then(|e| fs::read(e.path()).ok())
                    .is_some_and(|b| b.windows(13).any(|w| w == b"secret-72.125"))
            })
        };
        assert!(holds_it());
        // Without a roll, the current segment stays however far the
        // checkpoint goes; after one, it is deleted with no new publish.
        let control = wal.handle.control();
        control.truncate_below(u64::MAX - 1);
        std::thread::sleep(Duration::from_millis(100));
        assert!(holds_it(), "the current segment is never deleted");
        control.roll();
        std::thread::sleep(Duration::from_millis(100));
        control.truncate_below(u64::MAX);
        for _ in 0..200 {
            if !holds_it() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!holds_it(), "the rolled segment is deleted");
        wal.shutdown();
    }

    #[test]
    fn segments_are_prepared_ahead_and_their_zeros_end_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(1 << 20);
        let metrics = Arc::new(IngestMetrics::default());
        let mut config = WalConfig::new(dir.path().into());
        config.segment_bytes = 4096;
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(config.clone(), 0, shards, budget.clone(), metrics.clone()).unwrap();
        let commit = |payload: &'static [u8]| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut req = request(&budget, "mon-1", payload);
            req.done = Some(tx);
            wal.handle.submit(req).unwrap();
            rx.blocking_recv().unwrap().unwrap();
        };
        let files = || {
            let mut f: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            f.sort();
            f
        };
        // 1,000-byte payloads: the third passes half of the first segment.
        const P: &[u8] = &[7u8; 1000];
        for _ in 0..3 {
            commit(P);
        }
        // The writer takes the helper's report while it waits for work.
        for _ in 0..200 {
            if metrics.wal_segments_prepared.get() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(files().len(), 2);
        let prepared = files()[1].clone();
        assert_eq!(
            fs::metadata(&prepared).unwrap().len(),
            4096,
            "prepared at full size"
        );
        commit(P); // does not fit: the prepared segment takes it
        commit(b"[last]");
        assert_eq!(
            metrics.wal_segments_unprepared.get(),
            1,
            "only the very first segment was created by the writer"
        );
        let got = wait_for(&sources, 5);
        assert_eq!(got.len(), 5);
        assert!(
            got.windows(2).all(|w| w[0].lsn < w[1].lsn),
            "LSNs rise across segments"
        );
        drop(got);
        wal.shutdown();

        // Garbage after the zeros that end the last segment's records is a
        // torn write: it is zeroed, the records before it replay, and
        // writing goes on where they end.
        let last = files().last().unwrap().clone();
        let f = OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all_at(&[5u8; 10], 4000).unwrap();
        drop(f);
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(config.clone(), 0, shards, budget.clone(), metrics.clone()).unwrap();
        let got = wait_for(&sources, 5);
        assert_eq!(got.len(), 5);
        assert_eq!(&*got[4].payload, b"[last]");
        assert!(fs::read(&last).unwrap()[3990..].iter().all(|&b| b == 0));
        drop(got);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut req = request(&budget, "mon-2", b"[after]");
        req.done = Some(tx);
        wal.handle.submit(req).unwrap();
        rx.blocking_recv().unwrap().unwrap();
        let got = wait_for(&sources, 1);
        assert_eq!(got[0].device.as_str(), "mon-2");
        drop(got);
        wal.shutdown();
        let (shards, sources) = Shards::new(1);
        let wal = Wal::start(config, 0, shards, budget.clone(), metrics).unwrap();
        assert_eq!(
            wait_for(&sources, 6).len(),
            6,
            "all six replay after a restart"
        );
        wal.shutdown();

        // The same garbage in an earlier segment may hide acknowledged
        // records: the log refuses to start.
        let first = files()[0].clone();
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.write_all_at(&[5u8; 10], 4080).unwrap();
        drop(f);
        let err = recover(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::Corrupt {
                    what: "data after the end of the records",
                    ..
                }
            ),
            "{err}"
        );
    }
}
