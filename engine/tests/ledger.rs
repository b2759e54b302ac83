//! The audit trail end to end: readings published over MQTT are sealed
//! into anchored batches, `wardflow verify` checks them against the store,
//! names an altered reading, and notices deleted rows and batches.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Publishes `seconds` of three simulated monitors over MQTT (QoS 1).
/// Runs the simulator against `server` at QoS 1; returns the readings the
/// server acknowledged.
fn simulate(dir: &Path, server: &Server, seconds: u32) -> u64 {
    let out = simulate_small(
        dir,
        server.mqtt_port,
        seconds,
        &["--payload", "senml", "--batch", "7", "--qos", "1", "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["acked"].as_u64().expect("acked in the report")
}

/// `wardflow verify ARGS`: (success, stdout).
fn verify(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = wardflow(dir, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}{stderr}"))
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect()
}

/// Changes one reading's value in place with pyarrow, as someone with
/// access to the files would; returns the row's device and new value.
fn alter_one_value(file: &Path) -> String {
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
path = sys.argv[1]
t = pq.read_table(path)
values = t.column("value").to_pylist()
values[0] = values[0] + 40.0
i = t.schema.get_field_index("value")
t = t.set_column(i, t.schema.field(i), pa.array(values, pa.float64()))
pq.write_table(t, path)
print(t.column("device_id")[0].as_py(), values[0])
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(file)
        .output()
        .expect("python3 with pyarrow (pip install pyarrow)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn verify_names_an_altered_reading_and_detects_deleted_rows_and_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start(&dir, &["--anchor-interval", "500"]);
    simulate(&dir, &server, 3);
    server.stop();

    let (ok, out) = verify(&dir, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("signatures and chain verify"), "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
    assert!(
        !out.contains("not sealed") && !out.contains("predate"),
        "a clean stop seals every stored row:\n{out}"
    );
    let batches = out.lines().filter(|l| l.ends_with(": verified")).count();
    assert!(batches >= 4, "3 s at 500 ms per batch:\n{out}");

    // A patient's readings, each with its inclusion proof.
    let (ok, out) = verify(&dir, &["--patient", "sim-patient-0001", "-q"]);
    assert!(ok, "{out}");
    let proven: u64 = out
        .lines()
        .find_map(|l| {
            l.split(": ")
                .nth(1)?
                .strip_suffix(" of sim-patient-0001's readings proven included in anchored batches")
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a proof count:\n{out}"));
    let stored = query(&dir, "sim-patient-0001").len() as u64;
    assert_eq!(
        proven, stored,
        "every stored reading of the patient is proven"
    );

    // One value changed in place: the batch fails and the reading is named.
    let files = parquet_files(&dir.join("readings"));
    let (device, value) = alter_one_value(&files[0])
        .split_once(' ')
        .map(|(d, v)| (d.to_string(), v.to_string()))
        .unwrap();
    let (ok, out) = verify(&dir, &[]);
    assert!(!ok, "an altered value must fail verification:\n{out}");
    assert!(out.contains("DOES NOT VERIFY"), "{out}");
    let named = out
        .lines()
        .find(|l| l.trim_start().starts_with("reading in readings/"))
        .unwrap_or_else(|| panic!("the altered reading is named:\n{out}"));
    assert!(
        named.contains(&format!("device_id={device}")) && named.contains(&format!("value={value}")),
        "{named}"
    );
    assert!(
        out.contains("1 problem(s)"),
        "only the altered batch:\n{out}"
    );

    // Rows deleted: a whole file of the store.
    std::fs::remove_file(&files[files.len() - 1]).unwrap();
    let (ok, out) = verify(&dir, &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("no longer in the store"), "{out}");

    // A whole batch deleted from the anchor log breaks the chain.
    let log = dir.join("ledger").join("anchors-p0.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    let (ok, out) = verify(&dir, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("does not verify") && out.contains("batch 2 is missing"),
        "{out}"
    );
}

/// How many leaves the server read back from the store on start.
fn read_back(server: &Server) -> u64 {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("leaves read back from the store"))
        .filter_map(|l| {
            l.split("leaves=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn a_crash_loses_no_leaf_and_seals_none_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // Rows are stored and checkpointed every 100 ms but sealed once a
    // minute, so a crash leaves stored rows unsealed.
    let args = ["--anchor-interval", "60000", "--flush-interval-ms", "100"];
    let mut server = Server::start(&dir, &args);
    let first = simulate(&dir, &server, 2);
    // An access recorded by the engine (an event, not a stored row) and
    // not sealed when the engine dies: re-added after the restart.
    let patient = "sim-patient-0001";
    wardflow_ok(
        &dir,
        &[
            "query",
            "--patient",
            patient,
            "--as",
            "clinician:ann",
            "--purpose",
            "treatment",
        ],
    );
    // (The helpers' own reads are accesses too: only ann's is looked at.)
    let audit = || -> Vec<serde_json::Value> {
        let out = wardflow_ok(&dir, &["audit", "--patient", patient, "--format", "json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.into_iter()
            .filter(|r| r["actor"] == "clinician:ann")
            .collect()
    };
    let recorded = wait_for(std::time::Duration::from_secs(30), || {
        let rows = audit();
        (rows.len() == 1 && rows[0]["proof"] == "recorded, not sealed yet").then_some(())
    });
    assert!(recorded.is_some(), "{:?}", audit());
    std::thread::sleep(std::time::Duration::from_millis(500));
    server.kill9();
    server.restart();
    assert!(
        read_back(&server) > 0,
        "the stored, unsealed rows are read back:\n{}",
        server.log_text()
    );
    let second = simulate(&dir, &server, 2);
    server.kill9();
    server.restart();
    server.stop();

    let (ok, out) = verify(&dir, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
    assert!(
        !out.contains("not sealed") && !out.contains("predate"),
        "every stored row is sealed:\n{out}"
    );
    // The access was sealed once (before the reads below add their own).
    let rows = audit();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0]["proof"]
            .as_str()
            .unwrap()
            .starts_with("proven in batch"),
        "{rows:?}"
    );
    // Every stored row is in exactly one batch.
    let sealed: u64 = std::fs::read_to_string(dir.join("ledger").join("anchors-p0.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["leaves"]
                .as_u64()
                .unwrap()
        })
        .sum();
    let stored: u64 = (0..3)
        .map(|i| query(&dir, &format!("sim-patient-{i:04}")).len() as u64)
        .sum::<u64>()
        + dead_letters(&dir).len() as u64;
    // Both runs were stored: every reading acknowledged (a crash may also
    // keep some not acknowledged yet).
    assert!(first > 0 && second > 0, "{first} and {second} acknowledged");
    assert!(
        stored >= first + second,
        "both runs were stored: {stored} rows, {first} + {second} acknowledged"
    );
    // The rows and the one access.
    assert_eq!(sealed, stored + 1);
}

#[test]
fn alert_transitions_are_sealed_and_an_altered_alert_log_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // An unbound device raises a technical alert.
    let secret = secret_in(&wardflow_ok(&dir, &["devices", "add", "loose-1"]));
    let mut server = Server::start(&dir, &["--anchor-interval", "500"]);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pack = format!(r#"[{{"bn":"urn:dev:loose-1:","bt":{now_s},"n":"hr","u":"/min","v":70}}]"#);
    publish_pack(server.mqtt_port, "loose-1", &secret, &pack);
    let alert_log = dir.join("alerts").join("p0.jsonl");
    let logged = wait_for(std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&alert_log)
            .ok()
            .filter(|t| !t.is_empty())
    });
    assert!(
        logged.is_some(),
        "no alert was raised:\n{}",
        server.log_text()
    );
    server.stop();

    let (ok, out) = verify(&dir, &["-q"]);
    assert!(ok, "{out}");
    let events = std::fs::read_to_string(dir.join("ledger").join("events-p0.jsonl")).unwrap();
    let lines = std::fs::read_to_string(&alert_log).unwrap().lines().count();
    assert_eq!(
        events.matches("\"kind\":\"alert\"").count(),
        lines,
        "every logged transition is a leaf:\n{events}"
    );

    // One character of the logged transition changed: named.
    let text = std::fs::read_to_string(&alert_log).unwrap();
    let altered = text.replacen("\"loose-1\"", "\"loose-9\"", 1);
    assert_ne!(altered, text, "the alert names its device:\n{text}");
    std::fs::write(&alert_log, altered).unwrap();
    let (ok, out) = verify(&dir, &["-q"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("alert transition in alerts/p0.jsonl at byte 0") && out.contains("loose-9"),
        "{out}"
    );
}

#[test]
fn reads_of_a_patient_are_audited_with_their_proofs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start(&dir, &["--anchor-interval", "500"]);
    simulate(&dir, &server, 2);
    let patient = "sim-patient-0001";
    wardflow_ok(
        &dir,
        &[
            "query",
            "--patient",
            patient,
            "--metric",
            "hr",
            "--as",
            "clinician:ann",
            "--purpose",
            "treatment",
        ],
    );
    let audit = |dir: &Path| -> Vec<serde_json::Value> {
        let out = wardflow_ok(dir, &["audit", "--patient", patient, "--format", "json"]);
        serde_json::from_str(&out).unwrap()
    };
    // Recorded by the running engine, then sealed.
    let recorded = wait_for(std::time::Duration::from_secs(30), || {
        let rows = audit(&dir);
        (rows.len() == 1 && !rows[0]["proof"].as_str().unwrap().starts_with("requested"))
            .then_some(rows)
    });
    assert!(recorded.is_some(), "{:?}", audit(&dir));
    server.stop();
    let rows = audit(&dir);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["actor"], "clinician:ann");
    assert_eq!(rows[0]["action"], "query");
    assert_eq!(rows[0]["purpose"], "treatment");
    assert!(
        rows[0]["detail"].as_str().unwrap().contains("metric=hr"),
        "{rows:?}"
    );
    assert!(
        rows[0]["proof"]
            .as_str()
            .unwrap()
            .starts_with("proven in batch"),
        "{rows:?}"
    );
    // Another patient's log does not show it.
    let out = wardflow_ok(
        &dir,
        &["audit", "--patient", "sim-patient-0002", "--format", "json"],
    );
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .len(),
        0
    );

    // Rewriting who read it breaks the proof, and verify names the access.
    let events = dir.join("ledger").join("events-p0.jsonl");
    let text = std::fs::read_to_string(&events).unwrap();
    std::fs::write(&events, text.replace("clinician:ann", "clinician:bob")).unwrap();
    let rows = audit(&dir);
    assert!(
        rows[0]["proof"]
            .as_str()
            .unwrap()
            .contains("DOES NOT VERIFY"),
        "{rows:?}"
    );
    let (ok, out) = verify(&dir, &["-q"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "access to {patient} by clinician:bob: query for treatment"
        )),
        "{out}"
    );
}

#[test]
fn an_alert_delivered_to_a_clinician_is_an_audited_access() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let rules = etco2_probe_rules(tmp.path());
    let secret = admit_p7(&dir);
    let ann = secret_in(&wardflow_ok(
        &dir,
        &["clinicians", "add", "ann", "--units", "icu-a"],
    ));
    let mut server = Server::start(
        &dir,
        &[
            "--anchor-interval",
            "500",
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let port = server.mqtt_port.to_string();
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "ann",
            "-u",
            "ann",
            "-P",
            &ann,
        ])
        .args([
            "-q",
            "1",
            "-t",
            "wardflow/v1/alerts/icu-a/#",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let pack =
        format!(r#"[{{"bn":"urn:dev:mon-7:","bt":{now_s},"n":"etco2","u":"mm[Hg]","v":120}}]"#);
    publish_pack(server.mqtt_port, "mon-7", &secret, &pack);
    let got = sub.wait().unwrap();
    assert!(
        got.success(),
        "the clinician received no alert:\n{}",
        server.log_text()
    );
    // The clinician also lists the unit's open alerts over HTTP.
    let (status, body) = http_get_as(
        server.http_port,
        "/v1/alerts?unit=icu-a",
        &format!("ann:{ann}"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"patient\":\"p-7\""), "{body}");
    // The condition clears: a second transition in the alert log.
    // A second later (the same time again would be a duplicate).
    let clear = pack
        .replace("\"v\":120", "\"v\":60")
        .replace(&format!("\"bt\":{now_s}"), &format!("\"bt\":{}", now_s + 1));
    publish_pack(server.mqtt_port, "mon-7", &secret, &clear);
    // And returns: a third.
    let again = pack.replace(&format!("\"bt\":{now_s}"), &format!("\"bt\":{}", now_s + 2));
    publish_pack(server.mqtt_port, "mon-7", &secret, &again);
    let alert_log = dir.join("alerts").join("p0.jsonl");
    let three = wait_for(std::time::Duration::from_secs(30), || {
        std::fs::read_to_string(&alert_log)
            .ok()
            .filter(|t| t.lines().count() >= 3)
    });
    assert!(three.is_some(), "{}", server.log_text());
    server.stop();

    let out = wardflow_ok(&dir, &["audit", "--patient", "p-7", "--format", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let deliveries: Vec<_> = rows
        .iter()
        .filter(|r| r["action"] == "alert-delivery")
        .collect();
    // The raise over MQTT (the subscriber left after one message) and the
    // open alert in the HTTP list.
    assert_eq!(deliveries.len(), 2, "{rows:?}");
    let delivery = deliveries[0];
    assert_eq!(delivery["actor"], "clinician:ann");
    assert_eq!(delivery["purpose"], "treatment");
    assert!(
        delivery["proof"]
            .as_str()
            .unwrap()
            .starts_with("proven in batch"),
        "{delivery}"
    );
    let (ok, out) = verify(&dir, &["-q"]);
    assert!(ok, "{out}");

    // A transition written into the alert log afterwards: the sealed lines
    // after it no longer match, and verify names one.
    let text = std::fs::read_to_string(&alert_log).unwrap();
    let first = text.lines().next().unwrap();
    let second_at = first.len() + 1;
    let forged = text.replacen(first, &format!("{first}\n{first}"), 1);
    std::fs::write(&alert_log, &forged).unwrap();
    let (ok, out) = verify(&dir, &["-q"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("alert transition in alerts/p0.jsonl at byte "),
        "{out}"
    );
    // A logged line whose record is gone (as when a crash falls between
    // the alert log and the ledger) is reported as never sealed.
    std::fs::write(&alert_log, &text).unwrap();
    let events = dir.join("ledger").join("events-p0.jsonl");
    let records = std::fs::read_to_string(&events).unwrap();
    let kept: Vec<&str> = records
        .lines()
        .filter(|l| !l.contains(&format!("\"offset\":{second_at},")))
        .collect();
    assert_eq!(kept.len() + 1, records.lines().count(), "{records}");
    std::fs::write(&events, kept.join("\n") + "\n").unwrap();
    let third = wardflow(&dir, &["verify", "-q"]);
    let out = String::from_utf8_lossy(&third.stdout);
    assert!(!third.status.success(), "{out}");
    assert!(out.contains("were never sealed"), "{out}");
}

/// Retention: a reading three hours old and a current one are stored and
/// sealed; with `storage.retention.readings = "1h"` the old hour partition
/// is dropped on schedule, the drop is logged, and `wardflow verify`
/// reports the batch's rows as expired, not as tampered with.
#[test]
fn retention_drops_expired_partitions_and_verify_tells_expiry_from_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let secret = add_device(&dir, "mon-r", "p-r");
    let config = tmp.path().join("wardflow.toml");
    std::fs::write(&config, "[storage.retention]\nreadings = \"1h\"\n").unwrap();
    let config = config.display().to_string();
    let now_s = wardflow_model::now_ns() / 1_000_000_000;
    let old = now_s - 3 * 3600;
    // A server with a long retention stores both readings first.
    let mut server = Server::start(&dir, &[]);
    publish_pack(
        server.mqtt_port,
        "mon-r",
        &secret,
        &format!(r#"[{{"bt":{old},"n":"hr","v":61,"seq":1}}]"#),
    );
    publish_pack(
        server.mqtt_port,
        "mon-r",
        &secret,
        &format!(r#"[{{"bt":{now_s},"n":"hr","v":62,"seq":2}}]"#),
    );
    wait_for(std::time::Duration::from_secs(20), || {
        (query(&dir, "p-r").len() == 2).then_some(())
    })
    .expect("both readings stored");
    server.stop();
    let (ok, out) = verify(&dir, &[]);
    assert!(ok && out.contains("0 problem(s)"), "{out}");

    // Restarted with a one-hour retention: the old partition goes.
    let mut server = Server::start(&dir, &["--config", &config]);
    let dropped = wait_for(std::time::Duration::from_secs(30), || {
        (query(&dir, "p-r").len() == 1).then_some(())
    });
    let metrics = server.metrics();
    server.stop();
    assert!(dropped.is_some(), "the expired partition was never dropped");
    assert_eq!(query(&dir, "p-r")[0]["value"], 62.0);
    assert_eq!(
        metric(&metrics, "wardflow_retention_rows_dropped_total"),
        Some(1.0),
        "{metrics}"
    );
    let log = std::fs::read_to_string(dir.join("retention-p0.jsonl")).unwrap();
    assert!(
        log.contains("\"table\":\"readings\"") && log.contains("\"rows\":1"),
        "{log}"
    );

    let (ok, out) = verify(&dir, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("sealed rows expired (readings"), "{out}");
    assert!(out.contains("0 problem(s)"), "{out}");
}
