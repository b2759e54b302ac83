//! The Arrow Flight service researchers read studies from.
//!
//! - **Handshake**: HTTP basic credentials (`authorization: Basic
//!   base64(id:secret)`, what `FlightClient.authenticate_basic_token`
//!   sends) buy a bearer token, returned in the `authorization` response
//!   header and as the payload; every other call carries `authorization:
//!   Bearer <token>` (or the basic credentials again).
//! - **ListFlights**: the studies the caller is on. **GetFlightInfo**,
//!   **GetSchema**: by descriptor path `[study]` or a ticket as command.
//! - **DoGet**: a ticket, JSON: `{"study": "<id>"}` is the live stream (a
//!   batch per window, never ending while the study runs), `{"study":
//!   "<id>", "from_ms": 0, "to_ms": 1700000000000}` replays the windows
//!   released whose start lies in the range. A bare study id is the live
//!   stream too.
//!
//! Status codes: no or a bad token, UNAUTHENTICATED; a study the caller
//! is not on, PERMISSION_DENIED; no such study, NOT_FOUND; a study whose
//! budget is spent, RESOURCE_EXHAUSTED (a live stream ends with it);
//! a closed study, FAILED_PRECONDITION; a live reader that fell more
//! than 256 windows behind, ABORTED (it can replay what it missed).
//! Every batch sent is metered for the study and researcher.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use base64::Engine as _;
use futures::stream::{self, BoxStream, StreamExt as _};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::release::schema;
use crate::store::{
    Authenticator, Ended, Event, Live, ReaderUsage, Registry, for_each_raw_release,
};

/// How long a handshake's token is good for.
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// What a DoGet ticket asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketRequest {
    pub study: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
}

impl TicketRequest {
    fn parse(bytes: &[u8]) -> Result<TicketRequest, Status> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Status::invalid_argument("the ticket is not UTF-8"))?
            .trim();
        if text.starts_with('{') {
            serde_json::from_str(text).map_err(|e| {
                Status::invalid_argument(format!(
                    "ticket: {e}; expected {{\"study\": id}} or {{\"study\": id, \"from_ms\": ms, \"to_ms\": ms}}"
                ))
            })
        } else {
            Ok(TicketRequest {
                study: text.to_string(),
                from_ms: None,
                to_ms: None,
            })
        }
    }

    fn is_live(&self) -> bool {
        self.from_ms.is_none() && self.to_ms.is_none()
    }
}

/// The service.
pub struct ResearchFlight {
    registry: Arc<Registry>,
    auth: Arc<Authenticator>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Set when the server shuts down: live streams end, so the graceful
    /// shutdown does not wait for them forever.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ResearchFlight {
    pub fn new(registry: Arc<Registry>, auth: Arc<Authenticator>) -> ResearchFlight {
        ResearchFlight {
            registry,
            auth,
            tokens: Mutex::new(HashMap::new()),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    pub fn into_server(self) -> FlightServiceServer<ResearchFlight> {
        FlightServiceServer::new(self)
    }

    fn basic(&self, value: &str) -> Result<String, Status> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| Status::unauthenticated("malformed basic credentials"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::unauthenticated("malformed basic credentials"))?;
        let (id, secret) = text
            .split_once(':')
            .ok_or_else(|| Status::unauthenticated("malformed basic credentials"))?;
        if self.auth.check(id, secret.as_bytes()) {
            Ok(id.to_string())
        } else {
            Err(Status::unauthenticated(
                "unknown researcher or wrong secret",
            ))
        }
    }

    /// The researcher making a call.
    fn caller(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("no credentials: handshake first"))?;
        if let Some(b) = header.strip_prefix("Basic ") {
            return self.basic(b);
        }
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization: Bearer <token> expected"))?;
        let mut tokens = self.tokens.lock();
        match tokens.get(token.trim()) {
            Some((who, at)) if at.elapsed() < TOKEN_LIFETIME => {
                if self.auth.exists(who) {
                    Ok(who.clone())
                } else {
                    let who = who.clone();
                    tokens.retain(|_, (w, _)| *w != who);
                    Err(Status::unauthenticated(format!(
                        "researcher {who:?} was removed"
                    )))
                }
            }
            Some(_) => {
                tokens.remove(token.trim());
                Err(Status::unauthenticated(
                    "the token expired: handshake again",
                ))
            }
            None => Err(Status::unauthenticated("unknown token: handshake first")),
        }
    }

    /// The study, if the caller may read it.
    fn study_for(&self, researcher: &str, id: &str) -> Result<Arc<Live>, Status> {
        let live = self
            .registry
            .get(id)
            .ok_or_else(|| Status::not_found(format!("no study {id:?}")))?;
        if !live.study.admits(researcher) {
            return Err(Status::permission_denied(format!(
                "researcher {researcher:?} is not on study {id:?}"
            )));
        }
        Ok(live)
    }

    fn info(&self, live: &Live) -> Result<FlightInfo, Status> {
        let ticket = serde_json::to_vec(&TicketRequest {
            study: live.study.id.clone(),
            from_ms: None,
            to_ms: None,
        })
        .expect("a ticket serializes");
        FlightInfo::new()
            .try_with_schema(&schema(&live.study))
            .map_err(|e| Status::internal(e.to_string()))
            .map(|i| {
                i.with_descriptor(FlightDescriptor::new_path(vec![live.study.id.clone()]))
                    .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
                    .with_total_records(-1)
                    .with_total_bytes(-1)
            })
    }

    fn descriptor_study(d: &FlightDescriptor) -> Result<String, Status> {
        if let Some(p) = d.path.first() {
            return Ok(p.clone());
        }
        if !d.cmd.is_empty() {
            return TicketRequest::parse(&d.cmd).map(|t| t.study);
        }
        Err(Status::invalid_argument(
            "name the study as the descriptor's path or command",
        ))
    }
}

/// The status a stream ends with when its study releases nothing more.
fn ended_status(e: &Ended) -> Status {
    match e {
        Ended::BudgetSpent(s) => Status::resource_exhausted(s.clone()),
        Ended::Closed(s) => Status::failed_precondition(s.clone()),
        Ended::Failed(s) => Status::unavailable(s.clone()),
    }
}

type Batches = BoxStream<'static, Result<RecordBatch, FlightError>>;

/// The live windows of a study, ending with its end status, or when the
/// server shuts down.
fn live_batches(
    rx: tokio::sync::broadcast::Receiver<Event>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> Batches {
    stream::unfold(Some((rx, closing)), |state| async move {
        let (mut rx, mut closing) = state?;
        let next = tokio::select! {
            r = rx.recv() => r,
            _ = closing.wait_for(|c| *c) => {
                let s = Status::unavailable("the server is shutting down");
                return Some((Err(FlightError::Tonic(Box::new(s))), None));
            }
        };
        let rx = (rx, closing);
        match next {
            Ok(Event::Window(r)) => Some((Ok(r.batch.clone()), Some(rx))),
            Ok(Event::End(e)) => Some((Err(FlightError::Tonic(Box::new(ended_status(&e)))), None)),
            Err(RecvError::Lagged(n)) => {
                let s = Status::aborted(format!(
                    "this reader fell {n} windows behind; replay them with a time range"
                ));
                Some((Err(FlightError::Tonic(Box::new(s))), None))
            }
            Err(RecvError::Closed) => None,
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl FlightService for ResearchFlight {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .ok_or_else(|| Status::unauthenticated("handshake with basic credentials"))?
            .to_string();
        let who = self.basic(&header)?;
        let token = new_token();
        {
            let mut tokens = self.tokens.lock();
            tokens.retain(|_, (_, at)| at.elapsed() < TOKEN_LIFETIME);
            tokens.insert(token.clone(), (who.clone(), Instant::now()));
        }
        tracing::info!(researcher = %who, "research handshake");
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into_bytes().into(),
        };
        let mut response = Response::new(stream::iter([Ok(reply)]).boxed());
        response.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::internal("token header"))?,
        );
        Ok(response)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let who = self.caller(request.metadata())?;
        self.registry.reload();
        let infos: Vec<Result<FlightInfo, Status>> = self
            .registry
            .all()
            .iter()
            .filter(|l| l.study.admits(&who))
            .map(|l| self.info(l))
            .collect();
        Ok(Response::new(stream::iter(infos).boxed()))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let who = self.caller(request.metadata())?;
        let id = Self::descriptor_study(request.get_ref())?;
        let live = self.study_for(&who, &id)?;
        Ok(Response::new(self.info(&live)?))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "studies are streams: use GetFlightInfo and DoGet",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let who = self.caller(request.metadata())?;
        let id = Self::descriptor_study(request.get_ref())?;
        let live = self.study_for(&who, &id)?;
        let options = arrow_ipc::writer::IpcWriteOptions::default();
        let result: SchemaResult = SchemaAsIpc::new(&schema(&live.study), &options)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let who = self.caller(request.metadata())?;
        let ticket = TicketRequest::parse(&request.get_ref().ticket)?;
        let live = self.study_for(&who, &ticket.study)?;
        tracing::info!(study = %live.study.id, researcher = %who, live = ticket.is_live(), "research stream opened");
        live.meter(
            &who,
            &ReaderUsage {
                streams: 1,
                ..Default::default()
            },
        );
        let meter = Arc::new(Meter {
            live: live.clone(),
            researcher: who,
        });
        if !ticket.is_live() {
            return Ok(Response::new(replay(
                &live,
                &ticket,
                meter,
                self.closing.subscribe(),
            )));
        }
        // Subscribed before the check: an end between the two is then
        // either seen by the check or delivered to the subscription.
        let events = live.subscribe();
        if let Some(e) = live.ended() {
            return Err(ended_status(&e));
        }
        // Encoded here rather than by arrow-flight's encoder, which drops
        // batches without rows: a window nobody qualified for is still a
        // window, and its empty batch tells the reader it passed.
        let options = arrow_ipc::writer::IpcWriteOptions::default();
        let first = FlightData::from(SchemaAsIpc::new(&schema(&live.study), &options));
        let generator = arrow_ipc::writer::IpcDataGenerator::default();
        let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
        let mut context = arrow_ipc::writer::IpcWriteContext::default();
        let windows = live_batches(events, self.closing.subscribe()).map(move |b| {
            let b = b.map_err(Status::from)?;
            let (_, encoded) = generator
                .encode(&b, &mut tracker, &options, &mut context)
                .map_err(|e| Status::internal(e.to_string()))?;
            let data = FlightData::from(encoded);
            meter.live.meter(
                &meter.researcher,
                &ReaderUsage {
                    batches: 1,
                    rows: b.num_rows() as u64,
                    bytes: (data.data_header.len() + data.data_body.len()) as u64,
                    ..Default::default()
                },
            );
            Ok(data)
        });
        Ok(Response::new(
            stream::iter([Ok(first)]).chain(windows).boxed(),
        ))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("studies are read-only"))
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented("no actions"))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(stream::empty().boxed()))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("studies are read-only"))
    }
}

/// Replays the windows released in the ticket's range from the release
/// log: the study's schema, then each batch's IPC message as written,
/// read as it is sent (a bounded channel from a blocking reader).
fn replay(
    live: &Live,
    ticket: &TicketRequest,
    meter: Arc<Meter>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<'static, Result<FlightData, Status>> {
    let (from, to) = (
        ticket.from_ms.unwrap_or(0),
        ticket.to_ms.unwrap_or(u64::MAX),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<FlightData, Status>>(8);
    let options = arrow_ipc::writer::IpcWriteOptions::default();
    let first = FlightData::from(SchemaAsIpc::new(&schema(&live.study), &options));
    let dir = live.releases_dir();
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(Ok(first)).is_err() {
            return;
        }
        // Metered once at the end: the meter's locks stay off the path
        // of every batch.
        let mut read_so_far = ReaderUsage::default();
        let read = for_each_raw_release(&dir, from, to, |b| {
            read_so_far.batches += 1;
            read_so_far.rows += b.rows;
            read_so_far.bytes += (b.header.len() + b.body.len()) as u64;
            let data = FlightData {
                data_header: b.header,
                data_body: b.body,
                ..Default::default()
            };
            tx.blocking_send(Ok(data)).is_ok()
        });
        meter.live.meter(&meter.researcher, &read_so_far);
        if let Err(e) = read {
            let _ = tx.blocking_send(Err(Status::internal(format!(
                "reading the release log: {e}"
            ))));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .take_until(async move {
            let _ = closing.wait_for(|c| *c).await;
        })
        .boxed()
}

/// Saves a stream's usage when it ends, however it ends.
struct Meter {
    live: Arc<Live>,
    researcher: String,
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.live.save_usage();
    }
}

fn new_token() -> String {
    use ring::rand::SecureRandom as _;
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .expect("system random source");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves the service on `listener` until `shutdown` resolves.
pub async fn serve(
    service: ResearchFlight,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let closing = service.closing.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = closing.send(true);
    };
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
