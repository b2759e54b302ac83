//! `GET /v1/console/stream`: one Server-Sent Events stream per open
//! console with everything live the session may see: tiles, alert
//! transitions, devices, and the end of an access.
//!
//! Tiles are sent when the board publishes a change (at most four times a
//! second) and when what a tile shows changes with time alone (a value
//! turning stale, a bed going offline, an alarm acknowledged): each tick
//! the stream compares what it would send with what it sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ntex::util::{Bytes, Stream};
use ntex::web::{HttpRequest, HttpResponse};
use serde_json::json;
use wardflow_ingest::feeds::{FeedItem, Subscription};
use wardflow_ledger_bridge::consent::covers;
use wardflow_model::now_ns;

use super::{Console, Role, Session, State, Via, alarms, device_rows, tile_json};

/// How often time alone is checked (stale values, offline beds, accesses).
const TICK: Duration = Duration::from_secs(1);
/// Devices every this many ticks.
const DEVICE_TICKS: u64 = 5;
/// A keep-alive comment every this many ticks.
const KEEPALIVE_TICKS: u64 = 15;

struct ConsoleStream {
    console: Arc<Console>,
    session: Arc<Session>,
    /// The session's token: checked each tick, so signing out, expiry or
    /// a removed account ends the stream.
    token: String,
    /// Tiles need sending again (an alert moved).
    dirty: bool,
    queue: VecDeque<Bytes>,
    alerts: Subscription,
    board: tokio::sync::mpsc::Receiver<()>,
    tick: ntex::time::Interval,
    ticks: u64,
    /// What each tile showed when last sent.
    sent: HashMap<String, u64>,
    /// Patients seen through an access (consent, break-glass) last time,
    /// and whether its scope covers their alerts.
    by_access: HashMap<String, bool>,
    /// Patients whose view is recorded in the audit trail already.
    recorded: HashSet<String>,
}

fn event(name: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    out.into()
}

impl ConsoleStream {
    /// Queues every tile whose content changed since it was last sent, and
    /// the end of every patient no longer visible (transferred,
    /// discharged, an access ended).
    fn refresh_tiles(&mut self) {
        let visible = self.console.visible(&self.session);
        let alarms = alarms(&self.console.hub);
        let now = now_ns();
        let mut access_now = HashMap::new();
        for (adm, via) in &visible {
            let p = adm.patient.as_str();
            if let Via::Access(a) = via {
                let alerts = covers(&a.scope, "alerts");
                access_now.insert(p.to_string(), alerts);
                if alerts && self.by_access.get(p) != Some(&true) {
                    // Its alerts reach this stream under the consent join
                    // from now on; those open already, at once.
                    self.console.hub.follow_patient(self.alerts.id, p);
                    for item in self.console.hub.open_alerts(None) {
                        if item.patient.as_deref() == Some(p) {
                            self.queue.push_back(event("alert", &item.json));
                            self.console.record_view(
                                &self.session,
                                p,
                                via,
                                "alert-delivery",
                                &format!("alert {} transition {}", item.id, item.seq),
                            );
                        }
                    }
                }
            }
            if self.recorded.insert(p.to_string()) {
                self.console
                    .record_view(&self.session, p, via, "view", "console: live vitals");
            }
            let tile = self.console.board.tile(p);
            let (v, key) = tile_json(adm, tile.as_ref(), alarms.get(p).copied(), via, now);
            if self.sent.get(p) != Some(&key) {
                self.sent.insert(p.to_string(), key);
                self.queue
                    .push_back(event("tile", &serde_json::to_vec(&v).unwrap_or_default()));
            }
        }
        // A patient gone from view: the console must stop showing them.
        let gone: Vec<String> = self
            .sent
            .keys()
            .filter(|p| {
                !visible
                    .iter()
                    .any(|(a, _)| a.patient.as_str() == p.as_str())
            })
            .cloned()
            .collect();
        for p in gone {
            if self.by_access.contains_key(&p) {
                self.console.hub.unfollow_patient(self.alerts.id, &p);
            }
            self.sent.remove(&p);
            self.recorded.remove(&p);
            self.queue.push_back(event(
                "access",
                json!({ "patient": p, "lost": true }).to_string().as_bytes(),
            ));
        }
        for (p, alerts) in &self.by_access {
            if *alerts && access_now.get(p) == Some(&false) {
                self.console.hub.unfollow_patient(self.alerts.id, p);
            }
        }
        self.by_access = access_now;
    }

    /// Follows the units the session covers now (accounts change).
    fn refresh_units(&mut self) {
        let now: HashSet<String> = self
            .console
            .alert_units(&self.session)
            .into_iter()
            .collect();
        let before = self.alerts.units.lock().clone();
        for u in now.difference(&before) {
            self.console.hub.follow(self.alerts.id, u);
        }
        for u in before.difference(&now) {
            self.console.hub.unfollow(self.alerts.id, u);
        }
    }

    fn devices(&mut self) {
        if self.session.role == Role::Patient {
            return;
        }
        let rows = device_rows(&self.console, &self.session);
        self.queue.push_back(event(
            "devices",
            &serde_json::to_vec(&rows).unwrap_or_default(),
        ));
    }

    fn alert(&mut self, item: &FeedItem) {
        self.queue.push_back(event("alert", &item.json));
    }
}

impl Stream for ConsoleStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            let mut moved = false;
            match self.alerts.rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => {
                    self.alert(&item);
                    // The tile's alarm may have changed with it.
                    self.dirty = true;
                    moved = true;
                }
                // Dropped by the hub (too slow): end; the browser reconnects.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if let Poll::Ready(Some(())) = self.board.poll_recv(cx) {
                self.dirty = true;
                moved = true;
            }
            if self.tick.poll_tick(cx).is_ready() {
                self.ticks += 1;
                if self.console.live_session(&self.token).is_none() {
                    return Poll::Ready(None); // signed out, expired or removed
                }
                self.refresh_units();
                self.dirty = true;
                if self.ticks.is_multiple_of(DEVICE_TICKS) {
                    self.devices();
                }
                if self.ticks.is_multiple_of(KEEPALIVE_TICKS) {
                    self.queue
                        .push_back(Bytes::from_static(b": keep-alive\n\n"));
                }
                moved = true;
            }
            if self.dirty {
                self.dirty = false;
                self.refresh_tiles();
            }
            if !moved {
                return Poll::Pending;
            }
        }
    }
}

pub(super) async fn stream(console: State, req: HttpRequest) -> HttpResponse {
    let session = match console.session(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let token = super::token(&req).unwrap_or_default();
    let console = console.get_ref().clone();
    let units: HashSet<String> = console.alert_units(&session).into_iter().collect();
    // Subscribe before reading the board, so no transition falls between.
    let reader = console.reader(&session);
    let alerts = console.hub.subscribe(units.clone(), &reader);
    let board = console.board.watch();
    let mut s = ConsoleStream {
        queue: VecDeque::new(),
        alerts,
        board,
        tick: ntex::time::interval(TICK),
        ticks: 0,
        sent: HashMap::new(),
        by_access: HashMap::new(),
        recorded: HashSet::new(),
        token,
        dirty: false,
        session: session.clone(),
        console: console.clone(),
    };
    let hello = super::me_json(&session, &console);
    s.queue
        .push_back(event("hello", hello.to_string().as_bytes()));
    s.refresh_tiles();
    let all = units.contains(super::ALL_UNITS);
    for item in console.hub.open_alerts(None) {
        if all || units.contains(&item.unit) {
            s.alert(&item);
            console.hub.delivered(&item, &reader);
        }
    }
    s.devices();
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-accel-buffering", "no")
        .streaming(s)
}
