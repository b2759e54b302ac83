//! Writing readings to the store beside a baseline measured in the same run:
//! the same rows written as one unsorted Parquet file with arrow's default
//! writer (no sorting by patient, no partitioning, no fsync), which is the
//! least any Parquet store pays. Beside them, what the audit trail adds:
//! the ledger leaves and the batch's Merkle root of the same rows.
//!
//! A second group times inclusion proofs in a batch of the same 100k
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
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            root: dir.path().into(),
            process: 0,
            interval_ms: 1000,
        };
        let mut epoch = (d.t0 / 1_000_000) as u64;
        b.iter(|| {
            let mut w: ShardWriter<()> = ShardWriter::new(config.clone(), 0);
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
            black_box(w.flush_before(None).unwrap())
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

criterion_group!(benches, write, proofs);
criterion_main!(benches);
