//! The command line as an operator meets it: configuration, the simulator's
//! report, query and dead-letter output, the demo.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn config_errors_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("wardflow.toml");
    std::fs::write(
        &file,
        "[mqtt]\nlisten = \"127.0.0.1:1\"\n\n[storage]\nflush_interval_ms = \"fast\"\n",
    )
    .unwrap();
    let out = wardflow(tmp.path(), &["--config", file.to_str().unwrap(), "config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wardflow.toml:5:") && err.contains("invalid type"),
        "{err}"
    );

    std::fs::write(&file, "[storage]\nflush_interval_ms = 250\n").unwrap();
    let shown = wardflow_ok(
        tmp.path(),
        &[
            "--config",
            file.to_str().unwrap(),
            "config",
            "--workers",
            "3",
        ],
    );
    assert!(shown.contains("flush_interval_ms = 250"), "{shown}");
    assert!(
        shown.contains("workers = 3"),
        "flags override the file:\n{shown}"
    );
    assert!(
        shown.contains("listen = \"127.0.0.1:1883\""),
        "defaults fill the rest:\n{shown}"
    );

    let out = wardflow(tmp.path(), &["config", "--process", "2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("dataflow.process is 2 but must be below dataflow.processes (1)")
    );
}

#[test]
fn serve_help_documents_every_key() {
    let help = wardflow_ok(std::path::Path::new("."), &["serve", "--help"]);
    let config = wardflow_ok(std::path::Path::new("."), &["config"]);
    let mut keys = Vec::new();
    let mut section = String::new();
    for line in config.lines() {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, _)) = line.split_once(" = ") {
            keys.push(if section.is_empty() {
                k.to_string()
            } else {
                format!("{section}.{k}")
            });
        }
    }
    assert!(keys.len() >= 15, "{keys:?}");
    for key in keys.iter().filter(|k| *k != "data_dir") {
        assert!(
            help.contains(&format!("[{key}")),
            "serve --help does not mention {key}:\n{help}"
        );
    }
}

#[test]
fn simulate_reports_json_and_query_prints_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, &[]);
    for (qos, payload) in [("1", "senml"), ("0", "binary")] {
        let out = simulate_small(
            &dir,
            server.mqtt_port,
            2,
            &["--payload", payload, "--batch", "7", "--qos", qos, "--json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        for field in ["sent", "acked", "errors", "readings_per_s"] {
            assert!(r[field].is_number(), "{field} in {r}");
        }
        assert_eq!(r["errors"], 0);
        assert!(r["sent"].as_u64().unwrap() >= 3 * 35, "{r}");
        if qos == "1" {
            assert_eq!(r["acked"], r["sent"]);
            for p in ["p50", "p99", "p999"] {
                assert!(r["ack_latency_ms"][p].as_f64().unwrap() > 0.0, "{r}");
            }
        } else {
            assert_eq!(r["acked"], 0);
            assert!(r["ack_latency_ms"].is_null());
        }
        let progress = String::from_utf8_lossy(&out.stderr);
        assert!(
            progress.contains("simulate:") && progress.contains("readings/s"),
            "{progress}"
        );
    }

    let rows = wait_for(std::time::Duration::from_secs(20), || {
        Some(query(&dir, "sim-patient-0001")).filter(|r| r.len() >= 70)
    })
    .expect("readings from both runs");
    assert!(rows.iter().all(|r| r["device"] == "sim-0001"));
    let table = wardflow_ok(
        &dir,
        &[
            "query",
            "--patient",
            "sim-patient-0001",
            "--metric",
            "hr",
            "--limit",
            "3",
        ],
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("time") && lines[1].contains(" hr ") && lines[1].contains("/min"),
        "{table}"
    );
    let csv = wardflow_ok(
        &dir,
        &[
            "query",
            "--patient",
            "sim-patient-0001",
            "--from",
            "-1h",
            "--to",
            "now",
            "--format",
            "csv",
        ],
    );
    assert!(csv.starts_with("time,patient,device,metric,value,unit,seq,quality\n"));
    assert_eq!(csv.lines().count(), rows.len() + 1);
    let none = wardflow_ok(
        &dir,
        &[
            "query",
            "--patient",
            "sim-patient-0001",
            "--to",
            "-1h",
            "--format",
            "json",
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&none).unwrap(),
        serde_json::json!([])
    );

    let bad = wardflow(&dir, &["query", "--patient", "x", "--from", "last tuesday"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--from: cannot read \"last tuesday\" as a time")
    );
    let bad = wardflow(&dir, &["query", "--patient", "x", "--metric", "glucose"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--metric: unknown metric \"glucose\""));
    let bad = wardflow(&dir, &["deadletters", "list", "--reason", "gremlins"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--reason: unknown reason \"gremlins\""));
}

/// Devices that pipeline a full window of QoS 1 publishes as fast as the
/// server takes them: every publish is acknowledged and every reading stored.
/// (Publishes cut at the end of a read used to wait for the rest of their
/// payload forever, stalling the connection until its keep-alive ran out.)
#[test]
fn pipelined_qos1_publishes_are_all_acknowledged_and_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, &[]);
    let target = format!("mqtt://127.0.0.1:{}", server.mqtt_port);
    let out = wardflow(
        &dir,
        &[
            "simulate",
            "--target",
            &target,
            "--devices",
            "10",
            "--rate",
            "0",
            "--duration",
            "4s",
            "--payload",
            "binary",
            "--batch",
            "50",
            "--qos",
            "1",
            "--window",
            "32",
            "--register",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["acked"], r["sent"], "{r}");
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 10 * 50 * 100, "{r}");
    let stored = wait_for(std::time::Duration::from_secs(30), || {
        metric(&server.metrics(), "wardflow_readings_stored_total").filter(|&n| n as u64 >= sent)
    });
    assert_eq!(stored.map(|n| n as u64), Some(sent), "{}", server.metrics());
}

#[test]
fn simulate_without_credentials_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = wardflow(tmp.path(), &["simulate", "--devices", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --register"));
}

#[test]
fn demo_runs_and_stops_by_itself() {
    let out = std::process::Command::new(BIN)
        .args(["demo", "--duration", "4s", "--patients", "10"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status_lines = stdout
        .lines()
        .filter(|l| l.contains("accepted") && l.contains("stored") && l.contains("dead letters"))
        .count();
    assert!(status_lines >= 3, "one status line a second:\n{stdout}");
    // The console's address and accounts (tests/browser signs in with them).
    for expected in [
        "the web console: http://127.0.0.1:",
        "clinician demo-rn-a (icu-a), secret ",
        "clinician demo-rn-b (icu-b), secret ",
        "administrator demo-admin, secret ",
        "their keys are in ",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("accepted "))
        .expect("a summary line");
    let numbers: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect();
    assert!(
        numbers[0] > 0 && numbers[0] == numbers[1],
        "everything accepted is stored: {summary}"
    );
}
