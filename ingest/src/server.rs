//! The MQTT server devices connect to (ntex-mqtt; MQTT 3.1.1 and 5.0 on
//! one port, told apart by the CONNECT packet's protocol level).
//!
//! - CONNECT: client id = username = a registered device id, password = its
//!   secret. A second connection of the same device takes over: the older
//!   one is closed (MQTT 3.1.1 §3.1.4, MQTT 5 DISCONNECT 0x8E Session taken
//!   over), as happens when a device reconnects before its old, half-open
//!   connection has timed out. A mismatched client id is refused with v5 0x85 / v3 return
//!   code 2; an unknown device or a wrong secret with v5 0x86 / v3 code 4
//!   ("bad user name or password"; the same answer for both, so the server
//!   does not reveal which devices exist).
//! - PUBLISH: only to `wardflow/v1/devices/{own id}/readings`, QoS 0 or 1.
//!   Another topic is refused with v5 PUBACK 0x87 (Not authorized); MQTT
//!   3.1.1 has no negative PUBACK, so the connection is closed (§3.3.5). A
//!   device removed from the registry is disconnected at its next publish.
//! - QoS 1: the PUBACK is sent only after the payload is in the
//!   write-ahead log and fsynced; a log failure answers v5 0x80.
//! - SUBSCRIBE: devices have nothing to subscribe to; refused per topic
//!   (v5 0x87, v3 0x80).
//! - Backpressure: the publish service is not *ready* while the memory
//!   budget is spent, so ntex-mqtt stops decoding that connection, its read
//!   buffer fills, reading pauses, and TCP slows the device. (Readiness, not
//!   the per-connection in-flight limit: ntex-mqtt 8 lets consecutive
//!   publishes bypass that limit, so a handler that merely waits would let
//!   every publish of a fast device pile up in memory.) While a publish's
//!   payload is still arriving in chunks, the next packet may be the chunk
//!   it waits for, so readiness then draws on a reserve of half the budget
//!   again instead of waiting for the budget itself: memory stays under 1.5
//!   times the budget. (Letting such packets through unchecked, as an
//!   earlier version did, let in-flight memory reach ten times the budget
//!   at full load.) A light sender, a connection holding less than
//!   1/1024 of the budget, draws on the same reserve, so a bedside monitor
//!   is not held up by the heavy senders that spent the budget.
//! - Clinicians connect to the same server with username = their id; see
//!   [`crate::feeds`] for their topics. Subscriptions outside their units
//!   are refused (v5 0x87, v3 0x80), except a patient's alert topic, which
//!   carries only what a consent of the patient lets the clinician see.
//! - Patients connect with username `patient:{id}` and a password the
//!   engine checks (a statement signed with the patient's chain key; see
//!   the engine's consent module); they may subscribe to their own
//!   `wardflow/v1/patients/{id}/notifications` only, and publish nothing.

use std::rc::Rc;
use std::sync::Arc;

use ntex::service::{fn_factory_with_config, fn_service};
use ntex::util::{Bytes, Ready};
use ntex::{Service, ServiceCtx, ServiceFactory, SharedCfg};
use ntex_mqtt::v5::codec::{ConnectAckReason, PublishAckReason, SubscribeAckReason};
use ntex_mqtt::{Control, MqttServer, MqttServiceConfig, QoS, Reason, v3, v5};
use wardflow_model::{DeviceId, now_ns};

use crate::budget::{MemoryBudget, Share};
use crate::census::{CensusWatcher, Clinician};
use crate::feeds::{
    AlertAction, AlertHub, ClinicalCommand, ClinicianTopic, CommandKind, Commands, Subscription,
    notifications_topic, parse_clinician_topic, subscription_patient, subscription_unit,
};
use crate::metrics::IngestMetrics;
use crate::observations::{self, ObservationBody};
use crate::registry::{AuthOutcome, RegistryWatcher};
use crate::wal::{WalHandle, WalRequest};

/// Topic prefix of device readings.
pub const READINGS_PREFIX: &str = "wardflow/v1/devices/";
/// Topic suffix of device readings.
pub const READINGS_SUFFIX: &str = "/readings";

/// The topic a device publishes its readings to.
pub fn readings_topic(device: &str) -> String {
    format!("{READINGS_PREFIX}{device}{READINGS_SUFFIX}")
}

/// Settings of the MQTT listener.
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// Largest accepted packet, in bytes.
    pub max_packet_bytes: u32,
    /// In-flight publishes per connection (v5 Receive Maximum).
    pub max_inflight: u16,
    /// In-flight payload bytes per connection.
    pub max_inflight_bytes: usize,
    /// Seconds a client has to send CONNECT.
    pub connect_timeout_s: u16,
    /// Bytes read from a connection before reading pauses for decoding.
    pub read_buffer_bytes: usize,
}

/// ntex-io's defaults for the read buffer's low watermark and pool size.
const READ_BUFFER_LOW: usize = 512 + 24;
const READ_BUFFER_CACHE: usize = 128;

impl Default for MqttLimits {
    fn default() -> Self {
        Self {
            max_packet_bytes: 1 << 20,
            max_inflight: 64,
            max_inflight_bytes: 4 << 20,
            connect_timeout_s: 10,
            read_buffer_bytes: 256 << 10,
        }
    }
}

/// The ntex service configuration for the MQTT listener.
pub fn mqtt_config(limits: &MqttLimits) -> SharedCfg {
    SharedCfg::new("MQTT")
        // ntex-io pauses reading at the read buffer's high watermark. At its
        // 16 KiB default, devices that pipeline QoS 1 publishes stalled: a
        // publish cut at the end of a read waited for the rest of its payload
        // until the keep-alive ran out (engine/tests/cli.rs,
        // pipelined_qos1_publishes_are_all_acknowledged_and_stored). At
        // 256 KiB no stall was seen, with up to 1 MiB of publishes in flight
        // per connection.
        .add(ntex::io::IoConfig::new().set_read_buf(
            limits.read_buffer_bytes,
            READ_BUFFER_LOW,
            READ_BUFFER_CACHE,
        ))
        .add(
            MqttServiceConfig::new()
                .set_max_qos(QoS::AtLeastOnce)
                // A publish that arrived before the device's DISCONNECT is
                // stored even if it is handled after it (ntex-mqtt drops it
                // otherwise): received means logged.
                .set_handle_qos_after_disconnect(Some(QoS::AtLeastOnce))
                .set_max_size(limits.max_packet_bytes)
                .set_max_receive(limits.max_inflight)
                .set_max_receive_size(limits.max_inflight_bytes)
                .set_connect_timeout(ntex::time::Seconds(limits.connect_timeout_s)),
        )
        .into()
}

/// What the connection handlers share.
pub struct IngestContext {
    pub registry: Arc<RegistryWatcher>,
    pub wal: WalHandle,
    pub budget: Arc<MemoryBudget>,
    pub metrics: Arc<IngestMetrics>,
    pub sessions: Sessions,
    /// Admissions and clinician accounts.
    pub census: Arc<CensusWatcher>,
    /// Alert feeds to clinicians.
    pub hub: Arc<AlertHub>,
    /// Clinicians' commands, into the dataflow.
    pub commands: Commands,
    /// Where manual observations are appended.
    pub data_dir: std::path::PathBuf,
    /// Checks a patient's sign-in (patient id, password); none: patients
    /// cannot connect.
    pub patient_auth: Option<PatientAuth>,
}

/// Decides a patient's sign-in: (patient id, password) to accepted.
pub type PatientAuth = Arc<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

/// A patient's MQTT user name: `patient:{id}`.
pub const PATIENT_USER_PREFIX: &str = "patient:";

/// The live connection of each device, so a newer one can take over.
#[derive(Default)]
pub struct Sessions {
    live: parking_lot::Mutex<std::collections::HashMap<DeviceId, (u64, Arc<tokio::sync::Notify>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Sessions {
    /// Records a new connection of `device`; the previous one, if any, is
    /// told to close.
    fn open(&self, device: &DeviceId) -> (u64, Arc<tokio::sync::Notify>, bool) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        let previous = self.live.lock().insert(device.clone(), (id, close.clone()));
        let took_over = previous.is_some_and(|(_, old)| {
            old.notify_one();
            true
        });
        (id, close, took_over)
    }

    fn closed(&self, device: &DeviceId, id: u64) {
        let mut live = self.live.lock();
        if live.get(device).is_some_and(|(current, _)| *current == id) {
            live.remove(device);
        }
    }
}

/// Errors that end a connection.
#[derive(Debug, Clone)]
pub enum ConnectionError {
    /// The device published where it may not (MQTT 3.1.1 can only close).
    TopicDenied,
    /// The device was removed from the registry.
    DeviceRemoved,
    /// The write-ahead log failed; nothing can be made durable.
    LogFailed,
    /// The payload stream broke.
    Payload,
    /// An error from ntex-mqtt's default services.
    Protocol,
}

impl From<()> for ConnectionError {
    fn from(_: ()) -> Self {
        ConnectionError::Protocol
    }
}

impl TryFrom<ConnectionError> for v5::PublishAck {
    type Error = ConnectionError;
    fn try_from(err: ConnectionError) -> Result<Self, ConnectionError> {
        Err(err)
    }
}

/// A connected device. Dropped with the connection.
pub struct DeviceSession {
    device: DeviceId,
    ctx: Arc<IngestContext>,
    id: u64,
    /// Notified to close this connection (taken over, or closed anyway).
    close: Arc<tokio::sync::Notify>,
}

impl Drop for DeviceSession {
    fn drop(&mut self) {
        self.ctx.metrics.connections.dec();
        self.ctx.sessions.closed(&self.device, self.id);
        // Ends the task watching for a takeover.
        self.close.notify_one();
        tracing::debug!(device = %self.device, "device disconnected");
    }
}

/// A connected clinician. Dropped with the connection.
pub struct ClinicianSession {
    id: String,
    ctx: Arc<IngestContext>,
    /// The hub subscription that feeds this connection.
    subscription: u64,
    /// The highest QoS granted to its subscriptions (0 or 1), shared with
    /// the task that sends its feed.
    qos: Rc<std::cell::Cell<QoS>>,
    close: Arc<tokio::sync::Notify>,
}

impl Drop for ClinicianSession {
    fn drop(&mut self) {
        self.ctx.metrics.clinician_connections.dec();
        self.close.notify_one();
        tracing::debug!(clinician = %self.id, "clinician disconnected");
    }
}

/// Who is on the other end of a connection.
pub enum Peer {
    Device(DeviceSession),
    Clinician(ClinicianSession),
}

enum Admission {
    Device(DeviceSession),
    Clinician(ClinicianSession, Subscription),
    BadClientId,
    BadCredentials,
}

/// Accepts a clinician's CONNECT (username = clinician id).
async fn admit_clinician(ctx: &Arc<IngestContext>, id: &str, password: Option<Bytes>) -> Admission {
    let census = ctx.census.clone();
    let (user, secret) = (id.to_string(), password.unwrap_or_default());
    let found: Option<Clinician> =
        ntex::rt::spawn_blocking(move || census.authenticate(&user, &secret))
            .await
            .unwrap_or(None);
    let result = |r: &'static str| {
        ctx.metrics.connects.get_or_create(&[("result", r)]).inc();
    };
    match found {
        Some(c) => {
            result("clinician");
            ctx.metrics.clinician_connections.inc();
            let sub = ctx.hub.subscribe(Default::default(), &c.id);
            tracing::info!(clinician = %c.id, units = ?c.units, "clinician connected");
            Admission::Clinician(
                ClinicianSession {
                    id: c.id,
                    ctx: ctx.clone(),
                    subscription: sub.id,
                    qos: Rc::new(std::cell::Cell::new(QoS::AtMostOnce)),
                    close: Arc::new(tokio::sync::Notify::new()),
                },
                sub,
            )
        }
        None => {
            result("bad_credentials");
            tracing::info!(clinician = id, "connection refused: wrong clinician secret");
            Admission::BadCredentials
        }
    }
}

async fn admit(
    ctx: &Arc<IngestContext>,
    client_id: &str,
    username: Option<&str>,
    password: Option<Bytes>,
) -> Admission {
    let result = |r: &'static str| {
        ctx.metrics.connects.get_or_create(&[("result", r)]).inc();
    };
    if let Some(user) = username
        && ctx.census.is_clinician(user)
    {
        return admit_clinician(ctx, user, password).await;
    }
    if let Some(patient) = username.and_then(|u| u.strip_prefix(PATIENT_USER_PREFIX))
        && let Some(auth) = ctx.patient_auth.clone()
    {
        let (p, secret) = (patient.to_string(), password.unwrap_or_default());
        let ok = ntex::rt::spawn_blocking(move || auth(&p, &secret))
            .await
            .unwrap_or(false);
        if !ok {
            result("bad_credentials");
            tracing::info!(patient, "connection refused: patient sign-in not valid");
            return Admission::BadCredentials;
        }
        result("patient");
        ctx.metrics.clinician_connections.inc();
        let who = format!("{PATIENT_USER_PREFIX}{patient}");
        let sub = ctx.hub.subscribe(Default::default(), &who);
        tracing::info!(patient, "patient connected");
        return Admission::Clinician(
            ClinicianSession {
                id: who,
                ctx: ctx.clone(),
                subscription: sub.id,
                qos: Rc::new(std::cell::Cell::new(QoS::AtMostOnce)),
                close: Arc::new(tokio::sync::Notify::new()),
            },
            sub,
        );
    }
    let Ok(device) = DeviceId::new(client_id) else {
        result("bad_client_id");
        return Admission::BadClientId;
    };
    if username != Some(client_id) {
        result("bad_credentials");
        return Admission::BadCredentials;
    }
    let secret = password.unwrap_or_default();
    // Key derivation takes milliseconds: keep it off the I/O thread.
    let registry = ctx.registry.clone();
    let id = device.clone();
    let outcome = ntex::rt::spawn_blocking(move || registry.authenticate(id.as_str(), &secret))
        .await
        .unwrap_or(AuthOutcome::BadSecret);
    match outcome {
        AuthOutcome::Accepted { .. } => {
            result("accepted");
            ctx.metrics.connections.inc();
            let (id, close, took_over) = ctx.sessions.open(&device);
            if took_over {
                ctx.metrics.session_takeovers.inc();
                tracing::info!(%device, "device reconnected: closing its previous connection");
            }
            tracing::debug!(%device, "device connected");
            Admission::Device(DeviceSession {
                device,
                ctx: ctx.clone(),
                id,
                close,
            })
        }
        AuthOutcome::UnknownDevice | AuthOutcome::BadSecret => {
            result("bad_credentials");
            tracing::info!(
                client_id,
                "connection refused: unknown device or wrong secret"
            );
            Admission::BadCredentials
        }
    }
}

/// Why a publish was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Topic,
    Removed,
    LogFailed,
    /// A clinician's command that cannot be carried out (unknown alert,
    /// malformed body): logged and counted; v5 answers PUBACK 0x99.
    Invalid,
}

fn is_own_readings_topic(topic: &str, device: &DeviceId) -> bool {
    topic
        .strip_prefix(READINGS_PREFIX)
        .and_then(|rest| rest.strip_suffix(READINGS_SUFFIX))
        == Some(device.as_str())
}

/// The common publish path of both protocol versions.
async fn accept_publish(
    ctx: &IngestContext,
    session: &DeviceSession,
    share: &Arc<Share>,
    topic: &str,
    qos: QoS,
    payload: Bytes,
) -> Result<(), Refusal> {
    let refuse = |r: Refusal, label: &'static str| {
        ctx.metrics
            .publishes_refused
            .get_or_create(&[("reason", label)])
            .inc();
        Err(r)
    };
    if !is_own_readings_topic(topic, &session.device) {
        tracing::info!(device = %session.device, topic, "publish refused: not the device's readings topic");
        return refuse(Refusal::Topic, "topic");
    }
    let Some(patient) = ctx.registry.binding(session.device.as_str()) else {
        tracing::info!(device = %session.device, "publish refused: device no longer registered");
        return refuse(Refusal::Removed, "removed_device");
    };
    let received_ns = now_ns();
    let permit = ctx.budget.charge_to(crate::budget::weight(&payload), share);
    let len = payload.len() as u64;
    let (done, wait) = if qos == QoS::AtLeastOnce {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let req = WalRequest {
        received_ns,
        device: session.device.clone(),
        patient,
        payload,
        permit,
        done,
    };
    if ctx.wal.submit(req).is_err() {
        return refuse(Refusal::LogFailed, "log_failed");
    }
    if let Some(wait) = wait {
        if !matches!(wait.await, Ok(Ok(()))) {
            return refuse(Refusal::LogFailed, "log_failed");
        }
        ctx.metrics
            .publish_durable_seconds
            .observe((now_ns() - received_ns) as f64 * 1e-9);
    }
    ctx.metrics
        .publishes
        .get_or_create(&[("qos", if qos == QoS::AtLeastOnce { "1" } else { "0" })])
        .inc();
    ctx.metrics.publish_bytes.inc_by(len);
    Ok(())
}

/// A clinician's publish: an acknowledgement, a silence, or a manual
/// observation, each only for the units the clinician covers now.
async fn clinician_publish(
    ctx: &IngestContext,
    session: &ClinicianSession,
    topic: &str,
    payload: Bytes,
) -> Result<(), Refusal> {
    let refuse = |r: Refusal, label: &'static str, why: &str| {
        ctx.metrics
            .publishes_refused
            .get_or_create(&[("reason", label)])
            .inc();
        tracing::info!(clinician = %session.id, topic, "clinician publish refused: {why}");
        Err(r)
    };
    let units = ctx.census.units_of(&session.id);
    let covers = |u: &str| units.iter().any(|x| x == u);
    let now = now_ns();
    match parse_clinician_topic(topic) {
        None => refuse(
            Refusal::Topic,
            "topic",
            "not an alert action or observation topic",
        ),
        Some(ClinicianTopic::Alert { unit, .. }) if !covers(unit) => {
            refuse(Refusal::Topic, "topic", "unit not covered")
        }
        Some(ClinicianTopic::Alert {
            unit,
            alert,
            action,
        }) => {
            let Some(item) = ctx.hub.get(alert).filter(|a| a.unit == unit) else {
                return refuse(
                    Refusal::Invalid,
                    "unknown_alert",
                    "no such alert in this unit",
                );
            };
            let action = match action {
                "ack" => AlertAction::Acknowledge,
                _ => match silence_seconds(&payload) {
                    Ok(s) => AlertAction::Silence {
                        for_ns: s * 1_000_000_000,
                    },
                    Err(e) => return refuse(Refusal::Invalid, "bad_command", &e),
                },
            };
            let sent = ctx.commands.send(ClinicalCommand {
                kind: CommandKind::Alert {
                    alert: item.id.clone(),
                    subject: item.subject.clone(),
                    action,
                },
                by: session.id.clone(),
                at_ns: now,
                reply: None,
            });
            if sent {
                Ok(())
            } else {
                refuse(Refusal::LogFailed, "stopping", "the engine is stopping")
            }
        }
        Some(ClinicianTopic::Observation { patient }) => {
            let census = ctx.census.patients.snapshot();
            let Some(adm) = census.get(patient) else {
                return refuse(Refusal::Invalid, "bad_command", "patient not admitted");
            };
            if !covers(&adm.unit) {
                return refuse(Refusal::Topic, "topic", "patient's unit not covered");
            }
            let record = serde_json::from_slice::<ObservationBody>(&payload)
                .map_err(|e| e.to_string())
                .and_then(|b| b.into_record(adm.patient.clone(), &session.id, now));
            let record = match record {
                Ok(r) => r,
                Err(e) => return refuse(Refusal::Invalid, "bad_command", &e),
            };
            let dir = ctx.data_dir.clone();
            let written =
                ntex::rt::spawn_blocking(move || observations::append(&dir, &record)).await;
            match written {
                Ok(Ok(())) => Ok(()),
                _ => refuse(Refusal::LogFailed, "log_failed", "observation not written"),
            }
        }
    }
}

/// A silence request's length in seconds: empty payload = 60, a number, or
/// `{"seconds": N}`.
fn silence_seconds(payload: &[u8]) -> Result<i64, String> {
    #[derive(serde::Deserialize)]
    struct Body {
        seconds: i64,
    }
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
    let t = text.trim();
    if t.is_empty() {
        return Ok(60);
    }
    if let Ok(n) = t.parse::<i64>() {
        return Ok(n);
    }
    serde_json::from_str::<Body>(t)
        .map(|b| b.seconds)
        .map_err(|e| format!("silence payload: {e}"))
}

/// Sends a clinician's feed to its connection until either ends.
async fn run_feed<F, Fut>(mut sub: Subscription, close: Arc<tokio::sync::Notify>, mut send: F)
where
    F: FnMut(Arc<crate::feeds::FeedItem>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        tokio::select! {
            _ = close.notified() => break,
            item = sub.rx.recv() => match item {
                Some(item) => {
                    if !send(item).await {
                        break;
                    }
                }
                None => break,
            }
        }
    }
}

async fn handshake_v3(
    ctx: Arc<IngestContext>,
    hs: v3::Handshake,
) -> Result<v3::HandshakeAck<Peer>, ConnectionError> {
    let pkt = hs.packet();
    let (client_id, username, password) = (
        pkt.client_id.to_string(),
        pkt.username.as_ref().map(|u| u.to_string()),
        pkt.password.clone(),
    );
    Ok(
        match admit(&ctx, &client_id, username.as_deref(), password).await {
            Admission::Device(s) => {
                let (sink, close) = (hs.sink(), s.close.clone());
                ntex::rt::spawn(async move {
                    close.notified().await;
                    sink.close();
                });
                hs.ack(Peer::Device(s), false)
            }
            Admission::Clinician(c, sub) => {
                let (sink, close) = (hs.sink(), c.close.clone());
                let qos = c.qos.clone();
                ntex::rt::spawn({
                    let sink = sink.clone();
                    run_feed(sub, close, move |item| {
                        let sink = sink.clone();
                        let qos = qos.clone();
                        async move {
                            let p = sink.publish(item.topic.clone());
                            let ok = if qos.get() == QoS::AtMostOnce {
                                p.send_at_most_once(item.json.clone()).is_ok()
                            } else {
                                p.send_at_least_once(item.json.clone()).await.is_ok()
                            };
                            if !ok {
                                sink.close();
                            }
                            ok
                        }
                    })
                });
                hs.ack(Peer::Clinician(c), false)
            }
            Admission::BadClientId => hs.identifier_rejected(),
            Admission::BadCredentials => hs.bad_username_or_pwd(),
        },
    )
}

async fn handshake_v5(
    ctx: Arc<IngestContext>,
    hs: v5::Handshake,
) -> Result<v5::HandshakeAck<Peer>, ConnectionError> {
    let pkt = hs.packet();
    let (client_id, username, password) = (
        pkt.client_id.to_string(),
        pkt.username.as_ref().map(|u| u.to_string()),
        pkt.password.clone(),
    );
    Ok(
        match admit(&ctx, &client_id, username.as_deref(), password).await {
            Admission::Device(s) => {
                let (sink, close) = (hs.sink(), s.close.clone());
                ntex::rt::spawn(async move {
                    close.notified().await;
                    if sink.is_open() {
                        sink.close_with_reason(v5::codec::Disconnect::new(
                            v5::codec::DisconnectReasonCode::SessionTakenOver,
                        ));
                    }
                });
                hs.ack(Peer::Device(s)).with(|ack| {
                    ack.max_qos = QoS::AtLeastOnce;
                    ack.retain_available = false;
                    ack.wildcard_subscription_available = false;
                    ack.shared_subscription_available = false;
                    ack.subscription_identifiers_available = false;
                })
            }
            Admission::Clinician(c, sub) => {
                let (sink, close) = (hs.sink(), c.close.clone());
                ntex::rt::spawn({
                    let sink = sink.clone();
                    let qos = c.qos.clone();
                    run_feed(sub, close, move |item| {
                        let sink = sink.clone();
                        let qos = qos.clone();
                        async move {
                            let p = sink.publish(item.topic.clone());
                            let ok = if qos.get() == QoS::AtMostOnce {
                                p.send_at_most_once(item.json.clone()).is_ok()
                            } else {
                                p.send_at_least_once(item.json.clone()).await.is_ok()
                            };
                            if !ok {
                                sink.close();
                            }
                            ok
                        }
                    })
                });
                hs.ack(Peer::Clinician(c)).with(|ack| {
                    ack.max_qos = QoS::AtLeastOnce;
                    ack.retain_available = false;
                    ack.shared_subscription_available = false;
                    ack.subscription_identifiers_available = false;
                })
            }
            Admission::BadClientId => hs.failed(ConnectAckReason::ClientIdentifierNotValid),
            Admission::BadCredentials => hs.failed(ConnectAckReason::BadUserNameOrPassword),
        },
    )
}

/// Logs why a connection ended.
fn log_control(peer: &str, msg: &Control<ConnectionError>) {
    match msg {
        Control::Stop(Reason::Error(e)) => tracing::info!(peer, "connection closed: {e:?}"),
        Control::Stop(Reason::Protocol(e)) => {
            tracing::info!(peer, "connection closed on a protocol error: {e:?}")
        }
        Control::Stop(Reason::PeerGone(_)) => {
            tracing::debug!(peer, "connection closed by the peer")
        }
        Control::WrBackpressure(_) => {}
    }
}

impl Peer {
    /// A label for logs.
    fn name(&self) -> &str {
        match self {
            Peer::Device(d) => d.device.as_str(),
            Peer::Clinician(c) => c.id.as_str(),
        }
    }

    /// Decides one subscription filter: the QoS granted, or None (refused).
    /// Devices subscribe to nothing; clinicians to their units' alerts.
    fn grant(&self, filter: &str, asked: QoS) -> Option<QoS> {
        let Peer::Clinician(c) = self else {
            return None;
        };
        // A patient follows their own notifications, nothing else.
        if let Some(me) = c.id.strip_prefix(PATIENT_USER_PREFIX) {
            if filter != notifications_topic(me) {
                tracing::info!(
                    patient = me,
                    filter,
                    "subscription refused: not the patient's notifications"
                );
                return None;
            }
            if asked != QoS::AtMostOnce {
                c.qos.set(QoS::AtLeastOnce);
            }
            c.ctx.hub.follow_notifications(c.subscription, me);
            return Some(if asked == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            });
        }
        let patient = subscription_patient(filter);
        let unit = subscription_unit(filter);
        if patient.is_none() {
            let unit = unit?;
            if !c.ctx.census.units_of(&c.id).iter().any(|u| u == unit) {
                tracing::info!(clinician = %c.id, filter, "subscription refused: unit not covered");
                return None;
            }
        }
        let qos = if asked == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        if qos == QoS::AtLeastOnce {
            c.qos.set(QoS::AtLeastOnce);
        }
        match (patient, unit) {
            // An interest only: each of the patient's transitions goes out
            // under a consent that holds at its time, or not at all.
            (Some(p), _) => c.ctx.hub.follow_patient(c.subscription, p),
            (None, Some(u)) => c.ctx.hub.follow(c.subscription, u),
            (None, None) => {}
        }
        Some(qos)
    }

    fn unfollow(&self, filter: &str) {
        if let (Peer::Clinician(c), Some(unit)) = (self, subscription_unit(filter)) {
            c.ctx.hub.unfollow(c.subscription, unit);
        }
        if let (Peer::Clinician(c), Some(patient)) = (self, subscription_patient(filter)) {
            c.ctx.hub.unfollow_patient(c.subscription, patient);
        }
    }
}

/// The MQTT service factory, for `ntex::server::build().bind(...)`.
pub fn mqtt_service(
    ctx: Arc<IngestContext>,
) -> impl ServiceFactory<ntex::io::Io, SharedCfg, Response = (), InitError = ()> {
    let (c3, c5) = (ctx.clone(), ctx.clone());
    let (p3, p5) = (ctx.clone(), ctx);
    MqttServer::new()
        .v3(v3::MqttServer::new(move |hs| handshake_v3(c3.clone(), hs))
            .protocol(fn_factory_with_config(|session: v3::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(fn_service(move |msg: v3::ProtocolMessage| {
                    Ready::<_, ConnectionError>::Ok(match msg {
                        v3::ProtocolMessage::Subscribe(mut s) => {
                            for mut sub in &mut s {
                                match session.grant(sub.topic(), sub.qos()) {
                                    Some(q) => sub.confirm(q),
                                    None => sub.fail(),
                                }
                            }
                            s.ack()
                        }
                        v3::ProtocolMessage::Unsubscribe(u) => {
                            u.iter().for_each(|t| session.unfollow(t));
                            u.ack()
                        }
                        other => other.ack(),
                    })
                }))
            }))
            .control(fn_factory_with_config(|session: v3::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(fn_service(move |msg: Control<ConnectionError>| {
                    log_control(session.name(), &msg);
                    Ready::Ok::<Option<v3::codec::Encoded>, ConnectionError>(None)
                }))
            }))
            .publish(fn_factory_with_config(move |session: v3::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(PublishService::new(p3.clone(), session))
            })))
        .v5(v5::MqttServer::new(move |hs| handshake_v5(c5.clone(), hs))
            .protocol(fn_factory_with_config(|session: v5::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(fn_service(move |msg: v5::ProtocolMessage| {
                    Ready::<_, ConnectionError>::Ok(match msg {
                        v5::ProtocolMessage::Subscribe(mut s) => {
                            for mut sub in &mut s {
                                match session.grant(sub.topic(), sub.options().qos) {
                                    Some(q) => sub.confirm(q),
                                    None => sub.fail(SubscribeAckReason::NotAuthorized),
                                }
                            }
                            s.ack()
                        }
                        v5::ProtocolMessage::Unsubscribe(u) => {
                            u.iter().for_each(|t| session.unfollow(t));
                            u.ack()
                        }
                        other => other.ack(),
                    })
                }))
            }))
            .control(fn_factory_with_config(|session: v5::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(fn_service(move |msg: Control<ConnectionError>| {
                    log_control(session.name(), &msg);
                    Ready::Ok::<Option<v5::codec::Encoded>, ConnectionError>(None)
                }))
            }))
            .publish(fn_factory_with_config(move |session: v5::Session<Peer>| {
                Ready::Ok::<_, ConnectionError>(PublishService::new(p5.clone(), session))
            })))
}

/// One connection's publish handler.
struct PublishService<S> {
    ctx: Arc<IngestContext>,
    session: S,
    /// Publishes whose payload is still arriving in chunks: their chunks
    /// must be dispatched whatever the budget says, or they would wait forever.
    streaming: std::cell::Cell<usize>,
    /// What this connection's publishes hold of the memory budget.
    share: Arc<Share>,
}

impl<S> PublishService<S> {
    fn new(ctx: Arc<IngestContext>, session: S) -> Self {
        Self {
            ctx,
            session,
            streaming: std::cell::Cell::new(0),
            share: Share::new(),
        }
    }

    /// Ready once the memory budget has room: until then ntex-mqtt stops
    /// decoding this connection and TCP pushes back on the device.
    async fn wait_for_budget(&self) {
        if self.streaming.get() == 0 {
            // A light sender passes on the reserve (see crate::budget).
            self.ctx.budget.wait_admission(&self.share).await;
        } else {
            // The next packet may be the chunk a publish waits for: it may
            // use the budget's reserve (half again its size), no more.
            self.ctx.metrics.admission_reserve.inc();
            self.ctx.budget.wait_reserve().await;
        }
    }

    /// The whole payload; a payload larger than what had arrived when the
    /// packet was decoded comes in chunks.
    async fn payload(&self, payload: ntex_mqtt::Payload) -> Result<Bytes, ConnectionError> {
        if payload.is_fixed() {
            return payload
                .read_all()
                .await
                .map_err(|_| ConnectionError::Payload);
        }
        // Counted while its chunks arrive, even if the call is dropped
        // half-way (a counter left raised would switch admission off).
        struct Streaming<'a>(&'a std::cell::Cell<usize>);
        impl Drop for Streaming<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        self.streaming.set(self.streaming.get() + 1);
        let _guard = Streaming(&self.streaming);
        tracing::trace!(
            streaming = self.streaming.get(),
            "payload arrives in chunks"
        );
        payload
            .read_all()
            .await
            .map_err(|_| ConnectionError::Payload)
    }
}

impl<S: std::ops::Deref<Target = Peer>> PublishService<S> {
    /// The common publish path of devices and clinicians.
    async fn accept(&self, topic: &str, qos: QoS, payload: Bytes) -> Result<(), Refusal> {
        match &*self.session {
            Peer::Device(d) => accept_publish(&self.ctx, d, &self.share, topic, qos, payload).await,
            Peer::Clinician(c) if c.id.starts_with(PATIENT_USER_PREFIX) => {
                tracing::info!(who = %c.id, topic, "publish refused: patients publish nothing here");
                self.ctx
                    .metrics
                    .publishes_refused
                    .get_or_create(&[("reason", "topic")])
                    .inc();
                Err(Refusal::Topic)
            }
            Peer::Clinician(c) => clinician_publish(&self.ctx, c, topic, payload).await,
        }
    }
}

impl Service<v3::Publish> for PublishService<v3::Session<Peer>> {
    type Response = ();
    type Error = ConnectionError;

    async fn ready(&self, _: ServiceCtx<'_, Self>) -> Result<(), ConnectionError> {
        self.wait_for_budget().await;
        Ok(())
    }

    async fn call(
        &self,
        mut p: v3::Publish,
        _: ServiceCtx<'_, Self>,
    ) -> Result<(), ConnectionError> {
        let payload = self.payload(p.take_payload()).await?;
        match self.accept(p.publish_topic(), p.qos(), payload).await {
            // MQTT 3.1.1 cannot refuse one publish: a bad command is logged.
            Ok(()) | Err(Refusal::Invalid) => Ok(()),
            Err(Refusal::Topic) => Err(ConnectionError::TopicDenied),
            Err(Refusal::Removed) => Err(ConnectionError::DeviceRemoved),
            Err(Refusal::LogFailed) => Err(ConnectionError::LogFailed),
        }
    }
}

impl Service<v5::Publish> for PublishService<v5::Session<Peer>> {
    type Response = v5::PublishAck;
    type Error = ConnectionError;

    async fn ready(&self, _: ServiceCtx<'_, Self>) -> Result<(), ConnectionError> {
        self.wait_for_budget().await;
        Ok(())
    }

    async fn call(
        &self,
        mut p: v5::Publish,
        _: ServiceCtx<'_, Self>,
    ) -> Result<v5::PublishAck, ConnectionError> {
        let payload = self.payload(p.take_payload()).await?;
        let qos = p.qos();
        let result = self.accept(p.publish_topic(), qos, payload).await;
        match (result, qos) {
            (Ok(()), _) => Ok(p.ack()),
            (Err(Refusal::Removed), _) => Err(ConnectionError::DeviceRemoved),
            // QoS 0 has no PUBACK to carry a reason: disconnect.
            (Err(Refusal::Topic), QoS::AtMostOnce) => Err(ConnectionError::TopicDenied),
            (Err(Refusal::LogFailed), QoS::AtMostOnce) => Err(ConnectionError::LogFailed),
            (Err(Refusal::Invalid), _) => {
                Ok(p.ack().reason_code(PublishAckReason::PayloadFormatInvalid))
            }
            (Err(Refusal::Topic), _) => Ok(p.ack().reason_code(PublishAckReason::NotAuthorized)),
            (Err(Refusal::LogFailed), _) => {
                Ok(p.ack().reason_code(PublishAckReason::UnspecifiedError))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_topic_is_exact() {
        let d = DeviceId::new("mon-1").unwrap();
        assert!(is_own_readings_topic(
            "wardflow/v1/devices/mon-1/readings",
            &d
        ));
        assert!(!is_own_readings_topic(
            "wardflow/v1/devices/mon-2/readings",
            &d
        ));
        assert!(!is_own_readings_topic(
            "wardflow/v1/devices/mon-1/readings/x",
            &d
        ));
        assert!(!is_own_readings_topic("wardflow/v1/devices/mon-1", &d));
        assert!(!is_own_readings_topic("other/mon-1/readings", &d));
        assert_eq!(
            readings_topic("mon-1"),
            "wardflow/v1/devices/mon-1/readings"
        );
    }
}
