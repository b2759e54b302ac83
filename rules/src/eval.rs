//! Evaluating a rule set for one patient, reading by reading: the
//! patient's latest values, the state of every rule's condition, and the
//! condition changes (raised, changed, cleared) that alarm management
//! turns into alerts.
//!
//! Times are nanoseconds since the epoch: a reading's own time for
//! conditions on values, the receipt time for missing data (so a device's
//! clock cannot hide its silence), and the engine's clock for ticks.
//! Readings flagged QUESTIONABLE (a monitor's signal-quality index says the
//! value is unreliable) do not feed conditions on values, but they do show
//! the device is sending.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use wardflow_model::{Metric, Quality, Reading};

use crate::news2::{self, Acvpu, News2Parts, News2Score, Oxygen, Risk, Spo2Scale};
use crate::spec::{Cond, MissingTarget, News2Rule, Rule, RuleKind, RuleSet};
use crate::{Direction, Priority};

/// A value older than this no longer feeds threshold conditions: a
/// disconnected sensor's last value must not keep an alarm alive (the
/// missing-data rules say the sensor is silent).
pub const STALE_AFTER_NS: i64 = 120_000_000_000;

/// One value behind an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// A metric name, or `news2`, `consciousness`, `oxygen`, `spo2_scale`.
    pub name: String,
    pub value: f64,
    /// When it was measured (ns since the epoch).
    pub time_ns: i64,
    /// Extra words: a NEWS2 parameter's score, "assumed", "last seen".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A change in a rule's condition for the patient.
#[derive(Debug, Clone, PartialEq)]
pub enum CondEvent {
    Raised {
        rule: usize,
        priority: Priority,
        /// The time of the first reading that met the condition.
        first_ns: i64,
        at_ns: i64,
        evidence: Vec<Evidence>,
    },
    /// Still present, at another priority (NEWS2 moved band).
    Changed {
        rule: usize,
        priority: Priority,
        at_ns: i64,
        evidence: Vec<Evidence>,
    },
    Cleared {
        rule: usize,
        at_ns: i64,
    },
}

/// A manual observation (`wardflow observe`): what monitors cannot measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ManualObservation {
    pub consciousness: Option<Acvpu>,
    pub oxygen: Option<Oxygen>,
    pub spo2_scale: Option<Spo2Scale>,
    pub time_ns: i64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t: i64,
    v: f64,
}

#[derive(Debug, Clone, Default)]
enum CondState {
    #[default]
    Leaf,
    /// A threshold's hysteresis: inside the alarm band.
    Inside(bool),
    Children(Vec<CondState>),
}

impl CondState {
    fn for_cond(c: &Cond) -> CondState {
        match c {
            Cond::Threshold { .. } => CondState::Inside(false),
            Cond::All(cs) | Cond::Any(cs) => {
                CondState::Children(cs.iter().map(CondState::for_cond).collect())
            }
            _ => CondState::Leaf,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct RuleState {
    cond: CondState,
    /// Sustain: start of the current run of true samples, samples in it,
    /// and the last true sample.
    since: Option<i64>,
    count: u64,
    last_true: i64,
    /// The priority the rule currently alarms at (None: not present).
    present: Option<Priority>,
    /// NEWS2: since when the band has been at least low, medium, high.
    band_since: [Option<i64>; 3],
}

/// A metric's recent history at one-second resolution, for rate-of-change
/// conditions over windows of minutes: the least and greatest value of each
/// closed second, kept per window in monotonic queues (the sliding-window
/// minimum), so a reading costs amortized O(1) whatever the window or the
/// sampling rate.
#[derive(Debug, Clone, Default)]
struct Trend {
    /// The open second: (second, least, greatest).
    current: Option<(i64, f64, f64)>,
    /// The oldest second seen (for "is the window half full").
    first: Option<i64>,
    windows: Vec<Window>,
}

/// One window's monotonic queues of closed seconds: lows increasing from
/// the front, highs decreasing, so each front is the window's extreme.
#[derive(Debug, Clone, Default)]
struct Window {
    seconds: i64,
    lows: VecDeque<(i64, f64)>,
    highs: VecDeque<(i64, f64)>,
}

impl Window {
    fn close(&mut self, sec: i64, low: f64, high: f64) {
        while self.lows.back().is_some_and(|b| b.1 >= low) {
            self.lows.pop_back();
        }
        self.lows.push_back((sec, low));
        while self.highs.back().is_some_and(|b| b.1 <= high) {
            self.highs.pop_back();
        }
        self.highs.push_back((sec, high));
    }

    fn expire(&mut self, newest: i64) {
        let oldest = newest - self.seconds;
        while self.lows.front().is_some_and(|f| f.0 < oldest) {
            self.lows.pop_front();
        }
        while self.highs.front().is_some_and(|f| f.0 < oldest) {
            self.highs.pop_front();
        }
    }
}

impl Trend {
    fn new(windows_ns: &[i64]) -> Trend {
        let mut seconds: Vec<i64> = windows_ns.iter().map(|w| ceil_s(*w)).collect();
        seconds.sort_unstable();
        seconds.dedup();
        Trend {
            current: None,
            first: None,
            windows: seconds
                .into_iter()
                .map(|seconds| Window {
                    seconds,
                    ..Window::default()
                })
                .collect(),
        }
    }

    fn push(&mut self, t: i64, v: f64) {
        let sec = t.div_euclid(1_000_000_000);
        self.first.get_or_insert(sec);
        match &mut self.current {
            // The open second, or a late reading (joins the open second).
            Some(c) if c.0 >= sec => {
                c.1 = c.1.min(v);
                c.2 = c.2.max(v);
            }
            Some(c) => {
                let (closed, low, high) = *c;
                for w in &mut self.windows {
                    w.close(closed, low, high);
                    w.expire(sec);
                }
                *c = (sec, v, v);
            }
            None => self.current = Some((sec, v, v)),
        }
    }

    /// The least and greatest value within `window_ns` of the newest
    /// second, and how many seconds of history there are.
    fn extremes(&self, window_ns: i64) -> Option<(f64, f64, i64)> {
        let (newest, low, high) = self.current?;
        let ws = ceil_s(window_ns);
        let w = self.windows.iter().find(|w| w.seconds == ws)?;
        let oldest = newest - ws;
        let lo = w
            .lows
            .iter()
            .find(|x| x.0 >= oldest)
            .map_or(low, |x| x.1.min(low));
        let hi = w
            .highs
            .iter()
            .find(|x| x.0 >= oldest)
            .map_or(high, |x| x.1.max(high));
        Some((lo, hi, newest - self.first.unwrap_or(newest)))
    }
}

/// One patient's state under a rule set.
#[derive(Debug, Clone)]
pub struct PatientMonitor {
    latest: [Option<Sample>; Metric::COUNT],
    last_received: [Option<i64>; Metric::COUNT],
    trends: Vec<Option<Trend>>,
    /// For each metric, the rules that read it.
    readers: Vec<Vec<usize>>,
    /// The rules that depend on time passing.
    timed: Vec<usize>,
    devices: Vec<(String, i64)>,
    manual: Option<ManualObservation>,
    states: Vec<RuleState>,
    /// NEWS2 parameter scores of the latest samples, each with what it was
    /// computed from (time, value, SpO2 scale, oxygen).
    part_scores: [std::cell::Cell<Option<(PartKey, u8)>>; Metric::COUNT],
}

type PartKey = (i64, u64, Spo2Scale, Oxygen);

impl PatientMonitor {
    pub fn new(rules: &RuleSet) -> PatientMonitor {
        let mut windows: Vec<Vec<i64>> = vec![Vec::new(); Metric::COUNT];
        for r in &rules.rules {
            if let RuleKind::Condition(c) = &r.kind {
                rate_windows(c, &mut windows);
            }
        }
        let readers = Metric::ALL
            .iter()
            .map(|&m| {
                rules
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| rule_reads(r, m))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let timed = rules
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(&r.kind, RuleKind::Condition(c) if c.is_timed()))
            .map(|(i, _)| i)
            .collect();
        PatientMonitor {
            latest: [None; Metric::COUNT],
            last_received: [None; Metric::COUNT],
            trends: windows
                .iter()
                .map(|w| (!w.is_empty()).then(|| Trend::new(w)))
                .collect(),
            readers,
            timed,
            part_scores: Default::default(),
            devices: Vec::new(),
            manual: None,
            states: rules
                .rules
                .iter()
                .map(|r| RuleState {
                    cond: match &r.kind {
                        RuleKind::Condition(c) => CondState::for_cond(c),
                        RuleKind::News2(_) => CondState::Leaf,
                    },
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// Marks a rule's condition as present without raising it again: for
    /// alerts restored after a restart, whose condition is presumed to hold
    /// until a reading shows otherwise.
    pub fn assume_present(&mut self, rule: usize, priority: Priority) {
        if let Some(s) = self.states.get_mut(rule) {
            s.present = Some(priority);
        }
    }

    /// The latest manual observation.
    pub fn manual(&self) -> Option<&ManualObservation> {
        self.manual.as_ref()
    }

    /// Feeds one reading from `device`, received at `received_ns`, and
    /// evaluates the rules that read its metric.
    pub fn on_reading(
        &mut self,
        rules: &RuleSet,
        applies: &[bool],
        device: &str,
        received_ns: i64,
        r: &Reading,
        out: &mut Vec<CondEvent>,
    ) {
        let m = r.metric as usize;
        self.last_received[m] =
            Some(self.last_received[m].map_or(received_ns, |t| t.max(received_ns)));
        match self.devices.iter_mut().find(|(d, _)| d == device) {
            Some((_, t)) => *t = (*t).max(received_ns),
            None => self.devices.push((device.to_string(), received_ns)),
        }
        if r.quality.contains(Quality::QUESTIONABLE) {
            return;
        }
        let s = Sample {
            t: r.time_ns,
            v: r.value,
        };
        // Out-of-order readings update the history, not the latest value.
        if self.latest[m].is_none_or(|l| l.t <= s.t) {
            self.latest[m] = Some(s);
        }
        if let Some(t) = &mut self.trends[m] {
            t.push(s.t, s.v);
        }
        for k in 0..self.readers[m].len() {
            let i = self.readers[m][k];
            if applies.get(i).copied().unwrap_or(false) {
                self.evaluate(rules, i, r.time_ns, out);
            }
        }
    }

    /// Records a manual observation and re-evaluates NEWS2 rules.
    pub fn on_manual(
        &mut self,
        rules: &RuleSet,
        applies: &[bool],
        obs: ManualObservation,
        out: &mut Vec<CondEvent>,
    ) {
        let merged = match self.manual {
            Some(prev) => ManualObservation {
                consciousness: obs.consciousness.or(prev.consciousness),
                oxygen: obs.oxygen.or(prev.oxygen),
                spo2_scale: obs.spo2_scale.or(prev.spo2_scale),
                time_ns: obs.time_ns,
            },
            None => obs,
        };
        self.manual = Some(merged);
        for (i, rule) in rules.rules.iter().enumerate() {
            if applies.get(i).copied().unwrap_or(false) && matches!(rule.kind, RuleKind::News2(_)) {
                self.evaluate(rules, i, obs.time_ns, out);
            }
        }
    }

    /// Evaluates the rules that depend on time passing (missing data).
    pub fn on_tick(
        &mut self,
        rules: &RuleSet,
        applies: &[bool],
        now_ns: i64,
        out: &mut Vec<CondEvent>,
    ) {
        for k in 0..self.timed.len() {
            let i = self.timed[k];
            if applies.get(i).copied().unwrap_or(false) {
                self.evaluate(rules, i, now_ns, out);
            }
        }
    }

    /// Stops expecting readings from a device (unbound or moved).
    pub fn forget_device(&mut self, device: &str) {
        self.devices.retain(|(d, _)| d != device);
    }

    /// The devices that sent readings for this patient.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|(d, _)| d.as_str())
    }

    /// The NEWS2 of the patient's latest values at `now_ns`: the score, the
    /// parameters it lacked, and the evidence. None without any fresh value.
    pub fn news2(&self, freshness_ns: i64, now_ns: i64) -> Option<(News2Score, Vec<Evidence>)> {
        let mut evidence = Vec::new();
        let score = self.news2_score(freshness_ns, now_ns, Some(&mut evidence))?;
        Some((score, evidence))
    }

    /// The NEWS2 of the latest values; the evidence too if asked for.
    fn news2_score(
        &self,
        freshness_ns: i64,
        now_ns: i64,
        mut evidence: Option<&mut Vec<Evidence>>,
    ) -> Option<News2Score> {
        let fresh = |m: Metric| {
            self.latest[m as usize]
                .filter(|s| now_ns - s.t <= freshness_ns && s.t - now_ns <= freshness_ns)
        };
        let manual = self
            .manual
            .filter(|o| now_ns - o.time_ns <= 24 * 3_600_000_000_000);
        let oxygen = manual.and_then(|o| o.oxygen);
        let scale = manual.and_then(|o| o.spo2_scale).unwrap_or_default();
        let consciousness = manual.and_then(|o| o.consciousness);
        let ox = oxygen.unwrap_or(Oxygen::Air);
        let mut parts = News2Parts::default();
        let measured = [
            (Metric::Rr, &mut parts.rr),
            (Metric::Spo2, &mut parts.spo2),
            (Metric::Sbp, &mut parts.sbp),
            (Metric::Hr, &mut parts.hr),
            (Metric::Temp, &mut parts.temp),
        ];
        let mut count = 0;
        for (m, slot) in measured {
            let s = fresh(m);
            if let Some(s) = s {
                // Each parameter's score is kept with the sample (and, for
                // SpO2, the scale and oxygen) it was computed from.
                let key = (s.t, s.v.to_bits(), scale, ox);
                *slot = match self.part_scores[m as usize].get() {
                    Some((k, score)) if k == key => score,
                    _ => {
                        let score = match m {
                            Metric::Rr => news2::rr_score(s.v),
                            Metric::Spo2 => news2::spo2_score(s.v, scale, ox),
                            Metric::Sbp => news2::sbp_score(s.v),
                            Metric::Hr => news2::hr_score(s.v),
                            _ => news2::temp_score(s.v),
                        };
                        self.part_scores[m as usize].set(Some((key, score)));
                        score
                    }
                };
                count += 1;
            }
            if let Some(ev) = evidence.as_deref_mut() {
                ev.push(match s {
                    Some(s) => Evidence {
                        name: m.name().into(),
                        value: s.v,
                        time_ns: s.t,
                        note: Some(format!("scores {slot}")),
                    },
                    None => Evidence {
                        name: m.name().into(),
                        value: f64::NAN,
                        time_ns: now_ns,
                        note: Some("no fresh value: scored 0".into()),
                    },
                });
            }
        }
        if count == 0 {
            return None;
        }
        parts.oxygen = news2::oxygen_score(ox);
        parts.consciousness = consciousness.map_or(0, news2::consciousness_score);
        let score = News2Score::from_parts(parts);
        if let Some(ev) = evidence {
            let manual_time = manual.map_or(now_ns, |o| o.time_ns);
            ev.push(Evidence {
                name: "oxygen".into(),
                value: parts.oxygen as f64,
                time_ns: manual_time,
                note: Some(match oxygen {
                    Some(Oxygen::O2) => "oxygen".into(),
                    Some(Oxygen::Air) => "air".into(),
                    None => "not observed: air assumed".into(),
                }),
            });
            ev.push(Evidence {
                name: "consciousness".into(),
                value: parts.consciousness as f64,
                time_ns: manual_time,
                note: Some(match consciousness {
                    Some(c) => c.letter().into(),
                    None => "not observed: alert assumed".into(),
                }),
            });
            ev.push(Evidence {
                name: "spo2_scale".into(),
                value: scale.number() as f64,
                time_ns: manual_time,
                note: None,
            });
            ev.insert(
                0,
                Evidence {
                    name: "news2".into(),
                    value: score.total as f64,
                    time_ns: now_ns,
                    note: Some(format!("risk {}", score.risk.name())),
                },
            );
        }
        Some(score)
    }

    fn evaluate(&mut self, rules: &RuleSet, i: usize, now: i64, out: &mut Vec<CondEvent>) {
        let rule = &rules.rules[i];
        let before = self.states[i].present;
        let after = match &rule.kind {
            RuleKind::Condition(c) => {
                let mut cs = std::mem::take(&mut self.states[i].cond);
                let raw = eval_cond(self, c, &mut cs, now);
                self.states[i].cond = cs;
                let st = &mut self.states[i];
                let met = match &rule.sustain {
                    None => raw,
                    Some(s) => {
                        if raw {
                            match st.since {
                                Some(_) if now - st.last_true <= s.for_ns => st.count += 1,
                                _ => {
                                    st.since = Some(now);
                                    st.count = 1;
                                }
                            }
                            st.last_true = st.last_true.max(now);
                            let run = now - st.since.unwrap_or(now);
                            let expected = (run / s.sample_period_ns.max(1)) as f64 + 1.0;
                            run >= s.for_ns && st.count as f64 >= (1.0 - s.max_missing) * expected
                        } else {
                            st.since = None;
                            st.count = 0;
                            false
                        }
                    }
                };
                // Once present, the condition holds until the raw condition
                // (with its hysteresis) is false.
                let present = if before.is_some() { raw } else { met };
                present.then_some(rule.priority)
            }
            RuleKind::News2(n) => self.evaluate_news2(rule, n, i, now),
        };
        // The values behind a raise or a change (only then: building them
        // costs more than the evaluation).
        let evidence = match (before, after) {
            (None, Some(_)) | (Some(_), Some(_)) if before != after => match &rule.kind {
                RuleKind::Condition(c) => self.evidence(c, now),
                RuleKind::News2(n) => self
                    .news2(n.freshness_ns, now)
                    .map(|(_, e)| e)
                    .unwrap_or_default(),
            },
            _ => Vec::new(),
        };
        let st = &mut self.states[i];
        st.present = after;
        match (before, after) {
            (None, Some(p)) => {
                let first_ns = match rule.kind {
                    RuleKind::Condition(_) => st.since.unwrap_or(now),
                    RuleKind::News2(_) => st.band_since[band_index(p)].unwrap_or(now),
                };
                out.push(CondEvent::Raised {
                    rule: i,
                    priority: p,
                    first_ns,
                    at_ns: now,
                    evidence,
                })
            }
            (Some(_), None) => out.push(CondEvent::Cleared {
                rule: i,
                at_ns: now,
            }),
            (Some(a), Some(b)) if a != b => out.push(CondEvent::Changed {
                rule: i,
                priority: b,
                at_ns: now,
                evidence,
            }),
            _ => {}
        }
    }

    fn evaluate_news2(
        &mut self,
        rule: &Rule,
        n: &News2Rule,
        i: usize,
        now: i64,
    ) -> Option<Priority> {
        let scored = self.news2_score(n.freshness_ns, now, None);
        let band = scored.as_ref().and_then(|s| match s.risk {
            Risk::High => n.high,
            Risk::Medium => n.medium,
            Risk::LowMedium => n.low_medium,
            Risk::Low => None,
        });
        let st = &mut self.states[i];
        let hold = rule.sustain.map_or(0, |s| s.for_ns);
        let mut effective = None;
        for (k, p) in [Priority::Low, Priority::Medium, Priority::High]
            .into_iter()
            .enumerate()
        {
            if band.is_some_and(|b| b >= p) {
                let since = *st.band_since[k].get_or_insert(now);
                if now - since >= hold {
                    effective = Some(p);
                }
            } else {
                st.band_since[k] = None;
            }
        }
        effective
    }

    fn evidence(&self, c: &Cond, now: i64) -> Vec<Evidence> {
        let mut out = Vec::new();
        self.collect_evidence(c, now, &mut out);
        out
    }

    fn collect_evidence(&self, c: &Cond, now: i64, out: &mut Vec<Evidence>) {
        match c {
            Cond::Threshold { metric, .. } | Cond::Rate { metric, .. } => {
                if out.iter().any(|e| e.name == metric.name()) {
                    return;
                }
                if let Some(s) = self.latest[*metric as usize] {
                    let note = match c {
                        Cond::Rate {
                            window_ns,
                            direction,
                            ..
                        } => self.trends[*metric as usize]
                            .as_ref()
                            .and_then(|t| t.extremes(*window_ns))
                            .map(|(lo, hi, _)| match direction {
                                Direction::Above => format!("up from {lo} within the window"),
                                Direction::Below => format!("down from {hi} within the window"),
                            }),
                        _ => None,
                    };
                    out.push(Evidence {
                        name: metric.name().into(),
                        value: s.v,
                        time_ns: s.t,
                        note,
                    });
                }
            }
            Cond::Missing { target, .. } => {
                let (name, last) = match target {
                    MissingTarget::Metric(m) => {
                        (m.name().to_string(), self.last_received[*m as usize])
                    }
                    MissingTarget::Device => {
                        let d = self.devices.iter().min_by_key(|(_, t)| *t);
                        (
                            d.map_or("device".into(), |(d, _)| format!("device {d}")),
                            d.map(|(_, t)| *t),
                        )
                    }
                };
                let last = last.unwrap_or(now);
                out.push(Evidence {
                    name,
                    value: ((now - last) as f64 / 1e9).round(),
                    time_ns: last,
                    note: Some("seconds silent".into()),
                });
            }
            Cond::All(cs) | Cond::Any(cs) => {
                cs.iter().for_each(|c| self.collect_evidence(c, now, out))
            }
        }
    }
}

/// Whole seconds, rounded up.
fn ceil_s(ns: i64) -> i64 {
    (ns + 999_999_999) / 1_000_000_000
}

fn band_index(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Medium => 1,
        Priority::High => 2,
    }
}

fn rate_windows(c: &Cond, out: &mut [Vec<i64>]) {
    match c {
        Cond::Rate {
            metric, window_ns, ..
        } => out[*metric as usize].push(*window_ns),
        Cond::All(cs) | Cond::Any(cs) => cs.iter().for_each(|c| rate_windows(c, out)),
        _ => {}
    }
}

fn rule_reads(rule: &Rule, metric: Metric) -> bool {
    match &rule.kind {
        RuleKind::News2(_) => matches!(
            metric,
            Metric::Rr | Metric::Spo2 | Metric::Sbp | Metric::Hr | Metric::Temp
        ),
        RuleKind::Condition(c) => cond_reads(c, metric),
    }
}

fn cond_reads(c: &Cond, metric: Metric) -> bool {
    match c {
        Cond::Threshold { metric: m, .. } | Cond::Rate { metric: m, .. } => *m == metric,
        Cond::Missing { target, .. } => {
            matches!(target, MissingTarget::Metric(m) if *m == metric)
                || *target == MissingTarget::Device
        }
        Cond::All(cs) | Cond::Any(cs) => cs.iter().any(|c| cond_reads(c, metric)),
    }
}

fn eval_cond(p: &PatientMonitor, c: &Cond, state: &mut CondState, now: i64) -> bool {
    match c {
        Cond::Threshold {
            metric,
            direction,
            enter,
            exit,
        } => {
            let CondState::Inside(inside) = state else {
                *state = CondState::Inside(false);
                return false;
            };
            let Some(s) = p.latest[*metric as usize].filter(|s| now - s.t <= STALE_AFTER_NS) else {
                *inside = false;
                return false;
            };
            let (beyond_enter, back_past_exit) = match direction {
                Direction::Above => (s.v > *enter, s.v < *exit),
                Direction::Below => (s.v < *enter, s.v > *exit),
            };
            if !*inside && beyond_enter {
                *inside = true;
            } else if *inside && back_past_exit {
                *inside = false;
            }
            *inside
        }
        Cond::Rate {
            metric,
            direction,
            amount,
            window_ns,
        } => {
            let Some(last) = p.latest[*metric as usize] else {
                return false;
            };
            let Some((low, high, span_s)) = p.trends[*metric as usize]
                .as_ref()
                .and_then(|t| t.extremes(*window_ns))
            else {
                return false;
            };
            // A window not yet half full could mistake the first samples
            // for a trend.
            if span_s * 1_000_000_000 < window_ns / 2 || now - last.t > STALE_AFTER_NS {
                return false;
            }
            match direction {
                Direction::Above => last.v - low >= *amount,
                Direction::Below => high - last.v >= *amount,
            }
        }
        Cond::Missing { target, after_ns } => match target {
            MissingTarget::Metric(m) => {
                p.last_received[*m as usize].is_some_and(|t| now - t > *after_ns)
            }
            MissingTarget::Device => p.devices.iter().any(|(_, t)| now - t > *after_ns),
        },
        Cond::All(cs) | Cond::Any(cs) => {
            let all = matches!(c, Cond::All(_));
            let CondState::Children(states) = state else {
                *state = CondState::for_cond(c);
                return false;
            };
            // Evaluate every child, so each keeps its hysteresis current.
            let mut results = cs
                .iter()
                .zip(states.iter_mut())
                .map(|(c, s)| eval_cond(p, c, s, now));
            let v: Vec<bool> = results.by_ref().collect();
            if all {
                v.iter().all(|x| *x)
            } else {
                v.iter().any(|x| *x)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const S: i64 = 1_000_000_000;

    fn rules(text: &str) -> RuleSet {
        RuleSet::parse(Path::new("t.toml"), text).unwrap()
    }

    fn reading(metric: Metric, t_s: i64, value: f64) -> Reading {
        Reading {
            time_ns: t_s * S,
            metric,
            value,
            seq: None,
            quality: Quality::default(),
        }
    }

    fn feed(
        p: &mut PatientMonitor,
        set: &RuleSet,
        metric: Metric,
        values: &[(i64, f64)],
    ) -> Vec<CondEvent> {
        let applies = vec![true; set.rules.len()];
        let mut out = Vec::new();
        for &(t, v) in values {
            p.on_reading(
                set,
                &applies,
                "mon-1",
                t * S,
                &reading(metric, t, v),
                &mut out,
            );
        }
        out
    }

    #[test]
    fn sustained_condition_ignores_a_brief_artefact() {
        let set = rules(
            "[[rule]]\nid='spo2'\npriority='high'\nwhen={metric='spo2', below=90, exit=92}\nfor='10s'\n",
        );
        let mut p = PatientMonitor::new(&set);
        let mut values: Vec<(i64, f64)> = (0..20).map(|t| (t, 97.0)).collect();
        values.extend((20..23).map(|t| (t, 75.0)));
        values.extend((23..40).map(|t| (t, 97.0)));
        assert!(
            feed(&mut p, &set, Metric::Spo2, &values).is_empty(),
            "a 3 s dip does not alarm"
        );
        let dip: Vec<(i64, f64)> = (40..60).map(|t| (t, 85.0)).collect();
        let ev = feed(&mut p, &set, Metric::Spo2, &dip);
        assert_eq!(ev.len(), 1, "{ev:?}");
        let CondEvent::Raised {
            first_ns, at_ns, ..
        } = &ev[0]
        else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (*first_ns, *at_ns),
            (40 * S, 50 * S),
            "raised after 10 s, first reading at onset"
        );
        // 91 is inside the hysteresis band: still present; 93 clears.
        assert!(feed(&mut p, &set, Metric::Spo2, &[(60, 91.0)]).is_empty());
        let ev = feed(&mut p, &set, Metric::Spo2, &[(61, 93.0)]);
        assert!(matches!(ev[..], [CondEvent::Cleared { .. }]), "{ev:?}");
    }

    #[test]
    fn sustain_tolerates_some_missing_samples_but_not_too_many() {
        let set = rules(
            "[[rule]]\nid='hr'\npriority='medium'\nwhen={metric='hr', above=130}\nfor='10s'\nmax_missing=0.3\n",
        );
        // Every other second missing (50 %): does not alarm.
        let mut p = PatientMonitor::new(&set);
        let sparse: Vec<(i64, f64)> = (0..30).step_by(2).map(|t| (t, 150.0)).collect();
        assert!(feed(&mut p, &set, Metric::Hr, &sparse).is_empty());
        // Every fourth second missing (25 %): alarms.
        let mut p = PatientMonitor::new(&set);
        let mostly: Vec<(i64, f64)> = (0..30).filter(|t| t % 4 != 3).map(|t| (t, 150.0)).collect();
        assert_eq!(feed(&mut p, &set, Metric::Hr, &mostly).len(), 1);
    }

    #[test]
    fn rate_of_change_and_combination() {
        let set = rules(
            "[[rule]]\nid='fall'\npriority='medium'\nwhen={metric='sbp', fall=30, within='10m'}\n\
             [[rule]]\nid='shock'\npriority='high'\nwhen={all=[{metric='hr', above=120}, {metric='sbp', below=90}]}\n",
        );
        let mut p = PatientMonitor::new(&set);
        let sbp: Vec<(i64, f64)> = (0..600).map(|t| (t, 130.0 - t as f64 * 0.06)).collect();
        let ev = feed(&mut p, &set, Metric::Sbp, &sbp);
        assert!(
            matches!(ev[..], [CondEvent::Raised { rule: 0, .. }]),
            "{ev:?}"
        );
        let ev = feed(&mut p, &set, Metric::Hr, &[(600, 125.0)]);
        assert!(ev.is_empty(), "sbp 94 is not below 90: {ev:?}");
        let ev = feed(&mut p, &set, Metric::Sbp, &[(601, 85.0)]);
        assert!(
            ev.iter()
                .any(|e| matches!(e, CondEvent::Raised { rule: 1, .. })),
            "{ev:?}"
        );
    }

    #[test]
    fn trend_windows_match_a_plain_scan() {
        let mut t = Trend::new(&[10 * S, 60 * S]);
        let mut all: Vec<(i64, f64)> = Vec::new();
        for i in 0..500i64 {
            // Several readings some seconds, none in others, values that wander.
            for k in 0..(i % 3) {
                let time = i * S + k * (S / 3);
                let v = ((i * 7919 + k * 104_729) % 97) as f64;
                t.push(time, v);
                all.push((time, v));
            }
            for w in [10i64, 60] {
                let Some((lo, hi, _)) = t.extremes(w * S) else {
                    continue;
                };
                let newest = all.last().unwrap().0.div_euclid(S);
                let inside = all
                    .iter()
                    .filter(|(time, _)| time.div_euclid(S) >= newest - w);
                let (elo, ehi) = inside
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, v)| {
                        (a.min(*v), b.max(*v))
                    });
                assert_eq!((lo, hi), (elo, ehi), "window {w} s at second {i}");
            }
        }
    }

    #[test]
    fn questionable_and_stale_values_feed_no_condition() {
        let set = rules(
            "[[rule]]\nid='hr'\npriority='medium'\nwhen={metric='hr', above=130, exit=120}\n",
        );
        let mut p = PatientMonitor::new(&set);
        let mut out = Vec::new();
        let mut flagged = reading(Metric::Hr, 0, 170.0);
        flagged.quality = Quality::QUESTIONABLE;
        p.on_reading(&set, &[true], "mon-1", 0, &flagged, &mut out);
        assert!(out.is_empty(), "a value the monitor flags does not alarm");
        let ev = feed(&mut p, &set, Metric::Hr, &[(1, 150.0)]);
        assert!(
            matches!(ev[..], [CondEvent::Raised { .. }]),
            "an unflagged one does: {ev:?}"
        );
        // A value older than STALE_AFTER_NS no longer holds the condition:
        // a later combination reading the stale value sees it cleared.
        let both = rules(
            "[[rule]]\nid='x'\npriority='high'\nwhen={all=[{metric='hr', above=130}, {metric='spo2', below=90}]}\n",
        );
        let mut q = PatientMonitor::new(&both);
        feed(&mut q, &both, Metric::Hr, &[(0, 150.0)]);
        let late = 1 + STALE_AFTER_NS / S;
        assert!(feed(&mut q, &both, Metric::Spo2, &[(late, 85.0)]).is_empty());
        let fresh = feed(&mut q, &both, Metric::Hr, &[(late + 1, 150.0)]);
        assert!(matches!(fresh[..], [CondEvent::Raised { .. }]), "{fresh:?}");
    }

    #[test]
    fn missing_data_is_timed() {
        let set = rules(
            "[[rule]]\nid='no-spo2'\npriority='medium'\nwhen={missing='spo2', after='30s'}\n",
        );
        assert!(set.rules[0].technical);
        let mut p = PatientMonitor::new(&set);
        let mut out = Vec::new();
        p.on_tick(&set, &[true], 10 * S, &mut out);
        assert!(out.is_empty(), "never seen: nothing expected yet");
        feed(&mut p, &set, Metric::Spo2, &[(0, 97.0)]);
        p.on_tick(&set, &[true], 20 * S, &mut out);
        assert!(out.is_empty());
        p.on_tick(&set, &[true], 31 * S, &mut out);
        assert!(matches!(out[..], [CondEvent::Raised { .. }]), "{out:?}");
        out.clear();
        let ev = feed(&mut p, &set, Metric::Spo2, &[(32, 97.0)]);
        assert!(matches!(ev[..], [CondEvent::Cleared { .. }]), "{ev:?}");
    }

    #[test]
    fn news2_bands_raise_and_change_priority() {
        let set = rules("[[rule]]\nid='news2'\nnews2={freshness='5m'}\n");
        let mut p = PatientMonitor::new(&set);
        let applies = [true];
        let mut out = Vec::new();
        for (m, v) in [
            (Metric::Rr, 16.0),
            (Metric::Spo2, 97.0),
            (Metric::Sbp, 125.0),
            (Metric::Hr, 75.0),
            (Metric::Temp, 37.0),
        ] {
            p.on_reading(&set, &applies, "d", 0, &reading(m, 0, v), &mut out);
        }
        assert!(out.is_empty());
        // HR 135 scores 3: a red score, low-medium risk -> low priority.
        p.on_reading(
            &set,
            &applies,
            "d",
            S,
            &reading(Metric::Hr, 1, 135.0),
            &mut out,
        );
        assert!(
            matches!(
                out[..],
                [CondEvent::Raised {
                    priority: Priority::Low,
                    ..
                }]
            ),
            "{out:?}"
        );
        out.clear();
        // RR 26 (3) and temp 39.5 (2): total 8, high.
        p.on_reading(
            &set,
            &applies,
            "d",
            2 * S,
            &reading(Metric::Rr, 2, 26.0),
            &mut out,
        );
        p.on_reading(
            &set,
            &applies,
            "d",
            3 * S,
            &reading(Metric::Temp, 3, 39.5),
            &mut out,
        );
        assert!(
            matches!(
                out.last(),
                Some(CondEvent::Changed {
                    priority: Priority::High,
                    ..
                })
            ),
            "{out:?}"
        );
        out.clear();
        let obs = ManualObservation {
            consciousness: Some(Acvpu::Alert),
            oxygen: Some(Oxygen::Air),
            spo2_scale: None,
            time_ns: 4 * S,
        };
        p.on_manual(&set, &applies, obs, &mut out);
        assert!(out.is_empty());
        for (m, v) in [(Metric::Rr, 16.0), (Metric::Hr, 75.0), (Metric::Temp, 37.0)] {
            p.on_reading(&set, &applies, "d", 5 * S, &reading(m, 5, v), &mut out);
        }
        assert!(
            matches!(out.last(), Some(CondEvent::Cleared { .. })),
            "{out:?}"
        );
    }
}
