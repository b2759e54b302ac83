//! A study's definition: a TOML file checked into a [`Study`]. Every error
//! names the file, the line and column, and the field.
//!
//! ```toml
//! id = "icu-hr-2026"
//! title = "Heart rate and SpO2 by age band in adult intensive care"
//! researchers = ["r-lindqvist"]        # accounts that may read the study
//! metrics = ["hr", "spo2"]
//! window = "1m"                        # tumbling windows of the engine's clock
//! statistics = ["count", "mean", "std", "p50", "p90"]
//! k = 5                                # minimum distinct patients per released row
//! running_totals = true                # cumulative readings per row (binary tree mechanism)
//!
//! [cohort]                             # generalized quasi-identifiers, in column order
//! group_by = ["age_band", "sex", "unit_type"]
//! age_bands = [18, 40, 65, 80]         # band edges: <18, 18-39, 40-64, 65-79, 80+
//! unit_types = { icu = ["icu-a", "icu-b"], step-down = ["sdu-1"] }   # unlisted units: "other"
//!
//! [privacy]
//! epsilon = 10.0
//! delta = 1e-6
//! windows = 1440                       # how many windows the budget covers
//! running_total_share = 0.2            # the share of the budget for running totals
//!
//! [clamp]                              # each patient's window value is clamped to these bounds
//! hr = [30, 200]
//! spo2 = [70, 100]
//! max_readings = 120                   # readings counted per patient, window and metric
//! max_readings_total = 20000           # readings one patient adds to the running totals, ever
//! ```
//!
//! The sex attribute is released as recorded at admission (F, M, X) or
//! `unknown`; an age without a recorded age is `unknown` too.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use wardflow_model::{Metric, SpecError};

/// The quasi-identifiers a study may group by, generalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    /// Age in bands whose edges the study gives.
    AgeBand,
    /// Sex as recorded at admission.
    Sex,
    /// The unit's type, by the study's map of units to types.
    UnitType,
}

impl Attribute {
    pub fn name(self) -> &'static str {
        match self {
            Attribute::AgeBand => "age_band",
            Attribute::Sex => "sex",
            Attribute::UnitType => "unit_type",
        }
    }

    fn parse(s: &str) -> Option<Attribute> {
        [Attribute::AgeBand, Attribute::Sex, Attribute::UnitType]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// The statistics a study releases per row and metric.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Statistics {
    /// Patients and readings.
    pub count: bool,
    pub mean: bool,
    pub std: bool,
    /// Quantiles as fractions (`p90` is 0.9), with their column names.
    pub quantiles: Vec<(String, f64)>,
}

/// A study, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Study {
    pub id: String,
    pub title: String,
    pub researchers: Vec<String>,
    pub metrics: Vec<Metric>,
    pub window_ms: u64,
    pub statistics: Statistics,
    pub k: u64,
    pub running_totals: bool,
    pub group_by: Vec<Attribute>,
    /// Ascending band edges, in years.
    pub age_bands: Vec<u16>,
    /// Unit to unit type.
    pub unit_types: BTreeMap<String, String>,
    pub epsilon: f64,
    pub delta: f64,
    pub windows: u64,
    pub running_total_share: f64,
    /// Per metric, the bounds each patient's window value is clamped to.
    pub clamp: BTreeMap<Metric, (f64, f64)>,
    pub max_readings: u32,
    /// With running totals: the readings one patient may add to them over
    /// the study's whole horizon (0 without running totals).
    pub max_readings_total: u64,
}

impl Study {
    /// Reads and checks a study file.
    pub fn load(file: &Path) -> Result<Study, SpecError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| SpecError::whole(file, format!("cannot read: {e}")))?;
        Self::parse(file, &text)
    }

    /// Checks one file's text.
    pub fn parse(file: &Path, text: &str) -> Result<Study, SpecError> {
        let at = |span: Range<usize>, msg: String| SpecError::at(file, text, span, msg);
        let raw: RawStudy = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), e.message().trim().to_string()))?;
        let id = raw.id.get_ref().clone();
        if id.is_empty()
            || id.chars().all(|c| c == '.')
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(at(
                raw.id.span(),
                "id: 1 to 64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let field = |span: Range<usize>, name: &str, msg: &str| {
            at(span, format!("study {id:?}: {name}: {msg}"))
        };
        if raw.researchers.get_ref().is_empty() {
            return Err(field(
                raw.researchers.span(),
                "researchers",
                "name at least one researcher account",
            ));
        }
        let mut metrics = Vec::new();
        for m in raw.metrics.get_ref() {
            let metric = Metric::from_name(m.get_ref()).ok_or_else(|| {
                field(
                    m.span(),
                    "metrics",
                    &format!(
                        "{:?} is not a metric ({})",
                        m.get_ref(),
                        Metric::ALL.map(|m| m.name()).join(", ")
                    ),
                )
            })?;
            if metrics.contains(&metric) {
                return Err(field(m.span(), "metrics", "listed twice"));
            }
            metrics.push(metric);
        }
        if metrics.is_empty() {
            return Err(field(
                raw.metrics.span(),
                "metrics",
                "name at least one metric",
            ));
        }
        let window_ms = parse_window(raw.window.get_ref())
            .map_err(|e| field(raw.window.span(), "window", &e))?;
        let mut statistics = Statistics::default();
        for s in raw.statistics.get_ref() {
            match s.get_ref().as_str() {
                "count" => statistics.count = true,
                "mean" => statistics.mean = true,
                "std" => statistics.std = true,
                q => {
                    let fraction = q
                        .strip_prefix('p')
                        .and_then(|n| n.parse::<u8>().ok())
                        .filter(|n| (1..=99).contains(n))
                        .ok_or_else(|| {
                            field(
                                s.span(),
                                "statistics",
                                &format!("{q:?} is not count, mean, std or a quantile p1 to p99"),
                            )
                        })?;
                    statistics
                        .quantiles
                        .push((q.to_string(), f64::from(fraction) / 100.0));
                }
            }
        }
        if !statistics.count
            && !statistics.mean
            && !statistics.std
            && statistics.quantiles.is_empty()
        {
            return Err(field(
                raw.statistics.span(),
                "statistics",
                "name at least one",
            ));
        }
        let k = *raw.k.get_ref();
        if k < 2 {
            return Err(field(raw.k.span(), "k", "at least 2"));
        }
        if let Some(l) = &raw.linkage
            && *l.get_ref()
        {
            return Err(field(
                l.span(),
                "linkage",
                "per-patient linkage across windows is not offered: releases are aggregates only",
            ));
        }

        let mut group_by = Vec::new();
        let (mut age_bands, mut unit_types) = (Vec::new(), BTreeMap::new());
        if let Some(c) = raw.cohort.as_ref().map(|c| c.get_ref()) {
            for a in &c.group_by {
                let attr = Attribute::parse(a.get_ref()).ok_or_else(|| {
                    field(
                        a.span(),
                        "cohort.group_by",
                        &format!("{:?} is not age_band, sex or unit_type", a.get_ref()),
                    )
                })?;
                if group_by.contains(&attr) {
                    return Err(field(a.span(), "cohort.group_by", "listed twice"));
                }
                group_by.push(attr);
            }
            if let Some(b) = &c.age_bands {
                age_bands = b.get_ref().clone();
                if age_bands.is_empty() || age_bands.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(field(
                        b.span(),
                        "cohort.age_bands",
                        "band edges in years, ascending, at least one",
                    ));
                }
            }
            if let Some(u) = &c.unit_types {
                for (ty, units) in u.get_ref() {
                    // `*` marks a margin in released rows; `|` joins keys.
                    if ty.is_empty() || ty == "*" || ty.contains('|') || ty == "other" {
                        return Err(field(
                            u.span(),
                            "cohort.unit_types",
                            &format!(
                                "{ty:?}: a unit type is named, not \"*\", \"other\" or with \"|\""
                            ),
                        ));
                    }
                    for unit in units {
                        if let Some(other) = unit_types.insert(unit.clone(), ty.clone()) {
                            return Err(field(
                                u.span(),
                                "cohort.unit_types",
                                &format!("unit {unit:?} is both {other:?} and {ty:?}"),
                            ));
                        }
                    }
                }
            }
            if group_by.contains(&Attribute::AgeBand) && age_bands.is_empty() {
                return Err(field(
                    raw.cohort_span(),
                    "cohort.age_bands",
                    "grouping by age_band needs the band edges",
                ));
            }
            if group_by.contains(&Attribute::UnitType) && unit_types.is_empty() {
                return Err(field(
                    raw.cohort_span(),
                    "cohort.unit_types",
                    "grouping by unit_type needs the map of units to types",
                ));
            }
        }

        let p = &raw.privacy;
        let epsilon = *p.epsilon.get_ref();
        if !(epsilon > 0.0 && epsilon <= 100.0) {
            return Err(field(p.epsilon.span(), "privacy.epsilon", "in (0, 100]"));
        }
        let delta = *p.delta.get_ref();
        if !(delta > 0.0 && delta < 1e-3) {
            return Err(field(
                p.delta.span(),
                "privacy.delta",
                "in (0, 0.001): well below one over the number of patients",
            ));
        }
        let windows = *p.windows.get_ref();
        if windows == 0 {
            return Err(field(p.windows.span(), "privacy.windows", "at least 1"));
        }
        let running_total_share = match &p.running_total_share {
            Some(s) if !(*s.get_ref() > 0.0 && *s.get_ref() < 1.0) => {
                return Err(field(s.span(), "privacy.running_total_share", "in (0, 1)"));
            }
            Some(s) if raw.running_totals => *s.get_ref(),
            _ if raw.running_totals => 0.2,
            _ => 0.0,
        };

        let mut clamp = BTreeMap::new();
        let mut max_readings = None;
        let mut max_readings_total = None;
        for (name, value) in raw.clamp.get_ref() {
            if name == "max_readings_total" {
                max_readings_total = value
                    .get_ref()
                    .as_integer()
                    .and_then(|n| u64::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        field(
                            value.span(),
                            "clamp.max_readings_total",
                            "a whole number, at least 1",
                        )
                    })
                    .map(Some)?;
                continue;
            }
            if name == "max_readings" {
                max_readings = value
                    .get_ref()
                    .as_integer()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        field(
                            value.span(),
                            "clamp.max_readings",
                            "a whole number, at least 1",
                        )
                    })
                    .map(Some)?;
                continue;
            }
            let metric = Metric::from_name(name).ok_or_else(|| {
                field(value.span(), "clamp", &format!("{name:?} is not a metric"))
            })?;
            let b: Vec<f64> = value
                .get_ref()
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_float().or(x.as_integer().map(|i| i as f64)))
                        .collect()
                })
                .unwrap_or_default();
            if b.len() != 2 || b[0] >= b[1] || !b.iter().all(|x| x.is_finite()) {
                return Err(field(
                    value.span(),
                    &format!("clamp.{name}"),
                    "[low, high] with low < high",
                ));
            }
            clamp.insert(metric, (b[0], b[1]));
        }
        if let Some(m) = metrics.iter().find(|m| !clamp.contains_key(m)) {
            return Err(field(
                raw.clamp.span(),
                "clamp",
                &format!(
                    "no bounds for {}: the noise is calibrated to them",
                    m.name()
                ),
            ));
        }
        let max_readings = max_readings.ok_or_else(|| {
            field(
                raw.clamp.span(),
                "clamp.max_readings",
                "missing: the readings counted per patient, window and metric",
            )
        })?;

        let max_readings_total = match (raw.running_totals, max_readings_total) {
            (true, Some(n)) => n,
            (true, None) => {
                return Err(field(
                    raw.clamp.span(),
                    "clamp.max_readings_total",
                    "running totals need it: the readings one patient may add to them over the whole study (the noise is calibrated to it)",
                ));
            }
            (false, _) => 0,
        };

        Ok(Study {
            id: id.clone(),
            title: raw.title,
            researchers: raw.researchers.into_inner(),
            metrics,
            window_ms,
            statistics,
            k,
            running_totals: raw.running_totals,
            group_by,
            age_bands,
            unit_types,
            epsilon,
            delta,
            windows,
            running_total_share,
            clamp,
            max_readings,
            max_readings_total,
        })
    }

    /// A patient's cohort cell: one generalized value per grouping
    /// attribute, in `group_by` order.
    pub fn cell_of(&self, age_years: Option<u16>, sex: Option<&str>, unit: &str) -> Vec<String> {
        self.group_by
            .iter()
            .map(|a| match a {
                Attribute::AgeBand => age_band(&self.age_bands, age_years),
                Attribute::Sex => sex.unwrap_or("unknown").to_string(),
                Attribute::UnitType => self
                    .unit_types
                    .get(unit)
                    .cloned()
                    .unwrap_or_else(|| "other".into()),
            })
            .collect()
    }

    /// Whether `researcher` may read the study.
    pub fn admits(&self, researcher: &str) -> bool {
        self.researchers.iter().any(|r| r == researcher)
    }

    /// The consent purpose that lets a patient's data into the study.
    pub fn purpose(&self) -> String {
        format!("research:{}", self.id)
    }
}

/// The band an age falls in: `<18`, `18-39`, …, `80+`, or `unknown`.
fn age_band(edges: &[u16], age: Option<u16>) -> String {
    let Some(age) = age else {
        return "unknown".into();
    };
    match edges.iter().position(|&e| age < e) {
        Some(0) => format!("<{}", edges[0]),
        Some(i) => format!("{}-{}", edges[i - 1], edges[i] - 1),
        None => format!("{}+", edges[edges.len() - 1]),
    }
}

/// A window length: whole seconds from 1 s to 1 day.
fn parse_window(text: &str) -> Result<u64, String> {
    let d: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 1m or 1h"))?;
    let ms = d.as_millis();
    if !(1000..=86_400_000).contains(&ms) || ms % 1000 != 0 {
        return Err("whole seconds, from 1s to 24h".into());
    }
    Ok(ms as u64)
}

// ---- the raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStudy {
    id: Spanned<String>,
    #[serde(default)]
    title: String,
    researchers: Spanned<Vec<String>>,
    metrics: Spanned<Vec<Spanned<String>>>,
    window: Spanned<String>,
    statistics: Spanned<Vec<Spanned<String>>>,
    k: Spanned<u64>,
    #[serde(default)]
    running_totals: bool,
    linkage: Option<Spanned<bool>>,
    cohort: Option<Spanned<RawCohort>>,
    privacy: RawPrivacy,
    clamp: Spanned<BTreeMap<String, Spanned<toml::Value>>>,
}

impl RawStudy {
    fn cohort_span(&self) -> Range<usize> {
        self.cohort.as_ref().map_or(0..0, |c| c.span())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohort {
    #[serde(default)]
    group_by: Vec<Spanned<String>>,
    age_bands: Option<Spanned<Vec<u16>>>,
    unit_types: Option<Spanned<BTreeMap<String, Vec<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    epsilon: Spanned<f64>,
    delta: Spanned<f64>,
    windows: Spanned<u64>,
    running_total_share: Option<Spanned<f64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
id = "icu-hr"
title = "Heart rate by age band"
researchers = ["r-one"]
metrics = ["hr", "spo2"]
window = "1m"
statistics = ["count", "mean", "std", "p50", "p90"]
k = 5
running_totals = true

[cohort]
group_by = ["age_band", "sex", "unit_type"]
age_bands = [18, 40, 65, 80]
unit_types = { icu = ["icu-a", "icu-b"], step-down = ["sdu-1"] }

[privacy]
epsilon = 10.0
delta = 1e-6
windows = 1440

[clamp]
hr = [30, 200]
spo2 = [70, 100]
max_readings = 120
max_readings_total = 20000
"#;

    fn parse(text: &str) -> Result<Study, SpecError> {
        Study::parse(Path::new("study.toml"), text)
    }

    #[test]
    fn the_example_parses() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.id, "icu-hr");
        assert_eq!(s.metrics, vec![Metric::Hr, Metric::Spo2]);
        assert_eq!(s.window_ms, 60_000);
        assert_eq!(
            s.statistics.quantiles,
            vec![("p50".into(), 0.5), ("p90".into(), 0.9)]
        );
        assert!(s.statistics.count && s.statistics.mean && s.statistics.std);
        assert_eq!(s.running_total_share, 0.2);
        assert_eq!(s.clamp[&Metric::Spo2], (70.0, 100.0));
        assert_eq!(s.purpose(), "research:icu-hr");
        assert_eq!(
            s.cell_of(Some(70), Some("F"), "icu-b"),
            vec!["65-79", "F", "icu"]
        );
        assert_eq!(
            s.cell_of(Some(12), None, "ward-9"),
            vec!["<18", "unknown", "other"]
        );
        assert_eq!(s.cell_of(Some(90), Some("M"), "sdu-1")[0], "80+");
        assert_eq!(s.cell_of(None, Some("M"), "sdu-1")[0], "unknown");
        assert_eq!(s.cell_of(Some(18), Some("M"), "sdu-1")[0], "18-39");
    }

    #[test]
    fn errors_name_line_and_field() {
        let bad = EXAMPLE.replace("k = 5", "k = 1");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("k: at least 2"), "{e}");

        let bad = EXAMPLE.replace(r#""hr", "spo2"]"#, r#""hr", "pulse"]"#);
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(
            e.message.contains("metrics") && e.message.contains("pulse"),
            "{e}"
        );

        let bad = EXAMPLE.replace("spo2 = [70, 100]\n", "");
        let e = parse(&bad).unwrap_err();
        assert!(e.message.contains("no bounds for spo2"), "{e}");

        let bad = EXAMPLE.replace("delta = 1e-6", "delta = 0.5");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, 18, "{e}");
        assert!(e.message.contains("privacy.delta"), "{e}");

        let bad = EXAMPLE.replace("window = \"1m\"", "window = \"1500ms\"");
        assert!(parse(&bad).unwrap_err().message.contains("window"));

        let bad = EXAMPLE.replace("age_bands = [18, 40, 65, 80]", "age_bands = [40, 18]");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line, 13, "{e}");

        let bad = EXAMPLE.replace("k = 5", "k = 5\nlinkage = true");
        assert!(parse(&bad).unwrap_err().message.contains("linkage"));

        let bad = EXAMPLE.replace("k = 5", "kk = 5");
        let e = parse(&bad).unwrap_err();
        assert!(e.message.contains("kk"), "{e}");
        assert_eq!(e.line, 8, "{e}");
    }
}
