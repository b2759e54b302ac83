//! Evaluating alert rules per reading, beside baselines measured in the same
//! run: decoding and validating the same readings (what every reading
//! already costs), and a single sustained threshold rule. The full set is the shipped adult ICU rules (20
//! rules, NEWS2 among them).
//!
//! `cargo bench -p wardflow-benches --bench rules`

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wardflow_ingest::codec::{self, frame};
use wardflow_ingest::validate::{Receipt, ValidationConfig, Validator};
use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading, now_ns};
use wardflow_rules::default_rules;
use wardflow_rules::patient::PatientRules;
use wardflow_rules::spec::RuleSet;

const N: usize = 7_000;

/// A stable adult's vitals, one of each of seven metrics a second.
fn readings(t0: i64) -> Vec<Reading> {
    (0..N)
        .map(|i| {
            let base = [72.0, 97.0, 14.0, 121.0, 79.0, 93.0, 36.8][i % 7];
            Reading {
                time_ns: t0 + (i / 7) as i64 * 1_000_000_000,
                metric: Metric::ALL[i % 7],
                value: base + ((i * 7919) % 11) as f64 * 0.1,
                seq: Some(i as u64),
                quality: Quality::default(),
            }
        })
        .collect()
}

fn evaluate(c: &mut Criterion) {
    let t0 = now_ns() - N as i64 / 7 * 1_000_000_000;
    let rs = readings(t0);
    let mut g = c.benchmark_group("rules_per_reading");
    g.throughput(Throughput::Elements(N as u64));

    let device = DeviceId::new("mon-1").unwrap();
    let patient = PatientId::new("p-1").unwrap();
    let records: Vec<frame::Record> = rs
        .iter()
        .map(|r| frame::Record::new(r.metric, ((r.time_ns - t0) / 1000) as u32, r.value, 0))
        .collect();
    let mut payload = Vec::new();
    frame::encode(0, t0, &records, &mut payload);
    let mut decoded = Vec::with_capacity(N);
    g.bench_function("baseline: decode + validate", |b| {
        b.iter(|| {
            decoded.clear();
            codec::decode(black_box(&payload), t0, &mut decoded).unwrap();
            let mut v = Validator::new(ValidationConfig::default());
            let (mut ok, mut dead) = (Vec::with_capacity(N), Vec::new());
            let receipt = Receipt {
                device: &device,
                patient: Some(&patient),
                received_ns: now_ns(),
            };
            v.validate(receipt, &decoded, &mut ok, &mut dead);
            black_box(ok.len())
        })
    });

    let one = RuleSet::parse(
        Path::new("one.toml"),
        "[[rule]]\nid='spo2-low'\npriority='high'\nwhen={metric='spo2', below=90, exit=92}\nfor='15s'\n",
    )
    .unwrap();
    let full = default_rules();
    for (name, set) in [
        ("one threshold rule", &one),
        ("default ICU rules (20)", &full),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut p = PatientRules::new("p-1", set);
                let mut alerts = 0;
                for r in black_box(&rs) {
                    alerts += p.on_reading(set, "mon-1", r.time_ns, r).len();
                }
                black_box(alerts)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, evaluate);
criterion_main!(benches);
