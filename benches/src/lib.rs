//! Wardflow's benchmarks. This crate owns the criterion micro-benchmarks
//! (`benches/`, each beside a baseline in the same run) and the end-to-end
//! harness (`src/bin/e2e.rs`) that drives the same simulator traffic through
//! Mosquitto to one subscriber and through Wardflow into storage, and prints
//! both rates and their ratio. It is a measuring tool: nothing in the engine
//! depends on it.
//!
//! The pieces here are the harness's own: a counting MQTT subscriber, process
//! and port helpers, and reading `/proc` for peak memory.
//!
//! ```no_run
//! // cargo run --release -p wardflow-benches --bin e2e -- --duration 10 --repeat 3
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

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

/// A plain HTTP GET of a local endpoint's body.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A counter in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .context("subscriber connect")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(256 << 10, r);
    // CONNECT, clean session, keep-alive 600 s.
    let mut var = Vec::new();
    put_str(&mut var, b"MQTT");
    var.extend_from_slice(&[4, 0x02]);
    var.extend_from_slice(&600u16.to_be_bytes());
    put_str(&mut var, b"bench-subscriber");
    let mut p = vec![0x10];
    remaining_length(&mut p, var.len());
    p.extend_from_slice(&var);
    // SUBSCRIBE, packet id 1.
    let mut sub = vec![0, 1];
    put_str(&mut sub, filter.as_bytes());
    sub.push(qos);
    p.push(0x82);
    remaining_length(&mut p, sub.len());
    p.extend_from_slice(&sub);
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
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let b = r.read_u8().await?;
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
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
}
