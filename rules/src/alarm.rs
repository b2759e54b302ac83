//! Alarm management: one alert per patient and rule at a time, and its
//! states (IEC 60601-1-8 vocabulary where it has one):
//!
//! ```text
//!            condition raised
//!                  │
//!                  ▼        escalate_after, unacknowledged
//!   ┌────────▶  active  ───────────────────────────▶ escalated (tier + 1,
//!   │ silence    │  │ acknowledge                      priority one up)
//!   │ ends       │  ▼                                     │
//!   │            │ acknowledged ──condition clears──▶ resolved
//!   │ silence    │                                        ▲
//!   └──────── silenced (audio paused for a duration)      │
//!                  condition clears: resolved, unless the rule latches;
//!                  a latched alert stays until acknowledged
//! ```
//!
//! A silenced alert is still unacknowledged: when the silence ends it sounds
//! again. An acknowledged alert whose priority rises (a NEWS2 band up)
//! becomes active again: a new urgency needs a new response.

use serde::{Deserialize, Serialize};

use crate::Priority;
use crate::eval::Evidence;

/// Highest escalation tier.
pub const MAX_TIER: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Active,
    Acknowledged,
    Silenced,
    Escalated,
    Resolved,
}

impl AlertState {
    pub fn name(self) -> &'static str {
        match self {
            AlertState::Active => "active",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Silenced => "silenced",
            AlertState::Escalated => "escalated",
            AlertState::Resolved => "resolved",
        }
    }

    pub fn is_open(self) -> bool {
        self != AlertState::Resolved
    }
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertEventKind {
    Raised,
    Reprioritized,
    ConditionCleared,
    ConditionReturned,
    Acknowledged,
    Silenced,
    SilenceEnded,
    Escalated,
    Resolved,
}

/// One alert, as its latest transition left it. Serialized, it is the
/// message clinicians receive and the alert log's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    /// The transition this record reports, numbered from 1.
    pub seq: u32,
    pub event: AlertEventKind,
    pub state: AlertState,
    /// The patient, or for device alerts the device (`subject_kind`).
    pub subject: String,
    pub subject_kind: SubjectKind,
    pub patient: Option<String>,
    pub device: Option<String>,
    pub unit: Option<String>,
    pub bed: Option<String>,
    pub rule: String,
    pub description: String,
    /// Current priority (escalation included).
    pub priority: Priority,
    /// The priority the condition itself raises.
    pub base_priority: Priority,
    pub technical: bool,
    pub tier: u8,
    pub latching: bool,
    /// Whether the alarm condition is present now.
    pub condition: bool,
    /// The values that fired it (updated when its priority changes).
    pub values: Vec<Evidence>,
    /// Time of the first reading that met the condition (ns since the epoch).
    pub first_reading_ns: i64,
    pub raised_ns: i64,
    /// Time of this transition.
    pub at_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silenced_until_ns: Option<i64>,
    /// When the last escalation (or the raise) happened: the escalation clock.
    pub escalation_clock_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_after_ns: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    Patient,
    Device,
}

/// Why a clinician's action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("alert {0} is resolved")]
    Resolved(String),
    #[error("alert {0} is already acknowledged")]
    AlreadyAcknowledged(String),
    #[error("a silence lasts from 1 s to {max_s} s, not {asked_s} s")]
    SilenceLength { asked_s: i64, max_s: i64 },
}

/// Longest silence (audio paused) a clinician may set: IEC 60601-1-8 lets
/// the manufacturer set it; two minutes is the common choice of monitors.
pub const MAX_SILENCE_NS: i64 = 120_000_000_000;

/// A stable alert id from what makes an alert (so a replay after a
/// restart finds the same id): 16 hex digits of an FNV-1a hash.
pub fn alert_id(subject: &str, rule: &str, first_ns: i64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject
        .bytes()
        .chain([0])
        .chain(rule.bytes())
        .chain([0])
        .chain(first_ns.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Alert {
    fn next(&mut self, event: AlertEventKind, state: AlertState, at_ns: i64) -> Alert {
        self.seq += 1;
        self.event = event;
        self.state = state;
        self.at_ns = at_ns;
        self.by = None;
        self.clone()
    }

    /// The state an unacknowledged alert sounds in.
    fn sounding(&self) -> AlertState {
        if self.tier > 1 {
            AlertState::Escalated
        } else {
            AlertState::Active
        }
    }

    /// The condition cleared.
    pub fn on_cleared(&mut self, at_ns: i64) -> Option<Alert> {
        if !self.state.is_open() || !self.condition {
            return None;
        }
        self.condition = false;
        if self.latching && self.state != AlertState::Acknowledged {
            Some(self.next(AlertEventKind::ConditionCleared, self.state, at_ns))
        } else {
            Some(self.next(AlertEventKind::Resolved, AlertState::Resolved, at_ns))
        }
    }

    /// The condition is present again (a latched alert) or at another priority.
    pub fn on_present(
        &mut self,
        priority: Priority,
        evidence: Vec<Evidence>,
        at_ns: i64,
    ) -> Option<Alert> {
        if !self.state.is_open() {
            return None;
        }
        let returned = !self.condition;
        self.condition = true;
        if priority == self.base_priority {
            return returned.then(|| {
                self.values = evidence;
                self.next(AlertEventKind::ConditionReturned, self.state, at_ns)
            });
        }
        let rose = priority > self.base_priority;
        self.base_priority = priority;
        let mut p = priority;
        for _ in 1..self.tier {
            p = p.escalated();
        }
        self.priority = p;
        self.values = evidence;
        let state = if rose && self.state == AlertState::Acknowledged {
            self.escalation_clock_ns = at_ns;
            self.sounding()
        } else {
            self.state
        };
        Some(self.next(AlertEventKind::Reprioritized, state, at_ns))
    }

    /// A clinician acknowledges.
    pub fn acknowledge(&mut self, by: &str, at_ns: i64) -> Result<Alert, ActionError> {
        match self.state {
            AlertState::Resolved => Err(ActionError::Resolved(self.id.clone())),
            AlertState::Acknowledged => Err(ActionError::AlreadyAcknowledged(self.id.clone())),
            _ => {
                self.silenced_until_ns = None;
                // A latched alert whose condition is gone ends here.
                let state = if self.condition {
                    AlertState::Acknowledged
                } else {
                    AlertState::Resolved
                };
                let mut a = self.next(AlertEventKind::Acknowledged, state, at_ns);
                self.by = Some(by.to_string());
                a.by = Some(by.to_string());
                Ok(a)
            }
        }
    }

    /// A clinician pauses the alarm's audio for `for_ns`.
    pub fn silence(&mut self, by: &str, for_ns: i64, at_ns: i64) -> Result<Alert, ActionError> {
        if !(1_000_000_000..=MAX_SILENCE_NS).contains(&for_ns) {
            return Err(ActionError::SilenceLength {
                asked_s: for_ns / 1_000_000_000,
                max_s: MAX_SILENCE_NS / 1_000_000_000,
            });
        }
        match self.state {
            AlertState::Resolved => Err(ActionError::Resolved(self.id.clone())),
            AlertState::Acknowledged => Err(ActionError::AlreadyAcknowledged(self.id.clone())),
            _ => {
                self.silenced_until_ns = Some(at_ns + for_ns);
                let mut a = self.next(AlertEventKind::Silenced, AlertState::Silenced, at_ns);
                self.by = Some(by.to_string());
                a.by = Some(by.to_string());
                Ok(a)
            }
        }
    }

    /// Time passes: silences end, unacknowledged alerts escalate.
    pub fn on_tick(&mut self, now_ns: i64) -> Option<Alert> {
        match self.state {
            AlertState::Silenced if self.silenced_until_ns.is_some_and(|u| now_ns >= u) => {
                self.silenced_until_ns = None;
                Some(self.next(AlertEventKind::SilenceEnded, self.sounding(), now_ns))
            }
            AlertState::Active | AlertState::Escalated
                if self.tier < MAX_TIER
                    && self
                        .escalate_after_ns
                        .is_some_and(|e| now_ns - self.escalation_clock_ns >= e) =>
            {
                self.tier += 1;
                self.priority = self.priority.escalated();
                self.escalation_clock_ns = now_ns;
                Some(self.next(AlertEventKind::Escalated, AlertState::Escalated, now_ns))
            }
            _ => None,
        }
    }
}

/// What a new alert is made of.
pub struct NewAlert<'a> {
    pub subject: &'a str,
    pub subject_kind: SubjectKind,
    pub patient: Option<&'a str>,
    pub device: Option<&'a str>,
    pub rule: &'a crate::spec::Rule,
    pub priority: Priority,
    pub first_ns: i64,
    pub at_ns: i64,
    pub evidence: Vec<Evidence>,
}

impl NewAlert<'_> {
    pub fn raise(self) -> Alert {
        Alert {
            id: alert_id(self.subject, &self.rule.id, self.first_ns),
            seq: 1,
            event: AlertEventKind::Raised,
            state: AlertState::Active,
            subject: self.subject.to_string(),
            subject_kind: self.subject_kind,
            patient: self.patient.map(str::to_string),
            device: self.device.map(str::to_string),
            unit: None,
            bed: None,
            rule: self.rule.id.clone(),
            description: self.rule.description.clone(),
            priority: self.priority,
            base_priority: self.priority,
            technical: self.rule.technical,
            tier: 1,
            latching: self.rule.latching,
            condition: true,
            values: self.evidence,
            first_reading_ns: self.first_ns,
            raised_ns: self.at_ns,
            at_ns: self.at_ns,
            by: None,
            silenced_until_ns: None,
            escalation_clock_ns: self.at_ns,
            escalate_after_ns: self.rule.escalate_after_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RuleSet;
    use std::path::Path;

    const S: i64 = 1_000_000_000;

    fn alert(latching: bool) -> Alert {
        let set = RuleSet::parse(
            Path::new("t.toml"),
            &format!(
                "[[rule]]\nid='hr'\npriority='low'\nwhen={{metric='hr', above=130}}\nlatching={latching}\nescalate_after='60s'\n"
            ),
        )
        .unwrap();
        NewAlert {
            subject: "p-1",
            subject_kind: SubjectKind::Patient,
            patient: Some("p-1"),
            device: None,
            rule: &set.rules[0],
            priority: Priority::Low,
            first_ns: 0,
            at_ns: S,
            evidence: vec![],
        }
        .raise()
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(alert_id("p-1", "hr", 5), alert_id("p-1", "hr", 5));
        assert_ne!(alert_id("p-1", "hr", 5), alert_id("p-1", "hr", 6));
        assert_ne!(alert_id("p-1", "hr", 5), alert_id("p-2", "hr", 5));
        assert_eq!(alert_id("p-1", "hr", 5).len(), 16);
    }

    #[test]
    fn unacknowledged_alerts_escalate_tier_by_tier() {
        let mut a = alert(false);
        assert!(a.on_tick(30 * S).is_none());
        let e = a.on_tick(61 * S).unwrap();
        assert_eq!(
            (e.state, e.tier, e.priority),
            (AlertState::Escalated, 2, Priority::Medium)
        );
        let e = a.on_tick(121 * S).unwrap();
        assert_eq!((e.tier, e.priority), (3, Priority::High));
        assert!(a.on_tick(500 * S).is_none(), "tier 3 is the last");
        let ack = a.acknowledge("rn-1", 501 * S).unwrap();
        assert_eq!(ack.state, AlertState::Acknowledged);
        assert_eq!(ack.by.as_deref(), Some("rn-1"));
        assert!(
            a.on_tick(1000 * S).is_none(),
            "acknowledged alerts do not escalate"
        );
        assert_eq!(a.on_cleared(1001 * S).unwrap().state, AlertState::Resolved);
        assert!(matches!(
            a.acknowledge("rn-1", 1002 * S),
            Err(ActionError::Resolved(_))
        ));
    }

    #[test]
    fn silence_pauses_then_sounds_again() {
        let mut a = alert(false);
        let s = a.silence("rn-1", 30 * S, 10 * S).unwrap();
        assert_eq!(
            (s.state, s.silenced_until_ns),
            (AlertState::Silenced, Some(40 * S))
        );
        assert!(a.on_tick(39 * S).is_none());
        assert_eq!(a.on_tick(40 * S).unwrap().state, AlertState::Active);
        assert!(
            a.silence("rn-1", 3600 * S, 41 * S).is_err(),
            "silences are bounded"
        );
    }

    #[test]
    fn latching_keeps_the_alert_until_acknowledged() {
        let mut a = alert(false);
        assert_eq!(a.on_cleared(5 * S).unwrap().state, AlertState::Resolved);
        let mut a = alert(true);
        let c = a.on_cleared(5 * S).unwrap();
        assert_eq!(
            (c.state, c.condition, c.event),
            (AlertState::Active, false, AlertEventKind::ConditionCleared)
        );
        let ack = a.acknowledge("rn-1", 6 * S).unwrap();
        assert_eq!(ack.state, AlertState::Resolved);
    }

    #[test]
    fn a_higher_priority_reactivates_an_acknowledged_alert() {
        let mut a = alert(false);
        a.acknowledge("rn-1", 2 * S).unwrap();
        let r = a.on_present(Priority::High, vec![], 3 * S).unwrap();
        assert_eq!(
            (r.state, r.priority, r.event),
            (
                AlertState::Active,
                Priority::High,
                AlertEventKind::Reprioritized
            )
        );
        assert_eq!(r.seq, 3);
    }
}
