//! A minimal MQTT 3.1.1 publisher for load generation, on tokio.
//!
//! Why not a general client: a load generator must not distort what it
//! measures. ntex-mqtt's client reports its sink ready while QoS 0
//! publishes pile up in its write buffer (no write backpressure without
//! traffic from the server: about 1 GB buffered in 10 s here), so "sent"
//! would count bytes never put on the wire. This publisher writes with
//! `write_all` on the socket, so TCP backpressure slows it exactly as it
//! slows a device, and it batches writes so that the generator spends its
//! CPU on payloads, not syscalls.
//!
//! It speaks just what a device needs (MQTT 3.1.1, OASIS standard): CONNECT
//! / CONNACK (§3.1, §3.2), PUBLISH QoS 0 and 1 (§3.3) with PUBACK (§3.4),
//! PINGREQ (§3.12) and DISCONNECT (§3.14).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("CONNACK refused with return code {0}")]
    Refused(u8),
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

fn put_remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Encodes a PUBLISH packet (packet id only for QoS 1).
pub fn encode_publish(out: &mut Vec<u8>, topic: &[u8], packet_id: Option<u16>, payload: &[u8]) {
    let qos1 = packet_id.is_some();
    out.push(if qos1 { 0x32 } else { 0x30 });
    put_remaining_length(
        out,
        2 + topic.len() + if qos1 { 2 } else { 0 } + payload.len(),
    );
    put_str(out, topic);
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Reads one MQTT packet: its first byte, and its body into `body`.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> Result<u8, MqttError> {
    let first = r.read_u8().await?;
    read_packet_body(r, body).await?;
    Ok(first)
}

/// Reads the rest of an MQTT packet whose first byte has been read: the
/// remaining length, then the body into `body`.
pub async fn read_packet_body<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), MqttError> {
    let mut len = 0usize;
    for shift in (0..28).step_by(7) {
        let b = r.read_u8().await?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            body.resize(len, 0);
            r.read_exact(body).await?;
            return Ok(());
        }
    }
    Err(MqttError::Protocol("remaining length longer than 4 bytes"))
}

/// A connected device.
pub struct Connection {
    pub reader: OwnedReadHalf,
    pub writer: BufWriter<OwnedWriteHalf>,
}

/// Connects and authenticates (clean session, keep-alive 60 s).
pub async fn connect(
    addr: &str,
    client_id: &str,
    password: &[u8],
) -> Result<Connection, MqttError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| MqttError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    stream.set_nodelay(true)?;
    let (mut reader, writer) = stream.into_split();
    let mut writer = BufWriter::with_capacity(64 << 10, writer);
    let mut var = Vec::new();
    put_str(&mut var, b"MQTT");
    var.push(4); // protocol level 3.1.1
    var.push(0xc2); // user name, password, clean session
    var.extend_from_slice(&60u16.to_be_bytes());
    put_str(&mut var, client_id.as_bytes());
    put_str(&mut var, client_id.as_bytes());
    put_str(&mut var, password);
    let mut packet = vec![0x10];
    put_remaining_length(&mut packet, var.len());
    packet.extend_from_slice(&var);
    writer.write_all(&packet).await?;
    writer.flush().await?;
    let mut body = Vec::new();
    let first = read_packet(&mut reader, &mut body).await?;
    if first != 0x20 || body.len() != 2 {
        return Err(MqttError::Protocol("expected CONNACK"));
    }
    if body[1] != 0 {
        return Err(MqttError::Refused(body[1]));
    }
    Ok(Connection { reader, writer })
}

/// QoS 1 bookkeeping shared by the writer and the PUBACK reader.
pub struct Inflight {
    sent_at: Vec<Option<Instant>>,
    next_id: u16,
    pub in_flight: usize,
    pub acked: u64,
    /// PUBACK latencies in microseconds, drained by the caller.
    pub latencies_us: Vec<u64>,
}

impl Inflight {
    pub fn new() -> Rc<RefCell<Inflight>> {
        Rc::new(RefCell::new(Inflight {
            sent_at: vec![None; 65536],
            next_id: 0,
            in_flight: 0,
            acked: 0,
            latencies_us: Vec::new(),
        }))
    }

    /// A free packet id, marked as sent now.
    pub fn take_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if self.sent_at[self.next_id as usize].is_none() {
                self.sent_at[self.next_id as usize] = Some(Instant::now());
                self.in_flight += 1;
                return self.next_id;
            }
        }
    }
}

/// Reads PUBACKs (and ignores PINGRESP) until the connection closes.
pub async fn read_acks(
    mut reader: OwnedReadHalf,
    inflight: Rc<RefCell<Inflight>>,
    acked: &tokio::sync::Notify,
) -> Result<(), MqttError> {
    let mut body = Vec::with_capacity(16);
    loop {
        let first = match read_packet(&mut reader, &mut body).await {
            Ok(f) => f,
            Err(MqttError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if first == 0x40 && body.len() == 2 {
            let id = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut f = inflight.borrow_mut();
            if let Some(t) = f.sent_at[id].take() {
                f.in_flight -= 1;
                f.acked += 1;
                let us = t.elapsed().as_micros().max(1) as u64;
                f.latencies_us.push(us);
                acked.notify_one();
            }
        }
    }
}

/// Sends PINGREQ when the connection has been quiet for half the keep-alive.
pub async fn ping_if_idle(
    writer: &mut BufWriter<OwnedWriteHalf>,
    last_write: &mut Instant,
) -> Result<(), MqttError> {
    if last_write.elapsed() > Duration::from_secs(30) {
        writer.write_all(&[0xc0, 0x00]).await?;
        writer.flush().await?;
        *last_write = Instant::now();
    }
    Ok(())
}

/// Sends DISCONNECT. The caller then waits for the server to close the
/// connection: a client that closes first may take QoS 0 publishes the
/// server has received but not yet handled down with it.
pub async fn disconnect(writer: &mut BufWriter<OwnedWriteHalf>) -> Result<(), MqttError> {
    writer.write_all(&[0xe0, 0x00]).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_packets_are_encoded_as_the_standard_says() {
        let mut out = Vec::new();
        encode_publish(&mut out, b"a/b", None, b"hi");
        assert_eq!(out, [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
        out.clear();
        encode_publish(&mut out, b"t", Some(0x0102), &[0u8; 200]);
        assert_eq!(&out[..7], &[0x32, 0xcd, 0x01, 0, 1, b't', 0x01]); // 205 = 0x4d | 0x80, 0x01
        assert_eq!(out.len(), 1 + 2 + 3 + 2 + 200);
    }

    #[test]
    fn remaining_lengths_follow_the_variable_byte_encoding() {
        for (n, bytes) in [
            (0, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, n);
            assert_eq!(out, bytes, "{n}");
        }
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_flight() {
        let f = Inflight::new();
        let mut f = f.borrow_mut();
        let first = f.take_id();
        assert_eq!(first, 1);
        f.next_id = u16::MAX - 1;
        assert_eq!(f.take_id(), u16::MAX);
        assert_eq!(f.take_id(), 2, "wraps past 0 and the id still in flight");
    }
}
