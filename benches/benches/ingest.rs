//! Decoding and validating payloads, each beside a baseline measured in the
//! same run: a generic JSON parse for SenML (what any JSON-based ingest pays),
//! a plain copy of the bytes for the binary frame.
//!
//! `cargo bench -p wardflow-benches --bench ingest`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wardflow_ingest::codec::{self, frame};
use wardflow_ingest::validate::{Receipt, ValidationConfig, Validator};
use wardflow_model::{DeviceId, Metric, PatientId, now_ns};

/// A plausible adult value of each of the first seven metrics, so every
/// reading passes validation (the benchmark measures the accepting path).
fn value(i: usize) -> f64 {
    [72.0, 97.0, 14.0, 121.0, 79.0, 93.0, 36.8][i % 7] + (i / 7) as f64 * 0.1
}

fn senml(n: usize, t: i64) -> Vec<u8> {
    let mut out = Vec::new();
    codec::senml::encode(
        t,
        (0..n).map(|i| (Metric::ALL[i % 7], t + i as i64, value(i), Some(i as u64))),
        &mut out,
    );
    out
}

fn binary(n: usize, t: i64) -> Vec<u8> {
    let records: Vec<frame::Record> = (0..n)
        .map(|i| frame::Record::new(Metric::ALL[i % 7], i as u32 * 1000, value(i), 0))
        .collect();
    let mut out = Vec::new();
    frame::encode(0, t, &records, &mut out);
    out
}

fn decode(c: &mut Criterion) {
    let t = now_ns();
    for (name, payload, n) in [
        ("senml_1_reading", senml(1, t), 1),
        ("senml_7_readings", senml(7, t), 7),
    ] {
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(n));
        g.bench_function("baseline: serde_json::Value", |b| {
            b.iter(|| {
                black_box(serde_json::from_slice::<serde_json::Value>(black_box(&payload)).unwrap())
            })
        });
        let mut out = Vec::with_capacity(64);
        g.bench_function("wardflow: codec::decode", |b| {
            b.iter(|| {
                out.clear();
                codec::decode(black_box(&payload), t, &mut out).unwrap();
                black_box(out.len())
            })
        });
        g.finish();
    }

    let payload = binary(50, t);
    let mut g = c.benchmark_group("frame_50_readings");
    g.throughput(Throughput::Elements(50));
    g.bench_function("baseline: copy the bytes", |b| {
        b.iter(|| black_box(black_box(&payload).to_vec()))
    });
    let mut out = Vec::with_capacity(64);
    g.bench_function("wardflow: codec::decode", |b| {
        b.iter(|| {
            out.clear();
            codec::decode(black_box(&payload), t, &mut out).unwrap();
            black_box(out.len())
        })
    });
    g.finish();
}

fn validate(c: &mut Criterion) {
    let t = now_ns();
    let payload = binary(50, t);
    let device = DeviceId::new("bench-1").unwrap();
    let patient = PatientId::new("p-1").unwrap();
    let mut g = c.benchmark_group("validate_50_readings");
    g.throughput(Throughput::Elements(50));
    let mut decoded = Vec::with_capacity(64);
    g.bench_function("baseline: decode only", |b| {
        b.iter(|| {
            decoded.clear();
            codec::decode(&payload, t, &mut decoded).unwrap();
            black_box(decoded.len())
        })
    });
    // Fresh sequence numbers every round, as a streaming device sends them.
    let mut validator = Validator::new(ValidationConfig::default());
    let mut seq = 0u64;
    let (mut ok, mut dead) = (Vec::with_capacity(64), Vec::new());
    g.bench_function("wardflow: decode + validate", |b| {
        b.iter(|| {
            decoded.clear();
            codec::decode(&payload, t, &mut decoded).unwrap();
            for d in decoded.iter_mut() {
                d.seq = Some(seq);
                seq += 1;
            }
            ok.clear();
            let receipt = Receipt {
                device: &device,
                patient: Some(&patient),
                received_ns: t,
            };
            black_box(validator.validate(receipt, &decoded, &mut ok, &mut dead));
            assert!(dead.is_empty(), "{dead:?}");
            black_box(ok.len())
        })
    });
    g.finish();
}

criterion_group!(benches, decode, validate);
criterion_main!(benches);
