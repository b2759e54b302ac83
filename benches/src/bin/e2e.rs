//! End-to-end ingest benchmark: the same simulator traffic through Mosquitto
//! to one subscriber, and through Wardflow into storage, side by side.
//!
//! ```text
//! cargo build --release && cargo run --release -p wardflow-benches --bin e2e -- --duration 10 --repeat 3
//! ```
//!
//! For each scenario and repeat it runs Mosquitto, then Wardflow, with the
//! identical `wardflow simulate` command line (only the target differs) and
//! reports readings delivered per second: to Mosquitto's subscriber, or into
//! Wardflow's store (`wardflow_readings_stored_total`), each counted from the
//! simulator's start to the last delivery. It prints medians and the ratio
//! Wardflow / Mosquitto, with each server's peak resident memory.
//!
//! With `--baseline no-ledger` the baseline is Wardflow itself with its
//! audit trail off (`--ledger false`), so the ratio is what sealing every
//! stored row into anchored Merkle batches costs:
//!
//! ```text
//! cargo run --release -p wardflow-benches --bin e2e -- --baseline no-ledger --duration 10 --repeat 3
//! ```
//!
//! With `--baseline no-research` the baseline is Wardflow with no study
//! registered, and the measured run has `--studies N` (default 5) studies,
//! each of every simulated patient's consent, releasing every second: the
//! ratio is what the research stage costs ingest.
//!
//! ```text
//! cargo run --release -p wardflow-benches --bin e2e -- --baseline no-research --duration 10 --repeat 3
//! ```
//!
//! With `--chain ws://…` (and `WARDFLOW_LEDGER_SURI` naming a funded
//! account) the batches are also anchored on that chain, and each run
//! reports the anchoring extrinsics per minute at that ingest rate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use wardflow_benches::{
    Received, default_wardflow, free_port, http_get, metric, peak_rss_kib, require_wardflow,
    subscribe_and_count, wait_for_port,
};

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    payload: &'static str,
    batch: usize,
    qos: u8,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "binary-50-qos0",
        payload: "binary",
        batch: 50,
        qos: 0,
    },
    Scenario {
        name: "binary-50-qos1",
        payload: "binary",
        batch: 50,
        qos: 1,
    },
    Scenario {
        name: "senml-1-qos0",
        payload: "senml",
        batch: 1,
        qos: 0,
    },
    Scenario {
        name: "senml-1-qos1",
        payload: "senml",
        batch: 1,
        qos: 1,
    },
];

/// End-to-end ingest throughput and memory, Wardflow beside Mosquitto on
/// the same simulator traffic.
#[derive(clap::Parser)]
#[command(after_help = "scenarios: binary-50-qos0, binary-50-qos1, senml-1-qos0, senml-1-qos1")]
struct Options {
    /// The wardflow binary to run.
    #[arg(long, default_value_os_t = default_wardflow())]
    wardflow: PathBuf,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Runs per scenario and server.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Simulated devices.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Scenarios to run, comma-separated [default: all].
    #[arg(long = "scenario", value_delimiter = ',', value_parser = scenario)]
    scenarios: Vec<Scenario>,
    /// What Wardflow is compared with.
    #[arg(long, value_enum, default_value_t = Baseline::Mosquitto)]
    baseline: Baseline,
    /// Anchor Wardflow's audit batches on this Substrate chain (ws://…),
    /// signing as WARDFLOW_LEDGER_SURI (e.g. //Alice on a development
    /// chain), and report the anchoring extrinsics per minute.
    #[arg(long, value_name = "URL")]
    chain: Option<String>,
    /// Studies running in the measured Wardflow (with `--baseline no-research`).
    #[arg(long, default_value_t = 5)]
    studies: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Baseline {
    /// Mosquitto delivering the same traffic to one subscriber.
    Mosquitto,
    /// Wardflow with its audit ledger off.
    NoLedger,
    /// Wardflow with no research study running.
    NoResearch,
}

fn scenario(name: &str) -> Result<Scenario, String> {
    SCENARIOS
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| format!("one of {}", SCENARIOS.map(|s| s.name).join(", ")))
}

fn options() -> anyhow::Result<Options> {
    let mut o = <Options as clap::Parser>::parse();
    if o.scenarios.is_empty() {
        o.scenarios = SCENARIOS.to_vec();
    }
    require_wardflow(&o.wardflow)?;
    Ok(o)
}

struct Outcome {
    readings: u64,
    per_s: f64,
    peak_rss_mib: f64,
    sent: u64,
    /// Audit batches sealed (Wardflow with its ledger on).
    batches: u64,
    /// With a chain: extrinsics finalized and batches still queued when
    /// the run ended, and how long it ran.
    extrinsics: u64,
    chain_pending: u64,
    run_s: f64,
    /// With studies: windows released and patient contributions, summed
    /// over the studies.
    research: (u64, u64),
}

fn simulate(o: &Options, s: Scenario, port: u16, data: &Path, creds: &Path) -> Command {
    let mut c = Command::new(&o.wardflow);
    c.args(["--log", "warn", "--data-dir"])
        .arg(data)
        .arg("simulate");
    c.args(["--target", &format!("mqtt://127.0.0.1:{port}")]);
    c.args([
        "--devices",
        &o.devices.to_string(),
        "--rate",
        "0",
        "--duration",
        &format!("{}s", o.duration),
    ]);
    c.args([
        "--payload",
        s.payload,
        "--batch",
        &s.batch.to_string(),
        "--qos",
        &s.qos.to_string(),
    ]);
    c.args(["--window", "32", "--json", "--credentials"])
        .arg(creds);
    c.stderr(Stdio::null()).stdout(Stdio::piped());
    c
}

fn sent_of(out: &std::process::Output) -> anyhow::Result<u64> {
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("simulator report")?;
    if report["errors"].as_u64() != Some(0) {
        eprintln!("  simulator reported errors: {report}");
    }
    Ok(report["sent"].as_u64().unwrap_or(0))
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run_mosquitto(o: &Options, s: Scenario, dir: &Path) -> anyhow::Result<Outcome> {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 100\nlog_type error\n"
        ),
    )?;
    let mosquitto = ["/usr/sbin/mosquitto", "mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto");
    let broker = Command::new(mosquitto)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start mosquitto (apt-get install mosquitto)")?;
    wait_for_port(port, Duration::from_secs(10))?;
    let pid = broker.id();
    // Any secret will do: Mosquitto lets anonymous clients in.
    let creds = dir.join("mosquitto-creds.json");
    let list: Vec<_> = (0..o.devices)
        .map(|i| serde_json::json!({"device": format!("sim-{i:04}"), "patient": format!("sim-patient-{i:04}"), "secret": "unused-by-mosquitto"}))
        .collect();
    std::fs::write(&creds, serde_json::to_vec(&list)?)?;

    let received = Arc::new(Received::default());
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let sub = {
        let (received, done) = (received.clone(), done.clone());
        let qos = s.qos;
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(subscribe_and_count(
                    port,
                    "wardflow/v1/devices/+/readings",
                    qos,
                    received,
                    start,
                    done,
                ))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let sim_start = start.elapsed();
    let out = simulate(o, s, port, dir, &creds).output()?;
    let sent = sent_of(&out)?;
    // Let the subscriber drain.
    let mut last = u64::MAX;
    while received.readings.load(Ordering::Relaxed) != last {
        last = received.readings.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1500));
    }
    done.store(true, Ordering::Relaxed);
    let peak = peak_rss_kib(pid).unwrap_or(0);
    stop(broker);
    let _ = sub.join();
    let readings = received.readings.load(Ordering::Relaxed);
    let span =
        Duration::from_nanos(received.last_ns.load(Ordering::Relaxed)).saturating_sub(sim_start);
    Ok(Outcome {
        readings,
        per_s: readings as f64 / span.as_secs_f64().max(1e-9),
        peak_rss_mib: peak as f64 / 1024.0,
        sent,
        batches: 0,
        extrinsics: 0,
        chain_pending: 0,
        run_s: 0.0,
        research: (0, 0),
    })
}

fn run_wardflow(
    o: &Options,
    s: Scenario,
    dir: &Path,
    ledger: bool,
    studies: usize,
) -> anyhow::Result<Outcome> {
    let data = dir.join(format!(
        "wardflow-data-{}-{studies}",
        if ledger { "ledger" } else { "no-ledger" }
    ));
    let (mqtt, http) = (free_port(), free_port());
    let server = Command::new(&o.wardflow)
        .args(["--log", "warn", "--data-dir"])
        .arg(&data)
        .args([
            "serve",
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--ledger",
            if ledger { "true" } else { "false" },
        ])
        .args(match (&o.chain, ledger) {
            (Some(url), true) => vec!["--chain", url.as_str()],
            _ => vec![],
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start wardflow serve")?;
    let pid = server.id();
    wait_for_port(http, Duration::from_secs(30))?;
    // Register the devices first, so registration is not timed.
    let creds = dir.join("wardflow-creds.json");
    let reg = Command::new(&o.wardflow)
        .args(["--log", "warn", "--data-dir"])
        .arg(&data)
        .args([
            "simulate",
            "--register",
            "--duration",
            "0s",
            "--devices",
            &o.devices.to_string(),
        ])
        .args([
            "--target",
            &format!("mqtt://127.0.0.1:{mqtt}"),
            "--credentials",
        ])
        .arg(&creds)
        .output()?;
    if !reg.status.success() {
        bail!(
            "registering devices: {}",
            String::from_utf8_lossy(&reg.stderr)
        );
    }
    if studies > 0 {
        research_setup(o, &data, &creds, studies)?;
    }
    let stored = || {
        http_get(http, "/metrics")
            .and_then(|m| metric(&m, "wardflow_readings_stored_total"))
            .unwrap_or(0.0) as u64
    };
    let base = stored();
    let start = Instant::now();
    let sim = simulate(o, s, mqtt, &data, &creds).spawn()?;
    let mut last = (base, start.elapsed());
    let mut child = Some(sim);
    let mut out = None;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = stored();
        if now != last.0 {
            last = (now, start.elapsed());
        }
        if let Some(c) = child.as_mut()
            && c.try_wait()?.is_some()
        {
            out = Some(child.take().expect("child").wait_with_output()?);
        }
        if child.is_none() && start.elapsed() - last.1 > Duration::from_secs(3) {
            break;
        }
    }
    let sent = sent_of(out.as_ref().expect("simulator finished"))?;
    let peak = peak_rss_kib(pid).unwrap_or(0);
    let m = http_get(http, "/metrics").unwrap_or_default();
    let get = |name: &str| metric(&m, name).unwrap_or(0.0) as u64;
    let batches = get("wardflow_ledger_batches_total");
    let extrinsics = get("wardflow_ledger_chain_extrinsics");
    let chain_pending = get("wardflow_ledger_chain_pending_batches");
    let run_s = start.elapsed().as_secs_f64();
    let sum_of = |prefix: &str| -> u64 {
        m.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let research = (
        sum_of("wardflow_research_windows_released{"),
        sum_of("wardflow_research_patients_contributing{"),
    );
    stop(server);
    let readings = last.0 - base;
    Ok(Outcome {
        readings,
        per_s: readings as f64 / last.1.as_secs_f64().max(1e-9),
        peak_rss_mib: peak as f64 / 1024.0,
        sent,
        batches,
        extrinsics,
        chain_pending,
        run_s,
        research,
    })
}

/// Registers `n` studies releasing every second, and every simulated
/// patient's research consent to each (in the local consent log), as a
/// hospital and its patients would with the CLI.
fn research_setup(o: &Options, data: &Path, creds: &Path, n: usize) -> anyhow::Result<()> {
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&o.wardflow)
            .args(["--log", "warn", "--data-dir"])
            .arg(data)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "wardflow {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let text = std::fs::read_to_string(creds)?;
    let mut patients: Vec<String> = Vec::new();
    collect_patients(&serde_json::from_str(&text)?, &mut patients);
    patients.sort();
    patients.dedup();
    cli(&["researchers", "add", "r-bench"])?;
    for i in 0..n {
        let file = data.join(format!("study-{i}.toml"));
        std::fs::write(
            &file,
            format!(
                "id = \"bench-{i}\"\nresearchers = [\"r-bench\"]\nmetrics = [\"hr\", \"spo2\", \"rr\"]\nwindow = \"1s\"\nstatistics = [\"count\", \"mean\", \"std\", \"p50\", \"p90\"]\nk = 3\nrunning_totals = true\n[cohort]\ngroup_by = [\"sex\"]\n[privacy]\nepsilon = 10.0\ndelta = 1e-6\nwindows = 100000\n[clamp]\nhr = [30, 200]\nspo2 = [70, 100]\nrr = [4, 60]\nmax_readings = 1000\nmax_readings_total = 1000000\n"
            ),
        )?;
        cli(&["studies", "add", &file.to_string_lossy()])?;
    }
    for p in &patients {
        let key = data.join(format!("{p}.key"));
        let key = key.to_string_lossy();
        cli(&["consent", "keygen", "--out", &key])?;
        cli(&["consent", "register", "--patient", p, "--key", &key])?;
        for i in 0..n {
            let study = format!("bench-{i}");
            cli(&[
                "consent",
                "grant",
                "--key",
                &key,
                "--patient",
                p,
                "--to",
                &study,
                "--purpose",
                &format!("research:{study}"),
                "--scope",
                "vitals",
            ])?;
        }
    }
    Ok(())
}

fn collect_patients(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("patient", Some(p)) => out.push(p.to_string()),
                    _ => collect_patients(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_patients(x, out)),
        _ => {}
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let base_name = match o.baseline {
        Baseline::Mosquitto => "mosquitto",
        Baseline::NoLedger => "no-ledger",
        Baseline::NoResearch => "no-research",
    };
    println!(
        "# wardflow e2e: {} devices, {} s per run, {} repeats, {base_name} then Wardflow each time\n",
        o.devices, o.duration, o.repeat
    );
    let mut summary = Vec::new();
    for s in &o.scenarios {
        let (mut m_rates, mut w_rates, mut ratios, mut m_rss, mut w_rss) =
            (vec![], vec![], vec![], vec![], vec![]);
        for r in 0..o.repeat {
            let dir = tempfile::tempdir()?;
            let m = match o.baseline {
                Baseline::Mosquitto => run_mosquitto(&o, *s, dir.path())?,
                Baseline::NoLedger => run_wardflow(&o, *s, dir.path(), false, 0)?,
                Baseline::NoResearch => run_wardflow(&o, *s, dir.path(), true, 0)?,
            };
            let studies = if o.baseline == Baseline::NoResearch {
                o.studies
            } else {
                0
            };
            let w = run_wardflow(&o, *s, dir.path(), true, studies)?;
            println!(
                "{:<16} run {}: {base_name} {:>11.0} readings/s ({} of {} sent, peak {:.0} MiB) | wardflow {:>11.0} readings/s stored ({} of {} sent, peak {:.0} MiB, {} audit batches) | ratio {:.2}",
                s.name,
                r + 1,
                m.per_s,
                m.readings,
                m.sent,
                m.peak_rss_mib,
                w.per_s,
                w.readings,
                w.sent,
                w.peak_rss_mib,
                w.batches,
                w.per_s / m.per_s
            );
            if studies > 0 {
                println!(
                    "{:<16} run {}: {studies} studies released {} windows, with {} patients contributing",
                    s.name,
                    r + 1,
                    w.research.0,
                    w.research.1
                );
            }
            if o.chain.is_some() {
                println!(
                    "{:<16} run {}: chain: {} anchoring extrinsics in {:.0} s ({:.1} per minute), {} batches queued at the end",
                    s.name,
                    r + 1,
                    w.extrinsics,
                    w.run_s,
                    w.extrinsics as f64 * 60.0 / w.run_s.max(1e-9),
                    w.chain_pending
                );
            }
            m_rates.push(m.per_s);
            w_rates.push(w.per_s);
            ratios.push(w.per_s / m.per_s);
            m_rss.push(m.peak_rss_mib);
            w_rss.push(w.peak_rss_mib);
        }
        summary.push((
            s.name,
            s.batch,
            median(m_rates),
            median(w_rates),
            median(ratios),
            median(m_rss),
            median(w_rss),
        ));
    }
    println!(
        "\n| scenario | {base_name} readings/s | Wardflow readings/s stored | Wardflow messages/s | ratio (median of pairs) | peak RSS {base_name} | peak RSS Wardflow |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, batch, m, w, ratio, mr, wr) in summary {
        println!(
            "| {name} | {m:.0} | {w:.0} | {:.0} | {ratio:.2} | {mr:.0} MiB | {wr:.0} MiB |",
            w / batch as f64
        );
    }
    Ok(())
}
