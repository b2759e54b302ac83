//! The store end to end: write intervals, read them back, recover from a
//! crash, compact, and read the same answers.

use std::path::Path;

use wardflow_model::{DeadLetter, DeviceId, Metric, PatientId, Quality, Reading, RejectReason};
use wardflow_storage::checkpoint::{consolidate_states, load_states, recover};
use wardflow_storage::compact::{CompactionPolicy, Compactor, compact};
use wardflow_storage::query::{DeadLetterQuery, ReadingQuery, query_dead_letters, query_readings};
use wardflow_storage::{Origin, ShardWriter, StoreConfig};

const T0: i64 = 1_764_079_200_000_000_000; // an hour boundary
const E0: u64 = 1_764_079_200_000;
const SEC: i64 = 1_000_000_000;

fn config(root: &Path) -> StoreConfig {
    StoreConfig {
        root: root.to_path_buf(),
        process: 0,
        interval_ms: 1000,
    }
}

fn ids(i: usize) -> (DeviceId, PatientId) {
    (
        DeviceId::new(&format!("mon-{i}")).unwrap(),
        PatientId::new(&format!("p-{i}")).unwrap(),
    )
}

fn reading(metric: Metric, t: i64, value: f64, seq: u64) -> Reading {
    Reading {
        time_ns: t,
        metric,
        value,
        seq: Some(seq),
        quality: Quality::default(),
    }
}

/// `n` seconds of 1 Hz hr and spo2 for patients 0..patients, one interval a second.
fn write_seconds(w: &mut ShardWriter<u64>, seconds: std::ops::Range<u64>, patients: usize) {
    write_patients(w, seconds, 0..patients);
}

/// `n` seconds of 1 Hz hr and spo2 for the given patients.
fn write_patients(
    w: &mut ShardWriter<u64>,
    seconds: std::ops::Range<u64>,
    patients: std::ops::Range<usize>,
) {
    for s in seconds {
        for p in patients.clone() {
            let (d, pat) = ids(p);
            let t = T0 + s as i64 * SEC;
            let rs = [
                reading(Metric::Hr, t, 60.0 + s as f64, 2 * s),
                reading(Metric::Spo2, t, 97.0, 2 * s + 1),
            ];
            w.append(
                E0 + s * 1000,
                Origin {
                    device: &d,
                    patient: Some(&pat),
                    received_ns: t,
                },
                &rs,
                [],
                2 * s + 1,
            );
        }
    }
}

fn all_of(root: &Path, patient: &str) -> Vec<(i64, String, f64)> {
    let q = ReadingQuery {
        patient: Some(patient.into()),
        ..Default::default()
    };
    query_readings(root, &q)
        .unwrap()
        .into_iter()
        .map(|r| (r.time_ns, r.metric, r.value))
        .collect()
}

#[test]
fn flushes_only_complete_intervals_and_queries_filter() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    write_seconds(&mut w, 0..3, 3);
    // Frontier inside the third interval: two intervals are complete.
    let stats = w.flush_before(Some(E0 + 2500)).unwrap();
    assert_eq!(stats.intervals, 2);
    assert_eq!(stats.readings, 2 * 3 * 2);
    assert_eq!(w.earliest_pending(), Some(E0 + 2000));
    w.flush_before(None).unwrap();
    assert_eq!(w.pending_rows(), 0);

    let rows = all_of(dir.path(), "p-1");
    assert_eq!(rows.len(), 6);
    assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0), "ordered by time");
    let q = ReadingQuery {
        patient: Some("p-2".into()),
        metric: Some(Metric::Hr),
        from_ns: Some(T0 + SEC),
        to_ns: Some(T0 + 2 * SEC),
        ..Default::default()
    };
    let rows = query_readings(dir.path(), &q).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].value, rows[0].device.as_str(), rows[0].seq),
        (61.0, "mon-2", Some(2))
    );
    assert!(all_of(dir.path(), "p-9").is_empty());
}

#[test]
fn readings_partition_by_their_own_hour() {
    let dir = tempfile::tempdir().unwrap();
    let mut w: ShardWriter<u64> = ShardWriter::new(config(dir.path()), 0);
    let (d, p) = ids(0);
    // Received now, but one reading is from the previous hour (a backlog upload).
    let rs = [
        reading(Metric::Hr, T0 - 10 * SEC, 70.0, 1),
        reading(Metric::Hr, T0 + SEC, 71.0, 2),
    ];
    w.append(
        E0 + 1000,
        Origin {
            device: &d,
            patient: Some(&p),
            received_ns: T0 + SEC,
        },
        &rs,
        [],
        0,
    );
    let stats = w.flush_before(None).unwrap();
    assert_eq!(stats.files, 3, "two hour partitions and a state file");
    assert!(dir.path().join("readings/date=2025-11-25/hour=13").is_dir());
    assert!(dir.path().join("readings/date=2025-11-25/hour=14").is_dir());
    assert_eq!(all_of(dir.path(), "p-0").len(), 2);
}

#[test]
fn dead_letters_are_stored_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let mut w: ShardWriter<u64> = ShardWriter::new(config(dir.path()), 0);
    let (d, p) = ids(0);
    let dl = |reason, t| DeadLetter {
        received_ns: t,
        device: d.clone(),
        patient: Some(p.clone()),
        reason,
        detail: "why".into(),
        metric: Some("spo2".into()),
        raw: "140".into(),
        time_ns: Some(t),
        seq: Some(9),
    };
    w.append(
        E0,
        Origin {
            device: &d,
            patient: Some(&p),
            received_ns: T0,
        },
        &[],
        [
            dl(RejectReason::ImplausibleValue, T0),
            dl(RejectReason::MalformedPayload, T0 + SEC),
        ],
        0,
    );
    w.flush_before(None).unwrap();
    let all = query_dead_letters(dir.path(), &DeadLetterQuery::default()).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].reason, "malformed_payload", "newest first");
    let q = DeadLetterQuery {
        reason: Some("implausible_value".into()),
        device: Some("mon-0".into()),
        ..Default::default()
    };
    let one = query_dead_letters(dir.path(), &q).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        (one[0].raw.as_str(), one[0].seq, one[0].patient.as_deref()),
        ("140", Some(9), Some("p-0"))
    );
}

#[test]
fn recovery_removes_what_the_log_will_replay_and_keeps_states_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    write_seconds(&mut w, 0..3, 2);
    w.flush_before(None).unwrap();
    assert_eq!(all_of(dir.path(), "p-0").len(), 6);

    let checkpoint = E0 + 2000;
    let report = recover(dir.path(), 0, checkpoint).unwrap();
    assert_eq!(
        report.uncommitted, 2,
        "the third interval's readings and state files"
    );
    assert_eq!(all_of(dir.path(), "p-0").len(), 4);
    let states = load_states::<u64>(dir.path(), checkpoint).unwrap();
    assert_eq!(states[&ids(0).0], 3, "state written with interval 1");

    // Another process's files are not this process's to delete.
    let mut other = ShardWriter::new(
        StoreConfig {
            process: 1,
            ..config(dir.path())
        },
        0,
    );
    write_seconds(&mut other, 5..6, 1);
    other.flush_before(None).unwrap();
    recover(dir.path(), 0, checkpoint).unwrap();
    assert_eq!(all_of(dir.path(), "p-0").len(), 6);
}

#[test]
fn compaction_keeps_answers_and_survives_a_crash_before_deleting_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    let mut w1 = ShardWriter::new(config(dir.path()), 1);
    write_seconds(&mut w, 0..20, 2);
    for s in 0..20u64 {
        let (d, p) = ids(5);
        let t = T0 + s as i64 * SEC;
        w1.append(
            E0 + s * 1000,
            Origin {
                device: &d,
                patient: Some(&p),
                received_ns: t,
            },
            &[reading(Metric::Rr, t, 14.0, s)],
            [],
            s,
        );
    }
    w.flush_before(None).unwrap();
    w1.flush_before(None).unwrap();
    let before: Vec<_> = ["p-0", "p-1", "p-5"]
        .iter()
        .map(|p| all_of(dir.path(), p))
        .collect();

    let part = dir.path().join("readings/date=2025-11-25/hour=14");
    let files = |d: &Path| std::fs::read_dir(d).unwrap().count();
    assert_eq!(files(&part), 40);
    // Keep one input aside to simulate a crash between rename and delete.
    let kept = part.join("e1764079200000-p0-w0.parquet");
    let saved = std::fs::read(&kept).unwrap();

    // Only committed intervals are compacted.
    let stats = compact(
        dir.path(),
        0,
        E0 + 10_000,
        &CompactionPolicy {
            min_files: 4,
            ..CompactionPolicy::default()
        },
    )
    .unwrap();
    assert_eq!((stats.files_in, stats.files_out), (20, 1));
    assert_eq!(files(&part), 21);
    let after: Vec<_> = ["p-0", "p-1", "p-5"]
        .iter()
        .map(|p| all_of(dir.path(), p))
        .collect();
    assert_eq!(before, after);

    std::fs::write(&kept, saved).unwrap();
    let again: Vec<_> = ["p-0", "p-1", "p-5"]
        .iter()
        .map(|p| all_of(dir.path(), p))
        .collect();
    assert_eq!(before, again, "a covered file is not read twice");
    let report = recover(dir.path(), 0, E0 + 20_000).unwrap();
    assert_eq!((report.covered, report.uncommitted), (1, 0));
    assert!(!kept.exists());

    // A small row budget splits runs.
    let stats = compact(
        dir.path(),
        0,
        E0 + 20_000,
        &CompactionPolicy {
            min_files: 2,
            max_rows: 25,
            ..CompactionPolicy::default()
        },
    )
    .unwrap();
    assert!(stats.files_out >= 2, "{stats:?}");
    let last: Vec<_> = ["p-0", "p-1", "p-5"]
        .iter()
        .map(|p| all_of(dir.path(), p))
        .collect();
    assert_eq!(before, last);
}

fn answers(root: &Path, patients: std::ops::Range<usize>) -> Vec<Vec<(i64, String, f64)>> {
    patients.map(|p| all_of(root, &format!("p-{p}"))).collect()
}

/// A merge takes whole intervals: a row budget that fills up between two
/// workers' files of one interval must not leave the second file named
/// covered by the merged one (readers would skip it, recovery delete it).
#[test]
fn compaction_never_splits_an_interval_between_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut w0 = ShardWriter::new(config(dir.path()), 0);
    let mut w1 = ShardWriter::new(config(dir.path()), 1);
    // Each worker: 4 rows an interval; intervals hold 8.
    write_patients(&mut w0, 0..11, 0..2);
    write_patients(&mut w1, 0..11, 2..4);
    w0.flush_before(None).unwrap();
    w1.flush_before(None).unwrap();
    let before = answers(dir.path(), 0..4);
    assert_eq!(before.iter().map(Vec::len).sum::<usize>(), 11 * 8);

    // 12 rows: room for one interval and half of the next. Split by file,
    // the last run would be one file, left unmerged yet named covered.
    let policy = CompactionPolicy {
        min_files: 2,
        max_rows: 12,
        ..CompactionPolicy::default()
    };
    let stats = compact(dir.path(), 0, E0 + 11_000, &policy).unwrap();
    assert_eq!(answers(dir.path(), 0..4), before);
    assert_eq!((stats.files_in, stats.files_out), (22, 11), "{stats:?}");
    let report = recover(dir.path(), 0, E0 + 11_000).unwrap();
    assert_eq!(report.covered, 0);
    assert_eq!(answers(dir.path(), 0..4), before);
}

/// Size tiers: an interval that is large already is left as it is, and
/// the small ones on either side of it are merged apart.
#[test]
fn compaction_leaves_large_intervals_and_merges_around_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    write_patients(&mut w, 0..5, 0..1);
    write_patients(&mut w, 5..6, 0..10);
    write_patients(&mut w, 6..12, 0..1);
    w.flush_before(None).unwrap();
    let before = answers(dir.path(), 0..10);
    let policy = CompactionPolicy {
        min_files: 2,
        max_rows: 1 << 20,
        large_rows: 20,
    };
    let mut compactor = Compactor::new(policy);
    let stats = compactor.run(dir.path(), 0, E0 + 12_000).unwrap();
    assert_eq!((stats.files_in, stats.files_out), (11, 2), "{stats:?}");
    let part = dir.path().join("readings/date=2025-11-25/hour=14");
    let mut names: Vec<String> = std::fs::read_dir(&part)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("c{E0}-{}-p0.parquet", E0 + 4000),
            format!("c{}-{}-p0.parquet", E0 + 6000, E0 + 11_000),
            format!("e{}-p0-w0.parquet", E0 + 5000),
        ]
    );
    assert_eq!(answers(dir.path(), 0..10), before);
    // Nothing is left to merge: the next pass changes nothing.
    let again = compactor.run(dir.path(), 0, E0 + 12_000).unwrap();
    assert_eq!(again.files_in, 0);
    assert_eq!(recover(dir.path(), 0, E0 + 12_000).unwrap().covered, 0);
    assert_eq!(answers(dir.path(), 0..10), before);
}

#[test]
fn consolidated_states_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    write_seconds(&mut w, 0..5, 3);
    w.flush_before(None).unwrap();
    let checkpoint = E0 + 4000;
    let before = load_states::<u64>(dir.path(), checkpoint).unwrap();
    assert_eq!(
        consolidate_states::<u64>(dir.path(), 0, checkpoint).unwrap(),
        4
    );
    let after = load_states::<u64>(dir.path(), checkpoint).unwrap();
    assert_eq!(before, after);
    assert_eq!(after[&ids(2).0], 7);
    // The interval after the checkpoint is still read once it is committed.
    assert_eq!(
        load_states::<u64>(dir.path(), E0 + 5000).unwrap()[&ids(2).0],
        9
    );
}

/// A write that fails keeps its interval for the next attempt; a split
/// writer hands complete intervals to another thread and takes back what it
/// could not write.
#[test]
fn failed_writes_are_kept_and_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(config(dir.path()), 0);
    write_seconds(&mut w, 0..3, 2);
    // A file where the readings directory should be: every write fails.
    let blocker = dir.path().join("readings");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let mut job = w.split_before(Some(E0 + 2500));
    assert_eq!(job.intervals().collect::<Vec<_>>(), [E0, E0 + 1000]);
    assert_eq!(w.intervals().collect::<Vec<_>>(), [E0 + 2000]);
    assert!(job.flush_before(None).is_err());
    assert_eq!(job.pending_rows(), 2 * 2 * 2, "nothing is lost on failure");
    w.absorb(job);
    std::fs::remove_file(&blocker).unwrap();
    let stats = w.flush_before(None).unwrap();
    assert_eq!((stats.intervals, stats.readings), (3, 3 * 2 * 2));
    assert_eq!(all_of(dir.path(), "p-1").len(), 6);
}
