//! The QuestDB sink against a real line-protocol receiver: VictoriaMetrics
//! (Debian's `victoria-metrics`), which takes what questdb-rs sends as
//! InfluxDB line protocol over HTTP (`protocol_version=1`) and TCP. Rows
//! are read back from its `/api/v1/export`, where a table's field is the
//! series `<table>_<field>` and the symbols are its labels.
//!
//! The tests need the binary (`.ci/run` installs it); without it they fail.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wardflow_model::Metric;
use wardflow_storage::questdb::{AlertRow, Batch, QuestDbSink, ReadingRow, SinkConfig, SinkStats};

fn vm_binary() -> PathBuf {
    if let Ok(p) = std::env::var("WARDFLOW_VICTORIA_METRICS") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/bin/victoria-metrics",
        "/usr/local/bin/victoria-metrics",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "VictoriaMetrics is not installed: the QuestDB sink tests need a real line-protocol \
         receiver (`apt-get install victoria-metrics`, or set WARDFLOW_VICTORIA_METRICS to the binary)"
    );
}

/// A series read back: its labels and its (ms, value) samples.
type Series = (BTreeMap<String, String>, Vec<(i64, f64)>);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A VictoriaMetrics server on free ports with its own data directory.
struct Vm {
    child: Option<Child>,
    data: PathBuf,
    http: u16,
    influx: u16,
}

impl Vm {
    fn start(data: &Path) -> Vm {
        let mut vm = Vm {
            child: None,
            data: data.to_path_buf(),
            http: free_port(),
            influx: free_port(),
        };
        vm.restart();
        vm
    }

    /// Starts the server (again) on the same ports and data.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(vm_binary())
            .arg(format!("-storageDataPath={}", self.data.display()))
            .arg("-retentionPeriod=100y")
            .arg("-dedup.minScrapeInterval=1ms")
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.http))
            .arg(format!("-influxListenAddr=127.0.0.1:{}", self.influx))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start victoria-metrics");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(self.http, "/health").is_none_or(|(code, _)| code != 200) {
            assert!(Instant::now() < deadline, "VictoriaMetrics did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server the way an operator would (SIGINT: it writes what
    /// it accepted to disk first).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    fn http_conf(&self) -> String {
        format!("http::addr=127.0.0.1:{};protocol_version=1;", self.http)
    }

    fn tcp_conf(&self) -> String {
        format!("tcp::addr=127.0.0.1:{};protocol_version=1;", self.influx)
    }

    /// Every series whose name matches the regex, as (labels, samples).
    fn export(&self, name_regex: &str) -> Vec<Series> {
        let selector = format!("{{__name__=~\"{name_regex}\"}}");
        let path = format!("/api/v1/export?match[]={}", encode(&selector));
        let (code, body) = get(self.http, &path).expect("export");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let labels = v["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let ts = v["timestamps"].as_array().unwrap();
                let vs = v["values"].as_array().unwrap();
                let samples = ts
                    .iter()
                    .zip(vs)
                    .map(|(t, v)| (t.as_i64().unwrap(), v.as_f64().unwrap()))
                    .collect();
                (labels, samples)
            })
            .collect()
    }

    /// Waits until the series matching `name_regex` hold `n` samples in all.
    fn wait_for(&self, name_regex: &str, n: usize) -> Vec<Series> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let series = self.export(name_regex);
            let total: usize = series.iter().map(|(_, s)| s.len()).sum();
            if total >= n || Instant::now() > deadline {
                return series;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

const T0: i64 = 1_764_000_000_000_000_000;
const METRICS: [Metric; 2] = [Metric::Hr, Metric::Spo2];

/// Reading `i` of a run: three patients, each with its own monitor, two
/// metrics, one reading per millisecond of a series.
fn reading(i: usize) -> (String, String, Metric, i64, f64) {
    let patient = format!("p-{}", i % 3);
    let device = format!("mon-{}", i % 3);
    let metric = METRICS[(i / 3) % 2];
    let time = T0 + (i as i64 / 6) * 1_000_000;
    let value = 50.0 + (i % 97) as f64 + 0.25;
    (patient, device, metric, time, value)
}

fn batch_of(range: std::ops::Range<usize>) -> Batch {
    let mut b = Batch::default();
    for i in range {
        let (p, d, m, t, v) = reading(i);
        b.push_reading(&ReadingRow {
            time_ns: t,
            patient: Some(&p),
            device: &d,
            metric: m,
            value: v,
            seq: Some(i as u64),
            quality: 0,
            received_ns: t + 5_000_000,
        });
    }
    b
}

/// Checks that readings 0..n each arrived exactly once with their value.
fn assert_readings_exactly_once(vm: &Vm, n: usize) {
    let series = vm.wait_for("readings_value", n);
    let mut got: HashMap<(String, String, String, i64), Vec<f64>> = HashMap::new();
    for (labels, samples) in &series {
        for &(t, v) in samples {
            got.entry((
                labels["patient_id"].clone(),
                labels["device_id"].clone(),
                labels["metric"].clone(),
                t,
            ))
            .or_default()
            .push(v);
        }
    }
    let mut missing = 0;
    for i in 0..n {
        let (p, d, m, t, v) = reading(i);
        match got.remove(&(p, d, m.name().to_string(), t / 1_000_000)) {
            Some(vs) => {
                assert_eq!(vs.len(), 1, "reading {i} arrived {} times", vs.len());
                assert!((vs[0] - v).abs() < 1e-9, "reading {i}: {} != {v}", vs[0]);
            }
            None => missing += 1,
        }
    }
    assert_eq!(missing, 0, "{missing} of {n} readings missing");
    assert!(got.is_empty(), "{} unexpected samples", got.len());
}

fn config(conf: String, spool: &Path) -> SinkConfig {
    let mut c = SinkConfig::new(conf, spool);
    c.spool_after = Duration::from_millis(500);
    c.batch_rows = 1000;
    c
}

#[test]
fn http_readings_alerts_and_dead_letters_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(&dir.path().join("vm"));
    let stats = Arc::new(SinkStats::default());
    let sink = QuestDbSink::start(
        config(vm.http_conf(), &dir.path().join("spool")),
        stats.clone(),
    )
    .unwrap();
    let handle = sink.handle();
    let n = 3000;
    for chunk in (0..n).step_by(500) {
        handle
            .submit(batch_of(chunk..chunk + 500))
            .unwrap()
            .wait()
            .unwrap();
    }
    // A dead letter and an alert transition.
    let mut extra = Batch::default();
    extra.push_dead_letter(wardflow_storage::questdb::DeadLetterRow {
        received_ns: T0,
        device: "mon-0".into(),
        patient: Some("p-0".into()),
        reason: "implausible_value".into(),
        metric: Some("hr".into()),
        detail: "hr 900 outside 0..300".into(),
        raw: "{\"n\":\"hr\",\"v\":900}".into(),
        time_ns: Some(T0),
        seq: Some(7),
        ordinal: 0,
    });
    extra.push_alert(AlertRow {
        at_ns: T0 + 2_000_000,
        alert_id: "a-17".into(),
        seq: 2,
        event: "acknowledged".into(),
        state: "acknowledged".into(),
        priority: "high".into(),
        base_priority: "high".into(),
        rule: "hr-high".into(),
        subject: "p-0".into(),
        subject_kind: "patient".into(),
        patient: Some("p-0".into()),
        device: None,
        care_unit: Some("icu-1".into()),
        bed: Some("3".into()),
        description: "heart rate above 130".into(),
        technical: false,
        condition: true,
        raised_ns: T0,
        first_reading_ns: T0,
        by: Some("nurse-1".into()),
    });
    handle.submit(extra).unwrap().wait().unwrap();
    assert_readings_exactly_once(&vm, n);

    let seq = vm.wait_for("readings_seq", n);
    assert_eq!(seq.iter().map(|(_, s)| s.len()).sum::<usize>(), n);
    let units: std::collections::BTreeSet<_> = seq.iter().map(|(l, _)| l["unit"].clone()).collect();
    assert_eq!(units, ["%", "/min"].map(String::from).into());

    let dead = vm.wait_for("deadletters_ordinal", 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0["reason"], "implausible_value");
    assert_eq!(dead[0].0["device_id"], "mon-0");
    assert_eq!(dead[0].1, vec![(T0 / 1_000_000, 0.0)]);
    let dseq = vm.wait_for("deadletters_seq", 1);
    assert_eq!(dseq[0].1, vec![(T0 / 1_000_000, 7.0)]);

    let alerts = vm.wait_for("alerts_seq", 1);
    assert_eq!(alerts.len(), 1);
    let (labels, samples) = &alerts[0];
    assert_eq!(
        (
            labels["alert_id"].as_str(),
            labels["event"].as_str(),
            labels["priority"].as_str(),
            labels["care_unit"].as_str(),
            labels["rule"].as_str()
        ),
        ("a-17", "acknowledged", "high", "icu-1", "hr-high")
    );
    assert_eq!(samples, &vec![(T0 / 1_000_000 + 2, 2.0)]);

    assert_eq!(stats.readings_sent.load(Ordering::Relaxed), n as u64);
    assert_eq!(stats.alerts_sent.load(Ordering::Relaxed), 1);
    assert_eq!(stats.dead_letters_sent.load(Ordering::Relaxed), 1);
    assert_eq!(stats.send_errors.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rows_spooled.load(Ordering::Relaxed), 0);
    sink.shutdown();
}

#[test]
fn tcp_readings_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::start(&dir.path().join("vm"));
    let stats = Arc::new(SinkStats::default());
    let sink = QuestDbSink::start(
        config(vm.tcp_conf(), &dir.path().join("spool")),
        stats.clone(),
    )
    .unwrap();
    let n = 2400;
    for chunk in (0..n).step_by(600) {
        sink.handle()
            .submit(batch_of(chunk..chunk + 600))
            .unwrap()
            .wait()
            .unwrap();
    }
    assert_readings_exactly_once(&vm, n);
    assert_eq!(stats.readings_sent.load(Ordering::Relaxed), n as u64);
    sink.shutdown();
}

/// The receiver stops mid-stream while readings keep coming, and comes
/// back: every reading arrives exactly once, through the spool.
#[test]
fn an_outage_spools_and_drains_every_reading_exactly_once() {
    outage(Vm::http_conf);
}

/// The same over TCP, which has no answers: what went into the socket
/// just before the receiver stopped is sent again from the sink's recent
/// batches, and collapses with its first copy if that arrived.
#[test]
fn an_outage_over_tcp_loses_nothing_either() {
    outage(Vm::tcp_conf);
}

fn outage(conf: fn(&Vm) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::start(&dir.path().join("vm"));
    let stats = Arc::new(SinkStats::default());
    let spool_dir = dir.path().join("spool");
    let sink = QuestDbSink::start(config(conf(&vm), &spool_dir), stats.clone()).unwrap();
    let handle = sink.handle();
    let (rounds, per_round) = (60, 200);
    let mut most_spooled = 0;
    for round in 0..rounds {
        if round == 15 {
            vm.stop();
        }
        if round == 45 {
            assert!(stats.spool_rows.load(Ordering::Relaxed) > 0);
            vm.restart();
        }
        let from = round * per_round;
        handle
            .submit(batch_of(from..from + per_round))
            .unwrap()
            .wait()
            .unwrap();
        most_spooled = most_spooled.max(stats.spool_rows.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rows of rounds 15..45 at least went through the spool.
    assert!(
        most_spooled >= 30 * per_round as u64 - per_round as u64,
        "{most_spooled}"
    );
    assert!(stats.rows_spooled.load(Ordering::Relaxed) >= most_spooled);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.spool_files.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stats.spool_rows.load(Ordering::Relaxed), 0);
    assert_eq!(stats.spool_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(stats.receiver_up.load(Ordering::Relaxed), 1);
    assert!(stats.send_errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        stats.rows_drained.load(Ordering::Relaxed),
        stats.rows_spooled.load(Ordering::Relaxed)
    );
    assert_readings_exactly_once(&vm, rounds * per_round);
    sink.shutdown();
    assert_eq!(std::fs::read_dir(&spool_dir).unwrap().count(), 0);
}

/// What a stopped sink left in its spool is sent by the next one.
#[test]
fn a_restart_drains_the_spool_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let mut vm = Vm::start(&dir.path().join("vm"));
    vm.stop();
    let stats = Arc::new(SinkStats::default());
    let sink = QuestDbSink::start(config(vm.http_conf(), &spool_dir), stats.clone()).unwrap();
    sink.handle()
        .submit(batch_of(0..500))
        .unwrap()
        .wait()
        .unwrap();
    sink.shutdown();
    assert_eq!(stats.spool_rows.load(Ordering::Relaxed), 500);

    vm.restart();
    let stats = Arc::new(SinkStats::default());
    let sink = QuestDbSink::start(config(vm.http_conf(), &spool_dir), stats.clone()).unwrap();
    assert_eq!(stats.spool_rows.load(Ordering::Relaxed), 500);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.spool_files.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_readings_exactly_once(&vm, 500);
    sink.shutdown();
}

/// A spool at its limit refuses rows instead of dropping them.
#[test]
fn a_full_spool_refuses_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::start(&dir.path().join("vm"));
    vm.stop();
    let mut c = config(vm.http_conf(), &dir.path().join("spool"));
    c.spool_max_bytes = 64 * 1024;
    let stats = Arc::new(SinkStats::default());
    let sink = QuestDbSink::start(c, stats.clone()).unwrap();
    let mut refused = 0;
    for round in 0..20 {
        let r = sink
            .handle()
            .submit(batch_of(round * 500..round * 500 + 500))
            .and_then(|r| r.wait());
        if r.is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0);
    assert!(stats.spool_bytes.load(Ordering::Relaxed) <= 64 * 1024);
    assert!(stats.spool_full.load(Ordering::Relaxed) > 0);
    sink.shutdown();
}
