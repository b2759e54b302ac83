//! Write a minute of readings for two patients into a fresh store, compact
//! it, and query one patient's heart rate back.
//!
//! Run with `cargo run -p wardflow-storage --example write_and_query`.

use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading, now_ns};
use wardflow_storage::checkpoint::write_checkpoint;
use wardflow_storage::compact::{CompactionPolicy, compact};
use wardflow_storage::query::{ReadingQuery, query_readings};
use wardflow_storage::{Origin, ShardWriter, StoreConfig};

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = StoreConfig {
        root: dir.path().into(),
        process: 0,
        interval_ms: 1000,
    };
    let mut writer: ShardWriter<()> = ShardWriter::new(config, 0);
    let start = now_ns() - 60_000_000_000;
    let epoch0 = (start / 1_000_000) as u64;
    for s in 0..60i64 {
        for p in 0..2 {
            let device = DeviceId::new(&format!("bed{p}-monitor")).unwrap();
            let patient = PatientId::new(&format!("p-{p}")).unwrap();
            let t = start + s * 1_000_000_000;
            let readings = [
                Reading {
                    time_ns: t,
                    metric: Metric::Hr,
                    value: 70.0 + (s % 5) as f64,
                    seq: Some(2 * s as u64),
                    quality: Quality::default(),
                },
                Reading {
                    time_ns: t,
                    metric: Metric::Spo2,
                    value: 97.0,
                    seq: Some(2 * s as u64 + 1),
                    quality: Quality::default(),
                },
            ];
            writer.append(
                epoch0 + s as u64 * 1000,
                Origin {
                    device: &device,
                    patient: Some(&patient),
                    received_ns: t,
                },
                &readings,
                [],
                (),
            );
        }
    }
    let stats = writer.flush_before(None).expect("flush");
    println!("wrote {} readings in {} files", stats.readings, stats.files);

    let checkpoint = epoch0 + 61_000;
    write_checkpoint(dir.path(), 0, checkpoint).expect("checkpoint");
    let c = compact(dir.path(), 0, checkpoint, &CompactionPolicy::default()).expect("compact");
    println!("compacted {} files into {}", c.files_in, c.files_out);

    let q = ReadingQuery {
        patient: Some("p-1".into()),
        metric: Some(Metric::Hr),
        ..Default::default()
    };
    let rows = query_readings(dir.path(), &q).expect("query");
    println!(
        "p-1 heart rate: {} readings, first {} {}, last {} {}",
        rows.len(),
        rows[0].value,
        rows[0].unit,
        rows[rows.len() - 1].value,
        rows[rows.len() - 1].unit
    );
}
