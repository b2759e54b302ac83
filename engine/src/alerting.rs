//! Alerts in the running engine: the rule files and their reload, the
//! dataflow operator that evaluates rules per patient, and the alert log
//! and feeds every transition goes to.
//!
//! ```text
//! Validate ──(by patient)──▶ Alert ◀──(exchanged by subject)── clinicians' commands
//!                              │                                (ack, silence, observe)
//!                              ▼
//!                  alert thread: feeds (MQTT, SSE) first, then the alert log
//! ```
//!
//! The Alert operator sits beside Store, on the same worker as the
//! patient's readings: it owns each patient's [`PatientRules`] (latest
//! values, condition states, open alerts). Clinicians' commands reach the
//! same worker through a second input, exchanged by the alert's subject,
//! so one thread decides every transition of an alert. Time for missing
//! data, escalations and silences is the dataflow frontier (the log's
//! commit clock, which advances every 20 ms when idle).
//!
//! Device-to-patient binding is the one recorded in the write-ahead log at
//! receipt: a binding change applies from the next publish, and a replay
//! after a crash binds every reading as it was bound then. Admissions (unit,
//! bed) are read from the census when they change.
//!
//! After a restart, open alerts are restored from the alert log, and a
//! replayed transition the log already holds is not sent again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use wardflow_ingest::census::{CensusWatcher, UNASSIGNED_UNIT};
use wardflow_ingest::envelope::route_hash;
use wardflow_ingest::feeds::{
    AlertAction, AlertHub, ClinicalCommand, CommandKind, FeedItem, alert_topic,
};
use wardflow_ingest::registry::RegistryWatcher;
use wardflow_model::{DeviceId, PatientId};
use wardflow_rules::alarm::{Alert, AlertEventKind, NewAlert, SubjectKind};
use wardflow_rules::patient::{CommandError, PatientRules};
use wardflow_rules::spec::{Cond, MissingTarget, Rule, RuleKind, RuleSet, SpecError};
use wardflow_rules::{Priority, default_rules};

use crate::dataflow::Validated;

/// Alert log files live here, one per process.
pub const ALERTS_DIR: &str = "alerts";
/// How often rules are re-evaluated for time passing.
const TICK_NS: i64 = 200_000_000;
/// An unbound device silent this long no longer has its technical alert.
const UNBOUND_QUIET_NS: i64 = 60_000_000_000;

/// The alert log of a process.
pub fn log_path(root: &Path, process: usize) -> PathBuf {
    root.join(ALERTS_DIR).join(format!("p{process}.jsonl"))
}

/// Every transition in the alert logs under `root`, in file order.
pub fn read_log(root: &Path) -> anyhow::Result<Vec<Alert>> {
    let dir = root.join(ALERTS_DIR);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", dir.display())),
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let reader =
            BufReader::new(File::open(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?);
        for (i, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Alert>(&line) {
                Ok(a) => out.push(a),
                // A torn last line after a crash: the transition is resent.
                Err(e) => tracing::warn!(
                    "{}:{}: skipping an unreadable alert record: {e}",
                    f.display(),
                    i + 1
                ),
            }
        }
    }
    Ok(out)
}

/// The latest record of each alert.
pub fn latest(records: Vec<Alert>) -> HashMap<String, Alert> {
    let mut m: HashMap<String, Alert> = HashMap::new();
    for a in records {
        match m.get(&a.id) {
            Some(prev) if prev.seq >= a.seq => {}
            _ => {
                m.insert(a.id.clone(), a);
            }
        }
    }
    m
}

/// The rules in force, reloaded when their files change. A file that does
/// not check is refused with its error and the previous rules keep running.
pub struct RuleBook {
    dir: Option<PathBuf>,
    current: ArcSwap<RuleSet>,
    version: AtomicU64,
    stamp: Mutex<Vec<(PathBuf, SystemTime, u64)>>,
    /// The last reload error, if the files on disk are not the rules in force.
    pub last_error: Mutex<Option<String>>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

fn dir_stamp(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.modified().ok()?, m.len()))
        })
        .collect();
    v.sort();
    v
}

impl RuleBook {
    /// Loads the rules of `dir`, or the default adult ICU set without one.
    pub fn open(dir: Option<&Path>) -> Result<Arc<RuleBook>, SpecError> {
        let (set, stamp) = match dir {
            Some(d) => {
                let stamp = dir_stamp(d);
                let set = RuleSet::load_dir(d)?;
                (set, stamp)
            }
            None => (default_rules(), Vec::new()),
        };
        tracing::info!(rules = set.rules.len(), dir = ?dir, "alert rules loaded");
        Ok(Arc::new(RuleBook {
            dir: dir.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(set),
            version: AtomicU64::new(1),
            stamp: Mutex::new(stamp),
            last_error: Mutex::new(None),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    pub fn snapshot(&self) -> (Arc<RuleSet>, u64) {
        (
            self.current.load_full(),
            self.version.load(Ordering::Acquire),
        )
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reloads if a file changed; Ok(true) if new rules are in force.
    pub fn reload_if_changed(&self) -> Result<bool, SpecError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let now = dir_stamp(dir);
        let mut last = self.stamp.lock();
        if *last == now {
            return Ok(false);
        }
        *last = now;
        match RuleSet::load_dir(dir) {
            Ok(set) => {
                tracing::info!(rules = set.rules.len(), "alert rules reloaded");
                self.current.store(Arc::new(set));
                self.version.fetch_add(1, Ordering::AcqRel);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = None;
                Ok(true)
            }
            Err(e) => {
                tracing::error!("alert rules not reloaded, the previous rules keep running: {e}");
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = Some(e.to_string());
                Err(e)
            }
        }
    }

    pub fn spawn_poller(self: &Arc<Self>, period: Duration) {
        if self.dir.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("watch-rules".into())
            .spawn(move || {
                while let Some(b) = weak.upgrade() {
                    let _ = b.reload_if_changed();
                    drop(b);
                    std::thread::sleep(period);
                }
            })
            .expect("spawn rules watcher");
    }
}

/// An alert's resolution, for reasons outside its rule.
fn resolved(mut a: Alert, at_ns: i64, why: String) -> Alert {
    a.condition = false;
    a.seq += 1;
    a.event = AlertEventKind::Resolved;
    a.state = wardflow_rules::alarm::AlertState::Resolved;
    a.at_ns = at_ns;
    a.by = Some(why);
    a
}

/// The technical alert of a device that sends readings while bound to no
/// patient.
fn unbound_rule() -> Rule {
    Rule {
        id: "device-unbound".into(),
        description: "The device sends readings but is bound to no patient: they are stored, but no patient alert can fire".into(),
        priority: Priority::Low,
        kind: RuleKind::Condition(Cond::Missing {
            target: MissingTarget::Device,
            after_ns: UNBOUND_QUIET_NS,
        }),
        technical: true,
        sustain: None,
        latching: false,
        escalate_after_ns: None,
        units: Vec::new(),
        patients: Vec::new(),
    }
}

/// What the Alert operator needs from the node.
pub struct AlertContext {
    pub rules: Arc<RuleBook>,
    pub census: Arc<CensusWatcher>,
    pub registry: Arc<RegistryWatcher>,
    /// Transitions, to the alert thread.
    pub out: crossbeam_channel::Sender<AlertOut>,
    /// Open alerts and logged sequence numbers found at start.
    pub restored: HashMap<String, Alert>,
    /// The console's live board (latest values, devices).
    pub board: Arc<crate::board::Board>,
}

/// One worker's share of the alert state.
pub struct AlertWorker {
    ctx: Arc<AlertContext>,
    rules: Arc<RuleSet>,
    rules_version: u64,
    census_version: u64,
    registry_version: u64,
    patients: HashMap<PatientId, PatientRules>,
    unbound: HashMap<DeviceId, (Alert, i64)>,
    unbound_rule: Rule,
    /// Logged sequence number of each alert: replayed transitions at or
    /// below it were already sent.
    logged: HashMap<String, u32>,
    last_tick: i64,
    emitted: Vec<Alert>,
    board: crate::board::BoardWriter,
}

/// How long a value counts towards the board's NEWS2 when no NEWS2 rule
/// says otherwise.
const BOARD_NEWS2_FRESHNESS_NS: i64 = 5 * 60 * 1_000_000_000;

impl AlertWorker {
    pub fn new(ctx: Arc<AlertContext>, index: usize, peers: usize) -> AlertWorker {
        let (rules, rules_version) = ctx.rules.snapshot();
        let mut w = AlertWorker {
            rules,
            rules_version,
            census_version: 0,
            registry_version: 0,
            patients: HashMap::new(),
            unbound: HashMap::new(),
            unbound_rule: unbound_rule(),
            logged: HashMap::new(),
            last_tick: 0,
            emitted: Vec::new(),
            board: crate::board::BoardWriter::new(ctx.board.clone()),
            ctx: ctx.clone(),
        };
        let mine = |subject: &str| (route_hash(subject) % peers as u64) as usize == index;
        for a in ctx.restored.values() {
            if !mine(&a.subject) {
                continue;
            }
            w.logged.insert(a.id.clone(), a.seq);
            if !a.state.is_open() {
                continue;
            }
            match a.subject_kind {
                SubjectKind::Patient => {
                    if let Ok(p) = PatientId::new(&a.subject) {
                        let rules = w.rules.clone();
                        w.patient(&p).restore(&rules, a.clone());
                    }
                }
                SubjectKind::Device => {
                    if let Ok(d) = DeviceId::new(&a.subject) {
                        w.unbound.insert(d, (a.clone(), a.at_ns));
                    }
                }
            }
        }
        w
    }

    fn patient(&mut self, p: &PatientId) -> &mut PatientRules {
        if !self.patients.contains_key(p) {
            let mut r = PatientRules::new(p.as_str(), &self.rules);
            let census = self.ctx.census.patients.snapshot();
            if let Some(a) = census.get(p.as_str()) {
                r.set_location(&self.rules, Some(&a.unit), Some(&a.bed));
            }
            self.patients.insert(p.clone(), r);
        }
        self.patients.get_mut(p).expect("inserted")
    }

    fn emit(&mut self, alerts: impl IntoIterator<Item = Alert>) {
        for a in alerts {
            if self.logged.get(&a.id).is_some_and(|&s| s >= a.seq) {
                continue;
            }
            self.emitted.push(a);
        }
    }

    /// Sends what the last calls produced to the alert thread, to be
    /// published and logged; returns them (for other processes' feeds).
    pub fn flush(&mut self) -> Vec<Alert> {
        for a in &self.emitted {
            let _ = self.ctx.out.send(AlertOut {
                alert: a.clone(),
                log: true,
                to: None,
            });
        }
        std::mem::take(&mut self.emitted)
    }

    /// One publish's readings.
    pub fn on_validated(&mut self, v: &Validated) {
        self.board.on_validated(v);
        match &v.patient {
            Some(p) => {
                if let Some((a, _)) = self.unbound.remove(&v.device) {
                    self.emit([resolved(a, v.received_ns, format!("bound to {p}"))]);
                }
                let rules = self.rules.clone();
                let device = v.device.as_str();
                let mut out = Vec::new();
                let pr = self.patient(p);
                for r in v.readings.iter() {
                    out.extend(pr.on_reading(&rules, device, v.received_ns, r));
                }
                self.emit(out);
            }
            None => {
                if let Some((_, seen)) = self.unbound.get_mut(&v.device) {
                    *seen = (*seen).max(v.received_ns);
                    return;
                }
                let mut a = NewAlert {
                    subject: v.device.as_str(),
                    subject_kind: SubjectKind::Device,
                    patient: None,
                    device: Some(v.device.as_str()),
                    rule: &self.unbound_rule,
                    priority: Priority::Low,
                    first_ns: v.readings.first().map_or(v.received_ns, |r| r.time_ns),
                    at_ns: v.received_ns,
                    evidence: Vec::new(),
                }
                .raise();
                a.unit = Some(UNASSIGNED_UNIT.into());
                self.unbound
                    .insert(v.device.clone(), (a.clone(), v.received_ns));
                self.emit([a]);
            }
        }
    }

    /// A clinician's command.
    pub fn on_command(&mut self, c: &ClinicalCommand) {
        let rules = self.rules.clone();
        match &c.kind {
            CommandKind::Alert {
                alert,
                subject,
                action,
            } => {
                let silence = match action {
                    AlertAction::Acknowledge => None,
                    AlertAction::Silence { for_ns } => Some(*for_ns),
                };
                let result = if let Some(p) = self.patients.get_mut(subject.as_str()) {
                    p.act(alert, silence, &c.by, c.at_ns)
                } else if let Some((a, _)) = DeviceId::new(subject)
                    .ok()
                    .and_then(|d| self.unbound.get_mut(&d))
                    .filter(|(a, _)| a.id == *alert)
                {
                    match silence {
                        None => a.acknowledge(&c.by, c.at_ns),
                        Some(ns) => a.silence(&c.by, ns, c.at_ns),
                    }
                    .map_err(CommandError::from)
                } else {
                    Err(CommandError::Unknown(alert.clone()))
                };
                match result {
                    Ok(a) => {
                        c.answer(Ok(serde_json::to_vec(&a).unwrap_or_default().into()));
                        self.emit([a]);
                    }
                    Err(e) => c.answer(Err(e.to_string())),
                }
            }
            CommandKind::Observe {
                patient,
                observation,
            } => {
                let out = self.patient(patient).on_manual(&rules, *observation);
                self.emit(out);
                c.answer(Ok(Default::default()));
            }
        }
    }

    /// Time passes (the frontier, ms): timed rules, escalations, and
    /// changes of rules, admissions and bindings.
    pub fn on_time(&mut self, now_ms: u64) {
        let now = now_ms as i64 * 1_000_000;
        let rules_version = self.ctx.rules.version();
        if rules_version != self.rules_version {
            let (rules, v) = self.ctx.rules.snapshot();
            self.rules = rules;
            self.rules_version = v;
            let mut out = Vec::new();
            for p in self.patients.values_mut() {
                out.extend(p.reload(&self.rules, now));
            }
            self.emit(out);
        }
        let census_version = self.ctx.census.patients.version();
        if census_version != self.census_version {
            self.census_version = census_version;
            self.relocate(now);
        }
        let registry_version = self.ctx.registry.version();
        if registry_version != self.registry_version {
            self.registry_version = registry_version;
            let reg = self.ctx.registry.snapshot();
            // A device bound (or removed) since its unbound alert: resolved.
            let settled: Vec<DeviceId> = self
                .unbound
                .keys()
                .filter(|d| reg.get(d.as_str()).is_none_or(|r| r.patient.is_some()))
                .cloned()
                .collect();
            let mut out = Vec::new();
            for d in settled {
                if let Some((a, _)) = self.unbound.remove(&d) {
                    let why = match reg.get(d.as_str()).and_then(|r| r.patient.as_ref()) {
                        Some(p) => format!("bound to {p}"),
                        None => "device removed".into(),
                    };
                    out.push(resolved(a, now, why));
                }
            }
            self.emit(out);
            for (pid, p) in &mut self.patients {
                let gone: Vec<String> = p
                    .monitor()
                    .devices()
                    .filter(|d| reg.get(d).is_none_or(|r| r.patient.as_ref() != Some(pid)))
                    .map(str::to_string)
                    .collect();
                for d in gone {
                    p.forget_device(&d);
                }
            }
        }
        self.publish_board(now);
        if now - self.last_tick < TICK_NS {
            return;
        }
        self.last_tick = now;
        let rules = self.rules.clone();
        let mut out = Vec::new();
        for p in self.patients.values_mut() {
            out.extend(p.on_tick(&rules, now));
        }
        let quiet: Vec<DeviceId> = self
            .unbound
            .iter()
            .filter(|(_, (_, seen))| now - seen > UNBOUND_QUIET_NS)
            .map(|(d, _)| d.clone())
            .collect();
        for d in quiet {
            if let Some((a, _)) = self.unbound.remove(&d) {
                out.push(resolved(a, now, "device silent".into()));
            }
        }
        for (a, _) in self.unbound.values_mut() {
            out.extend(a.on_tick(now));
        }
        self.emit(out);
    }

    /// Hands the console's board what changed (when due), with each
    /// changed patient's NEWS2 from the same latest values the rules see.
    fn publish_board(&mut self, now: i64) {
        let freshness = self
            .rules
            .rules
            .iter()
            .find_map(|r| match &r.kind {
                RuleKind::News2(n) => Some(n.freshness_ns),
                _ => None,
            })
            .unwrap_or(BOARD_NEWS2_FRESHNESS_NS);
        let patients = &self.patients;
        self.board
            .on_time(now, patients.keys().map(|p| p.as_str()), |p| {
                let (score, _) = patients.get(p)?.monitor().news2(freshness, now)?;
                Some(crate::board::News2 {
                    score: score.total,
                    risk: score.risk,
                    t_ns: now,
                })
            });
    }

    /// Applies the census: new units and beds; discharged patients' alerts
    /// resolve and their state is dropped.
    fn relocate(&mut self, now: i64) {
        let census = self.ctx.census.patients.snapshot();
        let mut discharged = Vec::new();
        for (pid, p) in &mut self.patients {
            match census.get(pid.as_str()) {
                Some(a) => p.set_location(&self.rules, Some(&a.unit), Some(&a.bed)),
                None if p.unit().is_some() => discharged.push(pid.clone()),
                None => {}
            }
        }
        let mut out = Vec::new();
        for pid in discharged {
            if let Some(mut p) = self.patients.remove(&pid) {
                out.extend(p.resolve_all("discharged", now));
            }
            self.board.forget(pid.as_str());
        }
        self.emit(out);
    }
}

/// A transition on its way to the feeds, and to the alert log if this
/// process decided it.
pub struct AlertOut {
    pub alert: Alert,
    pub log: bool,
    /// Only to this clinician, under a consent (the consent join's
    /// deliveries outside the admitting unit).
    pub to: Option<(String, wardflow_ingest::feeds::GrantRef)>,
}

/// Writes transitions to the feeds on its own thread, on the alert path,
/// and hands those this process decided to the alert log's thread (a
/// clinician must not wait for a disk); joining it joins both.
pub fn spawn_alert_thread(
    rx: crossbeam_channel::Receiver<AlertOut>,
    hub: Arc<AlertHub>,
    path: PathBuf,
    metrics: Arc<crate::metrics::Metrics>,
    scheduling: wardflow_ingest::priority::AlertPathScheduling,
    ledger: Option<crossbeam_channel::Sender<crate::ledger::LedgerEvent>>,
    questdb: Option<wardflow_storage::questdb::SinkHandle>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // Where the next line starts, for the audit trail's record of it.
    let end = file.metadata()?.len();
    // QuestDB: first what the log holds beyond what QuestDB is known to
    // have, then each write as it happens.
    let questdb = match questdb {
        Some(sink) => {
            let shipped = spawn_alert_shipper(&path)?;
            let (rows, upto) = unshipped_alerts(&path, end)?;
            if !rows.is_empty() {
                tracing::info!(
                    transitions = rows.alerts(),
                    "sending the alert log's transitions QuestDB does not have yet"
                );
            }
            ship_alerts(&sink, &shipped, rows, upto);
            Some((sink, shipped))
        }
        None => None,
    };
    // The log has a thread of its own: an fsync that waits for the disk
    // (tens of milliseconds, now and then, while flushes write) must not
    // hold back the next transition's way to the feeds.
    let (log_tx, log_rx) = crossbeam_channel::unbounded::<(Alert, Vec<u8>)>();
    let logger = {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("alert-log".into())
            .spawn(move || write_alert_log(log_rx, file, end, &path, &metrics, ledger, questdb))?
    };
    Ok(std::thread::Builder::new()
        .name("alerts".into())
        .spawn(move || {
            metrics.ingest.enter_alert_path(scheduling);
            while let Ok(AlertOut { alert: a, log, to }) = rx.recv() {
                let json = serde_json::to_vec(&a).unwrap_or_default();
                if let Some((clinician, grant)) = to {
                    hub.publish_granted(&feed_item(&a, json), &clinician, grant);
                    continue;
                }
                hub.publish(feed_item(&a, json.clone()), wardflow_model::now_ns());
                if log {
                    metrics
                        .engine
                        .alert_transitions
                        .get_or_create(&[("event", event_name(a.event))])
                        .inc();
                    let _ = log_tx.send((a, json));
                }
            }
            drop(log_tx);
            if logger.join().is_err() {
                tracing::error!("the alert log's thread panicked");
            }
        })?)
}

/// Appends transitions to the alert log, with one fsync for whatever
/// arrived together; once logged, they go to the audit trail and QuestDB.
fn write_alert_log(
    rx: crossbeam_channel::Receiver<(Alert, Vec<u8>)>,
    mut file: File,
    mut end: u64,
    path: &Path,
    metrics: &crate::metrics::Metrics,
    ledger: Option<crossbeam_channel::Sender<crate::ledger::LedgerEvent>>,
    questdb: Option<(wardflow_storage::questdb::SinkHandle, Shipped)>,
) {
    let mut buf = Vec::new();
    let mut lines: Vec<(u64, usize)> = Vec::new();
    let mut rows = wardflow_storage::questdb::Batch::default();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((a, json)) = next {
            lines.push((buf.len() as u64, json.len()));
            buf.extend_from_slice(&json);
            buf.push(b'\n');
            if questdb.is_some() {
                rows.push_alert(alert_row(&a));
            }
            next = rx.try_recv().ok();
        }
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                if let Some(ledger) = &ledger {
                    let logged = lines
                        .iter()
                        .map(|&(at, len)| (end + at, buf[at as usize..at as usize + len].to_vec()))
                        .collect();
                    let _ = ledger.send(crate::ledger::LedgerEvent::AlertLines(logged));
                }
                end += buf.len() as u64;
                // Logged, so recorded: now to QuestDB as well.
                if let Some((sink, shipped)) = &questdb {
                    ship_alerts(sink, shipped, std::mem::take(&mut rows), end);
                }
            }
            Err(e) => {
                tracing::error!("alert log {}: {e}", path.display());
                metrics.engine.alert_log_errors.inc();
                // Where the file ends now, whatever part was written.
                end = file.metadata().map_or(end, |m| m.len());
            }
        }
        buf.clear();
        lines.clear();
        rows = wardflow_storage::questdb::Batch::default();
    }
}

/// Where the alert log's transitions stand with QuestDB: every line
/// before this offset of the log is in QuestDB (or its spool).
fn shipped_path(log: &Path) -> PathBuf {
    log.with_extension("questdb-offset")
}

/// The transitions of the alert log from the shipped offset to `end`
/// (whole lines only), and the offset after them.
fn unshipped_alerts(
    log: &Path,
    end: u64,
) -> anyhow::Result<(wardflow_storage::questdb::Batch, u64)> {
    let from = std::fs::read_to_string(shipped_path(log))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(end);
    let mut batch = wardflow_storage::questdb::Batch::default();
    if from == end {
        return Ok((batch, end));
    }
    let mut f = File::open(log).map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, end - from), &mut bytes)?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    for line in bytes[..whole].split(|&b| b == b'\n') {
        // A torn line of an earlier crash is skipped, as read_log does.
        if let Ok(a) = serde_json::from_slice::<Alert>(line) {
            batch.push_alert(alert_row(&a));
        }
    }
    Ok((batch, from + whole as u64))
}

/// Transitions handed to QuestDB and the log offset after them.
/// `None` stands for transitions the sink refused: the offset must not pass them.
type Shipped = crossbeam_channel::Sender<(Option<wardflow_storage::questdb::Receipt>, u64)>;

fn ship_alerts(
    sink: &wardflow_storage::questdb::SinkHandle,
    shipped: &Shipped,
    rows: wardflow_storage::questdb::Batch,
    upto: u64,
) {
    match sink.submit_later(rows) {
        Ok(receipt) => {
            let _ = shipped.send((Some(receipt), upto));
        }
        Err(e) => {
            tracing::error!(
                "alert transitions not sent to QuestDB (they stay in the alert log and are sent after a restart): {e}"
            );
            let _ = shipped.send((None, upto));
        }
    }
}

/// Waits, in order, for the transitions handed to QuestDB to be delivered
/// or spooled, and records the alert log's offset after each, so that a
/// restart sends again only what QuestDB may not have (its `alerts` table
/// deduplicates what it does have). After a failure the offset stays where
/// it was until the next start.
fn spawn_alert_shipper(log: &Path) -> anyhow::Result<Shipped> {
    let (tx, rx) =
        crossbeam_channel::unbounded::<(Option<wardflow_storage::questdb::Receipt>, u64)>();
    let path = shipped_path(log);
    std::thread::Builder::new()
        .name("alerts-questdb".into())
        .spawn(move || {
            let mut stuck = false;
            for (receipt, upto) in rx {
                match receipt.map(|r| r.wait()) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::error!("alert transitions not stored in QuestDB; they are sent again after a restart: {e}");
                        stuck = true;
                    }
                    None => stuck = true,
                }
                if stuck {
                    continue;
                }
                let tmp = path.with_extension("tmp");
                let written = std::fs::write(&tmp, upto.to_string())
                    .and_then(|()| File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = written {
                    tracing::warn!("{}: {e}", path.display());
                }
            }
        })?;
    Ok(tx)
}

/// An alert transition as a row of QuestDB's `alerts` table.
pub fn alert_row(a: &Alert) -> wardflow_storage::questdb::AlertRow {
    // The names the alert log uses (serde's), so both read alike.
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    wardflow_storage::questdb::AlertRow {
        at_ns: a.at_ns,
        alert_id: a.id.clone(),
        seq: a.seq,
        event: event_name(a.event).to_string(),
        state: name(serde_json::to_value(a.state)),
        priority: name(serde_json::to_value(a.priority)),
        base_priority: name(serde_json::to_value(a.base_priority)),
        rule: a.rule.clone(),
        subject: a.subject.clone(),
        subject_kind: name(serde_json::to_value(a.subject_kind)),
        patient: a.patient.clone(),
        device: a.device.clone(),
        care_unit: a.unit.clone(),
        bed: a.bed.clone(),
        description: a.description.clone(),
        technical: a.technical,
        condition: a.condition,
        raised_ns: a.raised_ns,
        first_reading_ns: a.first_reading_ns,
        by: a.by.clone(),
    }
}

fn event_name(e: AlertEventKind) -> &'static str {
    match e {
        AlertEventKind::Raised => "raised",
        AlertEventKind::Reprioritized => "reprioritized",
        AlertEventKind::ConditionCleared => "condition_cleared",
        AlertEventKind::ConditionReturned => "condition_returned",
        AlertEventKind::Acknowledged => "acknowledged",
        AlertEventKind::Silenced => "silenced",
        AlertEventKind::SilenceEnded => "silence_ended",
        AlertEventKind::Escalated => "escalated",
        AlertEventKind::Resolved => "resolved",
    }
}

/// Publishes the open alerts found at start to the feeds (not the log).
pub fn publish_restored(hub: &AlertHub, restored: &HashMap<String, Alert>) {
    let mut open: Vec<&Alert> = restored.values().filter(|a| a.state.is_open()).collect();
    open.sort_by_key(|a| a.at_ns);
    for a in open {
        let json = serde_json::to_vec(a).unwrap_or_default();
        hub.publish(feed_item(a, json), wardflow_model::now_ns());
    }
}

/// An alert transition as the feeds carry it.
fn feed_item(a: &Alert, json: Vec<u8>) -> FeedItem {
    let unit = a.unit.clone().unwrap_or_else(|| UNASSIGNED_UNIT.into());
    FeedItem {
        topic: alert_topic(&unit, &a.id),
        id: a.id.clone(),
        unit,
        subject: a.subject.clone(),
        patient: a.patient.clone(),
        open: a.state.is_open(),
        seq: a.seq,
        at_ns: a.at_ns,
        json: json.into(),
        grant: None,
    }
}
