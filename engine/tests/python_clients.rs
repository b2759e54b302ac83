//! Runs the Python client tests (tests/python, paho-mqtt and pyarrow)
//! against the `wardflow` binary this build produced.

mod common;

use std::process::Command;

fn run_python(pattern: &str) {
    let root = common::repo_root();
    let out = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-v",
            "-s",
            "tests/python",
            "-p",
            pattern,
        ])
        .current_dir(&root)
        .env("WARDFLOW_BIN", common::BIN)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(out.status.success(), "python tests failed:\n{stderr}");
    assert!(
        !stderr.contains("skipped"),
        "no Python test may be skipped:\n{stderr}"
    );
}

#[test]
fn paho_mqtt_clients() {
    run_python("test_paho.py");
}

#[test]
fn kill_9_loses_no_acknowledged_reading() {
    run_python("test_crash.py");
}

/// NEWS2 against the independent oracle in tests/python/news2_oracle.py,
/// over generated observation sets covering every band edge.
#[test]
fn news2_agrees_with_the_chart_oracle() {
    run_python("test_news2.py");
}

/// Alert feeds with paho-mqtt (3.1.1 and 5.0), mosquitto_sub and HTTP:
/// unit-scoped subscriptions, acknowledgements over MQTT and HTTP seen by
/// every subscriber, Server-Sent Events, a refused rules file, unbound
/// devices, manual observations.
#[test]
fn alert_feeds_with_real_clients() {
    run_python("test_alerts.py");
}

/// Research studies over Arrow Flight with pyarrow.flight while paho
/// clients publish: schema, k, counts within the noise, revocation,
/// replay, status codes, metering.
#[test]
fn research_streams_over_flight() {
    run_python("test_research.py");
}

/// Encryption at rest with a master key, and crypto-shredding: values are
/// in no file of the data directory, sealed runs open with the documented
/// format from Python's `cryptography`, and after `patients erase` no
/// remaining key opens the erased patient's runs.
#[test]
fn encryption_at_rest_and_erasure() {
    run_python("test_encryption.py");
}

/// `wardflow export` after paho-mqtt publishes: the FHIR bundle validates
/// with fhir.resources and carries the published LOINC and UCUM codes,
/// times and values; the CSV and Parquet tables read back with pyarrow;
/// every export is in the patient's access log.
#[test]
fn export_validates_as_fhir_and_reads_back_with_pyarrow() {
    run_python("test_export.py");
}

/// The web console's API with urllib and paho-mqtt: sessions in HTTP-only
/// cookies, what clinicians, administrators and patients may see, the
/// live stream and the end of an access at a revocation, trends, devices,
/// the patient's consent pages and access log, the console's files and
/// the page served when they are missing.
#[test]
fn console_api_with_real_clients() {
    run_python("test_console.py");
}
