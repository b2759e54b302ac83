//! Studies on disk, and the live state of those the engine runs.
//!
//! ```text
//! <data>/research/researchers.json           accounts (hashed secrets)
//! <data>/research/studies/<id>/study.toml    the registered definition
//!                              state.json    budget charged, running totals' trees
//!                              closed        present once the study is closed
//!                              contributions.json  windows per patient (never released)
//!                              usage.json    rows, batches, bytes per researcher
//!                              releases/<first window start>.arrows
//! ```
//!
//! The release log is a sequence of Arrow IPC streams, one per engine run,
//! each window's batch written and fsynced before it is published: a
//! time-range read replays it, and replaying what was already released
//! costs no budget (post-processing of a differentially private release).
//! The state is written (atomically) before the batch, so a crash between
//! the two loses a release, never charges twice for one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use arrow_ipc::writer::StreamWriter;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wardflow_ingest::jsonstore;
use wardflow_ingest::registry::{SecretHash, VerifiedCache, new_secret};

use crate::release::{BudgetPlan, Released, StudyState, schema};
use crate::spec::Study;

/// Why a study's files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] jsonstore::StoreError),
    #[error(transparent)]
    Spec(#[from] wardflow_model::SpecError),
    #[error("{path}: {message}")]
    Arrow { path: PathBuf, message: String },
    #[error("no study {0:?}")]
    NoStudy(String),
    #[error("study {0:?} is already registered")]
    Exists(String),
    #[error("no researcher {0:?}")]
    NoResearcher(String),
    #[error("researcher {0:?} exists")]
    ResearcherExists(String),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The research directory of a data directory.
pub fn research_dir(data: &Path) -> PathBuf {
    data.join("research")
}

fn study_dir(data: &Path, id: &str) -> PathBuf {
    research_dir(data).join("studies").join(id)
}

// ---- researchers ----

const RESEARCHERS_FILE: &str = "researchers.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Researcher {
    pub id: String,
    #[serde(flatten)]
    pub secret: SecretHash,
    pub added_ns: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Researchers {
    #[serde(default)]
    pub researchers: BTreeMap<String, Researcher>,
}

impl Researchers {
    pub fn load(data: &Path) -> Result<Researchers, StoreError> {
        Ok(jsonstore::load(&research_dir(data), RESEARCHERS_FILE)?)
    }

    /// Adds an account; returns its secret (generated unless given).
    pub fn add(data: &Path, id: &str, secret: Option<String>) -> Result<String, StoreError> {
        wardflow_ingest::census::check_name("researcher id", id)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let secret = new_secret(secret).map_err(|e| StoreError::Invalid(e.to_string()))?;
        jsonstore::update(
            &research_dir(data),
            RESEARCHERS_FILE,
            |r: &mut Researchers| {
                if r.researchers.contains_key(id) {
                    return Err(StoreError::ResearcherExists(id.into()));
                }
                r.researchers.insert(
                    id.into(),
                    Researcher {
                        id: id.into(),
                        secret: SecretHash::new(&secret),
                        added_ns: wardflow_model::now_ns(),
                    },
                );
                Ok(())
            },
        )?;
        Ok(secret)
    }

    pub fn remove(data: &Path, id: &str) -> Result<(), StoreError> {
        jsonstore::update(
            &research_dir(data),
            RESEARCHERS_FILE,
            |r: &mut Researchers| {
                r.researchers
                    .remove(id)
                    .map(|_| ())
                    .ok_or_else(|| StoreError::NoResearcher(id.into()))
            },
        )
    }
}

/// Checks researchers' secrets against the accounts file as it is now.
pub struct Authenticator {
    data: PathBuf,
    verified: VerifiedCache,
}

impl Authenticator {
    pub fn new(data: &Path) -> Authenticator {
        Authenticator {
            data: data.to_path_buf(),
            verified: VerifiedCache::default(),
        }
    }

    /// Whether the account exists now (a removed researcher's tokens stop
    /// working at their next call).
    pub fn exists(&self, id: &str) -> bool {
        Researchers::load(&self.data).is_ok_and(|r| r.researchers.contains_key(id))
    }

    pub fn check(&self, id: &str, secret: &[u8]) -> bool {
        let Ok(all) = Researchers::load(&self.data) else {
            return false;
        };
        all.researchers.get(id).is_some_and(|r| {
            self.verified
                .check(&format!("researcher:{id}"), &r.secret, secret)
        })
    }
}

// ---- registration ----

/// Registers a study file: checks it, copies it in, starts its budget.
pub fn add_study(data: &Path, file: &Path) -> Result<Study, StoreError> {
    let study = Study::load(file)?;
    let dir = study_dir(data, &study.id);
    if dir.join("study.toml").exists() {
        return Err(StoreError::Exists(study.id));
    }
    std::fs::create_dir_all(dir.join("releases")).map_err(io_err(&dir))?;
    let text = std::fs::read_to_string(file).map_err(io_err(file))?;
    write_json(
        &dir,
        "state.json",
        &StudyState::new(&BudgetPlan::new(&study)),
    )?;
    let path = dir.join("study.toml");
    std::fs::write(&path, text).map_err(io_err(&path))?;
    Ok(study)
}

/// Closes a study: its streams end and it releases nothing more.
pub fn close_study(data: &Path, id: &str) -> Result<(), StoreError> {
    let dir = study_dir(data, id);
    if !dir.join("study.toml").exists() {
        return Err(StoreError::NoStudy(id.into()));
    }
    let path = dir.join("closed");
    std::fs::write(&path, format!("{}\n", wardflow_model::now_ns())).map_err(io_err(&path))
}

/// A registered study as its files say.
#[derive(Debug, Clone)]
pub struct StudyFiles {
    pub study: Study,
    pub state: StudyState,
    pub closed: bool,
    pub usage: Usage,
    pub contributions: Contributions,
}

/// Every registered study, by id.
pub fn list_studies(data: &Path) -> Result<Vec<StudyFiles>, StoreError> {
    list_study_ids(data)?
        .iter()
        .map(|id| read_study(data, id))
        .collect()
}

/// The ids of the registered studies.
fn list_study_ids(data: &Path) -> Result<Vec<String>, StoreError> {
    let root = research_dir(data).join("studies");
    let mut ids: Vec<String> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("study.toml").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&root)(e)),
    };
    ids.sort();
    Ok(ids)
}

pub fn read_study(data: &Path, id: &str) -> Result<StudyFiles, StoreError> {
    let dir = study_dir(data, id);
    if !dir.join("study.toml").exists() {
        return Err(StoreError::NoStudy(id.into()));
    }
    let study = Study::load(&dir.join("study.toml"))?;
    let state = match jsonstore::load::<Option<StudyState>>(&dir, "state.json")? {
        Some(s) => s,
        None => StudyState::new(&BudgetPlan::new(&study)),
    };
    Ok(StudyFiles {
        study,
        state,
        closed: dir.join("closed").exists(),
        usage: jsonstore::load(&dir, "usage.json")?,
        contributions: jsonstore::load(&dir, "contributions.json")?,
    })
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StoreError> {
    Ok(jsonstore::replace(dir, name, value)?)
}

// ---- metering ----

/// What one researcher read of a study.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReaderUsage {
    pub streams: u64,
    pub batches: u64,
    pub rows: u64,
    pub bytes: u64,
}

/// Reads of a study, per researcher.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub readers: BTreeMap<String, ReaderUsage>,
}

/// How many windows each patient contributed to (internal: the basis of
/// their compensation, never released), and the study's release totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contributions {
    #[serde(default)]
    pub patients: BTreeMap<String, u64>,
    #[serde(default)]
    pub rows_released: u64,
    #[serde(default)]
    pub suppressed_primary: u64,
    #[serde(default)]
    pub suppressed_complementary: u64,
}

// ---- the live registry ----

/// What a live stream receives.
#[derive(Debug, Clone)]
pub enum Event {
    Window(Arc<Released>),
    /// The study releases nothing more.
    End(Ended),
}

/// Why a study releases nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Its privacy budget is spent.
    BudgetSpent(String),
    /// Closed by its owner.
    Closed(String),
    /// A release failed (its state could not be kept).
    Failed(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::BudgetSpent(s) | Ended::Closed(s) | Ended::Failed(s) => f.write_str(s),
        }
    }
}

/// A study the engine runs.
pub struct Live {
    pub study: Study,
    pub budget: BudgetPlan,
    pub dir: PathBuf,
    state: Mutex<StudyState>,
    usage: Mutex<Usage>,
    contributions: Mutex<Contributions>,
    log: Mutex<Option<StreamWriter<File>>>,
    events: broadcast::Sender<Event>,
    ended: Mutex<Option<Ended>>,
    last_usage_save: Mutex<std::time::Instant>,
}

impl Live {
    /// Why the study releases nothing more, if it does not.
    pub fn ended(&self) -> Option<Ended> {
        self.ended.lock().clone()
    }

    pub fn state(&self) -> StudyState {
        self.state.lock().clone()
    }

    pub fn usage(&self) -> Usage {
        self.usage.lock().clone()
    }

    pub fn contributions(&self) -> Contributions {
        self.contributions.lock().clone()
    }

    /// Subscribes to the windows released from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `release` on the study's state; keeps the state, logs the
    /// batch, meters the contributions, and publishes it. A release that
    /// fails ends the study's streams with the reason.
    pub fn release(
        &self,
        release: impl FnOnce(&Study, &BudgetPlan, &mut StudyState) -> Result<Released, String>,
    ) -> Result<Arc<Released>, Ended> {
        if let Some(why) = self.ended() {
            return Err(why);
        }
        let mut state = self.state.lock();
        let mut next = state.clone();
        let released = match release(&self.study, &self.budget, &mut next) {
            Ok(r) => Arc::new(r),
            Err(why) => {
                let why = Ended::BudgetSpent(format!("study {:?}: {why}", self.study.id));
                self.end(why.clone());
                return Err(why);
            }
        };
        if let Err(e) = write_json(&self.dir, "state.json", &next) {
            // Nothing was released: the charge is not kept either.
            // Its streams end rather than skip the window in silence.
            let why = Ended::Failed(format!(
                "study {:?}: its state could not be saved, so the window was not released: {e}",
                self.study.id
            ));
            drop(state);
            self.end(why.clone());
            return Err(why);
        }
        *state = next;
        drop(state);
        if let Err(e) = self.append(&released.batch) {
            // The next window starts a new file, after no torn message.
            *self.log.lock() = None;
            tracing::error!(study = %self.study.id, "release log: {e}; the window is released live only");
        }
        {
            let mut c = self.contributions.lock();
            for p in &released.contributors {
                *c.patients.entry(p.clone()).or_default() += 1;
            }
            c.rows_released += released.batch.num_rows() as u64;
            c.suppressed_primary += released.suppressed.0 as u64;
            c.suppressed_complementary += released.suppressed.1 as u64;
            if let Err(e) = write_json(&self.dir, "contributions.json", &*c) {
                tracing::error!(study = %self.study.id, "contributions not saved: {e}");
            }
        }
        let _ = self.events.send(Event::Window(released.clone()));
        if !self.state.lock().can_release(&self.budget) {
            self.end(Ended::BudgetSpent(format!(
                "study {:?}: privacy budget spent (ε = {} at δ = {}, {} windows released)",
                self.study.id,
                self.study.epsilon,
                self.study.delta,
                self.state.lock().windows_released
            )));
        }
        Ok(released)
    }

    /// Ends the study's streams.
    pub fn end(&self, why: Ended) {
        let mut ended = self.ended.lock();
        if ended.is_none() {
            tracing::warn!(study = %self.study.id, "{why}");
            *ended = Some(why.clone());
            let _ = self.events.send(Event::End(why));
        }
    }

    fn append(&self, batch: &RecordBatch) -> Result<(), StoreError> {
        let mut log = self.log.lock();
        if log.is_none() {
            let path = self
                .dir
                .join("releases")
                .join(format!("{:020}.arrows", wardflow_model::now_ns()));
            let file = File::create(&path).map_err(io_err(&path))?;
            let dir = self.dir.join("releases");
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
            let w = StreamWriter::try_new(file, &schema(&self.study)).map_err(|e| {
                StoreError::Arrow {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            *log = Some(w);
        }
        let w = log.as_mut().expect("opened above");
        let arrow = |e: arrow::error::ArrowError| StoreError::Arrow {
            path: self.dir.clone(),
            message: e.to_string(),
        };
        w.write(batch).map_err(arrow)?;
        w.flush().map_err(arrow)?;
        w.get_mut().flush().map_err(io_err(&self.dir))?;
        w.get_ref().sync_data().map_err(io_err(&self.dir))?;
        Ok(())
    }

    /// Meters what a researcher read; saves the counters at most once a
    /// second.
    pub fn meter(&self, researcher: &str, read: &ReaderUsage) {
        {
            let mut u = self.usage.lock();
            let r = u.readers.entry(researcher.to_string()).or_default();
            r.streams += read.streams;
            r.batches += read.batches;
            r.rows += read.rows;
            r.bytes += read.bytes;
        }
        let mut last = self.last_usage_save.lock();
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            *last = std::time::Instant::now();
            drop(last);
            self.save_usage();
        }
    }

    /// Writes the usage counters (called after a stream, and periodically).
    pub fn save_usage(&self) {
        // Written under the lock: two saves cannot land out of order.
        let u = self.usage.lock();
        if let Err(e) = write_json(&self.dir, "usage.json", &*u) {
            tracing::warn!(study = %self.study.id, "usage not saved: {e}");
        }
    }

    /// Where the release log is.
    pub fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }
}

/// One record batch of the release log, as its IPC message: what Flight
/// sends for it, without decoding and encoding it again.
#[derive(Debug, Clone)]
pub struct RawBatch {
    /// The flatbuffer `Message` (with its padding).
    pub header: bytes::Bytes,
    pub body: bytes::Bytes,
    pub rows: u64,
}

/// Hands each record batch of the release log whose window starts in
/// `[from, to)` to `f` as its IPC message, in order, until `f` says stop.
/// The window's start is read from the first value of the batch's first
/// column (`window_start`), so nothing is decoded; batches without rows
/// (windows nobody qualified for) are skipped. A stream cut short by a crash is read up to its last
/// whole message.
pub fn for_each_raw_release(
    dir: &Path,
    from_ms: u64,
    to_ms: u64,
    mut f: impl FnMut(RawBatch) -> bool,
) -> Result<(), StoreError> {
    use arrow_ipc::MessageHeader;
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "arrows"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(dir)(e)),
    };
    files.sort();
    let invalid = |path: &Path, message: String| StoreError::Arrow {
        path: path.to_path_buf(),
        message,
    };
    for path in files {
        let file = File::open(&path).map_err(io_err(&path))?;
        if file.metadata().map_err(io_err(&path))?.len() == 0 {
            continue;
        }
        // SAFETY: release logs are only ever appended to, by this process
        // (one writer per study), never truncated or rewritten; a mapping
        // sees the length the file had when it was made.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?;
        let all = bytes::Bytes::from_owner(map);
        let mut at = 0usize;
        let take = |at: &mut usize, n: usize| -> Option<bytes::Bytes> {
            let end = at.checked_add(n).filter(|e| *e <= all.len())?;
            let b = all.slice(*at..end);
            *at = end;
            Some(b)
        };
        loop {
            // Encapsulated messages (Arrow IPC format): 0xFFFFFFFF, the
            // metadata length, the flatbuffer Message, the body.
            let Some(mut word) = take(&mut at, 4) else {
                break;
            };
            if word[..] == [0xff; 4] {
                match take(&mut at, 4) {
                    Some(w) => word = w,
                    None => break,
                }
            }
            let len = u32::from_le_bytes(word[..].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                break; // end of stream
            }
            let Some(meta) = take(&mut at, len) else {
                break;
            };
            // A message that does not parse ends this file (a write cut
            // short); the next file starts afresh.
            let Ok(message) = arrow_ipc::root_as_message(&meta) else {
                tracing::warn!(path = %path.display(), "release log: a torn message; the rest of this file is skipped");
                break;
            };
            let Ok(body_len) = usize::try_from(message.bodyLength()) else {
                break;
            };
            let Some(body) = take(&mut at, body_len) else {
                break;
            };
            if message.header_type() != MessageHeader::RecordBatch {
                continue; // the schema: Flight sends the study's own first
            }
            let batch = message
                .header_as_record_batch()
                .ok_or_else(|| invalid(&path, "a record batch without its header".into()))?;
            if batch.compression().is_some() {
                return Err(invalid(
                    &path,
                    "compressed batches are not written here".into(),
                ));
            }
            let rows = batch.length().max(0) as u64;
            // Buffer 1 is the values of column 0 (buffer 0 its validity).
            let start = batch
                .buffers()
                .filter(|_| rows > 0)
                .and_then(|b| (b.len() > 1).then(|| b.get(1)))
                .and_then(|b| body.get(b.offset() as usize..b.offset() as usize + 8))
                .map(|v| i64::from_le_bytes(v.try_into().expect("8 bytes")).max(0) as u64);
            if start.is_some_and(|s| s >= from_ms && s < to_ms) {
                let raw = RawBatch {
                    header: meta.clone(),
                    body,
                    rows,
                };
                if !f(raw) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The studies the engine runs, reloaded from disk as they are added or
/// closed.
pub struct Registry {
    data: PathBuf,
    studies: Mutex<BTreeMap<String, Arc<Live>>>,
}

impl Registry {
    pub fn open(data: &Path) -> Arc<Registry> {
        let r = Arc::new(Registry {
            data: data.to_path_buf(),
            studies: Mutex::new(BTreeMap::new()),
        });
        r.reload();
        r
    }

    /// Picks up studies added and closed since the last call.
    pub fn reload(&self) {
        let ids = match list_study_ids(&self.data) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("studies not reloaded: {e}");
                return;
            }
        };
        // One study that cannot be read leaves the others running.
        let found: Vec<StudyFiles> = ids
            .iter()
            .filter_map(|id| match read_study(&self.data, id) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(study = %id, "study not loaded: {e}");
                    None
                }
            })
            .collect();
        let mut studies = self.studies.lock();
        for f in found {
            if let Some(live) = studies.get(&f.study.id) {
                if f.closed {
                    live.end(Ended::Closed(format!("study {:?} is closed", f.study.id)));
                }
                continue;
            }
            let budget = BudgetPlan::new(&f.study);
            let live = Arc::new(Live {
                dir: study_dir(&self.data, &f.study.id),
                events: broadcast::channel(256).0,
                ended: Mutex::new(None),
                last_usage_save: Mutex::new(std::time::Instant::now()),
                state: Mutex::new(f.state),
                usage: Mutex::new(f.usage),
                contributions: Mutex::new(f.contributions),
                log: Mutex::new(None),
                budget,
                study: f.study,
            });
            if f.closed {
                live.end(Ended::Closed(format!(
                    "study {:?} is closed",
                    live.study.id
                )));
            } else if !live.state.lock().can_release(&live.budget) {
                live.end(Ended::BudgetSpent(format!(
                    "study {:?}: privacy budget spent",
                    live.study.id
                )));
            }
            tracing::info!(study = %live.study.id, "study loaded");
            studies.insert(live.study.id.clone(), live);
        }
    }

    /// Reloads every `period` on a background thread for as long as the
    /// registry lives: studies added and closed take effect within it.
    pub fn spawn_poller(self: &Arc<Self>, period: std::time::Duration) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("studies".into())
            .spawn(move || {
                while let Some(r) = weak.upgrade() {
                    r.reload();
                    drop(r);
                    std::thread::sleep(period);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("studies will not be reloaded: {e}");
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.studies.lock().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        self.studies.lock().values().cloned().collect()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("study", &self.study.id)
            .finish()
    }
}
