//! Virtual patients and devices for Wardflow: they publish realistic vital
//! signs over MQTT and report what got through.
//!
//! This crate owns the physiology model ([`physiology`]), device
//! registration for test runs ([`register`]), the MQTT publishers (MQTT
//! 3.1.1, QoS 0 or 1, SenML or binary frames, see [`mqtt`]) and
//! the load report ([`Report`]). It knows nothing of the engine's insides:
//! it talks to any MQTT server (Wardflow, or Mosquitto as a baseline).
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

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;
use wardflow_ingest::codec::{frame, senml};
use wardflow_ingest::registry::{Registry, RegistryError};
use wardflow_ingest::server::readings_topic;
use wardflow_model::{DeviceId, Metric, PatientId, Unit, now_ns};

use crate::physiology::{MONITOR_METRICS, VirtualPatient, Vital};

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
    let ids = device_ids(config);
    let existing = Registry::load(data_dir)?;
    for (d, _) in &ids {
        if existing.get(d.as_str()).is_some() {
            Registry::remove(data_dir, d.as_str())?;
        }
    }
    let secrets = Registry::add_many(
        data_dir,
        ids.iter().map(|(d, p)| (d.clone(), p.clone(), None)),
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
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let deadline = config.duration.map(|d| started + d);
    let threads = config.threads.clamp(1, creds.len().max(1));
    let mut per_thread: Vec<Vec<(usize, Credential)>> = vec![Vec::new(); threads];
    for (i, c) in creds.into_iter().enumerate() {
        per_thread[i % threads].push((i, c));
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
    Report {
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
    }
}

/// Latencies in microseconds, up to a minute, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn run_thread(
    config: SimConfig,
    devices: Vec<(usize, Credential)>,
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
            .map(|(i, cred)| {
                tokio::task::spawn_local(device_task(
                    config.clone(),
                    i,
                    cred,
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
    patient: VirtualPatient,
    pending: Vec<Vital>,
    seq: u64,
    dt: f64,
    records: Vec<frame::Record>,
    faults: u64,
}

impl DeviceSource {
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
    index: usize,
    cred: Credential,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
    hist: Rc<RefCell<Histogram<u64>>>,
) {
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
    let mut source = DeviceSource {
        patient: VirtualPatient::new(
            config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(index as u64),
        ),
        pending: Vec::new(),
        seq: 0,
        dt: if config.rate > 0.0 {
            MONITOR_METRICS.len() as f64 / config.rate
        } else {
            1.0
        },
        records: Vec::with_capacity(batch),
        faults: 0,
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
        if per_publish > 0.0 {
            let due = (start.elapsed().as_secs_f64() / per_publish) as u64 + 1;
            if sent >= due {
                if writer.flush().await.is_err()
                    || mqtt::ping_if_idle(&mut writer, &mut last_write)
                        .await
                        .is_err()
                {
                    failed = true;
                    break;
                }
                let wait =
                    (sent as f64 * per_publish - start.elapsed().as_secs_f64()).clamp(0.000_1, 0.1);
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                continue;
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use wardflow_ingest::codec;

    #[test]
    fn payloads_decode_and_faults_are_what_they_say() {
        let mut src = DeviceSource {
            patient: VirtualPatient::new(3),
            pending: Vec::new(),
            seq: 0,
            dt: 1.0,
            records: Vec::new(),
            faults: 0,
        };
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
}
