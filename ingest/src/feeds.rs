//! Alert feeds: the board of open alerts, their fan-out to clinicians'
//! connections (MQTT subscriptions, HTTP event streams), and the commands
//! clinicians send back (acknowledge, silence, manual observations).
//!
//! Topics (MQTT):
//! - `wardflow/v1/alerts/{unit}/{alert-id}`: each transition of an alert, as
//!   JSON, to the clinicians covering the unit who subscribed
//!   (`wardflow/v1/alerts/{unit}/#`). On subscribing, a clinician first gets
//!   every open alert of the unit, so a new connection starts complete.
//! - `wardflow/v1/alerts/{unit}/{alert-id}/ack` and `/silence` (payload
//!   empty, or `{"seconds": 60}` for a silence): published by a clinician.
//! - `wardflow/v1/patients/{patient}/observations`: a manual observation,
//!   `{"consciousness": "A", "oxygen": "air", "spo2_scale": 1}`.
//! - `wardflow/v1/patients/{patient}/alerts/{alert-id}`: the patient's alert
//!   transitions, to a clinician outside the admitting unit who subscribed
//!   (`wardflow/v1/patients/{patient}/alerts/#`), each only while a consent
//!   of the patient's (or an emergency access) holding at the alert's time
//!   names the clinician. The engine's dataflow decides who gets which
//!   transition ([`AlertHub::publish_granted`]); subscribing grants nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ntex_bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use wardflow_model::PatientId;
use wardflow_rules::eval::ManualObservation;

use crate::envelope::route_hash;
use crate::wal::Wake;

pub const ALERTS_PREFIX: &str = "wardflow/v1/alerts/";
pub const PATIENTS_PREFIX: &str = "wardflow/v1/patients/";
pub const OBSERVATIONS_SUFFIX: &str = "/observations";
/// Messages a slow subscriber may have queued before it is disconnected
/// (it gets the open alerts again when it reconnects).
pub const SUBSCRIBER_QUEUE: usize = 4096;
/// How long a resolved alert stays on the board, so a late acknowledgement
/// gets "resolved" rather than "unknown".
pub const RESOLVED_KEPT_NS: i64 = 600_000_000_000;

/// The topic an alert's transitions go to.
pub fn alert_topic(unit: &str, id: &str) -> String {
    format!("{ALERTS_PREFIX}{unit}/{id}")
}

/// One alert transition, ready to send.
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub id: String,
    pub unit: String,
    /// The patient or device the alert is about (routes commands).
    pub subject: String,
    /// The patient whose data the alert carries, if any (a technical alert
    /// about an unbound device carries none).
    pub patient: Option<String>,
    pub open: bool,
    pub seq: u32,
    pub at_ns: i64,
    pub topic: String,
    pub json: Bytes,
    /// Sent under a consent rather than to the admitting unit.
    pub grant: Option<GrantRef>,
}

/// The consent a delivery outside the admitting unit was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRef {
    pub purpose: String,
    /// `grant id@block`, or `emergency:<id>` for break-glass access.
    pub version: String,
}

/// Where a patient is told of accesses made without their consent
/// (break-glass), retained for [`NOTIFICATIONS_KEPT_NS`].
pub fn notifications_topic(patient: &str) -> String {
    format!("{PATIENTS_PREFIX}{patient}/notifications")
}

/// How long a notification waits for its patient to connect.
pub const NOTIFICATIONS_KEPT_NS: i64 = 7 * 24 * 3_600_000_000_000;

/// The topic a patient's alert goes to under a consent.
pub fn patient_alert_topic(patient: &str, id: &str) -> String {
    format!("{PATIENTS_PREFIX}{patient}/alerts/{id}")
}

struct Subscriber {
    units: Arc<Mutex<HashSet<String>>>,
    /// Patients whose alerts it asked for under a consent.
    patients: HashSet<String>,
    tx: tokio::sync::mpsc::Sender<Arc<FeedItem>>,
    /// Who follows: a clinician's id.
    who: String,
}

/// Called for each transition handed to a subscriber, with the subscriber
/// (the audit trail records it as an access to the patient's data).
pub type DeliveryObserver = Arc<dyn Fn(&FeedItem, &str) + Send + Sync>;

/// A subscription unit that stands for every unit (administrators).
pub const ALL_UNITS: &str = "*";

/// The open alerts and the connections that follow them.
#[derive(Default)]
pub struct AlertHub {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next: std::sync::atomic::AtomicU64,
    board: Mutex<HashMap<String, Arc<FeedItem>>>,
    /// Recent notifications, by patient.
    notifications: Mutex<HashMap<String, Vec<Arc<FeedItem>>>>,
    observer: Mutex<Option<DeliveryObserver>>,
}

/// A subscription to the hub; unsubscribes when dropped.
pub struct Subscription {
    pub id: u64,
    pub units: Arc<Mutex<HashSet<String>>>,
    pub rx: tokio::sync::mpsc::Receiver<Arc<FeedItem>>,
    hub: Arc<AlertHub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.subscribers.lock().remove(&self.id);
    }
}

impl AlertHub {
    pub fn new() -> Arc<AlertHub> {
        Arc::new(AlertHub::default())
    }

    /// Sets what is told of every delivery.
    pub fn on_delivery(&self, f: DeliveryObserver) {
        *self.observer.lock() = Some(f);
    }

    /// Tells the observer that `item` went to `who`.
    pub fn delivered(&self, item: &FeedItem, who: &str) {
        let observer = self.observer.lock().clone();
        if let Some(f) = observer {
            f(item, who);
        }
    }

    /// A new subscription of `who` following `units` (which may change later).
    pub fn subscribe(self: &Arc<Self>, units: HashSet<String>, who: &str) -> Subscription {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let units = Arc::new(Mutex::new(units));
        let (tx, rx) = tokio::sync::mpsc::channel(SUBSCRIBER_QUEUE);
        self.subscribers.lock().insert(
            id,
            Subscriber {
                units: units.clone(),
                patients: HashSet::new(),
                tx,
                who: who.to_string(),
            },
        );
        Subscription {
            id,
            units,
            rx,
            hub: self.clone(),
        }
    }

    /// Adds a unit to a subscription and queues the unit's open alerts to it.
    pub fn follow(&self, subscription: u64, unit: &str) {
        let mut sent = Vec::new();
        let who = {
            let subs = self.subscribers.lock();
            let Some(s) = subs.get(&subscription) else {
                return;
            };
            if !s.units.lock().insert(unit.to_string()) {
                return;
            }
            for item in self.open_alerts(Some(unit)) {
                if s.tx.try_send(item.clone()).is_ok() {
                    sent.push(item);
                }
            }
            s.who.clone()
        };
        for item in sent {
            self.delivered(&item, &who);
        }
    }

    /// Stops following a unit.
    pub fn unfollow(&self, subscription: u64, unit: &str) {
        if let Some(s) = self.subscribers.lock().get(&subscription) {
            s.units.lock().remove(unit);
        }
    }

    /// Follows a patient's alerts that a consent lets this subscriber see.
    pub fn follow_patient(&self, subscription: u64, patient: &str) {
        if let Some(s) = self.subscribers.lock().get_mut(&subscription) {
            s.patients.insert(patient.to_string());
        }
    }

    pub fn unfollow_patient(&self, subscription: u64, patient: &str) {
        if let Some(s) = self.subscribers.lock().get_mut(&subscription) {
            s.patients.remove(patient);
        }
    }

    /// Follows a patient's own notifications (a patient's subscription):
    /// queues the recent ones first.
    pub fn follow_notifications(&self, subscription: u64, patient: &str) {
        let mut subs = self.subscribers.lock();
        let Some(s) = subs.get_mut(&subscription) else {
            return;
        };
        if s.patients.insert(patient.to_string())
            && let Some(kept) = self.notifications.lock().get(patient)
        {
            for n in kept {
                let _ = s.tx.try_send(n.clone());
            }
        }
    }

    /// Tells a patient something (`json`, with `id`), now and to their
    /// later connections.
    pub fn notify(&self, patient: &str, id: &str, json: Vec<u8>, now_ns: i64) {
        let item = Arc::new(FeedItem {
            id: id.to_string(),
            unit: String::new(),
            subject: patient.to_string(),
            patient: Some(patient.to_string()),
            open: false,
            seq: 0,
            at_ns: now_ns,
            topic: notifications_topic(patient),
            json: json.into(),
            grant: None,
        });
        {
            let mut kept = self.notifications.lock();
            let list = kept.entry(patient.to_string()).or_default();
            list.retain(|n| now_ns - n.at_ns < NOTIFICATIONS_KEPT_NS && n.id != id);
            list.push(item.clone());
        }
        let me = format!("patient:{patient}");
        for s in self.subscribers.lock().values() {
            if s.who == me && s.patients.contains(patient) {
                let _ = s.tx.try_send(item.clone());
            }
        }
    }

    /// Sends a transition to `clinician`'s subscriptions that follow its
    /// patient, on the patient's topic, under `grant` (decided by the
    /// caller: a consent in force at the alert's time).
    pub fn publish_granted(&self, item: &FeedItem, clinician: &str, grant: GrantRef) {
        let Some(patient) = &item.patient else {
            return;
        };
        let item = Arc::new(FeedItem {
            topic: patient_alert_topic(patient, &item.id),
            grant: Some(grant),
            ..item.clone()
        });
        let mut sent = false;
        for s in self.subscribers.lock().values() {
            if s.who == clinician
                && s.patients.contains(patient)
                && s.tx.try_send(item.clone()).is_ok()
            {
                sent = true;
            }
        }
        if sent {
            self.delivered(&item, clinician);
        }
    }

    /// Records a transition and sends it to every subscriber of its unit. A
    /// subscriber whose queue is full is dropped (its connection closes).
    pub fn publish(&self, item: FeedItem, now_ns: i64) {
        let item = Arc::new(item);
        {
            let mut board = self.board.lock();
            board.insert(item.id.clone(), item.clone());
            board.retain(|_, a| a.open || now_ns - a.at_ns < RESOLVED_KEPT_NS);
        }
        let mut to = Vec::new();
        self.subscribers.lock().retain(|id, s| {
            let units = s.units.lock();
            if !units.contains(&item.unit) && !units.contains(ALL_UNITS) {
                return true;
            }
            drop(units);
            match s.tx.try_send(item.clone()) {
                Ok(()) => {
                    to.push(s.who.clone());
                    true
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        subscriber = id,
                        "alert subscriber too slow: disconnecting it"
                    );
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        for who in to {
            self.delivered(&item, &who);
        }
    }

    /// An alert on the board (open, or resolved recently).
    pub fn get(&self, id: &str) -> Option<Arc<FeedItem>> {
        self.board.lock().get(id).cloned()
    }

    /// Open alerts, of one unit or all, oldest transition first.
    pub fn open_alerts(&self, unit: Option<&str>) -> Vec<Arc<FeedItem>> {
        let mut v: Vec<_> = self
            .board
            .lock()
            .values()
            .filter(|a| a.open && unit.is_none_or(|u| a.unit == u))
            .cloned()
            .collect();
        v.sort_by_key(|a| (a.at_ns, a.seq));
        v
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.lock().len()
    }
}

/// What a clinician does to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertAction {
    Acknowledge,
    Silence { for_ns: i64 },
}

/// Where a command's outcome goes: the new alert JSON, or why not.
pub type Reply = Arc<Mutex<Option<tokio::sync::oneshot::Sender<Result<Bytes, String>>>>>;

/// A clinician's command, on its way to the worker that owns the subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CommandKind {
    Alert {
        alert: String,
        subject: String,
        action: AlertAction,
    },
    Observe {
        patient: PatientId,
        observation: ManualObservation,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClinicalCommand {
    pub kind: CommandKind,
    pub by: String,
    pub at_ns: i64,
    #[serde(skip)]
    pub reply: Option<Reply>,
}

impl ClinicalCommand {
    /// The routing hash: the same as the readings of its subject.
    pub fn route(&self) -> u64 {
        match &self.kind {
            CommandKind::Alert { subject, .. } => route_hash(subject),
            CommandKind::Observe { patient, .. } => route_hash(patient.as_str()),
        }
    }

    /// Answers the sender, if it waits.
    pub fn answer(&self, result: Result<Bytes, String>) {
        if let Some(r) = &self.reply
            && let Some(tx) = r.lock().take()
        {
            let _ = tx.send(result);
        }
    }
}

/// The sending end of the command channel into the dataflow.
#[derive(Clone)]
pub struct Commands {
    tx: crossbeam_channel::Sender<ClinicalCommand>,
    wake: Arc<Wake>,
}

impl Commands {
    pub fn new(wake: Arc<Wake>) -> (Commands, crossbeam_channel::Receiver<ClinicalCommand>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Commands { tx, wake }, rx)
    }

    /// Sends a command; false if the dataflow has stopped.
    pub fn send(&self, c: ClinicalCommand) -> bool {
        let ok = self.tx.send(c).is_ok();
        self.wake.wake();
        ok
    }
}

/// Parses a clinician's publish topic.
#[derive(Debug, PartialEq, Eq)]
pub enum ClinicianTopic<'a> {
    Alert {
        unit: &'a str,
        alert: &'a str,
        action: &'a str,
    },
    Observation {
        patient: &'a str,
    },
}

pub fn parse_clinician_topic(topic: &str) -> Option<ClinicianTopic<'_>> {
    if let Some(rest) = topic.strip_prefix(ALERTS_PREFIX) {
        let mut parts = rest.split('/');
        let (unit, alert, action) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !matches!(action, "ack" | "silence") {
            return None;
        }
        return Some(ClinicianTopic::Alert {
            unit,
            alert,
            action,
        });
    }
    let patient = topic
        .strip_prefix(PATIENTS_PREFIX)?
        .strip_suffix(OBSERVATIONS_SUFFIX)?;
    (!patient.contains('/')).then_some(ClinicianTopic::Observation { patient })
}

/// The patient a subscription filter follows under a consent:
/// `wardflow/v1/patients/{patient}/alerts/#` (or `/+`).
pub fn subscription_patient(filter: &str) -> Option<&str> {
    let rest = filter.strip_prefix(PATIENTS_PREFIX)?;
    let (patient, tail) = rest.split_once("/alerts/")?;
    if patient.is_empty() || patient.contains(['+', '#', '/']) || tail.is_empty() {
        return None;
    }
    Some(patient)
}

/// The unit a subscription filter follows, if it is one a clinician may
/// use: `wardflow/v1/alerts/{unit}/#` (or `/+`, or one alert's topic).
pub fn subscription_unit(filter: &str) -> Option<&str> {
    let rest = filter.strip_prefix(ALERTS_PREFIX)?;
    let (unit, tail) = rest.split_once('/')?;
    if unit.is_empty() || unit.contains(['+', '#']) || tail.is_empty() {
        return None;
    }
    Some(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, unit: &str, open: bool, at: i64) -> FeedItem {
        FeedItem {
            patient: None,
            id: id.into(),
            unit: unit.into(),
            subject: "p-1".into(),
            open,
            seq: 1,
            at_ns: at,
            topic: alert_topic(unit, id),
            json: Bytes::from_static(b"{}"),
            grant: None,
        }
    }

    #[test]
    fn subscribers_get_their_units_only_and_a_snapshot_on_follow() {
        let hub = AlertHub::new();
        hub.publish(item("a1", "icu-a", true, 1), 1);
        let mut s = hub.subscribe(HashSet::new(), "c-1");
        hub.follow(s.id, "icu-a");
        assert_eq!(s.rx.try_recv().unwrap().id, "a1", "the open alert first");
        hub.publish(item("b1", "icu-b", true, 2), 2);
        hub.publish(item("a1", "icu-a", false, 3), 3);
        assert_eq!(s.rx.try_recv().unwrap().id, "a1");
        assert!(s.rx.try_recv().is_err(), "icu-b is not followed");
        assert_eq!(hub.open_alerts(None).len(), 1);
        assert!(hub.get("a1").is_some(), "resolved alerts stay a while");
        drop(s);
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn granted_transitions_go_to_the_named_clinician_following_the_patient_only() {
        let hub = AlertHub::new();
        let mut follows = hub.subscribe(HashSet::new(), "dr-b");
        let mut elsewhere = hub.subscribe(HashSet::new(), "dr-b");
        let mut other = hub.subscribe(HashSet::new(), "dr-c");
        hub.follow_patient(follows.id, "p-1");
        hub.follow_patient(other.id, "p-1");
        let mut a = item("a1", "icu-a", true, 1);
        a.patient = Some("p-1".into());
        let grant = GrantRef {
            purpose: "treatment".into(),
            version: "g1@7".into(),
        };
        hub.publish_granted(&a, "dr-b", grant.clone());
        let got = follows.rx.try_recv().unwrap();
        assert_eq!(got.topic, "wardflow/v1/patients/p-1/alerts/a1");
        assert_eq!(got.grant.as_ref(), Some(&grant));
        assert!(
            elsewhere.rx.try_recv().is_err(),
            "not following the patient"
        );
        assert!(other.rx.try_recv().is_err(), "another clinician");
        // A unit subscriber of icu-a does not see it twice: granted
        // transitions are not on the board.
        assert!(hub.get("a1").is_none());
        assert_eq!(
            subscription_patient("wardflow/v1/patients/p-1/alerts/#"),
            Some("p-1")
        );
        assert_eq!(
            subscription_patient("wardflow/v1/patients/+/alerts/#"),
            None
        );
        assert_eq!(
            subscription_patient("wardflow/v1/patients/p-1/notifications"),
            None
        );
    }

    #[test]
    fn topics() {
        assert_eq!(
            subscription_unit("wardflow/v1/alerts/icu-a/#"),
            Some("icu-a")
        );
        assert_eq!(subscription_unit("wardflow/v1/alerts/+/#"), None);
        assert_eq!(subscription_unit("wardflow/v1/alerts/#"), None);
        assert_eq!(subscription_unit("wardflow/v1/devices/x/readings"), None);
        assert_eq!(
            parse_clinician_topic("wardflow/v1/alerts/icu-a/0123/ack"),
            Some(ClinicianTopic::Alert {
                unit: "icu-a",
                alert: "0123",
                action: "ack"
            })
        );
        assert_eq!(
            parse_clinician_topic("wardflow/v1/alerts/icu-a/0123/close"),
            None
        );
        assert_eq!(
            parse_clinician_topic("wardflow/v1/patients/p-1/observations"),
            Some(ClinicianTopic::Observation { patient: "p-1" })
        );
    }
}
