//! One patient under a rule set: condition evaluation ([`PatientMonitor`])
//! and alarm management (one [`Alert`] per rule at a time) together, so the
//! dataflow, tests and offline replays drive the same code.
//!
//! ```
//! use std::path::Path;
//! use wardflow_model::{Metric, Quality, Reading};
//! use wardflow_rules::alarm::AlertState;
//! use wardflow_rules::patient::PatientRules;
//! use wardflow_rules::spec::RuleSet;
//!
//! let rules = RuleSet::parse(Path::new("icu.toml"), r#"
//!     [[rule]]
//!     id = "spo2-low"
//!     priority = "high"
//!     when = { metric = "spo2", below = 90, exit = 92 }
//!     for = "10s"
//! "#).unwrap();
//! let mut p = PatientRules::new("p-1", &rules);
//! let s = 1_000_000_000;
//! let mut alerts = Vec::new();
//! for t in 0..15 {
//!     let r = Reading { time_ns: t * s, metric: Metric::Spo2, value: 85.0, seq: None, quality: Quality::default() };
//!     alerts.extend(p.on_reading(&rules, "mon-1", t * s, &r));
//! }
//! assert_eq!(alerts.len(), 1);
//! assert_eq!(alerts[0].state, AlertState::Active);
//! assert_eq!(alerts[0].first_reading_ns, 0);
//! ```

use std::collections::BTreeMap;

use wardflow_model::Reading;

use crate::alarm::{ActionError, Alert, AlertEventKind, AlertState, NewAlert, SubjectKind};
use crate::eval::{CondEvent, ManualObservation, PatientMonitor};
use crate::spec::RuleSet;

/// Why a clinician's action on an alert was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("alert {0} is not open for this patient")]
    Unknown(String),
    #[error(transparent)]
    Action(#[from] ActionError),
}

/// One patient's rules and alerts.
#[derive(Debug, Clone)]
pub struct PatientRules {
    pub patient: String,
    unit: Option<String>,
    bed: Option<String>,
    monitor: PatientMonitor,
    /// Which rules apply (scope by unit and patient).
    applies: Vec<bool>,
    /// Open alerts by rule id.
    open: BTreeMap<String, Alert>,
}

impl PatientRules {
    pub fn new(patient: &str, rules: &RuleSet) -> PatientRules {
        let mut p = PatientRules {
            patient: patient.to_string(),
            unit: None,
            bed: None,
            monitor: PatientMonitor::new(rules),
            applies: Vec::new(),
            open: BTreeMap::new(),
        };
        p.rescope(rules);
        p
    }

    /// Sets where the patient lies (None: not admitted). Rules scoped to
    /// units apply accordingly; alerts carry the unit and bed.
    pub fn set_location(&mut self, rules: &RuleSet, unit: Option<&str>, bed: Option<&str>) {
        self.unit = unit.map(str::to_string);
        self.bed = bed.map(str::to_string);
        for a in self.open.values_mut() {
            a.unit.clone_from(&self.unit);
            a.bed.clone_from(&self.bed);
        }
        self.rescope(rules);
    }

    pub fn unit(&self) -> Option<&str> {
        self.unit.as_deref()
    }

    fn rescope(&mut self, rules: &RuleSet) {
        self.applies = rules
            .rules
            .iter()
            .map(|r| r.applies_to(&self.patient, self.unit.as_deref()))
            .collect();
    }

    /// Takes a new rule set: conditions are evaluated afresh; alerts of
    /// rules that still exist stay open (their condition presumed present
    /// until a reading shows otherwise); alerts of removed rules resolve.
    pub fn reload(&mut self, rules: &RuleSet, at_ns: i64) -> Vec<Alert> {
        let manual = self.monitor.manual().copied();
        self.monitor = PatientMonitor::new(rules);
        if let Some(m) = manual {
            let mut ignored = Vec::new();
            self.monitor
                .on_manual(rules, &vec![false; rules.rules.len()], m, &mut ignored);
        }
        self.rescope(rules);
        let mut out = Vec::new();
        let ids: Vec<String> = self.open.keys().cloned().collect();
        for id in ids {
            match rules.rules.iter().position(|r| r.id == id) {
                Some(i) => {
                    let p = self.open[&id].base_priority;
                    self.monitor.assume_present(i, p);
                }
                None => {
                    let mut a = self.open.remove(&id).expect("listed");
                    a.condition = false;
                    a.seq += 1;
                    a.event = AlertEventKind::Resolved;
                    a.state = AlertState::Resolved;
                    a.at_ns = at_ns;
                    a.by = Some("rule removed".into());
                    out.push(a);
                }
            }
        }
        out
    }

    /// Restores an open alert (after a restart).
    pub fn restore(&mut self, rules: &RuleSet, alert: Alert) {
        if let Some(i) = rules.rules.iter().position(|r| r.id == alert.rule) {
            self.monitor.assume_present(i, alert.base_priority);
        }
        self.open.insert(alert.rule.clone(), alert);
    }

    /// Stops expecting readings from a device (unbound or moved).
    pub fn forget_device(&mut self, device: &str) {
        self.monitor.forget_device(device);
    }

    pub fn monitor(&self) -> &PatientMonitor {
        &self.monitor
    }

    pub fn on_reading(
        &mut self,
        rules: &RuleSet,
        device: &str,
        received_ns: i64,
        r: &Reading,
    ) -> Vec<Alert> {
        let mut events = Vec::new();
        self.monitor
            .on_reading(rules, &self.applies, device, received_ns, r, &mut events);
        self.apply(rules, events)
    }

    pub fn on_manual(&mut self, rules: &RuleSet, obs: ManualObservation) -> Vec<Alert> {
        let mut events = Vec::new();
        self.monitor
            .on_manual(rules, &self.applies, obs, &mut events);
        self.apply(rules, events)
    }

    /// Time passes: missing data, escalations, silences ending.
    pub fn on_tick(&mut self, rules: &RuleSet, now_ns: i64) -> Vec<Alert> {
        let mut events = Vec::new();
        self.monitor
            .on_tick(rules, &self.applies, now_ns, &mut events);
        let mut out = self.apply(rules, events);
        for a in self.open.values_mut() {
            out.extend(a.on_tick(now_ns));
        }
        out
    }

    /// A clinician acknowledges or silences one of the patient's alerts.
    pub fn act(
        &mut self,
        alert: &str,
        silence_ns: Option<i64>,
        by: &str,
        at_ns: i64,
    ) -> Result<Alert, CommandError> {
        let Some((rule, a)) = self.open.iter_mut().find(|(_, a)| a.id == alert) else {
            return Err(CommandError::Unknown(alert.to_string()));
        };
        let out = match silence_ns {
            None => a.acknowledge(by, at_ns)?,
            Some(ns) => a.silence(by, ns, at_ns)?,
        };
        if !out.state.is_open() {
            let rule = rule.clone();
            self.open.remove(&rule);
        }
        Ok(out)
    }

    /// The patient left (discharged): every open alert resolves.
    pub fn resolve_all(&mut self, why: &str, at_ns: i64) -> Vec<Alert> {
        std::mem::take(&mut self.open)
            .into_values()
            .map(|mut a| {
                a.seq += 1;
                a.event = AlertEventKind::Resolved;
                a.state = AlertState::Resolved;
                a.condition = false;
                a.at_ns = at_ns;
                a.by = Some(why.to_string());
                a
            })
            .collect()
    }

    fn apply(&mut self, rules: &RuleSet, events: Vec<CondEvent>) -> Vec<Alert> {
        let mut out = Vec::new();
        for ev in events {
            match ev {
                CondEvent::Raised {
                    rule,
                    priority,
                    first_ns,
                    at_ns,
                    evidence,
                } => {
                    let r = &rules.rules[rule];
                    if let Some(a) = self.open.get_mut(&r.id) {
                        // A latched alert whose condition returned.
                        out.extend(a.on_present(priority, evidence, at_ns));
                        continue;
                    }
                    let mut a = NewAlert {
                        subject: &self.patient,
                        subject_kind: SubjectKind::Patient,
                        patient: Some(&self.patient),
                        device: None,
                        rule: r,
                        priority,
                        first_ns,
                        at_ns,
                        evidence,
                    }
                    .raise();
                    a.unit = self.unit.clone();
                    a.bed = self.bed.clone();
                    self.open.insert(r.id.clone(), a.clone());
                    out.push(a);
                }
                CondEvent::Changed {
                    rule,
                    priority,
                    at_ns,
                    evidence,
                } => {
                    if let Some(a) = self.open.get_mut(&rules.rules[rule].id) {
                        out.extend(a.on_present(priority, evidence, at_ns));
                    }
                }
                CondEvent::Cleared { rule, at_ns } => {
                    let id = &rules.rules[rule].id;
                    if let Some(a) = self.open.get_mut(id) {
                        let t = a.on_cleared(at_ns);
                        if !a.state.is_open() {
                            self.open.remove(id);
                        }
                        out.extend(t);
                    }
                }
            }
        }
        for a in &mut out {
            a.unit.clone_from(&self.unit);
            a.bed.clone_from(&self.bed);
        }
        out
    }
}
