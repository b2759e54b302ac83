//! Writing readings to the store beside a baseline measured in the same run:
//! the same rows written as one unsorted Parquet file with arrow's default
//! writer (no sorting by patient, no partitioning, no fsync), which is the
//! least any Parquet store pays. Beside them, what the audit trail adds:
//! the ledger leaves and the batch's Merkle root of the same rows.
//!
//! Encryption at rest is measured the same way: the writer with every
//! value sealed beside the writer in the clear, and a day of one patient's
//! 1 Hz readings of five metrics read back from a clear and a sealed store.
//!
//! A further group times inclusion proofs in a batch of the same 100k
//! leaves: building the tree's levels once, then producing and checking
//! one leaf's proof (RFC 6962 audit path, RFC 9162 §2.1.3.2 check).
//!
//! `cargo bench -p wardflow-benches --bench storage`

use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, StringArray, TimestampNanosecondArray, UInt8Array, UInt64Array,
};
use arrow::record_batch::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use parquet::arrow::ArrowWriter;
use wardflow_ledger_bridge::{ProvingTree, canonical_tree, verify_inclusion};
use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading, now_ns};
use wardflow_storage::compact::{CompactionPolicy, compact};
use wardflow_storage::query::{ReadingQuery, read_readings};
use wardflow_storage::seal::{Keyring, MasterKey};
use wardflow_storage::{Origin, ShardWriter, StoreConfig, schema};

const PUBLISHES: usize = 2_000;
const PER_PUBLISH: usize = 50;
const ROWS: usize = PUBLISHES * PER_PUBLISH;

struct Data {
    ids: Vec<(DeviceId, PatientId)>,
    readings: Vec<Reading>,
    t0: i64,
}

fn data() -> Data {
    let t0 = now_ns();
    Data {
        ids: (0..50)
            .map(|i| {
                (
                    DeviceId::new(&format!("bed{i}-monitor")).unwrap(),
                    PatientId::new(&format!("p-{i}")).unwrap(),
                )
            })
            .collect(),
        readings: (0..ROWS)
            .map(|i| Reading {
                time_ns: t0 + (i as i64) * 1_000_000,
                metric: Metric::ALL[i % 7],
                value: 60.0 + (i % 40) as f64,
                seq: Some(i as u64),
                quality: Quality::default(),
            })
            .collect(),
        t0,
    }
}

/// The rows as one `readings` record batch, unsorted.
fn readings_batch(d: &Data) -> RecordBatch {
    let n = ROWS;
    let patient: Vec<&str> = (0..n)
        .map(|i| d.ids[(i / PER_PUBLISH) % 50].1.as_str())
        .collect();
    let device: Vec<&str> = (0..n)
        .map(|i| d.ids[(i / PER_PUBLISH) % 50].0.as_str())
        .collect();
    let epoch = (d.t0 / 1_000_000) as u64;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampNanosecondArray::from_iter_values(d.readings.iter().map(|r| r.time_ns))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from(patient)),
        Arc::new(StringArray::from(device)),
        Arc::new(StringArray::from_iter_values(
            d.readings.iter().map(|r| r.metric.name()),
        )),
        Arc::new(Float64Array::from_iter_values(
            d.readings.iter().map(|r| r.value),
        )),
        Arc::new(StringArray::from_iter_values(
            d.readings.iter().map(|r| r.metric.canonical_unit().ucum()),
        )),
        Arc::new(UInt64Array::from_iter(d.readings.iter().map(|r| r.seq))),
        Arc::new(UInt8Array::from_iter_values(
            d.readings.iter().map(|r| r.quality.0),
        )),
        Arc::new(
            TimestampNanosecondArray::from_iter_values(d.readings.iter().map(|_| d.t0))
                .with_timezone("UTC"),
        ),
        Arc::new(UInt64Array::from_iter_values(
            d.readings.iter().map(|_| epoch),
        )),
    ];
    RecordBatch::try_new(schema::READINGS.clone(), columns).unwrap()
}

fn write(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("store_100k_readings");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.sample_size(10);

    g.bench_function("baseline: one unsorted Parquet file", |b| {
        let dir = tempfile::tempdir().unwrap();
        b.iter(|| {
            let batch = readings_batch(&d);
            let file = std::fs::File::create(dir.path().join("baseline.parquet")).unwrap();
            let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            black_box(w.close().unwrap());
        })
    });

    // What sealing stored rows into the audit trail adds per row: its leaf
    // encoding and SHA-256 (docs/ledger.md), then the batch's tree over the
    // sorted leaf hashes.
    g.bench_function("ledger: leaf hashes of the rows", |b| {
        let batch = readings_batch(&d);
        let mut leaves = Vec::with_capacity(ROWS);
        b.iter(|| {
            leaves.clear();
            wardflow_storage::leaves::reading_leaves(&batch, &mut leaves).unwrap();
            black_box(leaves.len())
        })
    });
    g.bench_function("ledger: sorted Merkle root of the leaf hashes", |b| {
        let batch = readings_batch(&d);
        let mut leaves = Vec::with_capacity(ROWS);
        wardflow_storage::leaves::reading_leaves(&batch, &mut leaves).unwrap();
        let hashes: Vec<_> = leaves.iter().map(|(_, h)| *h).collect();
        b.iter(|| black_box(canonical_tree(hashes.clone()).root()))
    });

    g.bench_function("wardflow: ShardWriter append + flush", |b| {
        b.iter_custom(|iters| write_store(&d, iters, None))
    });
    // Encryption at rest: the same writes with every value sealed under its
    // patient's data key (one AES-256-GCM run per patient and file).
    g.bench_function("wardflow: ShardWriter append + flush, sealed", |b| {
        let keydir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keyring::open(keydir.path(), MasterKey::from_bytes(&[7; 32])).unwrap());
        b.iter_custom(|iters| write_store(&d, iters, Some(keys.clone())))
    });
    g.finish();
}

/// Writes the rows `iters` times as one flush interval; the time of the
/// appends and flushes.
fn write_store(d: &Data, iters: u64, keys: Option<Arc<Keyring>>) -> std::time::Duration {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        root: dir.path().into(),
        process: 0,
        interval_ms: 1000,
    };
    let mut epoch = (d.t0 / 1_000_000) as u64;
    let started = std::time::Instant::now();
    for _ in 0..iters {
        let mut w: ShardWriter<()> = ShardWriter::new(config.clone(), 0).with_keyring(keys.clone());
        epoch += 1000;
        for (i, chunk) in d.readings.chunks(PER_PUBLISH).enumerate() {
            let (device, patient) = &d.ids[i % 50];
            w.append(
                epoch,
                Origin {
                    device,
                    patient: Some(patient),
                    received_ns: d.t0,
                },
                chunk,
                [],
                (),
            );
        }
        black_box(w.flush_before(None).unwrap());
    }
    started.elapsed()
}

const DAY_PATIENTS: usize = 8;
const DAY_METRICS: [Metric; 5] = [
    Metric::Hr,
    Metric::Spo2,
    Metric::Rr,
    Metric::Sbp,
    Metric::Temp,
];

/// A day of 1 Hz readings of five metrics for 8 patients, written a minute
/// per flush interval and compacted to one file per hour, as a store
/// holds it.
fn day_store(root: &std::path::Path, keys: Option<Arc<Keyring>>, t0: i64) {
    let config = StoreConfig {
        root: root.into(),
        process: 0,
        interval_ms: 60_000,
    };
    let ids: Vec<(DeviceId, PatientId)> = (0..DAY_PATIENTS)
        .map(|i| {
            (
                DeviceId::new(&format!("bed{i}-monitor")).unwrap(),
                PatientId::new(&format!("p-{i}")).unwrap(),
            )
        })
        .collect();
    let mut w: ShardWriter<()> = ShardWriter::new(config, 0).with_keyring(keys);
    let epoch0 = (t0 / 1_000_000) as u64;
    let mut batch = Vec::with_capacity(300);
    for minute in 0..24 * 60u64 {
        for (p, (device, patient)) in ids.iter().enumerate() {
            batch.clear();
            for s in 0..60i64 {
                let t = t0 + (minute as i64 * 60 + s) * 1_000_000_000;
                for (m, &metric) in DAY_METRICS.iter().enumerate() {
                    batch.push(Reading {
                        time_ns: t,
                        metric,
                        value: 60.0 + ((s + m as i64 + p as i64) % 30) as f64,
                        seq: Some(minute * 300 + s as u64 * 5 + m as u64),
                        quality: Quality::default(),
                    });
                }
            }
            w.append(
                epoch0 + minute * 60_000,
                Origin {
                    device,
                    patient: Some(patient),
                    received_ns: t0,
                },
                &batch,
                [],
                (),
            );
        }
        if minute % 60 == 59 {
            w.flush_before(None).unwrap();
        }
    }
    w.flush_before(None).unwrap();
    compact(
        root,
        0,
        u64::MAX,
        &CompactionPolicy {
            min_files: 2,
            max_rows: 1 << 22,
            ..CompactionPolicy::default()
        },
    )
    .unwrap();
}

/// One patient's 24 hours (432,000 readings) read back, from the clear
/// store and from the sealed one.
fn day_query(c: &mut Criterion) {
    let t0 = (now_ns() / 3_600_000_000_000 - 48) * 3_600_000_000_000;
    let clear = tempfile::tempdir().unwrap();
    day_store(clear.path(), None, t0);
    let sealed = tempfile::tempdir().unwrap();
    let keydir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::open(keydir.path(), MasterKey::from_bytes(&[7; 32])).unwrap());
    day_store(sealed.path(), Some(keys.clone()), t0);
    let q = ReadingQuery {
        patient: Some("p-3".into()),
        from_ns: Some(t0),
        to_ns: Some(t0 + 24 * 3_600_000_000_000),
        ..Default::default()
    };
    let mut g = c.benchmark_group("query_one_patient_24h_1hz_5_metrics");
    g.sample_size(10);
    g.throughput(Throughput::Elements(24 * 3600 * 5));
    g.bench_function("clear store", |b| {
        b.iter(|| {
            let a = read_readings(clear.path(), None, &q).unwrap();
            assert_eq!(a.rows.len(), 24 * 3600 * 5);
            black_box(a)
        })
    });
    g.bench_function("sealed store", |b| {
        b.iter(|| {
            let a = read_readings(sealed.path(), Some(&keys), &q).unwrap();
            assert_eq!(a.rows.len(), 24 * 3600 * 5);
            black_box(a)
        })
    });
    g.finish();
}

fn proofs(c: &mut Criterion) {
    let d = data();
    let batch = readings_batch(&d);
    let mut leaves = Vec::with_capacity(ROWS);
    wardflow_storage::leaves::reading_leaves(&batch, &mut leaves).unwrap();
    let sorted = canonical_tree(leaves.iter().map(|(_, h)| *h).collect()).into_leaf_hashes();
    let tree = ProvingTree::new(sorted.clone());
    let root = tree.root();
    let mut g = c.benchmark_group("proofs_in_a_100k_leaf_batch");
    g.bench_function("build the tree's levels (once per batch)", |b| {
        b.iter(|| black_box(ProvingTree::new(sorted.clone()).root()))
    });
    let mut i = 0usize;
    g.bench_function("produce one leaf's inclusion proof", |b| {
        b.iter(|| {
            i = (i + 7919) % ROWS;
            black_box(tree.inclusion_proof(i))
        })
    });
    let proofs: Vec<_> = (0..1024)
        .map(|k| {
            let i = k * (ROWS / 1024);
            (i, tree.inclusion_proof(i).unwrap())
        })
        .collect();
    let mut k = 0usize;
    g.bench_function("verify one leaf's inclusion proof", |b| {
        b.iter(|| {
            k = (k + 1) % proofs.len();
            let (i, p) = &proofs[k];
            assert!(verify_inclusion(&sorted[*i], *i, ROWS, p, &root));
        })
    });
    g.finish();
}

criterion_group!(benches, write, day_query, proofs);
criterion_main!(benches);
