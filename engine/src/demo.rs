//! `wardflow demo`: the engine and 50 simulated bedside monitors in one
//! process, on loopback, with a temporary data directory. The patients lie
//! in two units; two more patients follow a script (a desaturation and a
//! tachycardia) so the default alert rules have something to say, and a
//! clinician account covering both units is printed with the commands to
//! follow its alert feed. Every simulated patient consents (in the local
//! consent log) to a research study, `demo-vitals`, which the demo serves
//! over Arrow Flight to the researcher account it prints.

/// The demo's research study.
const DEMO_STUDY: &str = r#"
id = "demo-vitals"
title = "Heart rate of the ward, every 10 s"
researchers = ["demo-researcher"]
metrics = ["hr"]
window = "10s"
statistics = ["count", "mean"]
k = 5

# The budget covers 10 minutes of windows; then the stream ends with
# RESOURCE_EXHAUSTED. One patient per row, 50 patients: the noise on the
# mean is a few beats per minute.
[privacy]
epsilon = 20.0
delta = 1e-6
windows = 60

[clamp]
hr = [40, 140]
max_readings = 12
"#;

/// The scripted patients of the demo (simulator scenario format).
const DEMO_SCENARIO: &str = r#"
name = "demo"
description = "Two patients who deteriorate while the demo runs"
duration = "24h"
seed = 2026

[[patients]]
id = "demo-desat"
device = "demo-mon-1"
unit = "icu-a"
bed = "bed-90"

[[patients.events]]
kind = "desaturation"
onset = "10s"
ramp = "40s"
spo2 = 82
duration = "10m"

[[patients]]
id = "demo-tachy"
device = "demo-mon-2"
unit = "icu-b"
bed = "bed-90"

[[patients.events]]
kind = "tachycardia"
onset = "20s"
ramp = "40s"
hr = 155
duration = "10m"
"#;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use wardflow_ingest::census::{Census, Clinicians};
use wardflow_simulator::scenario::Scenario;
use wardflow_simulator::{PayloadKind, SimConfig};
use wardflow_storage::query::{ReadingQuery, read_readings};

use crate::cli::{Cli, DemoArgs, effective_config, stop_flag};
use crate::node::Node;
use crate::output::{format_time, parse_duration};

/// Where the demo keeps its patients' keys (each a secret URI, as a
/// patient's wallet would hold it).
const PATIENT_KEYS: &str = "demo-patient-keys";

/// A demo patient's key, created and registered as their account on
/// first use.
fn patient_key(
    config: &crate::config::Config,
    patient: &str,
) -> anyhow::Result<wardflow_ledger_bridge::chain::Keypair> {
    use wardflow_ledger_bridge::consent::AccountRegistry;
    let keys = config.data_dir.join(PATIENT_KEYS);
    std::fs::create_dir_all(&keys)?;
    let suri = wardflow_ledger_bridge::chain::load_or_create_suri(&keys.join(patient))?;
    let key = wardflow_ledger_bridge::chain::load_signer(&suri).map_err(anyhow::Error::msg)?;
    AccountRegistry::register(
        &config.ledger_dir(),
        &format!("patient:{patient}"),
        &key.public_key().0,
    )?;
    Ok(key)
}

/// The console's demo accounts: a clinician for each unit and an
/// administrator (secrets, on the first run only), and the consent of the
/// desaturating patient (icu-a) to the icu-b clinician, which the patient
/// can revoke from the console.
struct ConsoleAccounts {
    rn_a: Option<String>,
    rn_b: Option<String>,
    admin: Option<String>,
}

fn console_accounts(config: &crate::config::Config) -> anyhow::Result<ConsoleAccounts> {
    use wardflow_ingest::census::{Admins, CensusError};
    use wardflow_ledger_bridge::consent::{ConsentRecord, Terms};
    let data = &config.data_dir;
    let clinician = |id: &str, unit: &str| match Clinicians::add(data, id, &[unit.into()], None) {
        Ok(s) => Ok(Some(s)),
        Err(CensusError::ClinicianExists(_)) => Ok(None),
        Err(e) => Err(e),
    };
    let rn_a = clinician("demo-rn-a", "icu-a")?;
    let rn_b = clinician("demo-rn-b", "icu-b")?;
    let admin = match Admins::add(data, "demo-admin", None) {
        Ok(s) => Some(s),
        Err(CensusError::AdminExists(_)) => None,
        Err(e) => return Err(e.into()),
    };
    for patient in ["demo-desat", "demo-tachy"] {
        let key = patient_key(config, patient)?;
        if patient == "demo-desat" && rn_b.is_some() {
            let terms = Terms {
                patient: patient.into(),
                grantee: "demo-rn-b".into(),
                purpose: "treatment".into(),
                scope: vec!["vitals".into(), "alerts".into()],
                not_after_ms: wardflow_ledger_bridge::now_ms() + 30 * 24 * 3600 * 1000,
                may_delegate: false,
                nonce: 1,
            };
            crate::consent::record_locally(
                &config.ledger_dir(),
                &key,
                &ConsentRecord::Grant(terms),
            )?;
        }
    }
    Ok(ConsoleAccounts { rn_a, rn_b, admin })
}

/// Registers the demo study, its researcher (returns the secret, once) and
/// every simulated patient's consent to it, signed with a key of their own.
fn demo_study(
    config: &crate::config::Config,
    creds: &[wardflow_simulator::Credential],
) -> anyhow::Result<Option<String>> {
    use wardflow_ledger_bridge::consent::{ConsentRecord, Terms};
    use wardflow_research::store::{Researchers, StoreError, add_study};
    let data = &config.data_dir;
    let secret = match Researchers::add(data, "demo-researcher", None) {
        Ok(s) => Some(s),
        Err(StoreError::ResearcherExists(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let file = data.join("demo-vitals.toml");
    std::fs::write(&file, DEMO_STUDY)?;
    match add_study(data, &file) {
        Ok(_) | Err(StoreError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if secret.is_none() {
        return Ok(None); // consents were given on the first run
    }
    let ledger = config.ledger_dir();
    for c in creds {
        let patient = c.patient.as_str();
        let key = patient_key(config, patient)?;
        let terms = Terms {
            patient: patient.to_string(),
            grantee: "demo-vitals".into(),
            purpose: "research:demo-vitals".into(),
            scope: vec!["vitals".into()],
            not_after_ms: wardflow_ledger_bridge::now_ms() + 30 * 24 * 3600 * 1000,
            may_delegate: false,
            nonce: 0,
        };
        crate::consent::record_locally(&ledger, &key, &ConsentRecord::Grant(terms))?;
    }
    Ok(secret)
}

pub fn run(cli: &Cli, args: &DemoArgs) -> anyhow::Result<()> {
    let mut serve = args.serve.clone();
    // Ephemeral ports unless asked otherwise, so the demo runs beside anything.
    serve.mqtt.get_or_insert_with(|| "127.0.0.1:0".into());
    serve.http.get_or_insert_with(|| "127.0.0.1:0".into());
    serve.flight.get_or_insert_with(|| "127.0.0.1:0".into());
    let mut config = effective_config(cli, &serve)?;
    let temp = match &cli.data_dir {
        Some(_) => None,
        None => {
            let t = tempfile::Builder::new()
                .prefix("wardflow-demo-")
                .tempdir()
                .context("creating a temporary data directory")?;
            config.data_dir = t.path().to_path_buf();
            Some(t)
        }
    };
    let duration = args
        .duration
        .as_deref()
        .map(|d| parse_duration("--duration", d))
        .transpose()?;
    let stop = stop_flag()?;

    let node = Node::start(&config)?;
    let sim = SimConfig {
        target: node.mqtt_addr.to_string(),
        devices: args.patients,
        rate: args.rate,
        duration: None,
        payload: PayloadKind::Senml,
        batch: 7,
        qos: 1,
        window: 16,
        threads: 1,
        bad_ratio: args.bad_ratio,
        seed: 2026,
        device_prefix: "bed-".into(),
    };
    let creds = wardflow_simulator::register(&config.data_dir, &sim)?;
    // Half the patients in each unit.
    for (i, c) in creds.iter().enumerate() {
        let unit = if i % 2 == 0 { "icu-a" } else { "icu-b" };
        let bed = format!("bed-{:02}", i / 2 + 1);
        if Census::load(&config.data_dir)?
            .get(c.patient.as_str())
            .is_none()
        {
            Census::admit(&config.data_dir, c.patient.clone(), unit, &bed, None, None)?;
        }
    }
    let scenario = Scenario::parse(DEMO_SCENARIO, std::path::Path::new("demo scenario"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let scripted = wardflow_simulator::register_scenario(&config.data_dir, &scenario)?;
    let units = ["icu-a".to_string(), "icu-b".to_string()];
    let clinician = match Clinicians::add(&config.data_dir, "demo-rn", &units, None) {
        Ok(secret) => Some(secret),
        Err(wardflow_ingest::census::CensusError::ClinicianExists(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let researcher = demo_study(&config, &creds)?;
    let accounts = console_accounts(&config)?;
    println!(
        "wardflow demo: {} simulated patients in units icu-a and icu-b on MQTT {}, metrics on http://{}/metrics, data in {}",
        args.patients,
        node.mqtt_addr,
        node.http_addr,
        config.data_dir.display()
    );
    println!(
        "two more patients deteriorate (a desaturation from 10 s, a tachycardia from 20 s): the default rules alert within about a minute"
    );
    if let Some(secret) = &clinician {
        let port = node.mqtt_addr.port();
        println!("follow the alerts as clinician demo-rn:");
        println!(
            "  mosquitto_sub -p {port} -u demo-rn -P {secret} -t 'wardflow/v1/alerts/icu-a/#' -t 'wardflow/v1/alerts/icu-b/#'"
        );
        println!(
            "  curl -N -H 'Authorization: Bearer demo-rn:{secret}' http://{}/v1/alerts/stream",
            node.http_addr
        );
    }
    if let (Some(secret), Some(addr)) = (&researcher, node.flight_addr) {
        println!(
            "read the research study demo-vitals (every patient consented; a batch every 10 s, for 10 minutes of privacy budget) as demo-researcher:"
        );
        println!(
            "  python3 -c \"import pyarrow.flight as f; c = f.connect('grpc://{addr}'); o = f.FlightCallOptions(headers=[c.authenticate_basic_token('demo-researcher', '{secret}')]); [print(b.data.to_pylist()) for b in c.do_get(f.Ticket(b'{{\\\"study\\\": \\\"demo-vitals\\\"}}'), o)]\""
        );
    }
    println!("the web console: http://{}/", node.http_addr);
    if let Some(s) = &accounts.rn_a {
        println!("  clinician demo-rn-a (icu-a), secret {s}");
    }
    if let Some(s) = &accounts.rn_b {
        println!(
            "  clinician demo-rn-b (icu-b), secret {s}; patient demo-desat (icu-a) consented to them"
        );
    }
    if let Some(s) = &accounts.admin {
        println!("  administrator demo-admin, secret {s}");
    }
    println!(
        "  patients demo-desat and demo-tachy: their keys are in {}",
        config.data_dir.join(PATIENT_KEYS).display()
    );
    println!("one line a second; Ctrl-C stops");

    let sim_stop = Arc::new(AtomicBool::new(false));
    let simulator = {
        let (sim, stop) = (sim.clone(), sim_stop.clone());
        std::thread::Builder::new()
            .name("demo-simulator".into())
            .spawn(move || wardflow_simulator::run(&sim, creds, stop, |_| {}))?
    };
    let script = {
        let (sim, stop) = (sim.clone(), sim_stop.clone());
        std::thread::Builder::new()
            .name("demo-scenario".into())
            .spawn(move || {
                wardflow_simulator::run_scenario(&sim, &scenario, scripted, stop, |_| {})
            })?
    };

    let started = Instant::now();
    let m = node.metrics.clone();
    let totals = || {
        let rejected: u64 = wardflow_model::RejectReason::ALL
            .iter()
            .map(|r| {
                m.ingest
                    .readings_rejected
                    .get_or_create(&[("reason", r.code())])
                    .get()
            })
            .sum();
        (
            m.ingest.readings_accepted.get(),
            m.engine.readings_stored.get(),
            rejected,
        )
    };
    let alerts = || {
        let n = |e: &'static str| {
            m.engine
                .alert_transitions
                .get_or_create(&[("event", e)])
                .get()
        };
        (n("raised"), n("resolved"))
    };
    let mut last = totals();
    let mut last_at = Instant::now();
    while !stop.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(100));
        if last_at.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let now = totals();
        let secs = last_at.elapsed().as_secs_f64();
        let rate = |a: u64, b: u64| (a - b) as f64 / secs;
        let (raised, resolved) = alerts();
        println!(
            "{:>5.0}s  accepted {:>6.0}/s  stored {:>6.0}/s  dead letters {:>4.0}/s  (total stored {}, dead letters {})  alerts open {} (raised {})  connections {}  lag {} ms",
            started.elapsed().as_secs_f64(),
            rate(now.0, last.0),
            rate(now.1, last.1),
            rate(now.2, last.2),
            now.1,
            now.2,
            raised.saturating_sub(resolved),
            raised,
            m.ingest.connections.get(),
            m.engine.dataflow_lag_ms.get(),
        );
        (last, last_at) = (now, Instant::now());
    }

    println!("stopping: devices first, then the engine stores everything it accepted");
    sim_stop.store(true, Ordering::SeqCst);
    let report = simulator
        .join()
        .map_err(|_| anyhow::anyhow!("the simulator panicked"))?;
    let _ = script.join();
    let data_dir = node.data_dir.clone();
    node.shutdown()?;
    let (accepted, stored, dead) = totals();
    println!("{report}");
    println!("accepted {accepted} readings, stored {stored}, dead letters {dead}");
    let log = crate::alerting::read_log(&data_dir)?;
    let raised: Vec<_> = log
        .iter()
        .filter(|a| a.event == wardflow_rules::alarm::AlertEventKind::Raised)
        .collect();
    println!("alerts raised: {}", raised.len());
    for a in raised.iter().take(10) {
        println!(
            "  {} {} {} bed {} {} ({:?})",
            format_time(a.raised_ns),
            a.patient.as_deref().or(a.device.as_deref()).unwrap_or(""),
            a.unit.as_deref().unwrap_or(""),
            a.bed.as_deref().unwrap_or(""),
            a.rule,
            a.priority
        );
    }
    let q = ReadingQuery {
        patient: Some("bed-patient-0000".into()),
        ..Default::default()
    };
    let keys = config.keyring_to_read()?;
    if let Some(last) = read_readings(&data_dir, keys.as_deref(), &q)?.rows.last() {
        println!(
            "latest stored reading of bed-patient-0000: {} {} = {} {}",
            format_time(last.time_ns),
            last.metric,
            last.value,
            last.unit
        );
    }
    // The audit trail of what was stored: batches sealed, and where.
    let ledger = data_dir.join("ledger");
    if let Ok(anchors) = wardflow_ledger_bridge::AnchorLog::read(
        &wardflow_ledger_bridge::anchor_log_path(&ledger, 0),
        None,
    ) && let Some(last) = anchors.last()
    {
        let leaves: u64 = anchors.iter().map(|a| a.leaves).sum();
        println!(
            "audit trail: {} batches sealed over {leaves} leaves, last root {}…; check with `wardflow verify --data-dir DIR`",
            anchors.len(),
            wardflow_ledger_bridge::chain::hex(&last.root[..8])
        );
    }
    if temp.is_some() {
        println!("(the temporary data directory is removed; pass --data-dir to keep the data)");
    }
    drop(temp);
    Ok(())
}
