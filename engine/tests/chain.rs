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

struct Chain {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Chain {
    fn start(tmp: &Path) -> Chain {
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
        Chain { child, port, log }
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
            "[ledger]\nurl = \"{}\"\naccount_file = \"{}\"\nanchor_interval_ms = 500\nfinality_timeout_s = 5\n",
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

    // The chain stops mid-stream: ingest goes on at the same pace, and
    // batches queue.
    chain.signal("-STOP");
    let during = simulate(&dir, &server, 3);
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
    server.restart();
    simulate(&dir, &server, 1);
    chain.signal("-CONT");
    wait_anchored(&server, &chain);
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
