//! Wardflow's clinical alert rules: the rule language ([`spec`], TOML),
//! their evaluation per patient ([`eval`]: thresholds with hysteresis,
//! sustained conditions, rate of change, missing data, all/any, NEWS2 from
//! [`news2`]), alarm management ([`alarm`]: one alert per patient and rule;
//! active, acknowledged, silenced, escalated, resolved; latching), the two
//! together per patient ([`patient`]), and alarm priorities as IEC 60601-1-8
//! defines them. It ships a default rule set for adult intensive care.
//!
//! This crate owns how rules decide, not where readings come from or where
//! alerts go: the engine feeds it validated readings, clinicians' actions
//! and the clock, and routes, logs and publishes the alerts it returns. It
//! does no I/O but reading rule files.
//!
//! Hysteresis keeps an alarm from chattering when a value hovers at its
//! limit: it enters above (or below) one level and leaves only past another.
//!
//! ```
//! use wardflow_rules::{Direction, Priority, ThresholdRule, Transition};
//! use wardflow_model::Metric;
//!
//! // SpO2 below 90 % enters; it must recover above 92 % to clear.
//! let rule = ThresholdRule::new("spo2-low", Metric::Spo2, Direction::Below, 90.0, 92.0, Priority::High).unwrap();
//! let mut state = rule.initial_state();
//! assert_eq!(rule.evaluate(&mut state, 89.0), Some(Transition::Entered));
//! assert_eq!(rule.evaluate(&mut state, 91.0), None); // still in the band: no chatter
//! assert_eq!(rule.evaluate(&mut state, 93.0), Some(Transition::Cleared));
//! ```

use serde::{Deserialize, Serialize};
use wardflow_model::Metric;

pub mod alarm;
pub mod eval;
pub mod news2;
pub mod patient;
pub mod spec;

/// The default rule set for adult intensive care (rules/default/adult-icu.toml).
pub const DEFAULT_RULES: &str = include_str!("../default/adult-icu.toml");

/// The default rule set, parsed.
pub fn default_rules() -> spec::RuleSet {
    spec::RuleSet::parse(
        std::path::Path::new("default/adult-icu.toml"),
        DEFAULT_RULES,
    )
    .expect("the default rules are valid (tested)")
}

/// Alarm priority (IEC 60601-1-8 §6.1.2): how urgently staff must respond.
/// Ordered from least to most urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Awareness is required (delayed harm possible).
    Low,
    /// Prompt response is required.
    Medium,
    /// Immediate response is required.
    High,
}

impl Priority {
    /// The escalated priority: one level up, high stays high.
    pub fn escalated(self) -> Priority {
        match self {
            Priority::Low => Priority::Medium,
            Priority::Medium | Priority::High => Priority::High,
        }
    }
}

/// Which side of the limit alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Above,
    Below,
}

/// Why a rule is not well formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error(
        "rule {id}: the exit level {exit} must lie on the normal side of the enter level {enter} ({direction:?})"
    )]
    Hysteresis {
        id: String,
        enter: f64,
        exit: f64,
        direction: Direction,
    },
    #[error("rule {id}: levels must be finite numbers")]
    NotFinite { id: String },
}

/// A threshold condition with separate enter and exit levels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdRule {
    pub id: String,
    pub metric: Metric,
    pub direction: Direction,
    /// Crossing this level enters the alarm condition.
    pub enter: f64,
    /// Crossing back past this level leaves it.
    pub exit: f64,
    pub priority: Priority,
}

/// Whether a patient is in a rule's alarm condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ThresholdState {
    pub active: bool,
}

/// A change of condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Entered,
    Cleared,
}

impl ThresholdRule {
    pub fn new(
        id: &str,
        metric: Metric,
        direction: Direction,
        enter: f64,
        exit: f64,
        priority: Priority,
    ) -> Result<Self, RuleError> {
        let id = id.to_string();
        if !enter.is_finite() || !exit.is_finite() {
            return Err(RuleError::NotFinite { id });
        }
        let ok = match direction {
            Direction::Above => exit <= enter,
            Direction::Below => exit >= enter,
        };
        if !ok {
            return Err(RuleError::Hysteresis {
                id,
                enter,
                exit,
                direction,
            });
        }
        Ok(Self {
            id,
            metric,
            direction,
            enter,
            exit,
            priority,
        })
    }

    pub fn initial_state(&self) -> ThresholdState {
        ThresholdState::default()
    }

    /// Feeds one value; returns the transition it causes, if any.
    pub fn evaluate(&self, state: &mut ThresholdState, value: f64) -> Option<Transition> {
        let (beyond_enter, back_past_exit) = match self.direction {
            Direction::Above => (value > self.enter, value < self.exit),
            Direction::Below => (value < self.enter, value > self.exit),
        };
        match (state.active, beyond_enter, back_past_exit) {
            (false, true, _) => {
                state.active = true;
                Some(Transition::Entered)
            }
            (true, _, true) => {
                state.active = false;
                Some(Transition::Cleared)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_parse() {
        let set = default_rules();
        assert_eq!(set.rules.len(), 20);
        assert!(
            set.rules
                .iter()
                .any(|r| matches!(r.kind, spec::RuleKind::News2(_)))
        );
        assert!(set.rules.iter().filter(|r| r.technical).count() >= 2);
    }

    fn hr_high() -> ThresholdRule {
        ThresholdRule::new(
            "hr-high",
            Metric::Hr,
            Direction::Above,
            130.0,
            120.0,
            Priority::Medium,
        )
        .unwrap()
    }

    #[test]
    fn hysteresis_suppresses_chatter() {
        let rule = hr_high();
        let mut s = rule.initial_state();
        let values = [
            110.0, 131.0, 129.0, 131.0, 125.0, 135.0, 119.0, 121.0, 131.0,
        ];
        let transitions: Vec<_> = values.iter().map(|&v| rule.evaluate(&mut s, v)).collect();
        assert_eq!(
            transitions,
            [
                None,
                Some(Transition::Entered),
                None,
                None,
                None,
                None,
                Some(Transition::Cleared),
                None,
                Some(Transition::Entered)
            ]
        );
    }

    #[test]
    fn levels_at_the_limit_do_not_cross_it() {
        let rule = hr_high();
        let mut s = rule.initial_state();
        assert_eq!(
            rule.evaluate(&mut s, 130.0),
            None,
            "the enter level itself is not beyond it"
        );
        assert_eq!(rule.evaluate(&mut s, 130.5), Some(Transition::Entered));
        assert_eq!(
            rule.evaluate(&mut s, 120.0),
            None,
            "the exit level itself does not clear"
        );
    }

    #[test]
    fn exit_levels_on_the_wrong_side_are_refused() {
        let err = ThresholdRule::new(
            "x",
            Metric::Spo2,
            Direction::Below,
            90.0,
            85.0,
            Priority::High,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exit level 85"), "{err}");
        assert!(
            ThresholdRule::new(
                "x",
                Metric::Hr,
                Direction::Above,
                f64::NAN,
                1.0,
                Priority::Low
            )
            .is_err()
        );
    }

    #[test]
    fn priorities_order_and_escalate() {
        assert!(Priority::High > Priority::Medium && Priority::Medium > Priority::Low);
        assert_eq!(Priority::Low.escalated(), Priority::Medium);
        assert_eq!(Priority::High.escalated(), Priority::High);
    }
}
