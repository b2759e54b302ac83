//! A threshold rule with hysteresis over a desaturation episode.
//!
//! Run with `cargo run -p wardflow-rules --example threshold`.

use wardflow_model::Metric;
use wardflow_rules::{Direction, Priority, ThresholdRule};

fn main() {
    // Alarm below 90 % SpO2; clear only once it recovers above 92 %.
    let rule = ThresholdRule::new(
        "spo2-low",
        Metric::Spo2,
        Direction::Below,
        90.0,
        92.0,
        Priority::High,
    )
    .expect("a well-formed rule");
    let mut state = rule.initial_state();
    let spo2 = [97.0, 95.0, 91.0, 89.0, 88.0, 90.5, 89.5, 91.5, 92.5, 96.0];
    for (second, value) in spo2.iter().enumerate() {
        let change = rule.evaluate(&mut state, *value);
        println!(
            "t={second:>2}s  SpO2 {value:>5.1} %  {}{}",
            if state.active { "ALARM " } else { "      " },
            change
                .map(|t| format!("({t:?}, {:?} priority)", rule.priority))
                .unwrap_or_default()
        );
    }
}
