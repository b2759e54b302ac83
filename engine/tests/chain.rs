//! Anchoring on a real Substrate chain: the Penpal runtime under
//! chopsticks (tests/chain/README.md), started here on a free port.
//!
//! The chain outage is the chain's process stopped (SIGSTOP) and resumed
//! (SIGCONT): chopsticks can also restart from its database, but then it
//! reports another genesis hash than its runtime signs against, so every
//! transaction after the restart fails its signature check; a stopped and
//! resumed process keeps one chain.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One chain at a time: chopsticks and an engine under load take both
/// cores, and two such pairs starve each other's finality past the tests'
/// waits.
static ONE_CHAIN: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Chain {
    _turn: std::sync::MutexGuard<'static, ()>,
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Chain {
    fn start(tmp: &Path) -> Chain {
        let turn = ONE_CHAIN.lock().unwrap_or_else(|e| e.into_inner());
        let dir = repo_root().join("tests").join("chain");
        let prepared = Command::new("bash")
            .arg(dir.join("start-chain.sh"))
            .arg("--prepare")
            .output()
            .expect("bash");
        assert!(
            prepared.status.success(),
            "preparing the chain (npm ci, the runtime from crates.io): {}",
            String::from_utf8_lossy(&prepared.stderr)
        );
        let port = free_port();
        let log = tmp.join("chopsticks.log");
        let child = Command::new("node")
            .current_dir(&dir)
            .args([
                "node_modules/.bin/chopsticks",
                "--genesis",
                "penpal-dev-raw.json",
                "--build-block-mode",
                "Instant",
                "--port",
                &port.to_string(),
            ])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("node (chopsticks)");
        let up = wait_for(Duration::from_secs(120), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("RPC listening"))
        });
        assert!(
            up.is_some(),
            "chopsticks did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Chain {
            _turn: turn,
            child,
            port,
            log,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node account's `System.Remarked` events in the chain's finalized
/// blocks, counted by an independent client (@polkadot/api,
/// tests/chain/remarks.mjs): `{"head", "remarks", "distinct"}`.
fn remarks_on_chain(chain: &Chain, account: &str) -> Value {
    let out = Command::new("node")
        .current_dir(repo_root().join("tests").join("chain"))
        .args(["remarks.mjs", &chain.url(), account])
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "remarks.mjs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Publishes `seconds` of three monitors at QoS 1; returns the simulator's
/// JSON report.
fn simulate(dir: &Path, server: &Server, seconds: u32) -> Value {
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
    serde_json::from_slice(&out.stdout).unwrap()
}

fn chain_metric(server: &Server, name: &str) -> f64 {
    metric(&server.metrics(), &format!("wardflow_ledger_chain_{name}")).unwrap_or(-1.0)
}

/// Waits until every sealed batch is anchored on the chain.
fn wait_anchored(server: &Server, chain: &Chain) {
    let done = wait_for(Duration::from_secs(120), || {
        (chain_metric(server, "pending_batches") == 0.0
            && chain_metric(server, "anchored_batches") > 0.0)
            .then_some(())
    });
    assert!(
        done.is_some(),
        "batches left unanchored: {}\n{}\n{}",
        server.metrics(),
        server.log_text(),
        std::fs::read_to_string(&chain.log).unwrap_or_default()
    );
}

#[test]
fn batches_are_anchored_on_chain_in_order_through_an_outage_and_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let chain = Chain::start(tmp.path());
    let dir = tmp.path().join("data");
    // The node's account: a funded development account of the chain.
    let account = tmp.path().join("chain.suri");
    std::fs::write(&account, "//Alice\n").unwrap();
    let config = tmp.path().join("wardflow.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\nurl = \"{}\"\naccount_file = \"{}\"\nanchor_interval_ms = 500\nfinality_timeout_s = 20\n",
            chain.url(),
            account.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let mut server = Server::start(&dir, &["--config", &config]);

    let before = simulate(&dir, &server, 3);
    wait_anchored(&server, &chain);
    let extrinsics = chain_metric(&server, "extrinsics");
    assert!(extrinsics >= 1.0);

    // The chain stops mid-stream, with an anchoring extrinsic sent and
    // not yet finalized (its record is written just before it is sent;
    // chopsticks takes seconds to build a block): ingest goes on at the
    // same pace, and batches queue.
    let in_flight = dir.join("ledger").join("chain-p0.inflight.json");
    let during = std::thread::scope(|s| {
        let sim = s.spawn(|| simulate(&dir, &server, 3));
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !in_flight.exists() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
        chain.signal("-STOP");
        assert!(in_flight.exists(), "no anchoring extrinsic was sent");
        sim.join().unwrap()
    });
    assert_eq!(during["acked"], during["sent"], "{during}");
    let rate = |r: &Value| r["readings_per_s"].as_f64().unwrap();
    assert!(
        rate(&during) >= 0.9 * rate(&before),
        "ingest slowed while the chain was down: {before} vs {during}"
    );
    let queued = wait_for(Duration::from_secs(30), || {
        (chain_metric(&server, "pending_batches") > 0.0).then_some(())
    });
    assert!(queued.is_some(), "{}", server.metrics());

    // Wardflow restarts while the chain is still down: the queue is the
    // anchor log, so nothing is forgotten.
    server.stop();
    assert!(
        in_flight.exists(),
        "the extrinsic in flight was finalized before the chain stopped"
    );
    server.restart();
    simulate(&dir, &server, 1);
    chain.signal("-CONT");
    wait_anchored(&server, &chain);
    // The restarted engine looked for the extrinsic in flight and found
    // it, rather than anchoring its batches again.
    assert!(
        server
            .log_text()
            .contains("found the anchoring extrinsic finalized on the chain"),
        "{}",
        server.log_text()
    );
    server.stop();

    // Every batch is on the chain, in order, and verifies there.
    let out = wardflow(&dir, &["--config", &config, "verify", "-q"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sealed = std::fs::read_to_string(dir.join("ledger").join("anchors-p0.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        text.contains(&format!(
            "{sealed} of {sealed} batches verified on the chain"
        )),
        "{text}"
    );
    let receipts: Vec<Value> = std::fs::read_to_string(dir.join("ledger").join("chain-p0.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut next = 0;
    let mut block = 0;
    for r in &receipts {
        assert_eq!(r["first_batch"].as_u64().unwrap(), next, "{receipts:?}");
        next = r["last_batch"].as_u64().unwrap() + 1;
        let b = r["block_number"].as_u64().unwrap();
        assert!(
            b > block,
            "one anchoring extrinsic per block, in order: {receipts:?}"
        );
        block = b;
    }
    assert_eq!(next as usize, sealed);
    // Nothing was anchored twice: the chain holds one remark per batch,
    // however often the anchorer lost sight of its extrinsic.
    let on_chain = remarks_on_chain(&chain, receipts[0]["account"].as_str().unwrap());
    assert_eq!(on_chain["remarks"], sealed, "{on_chain} {receipts:?}");
    assert_eq!(on_chain["distinct"], sealed, "{on_chain}");
    assert!(
        receipts.iter().any(|r| r["first_batch"] != r["last_batch"]),
        "catching up packs several batches into one extrinsic: {receipts:?}"
    );

    // A batch whose remark is not where its receipt says is reported.
    let path = dir.join("ledger").join("chain-p0.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[0]["extrinsic_index"] = Value::from(lines[0]["extrinsic_index"].as_u64().unwrap() + 1);
    let forged: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, forged.join("\n") + "\n").unwrap();
    let out = wardflow(&dir, &["--config", &config, "verify", "-q"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("NOT ON CHAIN"), "{text}");
}

/// A clinician's MQTT subscription that waits for one message (`-C 1`) for
/// up to `seconds`; returns "topic payload" lines.
fn subscribe(port: u16, who: &str, secret: &str, topic: &str, seconds: u32) -> Child {
    let child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-i", who, "-u", who, "-P", secret, "-q", "1", "-v"])
        .args(["-t", topic, "-C", "1", "-W", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    // Connected and subscribed before anything is published.
    std::thread::sleep(Duration::from_millis(700));
    child
}

/// Reads a Server-Sent Events stream on a thread for up to `seconds`, or
/// until an `alert` event arrives; returns what it read (headers too).
fn sse(port: u16, path: &str, bearer: &str, seconds: u64) -> std::thread::JoinHandle<String> {
    use std::io::{Read as _, Write as _};
    let (path, bearer) = (path.to_string(), bearer.to_string());
    let reader = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {bearer}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(seconds);
        let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
        while std::time::Instant::now() < end {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if String::from_utf8_lossy(&got).contains("event: alert") {
                break;
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    std::thread::sleep(Duration::from_millis(700));
    reader
}

fn received(child: Child) -> String {
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Publishes EtCO2 readings of patient p-7's monitor that clear the probe
/// rule's condition and raise it again: a new alert transition.
struct Monitor {
    port: u16,
    secret: String,
    second: u64,
}

impl Monitor {
    fn raise(&mut self) {
        for v in [60, 120] {
            self.second += 1;
            let pack = format!(
                r#"[{{"bn":"urn:dev:mon-7:","bt":{},"n":"etco2","u":"mm[Hg]","v":{v}}}]"#,
                self.second
            );
            publish_pack(self.port, "mon-7", &self.secret, &pack);
        }
    }
}

/// p-7's audit trail, as JSON rows.
fn audit_rows(dir: &Path, config: &str) -> Vec<Value> {
    let out = wardflow_ok(
        dir,
        &[
            "--config",
            config,
            "audit",
            "--patient",
            "p-7",
            "--format",
            "json",
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// A key file holding `suri`.
fn key_file(tmp: &Path, name: &str, suri: &str) -> String {
    let p = tmp.join(format!("{name}.key"));
    std::fs::write(&p, format!("{suri}\n")).unwrap();
    p.to_str().unwrap().to_string()
}

/// p-7 in icu-a with monitor mon-7 and the EtCO2 probe rule; the patient's
/// account (`//Bob`, a funded development account standing in for a
/// wallet) registered; a configuration anchoring on `chain` as `//Alice`.
struct Ward {
    dir: PathBuf,
    config: String,
    rules: String,
    secret: String,
    patient_key: String,
}

fn consent_ward(tmp: &Path, chain: &Chain) -> Ward {
    let dir = tmp.join("data");
    let rules = etco2_probe_rules(tmp);
    let secret = admit_p7(&dir);
    let (node, patient_key) = (
        key_file(tmp, "node", "//Alice"),
        key_file(tmp, "patient", "//Bob"),
    );
    wardflow_ok(
        &dir,
        &[
            "consent",
            "register",
            "--patient",
            "p-7",
            "--key",
            &patient_key,
        ],
    );
    let config = tmp.join("wardflow.toml");
    // Few anchoring blocks: the chain's clock moves one slot per block.
    std::fs::write(
        &config,
        format!(
            "[ledger]\nurl = \"{}\"\naccount_file = \"{node}\"\nanchor_interval_ms = 20000\nfinality_timeout_s = 20\n",
            chain.url()
        ),
    )
    .unwrap();
    Ward {
        dir,
        config: config.to_str().unwrap().to_string(),
        rules: rules.to_str().unwrap().to_string(),
        secret,
        patient_key,
    }
}

#[test]
fn consent_on_chain_opens_and_closes_a_patients_alerts_to_another_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let chain = Chain::start(tmp.path());
    let Ward {
        dir,
        config,
        rules,
        secret,
        patient_key: patient,
    } = consent_ward(tmp.path(), &chain);
    let (dr_bob, stranger) = (
        key_file(tmp.path(), "bob", "//Charlie"),
        key_file(tmp.path(), "stranger", "//Eve"),
    );
    let (ann, bob, cat) = (
        add_clinician(&dir, "ann", "icu-a"),
        add_clinician(&dir, "bob", "icu-b"),
        add_clinician(&dir, "cat", "icu-c"),
    );
    wardflow_ok(
        &dir,
        &[
            "consent",
            "register",
            "--clinician",
            "bob",
            "--key",
            &dr_bob,
        ],
    );
    let server = Server::start(&dir, &["--config", &config, "--rules", &rules]);
    let consent = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str(), "consent"];
        all.extend_from_slice(args);
        wardflow_ok(&dir, &all)
    };
    let listed = |grant: &str, state: &str| {
        let found = wait_for(Duration::from_secs(30), || {
            let list = consent(&["list", "--patient", "p-7"]);
            list.lines()
                .any(|l| l.starts_with(grant) && l.contains(state))
                .then_some(())
        });
        assert!(
            found.is_some(),
            "grant {grant} not {state}:\n{}\n{}",
            consent(&["list"]),
            server.log_text()
        );
    };
    let logged = |what: &str| {
        let found = wait_for(Duration::from_secs(30), || {
            server.log_text().contains(what).then_some(())
        });
        assert!(found.is_some(), "not logged: {what}\n{}", server.log_text());
    };
    let grant_of = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("grant "))
            .unwrap_or_else(|| panic!("no grant id in {out}"))
            .to_string()
    };
    let mut monitor = Monitor {
        port: server.mqtt_port,
        secret,
        second: wardflow_ledger_bridge::now_ms() / 1000,
    };
    let topic = "wardflow/v1/patients/p-7/alerts/#";
    let unit_topic = "wardflow/v1/alerts/icu-a/#";

    // Signed by someone other than the patient: on the chain, but ignored
    // and logged.
    consent(&[
        "grant",
        "--key",
        &stranger,
        "--patient",
        "p-7",
        "--to",
        "bob",
    ]);
    logged("not the account registered for patient p-7");

    // The patient's grant: bob, of another unit, gets p-7's alerts.
    let g = grant_of(&consent(&[
        "grant",
        "--key",
        &patient,
        "--patient",
        "p-7",
        "--to",
        "bob",
        "--scope",
        "alerts,vitals",
        "--may-delegate",
    ]));
    listed(&g, "in force");
    let sub = subscribe(server.mqtt_port, "bob", &bob, topic, 20);
    monitor.raise();
    let got = received(sub);
    assert!(
        got.starts_with("wardflow/v1/patients/p-7/alerts/") && got.contains("\"patient\":\"p-7\""),
        "bob got no alert under the grant: {got:?}\n{}",
        server.log_text()
    );
    // And over HTTP, as Server-Sent Events.
    let bob_token = format!("bob:{bob}");
    let stream = sse(
        server.http_port,
        "/v1/alerts/stream?patient=p-7",
        &bob_token,
        20,
    );
    monitor.raise();
    let got = stream.join().unwrap();
    assert!(
        got.contains("event: alert") && got.contains("\"patient\":\"p-7\""),
        "{got}"
    );

    // bob delegates to cat beyond his own grant: refused and logged.
    consent(&[
        "delegate",
        "--key",
        &dr_bob,
        "--parent",
        &g,
        "--patient",
        "p-7",
        "--to",
        "cat",
        "--scope",
        "all",
    ]);
    logged("delegation beyond the delegator's grant");
    // Within it: cat too.
    let d = grant_of(&consent(&[
        "delegate",
        "--key",
        &dr_bob,
        "--parent",
        &g,
        "--patient",
        "p-7",
        "--to",
        "cat",
        "--scope",
        "alerts",
        "--minutes",
        "30",
    ]));
    listed(&d, "in force");
    let sub = subscribe(server.mqtt_port, "cat", &cat, topic, 20);
    monitor.raise();
    assert!(
        received(sub).contains("\"patient\":\"p-7\""),
        "cat got no alert under the delegation"
    );

    // The patient revokes: from the next finalized block, neither bob nor
    // cat gets the next alert; ann, of the admitting unit, does.
    consent(&[
        "revoke",
        "--key",
        &patient,
        "--patient",
        "p-7",
        "--grant",
        &g,
    ]);
    listed(&g, "revoked at block");
    let bob_stream = sse(
        server.http_port,
        "/v1/alerts/stream?patient=p-7",
        &bob_token,
        6,
    );
    let (b, c, a) = (
        subscribe(server.mqtt_port, "bob", &bob, topic, 6),
        subscribe(server.mqtt_port, "cat", &cat, topic, 6),
        subscribe(server.mqtt_port, "ann", &ann, unit_topic, 20),
    );
    monitor.raise();
    assert!(received(a).contains("\"patient\":\"p-7\""));
    let got = bob_stream.join().unwrap();
    assert!(
        got.starts_with("HTTP/1.1 200") && !got.contains("event: alert"),
        "{got}"
    );
    assert_eq!(
        received(b),
        "",
        "bob still gets alerts after the revocation"
    );
    assert_eq!(received(c), "", "cat's delegation outlived its grant");

    // A grant that expires: honoured until its end, not after.
    let until_ms = wardflow_ledger_bridge::now_ms() + 25_000;
    let until = jiff::Timestamp::from_millisecond(until_ms as i64)
        .unwrap()
        .to_string();
    let e = grant_of(&consent(&[
        "grant",
        "--key",
        &patient,
        "--patient",
        "p-7",
        "--to",
        "cat",
        "--until",
        &until,
    ]));
    listed(&e, "in force");
    let sub = subscribe(server.mqtt_port, "cat", &cat, topic, 20);
    monitor.raise();
    assert!(received(sub).contains("\"patient\":\"p-7\""));
    let wait = until_ms.saturating_sub(wardflow_ledger_bridge::now_ms()) + 500;
    std::thread::sleep(Duration::from_millis(wait));
    let (c, a) = (
        subscribe(server.mqtt_port, "cat", &cat, topic, 6),
        subscribe(server.mqtt_port, "ann", &ann, unit_topic, 20),
    );
    monitor.raise();
    assert!(received(a).contains("\"patient\":\"p-7\""));
    assert_eq!(received(c), "", "an expired grant was honoured");

    // Both refusals are counted.
    let metrics = server.metrics();
    assert_eq!(
        metric(&metrics, "wardflow_consent_refused"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wardflow_consent_records"),
        Some(6.0),
        "{metrics}"
    );

    // The audit trail: each delivery with the consent version it used,
    // and each consent record with its decision.
    let mut server = server;
    server.stop();
    let rows = audit_rows(&dir, &config);
    let has = |action: &str, detail: &str| {
        rows.iter()
            .any(|r| r["action"] == action && r["detail"].as_str().unwrap_or("").contains(detail))
    };
    assert!(
        has("alert-delivery", &format!("under consent {g}@")),
        "{rows:?}"
    );
    assert!(has("consent-grant", &g), "{rows:?}");
    assert!(
        has("consent-refused", "not the account registered"),
        "{rows:?}"
    );
    assert!(
        has("consent-refused", "beyond the delegator's grant"),
        "{rows:?}"
    );
    assert!(has("consent-revoke", &g), "{rows:?}");
}

#[test]
fn break_glass_opens_at_once_is_on_chain_tells_the_patient_and_closes_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let chain = Chain::start(tmp.path());
    let Ward {
        dir,
        config,
        rules,
        secret,
        patient_key: patient,
    } = consent_ward(tmp.path(), &chain);
    let stranger = key_file(tmp.path(), "eve", "//Eve");
    let ann = add_clinician(&dir, "ann", "icu-a");
    let dan = add_clinician(&dir, "dan", "ed");
    let mut server = Server::start(&dir, &["--config", &config, "--rules", &rules]);
    let mut monitor = Monitor {
        port: server.mqtt_port,
        secret,
        second: wardflow_ledger_bridge::now_ms() / 1000,
    };
    let topic = "wardflow/v1/patients/p-7/alerts/#";
    let token = |key: &str| {
        wardflow_ok(
            &dir,
            &["consent", "token", "--key", key, "--patient", "p-7"],
        )
        .trim()
        .to_string()
    };
    // Someone else's key does not sign the patient in.
    let refused = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "p7-phone",
            "-u",
            "patient:p-7",
            "-P",
            &token(&stranger),
        ])
        .args([
            "-t",
            "wardflow/v1/patients/p-7/notifications",
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    // The patient's phone waits for two notifications: opened and ended.
    let phone = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &server.mqtt_port.to_string()])
        .args([
            "-i",
            "p7-phone",
            "-u",
            "patient:p-7",
            "-P",
            &token(&patient),
            "-q",
            "1",
            "-v",
        ])
        .args([
            "-t",
            "wardflow/v1/patients/p-7/notifications",
            "-C",
            "2",
            "-W",
            "120",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Without consent, dan of the emergency department gets nothing.
    let sub = subscribe(server.mqtt_port, "dan", &dan, topic, 5);
    monitor.raise();
    assert_eq!(received(sub), "");

    let out = wardflow_ok(
        &dir,
        &[
            "--config",
            &config,
            "emergency",
            "open",
            "--patient",
            "p-7",
            "--clinician",
            "dan",
            "--reason",
            "unconscious on arrival, no consent possible",
            "--minutes",
            "1",
        ],
    );
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert!(out.contains("on the chain: block #"), "{out}");
    let opened = std::time::Instant::now();
    // At once: the next transition reaches dan.
    std::thread::sleep(Duration::from_millis(600));
    let sub = subscribe(server.mqtt_port, "dan", &dan, topic, 20);
    monitor.raise();
    let got = received(sub);
    assert!(
        got.contains("\"patient\":\"p-7\""),
        "{got:?}\n{}",
        server.log_text()
    );
    let list = wardflow_ok(&dir, &["--config", &config, "emergency", "list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("\topen\tblock #"), "{list}");

    // It closes by itself.
    let left = Duration::from_secs(61).saturating_sub(opened.elapsed());
    std::thread::sleep(left);
    let (d, a) = (
        subscribe(server.mqtt_port, "dan", &dan, topic, 6),
        subscribe(
            server.mqtt_port,
            "ann",
            &ann,
            "wardflow/v1/alerts/icu-a/#",
            20,
        ),
    );
    monitor.raise();
    assert!(received(a).contains("\"patient\":\"p-7\""));
    assert_eq!(received(d), "", "the emergency access outlived its time");
    let list = wardflow_ok(&dir, &["--config", &config, "emergency", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains("\tclosed\t")),
        "{list}"
    );
    let phone = String::from_utf8(phone.wait_with_output().unwrap().stdout).unwrap();
    assert!(
        phone.contains("\"kind\":\"emergency-access-opened\"")
            && phone.contains("\"kind\":\"emergency-access-ended\"")
            && phone.contains("unconscious on arrival"),
        "{phone}"
    );

    // The audit trail has the opening, with its reason, and each delivery
    // under it.
    server.stop();
    let rows = audit_rows(&dir, &config);
    assert!(
        rows.iter().any(|r| r["action"] == "emergency-open"
            && r["actor"] == "clinician:dan"
            && r["detail"]
                .as_str()
                .unwrap()
                .contains("unconscious on arrival")
            && r["proof"].as_str().unwrap().starts_with("proven in batch")),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["action"] == "alert-delivery"
            && r["purpose"] == "emergency"
            && r["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("under consent emergency:{id}"))),
        "{rows:?}"
    );
}
