//! The clinicians' HTTP API, beside `/healthz` and `/metrics`. Every call
//! carries `Authorization: Bearer <clinician-id>:<secret>` and is limited to
//! the units the clinician covers.
//!
//! - `GET /v1/alerts?unit=U`: the open alerts of a unit (or of all the
//!   clinician's units), as a JSON array.
//! - `GET /v1/alerts/stream?unit=U`: Server-Sent Events, one `alert` event
//!   per transition (the open alerts first), a comment every 15 s to keep
//!   proxies from closing the stream.
//! - `GET /v1/alerts/stream?patient=P`: the same for one patient outside
//!   the clinician's units: each transition only while a consent of the
//!   patient's (or an emergency access) names the clinician at its time, as
//!   on MQTT's `wardflow/v1/patients/{patient}/alerts/#`.
//! - `POST /v1/alerts/{id}/ack`, `POST /v1/alerts/{id}/silence?seconds=60`:
//!   200 with the alert's new state; 404 unknown alert; 403 not the
//!   clinician's unit; 409 already acknowledged or resolved.
//! - `POST /v1/patients/{patient}/observations` with
//!   `{"consciousness": "A", "oxygen": "air", "spo2_scale": 1}`.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ntex::util::{Bytes, Stream};
use ntex::web::{self, HttpRequest, HttpResponse};
use serde::Deserialize;
use wardflow_ingest::census::{CensusWatcher, Clinician};
use wardflow_ingest::feeds::{
    AlertAction, AlertHub, ClinicalCommand, CommandKind, Commands, FeedItem, Subscription,
};
use wardflow_ingest::observations::{self, ObservationBody};
use wardflow_model::now_ns;

/// What the API handlers share.
pub struct Api {
    pub census: Arc<CensusWatcher>,
    pub hub: Arc<AlertHub>,
    pub commands: Commands,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/alerts", web::get().to(list))
        .route("/v1/alerts/stream", web::get().to(stream))
        .route("/v1/alerts/{id}/ack", web::post().to(ack))
        .route("/v1/alerts/{id}/silence", web::post().to(silence))
        .route(
            "/v1/patients/{patient}/observations",
            web::post().to(observe),
        );
}

pub(crate) fn error(status: u16, message: &str) -> HttpResponse {
    let mut r = match status {
        400 => HttpResponse::BadRequest(),
        401 => HttpResponse::Unauthorized(),
        403 => HttpResponse::Forbidden(),
        404 => HttpResponse::NotFound(),
        409 => HttpResponse::Conflict(),
        415 => HttpResponse::UnsupportedMediaType(),
        429 => HttpResponse::TooManyRequests(),
        503 => HttpResponse::ServiceUnavailable(),
        504 => HttpResponse::GatewayTimeout(),
        _ => HttpResponse::InternalServerError(),
    };
    if status == 401 {
        r.header("www-authenticate", "Bearer realm=\"wardflow\"");
    }
    r.content_type("application/json")
        .body(serde_json::json!({ "error": message }).to_string())
}

/// The clinician of the request's bearer token.
async fn clinician(api: &Api, req: &HttpRequest) -> Result<Clinician, HttpResponse> {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let Some(token) = token else {
        return Err(error(
            401,
            "Authorization: Bearer <clinician-id>:<secret> is required",
        ));
    };
    let census = api.census.clone();
    // Key derivation takes milliseconds: keep it off the I/O thread.
    let found = ntex::rt::spawn_blocking(move || census.from_bearer(&token))
        .await
        .ok()
        .flatten();
    found.ok_or_else(|| error(401, "unknown clinician or wrong secret"))
}

#[derive(Deserialize)]
struct UnitQuery {
    unit: Option<String>,
    /// For a stream: one patient's alerts under a consent.
    #[serde(default)]
    patient: Option<String>,
}

/// The units a request covers: the one asked for (if the request's
/// clinician covers it), else all of the clinician's.
/// The clinician's id and the units asked for (all the clinician covers
/// by default).
async fn clinician_units(
    api: &Api,
    req: &HttpRequest,
    asked: Option<String>,
) -> Result<(String, HashSet<String>), HttpResponse> {
    let c = clinician(api, req).await?;
    match asked {
        Some(u) if c.covers(&u) => Ok((c.id.clone(), [u].into())),
        Some(u) => Err(error(
            403,
            &format!("clinician {} does not cover unit {u}", c.id),
        )),
        None => Ok((c.id.clone(), c.units.iter().cloned().collect())),
    }
}

async fn list(
    api: web::types::State<Arc<Api>>,
    req: HttpRequest,
    q: web::types::Query<UnitQuery>,
) -> HttpResponse {
    let (who, units) = match clinician_units(&api, &req, q.into_inner().unit).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let mut body = Vec::from(&b"["[..]);
    for (i, a) in api
        .hub
        .open_alerts(None)
        .iter()
        .filter(|a| units.contains(&a.unit))
        .enumerate()
    {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&a.json);
        // Handed to the clinician: recorded in the audit trail.
        api.hub.delivered(a, &who);
    }
    body.push(b']');
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}

/// An SSE body: queued events, then the hub's, with keep-alive comments.
struct EventStream {
    first: VecDeque<Arc<FeedItem>>,
    sub: Subscription,
    keepalive: ntex::time::Interval,
}

fn sse_event(a: &FeedItem) -> Bytes {
    let mut out = Vec::with_capacity(a.json.len() + 48);
    out.extend_from_slice(format!("id: {}-{}\nevent: alert\ndata: ", a.id, a.seq).as_bytes());
    out.extend_from_slice(&a.json);
    out.extend_from_slice(b"\n\n");
    out.into()
}

impl Stream for EventStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(a) = self.first.pop_front() {
            return Poll::Ready(Some(Ok(sse_event(&a))));
        }
        match self.sub.rx.poll_recv(cx) {
            Poll::Ready(Some(a)) => return Poll::Ready(Some(Ok(sse_event(&a)))),
            // Dropped by the hub (too slow): end the stream; the client reconnects.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.keepalive.poll_tick(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Ok(Bytes::from_static(b": keep-alive\n\n")))),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn stream(
    api: web::types::State<Arc<Api>>,
    req: HttpRequest,
    q: web::types::Query<UnitQuery>,
) -> HttpResponse {
    let q = q.into_inner();
    if let Some(patient) = q.patient {
        let c = match clinician(&api, &req).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        // An interest only: the consent join decides what reaches it.
        let sub = api.hub.subscribe(HashSet::new(), &c.id);
        api.hub.follow_patient(sub.id, &patient);
        return event_stream(VecDeque::new(), sub);
    }
    let (who, units) = match clinician_units(&api, &req, q.unit).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    // Subscribe before reading the board, so no transition falls between.
    let sub = api.hub.subscribe(units.clone(), &who);
    let first: VecDeque<_> = api
        .hub
        .open_alerts(None)
        .into_iter()
        .filter(|a| units.contains(&a.unit))
        .collect();
    for item in &first {
        api.hub.delivered(item, &who);
    }
    event_stream(first, sub)
}

fn event_stream(first: VecDeque<Arc<FeedItem>>, sub: Subscription) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .streaming(EventStream {
            first,
            sub,
            keepalive: ntex::time::interval(Duration::from_secs(15)),
        })
}

#[derive(Deserialize)]
struct SilenceQuery {
    seconds: Option<i64>,
}

async fn ack(
    api: web::types::State<Arc<Api>>,
    req: HttpRequest,
    id: web::types::Path<String>,
) -> HttpResponse {
    act(&api, &req, &id, AlertAction::Acknowledge).await
}

async fn silence(
    api: web::types::State<Arc<Api>>,
    req: HttpRequest,
    id: web::types::Path<String>,
    q: web::types::Query<SilenceQuery>,
) -> HttpResponse {
    let seconds = q.seconds.unwrap_or(60);
    act(
        &api,
        &req,
        &id,
        AlertAction::Silence {
            for_ns: seconds.saturating_mul(1_000_000_000),
        },
    )
    .await
}

async fn act(api: &Api, req: &HttpRequest, id: &str, action: AlertAction) -> HttpResponse {
    let c = match clinician(api, req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    act_as(&api.hub, &api.commands, &c.id, |u| c.covers(u), id, action).await
}

/// Sends a clinician's command about alert `id` to the worker that owns
/// it, if `may` allows its unit, and answers with the alert's new state.
pub(crate) async fn act_as(
    hub: &AlertHub,
    commands: &Commands,
    by: &str,
    may: impl Fn(&str) -> bool,
    id: &str,
    action: AlertAction,
) -> HttpResponse {
    let Some(item) = hub.get(id) else {
        return error(404, &format!("no alert {id}"));
    };
    if !may(&item.unit) {
        return error(
            403,
            &format!("clinician {by} does not cover unit {}", item.unit),
        );
    }
    if !item.open {
        return error(409, &format!("alert {id} is resolved"));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = commands.send(ClinicalCommand {
        kind: CommandKind::Alert {
            alert: item.id.clone(),
            subject: item.subject.clone(),
            action,
        },
        by: by.to_string(),
        at_ns: now_ns(),
        reply: Some(Arc::new(parking_lot::Mutex::new(Some(tx)))),
    });
    if !sent {
        return error(503, "the engine is stopping");
    }
    // The worker that owns the alert answers; in a cluster it may live in
    // another process, whose answer cannot travel back: then the alert's
    // next transition, relayed to this process's feeds, is the answer.
    let mut rx = rx;
    let mut closed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if !closed {
            match ntex::time::timeout(Duration::from_millis(20), &mut rx).await {
                Ok(Ok(Ok(json))) => {
                    return HttpResponse::Ok()
                        .content_type("application/json")
                        .body(json);
                }
                Ok(Ok(Err(why))) if why.contains("not open") => return error(404, &why),
                Ok(Ok(Err(why))) if why.contains("silence lasts") => return error(400, &why),
                Ok(Ok(Err(why))) => return error(409, &why),
                Ok(Err(_)) => closed = true,
                Err(_) => {}
            }
        } else {
            ntex::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(now) = hub.get(id).filter(|a| a.seq > item.seq) {
            return HttpResponse::Ok()
                .content_type("application/json")
                .body(now.json.clone());
        }
        if std::time::Instant::now() >= deadline {
            return error(504, "no answer from the dataflow within 5 s");
        }
    }
}

async fn observe(
    api: web::types::State<Arc<Api>>,
    req: HttpRequest,
    patient: web::types::Path<String>,
    body: Bytes,
) -> HttpResponse {
    let c = match clinician(&api, &req).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let census = api.census.patients.snapshot();
    let Some(adm) = census.get(patient.as_str()) else {
        return error(
            404,
            &format!("patient {} is not admitted", patient.as_str()),
        );
    };
    if !c.covers(&adm.unit) {
        return error(
            403,
            &format!("clinician {} does not cover unit {}", c.id, adm.unit),
        );
    }
    let record = serde_json::from_slice::<ObservationBody>(&body)
        .map_err(|e| e.to_string())
        .and_then(|b| b.into_record(adm.patient.clone(), &c.id, now_ns()));
    let record = match record {
        Ok(r) => r,
        Err(e) => return error(400, &e),
    };
    let dir = api.census.data_dir().to_path_buf();
    let json = serde_json::to_vec(&record).unwrap_or_default();
    match ntex::rt::spawn_blocking(move || observations::append(&dir, &record)).await {
        Ok(Ok(())) => HttpResponse::Ok()
            .content_type("application/json")
            .body(json),
        _ => error(500, "the observation could not be written"),
    }
}
