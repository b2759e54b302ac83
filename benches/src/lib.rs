//! Wardflow's benchmarks. This crate owns the criterion micro-benchmarks
//! (`benches/`, each beside a baseline in the same run) and the end-to-end
//! harness (`src/bin/e2e.rs`) that drives the same simulator traffic through
//! Mosquitto to one subscriber and through Wardflow into storage, and prints
//! both rates and their ratio. It is a measuring tool: nothing in the engine
//! depends on it.
//!
//! The alert latency harness (`src/bin/alert_latency.rs`) measures the time
//! from a device's publish to the alert's arrival at a clinician's MQTT
//! subscription, with and without simulator load.
//!
//! The pieces here are the harnesses' own: a counting MQTT subscriber, a
//! subscriber that hands each message to a callback (with credentials),
//! process and port helpers, reading `/proc` for memory, and Prometheus text
//! (counters and histograms).
//!
//! ```no_run
//! // cargo run --release -p wardflow-benches --bin e2e -- --duration 10 --repeat 3
//! // cargo run --release -p wardflow-benches --bin alert_latency -- --duration 60
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use wardflow_simulator::mqtt::{read_packet, read_packet_body};

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port}")
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Current resident memory of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A plain HTTP GET of a local endpoint's body.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_status(port, path).map(|(_, body)| body)
}

/// A plain HTTP GET of a local endpoint: status code and body.
pub fn http_get_status(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// A counter in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The cumulative buckets of a Prometheus histogram (`NAME_bucket{le="X"}`
/// lines, without labels other than `le`): upper bound and count, in order.
pub fn histogram_buckets(body: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, u64)> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let le = labels
                .split(',')
                .find_map(|kv| kv.trim().strip_prefix("le="))?
                .trim_matches('"');
            let le = match le {
                "+Inf" | "Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            Some((le, value.trim().parse::<f64>().ok()? as u64))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket that holds quantile `q` of the
/// observations made between two snapshots of one histogram, and how many
/// observations that was. `None` when nothing was observed in between.
pub fn histogram_quantile(
    before: &[(f64, u64)],
    after: &[(f64, u64)],
    q: f64,
) -> Option<(f64, u64)> {
    let count_at = |snapshot: &[(f64, u64)], le: f64| {
        snapshot
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0, |(_, c)| *c)
    };
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, c)| (le, c.saturating_sub(count_at(before, le))))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    delta
        .iter()
        .find(|(_, c)| *c >= rank)
        .map(|&(le, _)| (le, total))
}

/// What a counting subscriber saw.
#[derive(Default)]
pub struct Received {
    pub messages: AtomicU64,
    pub readings: AtomicU64,
    /// Nanoseconds after `start` of the first and the latest message.
    pub first_ns: AtomicU64,
    pub last_ns: AtomicU64,
}

/// Readings in a payload: a Wardflow frame says; a SenML pack has one
/// JSON object per record.
pub fn readings_in(payload: &[u8]) -> u64 {
    match wardflow_ingest::codec::frame::header(payload) {
        Ok(h) => h.count as u64,
        Err(_) => payload.iter().filter(|&&b| b == b'{').count() as u64,
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// CONNECT (clean session; with a user name and password if `login` has
/// them) and SUBSCRIBE (`filter` at `qos`, packet id 1), MQTT 3.1.1.
fn connect_and_subscribe(
    client_id: &str,
    login: Option<&Login>,
    keep_alive_s: u16,
    filter: &str,
    qos: u8,
) -> (Vec<u8>, Vec<u8>) {
    let mut var = Vec::new();
    put_str(&mut var, b"MQTT");
    var.extend_from_slice(&[4, if login.is_some() { 0xc2 } else { 0x02 }]);
    var.extend_from_slice(&keep_alive_s.to_be_bytes());
    put_str(&mut var, client_id.as_bytes());
    if let Some(l) = login {
        put_str(&mut var, l.username.as_bytes());
        put_str(&mut var, l.password.as_bytes());
    }
    let mut connect = vec![0x10];
    remaining_length(&mut connect, var.len());
    connect.extend_from_slice(&var);
    let mut sub = vec![0, 1];
    put_str(&mut sub, filter.as_bytes());
    sub.push(qos);
    let mut subscribe = vec![0x82];
    remaining_length(&mut subscribe, sub.len());
    subscribe.extend_from_slice(&sub);
    (connect, subscribe)
}

/// A subscriber's TCP connection to the local server on `port`: a
/// buffered reader of `buffer` bytes and the writer.
async fn connect_subscriber(
    port: u16,
    buffer: usize,
) -> anyhow::Result<(
    tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("subscriber connect")?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    Ok((tokio::io::BufReader::with_capacity(buffer, r), w))
}

/// Subscribes to `filter` on an MQTT 3.1.1 broker with `qos` and counts what
/// arrives until `stop` is set, acknowledging QoS 1 deliveries.
pub async fn subscribe_and_count(
    port: u16,
    filter: &str,
    qos: u8,
    received: Arc<Received>,
    start: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = connect_subscriber(port, 256 << 10).await?;
    // Anonymous, keep-alive 600 s; SUBSCRIBE right behind CONNECT.
    let (mut p, subscribe) = connect_and_subscribe("bench-subscriber", None, 600, filter, qos);
    p.extend_from_slice(&subscribe);
    w.write_all(&p).await?;
    let mut body = Vec::new();
    let mut acks = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let first = match tokio::time::timeout(Duration::from_millis(200), r.read_u8()).await {
            Err(_) => {
                if !acks.is_empty() {
                    w.write_all(&acks).await?;
                    acks.clear();
                }
                continue;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(b) => b?,
        };
        read_packet_body(&mut r, &mut body).await?;
        if first >> 4 == 3 {
            let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + topic_len;
            if (first >> 1) & 0x3 == 1 {
                acks.extend_from_slice(&[0x40, 0x02, body[at], body[at + 1]]);
                at += 2;
            }
            let n = readings_in(&body[at..]);
            let now = start.elapsed().as_nanos() as u64;
            if received.messages.fetch_add(1, Ordering::Relaxed) == 0 {
                received.first_ns.store(now, Ordering::Relaxed);
            }
            received.readings.fetch_add(n, Ordering::Relaxed);
            received.last_ns.store(now, Ordering::Relaxed);
            if (acks.len() >= 4 * 256 || r.buffer().is_empty()) && !acks.is_empty() {
                w.write_all(&acks).await?;
                acks.clear();
            }
        }
    }
}

/// The `wardflow` binary the benchmarks run by default: the one built
/// beside them (`cargo build --release`).
pub fn default_wardflow() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("wardflow")))
        .unwrap_or_else(|| "wardflow".into())
}

/// Fails clearly when the `wardflow` binary to run is missing.
pub fn require_wardflow(path: &std::path::Path) -> anyhow::Result<()> {
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --release` first or pass --wardflow",
            path.display()
        );
    }
    Ok(())
}

/// Who an MQTT connection authenticates as.
#[derive(Clone, Debug)]
pub struct Login {
    pub client_id: String,
    pub username: String,
    pub password: String,
}

/// Subscribes to `filter` with `qos` on an MQTT 3.1.1 server, logged in as
/// `login` (clean session), and hands every message's topic and payload to
/// `on_message` as it arrives, until `stop` is set or the server closes the
/// connection. QoS 1 deliveries are acknowledged; a PINGREQ goes out every
/// 20 s (keep-alive 60 s). `ready` is set once the SUBACK granted the
/// subscription; a refused login or subscription is an error.
pub async fn subscribe_payloads(
    port: u16,
    login: &Login,
    filter: &str,
    qos: u8,
    stop: Arc<std::sync::atomic::AtomicBool>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    mut on_message: impl FnMut(&str, &[u8]),
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = connect_subscriber(port, 64 << 10).await?;
    // Keep-alive 60 s; SUBSCRIBE once the CONNACK accepted the login.
    let (connect, subscribe) =
        connect_and_subscribe(&login.client_id, Some(login), 60, filter, qos);
    w.write_all(&connect).await?;
    let mut body = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut r, &mut body))
        .await
        .context("no CONNACK within 10 s")??;
    if first != 0x20 || body.len() != 2 {
        bail!("expected CONNACK, got packet type {}", first >> 4);
    }
    if body[1] != 0 {
        bail!(
            "CONNACK refused {} with return code {}",
            login.username,
            body[1]
        );
    }
    w.write_all(&subscribe).await?;
    let mut last_write = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            let _ = w.write_all(&[0xe0, 0x00]).await;
            return Ok(());
        }
        if last_write.elapsed() > Duration::from_secs(20) {
            w.write_all(&[0xc0, 0x00]).await?;
            last_write = Instant::now();
        }
        // Only the first byte is awaited with a timeout: a read cancelled
        // inside a packet would lose its bytes.
        let first = match tokio::time::timeout(Duration::from_millis(200), r.read_u8()).await {
            Err(_) => continue,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                bail!("the server closed the subscription to {filter}");
            }
            Ok(b) => b?,
        };
        read_packet_body(&mut r, &mut body).await?;
        match first >> 4 {
            3 => {
                if body.len() < 2 {
                    bail!("short PUBLISH");
                }
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2 + topic_len;
                if (first >> 1) & 0x3 == 1 {
                    w.write_all(&[0x40, 0x02, body[at], body[at + 1]]).await?;
                    last_write = Instant::now();
                    at += 2;
                }
                let topic = String::from_utf8_lossy(&body[2..2 + topic_len]);
                on_message(&topic, &body[at..]);
            }
            9 => {
                if body.get(2).is_none_or(|&code| code >= 0x80) {
                    bail!("SUBACK refused {filter} for {}", login.username);
                }
                ready.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_readings_in_both_formats() {
        let mut frame = Vec::new();
        let rec =
            wardflow_ingest::codec::frame::Record::new(wardflow_model::Metric::Hr, 0, 60.0, 0);
        wardflow_ingest::codec::frame::encode(0, 0, &[rec; 7], &mut frame);
        assert_eq!(readings_in(&frame), 7);
        assert_eq!(readings_in(br#"[{"n":"hr","v":1},{"n":"rr","v":2}]"#), 2);
        assert_eq!(metric("a_total 3\na 4\n", "a"), Some(4.0));
    }

    #[test]
    fn histogram_quantiles_come_from_bucket_deltas() {
        let text = |counts: [u64; 3]| {
            format!(
                "# TYPE h histogram\nh_sum 1.0\nh_count {}\nh_bucket{{le=\"0.001\"}} {}\nh_bucket{{le=\"0.01\"}} {}\nh_bucket{{le=\"+Inf\"}} {}\n",
                counts[2], counts[0], counts[1], counts[2]
            )
        };
        let before = histogram_buckets(&text([10, 10, 10]), "h");
        assert_eq!(before.len(), 3);
        assert_eq!(before[2], (f64::INFINITY, 10));
        let after = histogram_buckets(&text([100, 109, 110]), "h");
        assert_eq!(histogram_quantile(&before, &after, 0.5), Some((0.001, 100)));
        assert_eq!(histogram_quantile(&before, &after, 0.99), Some((0.01, 100)));
        assert_eq!(
            histogram_quantile(&before, &after, 1.0),
            Some((f64::INFINITY, 100))
        );
        assert_eq!(histogram_quantile(&after, &after, 0.5), None);
    }
}
