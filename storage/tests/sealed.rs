//! Encryption at rest end to end: sealed intervals read back with the
//! keys, withheld without them, unreadable after an erasure (while other
//! patients stay readable), leaves that do not change when the files are
//! compacted or the master key rotated.

use std::path::Path;
use std::sync::Arc;

use wardflow_model::{
    DeadLetter, DeviceId, Metric, PatientId, Quality, Reading, RejectReason, TimestampNs,
};
use wardflow_storage::compact::{CompactionPolicy, compact};
use wardflow_storage::leaves::stored_leaves;
use wardflow_storage::query::{
    DeadLetterQuery, ReadingQuery, WithheldReason, read_dead_letters, read_readings,
};
use wardflow_storage::seal::{Keyring, MasterKey, rotate};
use wardflow_storage::{Origin, ShardWriter, StorageError, StoreConfig};

const T0: i64 = 1_764_079_200_000_000_000; // an hour boundary
const E0: u64 = 1_764_079_200_000;
const SEC: i64 = 1_000_000_000;

fn master(b: u8) -> MasterKey {
    MasterKey::from_bytes(&[b; 32])
}

/// A value no other row has: patient `p`, second `s`, metric index `m`.
fn value(p: usize, s: u64, m: usize) -> f64 {
    1000.0 + p as f64 * 100.0 + s as f64 + m as f64 / 8.0 + 0.0123456789
}

fn write(root: &Path, keys: &Arc<Keyring>, seconds: std::ops::Range<u64>, patients: usize) {
    write_received(root, keys, seconds, patients, None)
}

/// As `write`, with every publish received at `received_ns` (default: the
/// reading's time).
fn write_received(
    root: &Path,
    keys: &Arc<Keyring>,
    seconds: std::ops::Range<u64>,
    patients: usize,
    received_ns: Option<i64>,
) {
    let config = StoreConfig {
        root: root.to_path_buf(),
        process: 0,
        interval_ms: 1000,
    };
    let mut w: ShardWriter<u64> = ShardWriter::new(config, 0)
        .collect_leaves(true)
        .with_keyring(Some(keys.clone()));
    for s in seconds {
        let t = T0 + s as i64 * SEC;
        for p in 0..patients {
            let device = DeviceId::new(&format!("mon-{p}")).unwrap();
            let patient = PatientId::new(&format!("p-{p}")).unwrap();
            let readings: Vec<Reading> = [Metric::Hr, Metric::Spo2, Metric::Rr]
                .iter()
                .enumerate()
                .map(|(m, &metric)| Reading {
                    time_ns: t,
                    metric,
                    value: value(p, s, m),
                    seq: Some(s * 3 + m as u64),
                    quality: Quality::default(),
                })
                .collect();
            let dead = (s == 0).then(|| DeadLetter {
                received_ns: t,
                device: device.clone(),
                patient: Some(patient.clone()),
                reason: RejectReason::ImplausibleValue,
                detail: format!("hr {} is out of range", value(p, 99, 0)),
                metric: Some("hr".into()),
                raw: format!("{{\"v\":{}}}", value(p, 99, 0)),
                time_ns: Some(t),
                seq: None,
            });
            w.append(
                E0 + s * 1000,
                Origin {
                    device: &device,
                    patient: Some(&patient),
                    received_ns: received_ns.unwrap_or(t),
                },
                &readings,
                dead,
                0,
            );
        }
    }
    w.flush_before(None).unwrap();
}

fn query(root: &Path, keys: Option<&Keyring>, patient: &str) -> (Vec<f64>, Vec<WithheldReason>) {
    let q = ReadingQuery {
        patient: Some(patient.into()),
        ..Default::default()
    };
    let a = read_readings(root, keys, &q).unwrap();
    (
        a.rows.iter().map(|r| r.value).collect(),
        a.withheld.into_iter().map(|w| w.reason).collect(),
    )
}

/// Every file under `root`, as bytes.
fn all_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn leaves(root: &Path) -> Vec<(u64, [u8; 32])> {
    let mut out = Vec::new();
    stored_leaves(root, 0, 0..u64::MAX, 1000, &mut out).unwrap();
    out.sort();
    out
}

#[test]
fn sealed_rows_read_back_with_the_keys_and_not_without() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::open(dir.path(), master(1)).unwrap());
    write(dir.path(), &keys, 0..4, 3);

    let (values, withheld) = query(dir.path(), Some(&keys), "p-1");
    assert!(withheld.is_empty());
    let mut want: Vec<f64> = (0..4)
        .flat_map(|s| (0..3).map(move |m| value(1, s, m)))
        .collect();
    let mut got = values.clone();
    got.sort_by(f64::total_cmp);
    want.sort_by(f64::total_cmp);
    assert_eq!(got, want);

    // Without the keys: nothing is returned, and the answer says why.
    let (values, withheld) = query(dir.path(), None, "p-1");
    assert!(values.is_empty());
    assert_eq!(withheld, vec![WithheldReason::NoKey]);
    let err = wardflow_storage::query::query_readings(
        dir.path(),
        &ReadingQuery {
            patient: Some("p-1".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, StorageError::Withheld(_)), "{err}");

    // Dead letters: payload sealed too.
    let dl = read_dead_letters(dir.path(), Some(&keys), &DeadLetterQuery::default()).unwrap();
    assert_eq!(dl.rows.len(), 3);
    assert!(
        dl.rows
            .iter()
            .any(|d| d.raw.contains(&value(1, 99, 0).to_string()))
    );
    let dl = read_dead_letters(dir.path(), None, &DeadLetterQuery::default()).unwrap();
    assert!(dl.rows.is_empty());
    assert_eq!(dl.withheld.iter().map(|w| w.rows).sum::<u64>(), 3);

    // No value appears in any file, in text or as f64 bytes.
    for (path, bytes) in all_bytes(dir.path()) {
        for p in 0..3 {
            for (s, m) in [(0, 0), (3, 2), (99, 0)] {
                let v = value(p, s, m);
                assert!(
                    !contains(&bytes, &v.to_le_bytes()),
                    "{path} holds {v} as bytes"
                );
                assert!(
                    !contains(&bytes, v.to_string().as_bytes()),
                    "{path} holds {v} as text"
                );
            }
        }
    }
}

#[test]
fn erasure_shreds_one_patient_and_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::open(dir.path(), master(1)).unwrap());
    write(dir.path(), &keys, 0..3, 3);
    let before = leaves(dir.path());

    let erased = Keyring::open(dir.path(), master(1))
        .unwrap()
        .erase("p-2", "admin", "the patient's request")
        .unwrap()
        .expect("p-2 had a key");
    keys.refresh().unwrap();

    let (values, withheld) = query(dir.path(), Some(&keys), "p-2");
    assert!(values.is_empty());
    assert_eq!(
        withheld,
        vec![WithheldReason::Erased {
            generation: 1,
            erased_at_ns: erased.erased_at_ns
        }]
    );
    let (values, withheld) = query(dir.path(), Some(&keys), "p-0");
    assert_eq!((values.len(), withheld.len()), (9, 0));
    // The audit trail still verifies: leaves commit to the sealed bytes.
    assert_eq!(leaves(dir.path()), before);

    // Readings received before the erasure but stored after it (an
    // interval in flight, a log replay) are erased too.
    write(dir.path(), &keys, 10..11, 3);
    let a = read_readings(
        dir.path(),
        Some(&keys),
        &ReadingQuery {
            patient: Some("p-2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(a.rows.is_empty());
    assert_eq!(a.withheld.iter().map(|w| w.rows).sum::<u64>(), 12);
    // Readings received after it get a new key and read back.
    write_received(
        dir.path(),
        &keys,
        20..21,
        3,
        Some(erased.erased_at_ns + SEC),
    );
    let (values, withheld) = query(dir.path(), Some(&keys), "p-2");
    assert_eq!(values.len(), 3);
    assert_eq!(withheld.len(), 1);
    assert_eq!(keys.key_for_write("p-2").unwrap().generation(), 2);
}

#[test]
fn compaction_and_rotation_keep_values_and_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::open(dir.path(), master(1)).unwrap());
    write(dir.path(), &keys, 0..20, 4);
    let before = leaves(dir.path());
    let (values, _) = query(dir.path(), Some(&keys), "p-3");
    assert_eq!(values.len(), 60);

    let stats = compact(
        dir.path(),
        0,
        E0 + 100_000,
        &CompactionPolicy {
            min_files: 4,
            ..CompactionPolicy::default()
        },
    )
    .unwrap();
    assert!(stats.files_out >= 1 && stats.files_in >= 20, "{stats:?}");
    assert_eq!(leaves(dir.path()), before);
    let (after, withheld) = query(dir.path(), Some(&keys), "p-3");
    assert!(withheld.is_empty());
    let (mut a, mut b) = (values, after);
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    assert_eq!(a, b);

    drop(keys);
    assert_eq!(rotate(dir.path(), &master(1), &master(2)).unwrap(), 4);
    let keys = Keyring::open(dir.path(), master(2)).unwrap();
    let (after, _) = query(dir.path(), Some(&keys), "p-3");
    assert_eq!(after.len(), 60);
    assert_eq!(leaves(dir.path()), before);
}

#[test]
fn a_time_range_inside_a_sealed_run_returns_just_that_range() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(Keyring::open(dir.path(), master(1)).unwrap());
    write(dir.path(), &keys, 0..5, 2);
    let q = ReadingQuery {
        patient: Some("p-0".into()),
        metric: Some(Metric::Spo2),
        from_ns: Some(T0 + SEC),
        to_ns: Some(T0 + 3 * SEC) as Option<TimestampNs>,
        ..Default::default()
    };
    let a = read_readings(dir.path(), Some(&keys), &q).unwrap();
    let got: Vec<(i64, f64)> = a.rows.iter().map(|r| (r.time_ns, r.value)).collect();
    assert_eq!(
        got,
        vec![(T0 + SEC, value(0, 1, 1)), (T0 + 2 * SEC, value(0, 2, 1))]
    );
}
