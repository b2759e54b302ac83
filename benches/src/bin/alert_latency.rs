//! Alert latency benchmark: from a device's publish to the alert's arrival
//! at a clinician's MQTT subscription, idle and under load.
//!
//! ```text
//! cargo build --release && cargo run --release -p wardflow-benches --bin alert_latency -- --duration 60
//! ```
//!
//! It runs the real `wardflow` binary with the 20 shipped rules (NEWS2 among
//! them) plus one probe rule (`probe-etco2`: EtCO2 above 100, no sustain)
//! scoped to four probe patients in unit `probe`. It first measures the
//! engine's maximum ingest rate (the simulator as fast as the server takes it,
//! 50 devices, binary frames of 50 readings, QoS 1; readings stored per second
//! from `/metrics`), then runs three levels: no load, 50 % and 90 % of that
//! rate from the simulator (`--levels` chooses others). The load generator
//! stands in for devices on
//! other machines: during the levels it runs at nice 19 (`--load-nice`), so
//! that on a small machine it takes the CPU time the engine leaves, not the
//! engine's; `--load-idle` puts it in the idle scheduling class instead,
//! where it never preempts the engine (the maximum-rate run keeps nice 0,
//! so the levels are the same share of the same maximum; the table shows
//! the load the store actually took). During each level four probe devices, one MQTT
//! 3.1.1 connection each, publish EtCO2 alternately 120 (raises) and 40
//! (clears) every 100 ms as SenML at QoS 1, with the send time as the
//! reading's time; a clinician subscribed to `wardflow/v1/alerts/probe/#`
//! takes each `raised` transition's latency as its receipt time minus the
//! triggering reading's time (one machine, one clock). It prints p50, p99,
//! p99.9 and max per level, the load the store actually took, the probes'
//! PUBACK p99, the server's own receipt-to-durable p99 over every QoS 1
//! publish, the write-ahead log's fsync and the storage flush p99, the
//! publishes that waited for the memory budget and the server's memory,
//! how the kernel scheduled the server's alert path (`realtime` needs root,
//! `CAP_SYS_NICE` or `RLIMIT_RTPRIO`; `--serve-arg=--alert-path-scheduling
//! --serve-arg=short-slice` compares), and counts raises that never arrived.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use wardflow_benches::{
    Login, default_wardflow, free_port, histogram_buckets, histogram_quantile, http_get,
    http_get_status, metric, peak_rss_kib, require_wardflow, rss_kib, subscribe_payloads,
};
use wardflow_simulator::mqtt;

/// Probe devices (and patients).
const PROBES: usize = 4;
/// One publish per probe device this often, alternately raising and clearing.
const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Simulator load runs this long before the probes start.
const WARMUP: Duration = Duration::from_secs(2);
/// After the probes stop, alerts still in flight get this long to arrive.
const GRACE: Duration = Duration::from_secs(3);
const PROBE_UNIT: &str = "probe";
const PROBE_RULE: &str = "probe-etco2";
const CLINICIAN: &str = "bench-rn";
const STORED: &str = "wardflow_readings_stored_total";
const FSYNC: &str = "wardflow_wal_fsync_seconds";
const FLUSH: &str = "wardflow_storage_flush_seconds";
const WAITS: &str = "wardflow_backpressure_waits";
const DURABLE: &str = "wardflow_publish_durable_seconds";
const SCHEDULING: &str = "wardflow_alert_path_threads";

const PROBE_RULES: &str = r#"# Latency probe: one threshold without sustain, for the probe patients only.
[[rule]]
id = "probe-etco2"
description = "Latency probe: EtCO2 above 100"
priority = "high"
when = { metric = "etco2", above = 100, exit = 90 }
patients = ["probe-1", "probe-2", "probe-3", "probe-4"]
"#;

/// Alert latency, device publish to MQTT subscriber, idle and at 50 % and
/// 90 % of the measured maximum ingest rate.
#[derive(clap::Parser)]
struct Options {
    /// The wardflow binary to run.
    #[arg(long, default_value_os_t = default_wardflow())]
    wardflow: PathBuf,
    /// Seconds of probing per level.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Load levels, in percent of the measured maximum ingest rate.
    #[arg(long, value_delimiter = ',', default_values_t = [0u32, 50, 90],
          value_parser = clap::value_parser!(u32).range(0..=100))]
    levels: Vec<u32>,
    /// Seconds of the maximum-rate run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    max_duration: u64,
    /// Load devices.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// QoS 1 publishes each load device keeps in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65535))]
    window: u64,
    /// Nice value of the load generator during the levels.
    #[arg(long, default_value_t = 19)]
    load_nice: i32,
    /// During the levels, run the load generator in the idle scheduling
    /// class (`chrt --idle 0`) instead of at `--load-nice`: it then runs only
    /// on CPU time the server leaves, as devices on other machines would.
    #[arg(long)]
    load_idle: bool,
    /// An extra argument for `wardflow serve` (repeatable), e.g.
    /// `--serve-arg=--memory-mb --serve-arg=4096`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

fn options() -> anyhow::Result<Options> {
    let o = <Options as clap::Parser>::parse();
    require_wardflow(&o.wardflow)?;
    Ok(o)
}

/// The "nice value" that stands for the idle scheduling class.
const IDLE: i32 = i32::MIN;

fn wardflow(o: &Options, data: &Path) -> Command {
    wardflow_niced(o, data, 0)
}

/// `wardflow` run at a nice value (0: as this process runs; `IDLE`: in
/// the idle scheduling class).
fn wardflow_niced(o: &Options, data: &Path, nice: i32) -> Command {
    let mut c = if nice == IDLE {
        let mut c = Command::new("chrt");
        c.args(["--idle", "0"]).arg(&o.wardflow);
        c
    } else if nice == 0 {
        Command::new(&o.wardflow)
    } else {
        let mut c = Command::new("nice");
        c.args(["-n", &nice.to_string()]).arg(&o.wardflow);
        c
    };
    c.args(["--log", "warn", "--data-dir"]).arg(data);
    c
}

/// Runs a command to its end; its stdout, or an error with its stderr.
fn run(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| format!("{what}: start"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `secret: ...` line a registration prints.
fn secret_of(stdout: &str, what: &str) -> anyhow::Result<String> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .map(|s| s.trim().to_string())
        .with_context(|| format!("{what}: no secret in its output:\n{stdout}"))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn interrupt(child: &Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
}

/// Waits for a child to exit; SIGKILL after `timeout`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    Ok(child.wait()?)
}

/// The `wardflow serve` under test; interrupted and reaped when dropped.
struct Server {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    mqtt: u16,
    http: u16,
}

impl Server {
    fn start(o: &Options, data: &Path, rules: &Path, log: PathBuf) -> anyhow::Result<Server> {
        let (mqtt, http) = (free_port(), free_port());
        let out = std::fs::File::create(&log)?;
        let child = wardflow(o, data)
            .args([
                "serve",
                "--mqtt",
                &format!("127.0.0.1:{mqtt}"),
                "--http",
                &format!("127.0.0.1:{http}"),
                "--rules",
            ])
            .arg(rules)
            .args(&o.serve_args)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start wardflow serve")?;
        let mut server = Server {
            pid: child.id(),
            child: Some(child),
            log,
            mqtt,
            http,
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            server.alive()?;
            if let Some((200, _)) = http_get_status(http, "/healthz") {
                return Ok(server);
            }
            if Instant::now() > end {
                let health = http_get(http, "/healthz").unwrap_or_default();
                bail!(
                    "wardflow serve not healthy after 60 s: {health}\n--- server log ---\n{}",
                    log_tail(&server.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error with the log's tail if the server has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("server stopped")?;
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "wardflow serve exited ({status})\n--- server log ---\n{}",
                log_tail(&self.log, 30)
            );
        }
        Ok(())
    }

    fn metrics(&mut self) -> anyhow::Result<String> {
        self.alive()?;
        http_get(self.http, "/metrics").context("GET /metrics")
    }

    fn stored(&mut self) -> anyhow::Result<u64> {
        let m = self.metrics()?;
        Ok(metric(&m, STORED).with_context(|| format!("/metrics has no {STORED}"))? as u64)
    }

    /// SIGINT, then waits for a clean exit.
    fn stop(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("server already stopped")?;
        interrupt(&child);
        let status = wait_or_kill(&mut child, Duration::from_secs(60))?;
        if !status.success() {
            bail!(
                "wardflow serve ended with {status} after SIGINT\n--- server log ---\n{}",
                log_tail(&self.log, 30)
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            interrupt(&child);
            let _ = wait_or_kill(&mut child, Duration::from_secs(30));
        }
    }
}

/// A background `wardflow simulate`; interrupted when dropped.
struct Simulator(Option<Child>);

impl Simulator {
    fn start(
        o: &Options,
        data: &Path,
        mqtt: u16,
        creds: &Path,
        rate: f64,
        duration: Duration,
        nice: i32,
    ) -> anyhow::Result<Simulator> {
        let child = wardflow_niced(o, data, nice)
            .arg("simulate")
            .args(["--target", &format!("mqtt://127.0.0.1:{mqtt}")])
            .args(["--devices", &o.devices.to_string()])
            .args(["--rate", &format!("{rate:.3}")])
            .args(["--duration", &format!("{}ms", duration.as_millis())])
            .args(["--payload", "binary", "--batch", "50", "--qos", "1"])
            .args(["--window", &o.window.to_string(), "--json", "--credentials"])
            .arg(creds)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start wardflow simulate")?;
        Ok(Simulator(Some(child)))
    }

    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits for the end of the run and reads its report.
    fn finish(mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let mut child = self.0.take().context("simulator gone")?;
        let end = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > end {
                interrupt(&child);
                wait_or_kill(&mut child, Duration::from_secs(20))?;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "simulator report ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if report["errors"].as_u64() != Some(0)
            || report["connect_errors"].as_u64().unwrap_or(0) > 0
        {
            eprintln!("  simulator reported errors: {report}");
        }
        Ok(report)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            interrupt(&child);
            let _ = wait_or_kill(&mut child, Duration::from_secs(20));
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// What the probe devices and the subscriber share.
#[derive(Default)]
struct Shared {
    /// The level the probes publish for; `None`: they finish with a clear
    /// and stay quiet.
    level: Option<usize>,
    /// Raises sent and not yet seen as alerts: (probe, send time in µs) →
    /// level.
    pending: HashMap<(usize, u64), usize>,
    raises_sent: Vec<u64>,
    /// Publish to alert receipt, ns, per level.
    latencies_ns: Vec<Vec<u64>>,
    /// Publish to PUBACK of the probes' publishes, µs, per level.
    puback_us: Vec<Vec<u64>>,
    /// `raised` transitions of the probe rule that match no probe publish.
    unmatched: u64,
    /// Other transitions seen on the probe unit, by event.
    events: HashMap<String, u64>,
    errors: Vec<String>,
}

/// One alert transition as the subscriber receives it.
fn on_alert(shared: &Mutex<Shared>, payload: &[u8]) {
    let received_ns = now_ns();
    let mut s = shared.lock().expect("probe state");
    let Ok(alert) = serde_json::from_slice::<serde_json::Value>(payload) else {
        s.errors.push(format!(
            "alert feed: not JSON: {}",
            String::from_utf8_lossy(payload)
        ));
        return;
    };
    let event = alert["event"].as_str().unwrap_or("?");
    let rule = alert["rule"].as_str().unwrap_or("?");
    *s.events.entry(format!("{rule} {event}")).or_default() += 1;
    if event != "raised" || rule != PROBE_RULE {
        return;
    }
    let probe = alert["patient"]
        .as_str()
        .and_then(|p| p.strip_prefix("probe-"))
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1));
    let time_ns = alert["values"][0]["time_ns"].as_u64();
    let (Some(probe), Some(time_ns)) = (probe, time_ns) else {
        s.unmatched += 1;
        return;
    };
    match s.pending.remove(&(probe, (time_ns + 500) / 1000)) {
        Some(level) => s.latencies_ns[level].push(received_ns.saturating_sub(time_ns)),
        None => s.unmatched += 1,
    }
}

/// One probe device: connects, then publishes EtCO2 alternately 120 and 40
/// every `PROBE_PERIOD` while a level runs, ending each level on a clear.
async fn probe_device(
    index: usize,
    port: u16,
    secret: String,
    shared: Arc<Mutex<Shared>>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let device = format!("probe-dev-{}", index + 1);
    let mqtt::Connection { reader, mut writer } =
        mqtt::connect(&format!("127.0.0.1:{port}"), &device, secret.as_bytes())
            .await
            .with_context(|| format!("{device}: connect"))?;
    let inflight = mqtt::Inflight::new();
    let closed = Arc::new(AtomicBool::new(false));
    {
        let (inflight, closed) = (inflight.clone(), closed.clone());
        tokio::task::spawn_local(async move {
            let acked = tokio::sync::Notify::new();
            let _ = mqtt::read_acks(reader, inflight, &acked).await;
            closed.store(true, Ordering::Relaxed);
        });
    }
    let topic = format!("wardflow/v1/devices/{device}/readings").into_bytes();
    // Spread the devices' publishes over the period.
    tokio::time::sleep(PROBE_PERIOD * index as u32 / PROBES as u32).await;
    let mut tick = tokio::time::interval(PROBE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut raise_next = true;
    let mut last_level = 0;
    let mut last_write = Instant::now();
    let mut packet = Vec::with_capacity(256);
    loop {
        tick.tick().await;
        if closed.load(Ordering::Relaxed) {
            bail!("{device}: the server closed the connection");
        }
        let level = shared.lock().expect("probe state").level;
        {
            let mut f = inflight.borrow_mut();
            if !f.latencies_us.is_empty() {
                let drained: Vec<u64> = f.latencies_us.drain(..).collect();
                shared.lock().expect("probe state").puback_us[last_level].extend(drained);
            }
        }
        if level.is_none() && raise_next {
            if done.load(Ordering::Relaxed) {
                mqtt::disconnect(&mut writer).await?;
                return Ok(());
            }
            mqtt::ping_if_idle(&mut writer, &mut last_write).await?;
            continue;
        }
        if let Some(l) = level {
            last_level = l;
        }
        let sent_ns = now_ns();
        let t_us = sent_ns / 1000;
        let value = if raise_next { 120 } else { 40 };
        let payload = format!(
            r#"[{{"n":"etco2","u":"mm[Hg]","v":{value},"t":{}.{:06}}}]"#,
            t_us / 1_000_000,
            t_us % 1_000_000
        );
        if raise_next && let Some(l) = level {
            let mut s = shared.lock().expect("probe state");
            s.pending.insert((index, t_us), l);
            s.raises_sent[l] += 1;
        }
        packet.clear();
        let id = inflight.borrow_mut().take_id();
        mqtt::encode_publish(&mut packet, &topic, Some(id), payload.as_bytes());
        use tokio::io::AsyncWriteExt;
        writer.write_all(&packet).await?;
        writer.flush().await?;
        last_write = Instant::now();
        raise_next = !raise_next;
    }
}

/// The probe side, on its own thread: the clinician's subscription and the
/// probe devices, until `done` is set and every probe has ended on a clear.
fn start_probes(
    port: u16,
    clinician_secret: String,
    secrets: Vec<String>,
    shared: Arc<Mutex<Shared>>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let ready = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = {
        let (ready, connected, done) = (ready.clone(), connected.clone(), done.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let sub_stop = Arc::new(AtomicBool::new(false));
                let login = Login {
                    client_id: "alert-latency-subscriber".into(),
                    username: CLINICIAN.into(),
                    password: clinician_secret,
                };
                let subscriber = {
                    let (shared, stop) = (shared.clone(), sub_stop.clone());
                    tokio::task::spawn_local(async move {
                        let r = subscribe_payloads(
                            port,
                            &login,
                            &format!("wardflow/v1/alerts/{PROBE_UNIT}/#"),
                            0,
                            stop,
                            ready,
                            |_topic, payload| on_alert(&shared, payload),
                        )
                        .await;
                        if let Err(e) = &r {
                            shared
                                .lock()
                                .expect("probe state")
                                .errors
                                .push(format!("alert subscription: {e:#}"));
                        }
                        r
                    })
                };
                let devices: Vec<_> = secrets
                    .into_iter()
                    .enumerate()
                    .map(|(i, secret)| {
                        let (shared, done, connected) =
                            (shared.clone(), done.clone(), connected.clone());
                        tokio::task::spawn_local(async move {
                            connected.fetch_add(1, Ordering::Relaxed);
                            let r = probe_device(i, port, secret, shared.clone(), done).await;
                            if let Err(e) = &r {
                                shared
                                    .lock()
                                    .expect("probe state")
                                    .errors
                                    .push(format!("{e:#}"));
                            }
                            r
                        })
                    })
                    .collect();
                let mut first_error = None;
                for d in devices {
                    if let Err(e) = d.await? {
                        first_error.get_or_insert(e);
                    }
                }
                // Late alerts of the last level.
                tokio::time::sleep(GRACE).await;
                sub_stop.store(true, Ordering::Relaxed);
                subscriber.await??;
                first_error.map_or(Ok(()), Err)
            })
        })
    };
    let end = Instant::now() + Duration::from_secs(20);
    while !(ready.load(Ordering::Relaxed) && connected.load(Ordering::Relaxed) == PROBES) {
        if handle.is_finished() {
            return match handle.join() {
                Ok(Err(e)) => Err(e.context("probes")),
                _ => bail!("probes ended before they were ready"),
            };
        }
        if Instant::now() > end {
            bail!("the alert subscription or the probe devices not ready after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(handle)
}

/// Waits until the store has taken everything (the counter holds still for
/// a second).
fn drain(server: &mut Server, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    let mut last = (server.stored()?, Instant::now());
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        let now = server.stored()?;
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
    }
    eprintln!("  (the store was still catching up after {timeout:?})");
    Ok(())
}

/// Readings stored per second at `--rate 0`, counted from the simulator's
/// start to the last reading stored, as `e2e` does.
fn max_rate(o: &Options, server: &mut Server, data: &Path, creds: &Path) -> anyhow::Result<f64> {
    let base = server.stored()?;
    let start = Instant::now();
    let mut sim = Simulator::start(
        o,
        data,
        server.mqtt,
        creds,
        0.0,
        Duration::from_secs(o.max_duration),
        0,
    )?;
    let mut last = (base, start.elapsed());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.stored()?;
        if now != last.0 {
            last = (now, start.elapsed());
        }
        if !sim.running() && start.elapsed() - last.1 > Duration::from_secs(3) {
            break;
        }
        if start.elapsed() > Duration::from_secs(o.max_duration + 120) {
            bail!("the maximum-rate run did not settle");
        }
    }
    let report = sim.finish(Duration::from_secs(5))?;
    let stored = last.0 - base;
    eprintln!(
        "  max run: {stored} readings stored of {} sent in {:.1} s",
        report["sent"],
        last.1.as_secs_f64()
    );
    if stored == 0 {
        bail!("nothing stored in the maximum-rate run: {report}");
    }
    Ok(stored as f64 / last.1.as_secs_f64())
}

struct LevelOutcome {
    percent: u32,
    target_per_s: f64,
    stored_per_s: f64,
    /// WAL fsync and storage flush p99, as bucket bounds.
    fsync_p99: String,
    flush_p99: String,
    /// Receipt to durability (PUBACK) of every QoS 1 publish, p99.
    durable_p99: String,
    /// Publishes that waited for the memory budget during the level.
    waits: u64,
    rss_max_kib: u64,
}

/// The p99 of a Prometheus histogram between two `/metrics` bodies, as the
/// bound of the bucket that holds it.
fn histogram_p99(before: &str, after: &str, name: &str) -> String {
    let (b0, b1) = (
        histogram_buckets(before, name),
        histogram_buckets(after, name),
    );
    let last_finite = b1
        .iter()
        .rev()
        .find(|(le, _)| le.is_finite())
        .map_or(0.0, |(le, _)| *le);
    match histogram_quantile(&b0, &b1, 0.99) {
        Some((le, _)) if le.is_finite() => format!("≤ {:.2} ms", le * 1e3),
        Some(_) => format!("> {:.0} ms", last_finite * 1e3),
        None => "-".into(),
    }
}

fn run_level(
    o: &Options,
    server: &mut Server,
    data: &Path,
    creds: &Path,
    shared: &Mutex<Shared>,
    index: usize,
    max: f64,
) -> anyhow::Result<LevelOutcome> {
    let percent = o.levels[index];
    let target = max * percent as f64 / 100.0;
    let probe_time = Duration::from_secs(o.duration);
    let sim = if percent > 0 {
        let run_for = WARMUP + probe_time + GRACE + Duration::from_secs(1);
        let sim = Simulator::start(
            o,
            data,
            server.mqtt,
            creds,
            target / o.devices as f64,
            run_for,
            if o.load_idle { IDLE } else { o.load_nice },
        )?;
        std::thread::sleep(WARMUP);
        Some(sim)
    } else {
        None
    };
    let m0 = server.metrics()?;
    let t0 = Instant::now();
    shared.lock().expect("probe state").level = Some(index);
    let mut rss_max = 0;
    while t0.elapsed() < probe_time {
        std::thread::sleep(Duration::from_millis(250));
        server.alive()?;
        rss_max = rss_max.max(rss_kib(server.pid).unwrap_or(0));
    }
    shared.lock().expect("probe state").level = None;
    let m1 = server.metrics()?;
    let span = t0.elapsed().as_secs_f64();
    let stored = |m: &str| metric(m, STORED).unwrap_or(0.0);
    let stored_per_s = (stored(&m1) - stored(&m0)) / span;
    std::thread::sleep(GRACE);
    if let Some(sim) = sim {
        sim.finish(Duration::from_secs(30))?;
    }
    drain(server, Duration::from_secs(60))?;
    Ok(LevelOutcome {
        percent,
        target_per_s: target,
        stored_per_s,
        fsync_p99: histogram_p99(&m0, &m1, FSYNC),
        flush_p99: histogram_p99(&m0, &m1, FLUSH),
        durable_p99: histogram_p99(&m0, &m1, DURABLE),
        waits: (metric(&m1, WAITS).unwrap_or(0.0) - metric(&m0, WAITS).unwrap_or(0.0)) as u64,
        rss_max_kib: rss_max,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |v| format!("{:.2}", v as f64 / 1e6))
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&rules)?;
    eprintln!("# alert latency, data in {}", dir.path().display());

    // Rules: the shipped set and the probe rule.
    let mut c = wardflow(&o, &data);
    c.args(["rules", "default"]);
    std::fs::write(
        rules.join("adult-icu.toml"),
        run(c, "wardflow rules default")?,
    )?;
    std::fs::write(rules.join("probe.toml"), PROBE_RULES)?;
    let mut c = wardflow(&o, &data);
    c.args(["rules", "check"])
        .arg(rules.join("adult-icu.toml"))
        .arg(rules.join("probe.toml"));
    run(c, "wardflow rules check")?;

    // Probe patients, devices and the clinician, before the server starts.
    let mut secrets = Vec::new();
    for n in 1..=PROBES {
        let mut c = wardflow(&o, &data);
        c.args(["patients", "admit", &format!("probe-{n}")]).args([
            "--unit",
            PROBE_UNIT,
            "--bed",
            &format!("bed-{n}"),
        ]);
        run(c, "wardflow patients admit")?;
        let mut c = wardflow(&o, &data);
        c.args(["devices", "add", &format!("probe-dev-{n}")])
            .args(["--patient", &format!("probe-{n}")]);
        secrets.push(secret_of(
            &run(c, "wardflow devices add")?,
            "wardflow devices add",
        )?);
    }
    let mut c = wardflow(&o, &data);
    c.args(["clinicians", "add", CLINICIAN, "--units", PROBE_UNIT]);
    let clinician_secret = secret_of(
        &run(c, "wardflow clinicians add")?,
        "wardflow clinicians add",
    )?;

    let mut server = Server::start(&o, &data, &rules, dir.path().join("server.log"))?;

    // The load devices, registered by the simulator itself.
    let creds = dir.path().join("load-creds.json");
    let mut c = wardflow(&o, &data);
    c.args(["simulate", "--register", "--duration", "0s"])
        .args(["--devices", &o.devices.to_string()])
        .args(["--target", &format!("mqtt://127.0.0.1:{}", server.mqtt)])
        .arg("--credentials")
        .arg(&creds);
    run(c, "registering the load devices")?;
    // Registrations reach a running server within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let body = server.metrics()?;
    let rules_loaded = metric(&body, "wardflow_rules_loaded");
    // How the kernel scheduled the server's alert path.
    let scheduling: Vec<String> = wardflow_ingest::priority::AlertPathScheduling::ALL
        .iter()
        .filter_map(|m| {
            let s = m.name();
            let n = metric(&body, &format!("{SCHEDULING}{{scheduling=\"{s}\"}}"))?;
            Some(format!("{n:.0} {s}"))
        })
        .collect();

    let shared = Arc::new(Mutex::new(Shared {
        raises_sent: vec![0; o.levels.len()],
        latencies_ns: vec![Vec::new(); o.levels.len()],
        puback_us: vec![Vec::new(); o.levels.len()],
        ..Shared::default()
    }));
    let done = Arc::new(AtomicBool::new(false));
    let probes = start_probes(
        server.mqtt,
        clinician_secret,
        secrets,
        shared.clone(),
        done.clone(),
    )?;

    eprintln!(
        "measuring the maximum ingest rate ({} s, --rate 0)",
        o.max_duration
    );
    let max = max_rate(&o, &mut server, &data, &creds)?;
    eprintln!("  maximum: {max:.0} readings/s stored");
    drain(&mut server, Duration::from_secs(60))?;

    let mut outcomes = Vec::new();
    for (index, &percent) in o.levels.iter().enumerate() {
        eprintln!(
            "level {percent} %: {} s of probes{}",
            o.duration,
            if percent > 0 {
                format!(
                    " under {:.0} readings/s of load",
                    max * percent as f64 / 100.0
                )
            } else {
                String::new()
            }
        );
        let outcome = run_level(&o, &mut server, &data, &creds, &shared, index, max);
        match outcome {
            Ok(outcome) => {
                let s = shared.lock().expect("probe state");
                eprintln!(
                    "  {} raises sent, {} alerts received so far",
                    s.raises_sent[index],
                    s.latencies_ns[index].len()
                );
                outcomes.push(outcome);
            }
            Err(e) => {
                done.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let probe_result = probes
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?;
    let peak = peak_rss_kib(server.pid).unwrap_or(0);
    server.alive()?;
    server.stop()?;

    let mut s = shared.lock().expect("probe state");
    let mut missing = vec![0u64; o.levels.len()];
    for level in s.pending.values() {
        missing[*level] += 1;
    }
    println!(
        "# wardflow alert latency: device publish → alert at an MQTT subscriber\n\n\
         {} rules for every patient ({} shipped incl. NEWS2 + `{PROBE_RULE}`), {} load devices \
         (binary frames of 50 readings, QoS 1; the load generator {}), {PROBES} probe devices \
         publishing SenML at QoS 1 every {} ms each (alternately raise and clear), {} s per level\n",
        rules_loaded.map_or("?".into(), |r| format!("{r:.0}")),
        rules_loaded.map_or("?".into(), |r| format!("{:.0}", r - 1.0)),
        o.devices,
        if o.load_idle {
            "in the idle scheduling class".to_string()
        } else {
            format!("at nice {}", o.load_nice)
        },
        PROBE_PERIOD.as_millis(),
        o.duration,
    );
    println!("maximum ingest rate: {max:.0} readings/s stored (simulator at --rate 0)");
    println!(
        "the server's alert-path threads (`{SCHEDULING}`): {}\n",
        if scheduling.is_empty() {
            "not reported".to_string()
        } else {
            scheduling.join(", ")
        }
    );
    println!(
        "| load | target readings/s | stored readings/s | alerts | missing | p50 ms | p99 ms | p99.9 ms | max ms | probe PUBACK p99 ms | receipt to durable p99 | WAL fsync p99 | storage flush p99 | budget waits | server RSS |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut p99_at_50 = None;
    for (i, outcome) in outcomes.iter().enumerate() {
        let lat = &mut s.latencies_ns[i];
        lat.sort_unstable();
        let p99 = percentile(lat, 0.99);
        if outcome.percent == 50 {
            p99_at_50 = p99;
        }
        let puback = &mut s.puback_us[i];
        puback.sort_unstable();
        println!(
            "| {} % | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} MiB |",
            outcome.percent,
            outcome.target_per_s,
            outcome.stored_per_s,
            s.latencies_ns[i].len(),
            missing[i],
            ms(percentile(&s.latencies_ns[i], 0.5)),
            ms(p99),
            ms(percentile(&s.latencies_ns[i], 0.999)),
            ms(s.latencies_ns[i].last().copied()),
            ms(percentile(&s.puback_us[i], 0.99).map(|us| us * 1000)),
            outcome.durable_p99,
            outcome.fsync_p99,
            outcome.flush_p99,
            outcome.waits,
            outcome.rss_max_kib as f64 / 1024.0,
        );
    }
    println!(
        "\nserver peak RSS (whole run, incl. the maximum-rate run): {:.0} MiB",
        peak as f64 / 1024.0
    );
    println!(
        "receipt to durable, WAL fsync and storage flush p99: the bound of the `{DURABLE}` / `{FSYNC}` / `{FLUSH}` bucket that holds it; budget waits: publishes that waited for the memory budget (`{WAITS}`); server RSS: the largest sample during the level"
    );
    let sent: u64 = s.raises_sent.iter().sum();
    let received: usize = s.latencies_ns.iter().map(Vec::len).sum();
    println!(
        "raises sent {sent}, alerts received {received}, missing {}, unmatched {}",
        missing.iter().sum::<u64>(),
        s.unmatched
    );
    let mut events: Vec<_> = s.events.iter().map(|(k, n)| format!("{k} {n}")).collect();
    events.sort();
    println!(
        "transitions on unit {PROBE_UNIT} (rule, event, count): {}",
        events.join(", ")
    );
    match p99_at_50 {
        Some(p) => println!(
            "target p99 < 10 ms at 50 % load: {} ms, {}",
            ms(Some(p)),
            if p < 10_000_000 { "met" } else { "NOT met" }
        ),
        None => println!("target p99 < 10 ms at 50 % load: no samples"),
    }
    if !s.errors.is_empty() {
        println!("\nprobe errors:");
        for e in &s.errors {
            println!("- {e}");
        }
    }
    drop(s);
    probe_result?;
    Ok(())
}
