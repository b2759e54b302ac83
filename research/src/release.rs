//! One window's release for one study: from each consenting patient's
//! readings in the window to a record batch of noisy, k-anonymous rows.
//!
//! Per metric, each patient contributes one value, the mean of their
//! readings in the window clamped to the study's bounds, and a reading
//! count capped at `max_readings`: so adding or removing one patient
//! changes a row's patients by 1, its readings by at most `max_readings`,
//! its centred sum by at most half the bounds' width `h`, and its centred
//! sum of squares by at most `h²`. A patient is in one cohort cell per
//! window (by their admission at the window's end) and so in `rows` rows:
//! the cell, one margin per attribute when there are two or more, and the
//! total. Each statistic family is a Gaussian mechanism over all rows with
//! L2 sensitivity `Δ·√rows`, and each quantile an exponential mechanism of
//! ε = √(2ρ/rows) per row ([`crate::privacy`]); the window's ρ is split
//! evenly among the families, and charged before anything is released.
//!
//! Running totals (cumulative readings per row) use the binary tree
//! mechanism, one tree per metric and row, charged once for the study's
//! horizon; a row adds its window's readings to its tree only in windows
//! where it is published, so a total never holds a suppressed count. The
//! unit of privacy is the same one patient: each patient adds at most
//! `max_readings_total` readings per metric to the totals over the whole
//! study (then no more), and since the nodes of one tree level partition
//! its leaves, one patient moves the nodes of a level by at most that much
//! in L2, and the whole tree by `√levels` times it.
//!
//! What leaves: window bounds, the cohort values, the metric and the
//! noisy statistics. No patient, device or bed id is in any row.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use wardflow_model::Metric;

use crate::privacy::{
    Accountant, BinaryTree, Exhausted, Noise, dp_quantile, gaussian_sigma, pure_epsilon, rho_for,
};
use crate::spec::Study;
use crate::suppress::{CellCount, plan};

/// Who a patient is, for cohorting: their admission.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cohort {
    pub age_years: Option<u16>,
    pub sex: Option<String>,
    pub unit: String,
}

/// One patient's readings in one window, per metric: (count, sum).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contribution {
    pub cohort: Cohort,
    pub metrics: [(u32, f64); Metric::COUNT],
}

/// How a study's budget is spent: fixed by its file, so the same for
/// every window whatever the data.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPlan {
    pub rho_total: f64,
    /// Charged at every window.
    pub rho_window: f64,
    /// Charged once, for the running totals' whole horizon.
    pub rho_tree: f64,
    /// The rows one patient is in per window.
    pub rows: usize,
    /// Noise of each statistic, per metric (the clamp bounds differ).
    pub sigma_patients: f64,
    pub sigma_readings: f64,
    pub sigma_sum: BTreeMap<Metric, f64>,
    pub sigma_sumsq: BTreeMap<Metric, f64>,
    /// ε of each quantile's exponential mechanism, per row.
    pub quantile_epsilon: f64,
    pub sigma_tree: f64,
}

impl BudgetPlan {
    pub fn new(study: &Study) -> BudgetPlan {
        let rho_total = rho_for(study.epsilon, study.delta);
        let rho_tree = rho_total * study.running_total_share;
        let rho_window = (rho_total - rho_tree) / study.windows as f64;
        let d = study.group_by.len();
        let rows = 1 + usize::from(d >= 1) + if d >= 2 { d } else { 0 };
        let s = &study.statistics;
        let per_metric = 1
            + usize::from(s.count)
            + usize::from(s.mean || s.std)
            + usize::from(s.std)
            + s.quantiles.len();
        let families = per_metric * study.metrics.len();
        let rho_family = rho_window / families as f64;
        let sqrt_rows = (rows as f64).sqrt();
        let sigma = |delta: f64| gaussian_sigma(delta * sqrt_rows, rho_family);
        let half = |m: &Metric| {
            let (lo, hi) = study.clamp[m];
            (hi - lo) / 2.0
        };
        let sigma_tree = if study.running_totals {
            BinaryTree::sigma_for(
                study.max_readings_total as f64 * sqrt_rows,
                rho_tree / study.metrics.len() as f64,
                study.windows,
            )
        } else {
            0.0
        };
        BudgetPlan {
            rho_total,
            rho_window,
            rho_tree,
            rows,
            sigma_patients: sigma(1.0),
            sigma_readings: sigma(f64::from(study.max_readings)),
            sigma_sum: study.metrics.iter().map(|m| (*m, sigma(half(m)))).collect(),
            sigma_sumsq: study
                .metrics
                .iter()
                .map(|m| (*m, sigma(half(m) * half(m))))
                .collect(),
            quantile_epsilon: pure_epsilon(rho_family / rows as f64),
            sigma_tree,
        }
    }
}

/// A study's privacy state, kept durably: what was charged, and the
/// running totals' trees (their noise, once drawn, is kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyState {
    pub accountant: Accountant,
    pub windows_released: u64,
    /// The end of the last window released (ms).
    pub last_end_ms: u64,
    /// Whether the running totals' horizon was charged.
    pub tree_charged: bool,
    /// Per metric and row key (`metric|v1|v2…`).
    pub trees: BTreeMap<String, BinaryTree>,
    #[serde(default)]
    pub closed: bool,
    /// Per `metric|patient`: readings added to the running totals so far
    /// (bounded by the study's `max_readings_total`). Never released.
    #[serde(default)]
    pub totals_used: BTreeMap<String, u64>,
}

impl StudyState {
    pub fn new(plan: &BudgetPlan) -> StudyState {
        StudyState {
            accountant: Accountant::new(plan.rho_total),
            windows_released: 0,
            last_end_ms: 0,
            tree_charged: false,
            trees: BTreeMap::new(),
            closed: false,
            totals_used: BTreeMap::new(),
        }
    }

    /// Whether another window can be released.
    pub fn can_release(&self, plan: &BudgetPlan) -> bool {
        !self.closed
            && self.accountant.can_charge(
                plan.rho_window
                    + if self.tree_charged {
                        0.0
                    } else {
                        plan.rho_tree
                    },
            )
    }
}

/// The columns of a study's rows.
pub fn schema(study: &Study) -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
    ];
    for a in &study.group_by {
        fields.push(Field::new(a.name(), DataType::Utf8, false));
    }
    fields.push(Field::new("metric", DataType::Utf8, false));
    fields.push(Field::new("patients", DataType::Float64, false));
    if study.statistics.count {
        fields.push(Field::new("readings", DataType::Float64, false));
    }
    if study.statistics.mean {
        fields.push(Field::new("mean", DataType::Float64, true));
    }
    if study.statistics.std {
        fields.push(Field::new("std", DataType::Float64, true));
    }
    for (name, _) in &study.statistics.quantiles {
        fields.push(Field::new(name, DataType::Float64, true));
    }
    if study.running_totals {
        fields.push(Field::new("readings_total", DataType::Float64, true));
    }
    Arc::new(Schema::new(fields))
}

/// A window released.
#[derive(Debug, Clone)]
pub struct Released {
    pub start_ms: u64,
    pub end_ms: u64,
    pub batch: RecordBatch,
    /// The patients whose data is in at least one published row: each
    /// contributed one window (the basis of their compensation). Never
    /// released.
    pub contributors: BTreeSet<String>,
    /// Rows the k rule withheld, and rows withheld to protect them.
    pub suppressed: (usize, usize),
}

/// Releases one window: charges the budget, then computes the rows.
/// `contributions` holds only patients whose research consent covered
/// the window. On `Exhausted` nothing is charged or released.
pub fn release_window(
    study: &Study,
    budget: &BudgetPlan,
    state: &mut StudyState,
    start_ms: u64,
    end_ms: u64,
    contributions: &BTreeMap<String, Contribution>,
    noise: &mut Noise,
) -> Result<Released, Exhausted> {
    if !state.tree_charged && study.running_totals {
        // The horizon's cost and the first window's go together, or neither.
        let mut trial = state.accountant.clone();
        trial.charge(budget.rho_tree)?;
        trial.charge(budget.rho_window)?;
        state.accountant = trial;
        state.tree_charged = true;
    } else {
        state.accountant.charge(budget.rho_window)?;
    }
    state.windows_released += 1;
    state.last_end_ms = end_ms;

    let d = study.group_by.len();
    let mut out = Columns::new(d);
    let mut contributors = BTreeSet::new();
    let mut suppressed = (0, 0);
    for &metric in &study.metrics {
        let (lo, hi) = study.clamp[&metric];
        let mid = (lo + hi) / 2.0;
        // Per fine cell: each patient's (capped readings, clamped value).
        let mut cells: BTreeMap<Vec<String>, Vec<(&str, f64, f64)>> = BTreeMap::new();
        // What each patient may still add to the running totals.
        let totals_key = |p: &str| format!("{}|{p}", metric.name());
        let room = |p: &str, readings: f64| -> f64 {
            let used = state.totals_used.get(&totals_key(p)).copied().unwrap_or(0);
            readings.min(study.max_readings_total.saturating_sub(used) as f64)
        };
        let mut added: BTreeMap<&str, f64> = BTreeMap::new();
        for (patient, c) in contributions {
            let (n, sum) = c.metrics[metric as usize];
            if n == 0 {
                continue;
            }
            let value = (sum / f64::from(n)).clamp(lo, hi);
            let readings = f64::from(n.min(study.max_readings));
            let key = study.cell_of(c.cohort.age_years, c.cohort.sex.as_deref(), &c.cohort.unit);
            if study.running_totals {
                added.insert(patient.as_str(), room(patient, readings));
            }
            cells
                .entry(key)
                .or_default()
                .push((patient.as_str(), readings, value));
        }
        let mut in_totals = BTreeSet::new();
        let counts: Vec<CellCount> = cells
            .iter()
            .map(|(key, ps)| CellCount {
                key: key.clone(),
                patients: ps.len() as u64,
            })
            .collect();
        let table = plan(&counts, d, study.k);
        suppressed.0 += table.primary;
        suppressed.1 += table.complementary;
        for (key, patients) in table.published(&counts, d) {
            // The members of a published row: the fine cells it sums.
            let members: Vec<&(&str, f64, f64)> = cells
                .iter()
                .filter(|(cell, _)| cell.iter().zip(&key).all(|(c, k)| k == "*" || c == k))
                .flat_map(|(_, ps)| ps.iter())
                .collect();
            debug_assert_eq!(members.len() as u64, patients);
            contributors.extend(members.iter().map(|(p, _, _)| p.to_string()));
            // Counts are released at 0 or more: post-processing, free.
            let n = (members.len() as f64 + noise.gaussian(budget.sigma_patients)).max(0.0);
            let denom = n.max(1.0);
            let readings: f64 = members.iter().map(|m| m.1).sum();
            let centred: f64 = members.iter().map(|m| m.2 - mid).sum();
            let sum = centred + noise.gaussian(budget.sigma_sum[&metric]);
            let squares: f64 = members.iter().map(|m| (m.2 - mid).powi(2)).sum::<f64>()
                + noise.gaussian(budget.sigma_sumsq[&metric]);
            let mean = (mid + sum / denom).clamp(lo, hi);
            let var = (squares / denom - (sum / denom).powi(2)).max(0.0);
            let mut values: Vec<f64> = members.iter().map(|m| m.2).collect();
            let quantiles: Vec<f64> = study
                .statistics
                .quantiles
                .iter()
                .map(|(_, q)| dp_quantile(&mut values, *q, lo, hi, budget.quantile_epsilon, noise))
                .collect();
            let total = study.running_totals.then(|| {
                let leaf: f64 = members.iter().map(|m| added[m.0]).sum();
                in_totals.extend(members.iter().map(|m| m.0));
                let tree_key = format!("{}|{}", metric.name(), key.join("|"));
                let tree = state
                    .trees
                    .entry(tree_key)
                    .or_insert_with(|| BinaryTree::new(budget.sigma_tree, study.windows));
                tree.push(leaf, noise).map(|t| t.max(0.0))
            });
            out.push(Row {
                key,
                metric: metric.name(),
                patients: n,
                readings: (readings + noise.gaussian(budget.sigma_readings)).max(0.0),
                mean,
                std: var.sqrt().min(hi - lo),
                quantiles,
                total: total.flatten(),
            });
        }
        // Charged to each patient's allowance once per window, however
        // many published rows hold them.
        for p in in_totals {
            *state.totals_used.entry(totals_key(p)).or_default() += added[p] as u64;
        }
    }
    Ok(Released {
        start_ms,
        end_ms,
        batch: out.finish(study, start_ms, end_ms),
        contributors,
        suppressed,
    })
}

struct Row {
    key: Vec<String>,
    metric: &'static str,
    patients: f64,
    readings: f64,
    mean: f64,
    std: f64,
    quantiles: Vec<f64>,
    total: Option<f64>,
}

/// Rows gathered column by column.
struct Columns {
    keys: Vec<Vec<String>>,
    rows: Vec<Row>,
}

impl Columns {
    fn new(d: usize) -> Columns {
        Columns {
            keys: vec![Vec::new(); d],
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Row) {
        for (col, v) in self.keys.iter_mut().zip(&row.key) {
            col.push(v.clone());
        }
        self.rows.push(row);
    }

    fn finish(self, study: &Study, start_ms: u64, end_ms: u64) -> RecordBatch {
        let n = self.rows.len();
        let ts = |v: u64| {
            Arc::new(TimestampMillisecondArray::from(vec![v as i64; n]).with_timezone("UTC"))
                as ArrayRef
        };
        let f64s = |f: &dyn Fn(&Row) -> f64| {
            Arc::new(Float64Array::from_iter_values(self.rows.iter().map(f))) as ArrayRef
        };
        let mut cols: Vec<ArrayRef> = vec![ts(start_ms), ts(end_ms)];
        for k in &self.keys {
            cols.push(Arc::new(StringArray::from_iter_values(k)));
        }
        cols.push(Arc::new(StringArray::from_iter_values(
            self.rows.iter().map(|r| r.metric),
        )));
        cols.push(f64s(&|r| r.patients));
        if study.statistics.count {
            cols.push(f64s(&|r| r.readings));
        }
        if study.statistics.mean {
            cols.push(f64s(&|r| r.mean));
        }
        if study.statistics.std {
            cols.push(f64s(&|r| r.std));
        }
        for i in 0..study.statistics.quantiles.len() {
            cols.push(f64s(&|r| r.quantiles[i]));
        }
        if study.running_totals {
            cols.push(Arc::new(Float64Array::from_iter(
                self.rows.iter().map(|r| r.total),
            )));
        }
        RecordBatch::try_new(schema(study), cols).expect("the columns match the schema")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const STUDY: &str = r#"
id = "t"
researchers = ["r"]
metrics = ["hr"]
window = "10s"
statistics = ["count", "mean", "std", "p50"]
k = 3
running_totals = true
[cohort]
group_by = ["sex"]
[privacy]
epsilon = 50.0
delta = 1e-6
windows = 5
[clamp]
hr = [30, 200]
max_readings = 10
max_readings_total = 1000
"#;

    fn study() -> Study {
        Study::parse(Path::new("t.toml"), STUDY).unwrap()
    }

    /// 12 F and 8 M patients, each with 10 readings averaging 80.
    fn contributions() -> BTreeMap<String, Contribution> {
        (0..20)
            .map(|i| {
                let mut metrics = [(0, 0.0); Metric::COUNT];
                metrics[Metric::Hr as usize] = (10, 800.0);
                (
                    format!("p{i}"),
                    Contribution {
                        cohort: Cohort {
                            age_years: Some(50),
                            sex: Some(if i < 12 { "F" } else { "M" }.into()),
                            unit: "icu".into(),
                        },
                        metrics,
                    },
                )
            })
            .collect()
    }

    /// Releases window `w` (10 s windows from 0).
    fn release_nth(
        s: &Study,
        plan: &BudgetPlan,
        state: &mut StudyState,
        w: u64,
        data: &BTreeMap<String, Contribution>,
        noise: &mut Noise,
    ) -> Released {
        release_window(s, plan, state, w * 10_000, (w + 1) * 10_000, data, noise).unwrap()
    }

    fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .iter()
            .map(|v| v.unwrap().to_string())
            .collect()
    }

    fn column(b: &RecordBatch, name: &str) -> Vec<f64> {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .values()
            .to_vec()
    }

    /// The released noise has the scale the budget plan states: over 4000
    /// releases of the same window, the sample standard deviation of the
    /// error in every row's patients and readings is within 5 % of the
    /// plan's σ (the standard error of a sample sd over 12 000 draws is
    /// under 0.7 %), and its mean within 4 standard errors of 0. The
    /// budget is large enough that the true counts lie more than 6 σ above
    /// 0, where released counts are floored.
    #[test]
    fn released_noise_matches_the_plan() {
        let s = study();
        let plan = BudgetPlan::new(&s);
        assert_eq!(plan.rows, 2);
        let data = contributions();
        let mut noise = Noise::seeded(11);
        let (mut patients, mut readings) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let mut state = StudyState::new(&plan);
            let r = release_window(&s, &plan, &mut state, 0, 10_000, &data, &mut noise).unwrap();
            assert_eq!(strings(&r.batch, "sex"), ["F", "M", "*"]);
            let truth = [12.0, 8.0, 20.0];
            for (i, p) in column(&r.batch, "patients").into_iter().enumerate() {
                patients.push(p - truth[i]);
            }
            for (i, n) in column(&r.batch, "readings").into_iter().enumerate() {
                readings.push(n - truth[i] * 10.0);
            }
            for m in column(&r.batch, "mean") {
                assert!((30.0..=200.0).contains(&m));
            }
        }
        for (errors, sigma) in [
            (&patients, plan.sigma_patients),
            (&readings, plan.sigma_readings),
        ] {
            let n = errors.len() as f64;
            let mean = errors.iter().sum::<f64>() / n;
            let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            assert!((sd / sigma - 1.0).abs() < 0.05, "sd {sd} against σ {sigma}");
            assert!(mean.abs() < 4.0 * sigma / n.sqrt(), "mean error {mean}");
        }
    }

    /// Every window costs the same, the running totals' horizon is charged
    /// with the first, the total never exceeds the budget, and the window
    /// after the last one the budget covers is refused with nothing changed.
    #[test]
    fn the_budget_covers_exactly_its_windows() {
        let s = study();
        let plan = BudgetPlan::new(&s);
        let mut state = StudyState::new(&plan);
        let mut noise = Noise::seeded(3);
        let data = contributions();
        for w in 0..s.windows {
            assert!(state.can_release(&plan));
            release_nth(&s, &plan, &mut state, w, &data, &mut noise);
            let expected = plan.rho_tree + (w + 1) as f64 * plan.rho_window;
            assert!((state.accountant.spent_rho - expected).abs() < 1e-9 * plan.rho_total);
            assert!(state.accountant.spent_epsilon(s.delta) <= s.epsilon * (1.0 + 1e-9));
        }
        assert!(!state.can_release(&plan));
        let before = state.clone();
        assert!(release_window(&s, &plan, &mut state, 0, 1, &data, &mut noise).is_err());
        assert_eq!(state, before);
        assert_eq!(state.windows_released, s.windows);
    }

    /// Each patient adds at most `max_readings_total` to the running
    /// totals over the study: 10 readings a window against an allowance of
    /// 1000 stops after 100 windows' worth; here, after a few windows
    /// with the allowance lowered to 25, every patient has used exactly 25.
    #[test]
    fn running_totals_respect_each_patients_allowance() {
        let mut s = study();
        s.max_readings_total = 25;
        s.windows = 10;
        let plan = BudgetPlan::new(&s);
        let mut state = StudyState::new(&plan);
        let data = contributions();
        let mut noise = Noise::seeded(5);
        for w in 0..4 {
            release_nth(&s, &plan, &mut state, w, &data, &mut noise);
        }
        assert_eq!(state.totals_used.len(), 20);
        assert!(
            state.totals_used.values().all(|&n| n == 25),
            "{:?}",
            state.totals_used
        );
    }

    /// A cell below k is withheld, and so is one more to protect it.
    #[test]
    fn rows_below_k_are_withheld() {
        let s = study();
        let plan = BudgetPlan::new(&s);
        let mut data = contributions();
        // Leave two M patients: below k = 3.
        data.retain(|p, _| p.as_str() < "p14" || p.len() == 2);
        let men = data
            .values()
            .filter(|c| c.cohort.sex.as_deref() == Some("M"))
            .count();
        assert_eq!(men, 2);
        let mut state = StudyState::new(&plan);
        let r = release_window(
            &s,
            &plan,
            &mut state,
            0,
            10_000,
            &data,
            &mut Noise::seeded(1),
        )
        .unwrap();
        let sex = strings(&r.batch, "sex");
        // M (2) is withheld; F alone would give M away through the total,
        // so F is withheld too, and the total (14) stays.
        assert_eq!(sex, ["*"]);
        assert_eq!(r.suppressed, (1, 1));
        assert_eq!(r.contributors.len(), 14);
    }
}
