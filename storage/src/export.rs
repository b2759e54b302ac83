//! A patient's data for the patient and for analysts: a FHIR R4 Bundle, or
//! CSV and Parquet tables.
//!
//! Pure functions over rows the caller gathered: readings as the store
//! returns them ([`StoredReading`]), the patient's alerts ([`AlertRow`]) and
//! the accesses to the patient's data with their proof status
//! ([`AccessRow`]). Reading the alert log and the audit trail belongs to the
//! engine; this module only converts. The mapping is documented in
//! `docs/export.md`.
//!
//! FHIR (HL7 FHIR R4, 4.0.1):
//! - the Bundle is a `collection` (FHIR R4 bundle.html, `Bundle.type`): a set of
//!   resources gathered for the patient, not a transaction to replay;
//! - every entry's `fullUrl` is `urn:uuid:` + the resource id, and every
//!   reference inside the Bundle is that `urn:uuid:` (FHIR R4 bundle.html,
//!   "Resolving references in Bundles"). Wardflow ids may hold `_` and `:`,
//!   which a FHIR id may not (`[A-Za-z0-9\-\.]{1,64}`), so resource ids are
//!   name-based UUIDs (RFC 9562 §5.5, version 5) of what the resource is,
//!   and the Wardflow id travels as an `identifier`: the same reading
//!   exported twice has the same id, so a receiver can deduplicate;
//! - each stored reading is one Observation following the vital-signs
//!   profile (FHIR R4 observation-vitalsigns.html), with LOINC code, UCUM unit and
//!   the reading's own time to the nanosecond;
//! - a systolic and a diastolic reading of one device at one time are also
//!   grouped into a blood-pressure panel (LOINC 85354-9, profile `bp`);
//! - alerts are DetectedIssues, accesses AuditEvents (see `detected_issue`
//!   and `audit_event` below for why these resources).
//!
//! Whole values for tests and small exports ([`fhir_bundle`], [`tables`]);
//! chunk by chunk for any length ([`FhirWriter`], [`TableFile`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, StringArray, TimestampNanosecondArray};
use arrow::array::{UInt8Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};
use wardflow_model::{Metric, Quality, TimestampNs, Unit};

use crate::StorageError;
use crate::query::StoredReading;

/// Base of the URIs Wardflow names its own code systems, identifiers and
/// extensions under. `.invalid` (RFC 6761 §6.4) never resolves: these are
/// names, not addresses.
pub const WARDFLOW_FHIR: &str = "https://wardflow.invalid/fhir";
pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const MDC: &str = "urn:iso:std:iso:11073:10101";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const DICOM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/";
/// LOINC of the blood-pressure panel the `bp` profile requires.
pub const BP_PANEL_LOINC: &str = "85354-9";

/// An alert about the patient, as its transitions left it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub id: String,
    pub rule: String,
    pub description: String,
    /// `high`, `medium` or `low` (IEC 60601-1-8).
    pub priority: String,
    /// `active`, `acknowledged`, `silenced`, `escalated` or `resolved`.
    pub state: String,
    pub technical: bool,
    pub device: Option<String>,
    pub first_reading_ns: TimestampNs,
    pub raised_ns: TimestampNs,
    /// Time of the latest transition.
    pub updated_ns: TimestampNs,
    pub acknowledged_ns: Option<TimestampNs>,
    pub acknowledged_by: Option<String>,
    pub resolved_ns: Option<TimestampNs>,
    /// The values that fired it.
    pub values: Vec<AlertValue>,
}

/// One value that fired an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertValue {
    /// A metric name, or `news2`, `consciousness`, ...
    pub name: String,
    pub value: f64,
    pub time_ns: TimestampNs,
    pub note: Option<String>,
}

/// Where an access stands in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofStatus {
    /// Included in an anchored batch that verifies against the store.
    Proven,
    /// In an anchored batch, but its inclusion proof fails.
    NotInBatch,
    /// In an anchored batch that does not verify.
    BatchMismatch,
    /// Recorded by the engine, its batch not sealed yet.
    NotSealed,
    /// Requested by a tool, not yet recorded by the engine.
    NotRecorded,
}

impl ProofStatus {
    pub fn code(self) -> &'static str {
        match self {
            ProofStatus::Proven => "proven",
            ProofStatus::NotInBatch => "not-in-batch",
            ProofStatus::BatchMismatch => "batch-mismatch",
            ProofStatus::NotSealed => "not-sealed",
            ProofStatus::NotRecorded => "not-recorded",
        }
    }
}

/// One access to the patient's data.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRow {
    pub at_ns: TimestampNs,
    pub actor: String,
    /// `query`, `export`, `alert-delivery`, `emergency-open`, ...
    pub action: String,
    /// `treatment`, `research:<study>`, `emergency`, `patient-request`, ...
    pub purpose: String,
    pub detail: String,
    pub proof: ProofStatus,
    /// The proof in words (batch, process, block).
    pub proof_detail: String,
}

/// What the Bundle says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportMeta {
    pub patient: String,
    /// The Bundle's id: a UUID, fresh per export.
    pub bundle_id: String,
    pub generated_ns: TimestampNs,
}

/// RFC 3339 in UTC with as many fractional digits as the time needs (up to
/// nine): FHIR `dateTime` and `instant` allow any number (FHIR R4 datatypes.html).
pub fn rfc3339(ns: TimestampNs) -> String {
    match jiff::Timestamp::from_nanosecond(ns as i128) {
        Ok(t) => t.to_string(),
        Err(_) => ns.to_string(),
    }
}

/// A name-based UUID (RFC 9562 §5.5, version 5, SHA-1) in Wardflow's
/// namespace.
pub fn name_uuid(name: &str) -> String {
    // The namespace: the RFC's URL namespace UUID, 6ba7b811-9dad-11d1-80b4-00c04fd430c8.
    const NS: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x11, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&NS);
    ctx.update(WARDFLOW_FHIR.as_bytes());
    ctx.update(b"/");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// A random UUID (RFC 9562 §5.4, version 4) from 16 random bytes.
pub fn random_uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The specific vital-signs profile of a metric, where FHIR R4 has one.
fn specific_profile(metric: Metric) -> Option<&'static str> {
    match metric {
        Metric::Hr => Some("heartrate"),
        Metric::Spo2 => Some("oxygensat"),
        Metric::Rr => Some("resprate"),
        Metric::Temp => Some("bodytemp"),
        _ => None,
    }
}

/// The human unit text of `valueQuantity.unit` (the code is UCUM).
fn unit_display(metric: Option<Metric>, ucum: &str) -> &str {
    match (metric, ucum) {
        (Some(Metric::Hr | Metric::Pr), "/min") => "beats/minute",
        (Some(Metric::Rr), "/min") => "breaths/minute",
        (_, "mm[Hg]") => "mmHg",
        (_, "Cel") => "degrees C",
        (_, "[degF]") => "degrees F",
        (_, u) => u,
    }
}

/// `code.coding` of a metric: LOINC first, then IEEE 11073 MDC. The R4
/// oxygen-saturation profile fixes LOINC 2708-6 (oxygen saturation in
/// arterial blood); 59408-5 (by pulse oximetry) says how it was measured,
/// so SpO2 carries both, as US Core's pulse-oximetry profile does.
fn metric_codings(metric: Metric) -> Vec<Value> {
    let mut c = vec![json!({"system": LOINC, "code": metric.loinc(), "display": metric.label()})];
    if metric == Metric::Spo2 {
        c.push(json!({"system": LOINC, "code": "2708-6", "display": "Oxygen saturation in Arterial blood"}));
    }
    c.push(json!({"system": MDC, "code": metric.mdc_code().to_string(), "display": metric.mdc_ref_id()}));
    c
}

fn vital_signs_category() -> Value {
    json!([{
        "coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}],
        "text": "Vital Signs"
    }])
}

/// The flag names of a quality byte, in bit order.
pub fn quality_names(q: u8) -> Vec<&'static str> {
    [
        (Quality::QUESTIONABLE, "questionable"),
        (Quality::CALIBRATING, "calibrating"),
        (Quality::MANUAL, "manual"),
        (Quality::SIMULATED, "simulated"),
        (Quality::CONVERTED, "converted"),
    ]
    .into_iter()
    .filter(|(f, _)| Quality(q).contains(*f))
    .map(|(_, n)| n)
    .collect()
}

/// Interpretation of a reading the device did not vouch for: questionable
/// or taken while calibrating. FHIR R4 binds `Observation.interpretation`
/// extensibly to HL7 v3 ObservationInterpretation, which has no code for
/// "the device doubts this value", so the coding is Wardflow's own and the
/// text says it in words. `None` for a good reading.
fn doubtful(q: u8) -> Option<Value> {
    let q = Quality(q);
    let mut codings = Vec::new();
    let mut words = Vec::new();
    if q.contains(Quality::QUESTIONABLE) {
        codings.push(json!({"system": format!("{WARDFLOW_FHIR}/CodeSystem/reading-quality"), "code": "questionable", "display": "Questionable"}));
        words.push("the device marked this value questionable (motion, poor perfusion, lead off)");
    }
    if q.contains(Quality::CALIBRATING) {
        codings.push(json!({"system": format!("{WARDFLOW_FHIR}/CodeSystem/reading-quality"), "code": "calibrating", "display": "Calibrating"}));
        words.push("the device was calibrating or zeroing its transducer");
    }
    (!codings.is_empty()).then(|| json!({"coding": codings, "text": words.join("; ")}))
}

/// Marks of the quality flags on a resource (an Observation or a
/// component): interpretation, method and extension.
fn quality_marks(q: u8, into: &mut serde_json::Map<String, Value>) {
    if q == 0 {
        return;
    }
    into.insert(
        "extension".into(),
        json!([{
            "url": format!("{WARDFLOW_FHIR}/StructureDefinition/reading-quality"),
            "valueString": quality_names(q).join(" ")
        }]),
    );
    if let Some(i) = doubtful(q) {
        into.insert("interpretation".into(), json!([i]));
    }
}

struct Refs {
    /// The Patient's resource id.
    patient: String,
    /// Devices whose resource is in the Bundle.
    devices: BTreeSet<String>,
}

fn device_id(d: &str) -> String {
    name_uuid(&format!("device/{d}"))
}

impl Refs {
    fn device(&self, d: &str) -> Value {
        json!({"reference": format!("urn:uuid:{}", device_id(d)), "display": format!("Device {d}")})
    }
    fn patient(&self, p: &str) -> Value {
        json!({"reference": format!("urn:uuid:{}", self.patient), "display": format!("Patient {p}")})
    }
}

fn reading_name(r: &StoredReading) -> String {
    format!(
        "reading/{}/{}/{}/{}",
        r.device,
        r.metric,
        r.time_ns,
        r.seq.map(|s| s.to_string()).unwrap_or_default()
    )
}

fn entry(id: &str, resource: Value) -> Value {
    json!({"fullUrl": format!("urn:uuid:{id}"), "resource": resource})
}

fn observation(meta: &ExportMeta, refs: &Refs, r: &StoredReading, id: &str) -> Value {
    let metric = Metric::from_name(&r.metric);
    let ucum: &str = match Unit::parse(&r.unit) {
        Ok(u) => u.ucum(),
        Err(_) => &r.unit,
    };
    let mut o = serde_json::Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("id".into(), json!(id));
    let mut profiles = Vec::new();
    // EtCO2 is not in the vital-signs value set: it stays in the category
    // but claims no vital-signs profile.
    if metric.is_some_and(|m| m != Metric::Etco2) {
        profiles.push(format!("{PROFILE}vitalsigns"));
    }
    if let Some(p) = metric.and_then(specific_profile) {
        profiles.push(format!("{PROFILE}{p}"));
    }
    let mut m = serde_json::Map::new();
    if !profiles.is_empty() {
        m.insert("profile".into(), json!(profiles));
    }
    if Quality(r.quality).contains(Quality::SIMULATED) {
        // HL7 v3 ActReason HTEST: test health data, not a patient's.
        m.insert(
            "tag".into(),
            json!([{"system": ACT_REASON, "code": "HTEST", "display": "test health data"}]),
        );
    }
    if !m.is_empty() {
        o.insert("meta".into(), Value::Object(m));
    }
    o.insert(
        "identifier".into(),
        json!([{"system": format!("{WARDFLOW_FHIR}/reading"), "value": reading_name(r)}]),
    );
    o.insert("status".into(), json!("final"));
    o.insert("category".into(), vital_signs_category());
    o.insert(
        "code".into(),
        match metric {
            Some(m) => json!({"coding": metric_codings(m), "text": m.label()}),
            None => json!({"text": r.metric}),
        },
    );
    o.insert("subject".into(), refs.patient(&meta.patient));
    o.insert("effectiveDateTime".into(), json!(rfc3339(r.time_ns)));
    o.insert("issued".into(), json!(rfc3339(r.received_ns)));
    o.insert(
        "valueQuantity".into(),
        json!({"value": r.value, "unit": unit_display(metric, ucum), "system": UCUM, "code": ucum}),
    );
    quality_marks(r.quality, &mut o);
    if Quality(r.quality).contains(Quality::MANUAL) {
        o.insert(
            "method".into(),
            json!({"text": "entered by hand, not measured by the device"}),
        );
    }
    o.insert("device".into(), refs.device(&r.device));
    Value::Object(o)
}

/// The blood-pressure panel of a systolic and a diastolic reading (FHIR R4
/// profile `bp`: code 85354-9, components 8480-6 and 8462-4, no value).
fn bp_panel(
    meta: &ExportMeta,
    refs: &Refs,
    sys: (&StoredReading, &str),
    dia: (&StoredReading, &str),
) -> (String, Value) {
    let id = name_uuid(&format!("bp/{}", reading_name(sys.0)));
    let component = |r: &StoredReading, m: Metric| {
        let mut c = serde_json::Map::new();
        c.insert(
            "code".into(),
            json!({"coding": metric_codings(m), "text": m.label()}),
        );
        c.insert(
            "valueQuantity".into(),
            json!({"value": r.value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}),
        );
        quality_marks(r.quality, &mut c);
        Value::Object(c)
    };
    let mut o = json!({
        "resourceType": "Observation",
        "id": id,
        "meta": {"profile": [format!("{PROFILE}vitalsigns"), format!("{PROFILE}bp")]},
        "status": "final",
        "category": vital_signs_category(),
        "code": {"coding": [{"system": LOINC, "code": BP_PANEL_LOINC, "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure"},
        "subject": refs.patient(&meta.patient),
        "effectiveDateTime": rfc3339(sys.0.time_ns),
        "issued": rfc3339(sys.0.received_ns.max(dia.0.received_ns)),
        "device": refs.device(&sys.0.device),
        "derivedFrom": [
            {"reference": format!("urn:uuid:{}", sys.1)},
            {"reference": format!("urn:uuid:{}", dia.1)}
        ],
        "component": [component(sys.0, Metric::Sbp), component(dia.0, Metric::Dbp)]
    });
    if Quality(sys.0.quality | dia.0.quality).contains(Quality::SIMULATED) {
        o["meta"]["tag"] =
            json!([{"system": ACT_REASON, "code": "HTEST", "display": "test health data"}]);
    }
    (id, o)
}

/// The DetectedIssue of an alert.
///
/// Why DetectedIssue and not Flag: an alert is a clinical condition the
/// engine detected in the patient's data, with a priority and the
/// readings that fired it, acknowledged by a clinician. DetectedIssue has
/// each of these: `severity` (high | moderate | low, one to one with IEC
/// 60601-1-8's priorities), `evidence.detail` (the Observations that fired
/// it, inside this Bundle), `identified[x]` (a Period from the raise to the
/// resolution) and `mitigation` (the acknowledgement, by whom and when).
/// A Flag has a period and a status but no severity, evidence or
/// acknowledgement, and is meant as a standing warning about the patient
/// ("falls risk") rather than an event.
///
/// `status` follows the alert: `preliminary` while it is open (it may
/// still change), `final` once resolved; the alarm state itself is in an
/// extension and in `detail`.
fn detected_issue(
    meta: &ExportMeta,
    refs: &Refs,
    a: &AlertRow,
    observations: &HashMap<(String, TimestampNs), Vec<String>>,
) -> (String, Value) {
    let id = name_uuid(&format!("alert/{}", a.id));
    let severity = match a.priority.as_str() {
        "high" => "high",
        "medium" => "moderate",
        _ => "low",
    };
    let mut period = serde_json::Map::new();
    period.insert("start".into(), json!(rfc3339(a.raised_ns)));
    if let Some(r) = a.resolved_ns {
        period.insert("end".into(), json!(rfc3339(r)));
    }
    let mut evidence = Vec::new();
    let mut words = Vec::new();
    for v in &a.values {
        let mut w = format!("{} = {} at {}", v.name, v.value, rfc3339(v.time_ns));
        if let Some(n) = &v.note {
            w.push_str(&format!(" ({n})"));
        }
        match observations
            .get(&(v.name.clone(), v.time_ns))
            .filter(|ids| !ids.is_empty())
        {
            Some(ids) => evidence.push(json!({
                "detail": ids.iter().map(|i| json!({"reference": format!("urn:uuid:{i}")})).collect::<Vec<_>>()
            })),
            // A value not in this export (outside its time range, a NEWS2
            // score, a manual observation): described, not referenced.
            None => evidence.push(json!({"code": [{"text": w.clone()}]})),
        }
        words.push(w);
    }
    let mut o = serde_json::Map::new();
    o.insert("resourceType".into(), json!("DetectedIssue"));
    o.insert("id".into(), json!(id));
    o.insert(
        "extension".into(),
        json!([
            {"url": format!("{WARDFLOW_FHIR}/StructureDefinition/alert-state"), "valueCode": a.state},
            {"url": format!("{WARDFLOW_FHIR}/StructureDefinition/alert-priority"), "valueCode": a.priority}
        ]),
    );
    o.insert(
        "identifier".into(),
        json!([{"system": format!("{WARDFLOW_FHIR}/alert"), "value": a.id}]),
    );
    o.insert(
        "status".into(),
        json!(if a.state == "resolved" {
            "final"
        } else {
            "preliminary"
        }),
    );
    o.insert(
        "code".into(),
        json!({
            "coding": [{"system": format!("{WARDFLOW_FHIR}/CodeSystem/alert-rule"), "code": a.rule, "display": a.description}],
            "text": if a.technical { format!("technical alarm: {}", a.description) } else { a.description.clone() }
        }),
    );
    o.insert("severity".into(), json!(severity));
    o.insert("patient".into(), refs.patient(&meta.patient));
    o.insert("identifiedPeriod".into(), Value::Object(period));
    if let Some(d) = a.device.as_deref().filter(|d| refs.devices.contains(*d)) {
        o.insert("author".into(), refs.device(d));
    }
    if !evidence.is_empty() {
        o.insert("evidence".into(), json!(evidence));
    }
    o.insert(
        "detail".into(),
        json!(format!(
            "{} alert {} ({} priority), first reading {}, state {} at {}{}",
            a.rule,
            a.id,
            a.priority,
            rfc3339(a.first_reading_ns),
            a.state,
            rfc3339(a.updated_ns),
            if words.is_empty() {
                String::new()
            } else {
                format!("; values: {}", words.join(", "))
            }
        )),
    );
    if let Some(at) = a.acknowledged_ns {
        let mut m = json!({"action": {"text": "acknowledged"}, "date": rfc3339(at)});
        if let Some(by) = &a.acknowledged_by {
            m["author"] = json!({"display": by});
        }
        o.insert("mitigation".into(), json!([m]));
    }
    (id, Value::Object(o))
}

/// HL7 v3 ActReason of a Wardflow purpose, where one fits.
fn purpose_of_use(purpose: &str) -> Value {
    let code = match purpose.split(':').next().unwrap_or_default() {
        "treatment" => Some(("TREAT", "treatment")),
        "emergency" => Some(("ETREAT", "Emergency Treatment")),
        "research" => Some(("HRESCH", "healthcare research")),
        "patient-request" | "patient" => Some(("PATRQT", "patient requested")),
        _ => None,
    };
    match code {
        Some((c, d)) => {
            json!({"coding": [{"system": ACT_REASON, "code": c, "display": d}], "text": purpose})
        }
        None => json!({"text": purpose}),
    }
}

/// The AuditEvent of an access (FHIR R4 AuditEvent, following the DICOM
/// audit vocabulary it binds `type` to): who (`agent`), why
/// (`purposeOfEvent`), when (`recorded`), what (`entity`: the patient,
/// with the access's detail and its proof status in the audit trail as
/// `entity.detail`).
fn audit_event(meta: &ExportMeta, refs: &Refs, a: &AccessRow) -> (String, Value) {
    let id = name_uuid(&format!(
        "access/{}/{}/{}/{}",
        a.at_ns, a.actor, a.action, a.detail
    ));
    let (code, display) = match a.action.as_str() {
        "query" => ("110112", "Query"),
        "export" => ("110106", "Export"),
        _ => ("110110", "Patient Record"),
    };
    let o = json!({
        "resourceType": "AuditEvent",
        "id": id,
        "type": {"system": DICOM, "code": code, "display": display},
        "subtype": [{"system": format!("{WARDFLOW_FHIR}/CodeSystem/access-action"), "code": a.action, "display": a.action}],
        "action": if a.action == "emergency-open" { "E" } else { "R" },
        "recorded": rfc3339(a.at_ns),
        "outcome": "0",
        "purposeOfEvent": [purpose_of_use(&a.purpose)],
        "agent": [{
            "who": {"identifier": {"system": format!("{WARDFLOW_FHIR}/actor"), "value": a.actor}, "display": a.actor},
            "requestor": true
        }],
        "source": {"observer": {"display": "Wardflow"}},
        "entity": [{
            "what": refs.patient(&meta.patient),
            "detail": [
                {"type": "detail", "valueString": a.detail},
                {"type": "proof-status", "valueString": a.proof.code()},
                {"type": "proof", "valueString": a.proof_detail}
            ]
        }]
    });
    (id, o)
}

/// Builds a patient's Bundle entry by entry, so that an export of any
/// length needs memory for one chunk of readings at a time. Entries: the
/// Patient; for each chunk of readings, the Device of each device not seen
/// before, an Observation per reading and the blood-pressure panels; then
/// a DetectedIssue per alert and an AuditEvent per access.
pub struct BundleBuilder {
    meta: ExportMeta,
    refs: Refs,
    /// (metric, time) of each alert's values -> the Observations holding them.
    evidence: HashMap<(String, TimestampNs), Vec<String>>,
}

impl BundleBuilder {
    /// A builder for `meta`'s patient; `alerts` says which readings are
    /// evidence to remember.
    pub fn new(meta: ExportMeta, alerts: &[AlertRow]) -> Self {
        let refs = Refs {
            patient: name_uuid(&format!("patient/{}", meta.patient)),
            devices: BTreeSet::new(),
        };
        let evidence = alerts
            .iter()
            .flat_map(|a| &a.values)
            .map(|v| ((v.name.clone(), v.time_ns), Vec::new()))
            .collect();
        BundleBuilder {
            meta,
            refs,
            evidence,
        }
    }

    /// The Bundle without its entries.
    pub fn head(&self) -> Value {
        let m = &self.meta;
        json!({
            "resourceType": "Bundle",
            "id": m.bundle_id,
            "meta": {"lastUpdated": rfc3339(m.generated_ns)},
            "identifier": {"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", m.bundle_id)},
            "type": "collection",
            "timestamp": rfc3339(m.generated_ns)
        })
    }

    /// The Patient's entry.
    pub fn patient_entry(&self) -> Value {
        entry(
            &self.refs.patient,
            json!({
                "resourceType": "Patient",
                "id": self.refs.patient,
                "identifier": [{"system": format!("{WARDFLOW_FHIR}/patient"), "value": self.meta.patient}]
            }),
        )
    }

    /// The entries of a chunk of readings. A systolic and a diastolic
    /// reading of one time are paired when they are in the same chunk (a
    /// chunk that ends inside a time pairs none there: chunks by hour, as
    /// the store partitions, never do).
    pub fn reading_entries(&mut self, readings: &[StoredReading]) -> Vec<Value> {
        let mut entries = Vec::with_capacity(readings.len() + readings.len() / 4);
        let ids: Vec<String> = readings
            .iter()
            .map(|r| name_uuid(&reading_name(r)))
            .collect();
        // (time, device) -> (systolic, diastolic) reading index.
        type Pair = (Option<usize>, Option<usize>);
        let mut bp: BTreeMap<(TimestampNs, &str), Pair> = BTreeMap::new();
        for (i, r) in readings.iter().enumerate() {
            if !self.refs.devices.contains(&r.device) {
                self.refs.devices.insert(r.device.clone());
                let id = device_id(&r.device);
                entries.push(entry(
                    &id,
                    json!({
                        "resourceType": "Device",
                        "id": id,
                        "identifier": [{"system": format!("{WARDFLOW_FHIR}/device"), "value": r.device}],
                        "deviceName": [{"name": r.device, "type": "user-friendly-name"}]
                    }),
                ));
            }
            entries.push(entry(
                &ids[i],
                observation(&self.meta, &self.refs, r, &ids[i]),
            ));
            if let Some(e) = self.evidence.get_mut(&(r.metric.clone(), r.time_ns)) {
                e.push(ids[i].clone());
            }
            match Metric::from_name(&r.metric) {
                Some(Metric::Sbp) => bp.entry((r.time_ns, &r.device)).or_default().0 = Some(i),
                Some(Metric::Dbp) => bp.entry((r.time_ns, &r.device)).or_default().1 = Some(i),
                _ => {}
            }
        }
        for (s, d) in bp.into_values() {
            if let (Some(s), Some(d)) = (s, d) {
                let (id, o) = bp_panel(
                    &self.meta,
                    &self.refs,
                    (&readings[s], &ids[s]),
                    (&readings[d], &ids[d]),
                );
                entries.push(entry(&id, o));
            }
        }
        entries
    }

    /// The entries of the alerts and the accesses (after every reading's,
    /// so that alerts can point at them).
    pub fn closing_entries(&self, alerts: &[AlertRow], access: &[AccessRow]) -> Vec<Value> {
        let mut entries = Vec::with_capacity(alerts.len() + access.len());
        for a in alerts {
            let (id, o) = detected_issue(&self.meta, &self.refs, a, &self.evidence);
            entries.push(entry(&id, o));
        }
        for a in access {
            let (id, o) = audit_event(&self.meta, &self.refs, a);
            entries.push(entry(&id, o));
        }
        entries
    }
}

/// The FHIR R4 Bundle (type `collection`) of a patient's export, whole
/// (see [`BundleBuilder`] for the entries and [`FhirWriter`] to write one
/// chunk by chunk).
pub fn fhir_bundle(
    meta: &ExportMeta,
    readings: &[StoredReading],
    alerts: &[AlertRow],
    access: &[AccessRow],
) -> Value {
    let mut b = BundleBuilder::new(meta.clone(), alerts);
    let mut entries = vec![b.patient_entry()];
    entries.extend(b.reading_entries(readings));
    entries.extend(b.closing_entries(alerts, access));
    let mut bundle = b.head();
    bundle["entry"] = Value::Array(entries);
    bundle
}

/// JSON with `resourceType` first in each resource, as FHIR's JSON
/// examples write it (readers must not depend on the order, but people
/// reading a patient's export do). Other keys stay in name order.
struct ResourceFirst<'a>(&'a Value);

impl serde::Serialize for ResourceFirst<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                if let Some(t) = m.get("resourceType") {
                    map.serialize_entry("resourceType", t)?;
                }
                for (k, v) in m.iter().filter(|(k, _)| *k != "resourceType") {
                    map.serialize_entry(k, &ResourceFirst(v))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&ResourceFirst(v))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Pretty JSON text of a FHIR value, `resourceType` first, each line after
/// the first indented by `indent` spaces.
fn pretty(value: &Value, indent: usize) -> Vec<u8> {
    let text = serde_json::to_vec_pretty(&ResourceFirst(value)).expect("JSON values serialize");
    if indent == 0 {
        return text;
    }
    // JSON strings hold no raw line breaks, so every one is between tokens.
    let mut out = Vec::with_capacity(text.len() + text.len() / 8);
    for &b in &text {
        out.push(b);
        if b == b'\n' {
            out.extend(std::iter::repeat_n(b' ', indent));
        }
    }
    out
}

/// A whole value as pretty FHIR JSON text (`resourceType` first), ending
/// in a line break.
pub fn to_json_pretty(value: &Value) -> Vec<u8> {
    let mut out = pretty(value, 0);
    out.push(b'\n');
    out
}

/// Writes a Bundle as pretty JSON, chunk by chunk: with one chunk, the
/// same JSON as [`fhir_bundle`] (with `entry` last in the text).
pub struct FhirWriter<W: Write> {
    out: W,
    builder: BundleBuilder,
}

impl<W: Write> FhirWriter<W> {
    /// Writes the Bundle's head and the Patient.
    pub fn begin(mut out: W, meta: ExportMeta, alerts: &[AlertRow]) -> std::io::Result<Self> {
        let builder = BundleBuilder::new(meta, alerts);
        let head = pretty(&builder.head(), 0);
        // "{ ...fields...\n}": reopen it for the entries.
        let open = head.strip_suffix(b"\n}").expect("an object");
        out.write_all(open)?;
        out.write_all(b",\n  \"entry\": [\n    ")?;
        out.write_all(&pretty(&builder.patient_entry(), 4))?;
        Ok(FhirWriter { out, builder })
    }

    fn write_entries(&mut self, entries: &[Value]) -> std::io::Result<()> {
        for e in entries {
            self.out.write_all(b",\n    ")?;
            self.out.write_all(&pretty(e, 4))?;
        }
        Ok(())
    }

    /// Writes the entries of a chunk of readings (see
    /// [`BundleBuilder::reading_entries`]).
    pub fn readings(&mut self, readings: &[StoredReading]) -> std::io::Result<()> {
        let entries = self.builder.reading_entries(readings);
        self.write_entries(&entries)
    }

    /// Writes the alerts and accesses and closes the Bundle.
    pub fn finish(mut self, alerts: &[AlertRow], access: &[AccessRow]) -> std::io::Result<W> {
        let entries = self.builder.closing_entries(alerts, access);
        self.write_entries(&entries)?;
        self.out.write_all(b"\n  ]\n}\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

// --- tables for analysts -----------------------------------------------------

/// A column of an export table.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Nanoseconds since the epoch: Parquet `TIMESTAMP(NANOS, UTC)`, CSV
    /// RFC 3339.
    Time(Vec<Option<TimestampNs>>),
    Text(Vec<Option<String>>),
    Float(Vec<f64>),
    UInt(Vec<Option<u64>>),
    Byte(Vec<u8>),
    Bool(Vec<bool>),
}

impl Column {
    fn data_type(&self) -> DataType {
        match self {
            Column::Time(_) => DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            Column::Text(_) => DataType::Utf8,
            Column::Float(_) => DataType::Float64,
            Column::UInt(_) => DataType::UInt64,
            Column::Byte(_) => DataType::UInt8,
            Column::Bool(_) => DataType::Boolean,
        }
    }

    fn array(&self) -> ArrayRef {
        match self {
            Column::Time(v) => {
                Arc::new(TimestampNanosecondArray::from(v.clone()).with_timezone("UTC"))
            }
            Column::Text(v) => Arc::new(StringArray::from(v.clone())),
            Column::Float(v) => Arc::new(Float64Array::from(v.clone())),
            Column::UInt(v) => Arc::new(UInt64Array::from(v.clone())),
            Column::Byte(v) => Arc::new(UInt8Array::from(v.clone())),
            Column::Bool(v) => Arc::new(BooleanArray::from(v.clone())),
        }
    }

    fn cell(&self, i: usize) -> String {
        match self {
            Column::Time(v) => v[i].map(rfc3339).unwrap_or_default(),
            Column::Text(v) => v[i].clone().unwrap_or_default(),
            Column::Float(v) => v[i].to_string(),
            Column::UInt(v) => v[i].map(|x| x.to_string()).unwrap_or_default(),
            Column::Byte(v) => v[i].to_string(),
            Column::Bool(v) => v[i].to_string(),
        }
    }
}

/// One export table: `readings`, `alerts` or `access`.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: &'static str,
    pub columns: Vec<(&'static str, Column)>,
    pub rows: usize,
}

impl Table {
    pub fn record_batch(&self) -> Result<RecordBatch, StorageError> {
        RecordBatch::try_new(
            self.schema(),
            self.columns.iter().map(|(_, c)| c.array()).collect(),
        )
        .map_err(|e| StorageError::Encode(format!("{} table: {e}", self.name)))
    }

    /// The table as CSV (RFC 4180: a header line, fields quoted when they
    /// hold a comma, a quote or a line break, CRLF line ends).
    pub fn write_csv(&self, out: impl Write) -> Result<(), csv::Error> {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(out);
        w.write_record(self.columns.iter().map(|(n, _)| *n))?;
        for i in 0..self.rows {
            w.write_record(self.columns.iter().map(|(_, c)| c.cell(i)))?;
        }
        w.flush()?;
        Ok(())
    }

    fn schema(&self) -> Arc<Schema> {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|(n, c)| {
                    let nullable = matches!(c, Column::Time(_) | Column::Text(_) | Column::UInt(_));
                    Field::new(*n, c.data_type(), nullable)
                })
                .collect::<Vec<_>>(),
        ))
    }
}

/// A table's file (`{name}.csv` or `{name}.parquet`), written chunk by
/// chunk: an export of any length holds one chunk of rows at a time (and
/// Parquet one row group).
pub struct TableFile {
    path: PathBuf,
    name: &'static str,
    sink: Sink,
}

enum Sink {
    Csv(csv::Writer<BufWriter<File>>),
    Parquet(ArrowWriter<BufWriter<File>>),
}

impl TableFile {
    /// Creates `dir/{name}.csv` (or `.parquet`) for tables shaped like
    /// `template` (which may be empty), and writes the header.
    pub fn create(dir: &Path, template: &Table, parquet: bool) -> Result<Self, StorageError> {
        let ext = if parquet { "parquet" } else { "csv" };
        let path = dir.join(format!("{}.{ext}", template.name));
        let file = BufWriter::new(File::create(&path).map_err(StorageError::io(&path))?);
        let sink = if parquet {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            Sink::Parquet(
                ArrowWriter::try_new(file, template.schema(), Some(props))
                    .map_err(|e| StorageError::Encode(format!("{}: {e}", path.display())))?,
            )
        } else {
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(file);
            w.write_record(template.columns.iter().map(|(n, _)| *n))
                .map_err(|e| csv_error(&path, e))?;
            Sink::Csv(w)
        };
        Ok(TableFile {
            path,
            name: template.name,
            sink,
        })
    }

    /// Appends a chunk of rows.
    pub fn write(&mut self, t: &Table) -> Result<(), StorageError> {
        debug_assert_eq!(t.name, self.name);
        match &mut self.sink {
            Sink::Csv(w) => {
                for i in 0..t.rows {
                    w.write_record(t.columns.iter().map(|(_, c)| c.cell(i)))
                        .map_err(|e| csv_error(&self.path, e))?;
                }
            }
            Sink::Parquet(w) => {
                if t.rows > 0 {
                    w.write(&t.record_batch()?).map_err(|e| {
                        StorageError::Encode(format!("{}: {e}", self.path.display()))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Completes the file and makes it durable; returns its path.
    pub fn finish(self) -> Result<PathBuf, StorageError> {
        let path = self.path;
        let buffered = match self.sink {
            Sink::Csv(w) => w.into_inner().map_err(|e| StorageError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?,
            Sink::Parquet(w) => w
                .into_inner()
                .map_err(|e| StorageError::Encode(format!("{}: {e}", path.display())))?,
        };
        let file = buffered
            .into_inner()
            .map_err(|e| StorageError::io(&path)(e.into_error()))?;
        file.sync_all().map_err(StorageError::io(&path))?;
        Ok(path)
    }
}

fn csv_error(path: &Path, e: csv::Error) -> StorageError {
    match e.into_kind() {
        csv::ErrorKind::Io(source) => StorageError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => StorageError::Encode(format!("{}: {other:?}", path.display())),
    }
}

fn text<T>(rows: &[T], f: impl Fn(&T) -> Option<String>) -> Column {
    Column::Text(rows.iter().map(f).collect())
}

fn time<T>(rows: &[T], f: impl Fn(&T) -> Option<TimestampNs>) -> Column {
    Column::Time(rows.iter().map(f).collect())
}

/// The readings table: one row per reading, with its LOINC code and UCUM
/// unit beside Wardflow's metric name, and the quality flags in words.
pub fn readings_table(readings: &[StoredReading]) -> Table {
    let r = readings;
    let metric = |x: &StoredReading| Metric::from_name(&x.metric);
    Table {
        name: "readings",
        rows: r.len(),
        columns: vec![
            ("time", time(r, |x| Some(x.time_ns))),
            ("patient", text(r, |x| x.patient.clone())),
            ("device", text(r, |x| Some(x.device.clone()))),
            ("metric", text(r, |x| Some(x.metric.clone()))),
            ("loinc", text(r, |x| metric(x).map(|m| m.loinc().into()))),
            ("value", Column::Float(r.iter().map(|x| x.value).collect())),
            (
                "unit",
                text(r, |x| {
                    Some(Unit::parse(&x.unit).map_or(x.unit.clone(), |u| u.ucum().into()))
                }),
            ),
            ("seq", Column::UInt(r.iter().map(|x| x.seq).collect())),
            (
                "quality",
                Column::Byte(r.iter().map(|x| x.quality).collect()),
            ),
            (
                "quality_flags",
                text(r, |x| Some(quality_names(x.quality).join(" "))),
            ),
            ("received", time(r, |x| Some(x.received_ns))),
        ],
    }
}

/// The alerts table: one row per alert, as its transitions left it.
pub fn alerts_table(alerts: &[AlertRow]) -> Table {
    let a = alerts;
    Table {
        name: "alerts",
        rows: a.len(),
        columns: vec![
            ("id", text(a, |x| Some(x.id.clone()))),
            ("rule", text(a, |x| Some(x.rule.clone()))),
            ("description", text(a, |x| Some(x.description.clone()))),
            ("priority", text(a, |x| Some(x.priority.clone()))),
            ("state", text(a, |x| Some(x.state.clone()))),
            (
                "technical",
                Column::Bool(a.iter().map(|x| x.technical).collect()),
            ),
            ("device", text(a, |x| x.device.clone())),
            ("first_reading", time(a, |x| Some(x.first_reading_ns))),
            ("raised", time(a, |x| Some(x.raised_ns))),
            ("updated", time(a, |x| Some(x.updated_ns))),
            ("acknowledged", time(a, |x| x.acknowledged_ns)),
            ("acknowledged_by", text(a, |x| x.acknowledged_by.clone())),
            ("resolved", time(a, |x| x.resolved_ns)),
            (
                "values",
                text(a, |x| {
                    Some(
                        x.values
                            .iter()
                            .map(|v| format!("{}={}@{}", v.name, v.value, rfc3339(v.time_ns)))
                            .collect::<Vec<_>>()
                            .join(" "),
                    )
                }),
            ),
        ],
    }
}

/// The access table: who accessed the patient's data, when, why, and the
/// proof of it in the audit trail.
pub fn access_table(access: &[AccessRow]) -> Table {
    let a = access;
    Table {
        name: "access",
        rows: a.len(),
        columns: vec![
            ("time", time(a, |x| Some(x.at_ns))),
            ("actor", text(a, |x| Some(x.actor.clone()))),
            ("action", text(a, |x| Some(x.action.clone()))),
            ("purpose", text(a, |x| Some(x.purpose.clone()))),
            ("detail", text(a, |x| Some(x.detail.clone()))),
            ("proof_status", text(a, |x| Some(x.proof.code().into()))),
            ("proof", text(a, |x| Some(x.proof_detail.clone()))),
        ],
    }
}

/// The three tables of an export.
pub fn tables(readings: &[StoredReading], alerts: &[AlertRow], access: &[AccessRow]) -> [Table; 3] {
    [
        readings_table(readings),
        alerts_table(alerts),
        access_table(access),
    ]
}

/// Writes `readings.csv`, `alerts.csv` and `access.csv` (or `.parquet`)
/// into `dir`, creating it; returns the files written.
pub fn write_tables(
    dir: &Path,
    tables: &[Table],
    parquet: bool,
) -> Result<Vec<PathBuf>, StorageError> {
    std::fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
    let mut written = Vec::new();
    for t in tables {
        let mut f = TableFile::create(dir, t, parquet)?;
        f.write(t)?;
        written.push(f.finish()?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TimestampNs = 1_764_000_000_123_456_789;

    fn reading(metric: Metric, value: f64, time_ns: TimestampNs, quality: u8) -> StoredReading {
        StoredReading {
            time_ns,
            patient: Some("p_1:a".into()),
            device: "mon-1".into(),
            metric: metric.name().into(),
            value,
            unit: metric.canonical_unit().ucum().into(),
            seq: Some(7),
            quality,
            received_ns: time_ns + 1_000_000,
        }
    }

    fn meta() -> ExportMeta {
        ExportMeta {
            patient: "p_1:a".into(),
            bundle_id: random_uuid([7; 16]),
            generated_ns: T + 5_000_000_000,
        }
    }

    fn access() -> AccessRow {
        AccessRow {
            at_ns: T + 2_000_000_000,
            actor: "cli:ann".into(),
            action: "export".into(),
            purpose: "patient-request".into(),
            detail: "3 readings, \"all\"".into(),
            proof: ProofStatus::NotRecorded,
            proof_detail: "requested, not recorded yet".into(),
        }
    }

    fn alert() -> AlertRow {
        AlertRow {
            id: "00112233aabbccdd".into(),
            rule: "spo2-low".into(),
            description: "SpO2 below 88 %".into(),
            priority: "medium".into(),
            state: "resolved".into(),
            technical: false,
            device: Some("mon-1".into()),
            first_reading_ns: T,
            raised_ns: T + 1,
            updated_ns: T + 3,
            acknowledged_ns: Some(T + 2),
            acknowledged_by: Some("rn-a".into()),
            resolved_ns: Some(T + 3),
            values: vec![
                AlertValue {
                    name: "spo2".into(),
                    value: 84.0,
                    time_ns: T,
                    note: None,
                },
                AlertValue {
                    name: "news2".into(),
                    value: 7.0,
                    time_ns: T,
                    note: Some("assumed".into()),
                },
            ],
        }
    }

    fn resources<'a>(b: &'a Value, kind: &str) -> Vec<&'a Value> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == kind)
            .collect()
    }

    #[test]
    fn times_keep_their_nanoseconds() {
        assert_eq!(rfc3339(T), "2025-11-24T16:00:00.123456789Z");
        assert_eq!(rfc3339(1_764_000_000_000_000_000), "2025-11-24T16:00:00Z");
        assert_eq!(rfc3339(1_764_000_000_500_000_000), "2025-11-24T16:00:00.5Z");
    }

    #[test]
    fn resource_type_comes_first() {
        let b = fhir_bundle(&meta(), &[reading(Metric::Hr, 72.0, T, 0)], &[], &[]);
        let text = String::from_utf8(to_json_pretty(&b)).unwrap();
        assert!(
            text.starts_with("{\n  \"resourceType\": \"Bundle\",\n"),
            "{text}"
        );
        assert!(text.contains("\"resource\": {\n        \"resourceType\": \"Patient\","));
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn the_writer_writes_the_bundle_chunk_by_chunk() {
        let readings = vec![
            reading(Metric::Spo2, 84.0, T, 0),
            reading(Metric::Sbp, 120.0, T + 1, 0),
            reading(Metric::Dbp, 80.0, T + 1, 0),
            reading(Metric::Hr, 70.0, T + 3_600_000_000_000, 0),
        ];
        let (alerts, access) = (vec![alert()], vec![access()]);
        let whole = fhir_bundle(&meta(), &readings, &alerts, &access);
        let mut w = FhirWriter::begin(Vec::new(), meta(), &alerts).unwrap();
        w.readings(&readings).unwrap();
        let one = w.finish(&alerts, &access).unwrap();
        let text = String::from_utf8(one).unwrap();
        assert!(text.starts_with("{\n  \"resourceType\": \"Bundle\",\n"));
        assert!(text.ends_with("\n  ]\n}\n"));
        assert!(
            serde_json::from_str::<Value>(&text).unwrap() == whole,
            "one chunk: the same bundle"
        );

        let mut w = FhirWriter::begin(Vec::new(), meta(), &alerts).unwrap();
        w.readings(&readings[..3]).unwrap();
        w.readings(&readings[3..]).unwrap();
        let two: Value = serde_json::from_slice(&w.finish(&alerts, &access).unwrap()).unwrap();
        let urls = |b: &Value| -> Vec<String> {
            let mut u: Vec<String> = b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["fullUrl"].as_str().unwrap().to_string())
                .collect();
            u.sort();
            u
        };
        assert_eq!(urls(&two), urls(&whole));
        assert_eq!(
            two["entry"].as_array().unwrap().len(),
            1 + 1 + 4 + 1 + 1 + 1
        );
        // The alert found its evidence in the first chunk.
        let issue = resources(&two, "DetectedIssue")[0];
        assert!(issue["evidence"][0]["detail"][0]["reference"].is_string());
    }

    #[test]
    fn table_files_take_chunks() {
        let readings = vec![
            reading(Metric::Hr, 72.5, T, 0),
            reading(Metric::Hr, 73.5, T + 1, 0),
            reading(Metric::Hr, 74.5, T + 2, 0),
        ];
        let dir = tempfile::tempdir().unwrap();
        for parquet in [false, true] {
            let mut f = TableFile::create(dir.path(), &readings_table(&[]), parquet).unwrap();
            f.write(&readings_table(&readings[..1])).unwrap();
            f.write(&readings_table(&[])).unwrap();
            f.write(&readings_table(&readings[1..])).unwrap();
            let path = f.finish().unwrap();
            if parquet {
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                        File::open(&path).unwrap(),
                    )
                    .unwrap()
                    .build()
                    .unwrap();
                let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
                let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
                assert_eq!(all, readings_table(&readings).record_batch().unwrap());
            } else {
                let mut whole = Vec::new();
                readings_table(&readings).write_csv(&mut whole).unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), whole);
            }
        }
    }

    #[test]
    fn uuids_are_well_formed_and_name_based() {
        let a = name_uuid("patient/p-1");
        assert_eq!(a, name_uuid("patient/p-1"));
        assert_ne!(a, name_uuid("patient/p-2"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5", "version 5");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "RFC variant");
        let r = random_uuid([0xff; 16]);
        assert_eq!(r, "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn observations_carry_loinc_ucum_time_and_references() {
        let readings = vec![
            reading(Metric::Hr, 72.0, T, 0),
            reading(Metric::Spo2, 97.0, T, 0),
            reading(Metric::Rr, 16.0, T, 0),
            reading(Metric::Temp, 37.2, T, 0),
            reading(Metric::Map, 85.0, T, 0),
            reading(Metric::Etco2, 38.0, T, 0),
        ];
        let b = fhir_bundle(&meta(), &readings, &[], &[]);
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "collection");
        assert_eq!(b["timestamp"], "2025-11-24T16:00:05.123456789Z");
        assert_eq!(
            b["identifier"]["value"],
            format!("urn:uuid:{}", meta().bundle_id)
        );
        let patient = resources(&b, "Patient");
        assert_eq!(patient.len(), 1);
        assert_eq!(patient[0]["identifier"][0]["value"], "p_1:a");
        let device = resources(&b, "Device");
        assert_eq!(device.len(), 1);
        assert_eq!(device[0]["identifier"][0]["value"], "mon-1");
        // Every reference resolves to an entry's fullUrl.
        let full: BTreeSet<String> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap().to_string())
            .collect();
        for e in b["entry"].as_array().unwrap() {
            assert_eq!(
                e["fullUrl"].as_str().unwrap(),
                format!("urn:uuid:{}", e["resource"]["id"].as_str().unwrap())
            );
        }
        let obs = resources(&b, "Observation");
        assert_eq!(obs.len(), 6);
        let expect = [
            ("8867-4", "/min", "heartrate"),
            ("59408-5", "%", "oxygensat"),
            ("9279-1", "/min", "resprate"),
            ("8310-5", "Cel", "bodytemp"),
            ("8478-0", "mm[Hg]", ""),
            ("19889-5", "mm[Hg]", ""),
        ];
        for (o, (loinc, ucum, profile)) in obs.iter().zip(expect) {
            assert_eq!(o["status"], "final");
            assert_eq!(o["code"]["coding"][0]["system"], LOINC);
            assert_eq!(o["code"]["coding"][0]["code"], loinc);
            assert_eq!(o["valueQuantity"]["system"], UCUM);
            assert_eq!(o["valueQuantity"]["code"], ucum);
            assert_eq!(o["effectiveDateTime"], "2025-11-24T16:00:00.123456789Z");
            assert_eq!(o["issued"], "2025-11-24T16:00:00.124456789Z");
            assert_eq!(o["category"][0]["coding"][0]["code"], "vital-signs");
            assert!(full.contains(o["subject"]["reference"].as_str().unwrap()));
            assert!(full.contains(o["device"]["reference"].as_str().unwrap()));
            assert_eq!(
                o["subject"]["reference"],
                format!("urn:uuid:{}", patient[0]["id"].as_str().unwrap())
            );
            let profiles: Vec<&str> = o["meta"]["profile"]
                .as_array()
                .map(|p| p.iter().map(|p| p.as_str().unwrap()).collect())
                .unwrap_or_default();
            if loinc == "19889-5" {
                assert!(profiles.is_empty(), "EtCO2 claims no vital-signs profile");
            } else {
                assert_eq!(profiles[0], format!("{PROFILE}vitalsigns"));
            }
            if !profile.is_empty() {
                assert_eq!(profiles[1], format!("{PROFILE}{profile}"));
            }
            assert!(o.get("interpretation").is_none(), "good readings unmarked");
        }
        assert_eq!(obs[0]["valueQuantity"]["value"], 72.0);
        assert_eq!(obs[0]["valueQuantity"]["unit"], "beats/minute");
        assert_eq!(obs[3]["valueQuantity"]["value"], 37.2);
        // SpO2 also carries the oxygensat profile's fixed 2708-6.
        assert_eq!(obs[1]["code"]["coding"][1]["code"], "2708-6");
        // The same reading gets the same id in another export.
        let again = fhir_bundle(&meta(), &readings[..1], &[], &[]);
        assert_eq!(resources(&again, "Observation")[0]["id"], obs[0]["id"]);
    }

    #[test]
    fn systolic_and_diastolic_at_one_time_make_a_panel() {
        let readings = vec![
            reading(Metric::Dbp, 80.0, T, 0),
            reading(Metric::Sbp, 120.0, T, 0x01),
            // A lone systolic: no panel.
            reading(Metric::Sbp, 125.0, T + 1_000_000_000, 0),
        ];
        let b = fhir_bundle(&meta(), &readings, &[], &[]);
        let obs = resources(&b, "Observation");
        assert_eq!(obs.len(), 4, "three readings and one panel");
        let panel = obs[3];
        assert_eq!(panel["code"]["coding"][0]["code"], BP_PANEL_LOINC);
        assert_eq!(panel["meta"]["profile"][1], format!("{PROFILE}bp"));
        assert!(panel.get("valueQuantity").is_none());
        let c = panel["component"].as_array().unwrap();
        assert_eq!(c[0]["code"]["coding"][0]["code"], "8480-6");
        assert_eq!(c[0]["valueQuantity"]["value"], 120.0);
        assert_eq!(c[0]["valueQuantity"]["code"], "mm[Hg]");
        assert_eq!(c[1]["code"]["coding"][0]["code"], "8462-4");
        assert_eq!(c[1]["valueQuantity"]["value"], 80.0);
        // The questionable systolic is marked in the panel too.
        assert_eq!(
            c[0]["interpretation"][0]["coding"][0]["code"],
            "questionable"
        );
        assert!(c[1].get("interpretation").is_none());
        assert_eq!(
            panel["derivedFrom"][0]["reference"],
            format!("urn:uuid:{}", obs[1]["id"].as_str().unwrap())
        );
    }

    #[test]
    fn doubtful_readings_are_marked() {
        let readings = vec![
            reading(Metric::Hr, 180.0, T, 0x01),
            reading(Metric::Hr, 60.0, T + 1, 0x02 | 0x80),
            reading(Metric::Hr, 61.0, T + 2, 0x04 | 0x08),
        ];
        let b = fhir_bundle(&meta(), &readings, &[], &[]);
        let obs = resources(&b, "Observation");
        assert_eq!(
            obs[0]["interpretation"][0]["coding"][0]["code"],
            "questionable"
        );
        assert!(
            obs[0]["interpretation"][0]["text"]
                .as_str()
                .unwrap()
                .contains("questionable")
        );
        assert_eq!(obs[0]["extension"][0]["valueString"], "questionable");
        assert_eq!(
            obs[1]["interpretation"][0]["coding"][0]["code"],
            "calibrating"
        );
        assert_eq!(
            obs[1]["extension"][0]["valueString"],
            "calibrating converted"
        );
        assert!(obs[2].get("interpretation").is_none());
        assert_eq!(obs[2]["meta"]["tag"][0]["code"], "HTEST");
        assert!(obs[2]["method"]["text"].as_str().unwrap().contains("hand"));
    }

    #[test]
    fn alerts_are_detected_issues_with_evidence() {
        let readings = vec![reading(Metric::Spo2, 84.0, T, 0)];
        let b = fhir_bundle(&meta(), &readings, &[alert()], &[]);
        let obs = resources(&b, "Observation");
        let issues = resources(&b, "DetectedIssue");
        assert_eq!(issues.len(), 1);
        let i = issues[0];
        assert_eq!(i["severity"], "moderate");
        assert_eq!(i["status"], "final");
        assert_eq!(i["code"]["coding"][0]["code"], "spo2-low");
        assert_eq!(i["identifier"][0]["value"], "00112233aabbccdd");
        assert_eq!(i["identifiedPeriod"]["start"], rfc3339(T + 1));
        assert_eq!(i["identifiedPeriod"]["end"], rfc3339(T + 3));
        assert_eq!(
            i["evidence"][0]["detail"][0]["reference"],
            format!("urn:uuid:{}", obs[0]["id"].as_str().unwrap())
        );
        assert!(
            i["evidence"][1]["code"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("news2 = 7")
        );
        assert_eq!(i["mitigation"][0]["author"]["display"], "rn-a");
        assert_eq!(i["patient"]["reference"], obs[0]["subject"]["reference"]);
    }

    #[test]
    fn accesses_are_audit_events_with_their_proof() {
        let b = fhir_bundle(&meta(), &[], &[], &[access()]);
        let e = resources(&b, "AuditEvent");
        assert_eq!(e.len(), 1);
        let e = e[0];
        assert_eq!(e["type"]["code"], "110106");
        assert_eq!(e["action"], "R");
        assert_eq!(e["recorded"], rfc3339(T + 2_000_000_000));
        assert_eq!(e["purposeOfEvent"][0]["coding"][0]["code"], "PATRQT");
        assert_eq!(e["agent"][0]["who"]["display"], "cli:ann");
        assert_eq!(e["entity"][0]["detail"][1]["valueString"], "not-recorded");
        assert_eq!(
            e["entity"][0]["what"]["reference"],
            format!("urn:uuid:{}", name_uuid("patient/p_1:a"))
        );
    }

    #[test]
    fn tables_write_csv_and_parquet_alike() {
        let readings = vec![
            reading(Metric::Hr, 72.5, T, 0),
            reading(Metric::Sbp, 120.0, T, 0x81),
        ];
        let t = tables(&readings, &[alert()], &[access()]);
        let mut csv = Vec::new();
        t[0].write_csv(&mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "time,patient,device,metric,loinc,value,unit,seq,quality,quality_flags,received"
        );
        assert_eq!(
            lines[1],
            "2025-11-24T16:00:00.123456789Z,p_1:a,mon-1,hr,8867-4,72.5,/min,7,0,,2025-11-24T16:00:00.124456789Z"
        );
        assert!(lines[2].contains(",8480-6,120,mm[Hg],7,129,questionable converted,"));
        let mut csv = Vec::new();
        t[2].write_csv(&mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert!(
            csv.contains(",\"3 readings, \"\"all\"\"\",not-recorded,"),
            "{csv}"
        );

        let dir = tempfile::tempdir().unwrap();
        let files = write_tables(dir.path(), &t, true).unwrap();
        assert_eq!(
            files
                .iter()
                .map(|f| f.file_name().unwrap().to_str().unwrap())
                .collect::<Vec<_>>(),
            ["readings.parquet", "alerts.parquet", "access.parquet"]
        );
        let f = File::open(&files[0]).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(batches[0], t[0].record_batch().unwrap());
        assert_eq!(
            batches[0].schema().field(0).data_type(),
            &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
        );
        let files = write_tables(dir.path(), &t, false).unwrap();
        assert!(files[1].ends_with("alerts.csv"));
    }
}
