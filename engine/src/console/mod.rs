//! The web console's server side (docs/console.md): sign-in and sessions,
//! what each session may see, the JSON and Server-Sent Events API the
//! React app in `console/` reads, and the app's built files.
//!
//! It owns authorisation for the console: every call is checked here
//! against the session's role (clinician: the units they cover, and the
//! patients a consent or break-glass access names them for;
//! administrator: everything; patient: their own data). It does not own
//! the data: the live board ([`crate::board`]), the alert hub, the store,
//! the consent book and the audit trail are read where they live, and
//! alert commands go to the dataflow like those of the alert API.

mod access;
mod assets;
mod mine;
mod sessions;
mod stream;
mod trend;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ntex::web::{self, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use wardflow_ingest::census::{Admission, CensusWatcher};
use wardflow_ingest::feeds::{AlertAction, AlertHub, Commands};
use wardflow_ingest::registry::RegistryWatcher;
use wardflow_model::{Metric, now_ns};
use wardflow_rules::Priority;

use crate::api::error;
use crate::board::{Board, Tile};
use crate::config::Config;
use crate::ledger::LedgerEvent;

pub use access::AccessView;
pub use sessions::{Role, Session};

/// A vital older than this is shown as stale.
const STALE_NS: i64 = 60_000_000_000;
/// A device not heard from for this long is offline.
const OFFLINE_NS: i64 = 30_000_000_000;
/// The vitals a tile shows, by the names the app uses.
const TILE_METRICS: [(&str, Metric); 6] = [
    ("hr", Metric::Hr),
    ("spo2", Metric::Spo2),
    ("rr", Metric::Rr),
    ("sbp", Metric::Sbp),
    ("dbp", Metric::Dbp),
    ("temp", Metric::Temp),
];

/// What the console's handlers share.
pub struct Console {
    pub census: Arc<CensusWatcher>,
    pub registry: Arc<RegistryWatcher>,
    pub hub: Arc<AlertHub>,
    pub board: Arc<Board>,
    pub commands: Commands,
    pub access: Arc<AccessView>,
    pub config: Config,
    pub keys: Option<Arc<wardflow_storage::seal::Keyring>>,
    /// Where views of a patient's data are recorded (audit trail); none
    /// when the ledger is off.
    pub events: Option<crossbeam_channel::Sender<LedgerEvent>>,
    sessions: sessions::Sessions,
    assets: PathBuf,
}

/// Why a session may see a patient.
#[derive(Debug, Clone, PartialEq)]
pub enum Via {
    /// The patient lies in a unit the clinician covers.
    Unit,
    /// A consent (or break-glass access) names the clinician.
    Access(wardflow_ledger_bridge::consent::Access),
    Own,
    Admin,
}

impl Via {
    /// Whether the patient's data of `category` is shown (an access names
    /// the categories it covers).
    pub fn shows(&self, category: &str) -> bool {
        match self {
            Via::Access(a) => wardflow_ledger_bridge::consent::covers(&a.scope, category),
            _ => true,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Via::Unit => "unit",
            Via::Access(a) if a.purpose == "emergency" => "emergency",
            Via::Access(_) => "consent",
            Via::Own => "own",
            Via::Admin => "admin",
        }
    }

    /// The purpose the audit trail records for a view.
    fn purpose(&self) -> &str {
        match self {
            Via::Unit => "treatment",
            Via::Access(a) => &a.purpose,
            Via::Own => "patient-request",
            Via::Admin => "administration",
        }
    }
}

impl Console {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        census: Arc<CensusWatcher>,
        registry: Arc<RegistryWatcher>,
        hub: Arc<AlertHub>,
        board: Arc<Board>,
        commands: Commands,
        access: Arc<AccessView>,
        keys: Option<Arc<wardflow_storage::seal::Keyring>>,
        events: Option<crossbeam_channel::Sender<LedgerEvent>>,
    ) -> Console {
        let assets = config.console_dir();
        if !assets.join("index.html").is_file() {
            tracing::warn!(
                dir = %assets.display(),
                "the web console is not built: its page says how (cd console && npm ci && npm run build)"
            );
        }
        Console {
            census,
            registry,
            hub,
            board,
            commands,
            access,
            config: config.clone(),
            keys,
            events,
            sessions: sessions::Sessions::default(),
            assets,
        }
    }

    /// Why `s` may see `patient` now, if it may.
    pub fn may_see(&self, s: &Session, patient: &str) -> Option<Via> {
        match s.role {
            Role::Admin => Some(Via::Admin),
            Role::Patient => (s.id == patient).then_some(Via::Own),
            Role::Clinician => {
                let census = self.census.patients.snapshot();
                let units = self.census.units_of(&s.id);
                if census.get(patient).is_some_and(|a| units.contains(&a.unit)) {
                    return Some(Via::Unit);
                }
                let now_ms = (now_ns() / 1_000_000) as u64;
                self.access
                    .for_clinician(patient, &s.id, now_ms)
                    .map(Via::Access)
            }
        }
    }

    /// Every admitted patient `s` may see now, with why.
    pub fn visible(&self, s: &Session) -> Vec<(Admission, Via)> {
        let census = self.census.patients.snapshot();
        match s.role {
            Role::Admin => census
                .patients
                .values()
                .map(|a| (a.clone(), Via::Admin))
                .collect(),
            Role::Patient => census
                .get(&s.id)
                .map(|a| (a.clone(), Via::Own))
                .into_iter()
                .collect(),
            Role::Clinician => {
                let units = self.census.units_of(&s.id);
                let mut v: Vec<(Admission, Via)> = census
                    .patients
                    .values()
                    .filter(|a| units.contains(&a.unit))
                    .map(|a| (a.clone(), Via::Unit))
                    .collect();
                let now_ms = (now_ns() / 1_000_000) as u64;
                for p in self.access.patients_of(&s.id, now_ms) {
                    if let Some(a) = census.get(&p)
                        && !units.contains(&a.unit)
                        && let Some(access) = self.access.for_clinician(&p, &s.id, now_ms)
                    {
                        v.push((a.clone(), Via::Access(access)));
                    }
                }
                v
            }
        }
    }

    /// The units whose alerts `s` follows ("*": all).
    fn alert_units(&self, s: &Session) -> Vec<String> {
        match s.role {
            Role::Admin => vec![ALL_UNITS.into()],
            Role::Clinician => self.census.units_of(&s.id),
            Role::Patient => Vec::new(),
        }
    }

    /// Records a view of a patient's data in the audit trail.
    fn record_view(&self, s: &Session, patient: &str, via: &Via, action: &str, detail: &str) {
        if s.role == Role::Patient {
            return; // a patient looking at their own data
        }
        let Some(events) = &self.events else {
            return;
        };
        let detail = match via {
            Via::Access(a) => format!("{detail} under consent {}", a.version),
            _ => detail.to_string(),
        };
        let access = wardflow_ledger_bridge::events::AccessRequest::new(
            now_ns(),
            patient,
            &s.actor(),
            action,
            via.purpose(),
            &detail,
        );
        let _ = events.send(LedgerEvent::Access(access));
    }

    /// Who the alert hub delivers to for `s`: a clinician by id (as on
    /// the other feeds), anyone else by `role/id` ('/' is in no id, so no
    /// clinician can pass for one).
    fn reader(&self, s: &Session) -> String {
        match s.role {
            Role::Clinician => s.id.clone(),
            Role::Admin => format!("admin/{}", s.id),
            Role::Patient => format!("patient/{}", s.id),
        }
    }

    /// The session of a request's cookie, while its account exists.
    fn session(&self, req: &HttpRequest) -> Result<Arc<Session>, HttpResponse> {
        token(req)
            .and_then(|t| self.live_session(&t))
            .ok_or_else(|| error(401, "sign in first (no session, or it expired)"))
    }

    /// The session of a token if it has not expired, was not closed, and
    /// its account was not removed since (which closes it).
    fn live_session(&self, token: &str) -> Option<Arc<Session>> {
        let s = self.sessions.get(token)?;
        let exists = match s.role {
            Role::Clinician => self.census.is_clinician(&s.id),
            Role::Admin => self.census.admins.snapshot().admins.contains_key(&s.id),
            Role::Patient => true, // their key stays theirs
        };
        if !exists {
            self.sessions.close(token);
            return None;
        }
        Some(s)
    }
}

/// The subscription unit that follows every unit (administrators).
pub use wardflow_ingest::feeds::ALL_UNITS;

/// The session token of a request's cookie.
fn token(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get("cookie")?.to_str().ok()?;
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == sessions::COOKIE).then(|| v.to_string())
    })
}

/// Changes must be JSON: a cross-site form cannot send that without the
/// browser asking the server first (CORS), which it never allows.
fn json_request(req: &HttpRequest) -> Result<(), HttpResponse> {
    let ok = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if ok {
        Ok(())
    } else {
        Err(error(415, "send Content-Type: application/json"))
    }
}

fn ok_json(v: impl serde::Serialize) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .header("cache-control", "no-store")
        .body(serde_json::to_vec(&v).unwrap_or_default())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/console/challenge", web::get().to(challenge))
        .route("/v1/console/login", web::post().to(login))
        .route("/v1/console/logout", web::post().to(logout))
        .route("/v1/console/me", web::get().to(me))
        .route("/v1/console/stream", web::get().to(stream::stream))
        .route("/v1/console/tiles", web::get().to(tiles))
        .route("/v1/console/alerts", web::get().to(alerts))
        .route("/v1/console/alerts/{id}/ack", web::post().to(ack))
        .route("/v1/console/alerts/{id}/silence", web::post().to(silence))
        .route(
            "/v1/console/patients/{patient}/trend",
            web::get().to(trend::trend),
        )
        .route("/v1/console/devices", web::get().to(devices))
        .route("/v1/console/me/consents", web::get().to(mine::consents))
        .route(
            "/v1/console/me/consents/prepare",
            web::post().to(mine::prepare),
        )
        .route("/v1/console/me/consents", web::post().to(mine::submit))
        .route("/v1/console/me/access", web::get().to(mine::access_log))
        .route("/", web::get().to(assets::index))
        .route("/{file}*", web::get().to(assets::file));
}

type State = web::types::State<Arc<Console>>;

#[derive(Deserialize)]
struct ChallengeQuery {
    patient: String,
}

async fn challenge(console: State, q: web::types::Query<ChallengeQuery>) -> HttpResponse {
    if wardflow_model::PatientId::new(&q.patient).is_err() {
        return error(400, "not a patient id");
    }
    ok_json(json!({ "challenge": console.sessions.challenge(&q.patient) }))
}

#[derive(Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum Login {
    Clinician {
        id: String,
        secret: String,
    },
    Admin {
        id: String,
        secret: String,
    },
    Patient {
        patient: String,
        #[serde(default)]
        challenge: Option<String>,
        #[serde(default)]
        signature: Option<String>,
        #[serde(default)]
        token: Option<String>,
    },
}

impl Login {
    fn id_is_valid(&self) -> Result<(), wardflow_model::IdError> {
        match self {
            Login::Clinician { id, .. } | Login::Admin { id, .. } => {
                wardflow_model::PatientId::new(id).map(|_| ())
            }
            Login::Patient { patient, .. } => wardflow_model::PatientId::new(patient).map(|_| ()),
        }
    }

    /// The account a sign-in is for (failures are counted per account).
    fn account(&self) -> String {
        match self {
            Login::Clinician { id, .. } => format!("clinician:{id}"),
            Login::Admin { id, .. } => format!("admin:{id}"),
            Login::Patient { patient, .. } => format!("patient:{patient}"),
        }
    }
}

fn me_json(s: &Session, console: &Console) -> serde_json::Value {
    json!({
        "role": s.role,
        "id": s.id,
        "units": if s.role == Role::Clinician { console.census.units_of(&s.id) } else { Vec::new() },
        "patient": s.patient(),
    })
}

async fn login(console: State, req: HttpRequest, body: ntex::util::Bytes) -> HttpResponse {
    if let Err(r) = json_request(&req) {
        return r;
    }
    let login: Login = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => return error(400, &format!("not a sign-in request: {e}")),
    };
    let account = login.account();
    if login.id_is_valid().is_err() {
        // Not an id at all: nothing to count failures against.
        return error(401, "wrong id, secret, key or token");
    }
    if !console.sessions.may_try(&account) {
        return error(
            429,
            "too many failed sign-ins for this account: wait a minute and try again",
        );
    }
    let c = console.get_ref().clone();
    // Key derivation and signature checks take milliseconds: off the I/O thread.
    let who = ntex::rt::spawn_blocking(move || check_login(&c, login))
        .await
        .ok()
        .flatten();
    let Some((role, id)) = who else {
        console.sessions.failed(&account);
        tracing::info!(%account, "console sign-in refused");
        return error(401, "wrong id, secret, key or token");
    };
    console.sessions.succeeded(&account);
    let (token, session) = console.sessions.open(role, &id);
    HttpResponse::Ok()
        .content_type("application/json")
        .header("cache-control", "no-store")
        .header(
            "set-cookie",
            format!(
                "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                sessions::COOKIE,
                sessions::SESSION_TTL.as_secs()
            ),
        )
        .body(me_json(&session, &console).to_string())
}

/// Who a sign-in request proves to be.
fn check_login(console: &Console, login: Login) -> Option<(Role, String)> {
    match login {
        Login::Clinician { id, secret } => console
            .census
            .authenticate(&id, secret.as_bytes())
            .map(|c| (Role::Clinician, c.id)),
        Login::Admin { id, secret } => console
            .census
            .authenticate_admin(&id, secret.as_bytes())
            .map(|a| (Role::Admin, a.id)),
        Login::Patient {
            patient,
            challenge,
            signature,
            token,
        } => {
            let ledger = console.config.ledger_dir();
            let good = match (challenge, signature, token) {
                (_, _, Some(token)) => {
                    crate::emergency::check_login(&ledger, &patient, token.as_bytes())
                }
                (Some(challenge), Some(signature), None) => {
                    // Taken first: a challenge is good for one attempt.
                    console.sessions.take_challenge(&challenge, &patient)
                        && mine::signed_by_patient(
                            &ledger,
                            &patient,
                            challenge.as_bytes(),
                            &signature,
                        )
                        .is_ok()
                }
                _ => false,
            };
            good.then_some((Role::Patient, patient))
        }
    }
}

async fn logout(console: State, req: HttpRequest) -> HttpResponse {
    if let Some(t) = token(&req) {
        console.sessions.close(&t);
    }
    HttpResponse::Ok()
        .content_type("application/json")
        .header(
            "set-cookie",
            format!(
                "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                sessions::COOKIE
            ),
        )
        .body("{}")
}

async fn me(console: State, req: HttpRequest) -> HttpResponse {
    match console.session(&req) {
        Ok(s) => ok_json(me_json(&s, &console)),
        Err(r) => r,
    }
}

/// The open alerts' highest unacknowledged priority per patient.
fn alarms(hub: &AlertHub) -> HashMap<String, Priority> {
    let mut m: HashMap<String, Priority> = HashMap::new();
    for item in hub.open_alerts(None) {
        let Some(p) = &item.patient else { continue };
        let Ok(a) = serde_json::from_slice::<wardflow_rules::alarm::Alert>(&item.json) else {
            continue;
        };
        use wardflow_rules::alarm::AlertState;
        // Silencing pauses the sound only: the alarm stays visible until
        // acknowledged (IEC 60601-1-8 audio paused, visual signal kept).
        if matches!(
            a.state,
            AlertState::Active | AlertState::Escalated | AlertState::Silenced
        ) {
            let e = m.entry(p.clone()).or_insert(a.priority);
            *e = (*e).max(a.priority);
        }
    }
    m
}

/// A tile as the app reads it, and a key that changes whenever what it
/// shows changes.
fn tile_json(
    adm: &Admission,
    tile: Option<&Tile>,
    alarm: Option<Priority>,
    via: &Via,
    now: i64,
) -> (serde_json::Value, u64) {
    use std::hash::{Hash, Hasher};
    let mut key = std::collections::hash_map::DefaultHasher::new();
    let mut values = serde_json::Map::new();
    let mut devices = Vec::new();
    let mut offline = true;
    if let Some(t) = tile {
        t.version.hash(&mut key);
        for (name, m) in TILE_METRICS {
            if let Some(v) = t.values[m as usize] {
                let stale = now - v.t_ns > STALE_NS;
                stale.hash(&mut key);
                values.insert(
                    name.into(),
                    json!({ "v": v.v, "t": v.t_ns / 1_000_000, "stale": stale }),
                );
            }
        }
        devices = t.devices.iter().map(|(d, _)| d.clone()).collect();
        offline = t.last_heard_ns().is_none_or(|h| now - h > OFFLINE_NS);
    }
    let news2 = tile
        .and_then(|t| t.news2)
        .map(|n| json!({ "score": n.score, "risk": n.risk, "t": n.t_ns / 1_000_000 }));
    let alarm = alarm.filter(|_| via.shows("alerts"));
    (offline, alarm, via.name(), &adm.unit, &adm.bed).hash(&mut key);
    let v = json!({
        "patient": adm.patient.as_str(),
        "unit": adm.unit,
        "bed": adm.bed,
        "devices": devices,
        "values": values,
        "news2": news2,
        "offline": offline,
        "alarm": alarm,
        "via": via.name(),
    });
    (v, key.finish())
}

async fn tiles(console: State, req: HttpRequest) -> HttpResponse {
    let s = match console.session(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let alarms = alarms(&console.hub);
    let now = now_ns();
    let out: Vec<serde_json::Value> = console
        .visible(&s)
        .iter()
        .map(|(adm, via)| {
            console.record_view(
                &s,
                adm.patient.as_str(),
                via,
                "view",
                "console: latest vitals",
            );
            let tile = console.board.tile(adm.patient.as_str());
            tile_json(
                adm,
                tile.as_ref(),
                alarms.get(adm.patient.as_str()).copied(),
                via,
                now,
            )
            .0
        })
        .collect();
    ok_json(out)
}

/// Whether `s` may see (and act on) an alert of `unit`.
fn covers_unit(console: &Console, s: &Session, unit: &str) -> bool {
    match s.role {
        Role::Admin => true,
        Role::Clinician => console.census.units_of(&s.id).iter().any(|u| u == unit),
        Role::Patient => false,
    }
}

async fn alerts(console: State, req: HttpRequest) -> HttpResponse {
    let s = match console.session(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // Patients outside the clinician's units whose access covers alerts.
    let granted: HashMap<String, Via> = console
        .visible(&s)
        .into_iter()
        .filter(|(_, via)| matches!(via, Via::Access(_)) && via.shows("alerts"))
        .map(|(adm, via)| (adm.patient.as_str().to_string(), via))
        .collect();
    let mut body = Vec::from(&b"["[..]);
    let mut first = true;
    for a in console.hub.open_alerts(None) {
        let under = a.patient.as_ref().and_then(|p| granted.get(p));
        if !covers_unit(&console, &s, &a.unit) && under.is_none() {
            continue;
        }
        if !first {
            body.push(b',');
        }
        first = false;
        body.extend_from_slice(&a.json);
        match (under, &a.patient) {
            (Some(via), Some(p)) => console.record_view(
                &s,
                p,
                via,
                "alert-delivery",
                &format!("alert {} transition {}", a.id, a.seq),
            ),
            _ => console.hub.delivered(&a, &console.reader(&s)),
        }
    }
    body.push(b']');
    HttpResponse::Ok()
        .content_type("application/json")
        .header("cache-control", "no-store")
        .body(body)
}

async fn ack(console: State, req: HttpRequest, id: web::types::Path<String>) -> HttpResponse {
    act(&console, &req, &id, AlertAction::Acknowledge).await
}

#[derive(Deserialize)]
struct SilenceQuery {
    seconds: Option<i64>,
}

async fn silence(
    console: State,
    req: HttpRequest,
    id: web::types::Path<String>,
    q: web::types::Query<SilenceQuery>,
) -> HttpResponse {
    let for_ns = q.seconds.unwrap_or(120).saturating_mul(1_000_000_000);
    act(&console, &req, &id, AlertAction::Silence { for_ns }).await
}

async fn act(console: &Console, req: &HttpRequest, id: &str, action: AlertAction) -> HttpResponse {
    if let Err(r) = json_request(req) {
        return r;
    }
    let s = match console.session(req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if s.role == Role::Patient {
        return error(403, "patients do not acknowledge alarms");
    }
    crate::api::act_as(
        &console.hub,
        &console.commands,
        &console.reader(&s),
        |unit| covers_unit(console, &s, unit),
        id,
        action,
    )
    .await
}

/// The devices `s` may see, with their contact.
fn device_rows(console: &Console, s: &Session) -> Vec<serde_json::Value> {
    if s.role == Role::Patient {
        return Vec::new();
    }
    let registry = console.registry.snapshot();
    let census = console.census.patients.snapshot();
    let stats = console.board.devices();
    let units = console.census.units_of(&s.id);
    let now = now_ns();
    let mut rows = Vec::new();
    for d in registry.devices() {
        let patient = d.patient.as_ref().map(|p| p.as_str());
        let adm = patient.and_then(|p| census.get(p));
        if s.role == Role::Clinician && !adm.is_some_and(|a| units.contains(&a.unit)) {
            continue;
        }
        let stat = stats.get(d.id.as_str());
        let last = stat.and_then(|st| st.last_seen_ns);
        let status = match (patient, last) {
            (None, _) => "unbound",
            (_, None) => "never-seen",
            (_, Some(t)) if now - t > OFFLINE_NS => "offline",
            _ => "online",
        };
        rows.push(json!({
            "device": d.id.as_str(),
            "patient": patient,
            "unit": adm.map(|a| a.unit.as_str()),
            "bed": adm.map(|a| a.bed.as_str()),
            "status": status,
            "last_seen": last.map(|t| t / 1_000_000),
            "rate": stat.map_or(0, |st| st.rate_per_minute(now)),
            "gaps": stat.map_or(0, |st| st.gaps),
            "dead_letters": stat.map_or(0, |st| st.dead_letters),
            "last_dead_reason": stat.and_then(|st| st.last_dead_reason),
        }));
    }
    rows
}

async fn devices(console: State, req: HttpRequest) -> HttpResponse {
    match console.session(&req) {
        Ok(s) if s.role == Role::Patient => {
            error(403, "devices are for clinicians and administrators")
        }
        Ok(s) => ok_json(device_rows(&console, &s)),
        Err(r) => r,
    }
}
