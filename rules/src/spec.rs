//! The rule language: TOML files of `[[rule]]` tables, checked into a
//! [`RuleSet`]. Every error names the file, the line and column, and the
//! field (`rule "spo2-low" (line 12): when.exit: ...`).
//!
//! ```toml
//! [[rule]]
//! id = "spo2-low"
//! description = "SpO2 below 90 % for 15 s"
//! priority = "high"                                # IEC 60601-1-8: high, medium, low
//! when = { metric = "spo2", below = 90, exit = 92 } # enter below 90, clear above 92
//! for = "15s"                                      # sustained: a brief artefact does not alarm
//! max_missing = 0.25                               # share of expected samples that may be missing
//! latching = false                                 # stays until acknowledged once the condition clears?
//! escalate_after = "2m"                            # unacknowledged this long: next tier
//! units = ["icu-a"]                                # scope (optional): only these units / patients
//! ```
//!
//! Conditions (`when`):
//! - threshold: `{ metric, above | below, exit }` (hysteresis: enter past
//!   `above`/`below`, clear back past `exit`; without `exit`, the same level);
//! - rate of change: `{ metric, rise | fall, within }` (the value moved by at
//!   least this much within the window);
//! - missing data: `{ missing = "device" | metric, after }` (a technical alarm);
//! - combinations: `{ all = [ ... ] }`, `{ any = [ ... ] }`.
//!
//! A rule may instead be `news2 = { freshness = "5m", ... }`: NEWS2 (RCP
//! 2017) from the patient's latest values, its Chart 2 risk bands mapped to
//! priorities.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use wardflow_model::Metric;

use crate::{Direction, Priority};

/// Why a rule file was refused.
pub use wardflow_model::SpecError;

/// How long a duration string is, in nanoseconds: `500ms`, `15s`, `2m`,
/// `1h`, or combined (`1m30s`), as the rest of Wardflow reads durations
/// (jiff's friendly format).
pub fn parse_duration_ns(text: &str) -> Result<i64, String> {
    let d: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 15s, 2m or 1h30m"))?;
    i64::try_from(d.as_nanos()).map_err(|_| format!("{text:?} is too long"))
}

/// A loaded, checked set of rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Where the rules came from, for logs.
    pub sources: Vec<PathBuf>,
}

/// One rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub description: String,
    /// The priority it raises (for NEWS2, the highest band's).
    pub priority: Priority,
    pub kind: RuleKind,
    /// Technical alarm (about the equipment, not the patient): missing data.
    pub technical: bool,
    pub sustain: Option<Sustain>,
    pub latching: bool,
    pub escalate_after_ns: Option<i64>,
    /// Only these units (empty: all).
    pub units: Vec<String>,
    /// Only these patients (empty: all).
    pub patients: Vec<String>,
}

impl Rule {
    /// Whether the rule applies to a patient in a unit.
    pub fn applies_to(&self, patient: &str, unit: Option<&str>) -> bool {
        (self.units.is_empty() || unit.is_some_and(|u| self.units.iter().any(|x| x == u)))
            && (self.patients.is_empty() || self.patients.iter().any(|p| p == patient))
    }
}

/// A condition must hold this long, with at most this share of the samples
/// expected in that time missing, before it alarms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sustain {
    pub for_ns: i64,
    pub max_missing: f64,
    pub sample_period_ns: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Condition(Cond),
    News2(News2Rule),
}

/// A condition on a patient's latest values.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Threshold {
        metric: Metric,
        direction: Direction,
        enter: f64,
        exit: f64,
    },
    Rate {
        metric: Metric,
        /// Rising (Above) or falling (Below).
        direction: Direction,
        amount: f64,
        window_ns: i64,
    },
    Missing {
        target: MissingTarget,
        after_ns: i64,
    },
    All(Vec<Cond>),
    Any(Vec<Cond>),
}

impl Cond {
    fn metrics(&self, out: &mut BTreeSet<Metric>) {
        match self {
            Cond::Threshold { metric, .. } | Cond::Rate { metric, .. } => {
                out.insert(*metric);
            }
            Cond::Missing { .. } => {}
            Cond::All(cs) | Cond::Any(cs) => cs.iter().for_each(|c| c.metrics(out)),
        }
    }

    /// Whether the condition depends on time passing without readings.
    pub fn is_timed(&self) -> bool {
        match self {
            Cond::Missing { .. } => true,
            Cond::All(cs) | Cond::Any(cs) => cs.iter().any(Cond::is_timed),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingTarget {
    /// Any of the patient's devices.
    Device,
    Metric(Metric),
}

/// NEWS2 as a rule: which Chart 2 risk band raises which priority.
#[derive(Debug, Clone, PartialEq)]
pub struct News2Rule {
    /// A value older than this no longer counts.
    pub freshness_ns: i64,
    /// Priority for a single parameter scoring 3 (aggregate below 5).
    pub low_medium: Option<Priority>,
    /// Priority for an aggregate of 5–6.
    pub medium: Option<Priority>,
    /// Priority for an aggregate of 7 or more.
    pub high: Option<Priority>,
}

// ---- the raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    description: Option<String>,
    priority: Option<Spanned<String>>,
    when: Option<Spanned<RawCond>>,
    news2: Option<Spanned<RawNews2>>,
    #[serde(rename = "for")]
    sustain: Option<Spanned<String>>,
    max_missing: Option<Spanned<f64>>,
    sample_period: Option<Spanned<String>>,
    latching: Option<bool>,
    escalate_after: Option<Spanned<String>>,
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    patients: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCond {
    metric: Option<Spanned<String>>,
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    exit: Option<Spanned<f64>>,
    rise: Option<Spanned<f64>>,
    fall: Option<Spanned<f64>>,
    within: Option<Spanned<String>>,
    missing: Option<Spanned<String>>,
    after: Option<Spanned<String>>,
    all: Option<Vec<Spanned<RawCond>>>,
    any: Option<Vec<Spanned<RawCond>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNews2 {
    freshness: Option<Spanned<String>>,
    low_medium: Option<Spanned<String>>,
    medium: Option<Spanned<String>>,
    high: Option<Spanned<String>>,
}

/// Turns byte spans into line and column, and collects errors.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn at(&self, span: Range<usize>, message: String) -> SpecError {
        SpecError::at(self.file, self.text, span, message)
    }
}

fn parse_priority(s: &str) -> Option<Priority> {
    match s {
        "high" => Some(Priority::High),
        "medium" => Some(Priority::Medium),
        "low" => Some(Priority::Low),
        _ => None,
    }
}

impl RuleSet {
    /// Loads every `*.toml` file of a directory, in name order. Rule ids
    /// must be unique across the files.
    pub fn load_dir(dir: &Path) -> Result<RuleSet, SpecError> {
        let io = |e: std::io::Error| SpecError {
            file: dir.to_path_buf(),
            line: 0,
            column: 0,
            message: e.to_string(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        Self::load_files(&files)
    }

    /// Loads files into one set.
    pub fn load_files(files: &[PathBuf]) -> Result<RuleSet, SpecError> {
        let mut set = RuleSet::default();
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|e| SpecError {
                file: f.clone(),
                line: 0,
                column: 0,
                message: e.to_string(),
            })?;
            set.extend(Self::parse(f, &text)?)?;
        }
        Ok(set)
    }

    /// Adds another set's rules; a repeated id is an error.
    pub fn extend(&mut self, other: RuleSet) -> Result<(), SpecError> {
        for r in &other.rules {
            if self.rules.iter().any(|x| x.id == r.id) {
                return Err(SpecError {
                    file: other.sources.first().cloned().unwrap_or_default(),
                    line: 0,
                    column: 0,
                    message: format!("rule {:?}: id: defined twice", r.id),
                });
            }
        }
        self.rules.extend(other.rules);
        self.sources.extend(other.sources);
        Ok(())
    }

    /// Parses and checks one file's text.
    pub fn parse(file: &Path, text: &str) -> Result<RuleSet, SpecError> {
        let ck = Checker { file, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            ck.at(span, e.message().trim().to_string())
        })?;
        let mut rules: Vec<Rule> = Vec::new();
        for r in raw.rule {
            let span = r.span();
            let r = r.into_inner();
            let id = r.id.get_ref().clone();
            let err = |span: Range<usize>, field: &str, msg: String| {
                ck.at(span, format!("rule {id:?}: {field}: {msg}"))
            };
            if wardflow_model::PatientId::new(&id).is_err() {
                return Err(err(
                    r.id.span(),
                    "id",
                    "use 1 to 64 ASCII letters, digits and - _ . :".into(),
                ));
            }
            if rules.iter().any(|x| x.id == id) {
                return Err(err(r.id.span(), "id", "defined twice in this file".into()));
            }
            let priority = match &r.priority {
                Some(p) => Some(parse_priority(p.get_ref()).ok_or_else(|| {
                    err(
                        p.span(),
                        "priority",
                        format!("{:?} is not high, medium or low", p.get_ref()),
                    )
                })?),
                None => None,
            };
            let (kind, priority) = match (r.when, r.news2) {
                (Some(_), Some(n)) => {
                    return Err(err(
                        n.span(),
                        "news2",
                        "a rule has either `when` or `news2`, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(err(
                        span,
                        "when",
                        "missing: every rule needs a `when` condition or `news2`".into(),
                    ));
                }
                (Some(w), None) => {
                    let cond = check_cond(&ck, &id, "when", w)?;
                    let Some(p) = priority else {
                        return Err(err(
                            span,
                            "priority",
                            "missing: high, medium or low (IEC 60601-1-8)".into(),
                        ));
                    };
                    (RuleKind::Condition(cond), p)
                }
                (None, Some(n)) => {
                    let nspan = n.span();
                    let n = n.into_inner();
                    let band = |f: &Option<Spanned<String>>,
                                name: &str,
                                default: Option<Priority>|
                     -> Result<Option<Priority>, SpecError> {
                        match f {
                            None => Ok(default),
                            Some(s) if s.get_ref() == "none" => Ok(None),
                            Some(s) => parse_priority(s.get_ref()).map(Some).ok_or_else(|| {
                                err(
                                    s.span(),
                                    &format!("news2.{name}"),
                                    format!("{:?} is not high, medium, low or none", s.get_ref()),
                                )
                            }),
                        }
                    };
                    let rule = News2Rule {
                        freshness_ns: match &n.freshness {
                            Some(s) => duration(&ck, &id, "news2.freshness", s)?,
                            None => 5 * 60_000_000_000,
                        },
                        low_medium: band(&n.low_medium, "low_medium", Some(Priority::Low))?,
                        medium: band(&n.medium, "medium", Some(Priority::Medium))?,
                        high: band(&n.high, "high", Some(Priority::High))?,
                    };
                    let top = [rule.high, rule.medium, rule.low_medium]
                        .into_iter()
                        .flatten()
                        .max();
                    let Some(top) = top else {
                        return Err(err(
                            nspan,
                            "news2",
                            "every band is `none`: the rule could never alarm".into(),
                        ));
                    };
                    if priority.is_some() {
                        return Err(err(
                            r.priority.as_ref().map(|p| p.span()).unwrap_or(span),
                            "priority",
                            "a news2 rule takes its priorities from news2.low_medium, medium and high".into(),
                        ));
                    }
                    (RuleKind::News2(rule), top)
                }
            };
            let sustain = match &r.sustain {
                Some(s) => {
                    let for_ns = duration(&ck, &id, "for", s)?;
                    let max_missing = match &r.max_missing {
                        Some(m) if !(0.0..1.0).contains(m.get_ref()) => {
                            return Err(err(
                                m.span(),
                                "max_missing",
                                format!(
                                    "{} is not a share from 0 up to (not including) 1",
                                    m.get_ref()
                                ),
                            ));
                        }
                        Some(m) => *m.get_ref(),
                        None => 0.25,
                    };
                    let sample_period_ns = match &r.sample_period {
                        Some(p) => duration(&ck, &id, "sample_period", p)?,
                        None => 1_000_000_000,
                    };
                    Some(Sustain {
                        for_ns,
                        max_missing,
                        sample_period_ns,
                    })
                }
                None => {
                    for (f, name) in [
                        (r.max_missing.as_ref().map(|m| m.span()), "max_missing"),
                        (r.sample_period.as_ref().map(|m| m.span()), "sample_period"),
                    ] {
                        if let Some(s) = f {
                            return Err(err(s, name, "only means something with `for`".into()));
                        }
                    }
                    None
                }
            };
            let technical =
                matches!(&kind, RuleKind::Condition(c) if c.is_timed() && c.metrics_empty());
            let escalate_after_ns = match &r.escalate_after {
                Some(s) => Some(duration(&ck, &id, "escalate_after", s)?),
                None => None,
            };
            rules.push(Rule {
                description: r.description.unwrap_or_else(|| id.clone()),
                id,
                priority,
                kind,
                technical,
                sustain,
                latching: r.latching.unwrap_or(false),
                escalate_after_ns,
                units: r.units,
                patients: r.patients,
            });
        }
        Ok(RuleSet {
            rules,
            sources: vec![file.to_path_buf()],
        })
    }
}

impl Cond {
    fn metrics_empty(&self) -> bool {
        let mut m = BTreeSet::new();
        self.metrics(&mut m);
        m.is_empty()
    }
}

fn duration(ck: &Checker, id: &str, field: &str, s: &Spanned<String>) -> Result<i64, SpecError> {
    match parse_duration_ns(s.get_ref()) {
        Ok(ns) if ns > 0 => Ok(ns),
        Ok(_) => Err(ck.at(
            s.span(),
            format!("rule {id:?}: {field}: must be longer than zero"),
        )),
        Err(e) => Err(ck.at(s.span(), format!("rule {id:?}: {field}: {e}"))),
    }
}

fn check_cond(ck: &Checker, id: &str, field: &str, c: Spanned<RawCond>) -> Result<Cond, SpecError> {
    let span = c.span();
    let c = c.into_inner();
    let err = |span: Range<usize>, sub: &str, msg: String| {
        ck.at(span, format!("rule {id:?}: {field}{sub}: {msg}"))
    };
    let metric = |m: &Option<Spanned<String>>| -> Result<Metric, SpecError> {
        let Some(m) = m else {
            return Err(err(span.clone(), ".metric", "missing".into()));
        };
        Metric::from_name(m.get_ref()).ok_or_else(|| {
            let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
            err(
                m.span(),
                ".metric",
                format!(
                    "unknown metric {:?}; known: {}",
                    m.get_ref(),
                    known.join(", ")
                ),
            )
        })
    };
    let finite = |v: &Spanned<f64>, sub: &str| -> Result<f64, SpecError> {
        if v.get_ref().is_finite() {
            Ok(*v.get_ref())
        } else {
            Err(err(v.span(), sub, "must be a finite number".into()))
        }
    };
    let forms = [
        c.above.is_some() || c.below.is_some(),
        c.rise.is_some() || c.fall.is_some(),
        c.missing.is_some(),
        c.all.is_some(),
        c.any.is_some(),
    ];
    match forms.iter().filter(|x| **x).count() {
        0 => {
            return Err(err(
                span,
                "",
                "say what alarms: above/below (threshold), rise/fall (rate of change), missing, all or any".into(),
            ));
        }
        1 => {}
        _ => {
            return Err(err(
                span,
                "",
                "one condition per table: combine several with all = [...] or any = [...]".into(),
            ));
        }
    }
    if c.above.is_some() || c.below.is_some() {
        let m = metric(&c.metric)?;
        let (direction, enter) = match (&c.above, &c.below) {
            (Some(a), None) => (Direction::Above, finite(a, ".above")?),
            (None, Some(b)) => (Direction::Below, finite(b, ".below")?),
            _ => {
                return Err(err(
                    span,
                    "",
                    "give above or below, not both (use any = [...] for a band)".into(),
                ));
            }
        };
        let exit = match &c.exit {
            Some(x) => finite(x, ".exit")?,
            None => enter,
        };
        let ok = match direction {
            Direction::Above => exit <= enter,
            Direction::Below => exit >= enter,
        };
        if !ok {
            let side = if direction == Direction::Above {
                "at or below"
            } else {
                "at or above"
            };
            return Err(err(
                c.exit.as_ref().map(|x| x.span()).unwrap_or(span),
                ".exit",
                format!("{exit} must lie {side} the enter level {enter}, on the normal side"),
            ));
        }
        return Ok(Cond::Threshold {
            metric: m,
            direction,
            enter,
            exit,
        });
    }
    if c.rise.is_some() || c.fall.is_some() {
        let m = metric(&c.metric)?;
        let (direction, amount) = match (&c.rise, &c.fall) {
            (Some(a), None) => (Direction::Above, finite(a, ".rise")?),
            (None, Some(b)) => (Direction::Below, finite(b, ".fall")?),
            _ => return Err(err(span, "", "give rise or fall, not both".into())),
        };
        if amount <= 0.0 {
            return Err(err(
                span,
                "",
                format!("the change {amount} must be positive"),
            ));
        }
        let Some(w) = &c.within else {
            return Err(err(
                span,
                ".within",
                "missing: the window, e.g. \"5m\"".into(),
            ));
        };
        return Ok(Cond::Rate {
            metric: m,
            direction,
            amount,
            window_ns: duration(ck, id, &format!("{field}.within"), w)?,
        });
    }
    if let Some(target) = &c.missing {
        let t = match target.get_ref().as_str() {
            "device" => MissingTarget::Device,
            name => MissingTarget::Metric(Metric::from_name(name).ok_or_else(|| {
                err(
                    target.span(),
                    ".missing",
                    format!("{name:?} is neither \"device\" nor a metric name"),
                )
            })?),
        };
        let Some(a) = &c.after else {
            return Err(err(
                span,
                ".after",
                "missing: how long silent, e.g. \"30s\"".into(),
            ));
        };
        return Ok(Cond::Missing {
            target: t,
            after_ns: duration(ck, id, &format!("{field}.after"), a)?,
        });
    }
    let (list, all) = match (c.all, c.any) {
        (Some(l), _) => (l, true),
        (_, Some(l)) => (l, false),
        _ => unreachable!("one form was counted"),
    };
    if list.is_empty() {
        return Err(err(span, "", "an empty list never decides".into()));
    }
    let name = if all { "all" } else { "any" };
    let conds = list
        .into_iter()
        .enumerate()
        .map(|(i, c)| check_cond(ck, id, &format!("{field}.{name}[{i}]"), c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if all {
        Cond::All(conds)
    } else {
        Cond::Any(conds)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RuleSet, SpecError> {
        RuleSet::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("15s"), Ok(15_000_000_000));
        assert_eq!(parse_duration_ns("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration_ns("250ms"), Ok(250_000_000));
        assert!(parse_duration_ns("15").is_err());
        assert!(parse_duration_ns("5 parsecs").is_err());
    }

    #[test]
    fn every_kind_parses() {
        let set = parse(
            r#"
[[rule]]
id = "spo2-low"
priority = "high"
when = { metric = "spo2", below = 90, exit = 92 }
for = "15s"

[[rule]]
id = "sbp-falling"
priority = "medium"
when = { metric = "sbp", fall = 30, within = "15m" }

[[rule]]
id = "no-spo2"
priority = "medium"
when = { missing = "spo2", after = "30s" }

[[rule]]
id = "shock"
priority = "high"
when = { all = [ { metric = "hr", above = 120 }, { metric = "sbp", below = 90 } ] }

[[rule]]
id = "news2"
news2 = { freshness = "5m" }
"#,
        )
        .unwrap();
        assert_eq!(set.rules.len(), 5);
        assert!(set.rules[2].technical);
        assert!(!set.rules[0].technical);
        assert_eq!(set.rules[4].priority, Priority::High);
        assert_eq!(
            set.rules[0].sustain.unwrap().for_ns,
            15_000_000_000,
            "for = 15s"
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse(
            "[[rule]]\nid = \"x\"\npriority = \"high\"\nwhen = { metric = \"spo2\", below = 90, exit = 85 }\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("when.exit"), "{e}");
        let e = parse(
            "[[rule]]\nid = \"x\"\npriority = \"urgent\"\nwhen = { metric = \"hr\", above = 1 }\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.message.contains("priority")), (3, true), "{e}");
        let e = parse(
            "[[rule]]\nid = \"x\"\npriority = \"low\"\nwhen = { metric = \"pulse\", above = 1 }\n",
        )
        .unwrap_err();
        assert!(e.message.contains("unknown metric \"pulse\""), "{e}");
        let e = parse("[[rule]]\nid = \"x\"\npriorty = \"low\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("priorty"), "{e}");
        assert!(e.to_string().starts_with("t.toml:3:"), "{e}");
    }
}
