//! Scripted patient scenarios: who lies in which bed, how their vitals rest,
//! and what happens to them when.
//!
//! A scenario is a TOML file naming a set of patients, each with a resting
//! physiology ([`Profile`]) and a list of timed [`Event`]s: an oxygen
//! desaturation, a tachycardia, a hypotension, a slow sepsis, a sensor that
//! goes quiet, bursts of motion artefacts. [`ScenarioRun`] turns a scenario
//! into readings at 1 Hz for each monitor metric (hr, spo2, rr, sbp, dbp,
//! map, temp) in simulated time, with no clock and no network, so tests can
//! replay a day of a ward in a fraction of a second and compare the alerts
//! they get against the ground truth the run keeps: every event's onset and
//! every motion artefact's interval. `wardflow simulate --scenario FILE`
//! publishes the same readings over MQTT in real time.
//!
//! The file format:
//!
//! ```toml
//! name = "desaturation"                      # required
//! description = "One patient desaturates."   # optional
//! duration = "20m"                           # required: 90s, 10m, 1h30m, 24h
//! seed = 7                                   # optional (1): seeds patients without their own
//!
//! [[patients]]
//! id = "pt-desat-1"          # required: the patient id the device is bound to
//! device = "icu-a-bed-1"     # optional: default "{unit}-{bed}"
//! unit = "icu-a"             # optional: default "icu-a"
//! bed = "bed-1"              # optional: default "bed-N", N the patient's place in the file
//! age_years = 67             # optional
//! sex = "female"             # optional: female, male or other
//! seed = 11                  # optional: default derived from the scenario's seed
//! profile = "stable"         # optional: stable (default) or labile
//!
//! [[patients.events]]
//! kind = "desaturation"
//! onset = "60s"              # from the start of the scenario
//! ramp = "2m"
//! spo2 = 82
//! ```
//!
//! Event kinds and their fields (all but `kind` and `onset` optional, with
//! the defaults shown):
//!
//! | kind | fields |
//! | --- | --- |
//! | `desaturation` | `spo2 = 82`, `hr_rise = 15`, `rr_rise = 6`, course (`ramp = "2m"`) |
//! | `tachycardia` | `hr = 150`, course (`ramp = "1m"`) |
//! | `hypotension` | `sbp = 78`, `dbp` (falls in proportion to `sbp`), `hr_rise = 25`, course (`ramp = "3m"`) |
//! | `sepsis` | `temp = 39.3`, `hr = 125`, `rr = 26`, `sbp = 95`, `spo2 = 93`, course (`ramp = "90m"`, `shape = "logistic"`); the metrics move in turn (below) |
//! | `disconnect` | `duration` (required), `metrics = "all"` or a list such as `["spo2"]` |
//! | `artefacts` | `every = "2m"`, `min_length = "1s"`, `max_length = "3s"`, `metrics = ["spo2", "hr"]`, `spo2_range = [70, 85]`, `hr_range = [140, 170]`, `flagged = false`, `duration` (until the end) |
//!
//! A deterioration's course: its effect grows from nothing at `onset` to
//! full over `ramp` along `shape` (`linear`, or `logistic` for a slow
//! S-curve), holds, and, if `duration` is given (from onset, at least the
//! ramp), wanes again over `recovery` (default: the ramp). Targets are
//! absolute values the metric's mean reaches at full effect (the patient's
//! natural variability stays on top); `*_rise` fields are increments.
//! Effects of overlapping events add up. Sepsis staggers its metrics within
//! the ramp, as the illness does: temperature moves over the first 60 % of
//! it, heart rate over 10-70 %, breathing over 20-80 %, blood pressure over
//! 35-100 % and saturation over 40-100 %, so that NEWS2 climbs steadily
//! rather than all at once.
//!
//! Motion artefacts last whole seconds (`min_length` to `max_length`), come
//! on average once per `every` (at least 10 s apart), and replace SpO2 with
//! a value in `spo2_range` and/or the heart rate with one in `hr_range`.
//! They carry no quality flag unless `flagged = true`: they model a monitor
//! that does not mark them, so alert rules must tell them from a real event
//! by their brevity.
//!
//! The resting profiles keep every vital inside the range where each NEWS2
//! parameter (RCP 2017, Chart 1) scores 0, or now and then 1 (`labile`: 2),
//! and well clear of common alarm limits (SpO2 below 90 %, heart rate above
//! 130 or below 45, systolic pressure below 90 or above 180, respiratory
//! rate above 28 or below 8, temperature above 38.5 °C).
//!
//! Errors name the file, line, column and field:
//! `sepsis.toml:14:9: patients[0].events[1].onset: invalid duration "1x"; use e.g. "90s", "10m" or "1h30m"`.

mod run;

pub(crate) use run::PatientRun;
pub use run::{ArtefactInterval, EventOnset, ScenarioReading, ScenarioRun};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};
use wardflow_model::{DeviceId, Metric, PatientId};

use crate::physiology::MONITOR_METRICS;

/// A parsed, validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// A short name, e.g. `sepsis`.
    pub name: String,
    /// What the scenario scripts, in a sentence or two.
    pub description: String,
    /// How long the scenario runs.
    pub duration: Duration,
    /// The patients, in file order; a patient's place here is its
    /// `patient_index` in readings and ground truth.
    pub patients: Vec<PatientScript>,
}

/// One scripted patient and the bedside monitor that reports their vitals.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientScript {
    /// The patient the device is bound to.
    pub id: PatientId,
    /// The monitor's device id.
    pub device: DeviceId,
    /// Care unit, e.g. `icu-a`.
    pub unit: String,
    /// Bed within the unit, e.g. `bed-3`.
    pub bed: String,
    pub age_years: Option<u16>,
    pub sex: Option<Sex>,
    /// Seeds the patient's physiology and artefacts: the same seed gives the
    /// same readings.
    pub seed: u64,
    /// Resting physiology.
    pub profile: Profile,
    /// Scripted events, in file order.
    pub events: Vec<Event>,
}

/// Recorded sex of a patient (metadata; the physiology does not use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sex {
    Female,
    Male,
    Other,
}

/// A patient's resting physiology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A resting adult: every NEWS2 parameter scores 0, occasionally 1.
    #[default]
    Stable,
    /// Wider and faster swings of heart rate, breathing and blood pressure
    /// (pain, agitation): NEWS2 parameter scores of 1 come more often, of 2
    /// now and then; alarm limits still stay clear.
    Labile,
}

/// One scripted event of a patient.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When it starts, from the start of the scenario.
    pub onset: Duration,
    /// What happens.
    pub effect: Effect,
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        match self.effect {
            Effect::Desaturation { .. } => EventKind::Desaturation,
            Effect::Tachycardia { .. } => EventKind::Tachycardia,
            Effect::Hypotension { .. } => EventKind::Hypotension,
            Effect::Sepsis { .. } => EventKind::Sepsis,
            Effect::Disconnect { .. } => EventKind::Disconnect,
            Effect::Artefacts(_) => EventKind::Artefacts,
        }
    }

    /// When the event's effect is over, from the start of the scenario;
    /// `None` if it lasts to the end.
    pub fn end(&self) -> Option<Duration> {
        match &self.effect {
            Effect::Desaturation { course, .. }
            | Effect::Tachycardia { course, .. }
            | Effect::Hypotension { course, .. }
            | Effect::Sepsis { course, .. } => {
                course.duration.map(|d| self.onset + d + course.recovery)
            }
            Effect::Disconnect { duration, .. } => Some(self.onset + *duration),
            Effect::Artefacts(a) => a.duration.map(|d| self.onset + d),
        }
    }
}

/// The kinds of scripted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Desaturation,
    Tachycardia,
    Hypotension,
    Sepsis,
    Disconnect,
    Artefacts,
}

impl EventKind {
    /// Every kind, in documentation order.
    pub const ALL: [EventKind; 6] = [
        EventKind::Desaturation,
        EventKind::Tachycardia,
        EventKind::Hypotension,
        EventKind::Sepsis,
        EventKind::Disconnect,
        EventKind::Artefacts,
    ];

    /// The kind as written in scenario files and reports.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Desaturation => "desaturation",
            EventKind::Tachycardia => "tachycardia",
            EventKind::Hypotension => "hypotension",
            EventKind::Sepsis => "sepsis",
            EventKind::Disconnect => "disconnect",
            EventKind::Artefacts => "artefacts",
        }
    }

    /// Whether the event changes the patient's physiology (as opposed to
    /// what the monitor reports of it).
    pub fn is_deterioration(self) -> bool {
        matches!(
            self,
            EventKind::Desaturation
                | EventKind::Tachycardia
                | EventKind::Hypotension
                | EventKind::Sepsis
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an event does. Targets are in the metric's canonical unit.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// SpO2 falls to `spo2` while breathing and heart rate pick up.
    Desaturation {
        course: Course,
        /// Target SpO2, %.
        spo2: f64,
        /// Heart-rate increase at full effect, /min.
        hr_rise: f64,
        /// Respiratory-rate increase at full effect, /min.
        rr_rise: f64,
    },
    /// The heart rate climbs to `hr`.
    Tachycardia {
        course: Course,
        /// Target heart rate, /min.
        hr: f64,
    },
    /// Blood pressure falls, the heart rate rises to compensate.
    Hypotension {
        course: Course,
        /// Target systolic pressure, mmHg.
        sbp: f64,
        /// Target diastolic pressure, mmHg; `None` falls in proportion to
        /// the systolic.
        dbp: Option<f64>,
        /// Heart-rate increase at full effect, /min.
        hr_rise: f64,
    },
    /// A slow, many-sided deterioration: fever, tachycardia, tachypnoea,
    /// falling pressure and saturation, so that NEWS2 climbs.
    Sepsis {
        course: Course,
        /// Target temperature, °C.
        temp: f64,
        /// Target heart rate, /min.
        hr: f64,
        /// Target respiratory rate, /min.
        rr: f64,
        /// Target systolic pressure, mmHg (the diastolic follows in proportion).
        sbp: f64,
        /// Target SpO2, %.
        spo2: f64,
    },
    /// The listed metrics send nothing for `duration`, then resume.
    Disconnect {
        duration: Duration,
        metrics: Vec<Metric>,
    },
    /// Brief motion artefacts.
    Artefacts(Artefacts),
}

/// How a deterioration develops over time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Course {
    /// From onset to full effect.
    pub ramp: Duration,
    /// The curve the effect follows while ramping (and recovering).
    pub shape: Shape,
    /// From onset until recovery begins; `None` holds to the end.
    pub duration: Option<Duration>,
    /// From full effect back to nothing, once `duration` has passed.
    pub recovery: Duration,
}

impl Course {
    /// The effect's strength, 0 to 1, `since_onset` seconds after onset.
    pub fn level(&self, since_onset: f64) -> f64 {
        self.level_within(since_onset, 0.0, 1.0)
    }

    /// The strength of a part of the effect that develops only within a
    /// stretch of the ramp, from fraction `from` to fraction `to` of it
    /// (0 <= from < to <= 1): nothing before, full after. Sepsis staggers
    /// its metrics this way. Recovery is the same for every part.
    pub fn level_within(&self, since_onset: f64, from: f64, to: f64) -> f64 {
        if since_onset < 0.0 {
            return 0.0;
        }
        let ramp = self.ramp.as_secs_f64();
        let rising = |x: f64| {
            if ramp <= 0.0 {
                1.0
            } else {
                self.shape.at(((x / ramp - from) / (to - from)).min(1.0))
            }
        };
        match self.duration {
            Some(d) if since_onset >= d.as_secs_f64() => {
                let d = d.as_secs_f64();
                let recovery = self.recovery.as_secs_f64();
                let held = rising(d);
                let x = since_onset - d;
                if recovery <= 0.0 || x >= recovery {
                    0.0
                } else {
                    held * (1.0 - self.shape.at(x / recovery))
                }
            }
            _ => rising(since_onset),
        }
    }
}

/// The curve of a ramp, from 0 at its start to 1 at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A straight line.
    Linear,
    /// A logistic S-curve: slow start, steepest half-way, slow finish.
    Logistic,
}

impl Shape {
    /// The curve at `x` in `[0, 1]`.
    pub fn at(self, x: f64) -> f64 {
        let x = x.clamp(0.0, 1.0);
        match self {
            Shape::Linear => x,
            Shape::Logistic => {
                // A logistic of steepness 10 over [0, 1], rescaled to pass
                // exactly through 0 and 1.
                const K: f64 = 10.0;
                let s = |y: f64| 1.0 / (1.0 + (-K * (y - 0.5)).exp());
                let (lo, hi) = (s(0.0), s(1.0));
                (s(x) - lo) / (hi - lo)
            }
        }
    }
}

/// Brief motion artefacts that a monitor reports as if they were real.
#[derive(Debug, Clone, PartialEq)]
pub struct Artefacts {
    /// Mean time between artefacts (they are at least 10 s apart).
    pub every: Duration,
    /// How long artefacts keep coming after onset; `None` to the end.
    pub duration: Option<Duration>,
    /// Shortest artefact, whole seconds.
    pub min_length: Duration,
    /// Longest artefact, whole seconds.
    pub max_length: Duration,
    /// Metrics an artefact may hit (SpO2 and/or heart rate); each artefact
    /// hits one of them or all.
    pub metrics: Vec<Metric>,
    /// SpO2 reads within this range during an artefact, %.
    pub spo2_range: [f64; 2],
    /// The heart rate reads within this range during an artefact, /min.
    pub hr_range: [f64; 2],
    /// Whether artefact readings carry the QUESTIONABLE quality flag.
    pub flagged: bool,
}

/// A scenario file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a field is missing, of the wrong type,
    /// or out of range.
    #[error("{}:{line}:{column}: {}{message}", file.display(), field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        /// The field's path, e.g. `patients[0].events[1].onset`; `None` for
        /// TOML syntax errors and problems of the file as a whole.
        field: Option<String>,
        message: String,
    },
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a scenario; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Scenario, ScenarioError> {
        let invalid = |span: std::ops::Range<usize>, field: Option<String>, message: String| {
            let (line, column) = line_column(text, span.start);
            ScenarioError::Invalid {
                file: file.to_path_buf(),
                line,
                column,
                field,
                message,
            }
        };
        let doc = DeTable::parse(text)
            .map_err(|e| invalid(e.span().unwrap_or(0..0), None, e.message().to_string()))?;
        let raw =
            RawScenario::deserialize(toml::de::Deserializer::from(doc.clone())).map_err(|e| {
                let span = e.span().unwrap_or(0..0);
                let field = field_at(doc.get_ref(), span.start).filter(|p| !p.is_empty());
                invalid(span, field.map(|p| p.to_string()), e.message().to_string())
            })?;
        raw.validate().map_err(|(path, message)| {
            let span = span_of(&doc, &path);
            let field = (!path.is_empty()).then(|| path.to_string());
            invalid(span, field, message)
        })
    }
}

/// A position in the document: keys and array indices from the root.
#[derive(Debug, Clone, Default, PartialEq)]
struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Key(k.to_string()));
        p
    }

    fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The deepest key or value whose span holds `offset`, as a path.
fn field_at(root: &DeTable<'_>, offset: usize) -> Option<FieldPath> {
    fn in_value(v: &Spanned<DeValue<'_>>, offset: usize, here: FieldPath) -> Option<FieldPath> {
        match v.get_ref() {
            DeValue::Table(t) => {
                if let Some(p) = in_table(t, offset, &here) {
                    return Some(p);
                }
            }
            DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    if let Some(p) = in_value(e, offset, here.index(i)) {
                        return Some(p);
                    }
                }
            }
            _ => {}
        }
        v.span().contains(&offset).then_some(here)
    }
    fn in_table(t: &DeTable<'_>, offset: usize, here: &FieldPath) -> Option<FieldPath> {
        for (k, v) in t.iter() {
            let path = here.key(k.get_ref());
            if k.span().contains(&offset) {
                return Some(path);
            }
            if let Some(p) = in_value(v, offset, path) {
                return Some(p);
            }
        }
        None
    }
    in_table(root, offset, &FieldPath::default()).or(Some(FieldPath::default()))
}

/// The span of `path` in the document, or of its deepest part that exists:
/// a `key = value` pair's value, a table's or an array's key, an array
/// element itself.
fn span_of(doc: &Spanned<DeTable<'_>>, path: &FieldPath) -> std::ops::Range<usize> {
    let mut span = doc.span();
    let mut table = Some(doc.get_ref());
    let mut array = None;
    for seg in &path.0 {
        let (key_span, v) = match seg {
            Segment::Key(k) => {
                match table.and_then(|t| t.iter().find(|(key, _)| key.get_ref() == k)) {
                    Some((key, v)) => (Some(key.span()), v),
                    None => break,
                }
            }
            Segment::Index(i) => match array.and_then(|a: &DeArray<'_>| a.get(*i)) {
                Some(v) => (None, v),
                None => break,
            },
        };
        span = match (v.get_ref(), key_span) {
            (DeValue::Table(_) | DeValue::Array(_), Some(k)) => k,
            _ => v.span(),
        };
        table = v.get_ref().as_table();
        array = v.get_ref().as_array();
    }
    span
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

// ---------------------------------------------------------------------------
// The file as written: every field optional that may be left out, checked
// and given its defaults by `validate`.

/// A duration written as text: "90s", "10m", "1h30m", "24h".
#[derive(Debug, Clone, Copy)]
struct TextDuration(Duration);

impl<'de> Deserialize<'de> for TextDuration {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = TextDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration such as "90s", "10m" or "1h30m""#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextDuration, E> {
                parse_duration(s).map(TextDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Parses "90s", "10m", "1h30m", "24h" (and ISO 8601 `PT90S`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!(r#"invalid duration {s:?}; use e.g. "90s", "10m" or "1h30m""#);
    let d: jiff::SignedDuration = s.trim().parse().map_err(|_| bad())?;
    Duration::try_from(d).map_err(|_| format!("duration {s:?} is negative"))
}

/// `"all"` or a list of monitor metric names.
#[derive(Debug, Clone)]
struct MetricList(Vec<Metric>);

impl<'de> Deserialize<'de> for MetricList {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = MetricList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""all" or a list of metrics such as ["spo2", "hr"]"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<MetricList, E> {
                if s == "all" {
                    Ok(MetricList(MONITOR_METRICS.to_vec()))
                } else {
                    Err(E::custom(format!(
                        r#"expected "all" or a list such as ["{s}"], got {s:?}"#
                    )))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<MetricList, A::Error> {
                let mut out = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    let metric = Metric::from_name(&name)
                        .filter(|m| MONITOR_METRICS.contains(m))
                        .ok_or_else(|| {
                            de::Error::custom(format!(
                                "unknown metric {name:?}; the monitor reports {}",
                                monitor_metric_names()
                            ))
                        })?;
                    if !out.contains(&metric) {
                        out.push(metric);
                    }
                }
                if out.is_empty() {
                    return Err(de::Error::custom("the list of metrics is empty"));
                }
                Ok(MetricList(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn monitor_metric_names() -> String {
    MONITOR_METRICS
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: String,
    duration: TextDuration,
    seed: Option<u64>,
    patients: Vec<RawPatient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatient {
    id: PatientId,
    device: Option<DeviceId>,
    unit: Option<String>,
    bed: Option<String>,
    age_years: Option<u16>,
    sex: Option<Sex>,
    seed: Option<u64>,
    profile: Option<Profile>,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    kind: EventKind,
    onset: TextDuration,
    ramp: Option<TextDuration>,
    shape: Option<Shape>,
    duration: Option<TextDuration>,
    recovery: Option<TextDuration>,
    spo2: Option<f64>,
    hr: Option<f64>,
    rr: Option<f64>,
    sbp: Option<f64>,
    dbp: Option<f64>,
    temp: Option<f64>,
    hr_rise: Option<f64>,
    rr_rise: Option<f64>,
    metrics: Option<MetricList>,
    every: Option<TextDuration>,
    min_length: Option<TextDuration>,
    max_length: Option<TextDuration>,
    spo2_range: Option<[f64; 2]>,
    hr_range: Option<[f64; 2]>,
    flagged: Option<bool>,
}

type Invalid = (FieldPath, String);

const COURSE_FIELDS: [&str; 4] = ["ramp", "shape", "duration", "recovery"];

impl RawEvent {
    /// Names of the optional fields the file sets.
    fn present(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |set: bool, name: &'static str| {
            if set {
                out.push(name)
            }
        };
        check(self.ramp.is_some(), "ramp");
        check(self.shape.is_some(), "shape");
        check(self.duration.is_some(), "duration");
        check(self.recovery.is_some(), "recovery");
        check(self.spo2.is_some(), "spo2");
        check(self.hr.is_some(), "hr");
        check(self.rr.is_some(), "rr");
        check(self.sbp.is_some(), "sbp");
        check(self.dbp.is_some(), "dbp");
        check(self.temp.is_some(), "temp");
        check(self.hr_rise.is_some(), "hr_rise");
        check(self.rr_rise.is_some(), "rr_rise");
        check(self.metrics.is_some(), "metrics");
        check(self.every.is_some(), "every");
        check(self.min_length.is_some(), "min_length");
        check(self.max_length.is_some(), "max_length");
        check(self.spo2_range.is_some(), "spo2_range");
        check(self.hr_range.is_some(), "hr_range");
        check(self.flagged.is_some(), "flagged");
        out
    }

    /// The optional fields a kind accepts.
    fn fields_of(kind: EventKind) -> Vec<&'static str> {
        let own: &[&str] = match kind {
            EventKind::Desaturation => &["spo2", "hr_rise", "rr_rise"],
            EventKind::Tachycardia => &["hr"],
            EventKind::Hypotension => &["sbp", "dbp", "hr_rise"],
            EventKind::Sepsis => &["temp", "hr", "rr", "sbp", "spo2"],
            EventKind::Disconnect => &["duration", "metrics"],
            EventKind::Artefacts => &[
                "every",
                "duration",
                "min_length",
                "max_length",
                "metrics",
                "spo2_range",
                "hr_range",
                "flagged",
            ],
        };
        let mut all = Vec::new();
        if kind.is_deterioration() {
            all.extend(COURSE_FIELDS);
        }
        all.extend(own);
        all
    }

    fn validate(&self, at: &FieldPath, scenario_duration: Duration) -> Result<Event, Invalid> {
        let kind = self.kind;
        let allowed = Self::fields_of(kind);
        if let Some(extra) = self.present().into_iter().find(|f| !allowed.contains(f)) {
            return Err((
                at.key(extra),
                format!(
                    "`{extra}` does not apply to a {kind} event (its fields: kind, onset, {})",
                    allowed.join(", ")
                ),
            ));
        }
        let onset = self.onset.0;
        if onset >= scenario_duration {
            return Err((
                at.key("onset"),
                format!(
                    "onset {} is not before the end of the scenario ({})",
                    fmt_duration(onset),
                    fmt_duration(scenario_duration)
                ),
            ));
        }
        let in_range = |field: &str, v: f64, lo: f64, hi: f64, unit: &str| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err((
                    at.key(field),
                    format!("{field} = {v} is outside {lo}-{hi} {unit}"),
                ))
            }
        };
        let target = |field: &str, v: Option<f64>, default: f64| -> Result<f64, Invalid> {
            let v = v.unwrap_or(default);
            match field {
                "spo2" => in_range(field, v, 50.0, 100.0, "%"),
                "hr" => in_range(field, v, 20.0, 250.0, "/min"),
                "rr" => in_range(field, v, 4.0, 60.0, "/min"),
                "sbp" => in_range(field, v, 40.0, 260.0, "mmHg"),
                "dbp" => in_range(field, v, 20.0, 200.0, "mmHg"),
                "temp" => in_range(field, v, 33.0, 43.0, "Cel"),
                "hr_rise" => in_range(field, v, -100.0, 150.0, "/min"),
                "rr_rise" => in_range(field, v, -20.0, 40.0, "/min"),
                _ => unreachable!("a target field"),
            }
        };
        let course = |ramp: &str, shape: Shape| -> Result<Course, Invalid> {
            let ramp = self.ramp.map_or_else(
                || parse_duration(ramp).expect("default ramps parse"),
                |d| d.0,
            );
            let duration = self.duration.map(|d| d.0);
            if let Some(d) = duration
                && d < ramp
            {
                return Err((
                    at.key("duration"),
                    format!(
                        "duration {} is shorter than the ramp ({}); the event must reach full effect before it recovers",
                        fmt_duration(d),
                        fmt_duration(ramp)
                    ),
                ));
            }
            Ok(Course {
                ramp,
                shape: self.shape.unwrap_or(shape),
                duration,
                recovery: self.recovery.map_or(ramp, |d| d.0),
            })
        };
        let effect = match kind {
            EventKind::Desaturation => Effect::Desaturation {
                course: course("2m", Shape::Linear)?,
                spo2: target("spo2", self.spo2, 82.0)?,
                hr_rise: target("hr_rise", self.hr_rise, 15.0)?,
                rr_rise: target("rr_rise", self.rr_rise, 6.0)?,
            },
            EventKind::Tachycardia => Effect::Tachycardia {
                course: course("1m", Shape::Linear)?,
                hr: target("hr", self.hr, 150.0)?,
            },
            EventKind::Hypotension => {
                let sbp = target("sbp", self.sbp, 78.0)?;
                let dbp = self.dbp.map(|d| target("dbp", Some(d), d)).transpose()?;
                if let Some(d) = dbp
                    && d > sbp - 10.0
                {
                    return Err((
                        at.key("dbp"),
                        format!("dbp = {d} must be at least 10 mmHg below sbp = {sbp}"),
                    ));
                }
                Effect::Hypotension {
                    course: course("3m", Shape::Linear)?,
                    sbp,
                    dbp,
                    hr_rise: target("hr_rise", self.hr_rise, 25.0)?,
                }
            }
            EventKind::Sepsis => Effect::Sepsis {
                course: course("90m", Shape::Logistic)?,
                temp: target("temp", self.temp, 39.3)?,
                hr: target("hr", self.hr, 125.0)?,
                rr: target("rr", self.rr, 26.0)?,
                sbp: target("sbp", self.sbp, 95.0)?,
                spo2: target("spo2", self.spo2, 93.0)?,
            },
            EventKind::Disconnect => Effect::Disconnect {
                duration: self
                    .duration
                    .ok_or_else(|| {
                        (
                            at.clone(),
                            "missing field `duration` (how long the sensor is silent)".to_string(),
                        )
                    })?
                    .0,
                metrics: self
                    .metrics
                    .clone()
                    .map_or_else(|| MONITOR_METRICS.to_vec(), |m| m.0),
            },
            EventKind::Artefacts => Effect::Artefacts(self.artefacts(at)?),
        };
        Ok(Event { onset, effect })
    }

    fn artefacts(&self, at: &FieldPath) -> Result<Artefacts, Invalid> {
        let secs = |field: &str, d: Option<TextDuration>, default: u64| {
            let d = d.map_or(Duration::from_secs(default), |d| d.0);
            if d.subsec_nanos() != 0 || d.is_zero() {
                Err((
                    at.key(field),
                    format!(
                        "{field} must be a whole number of seconds, at least 1s (readings come once a second), got {}",
                        fmt_duration(d)
                    ),
                ))
            } else {
                Ok(d)
            }
        };
        let min_length = secs("min_length", self.min_length, 1)?;
        let max_length = secs("max_length", self.max_length, 3)?;
        let every = self.every.map_or(Duration::from_secs(120), |d| d.0);
        if max_length < min_length {
            return Err((
                at.key("max_length"),
                format!(
                    "max_length {} is shorter than min_length {}",
                    fmt_duration(max_length),
                    fmt_duration(min_length)
                ),
            ));
        }
        if every <= max_length {
            return Err((
                at.key("every"),
                format!(
                    "every {} must be longer than max_length {}",
                    fmt_duration(every),
                    fmt_duration(max_length)
                ),
            ));
        }
        let metrics = self
            .metrics
            .clone()
            .map_or_else(|| vec![Metric::Spo2, Metric::Hr], |m| m.0);
        if let Some(m) = metrics
            .iter()
            .find(|m| !matches!(m, Metric::Spo2 | Metric::Hr))
        {
            return Err((
                at.key("metrics"),
                format!("motion artefacts hit spo2 and hr, not {m}"),
            ));
        }
        let range = |field: &str, r: Option<[f64; 2]>, default: [f64; 2], lo: f64, hi: f64| {
            let r = r.unwrap_or(default);
            if r[0].is_finite() && r[1].is_finite() && lo <= r[0] && r[0] <= r[1] && r[1] <= hi {
                Ok(r)
            } else {
                Err((
                    at.key(field),
                    format!(
                        "{field} = [{}, {}] must be [low, high] within {lo}-{hi}",
                        r[0], r[1]
                    ),
                ))
            }
        };
        Ok(Artefacts {
            every,
            duration: self.duration.map(|d| d.0),
            min_length,
            max_length,
            metrics,
            spo2_range: range("spo2_range", self.spo2_range, [70.0, 85.0], 0.0, 100.0)?,
            hr_range: range("hr_range", self.hr_range, [140.0, 170.0], 0.0, 300.0)?,
            flagged: self.flagged.unwrap_or(false),
        })
    }
}

impl RawScenario {
    fn validate(self) -> Result<Scenario, Invalid> {
        let root = FieldPath::default();
        if self.name.trim().is_empty() {
            return Err((root.key("name"), "the name is empty".into()));
        }
        let duration = self.duration.0;
        if duration < Duration::from_secs(1) {
            return Err((
                root.key("duration"),
                "a scenario lasts at least 1s".to_string(),
            ));
        }
        if self.patients.is_empty() {
            return Err((
                root.key("patients"),
                "a scenario needs at least one patient; add a [[patients]] table".into(),
            ));
        }
        let scenario_seed = self.seed.unwrap_or(1);
        let mut patients: Vec<PatientScript> = Vec::with_capacity(self.patients.len());
        for (i, p) in self.patients.into_iter().enumerate() {
            let at = root.key("patients").index(i);
            // Units and beds name MQTT topics (alert feeds per unit): the id
            // alphabet applies.
            let text = |field: &str, v: Option<String>, default: String| {
                let v = v.unwrap_or(default);
                match PatientId::new(&v) {
                    Ok(_) => Ok(v),
                    Err(e) => Err((
                        at.key(field),
                        format!("{field} {}", e.to_string().replace("patient id ", "")),
                    )),
                }
            };
            let unit = text("unit", p.unit, "icu-a".into())?;
            let bed = text("bed", p.bed, format!("bed-{}", i + 1))?;
            let device = match p.device {
                Some(d) => d,
                None => DeviceId::new(&format!("{unit}-{bed}")).map_err(|e| {
                    (
                        at.clone(),
                        format!("the device id derived from unit and bed is not valid ({e}); set `device`"),
                    )
                })?,
            };
            if let Some(age) = p.age_years
                && age > 130
            {
                return Err((
                    at.key("age_years"),
                    format!("age_years = {age} is not a human age"),
                ));
            }
            for (j, other) in patients.iter().enumerate() {
                if other.id == p.id {
                    return Err((
                        at.key("id"),
                        format!("patient id {} is already used by patients[{j}]", p.id),
                    ));
                }
                if other.device == device {
                    return Err((
                        at.key("device"),
                        format!("device id {device} is already used by patients[{j}]"),
                    ));
                }
            }
            let events = p
                .events
                .iter()
                .enumerate()
                .map(|(j, e)| e.validate(&at.key("events").index(j), duration))
                .collect::<Result<Vec<_>, _>>()?;
            patients.push(PatientScript {
                id: p.id,
                device,
                unit,
                bed,
                age_years: p.age_years,
                sex: p.sex,
                seed: p
                    .seed
                    .unwrap_or_else(|| splitmix64(scenario_seed ^ splitmix64(i as u64 + 1))),
                profile: p.profile.unwrap_or_default(),
                events,
            });
        }
        Ok(Scenario {
            name: self.name,
            description: self.description.trim().to_string(),
            duration,
            patients,
        })
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): turns related seeds into
/// unrelated ones.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// "1h30m", "90s", "2m", "1.5s".
pub(crate) fn fmt_duration(d: Duration) -> String {
    let total = d.as_secs();
    if d.subsec_nanos() != 0 {
        return format!("{}s", d.as_secs_f64());
    }
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario files shipped with the simulator.
    pub(crate) fn shipped() -> Vec<(PathBuf, Scenario)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                (p, s)
            })
            .collect()
    }

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(text, Path::new("s.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn every_shipped_file_parses_and_describes_itself() {
        let files = shipped();
        let names: Vec<String> = files
            .iter()
            .map(|(p, _)| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "artefacts",
            "desaturation",
            "disconnect",
            "hypotension",
            "sepsis",
            "stable",
            "tachycardia",
        ] {
            assert!(names.iter().any(|n| n == want), "{want}.toml is missing");
        }
        for (path, s) in &files {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.starts_with('#'),
                "{} opens with a comment header",
                path.display()
            );
            assert!(!s.description.is_empty(), "{}", path.display());
            assert!(!s.patients.is_empty());
        }
        // Every event kind is exercised by some shipped file.
        for kind in EventKind::ALL {
            assert!(
                files
                    .iter()
                    .flat_map(|(_, s)| &s.patients)
                    .flat_map(|p| &p.events)
                    .any(|e| e.kind() == kind),
                "no shipped file has a {kind} event"
            );
        }
    }

    #[test]
    fn defaults_fill_in() {
        let s = parse(
            r#"
name = "x"
duration = "10m"
[[patients]]
id = "p1"
[[patients]]
id = "p2"
unit = "ward-3"
[[patients.events]]
kind = "sepsis"
onset = "1m"
[[patients.events]]
kind = "disconnect"
onset = "2m"
duration = "30s"
metrics = ["spo2", "hr"]
"#,
        )
        .unwrap();
        assert_eq!(s.duration, Duration::from_secs(600));
        let (a, b) = (&s.patients[0], &s.patients[1]);
        assert_eq!(a.device.as_str(), "icu-a-bed-1");
        assert_eq!(b.device.as_str(), "ward-3-bed-2");
        assert_eq!(a.profile, Profile::Stable);
        assert_ne!(a.seed, b.seed);
        match &b.events[0].effect {
            Effect::Sepsis { course, temp, .. } => {
                assert_eq!(course.ramp, Duration::from_secs(5400));
                assert_eq!(course.shape, Shape::Logistic);
                assert_eq!(*temp, 39.3);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(b.events[1].end(), Some(Duration::from_secs(150)));
        match &b.events[1].effect {
            Effect::Disconnect { metrics, .. } => assert_eq!(metrics, &[Metric::Spo2, Metric::Hr]),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let head = "name = \"x\"\nduration = \"1h\"\n\n[[patients]]\nid = \"p1\"\n\n";
        let cases = [
            (
                "[[patients.events]]\nkind = \"sepsis\"\nonset = \"1x\"\n",
                "s.toml:9:9: patients[0].events[0].onset: invalid duration \"1x\"",
            ),
            (
                "[[patients.events]]\nkind = \"sepsis\"\nonset = \"1m\"\nhr = \"fast\"\n",
                "s.toml:10:6: patients[0].events[0].hr: invalid type",
            ),
            (
                "[[patients.events]]\nkind = \"desat\"\nonset = \"1m\"\n",
                "s.toml:8:8: patients[0].events[0].kind: unknown variant `desat`",
            ),
            (
                "[[patients.events]]\nkind = \"tachycardia\"\nonset = \"1m\"\nspo2 = 80\n",
                "s.toml:10:8: patients[0].events[0].spo2: `spo2` does not apply to a tachycardia event",
            ),
            (
                "[[patients.events]]\nkind = \"tachycardia\"\nonset = \"2h\"\n",
                "s.toml:9:9: patients[0].events[0].onset: onset 2h is not before the end",
            ),
            (
                "[[patients.events]]\nkind = \"disconnect\"\nonset = \"1m\"\n",
                "patients[0].events[0]: missing field `duration`",
            ),
            (
                "[[patients.events]]\nkind = \"tachycardia\"\n",
                "patients[0].events[0]: missing field `onset`",
            ),
            (
                "[[patients.events]]\nkind = \"disconnect\"\nonset = \"1m\"\nduration = \"1m\"\nmetrics = [\"etco2\"]\n",
                "s.toml:11:11: patients[0].events[0].metrics: unknown metric \"etco2\"",
            ),
            (
                "[[patients.events]]\nkind = \"tachycardia\"\nonset = \"1m\"\nhr = 900\n",
                "s.toml:10:6: patients[0].events[0].hr: hr = 900 is outside",
            ),
            (
                "[[patients]]\nid = \"p1\"\n",
                "s.toml:8:6: patients[1].id: patient id p1 is already used by patients[0]",
            ),
            (
                "[[patients]]\nid = \"p2\"\nbeds = 3\n",
                "s.toml:9:1: patients[1].beds: unknown field `beds`",
            ),
            (
                "[[patients]]\nid = \"p 2\"\n",
                "s.toml:8:6: patients[1].id: patient id \"p 2\" contains ' '",
            ),
        ];
        for (tail, want) in cases {
            let err = parse(&format!("{head}{tail}")).unwrap_err();
            if want.starts_with("s.toml") {
                assert!(err.starts_with(want), "want {want:?}\n got {err:?}");
            } else {
                assert!(
                    err.starts_with("s.toml:") && err.contains(want),
                    "want {want:?}\n got {err:?}"
                );
            }
        }
        let err = parse("name = \"x\"\nduration = \"1h\"\npatients = [\n").unwrap_err();
        assert!(err.starts_with("s.toml:3:"), "{err}");
        let err = parse("name = \"x\"\nduration = \"1h\"\n").unwrap_err();
        assert!(
            err.starts_with("s.toml:1:1: ") && err.contains("missing field `patients`"),
            "{err}"
        );
        let err = Scenario::load(Path::new("/nonexistent/scenario.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/scenario.toml: "), "{err}");
    }

    #[test]
    fn courses_ramp_hold_and_recover() {
        let c = Course {
            ramp: Duration::from_secs(100),
            shape: Shape::Linear,
            duration: Some(Duration::from_secs(300)),
            recovery: Duration::from_secs(50),
        };
        assert_eq!(c.level(-1.0), 0.0);
        assert_eq!(c.level(0.0), 0.0);
        assert!((c.level(50.0) - 0.5).abs() < 1e-9);
        assert_eq!(c.level(100.0), 1.0);
        assert_eq!(c.level(299.0), 1.0);
        assert!((c.level(325.0) - 0.5).abs() < 1e-9);
        assert_eq!(c.level(350.0), 0.0);
        let s = Shape::Logistic;
        assert_eq!(s.at(0.0), 0.0);
        assert!((s.at(1.0) - 1.0).abs() < 1e-12);
        assert!((s.at(0.5) - 0.5).abs() < 1e-12);
        assert!(s.at(0.1) < 0.1 && s.at(0.9) > 0.9, "slow start and finish");
        let step = Course {
            ramp: Duration::ZERO,
            ..c
        };
        assert_eq!(step.level(0.0), 1.0);
    }

    #[test]
    fn durations_read_like_people_write_them() {
        for (s, secs) in [("90s", 90), ("10m", 600), ("24h", 86_400), ("1h30m", 5_400)] {
            let d = parse_duration(s).unwrap();
            assert_eq!(d, Duration::from_secs(secs), "{s}");
            assert_eq!(parse_duration(&fmt_duration(d)).unwrap(), d);
        }
        assert_eq!(fmt_duration(Duration::from_secs(5_400)), "1h30m");
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5s").is_err());
    }
}
