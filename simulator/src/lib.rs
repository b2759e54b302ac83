//! Virtual patients and devices for Wardflow: they publish realistic vital
//! signs over MQTT and report what got through.
//!
//! This crate owns the physiology model ([`physiology`]), scripted patient
//! scenarios and their offline generator ([`scenario`]), device
//! registration for test runs ([`register`], [`register_scenario`]), the
//! MQTT publishers (MQTT 3.1.1, QoS 0 or 1, SenML or binary frames, see
//! [`mqtt`]; [`run`] for load, [`run_scenario`] for scenarios in real time)
//! and the load report ([`Report`]). It knows nothing of the engine's
//! insides: it talks to any MQTT server (Wardflow, or Mosquitto as a
//! baseline).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::sync::atomic::AtomicBool;
//! use wardflow_simulator::{SimConfig, register, run};
//!
//! let config = SimConfig { devices: 5, rate: 10.0, duration: Some(std::time::Duration::from_secs(3)), ..SimConfig::default() };
//! let creds = register(std::path::Path::new("./wardflow-data"), &config).unwrap();
//! let report = run(&config, creds, Arc::new(AtomicBool::new(false)), |p| eprintln!("{p}"));
//! println!("{}", report.to_json());
//! ```

pub mod mqtt;
pub mod physiology;
pub mod scenario;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;
use wardflow_ingest::codec::{frame, senml};
use wardflow_ingest::registry::{Registry, RegistryError};
use wardflow_ingest::server::readings_topic;
use wardflow_model::{DeviceId, Metric, PatientId, Unit, now_ns};

use crate::physiology::{MONITOR_METRICS, VirtualPatient, Vital};
use crate::scenario::{
    ArtefactInterval, EventKind, PatientRun, Scenario, ScenarioReading, ScenarioRun,
};

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    Senml,
    Binary,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `host:port` of the MQTT server.
    pub target: String,
    pub devices: usize,
    /// Readings per second per device; 0 sends as fast as the server takes them.
    pub rate: f64,
    /// How long to publish; `None` until stopped.
    pub duration: Option<Duration>,
    pub payload: PayloadKind,
    /// Readings per publish.
    pub batch: usize,
    /// 0 or 1.
    pub qos: u8,
    /// QoS 1 publishes in flight per connection.
    pub window: u16,
    /// Threads (event loops) to spread the devices over.
    pub threads: usize,
    /// Share of publishes replaced by a faulty one (broken payload, NaN,
    /// absurd value, wrong unit), to exercise dead letters.
    pub bad_ratio: f64,
    pub seed: u64,
    /// Device ids are `{prefix}{i:04}`, patients `{prefix}patient-{i:04}`.
    pub device_prefix: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            target: "127.0.0.1:1883".into(),
            devices: 10,
            rate: 7.0,
            duration: Some(Duration::from_secs(10)),
            payload: PayloadKind::Senml,
            batch: 7,
            qos: 1,
            window: 32,
            threads: 1,
            bad_ratio: 0.0,
            seed: 1,
            device_prefix: "sim-".into(),
        }
    }
}

/// A device's identity and secret.
#[derive(Debug, Clone)]
pub struct Credential {
    pub device: DeviceId,
    pub patient: PatientId,
    pub secret: String,
}

/// The simulated devices' ids.
pub fn device_ids(config: &SimConfig) -> Vec<(DeviceId, PatientId)> {
    (0..config.devices)
        .map(|i| {
            let p = &config.device_prefix;
            (
                DeviceId::new(&format!("{p}{i:04}")).expect("valid device id"),
                PatientId::new(&format!("{p}patient-{i:04}")).expect("valid patient id"),
            )
        })
        .collect()
}

/// Registers the simulated devices in `data_dir` with fresh secrets,
/// replacing earlier registrations of the same ids.
pub fn register(data_dir: &Path, config: &SimConfig) -> Result<Vec<Credential>, RegistryError> {
    register_ids(data_dir, device_ids(config))
}

/// Registers a scenario's devices, each bound to its patient, in `data_dir`
/// with fresh secrets, replacing earlier registrations of the same ids.
pub fn register_scenario(
    data_dir: &Path,
    scenario: &Scenario,
) -> Result<Vec<Credential>, wardflow_ingest::census::CensusError> {
    use wardflow_ingest::census::{Census, CensusError, Sex};
    let creds = register_ids(
        data_dir,
        scenario
            .patients
            .iter()
            .map(|p| (p.device.clone(), p.id.clone()))
            .collect(),
    )?;
    // Admit each patient to the scenario's unit and bed (moving them there
    // if they are admitted already), so alerts reach the unit's feed.
    for p in &scenario.patients {
        let sex = p.sex.map(|s| match s {
            scenario::Sex::Female => Sex::F,
            scenario::Sex::Male => Sex::M,
            scenario::Sex::Other => Sex::X,
        });
        let admitted =
            match Census::admit(data_dir, p.id.clone(), &p.unit, &p.bed, p.age_years, sex) {
                Err(CensusError::AlreadyAdmitted(_)) => {
                    Census::transfer(data_dir, p.id.as_str(), &p.unit, &p.bed).map(|_| ())
                }
                other => other.map(|_| ()),
            };
        match admitted {
            Ok(()) => {}
            // Another patient lies there: the scenario still runs, its
            // alerts go to the unassigned feed.
            Err(e @ CensusError::BedTaken { .. }) => {
                tracing::warn!("patient {} not admitted: {e}", p.id)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(creds)
}

/// The scenario's devices that `creds` has no secret for.
pub fn missing_credentials<'a>(scenario: &'a Scenario, creds: &[Credential]) -> Vec<&'a DeviceId> {
    scenario
        .patients
        .iter()
        .map(|p| &p.device)
        .filter(|d| !creds.iter().any(|c| &c.device == *d))
        .collect()
}

fn register_ids(
    data_dir: &Path,
    ids: Vec<(DeviceId, PatientId)>,
) -> Result<Vec<Credential>, RegistryError> {
    let existing = Registry::load(data_dir)?;
    for (d, _) in &ids {
        if existing.get(d.as_str()).is_some() {
            Registry::remove(data_dir, d.as_str())?;
        }
    }
    let secrets = Registry::add_many(
        data_dir,
        ids.iter().map(|(d, p)| (d.clone(), Some(p.clone()), None)),
    )?;
    Ok(ids
        .into_iter()
        .zip(secrets)
        .map(|((device, patient), secret)| Credential {
            device,
            patient,
            secret,
        })
        .collect())
}

#[derive(Default)]
struct Counters {
    sent_readings: AtomicU64,
    sent_publishes: AtomicU64,
    acked_readings: AtomicU64,
    acked_publishes: AtomicU64,
    errors: AtomicU64,
    connect_errors: AtomicU64,
    bad_injected: AtomicU64,
    /// Motion artefacts the scenario devices generated (collected once per
    /// device, when it stops).
    artefacts: Mutex<Vec<ArtefactInterval>>,
}

/// A progress snapshot, printed once a second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub sent_readings: u64,
    pub acked_readings: u64,
    pub errors: u64,
    /// Readings per second over the last interval.
    pub rate: f64,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulate: {:>5.1}s  sent {:>10}  acked {:>10}  errors {:>4}  {:>10.0} readings/s",
            self.elapsed.as_secs_f64(),
            self.sent_readings,
            self.acked_readings,
            self.errors,
            self.rate
        )
    }
}

/// Ack latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: usize,
    pub payload: PayloadKind,
    pub batch: usize,
    pub qos: u8,
    pub duration_s: f64,
    /// Readings sent.
    pub sent: u64,
    /// Readings acknowledged (QoS 1; 0 for QoS 0).
    pub acked: u64,
    pub publishes: u64,
    pub acked_publishes: u64,
    /// Failed publishes and connections.
    pub errors: u64,
    pub connect_errors: u64,
    /// Faulty publishes sent on purpose (`bad_ratio`).
    pub bad_injected: u64,
    /// Acknowledged readings per second (QoS 1), sent readings per second (QoS 0).
    pub readings_per_s: f64,
    pub publishes_per_s: f64,
    /// From publish to PUBACK; `null` for QoS 0.
    pub ack_latency_ms: Option<Latency>,
    /// The scenario's name (scenario runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    /// Every scripted event with its onset in wall-clock time (scenario runs
    /// only), so that a test can measure the delay from onset to alert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventReport>>,
    /// Every motion artefact that was published (scenario runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artefacts: Option<Vec<ArtefactReport>>,
}

/// A scripted event of a scenario run, in wall-clock time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventReport {
    pub patient: PatientId,
    pub device: DeviceId,
    pub kind: EventKind,
    /// Onset, milliseconds since the Unix epoch: the run's start plus the
    /// event's offset. Readings carry the same clock (start plus their
    /// offset), so the first reading affected is at or just after this time.
    pub onset_ms: i64,
    /// When the effect is over, milliseconds since the Unix epoch; `null` if
    /// it lasts to the end.
    pub end_ms: Option<i64>,
}

/// A motion artefact of a scenario run, in wall-clock time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArtefactReport {
    pub patient: PatientId,
    /// First artefact reading, milliseconds since the Unix epoch.
    pub start_ms: i64,
    /// Just after the last artefact reading, milliseconds since the Unix epoch.
    pub end_ms: i64,
    /// The metrics that read wrong.
    pub metrics: Vec<Metric>,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} devices, {:?} payloads of {} readings, QoS {}, {:.1} s",
            self.devices, self.payload, self.batch, self.qos, self.duration_s
        )?;
        writeln!(
            f,
            "sent {} readings in {} publishes; acked {}; errors {} ({} on connect); faulty on purpose {}",
            self.sent,
            self.publishes,
            self.acked,
            self.errors,
            self.connect_errors,
            self.bad_injected
        )?;
        write!(
            f,
            "{:.0} readings/s, {:.0} publishes/s",
            self.readings_per_s, self.publishes_per_s
        )?;
        if let Some(l) = self.ack_latency_ms {
            write!(
                f,
                "\nack latency ms: p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.p50, l.p99, l.p999, l.max
            )?;
        }
        if let Some(name) = &self.scenario {
            write!(f, "\nscenario {name}")?;
            for e in self.events.iter().flatten() {
                write!(
                    f,
                    "\n  {} {} ({}): onset {} ms",
                    e.patient, e.kind, e.device, e.onset_ms
                )?;
                if let Some(end) = e.end_ms {
                    write!(f, ", over {end} ms")?;
                }
            }
            if let Some(a) = &self.artefacts {
                write!(f, "\n  {} motion artefacts published", a.len())?;
            }
        }
        Ok(())
    }
}

/// Runs the simulation until `config.duration` passes or `stop` is set,
/// calling `progress` about once a second. Devices that cannot connect are
/// counted as errors; the others keep going.
pub fn run(
    config: &SimConfig,
    creds: Vec<Credential>,
    stop: Arc<AtomicBool>,
    progress: impl Fn(&Progress),
) -> Report {
    let devices = creds.into_iter().map(|c| (c, None)).collect();
    run_devices(config, devices, stop, progress).0
}

/// Plays `scenario` in real time: one device per scenario patient (its
/// secret looked up in `creds` by device id), each publishing that
/// patient's readings at 1 Hz per metric, timestamped at the run's start
/// plus their offset in the scenario, with `config`'s payload, batch, QoS,
/// window, threads and faulty share. Runs until `config.duration` passes
/// (pass `Some(scenario.duration)` for the scripted length; runs longer than
/// the script keep its last state) or `stop` is set; `config.devices`,
/// `rate`, `seed` and `device_prefix` do not apply.
///
/// Each device publishes full batches only: readings generated after its
/// last full batch (fewer than `config.batch`) are not sent. Devices without
/// a credential count as connect errors. The report adds the scenario's
/// events with their wall-clock onsets and the artefacts that were published.
pub fn run_scenario(
    config: &SimConfig,
    scenario: &Scenario,
    creds: Vec<Credential>,
    stop: Arc<AtomicBool>,
    progress: impl Fn(&Progress),
) -> Report {
    let config = SimConfig {
        devices: scenario.patients.len(),
        ..config.clone()
    };
    let mut missing = 0;
    let mut devices = Vec::with_capacity(scenario.patients.len());
    for patient in ScenarioRun::new(scenario).into_patients() {
        match creds.iter().find(|c| &c.device == patient.device()) {
            Some(c) => devices.push((c.clone(), Some(patient))),
            None => {
                tracing::warn!(device = %patient.device(), "no credential; not publishing");
                missing += 1;
            }
        }
    }
    let (mut report, outcome) = run_devices(&config, devices, stop, progress);
    report.connect_errors += missing;
    report.errors += missing;
    let at = |offset: Duration| (outcome.epoch_ns + offset.as_nanos() as i64) / 1_000_000;
    report.scenario = Some(scenario.name.clone());
    report.events = Some(
        ScenarioRun::new(scenario)
            .events()
            .iter()
            .map(|e| EventReport {
                patient: e.patient.clone(),
                device: e.device.clone(),
                kind: e.kind,
                onset_ms: at(e.onset),
                end_ms: e.end.map(at),
            })
            .collect(),
    );
    let mut artefacts = outcome.artefacts;
    artefacts.sort_by_key(|a| (a.start, a.patient_index));
    report.artefacts = Some(
        artefacts
            .into_iter()
            .map(|a| ArtefactReport {
                patient: a.patient,
                start_ms: at(a.start),
                end_ms: at(a.end),
                metrics: a.metrics,
            })
            .collect(),
    );
    report
}

/// What a run leaves besides its report.
struct Outcome {
    /// Wall-clock start of the run, ns since the Unix epoch.
    epoch_ns: i64,
    artefacts: Vec<ArtefactInterval>,
}

fn run_devices(
    config: &SimConfig,
    devices: Vec<(Credential, Option<PatientRun>)>,
    stop: Arc<AtomicBool>,
    progress: impl Fn(&Progress),
) -> (Report, Outcome) {
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let epoch_ns = now_ns();
    let deadline = config.duration.map(|d| started + d);
    let threads = config.threads.clamp(1, devices.len().max(1));
    let mut per_thread: Vec<Vec<DeviceJob>> = (0..threads).map(|_| Vec::new()).collect();
    for (index, (cred, script)) in devices.into_iter().enumerate() {
        per_thread[index % threads].push(DeviceJob {
            index,
            cred,
            script: script.map(|run| ScenarioVitals::new(run, started, epoch_ns)),
        });
    }
    let handles: Vec<_> = per_thread
        .into_iter()
        .enumerate()
        .map(|(t, devices)| {
            let (config, counters, stop) = (config.clone(), counters.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("sim-{t}"))
                .spawn(move || run_thread(config, devices, counters, stop, deadline))
                .expect("spawn simulator thread")
        })
        .collect();

    let (mut last, mut last_at) = (0u64, Instant::now());
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last_at.elapsed() >= Duration::from_secs(1) {
            let sent = counters.sent_readings.load(Ordering::Relaxed);
            let now = Instant::now();
            progress(&Progress {
                elapsed: started.elapsed(),
                sent_readings: sent,
                acked_readings: counters.acked_readings.load(Ordering::Relaxed),
                errors: counters.errors.load(Ordering::Relaxed),
                rate: (sent - last) as f64 / (now - last_at).as_secs_f64(),
            });
            (last, last_at) = (sent, now);
        }
    }
    let mut hist = new_histogram();
    for h in handles {
        if let Ok(th) = h.join() {
            let _ = hist.add(&th);
        }
    }
    // Time spent publishing; the QoS 1 drain after the deadline is not counted.
    let elapsed = match deadline {
        Some(d) => d.min(Instant::now()).duration_since(started),
        None => started.elapsed(),
    }
    .as_secs_f64()
    .max(1e-9);
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (sent, acked) = (c(&counters.sent_readings), c(&counters.acked_readings));
    let qos1 = config.qos >= 1;
    let report = Report {
        devices: config.devices,
        payload: config.payload,
        batch: config.batch,
        qos: config.qos,
        duration_s: elapsed,
        sent,
        acked,
        publishes: c(&counters.sent_publishes),
        acked_publishes: c(&counters.acked_publishes),
        errors: c(&counters.errors),
        connect_errors: c(&counters.connect_errors),
        bad_injected: c(&counters.bad_injected),
        readings_per_s: if qos1 { acked } else { sent } as f64 / elapsed,
        publishes_per_s: c(&counters.sent_publishes) as f64 / elapsed,
        ack_latency_ms: (qos1 && !hist.is_empty()).then(|| {
            let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
            Latency {
                p50: q(0.5),
                p99: q(0.99),
                p999: q(0.999),
                max: hist.max() as f64 / 1000.0,
            }
        }),
        scenario: None,
        events: None,
        artefacts: None,
    };
    let artefacts = std::mem::take(
        &mut *counters
            .artefacts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    (
        report,
        Outcome {
            epoch_ns,
            artefacts,
        },
    )
}

/// One device to simulate: its place in the run, its identity, and, in a
/// scenario, its scripted patient.
struct DeviceJob {
    index: usize,
    cred: Credential,
    script: Option<ScenarioVitals>,
}

/// Latencies in microseconds, up to a minute, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn run_thread(
    config: SimConfig,
    devices: Vec<DeviceJob>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
) -> Histogram<u64> {
    let hist = Rc::new(RefCell::new(new_histogram()));
    let h = hist.clone();
    let config = Rc::new(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let tasks: Vec<_> = devices
            .into_iter()
            .map(|job| {
                tokio::task::spawn_local(device_task(
                    config.clone(),
                    job,
                    counters.clone(),
                    stop.clone(),
                    deadline,
                    h.clone(),
                ))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    Rc::try_unwrap(hist)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone())
}

/// Builds publishes for one device.
struct DeviceSource {
    vitals: Vitals,
    seq: u64,
    records: Vec<frame::Record>,
    faults: u64,
}

/// Where a device's readings come from.
enum Vitals {
    /// A virtual patient stepped as fast as the configured rate asks.
    Load(LoadVitals),
    /// A scripted patient, in real time.
    Scenario(Box<ScenarioVitals>),
}

struct LoadVitals {
    patient: VirtualPatient,
    pending: Vec<Vital>,
    /// Simulated seconds per patient step.
    dt: f64,
}

impl LoadVitals {
    /// Next `batch` vitals with their times (spread over the batch period).
    fn take(&mut self, batch: usize) -> Vec<(Vital, i64)> {
        let now = now_ns();
        let spacing = (self.dt / MONITOR_METRICS.len() as f64 * 1e9) as i64;
        let mut out = Vec::with_capacity(batch);
        for k in 0..batch {
            if self.pending.is_empty() {
                let mut v = self.patient.step(self.dt.max(1e-3)).to_vec();
                v.reverse();
                self.pending = v;
            }
            let vital = self.pending.pop().expect("refilled");
            out.push((vital, now - (batch - 1 - k) as i64 * spacing));
        }
        out
    }
}

/// A scenario patient played against the wall clock: readings become
/// available when their offset since the run's start has passed, and carry
/// the run's start time plus that offset.
struct ScenarioVitals {
    run: PatientRun,
    started: Instant,
    epoch_ns: i64,
    generated: Vec<ScenarioReading>,
    ready: VecDeque<(Vital, i64)>,
}

impl ScenarioVitals {
    fn new(run: PatientRun, started: Instant, epoch_ns: i64) -> ScenarioVitals {
        ScenarioVitals {
            run,
            started,
            epoch_ns,
            generated: Vec::new(),
            ready: VecDeque::new(),
        }
    }

    /// Generates the readings due by now; true if a full batch is ready.
    fn batch_ready(&mut self, batch: usize) -> bool {
        self.run.step(self.started.elapsed(), &mut self.generated);
        for r in self.generated.drain(..) {
            let t = self.epoch_ns + r.offset.as_nanos() as i64;
            self.ready.push_back((
                Vital {
                    metric: r.metric,
                    value: r.value,
                    quality: r.quality,
                },
                t,
            ));
        }
        self.ready.len() >= batch
    }

    /// Until the next second's readings are due.
    fn wait(&self) -> Duration {
        self.run
            .position()
            .saturating_sub(self.started.elapsed())
            .clamp(Duration::from_micros(100), Duration::from_millis(100))
    }

    fn take(&mut self, batch: usize) -> Vec<(Vital, i64)> {
        let n = batch.min(self.ready.len());
        self.ready.drain(..n).collect()
    }
}

impl DeviceSource {
    fn load(patient: VirtualPatient, dt: f64, batch: usize) -> DeviceSource {
        DeviceSource {
            vitals: Vitals::Load(LoadVitals {
                patient,
                pending: Vec::new(),
                dt,
            }),
            seq: 0,
            records: Vec::with_capacity(batch),
            faults: 0,
        }
    }

    /// Next `batch` vitals with their times.
    fn take(&mut self, batch: usize) -> Vec<(Vital, i64)> {
        match &mut self.vitals {
            Vitals::Load(v) => v.take(batch),
            Vitals::Scenario(v) => v.take(batch),
        }
    }

    fn payload(&mut self, kind: PayloadKind, batch: usize, fault: bool) -> Vec<u8> {
        let mut vitals = self.take(batch);
        let seq = self.seq;
        self.seq += batch as u64;
        let mut fault_kind = None;
        if fault {
            let k = self.faults % 4;
            self.faults += 1;
            fault_kind = Some(k);
            match k {
                1 => vitals[0].0.value = f64::NAN,
                2 => {
                    vitals[0].0.metric = Metric::Spo2;
                    vitals[0].0.value = 140.0;
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        match kind {
            PayloadKind::Binary => {
                let base = vitals[0].1;
                self.records.clear();
                self.records.extend(vitals.iter().map(|(v, t)| {
                    frame::Record::new(
                        v.metric,
                        ((t - base) / 1000).max(0) as u32,
                        v.value,
                        v.quality.0,
                    )
                }));
                if fault_kind == Some(3) {
                    // A heart rate in degrees Celsius.
                    self.records[0].mdc_code = Metric::Hr.mdc_code();
                    self.records[0].unit_id = frame::unit_id(Unit::Celsius);
                }
                frame::encode(seq, base, &self.records, &mut out);
                if fault_kind == Some(0) {
                    out.truncate(out.len() - 5);
                }
            }
            PayloadKind::Senml => {
                let base = vitals[0].1;
                if fault_kind == Some(1) {
                    // JSON has no NaN; devices that try send a string.
                    out.extend_from_slice(
                        format!(r#"[{{"n":"hr","v":"NaN","seq":{seq}}}]"#).as_bytes(),
                    );
                } else if fault_kind == Some(3) {
                    out.extend_from_slice(
                        format!(r#"[{{"n":"hr","u":"Cel","v":37,"seq":{seq}}}]"#).as_bytes(),
                    );
                } else {
                    senml::encode(
                        base,
                        vitals
                            .iter()
                            .enumerate()
                            .map(|(i, (v, t))| (v.metric, *t, v.value, Some(seq + i as u64))),
                        &mut out,
                    );
                    if fault_kind == Some(0) {
                        out.truncate(out.len() / 2);
                    }
                }
            }
        }
        out
    }
}

async fn device_task(
    config: Rc<SimConfig>,
    job: DeviceJob,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
    hist: Rc<RefCell<Histogram<u64>>>,
) {
    let DeviceJob {
        index,
        cred,
        script,
    } = job;
    let mut conn = None;
    for attempt in 0..20 {
        match mqtt::connect(&config.target, cred.device.as_str(), cred.secret.as_bytes()).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            // A refusal may be a registration the server has not loaded yet: retry that too.
            Err(e) if attempt == 19 => {
                tracing::warn!(device = %cred.device, "could not connect: {e}");
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    let Some(mqtt::Connection { reader, mut writer }) = conn else {
        counters.connect_errors.fetch_add(1, Ordering::Relaxed);
        counters.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let inflight = mqtt::Inflight::new();
    let acked = Rc::new(tokio::sync::Notify::new());
    let closed = Rc::new(std::cell::Cell::new(false));
    {
        let (inflight, acked, closed) = (inflight.clone(), acked.clone(), closed.clone());
        tokio::task::spawn_local(async move {
            let _ = mqtt::read_acks(reader, inflight, &acked).await;
            closed.set(true);
            acked.notify_one();
        });
    }

    let topic = readings_topic(cred.device.as_str()).into_bytes();
    let batch = config.batch.max(1);
    let per_publish = if config.rate > 0.0 {
        batch as f64 / config.rate
    } else {
        0.0
    };
    let mut source = match script {
        Some(vitals) => DeviceSource {
            vitals: Vitals::Scenario(Box::new(vitals)),
            seq: 0,
            records: Vec::with_capacity(batch),
            faults: 0,
        },
        None => DeviceSource::load(
            VirtualPatient::new(
                config
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add(index as u64),
            ),
            if config.rate > 0.0 {
                MONITOR_METRICS.len() as f64 / config.rate
            } else {
                1.0
            },
            batch,
        ),
    };
    let mut fault_rng: u64 = config.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next_fault = || {
        // xorshift64: cheap and deterministic per device.
        fault_rng ^= fault_rng << 13;
        fault_rng ^= fault_rng >> 7;
        fault_rng ^= fault_rng << 17;
        (fault_rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let qos1 = config.qos >= 1;
    let window = config.window.max(1) as usize;
    let start = Instant::now();
    let mut last_write = Instant::now();
    let mut sent: u64 = 0;
    let mut packet = Vec::with_capacity(1024);
    let mut failed = false;
    loop {
        if stop.load(Ordering::Relaxed)
            || deadline.is_some_and(|d| Instant::now() >= d)
            || closed.get()
        {
            break;
        }
        // Paced by the configured rate, or in a scenario by its clock.
        let idle = match &mut source.vitals {
            Vitals::Load(_) => {
                // 1 + elapsed / per_publish publishes are due (the first at once).
                per_publish > 0.0 && sent > (start.elapsed().as_secs_f64() / per_publish) as u64
            }
            Vitals::Scenario(v) => !v.batch_ready(batch),
        };
        if idle {
            if writer.flush().await.is_err()
                || mqtt::ping_if_idle(&mut writer, &mut last_write)
                    .await
                    .is_err()
            {
                failed = true;
                break;
            }
            let wait = match &source.vitals {
                Vitals::Load(_) => Duration::from_secs_f64(
                    (sent as f64 * per_publish - start.elapsed().as_secs_f64()).clamp(0.000_1, 0.1),
                ),
                Vitals::Scenario(v) => v.wait(),
            };
            tokio::time::sleep(wait).await;
            continue;
        }
        if qos1 && inflight.borrow().in_flight >= window {
            if writer.flush().await.is_err() {
                failed = true;
                break;
            }
            acked.notified().await;
            continue;
        }
        let fault = config.bad_ratio > 0.0 && next_fault() < config.bad_ratio;
        let payload = source.payload(config.payload, batch, fault);
        if fault {
            counters.bad_injected.fetch_add(1, Ordering::Relaxed);
        }
        packet.clear();
        let id = qos1.then(|| inflight.borrow_mut().take_id());
        mqtt::encode_publish(&mut packet, &topic, id, &payload);
        if writer.write_all(&packet).await.is_err() {
            failed = true;
            break;
        }
        last_write = Instant::now();
        sent += 1;
        counters.sent_publishes.fetch_add(1, Ordering::Relaxed);
        counters
            .sent_readings
            .fetch_add(batch as u64, Ordering::Relaxed);
    }
    // Put everything on the wire, let outstanding QoS 1 publishes finish
    // (bounded), then disconnect.
    failed |= writer.flush().await.is_err();
    let drain_until = Instant::now() + Duration::from_secs(10);
    while qos1 && !closed.get() && inflight.borrow().in_flight > 0 && Instant::now() < drain_until {
        let _ = tokio::time::timeout(Duration::from_millis(50), acked.notified()).await;
    }
    if !closed.get() && mqtt::disconnect(&mut writer).await.is_ok() {
        // The server closes once it has handled everything before DISCONNECT.
        let until = Instant::now() + Duration::from_secs(30);
        while !closed.get() && Instant::now() < until {
            let _ = tokio::time::timeout(Duration::from_millis(50), acked.notified()).await;
        }
    }
    let f = inflight.borrow();
    counters
        .acked_publishes
        .fetch_add(f.acked, Ordering::Relaxed);
    counters
        .acked_readings
        .fetch_add(f.acked * batch as u64, Ordering::Relaxed);
    let unacked = if qos1 { f.in_flight as u64 } else { 0 };
    counters
        .errors
        .fetch_add(unacked + failed as u64, Ordering::Relaxed);
    let mut h = hist.borrow_mut();
    for &us in &f.latencies_us {
        let _ = h.record(us);
    }
    if let Vitals::Scenario(v) = &source.vitals {
        counters
            .artefacts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(v.run.artefacts());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wardflow_ingest::codec;
    use wardflow_model::Metric;

    #[test]
    fn payloads_decode_and_faults_are_what_they_say() {
        let mut src = DeviceSource::load(VirtualPatient::new(3), 1.0, 10);
        for kind in [PayloadKind::Binary, PayloadKind::Senml] {
            let p = src.payload(kind, 10, false);
            let mut out = Vec::new();
            codec::decode(&p, now_ns(), &mut out).unwrap();
            assert_eq!(out.len(), 10);
            assert!(
                out.iter()
                    .all(|d| matches!(d.metric, codec::DecodedMetric::Known(_)))
            );
            // Four faults in turn: broken, NaN, absurd, wrong unit.
            let mut broken = 0;
            for _ in 0..4 {
                let p = src.payload(kind, 10, true);
                let mut out = Vec::new();
                match codec::decode(&p, now_ns(), &mut out) {
                    Err(_) => broken += 1,
                    Ok(_) => assert!(!out.is_empty()),
                }
            }
            assert_eq!(broken, 1);
            src.faults = 0;
        }
        assert_eq!(src.seq, 100, "every publish uses fresh sequence numbers");
    }

    #[test]
    fn device_ids_are_valid_and_distinct() {
        let ids = device_ids(&SimConfig {
            devices: 50,
            ..SimConfig::default()
        });
        assert_eq!(ids.len(), 50);
        assert_eq!(ids[7].0.as_str(), "sim-0007");
        assert_eq!(ids[7].1.as_str(), "sim-patient-0007");
    }

    /// A bare MQTT 3.1.1 server: accepts every device, acknowledges QoS 1
    /// publishes, answers pings, and keeps each publish's topic and decoded
    /// readings.
    /// Each publish's topic and decoded readings.
    type Received = Arc<Mutex<Vec<(String, Vec<codec::DecodedReading>)>>>;

    fn fake_broker() -> (String, Received) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (Ok(mut s), store) = (stream, store.clone()) else {
                    continue;
                };
                std::thread::spawn(move || -> std::io::Result<()> {
                    loop {
                        let mut first = [0u8];
                        s.read_exact(&mut first)?;
                        let (mut len, mut shift) = (0usize, 0);
                        loop {
                            let mut b = [0u8];
                            s.read_exact(&mut b)?;
                            len |= ((b[0] & 0x7f) as usize) << shift;
                            shift += 7;
                            if b[0] & 0x80 == 0 {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        s.read_exact(&mut body)?;
                        match first[0] >> 4 {
                            1 => s.write_all(&[0x20, 2, 0, 0])?,
                            3 => {
                                let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                                let topic = String::from_utf8_lossy(&body[2..2 + n]).into_owned();
                                let mut at = 2 + n;
                                if (first[0] >> 1) & 3 == 1 {
                                    s.write_all(&[0x40, 2, body[at], body[at + 1]])?;
                                    at += 2;
                                }
                                let mut out = Vec::new();
                                codec::decode(&body[at..], now_ns(), &mut out).unwrap();
                                store.lock().unwrap().push((topic, out));
                            }
                            12 => s.write_all(&[0xd0, 0])?,
                            14 => return Ok(()),
                            _ => {}
                        }
                    }
                });
            }
        });
        (addr, received)
    }

    #[test]
    fn scenarios_play_in_real_time_over_mqtt_with_onsets_in_the_report() {
        let scenario = Scenario::parse(
            r#"
name = "live"
duration = "4s"
[[patients]]
id = "pt-live-1"
[[patients.events]]
kind = "tachycardia"
onset = "1s"
ramp = "0s"
hr = 150
[[patients]]
id = "pt-live-2"
device = "live-monitor-2"
[[patients.events]]
kind = "disconnect"
onset = "1s"
duration = "2s"
metrics = ["spo2"]
"#,
            Path::new("live.toml"),
        )
        .unwrap();
        let (target, received) = fake_broker();
        let creds: Vec<Credential> = scenario
            .patients
            .iter()
            .map(|p| Credential {
                device: p.device.clone(),
                patient: p.id.clone(),
                secret: "s".into(),
            })
            .collect();
        let config = SimConfig {
            target,
            duration: Some(scenario.duration),
            ..SimConfig::default()
        };
        let before_ms = now_ns() / 1_000_000;
        let report = run_scenario(
            &config,
            &scenario,
            creds,
            Arc::new(AtomicBool::new(false)),
            |_| {},
        );
        assert_eq!((report.devices, report.errors), (2, 0), "{report}");
        // Patient 1: 4 s of 7 metrics; patient 2: 26 readings, 3 full batches of 7.
        assert!(report.sent >= 28 + 21, "{report}");
        assert_eq!(report.acked, report.sent);
        let events = report.events.as_ref().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Tachycardia);
        assert_eq!(events[1].device.as_str(), "live-monitor-2");
        let onset = events[0].onset_ms;
        assert!(
            (before_ms..before_ms + 1_500).contains(&(onset - 1_000)),
            "{onset}"
        );
        assert_eq!(events[1].end_ms, Some(events[1].onset_ms + 2_000));
        assert_eq!(report.artefacts.as_deref(), Some(&[][..]));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["scenario"], "live");
        assert_eq!(json["events"][0]["kind"], "tachycardia");
        assert_eq!(json["events"][0]["patient"], "pt-live-1");
        assert_eq!(json["events"][0]["onset_ms"], onset);

        let received = received.lock().unwrap();
        let of = |device: &str, metric: Metric| -> Vec<(i64, f64)> {
            let topic = readings_topic(device);
            received
                .iter()
                .filter(|(t, _)| *t == topic)
                .flat_map(|(_, r)| r)
                .filter(|r| r.metric == codec::DecodedMetric::Known(metric))
                .map(|r| match r.value {
                    codec::DecodedValue::Number(v) => (r.time_ns / 1_000_000, v),
                    _ => panic!("{r:?}"),
                })
                .collect()
        };
        let hr = of("icu-a-bed-1", Metric::Hr);
        assert!(hr.len() >= 4, "{hr:?}");
        // Readings are stamped at the run's start plus their offset.
        for (i, (t, _)) in hr.iter().enumerate() {
            assert!(
                (t - (onset - 1_000 + 1_000 * i as i64)).abs() <= 1,
                "{hr:?}"
            );
        }
        assert!(
            hr.iter().all(|&(t, v)| (t < onset) == (v < 120.0)),
            "{hr:?}"
        );
        let spo2 = of("live-monitor-2", Metric::Spo2);
        let gap = (events[1].onset_ms, events[1].end_ms.unwrap());
        assert!(!spo2.is_empty());
        assert!(
            spo2.iter().all(|&(t, _)| t < gap.0 - 1 || t >= gap.1 - 1),
            "{spo2:?}"
        );

        // Load runs keep their report as it was.
        let json = run(
            &SimConfig {
                target: "127.0.0.1:1".into(),
                devices: 0,
                ..SimConfig::default()
            },
            Vec::new(),
            Arc::new(AtomicBool::new(true)),
            |_| {},
        )
        .to_json();
        assert!(
            !json.contains("events") && !json.contains("scenario"),
            "{json}"
        );
    }
}
