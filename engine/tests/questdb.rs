//! `storage.backend = "both"` end to end: devices publish over MQTT, the
//! engine stores each reading in its embedded store and sends it to a real
//! line-protocol receiver (VictoriaMetrics, as docs/questdb.md describes);
//! the receiver stops mid-stream and comes back, and every reading is
//! there exactly once. Fails without `/usr/bin/victoria-metrics`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Vm {
    child: Option<Child>,
    data: PathBuf,
    http: u16,
}

impl Vm {
    fn start(data: &Path) -> Vm {
        let mut vm = Vm {
            child: None,
            data: data.to_path_buf(),
            http: free_port(),
        };
        vm.restart();
        vm
    }

    fn restart(&mut self) {
        let bin = Path::new("/usr/bin/victoria-metrics");
        assert!(
            bin.exists(),
            "VictoriaMetrics is not installed: this test needs a real line-protocol receiver (apt-get install victoria-metrics)"
        );
        let child = Command::new(bin)
            .arg(format!("-storageDataPath={}", self.data.display()))
            .arg("-retentionPeriod=100y")
            .arg("-dedup.minScrapeInterval=1ms")
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.http))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start victoria-metrics");
        self.child = Some(child);
        assert!(
            wait_for(Duration::from_secs(30), || http_get(self.http, "/health")
                .filter(|(s, _)| *s == 200))
            .is_some(),
            "VictoriaMetrics did not start"
        );
    }

    fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let mut c = c;
            let _ = c.wait();
        }
    }

    /// (labels, [(ms, value)]) of every series named `name`.
    fn export(&self, name: &str) -> Vec<(serde_json::Value, Vec<(i64, f64)>)> {
        let path = format!("/api/v1/export?match%5B%5D={name}");
        let (code, body) = get_http10(self.http, &path).expect("export");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let samples = v["timestamps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(v["values"].as_array().unwrap())
                    .map(|(t, x)| (t.as_i64().unwrap(), x.as_f64().unwrap()))
                    .collect();
                (v["metric"].clone(), samples)
            })
            .collect()
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

/// An HTTP/1.0 GET (the export streams its answer, chunked under HTTP/1.1).
fn get_http10(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// Pack `k`: five heart rates, 10 ms apart, numbered from 5k+1.
fn pack(bt: i64, k: usize) -> String {
    let records: Vec<String> = (k * 5..k * 5 + 5)
        .map(|i| {
            let base = if i == k * 5 {
                format!(r#""bn":"urn:dev:mon-1:","bt":{bt},"#)
            } else {
                String::new()
            };
            format!(
                r#"{{{base}"n":"hr","u":"/min","v":{},"t":{},"seq":{}}}"#,
                60 + i % 50,
                i as f64 * 0.01,
                i + 1
            )
        })
        .collect();
    format!("[{}]", records.join(","))
}

#[test]
fn both_backends_store_every_reading_once_through_an_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut vm = Vm::start(&tmp.path().join("vm"));
    let secret = add_device(&dir, "mon-1", "p-1");
    let conf = format!("http::addr=127.0.0.1:{};protocol_version=1;", vm.http);
    let server = Server::start(
        &dir,
        &[
            "--storage-backend",
            "both",
            "--questdb",
            &conf,
            "--flush-interval-ms",
            "200",
        ],
    );
    let port = server.mqtt_port;
    let bt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 120;
    let (before, during, after) = (8, 8, 8);
    for k in 0..before {
        publish_pack(port, "mon-1", &secret, &pack(bt, k));
    }
    // One implausible value, for the dead letters.
    publish_pack(
        port,
        "mon-1",
        &secret,
        &format!(r#"[{{"bn":"urn:dev:mon-1:","bt":{bt},"n":"hr","v":900,"t":50,"seq":9000}}]"#),
    );
    let readings_in_vm = |vm: &Vm| -> usize {
        vm.export("readings_value")
            .iter()
            .map(|(_, s)| s.len())
            .sum()
    };
    assert!(
        wait_for(Duration::from_secs(30), || (readings_in_vm(&vm)
            == before * 5)
            .then_some(()))
        .is_some(),
        "{} of {} readings reached the receiver",
        readings_in_vm(&vm),
        before * 5
    );

    // The receiver stops; readings keep coming and wait in the spool.
    vm.stop();
    for k in before..before + during {
        publish_pack(port, "mon-1", &secret, &pack(bt, k));
    }
    let spooled = wait_for(Duration::from_secs(30), || {
        metric(&server.metrics(), "wardflow_questdb_spool_rows").filter(|&n| n > 0.0)
    });
    assert!(
        spooled.is_some(),
        "nothing spooled:\n{}",
        server
            .metrics()
            .lines()
            .filter(|l| l.contains("questdb"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric(&server.metrics(), "wardflow_questdb_receiver_up"),
        Some(0.0)
    );

    // It comes back; the spool drains.
    vm.restart();
    for k in before + during..before + during + after {
        publish_pack(port, "mon-1", &secret, &pack(bt, k));
    }
    let n = (before + during + after) * 5;
    let drained = wait_for(Duration::from_secs(60), || {
        let m = server.metrics();
        (metric(&m, "wardflow_questdb_spool_rows") == Some(0.0)
            && metric(&m, "wardflow_questdb_receiver_up") == Some(1.0)
            && readings_in_vm(&vm) >= n)
            .then_some(())
    });
    assert!(
        drained.is_some(),
        "{} of {n} readings in the receiver",
        readings_in_vm(&vm)
    );
    let m = server.metrics();
    assert!(metric(&m, "wardflow_questdb_rows_spooled_total").unwrap() >= 1.0);
    assert_eq!(
        metric(&m, "wardflow_questdb_rows_spooled_total"),
        metric(&m, "wardflow_questdb_rows_drained_total")
    );

    // Exactly once, with the embedded store's values.
    let embedded: HashMap<i64, f64> = query(&dir, "p-1")
        .iter()
        .map(|r| {
            (
                r["time_ns"].as_i64().unwrap() / 1_000_000,
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(embedded.len(), n);
    let series = vm.export("readings_value");
    assert_eq!(series.len(), 1, "{series:?}");
    let (labels, samples) = &series[0];
    assert_eq!(labels["patient_id"], "p-1");
    assert_eq!(labels["device_id"], "mon-1");
    assert_eq!(labels["metric"], "hr");
    assert_eq!(labels["unit"], "/min");
    assert_eq!(samples.len(), n, "every reading exactly once");
    for (t, v) in samples {
        assert_eq!(embedded.get(t), Some(v), "reading at {t} ms");
    }
    let dead = vm.export("deadletters_ordinal");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0["reason"], "implausible_value");
    assert!(
        !server.log_text().contains("protocol_version=1"),
        "the connection string reached the log"
    );
}

/// QuestDB alone: no Parquet readings, the rows in the receiver, and a
/// restart (which validates from the device states the flushes still
/// write) sends nothing twice.
#[test]
fn questdb_alone_writes_no_parquet_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let vm = Vm::start(&tmp.path().join("vm"));
    let secret = add_device(&dir, "mon-1", "p-1");
    let conf = format!("http::addr=127.0.0.1:{};protocol_version=1;", vm.http);
    let mut server = Server::start(&dir, &["--storage-backend", "questdb", "--questdb", &conf]);
    let bt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 120;
    let in_vm = |vm: &Vm| -> usize {
        vm.export("readings_value")
            .iter()
            .map(|(_, s)| s.len())
            .sum()
    };
    for k in 0..3 {
        publish_pack(server.mqtt_port, "mon-1", &secret, &pack(bt, k));
    }
    assert!(
        wait_for(Duration::from_secs(30), || (in_vm(&vm) == 15).then_some(())).is_some(),
        "{} of 15 readings in the receiver",
        in_vm(&vm)
    );
    server.stop();
    assert!(query(&dir, "p-1").is_empty(), "no embedded readings");
    assert!(
        files_under(&dir.join("readings")).is_empty(),
        "{:?}",
        files_under(&dir.join("readings"))
    );
    assert!(!files_under(&dir.join("state")).is_empty());

    server.restart();
    // A resend of the last pack (the device did not get its PUBACK, say)
    // is refused by validation, from the restored device state (and
    // would collapse with its first copy in the receiver anyway).
    publish_pack(server.mqtt_port, "mon-1", &secret, &pack(bt, 2));
    publish_pack(server.mqtt_port, "mon-1", &secret, &pack(bt, 3));
    assert!(
        wait_for(Duration::from_secs(30), || (in_vm(&vm) >= 20).then_some(())).is_some(),
        "{} of 20 readings in the receiver",
        in_vm(&vm)
    );
    std::thread::sleep(Duration::from_secs(2));
    let series = vm.export("readings_value");
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].1.len(), 20, "every reading exactly once");
    server.stop();
}

/// Alert transitions reach the `alerts` table once logged; after a
/// restart only the part of the alert log QuestDB may not have is sent
/// again, and nothing appears twice.
#[test]
fn alert_transitions_reach_the_alerts_table_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let vm = Vm::start(&tmp.path().join("vm"));
    let rules = etco2_probe_rules(tmp.path());
    let secret = admit_p7(&dir);
    let conf = format!("http::addr=127.0.0.1:{};protocol_version=1;", vm.http);
    let mut server = Server::start(
        &dir,
        &[
            "--storage-backend",
            "both",
            "--questdb",
            &conf,
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    publish_pack(
        server.mqtt_port,
        "mon-7",
        &secret,
        &format!(
            r#"[{{"bn":"urn:dev:mon-7:","bt":{now_s},"n":"etco2","u":"mm[Hg]","v":120,"seq":1}}]"#
        ),
    );
    let raised = wait_for(Duration::from_secs(30), || {
        vm.export("alerts_seq")
            .into_iter()
            .find(|(l, _)| l["rule"] == "etco2-high" && l["event"] == "raised")
    })
    .expect("the raised transition in the alerts table");
    let (labels, samples) = raised;
    assert_eq!(labels["patient_id"], "p-7");
    assert_eq!(labels["care_unit"], "icu-a");
    assert_eq!(labels["bed"], "b1");
    assert_eq!(labels["priority"], "high");
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].1, 1.0);
    let offset = dir.join("alerts").join("p0.questdb-offset");
    assert!(
        wait_for(Duration::from_secs(10), || offset.exists().then_some(())).is_some(),
        "the shipped offset of the alert log is recorded"
    );
    server.stop();
    let log_len = std::fs::metadata(dir.join("alerts").join("p0.jsonl"))
        .unwrap()
        .len();
    assert_eq!(
        std::fs::read_to_string(&offset).unwrap().trim(),
        log_len.to_string()
    );
    server.restart();
    std::thread::sleep(Duration::from_secs(2));
    let all: usize = vm
        .export("alerts_seq")
        .iter()
        .filter(|(l, _)| l["rule"] == "etco2-high")
        .map(|(_, s)| s.len())
        .sum();
    assert_eq!(all, 1, "one transition, once");
    server.stop();
}
