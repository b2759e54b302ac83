//! Helpers for tests that drive the real `wardflow` binary.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_wardflow");

/// The repository root (for tests/python).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `wardflow --data-dir DIR ARGS...` to completion.
pub fn wardflow(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run wardflow")
}

/// Like [`wardflow`], but panics with stderr unless it succeeds; returns stdout.
pub fn wardflow_ok(dir: &Path, args: &[&str]) -> String {
    let out = wardflow(dir, args);
    assert!(
        out.status.success(),
        "wardflow {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Registers a device and returns its generated secret.
pub fn add_device(dir: &Path, device: &str, patient: &str) -> String {
    secret_in(&wardflow_ok(
        dir,
        &["devices", "add", device, "--patient", patient],
    ))
}

/// The generated secret `wardflow devices add` or `clinicians add` printed.
pub fn secret_in(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("a generated secret")
        .to_string()
}

/// One SenML pack from `device` (whose MQTT user it is) at QoS 1.
pub fn publish_pack(port: u16, device: &str, secret: &str, pack: &str) {
    let topic = format!("wardflow/v1/devices/{device}/readings");
    let out = mosquitto_pub(
        port,
        &[
            "-i", device, "-u", device, "-P", secret, "-q", "1", "-t", &topic, "-m", pack,
        ],
    );
    assert!(out.status.success(), "{out:?}");
}

pub fn query(dir: &Path, patient: &str) -> Vec<Value> {
    let out = wardflow_ok(dir, &["query", "--patient", patient, "--format", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

pub fn dead_letters(dir: &Path) -> Vec<Value> {
    let out = wardflow_ok(
        dir,
        &[
            "deadletters",
            "list",
            "--limit",
            "100000",
            "--format",
            "json",
        ],
    );
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Every file below `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// `wardflow simulate` of three devices at 35 readings/s each for
/// `seconds` against `mqtt_port`, registering them, with `extra` flags
/// (`--payload`, `--qos`, `--json`, ...).
pub fn simulate_small(dir: &Path, mqtt_port: u16, seconds: u32, extra: &[&str]) -> Output {
    let target = format!("mqtt://127.0.0.1:{mqtt_port}");
    let duration = format!("{seconds}s");
    let mut args = vec![
        "simulate",
        "--target",
        &target,
        "--devices",
        "3",
        "--rate",
        "35",
        "--duration",
        &duration,
        "--register",
    ];
    args.extend_from_slice(extra);
    wardflow(dir, &args)
}

/// Polls `f` until it returns `Some` or the timeout passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, &format!("GET {path} HTTP/1.1\r\n"))
}

/// A plain HTTP/1.1 GET with a bearer token; returns (status, body).
pub fn http_get_as(port: u16, path: &str, bearer: &str) -> Option<(u16, String)> {
    http_request(
        port,
        &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer {bearer}\r\n"),
    )
}

/// A plain HTTP/1.1 POST with a bearer token and an empty body; returns
/// (status, body).
pub fn http_post(port: u16, path: &str, bearer: &str) -> Option<(u16, String)> {
    http_request(
        port,
        &format!("POST {path} HTTP/1.1\r\nAuthorization: Bearer {bearer}\r\nContent-Length: 0\r\n"),
    )
}

/// Sends a request line and headers (each ending in CRLF), then reads the
/// whole answer.
fn http_request(port: u16, head: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "{head}Host: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of a metric line (`name{labels} value`) in a /metrics body.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A running `wardflow serve`.
pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
    pub extra: Vec<String>,
}

impl Server {
    /// Starts a server on free ports and waits until /healthz answers.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Self::start_on(dir, free_port(), free_port(), extra)
    }

    pub fn start_on(dir: &Path, mqtt_port: u16, http_port: u16, extra: &[&str]) -> Server {
        let mut s = Self::spawn_on(dir, mqtt_port, http_port, extra);
        s.wait_healthy();
        s
    }

    /// Starts a server without waiting for it (cluster members wait for each other).
    pub fn spawn_on(dir: &Path, mqtt_port: u16, http_port: u16, extra: &[&str]) -> Server {
        let log = dir.with_extension(format!("{mqtt_port}.log"));
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--log",
                "info,ntex=warn,ntex_server=warn,ntex_rt=warn,ntex_service=warn,ntex_mqtt=warn",
                "serve",
            ])
            .args(["--mqtt", &format!("127.0.0.1:{mqtt_port}")])
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start wardflow serve");
        Server {
            child,
            dir: dir.to_path_buf(),
            mqtt_port,
            http_port,
            log,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn wait_healthy(&mut self) {
        let ok = wait_for(Duration::from_secs(60), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wardflow serve exited with {status}:\n{}", self.log_text());
            }
            http_get(self.http_port, "/healthz").filter(|(s, _)| *s == 200)
        });
        assert!(
            ok.is_some(),
            "server never became healthy:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics").expect("metrics").1
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, without waiting.
    pub fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
    }

    /// SIGINT and wait for a clean exit.
    pub fn stop(&mut self) {
        self.interrupt();
        self.wait_exit();
    }

    /// Waits for the process to exit successfully.
    pub fn wait_exit(&mut self) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "wardflow exited with {status}:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                Instant::now() < end,
                "wardflow did not stop:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        // The old child has been reaped, so dropping it kills nothing.
        *self = Server::start_on(&self.dir, self.mqtt_port, self.http_port, &extra);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mosquitto_pub` with `args`, returning its output.
pub fn mosquitto_pub(port: u16, args: &[&str]) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

/// A rules directory holding one probe rule, EtCO2 above 100 mmHg (high
/// priority, exit below 90), which nothing else in a test raises.
pub fn etco2_probe_rules(tmp: &Path) -> PathBuf {
    let rules = tmp.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("probe.toml"),
        "[[rule]]\nid = \"etco2-high\"\ndescription = \"EtCO2 above 100\"\npriority = \"high\"\nwhen = { metric = \"etco2\", above = 100, exit = 90 }\n",
    )
    .unwrap();
    rules
}

/// Admits patient p-7 to icu-a bed b1 with monitor mon-7; returns the
/// monitor's secret.
pub fn admit_p7(dir: &Path) -> String {
    wardflow_ok(
        dir,
        &["patients", "admit", "p-7", "--unit", "icu-a", "--bed", "b1"],
    );
    add_device(dir, "mon-7", "p-7")
}

/// Adds a clinician covering `unit`; returns the secret.
pub fn add_clinician(dir: &Path, id: &str, unit: &str) -> String {
    secret_in(&wardflow_ok(
        dir,
        &["clinicians", "add", id, "--units", unit],
    ))
}
