//! Devices as Mosquitto's own command-line client sees the server.

mod common;

use std::time::Duration;

use common::*;

const TOPIC: &str = "wardflow/v1/devices/mon-1/readings";

#[test]
fn senml_with_qos_0_and_1_comes_back_from_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let secret = add_device(&dir, "mon-1", "p-1");
    let server = Server::start(&dir, &[]);
    let port = server.mqtt_port;
    // A minute ago, in whole seconds.
    let bt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 60;

    let pack = format!(
        r#"[{{"bn":"urn:dev:mon-1:","bt":{bt},"n":"hr","u":"beat/min","v":72,"seq":1}},{{"n":"temp","u":"[degF]","v":98.6,"t":1,"seq":2}}]"#
    );
    let pub1 = mosquitto_pub(
        port,
        &[
            "-i", "mon-1", "-u", "mon-1", "-P", &secret, "-q", "1", "-t", TOPIC, "-m", &pack,
        ],
    );
    assert!(
        pub1.status.success(),
        "{}",
        String::from_utf8_lossy(&pub1.stderr)
    );
    // QoS 0, several messages on one connection (-l reads lines from stdin).
    let mut child = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-i",
            "mon-1",
            "-u",
            "mon-1",
            "-P",
            &secret,
        ])
        .args(["-q", "0", "-t", TOPIC, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for i in 0..5 {
            writeln!(
                stdin,
                r#"[{{"bt":{bt},"t":{},"n":"spo2","v":{},"seq":{}}}]"#,
                10 + i,
                95 + i,
                10 + i
            )
            .unwrap();
        }
    }
    assert!(child.wait().unwrap().success());

    let rows = wait_for(Duration::from_secs(20), || {
        Some(query(&dir, "p-1")).filter(|r| r.len() == 7)
    })
    .unwrap_or_else(|| panic!("7 readings stored, got {:?}", query(&dir, "p-1")));
    let hr = rows.iter().find(|r| r["metric"] == "hr").unwrap();
    assert_eq!(hr["value"], 72.0);
    assert_eq!(hr["unit"], "/min");
    assert_eq!(hr["time_ns"], bt * 1_000_000_000);
    let temp = rows.iter().find(|r| r["metric"] == "temp").unwrap();
    assert!(
        (temp["value"].as_f64().unwrap() - 37.0).abs() < 1e-9,
        "{temp}"
    );
    assert_eq!(temp["unit"], "Cel");
    assert_eq!(temp["quality"], 128, "converted from degF");
    let spo2: Vec<f64> = rows
        .iter()
        .filter(|r| r["metric"] == "spo2")
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    assert_eq!(spo2, [95.0, 96.0, 97.0, 98.0, 99.0]);

    let m = server.metrics();
    assert_eq!(
        metric(&m, "wardflow_mqtt_publishes_total{qos=\"1\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "wardflow_mqtt_publishes_total{qos=\"0\"}"),
        Some(5.0)
    );
    assert_eq!(metric(&m, "wardflow_readings_accepted_total"), Some(7.0));
}

#[test]
fn wrong_secret_and_unknown_device_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    add_device(&dir, "mon-1", "p-1");
    let server = Server::start(&dir, &[]);
    for version in ["mqttv311", "mqttv5"] {
        for (id, secret) in [
            ("mon-1", "not-the-secret-at-all"),
            ("ghost-7", "whatever-secret-123"),
        ] {
            let out = mosquitto_pub(
                server.mqtt_port,
                &[
                    "-V", version, "-i", id, "-u", id, "-P", secret, "-q", "1", "-t", TOPIC, "-m",
                    "[]",
                ],
            );
            assert!(!out.status.success(), "{version} {id} must be refused");
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(
                err.contains("bad user name or password"),
                "{version} {id}: {err}"
            );
        }
    }
    let m = server.metrics();
    assert_eq!(
        metric(
            &m,
            "wardflow_mqtt_connects_total{result=\"bad_credentials\"}"
        ),
        Some(4.0)
    );
    assert!(query(&dir, "p-1").is_empty());
}

#[test]
fn devices_can_be_added_and_removed_while_the_server_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, &[]);
    let secret = add_device(&dir, "late-1", "p-9");
    let topic = "wardflow/v1/devices/late-1/readings";
    let publish = |v: u32| {
        mosquitto_pub(
            server.mqtt_port,
            &[
                "-i",
                "late-1",
                "-u",
                "late-1",
                "-P",
                &secret,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                &format!(r#"[{{"n":"rr","v":{v}}}]"#),
            ],
        )
    };
    let accepted = wait_for(Duration::from_secs(10), || {
        publish(14).status.success().then_some(())
    });
    assert!(
        accepted.is_some(),
        "a device added while serving can connect"
    );
    assert!(
        wait_for(Duration::from_secs(20), || Some(()).filter(|_| query(
            &dir, "p-9"
        )
        .len()
            == 1))
        .is_some()
    );

    let listed = wardflow_ok(&dir, &["devices", "list", "--format", "csv"]);
    assert!(
        listed.starts_with("device,patient,added\nlate-1,p-9,"),
        "{listed}"
    );
    wardflow_ok(&dir, &["devices", "remove", "late-1"]);
    let refused = wait_for(Duration::from_secs(10), || {
        (!publish(15).status.success()).then_some(())
    });
    assert!(refused.is_some(), "a removed device is refused");
    let out = wardflow(&dir, &["devices", "remove", "late-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device late-1 is not registered"));
}

#[test]
fn health_and_metrics_endpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(&dir, &[]);
    let (status, body) = http_get(server.http_port, "/healthz").unwrap();
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["write_ahead_log"], "ok");
    let m = server.metrics();
    for name in [
        "wardflow_mqtt_connections",
        "wardflow_readings_accepted_total",
        "wardflow_wal_fsync_seconds_count",
        "wardflow_dataflow_lag_ms",
        "wardflow_memory_budget_bytes",
    ] {
        assert!(metric(&m, name).is_some(), "{name} missing from:\n{m}");
    }
    assert_eq!(http_get(server.http_port, "/nope").unwrap().0, 404);
}
