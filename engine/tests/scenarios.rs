//! The shipped scenarios (simulator/scenarios) replayed in simulated time
//! through the shipped default rules (rules/default/adult-icu.toml): each
//! deterioration raises its alert, stable patients raise none over 24
//! patient-hours, and motion artefacts that a naive threshold would alarm
//! on are suppressed. Run with `--nocapture` for the report (delay from
//! onset to alert per scenario, suppressed artefact share).

use std::path::PathBuf;
use std::time::Duration;

use wardflow_model::Reading;
use wardflow_rules::alarm::{Alert, AlertEventKind};
use wardflow_rules::default_rules;
use wardflow_rules::patient::PatientRules;
use wardflow_rules::spec::RuleSet;
use wardflow_simulator::scenario::{EventKind, Scenario, ScenarioRun};

/// 2026-01-01T00:00:00Z: simulated time starts here.
const BASE_NS: i64 = 1_767_225_600_000_000_000;
const S: i64 = 1_000_000_000;

fn scenario(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../simulator/scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

struct Outcome {
    /// Per scenario patient, every alert transition.
    alerts: Vec<Vec<Alert>>,
    run: ScenarioRun,
}

/// Replays a scenario second by second: readings, then a clock tick.
fn replay(s: &Scenario, rules: &RuleSet) -> Outcome {
    let mut patients: Vec<PatientRules> = s
        .patients
        .iter()
        .map(|p| {
            let mut r = PatientRules::new(p.id.as_str(), rules);
            r.set_location(rules, Some(&p.unit), Some(&p.bed));
            r
        })
        .collect();
    let mut alerts = vec![Vec::new(); patients.len()];
    let mut run = ScenarioRun::new(s);
    let mut out = Vec::new();
    let seconds = s.duration.as_secs();
    for sec in 1..=seconds {
        out.clear();
        run.step(Duration::from_secs(sec), &mut out);
        for r in &out {
            let t = BASE_NS + r.offset.as_nanos() as i64;
            let reading = Reading {
                time_ns: t,
                metric: r.metric,
                value: r.value,
                seq: None,
                quality: r.quality,
            };
            // Received 200 ms after measurement.
            alerts[r.patient_index].extend(patients[r.patient_index].on_reading(
                rules,
                r.device.as_str(),
                t + S / 5,
                &reading,
            ));
        }
        let now = BASE_NS + sec as i64 * S;
        for (i, p) in patients.iter_mut().enumerate() {
            alerts[i].extend(p.on_tick(rules, now));
        }
    }
    Outcome { alerts, run }
}

fn raised<'a>(alerts: &'a [Alert], rule: &str) -> Option<&'a Alert> {
    alerts
        .iter()
        .find(|a| a.rule == rule && a.event == AlertEventKind::Raised)
}

/// Seconds from the event's onset to the alert's transition.
fn delay_s(o: &Outcome, patient: usize, kind: EventKind, a: &Alert) -> f64 {
    let onset = o
        .run
        .events()
        .iter()
        .find(|e| e.patient_index == patient && e.kind == kind)
        .expect("the event")
        .onset;
    (a.at_ns - BASE_NS - onset.as_nanos() as i64) as f64 / 1e9
}

fn clinical(alerts: &[Alert]) -> Vec<&Alert> {
    alerts
        .iter()
        .filter(|a| !a.technical && a.event == AlertEventKind::Raised)
        .collect()
}

#[test]
fn each_deterioration_raises_its_alert() {
    let rules = default_rules();
    let cases = [
        ("desaturation", EventKind::Desaturation, "spo2-low"),
        ("desaturation", EventKind::Desaturation, "spo2-critical"),
        ("tachycardia", EventKind::Tachycardia, "hr-high"),
        ("hypotension", EventKind::Hypotension, "sbp-low"),
        ("sepsis", EventKind::Sepsis, "news2"),
    ];
    println!("scenario       rule            priority  delay from onset");
    for (name, kind, rule) in cases {
        let s = scenario(name);
        let o = replay(&s, &rules);
        let a = raised(&o.alerts[0], rule).unwrap_or_else(|| {
            panic!(
                "{name}: no {rule} alert; got {:?}",
                o.alerts[0]
                    .iter()
                    .map(|a| (&a.rule, a.event))
                    .collect::<Vec<_>>()
            )
        });
        let d = delay_s(&o, 0, kind, a);
        println!(
            "{name:<14} {rule:<15} {:<9} {d:>6.0} s",
            format!("{:?}", a.priority).to_lowercase()
        );
        assert!(d > 0.0, "{name}: the alert cannot precede the onset");
        assert!(
            a.first_reading_ns <= a.raised_ns,
            "the first reading that met the condition precedes the alert"
        );
        // The scenario's control patient (the second) stays quiet.
        if s.patients.len() > 1 {
            let quiet = clinical(&o.alerts[1]);
            assert!(
                quiet.is_empty(),
                "{name}: the stable control raised {quiet:?}"
            );
        }
    }
    // Sepsis: NEWS2 climbs through the bands to an emergency (high).
    let o = replay(&scenario("sepsis"), &rules);
    let high = o.alerts[0]
        .iter()
        .find(|a| a.rule == "news2" && a.base_priority == wardflow_rules::Priority::High)
        .expect("NEWS2 reaches the high band (7+)");
    println!(
        "sepsis         news2 (7+)      high      {:>6.0} s",
        delay_s(&o, 0, EventKind::Sepsis, high)
    );
    let score = high
        .values
        .iter()
        .find(|v| v.name == "news2")
        .expect("the score is among the values")
        .value;
    assert!(score >= 7.0, "high band at NEWS2 {score}");
}

#[test]
fn disconnects_raise_technical_alarms_only() {
    let rules = default_rules();
    let o = replay(&scenario("disconnect"), &rules);
    let probe = raised(&o.alerts[0], "spo2-missing").expect("probe off: spo2-missing");
    println!(
        "disconnect     spo2-missing    {:<9} {:>6.0} s",
        format!("{:?}", probe.priority).to_lowercase(),
        delay_s(&o, 0, EventKind::Disconnect, probe)
    );
    assert!(probe.technical);
    let monitor = raised(&o.alerts[1], "device-silent").expect("monitor off: device-silent");
    println!(
        "disconnect     device-silent   {:<9} {:>6.0} s",
        format!("{:?}", monitor.priority).to_lowercase(),
        delay_s(&o, 1, EventKind::Disconnect, monitor)
    );
    for (i, alerts) in o.alerts.iter().enumerate() {
        let c = clinical(alerts);
        assert!(
            c.is_empty(),
            "patient {i}: a disconnect is no clinical alarm: {c:?}"
        );
        assert!(
            alerts.iter().any(|a| a.event == AlertEventKind::Resolved),
            "patient {i}: the technical alarm resolves when data returns"
        );
    }
}

#[test]
fn stable_patients_raise_no_alert_over_24_patient_hours() {
    let rules = default_rules();
    let mut s = scenario("stable");
    // Eight patients for three hours.
    s.duration = Duration::from_secs(3 * 3600);
    let hours = s.patients.len() as f64 * 3.0;
    assert!(hours >= 24.0);
    let o = replay(&s, &rules);
    let all: Vec<&Alert> = o.alerts.iter().flatten().collect();
    println!(
        "stable: {hours} patient-hours, {} alert transitions",
        all.len()
    );
    assert!(
        all.is_empty(),
        "stable patients raised {:?}",
        all.iter()
            .map(|a| (&a.patient, &a.rule))
            .collect::<Vec<_>>()
    );
}

#[test]
fn motion_artefacts_are_suppressed() {
    let rules = default_rules();
    // The naive rule set: the same thresholds, alarming on a single sample.
    let naive = RuleSet::parse(
        std::path::Path::new("naive.toml"),
        r#"
[[rule]]
id = "spo2-naive"
priority = "medium"
when = { metric = "spo2", below = 90 }
[[rule]]
id = "hr-naive"
priority = "medium"
when = { metric = "hr", above = 130 }
"#,
    )
    .unwrap();
    let s = scenario("artefacts");
    let shipped = replay(&s, &rules);
    let naive_run = replay(&s, &naive);
    let artefacts = shipped.run.artefacts();
    assert!(artefacts.len() >= 50, "{} artefacts", artefacts.len());
    let during = |alerts: &[Alert], a: &wardflow_simulator::scenario::ArtefactInterval| {
        let (from, to) = (
            BASE_NS + a.start.as_nanos() as i64,
            BASE_NS + a.end.as_nanos() as i64 + 5 * S,
        );
        alerts.iter().any(|x| {
            !x.technical
                && x.event == AlertEventKind::Raised
                && x.raised_ns >= from
                && x.raised_ns < to
        })
    };
    let mut naive_alarmed = 0;
    let mut suppressed = 0;
    for a in &artefacts {
        if during(&naive_run.alerts[a.patient_index], a) {
            naive_alarmed += 1;
            if !during(&shipped.alerts[a.patient_index], a) {
                suppressed += 1;
            }
        }
    }
    let share = suppressed as f64 / naive_alarmed.max(1) as f64;
    println!(
        "artefacts: {} in {} patient-hours; a naive threshold alarms on {naive_alarmed}; the default rules suppress {suppressed} ({:.1} %)",
        artefacts.len(),
        s.patients.len() as f64 * s.duration.as_secs_f64() / 3600.0,
        share * 100.0
    );
    assert!(
        naive_alarmed as f64 >= artefacts.len() as f64 * 0.8,
        "the artefacts cross the naive thresholds"
    );
    assert_eq!(suppressed, naive_alarmed, "every artefact is suppressed");
    let c: Vec<&Alert> = shipped.alerts.iter().flat_map(|a| clinical(a)).collect();
    assert!(c.is_empty(), "artefacts raised {c:?}");
}
