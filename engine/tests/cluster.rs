//! Timely's multi-process mode: two `wardflow serve` processes on loopback
//! form one dataflow; readings published to either are exchanged by patient
//! and all end up stored.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Registers `n` devices named like the simulator's and writes its credentials file.
fn register(dir: &std::path::Path, prefix: &str, n: usize, creds: &std::path::Path) -> Vec<String> {
    let mut file = Vec::new();
    let mut patients = Vec::new();
    for i in 0..n {
        let (device, patient) = (format!("{prefix}{i:04}"), format!("{prefix}patient-{i:04}"));
        let secret = add_device(dir, &device, &patient);
        file.push(serde_json::json!({"device": device, "patient": patient, "secret": secret}));
        patients.push(patient);
    }
    std::fs::write(creds, serde_json::to_vec(&file).unwrap()).unwrap();
    patients
}

#[test]
fn two_processes_store_every_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (creds_a, creds_b) = (tmp.path().join("a.json"), tmp.path().join("b.json"));
    let mut patients = register(&dir, "a-", 6, &creds_a);
    patients.extend(register(&dir, "b-", 6, &creds_b));

    let (mut p0, mut p1) = start_cluster(tmp.path(), &dir);

    let simulate = |port: u16, prefix: &str, creds: &std::path::Path| {
        Command::new(BIN)
            .args(["--data-dir", dir.to_str().unwrap(), "simulate"])
            .args([
                "--target",
                &format!("mqtt://127.0.0.1:{port}"),
                "--devices",
                "6",
                "--prefix",
                prefix,
            ])
            .args([
                "--credentials",
                creds.to_str().unwrap(),
                "--rate",
                "70",
                "--duration",
                "3s",
            ])
            .args([
                "--payload",
                "binary",
                "--batch",
                "7",
                "--qos",
                "1",
                "--json",
            ])
            .output()
            .expect("run wardflow simulate")
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| simulate(p0.mqtt_port, "a-", &creds_a));
        let b = s.spawn(|| simulate(p1.mqtt_port, "b-", &creds_b));
        (a.join().unwrap(), b.join().unwrap())
    });
    let report = |out: &std::process::Output| -> Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (ra, rb) = (report(&a), report(&b));
    for r in [&ra, &rb] {
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["acked"], r["sent"], "{r}");
        // How many the simulator sends in 3 s depends on the machine's load;
        // what matters is that every one was acknowledged, and stored (below).
        assert!(r["acked"].as_u64().unwrap() > 0, "{r}");
    }

    // Both processes stop together: the dataflow spans them.
    p0.interrupt();
    p1.interrupt();
    p0.wait_exit();
    p1.wait_exit();

    let stored: BTreeMap<String, usize> = patients
        .iter()
        .map(|p| (p.clone(), query(&dir, p).len()))
        .collect();
    let total: usize = stored.values().sum();
    assert_eq!(
        total as u64,
        ra["acked"].as_u64().unwrap() + rb["acked"].as_u64().unwrap(),
        "every acknowledged reading stored once: {stored:?}"
    );
    // The exchange by patient crossed processes: both wrote readings files.
    let mut writers = std::collections::BTreeSet::new();
    for entry in files_under(&dir.join("readings")) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        if let Some(p) = name
            .split('-')
            .find(|part| part.starts_with('p') && part[1..].parse::<u32>().is_ok())
        {
            writers.insert(p.to_string());
        }
    }
    assert_eq!(writers.into_iter().collect::<Vec<_>>(), ["p0", "p1"]);

    // Each process sealed what it stored, under the one node key they share.
    let out = wardflow(&dir, &["verify", "-q"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in 0..2 {
        assert!(text.contains(&format!("process {p}: ")), "{text}");
    }
    assert!(!text.contains("not sealed"), "{text}");
}

/// An alert decided on one process reaches a clinician connected to the
/// other: transitions are relayed to every process's feeds, and each is
/// logged once, by the process that owns its subject.
#[test]
fn alerts_reach_clinicians_on_every_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // Unbound devices raise a technical alert in the `unassigned` unit.
    let devices: Vec<(String, String)> = (0..8)
        .map(|i| {
            let d = format!("loose-{i}");
            let out = wardflow_ok(&dir, &["devices", "add", &d]);
            let secret = out
                .lines()
                .find_map(|l| l.strip_prefix("secret: "))
                .unwrap()
                .to_string();
            (d, secret)
        })
        .collect();
    let out = wardflow_ok(&dir, &["clinicians", "add", "ops", "--units", "unassigned"]);
    let ops = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    let (mut p0, mut p1) = start_cluster(tmp.path(), &dir);

    // The clinician follows the feed on process 0 only.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &p0.mqtt_port.to_string(),
            "-u",
            "ops",
            "-P",
            &ops,
        ])
        .args([
            "-i",
            "ops-sub",
            "-t",
            "wardflow/v1/alerts/unassigned/#",
            "-C",
            "8",
            "-W",
            "30",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (i, (d, secret)) in devices.iter().enumerate() {
        let port = if i % 2 == 0 {
            p0.mqtt_port
        } else {
            p1.mqtt_port
        };
        let payload = format!(r#"[{{"n":"hr","u":"/min","v":72,"t":{now}}}]"#);
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-i",
                d,
                "-u",
                d,
                "-P",
                secret,
            ])
            .args([
                "-q",
                "1",
                "-t",
                &format!("wardflow/v1/devices/{d}/readings"),
                "-m",
                &payload,
            ])
            .output()
            .expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = sub.wait_with_output().unwrap();
    let alerts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seen: std::collections::BTreeSet<String> = alerts
        .iter()
        .filter(|a| a["rule"] == "device-unbound" && a["event"] == "raised")
        .map(|a| a["device"].as_str().unwrap().to_string())
        .collect();

    // Acknowledged over HTTP on process 0, an alert process 1 decided.
    let remote: Value = std::fs::read_to_string(dir.join("alerts").join("p1.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .expect("process 1 decided an alert");
    let (status, body) = http_post(
        p0.http_port,
        &format!("/v1/alerts/{}/ack", remote["id"].as_str().unwrap()),
        &format!("ops:{ops}"),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let acked: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["by"], "ops");

    p0.interrupt();
    p1.interrupt();
    p0.wait_exit();
    p1.wait_exit();
    // Each alert is logged once, by the process that decided it, and both
    // processes decided some.
    let logged = |p: usize| -> Vec<Value> {
        std::fs::read_to_string(dir.join("alerts").join(format!("p{p}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (l0, l1) = (logged(0), logged(1));
    let devs = |l: &[Value]| {
        l.iter()
            .map(|a| a["device"].to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seen.len(),
        8,
        "every device's alert reached process 0's clinician: saw {seen:?}; p0 logged {:?}, p1 logged {:?}",
        devs(&l0),
        devs(&l1)
    );
    assert!(
        !l0.is_empty() && !l1.is_empty(),
        "p0 {} p1 {}",
        l0.len(),
        l1.len()
    );
    let ids0: std::collections::BTreeSet<&str> =
        l0.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert!(
        l1.iter().all(|a| !ids0.contains(a["id"].as_str().unwrap())),
        "no alert is logged by both processes"
    );
    // Eight raises and the acknowledgement.
    assert_eq!(ids0.len() + l1.len(), 9);
    assert!(
        l1.iter().any(|a| a["state"] == "acknowledged"),
        "process 1 logged the acknowledgement"
    );
}

/// Two `wardflow serve` processes forming one timely cluster on loopback,
/// sharing the data directory `dir`; returns once both are healthy.
fn start_cluster(tmp: &std::path::Path, dir: &std::path::Path) -> (Server, Server) {
    let hostfile = tmp.join("hosts.txt");
    std::fs::write(
        &hostfile,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()),
    )
    .unwrap();
    let h = hostfile.to_str().unwrap();
    let spawn = |p: &str| {
        Server::spawn_on(
            dir,
            free_port(),
            free_port(),
            &["-n", "2", "-p", p, "--hostfile", h, "-w", "1"],
        )
    };
    let (mut p0, mut p1) = (spawn("0"), spawn("1"));
    p0.wait_healthy();
    p1.wait_healthy();
    (p0, p1)
}
