//! Decode a SenML pack and a binary frame, and validate what they carry.
//!
//! Run with `cargo run -p wardflow-ingest --example decode`.

use wardflow_ingest::codec::{self, frame};
use wardflow_ingest::validate::{Receipt, ValidationConfig, Validator};
use wardflow_model::{DeviceId, Metric, PatientId, now_ns};

fn main() {
    let now = now_ns();
    let secs = now / 1_000_000_000;
    let senml = format!(
        r#"[{{"bn":"urn:dev:bed7:","bt":{secs},"n":"hr","u":"beat/min","v":72,"seq":1}},
            {{"n":"temp","u":"[degF]","v":98.6,"seq":2}},
            {{"n":"spo2","u":"%","v":140,"seq":3}}]"#
    );
    let mut binary = Vec::new();
    frame::encode(
        4,
        now,
        &[
            frame::Record::new(Metric::Rr, 0, 14.0, 0),
            frame::Record::new(Metric::Map, 500_000, 88.5, 0),
        ],
        &mut binary,
    );
    println!("binary frame of 2 readings: {} bytes", binary.len());

    let device = DeviceId::new("bed7-monitor").unwrap();
    let patient = PatientId::new("p-7").unwrap();
    let mut validator = Validator::new(ValidationConfig::default());
    for payload in [senml.as_bytes(), binary.as_slice()] {
        let mut decoded = Vec::new();
        let format = codec::decode(payload, now, &mut decoded).expect("decodes");
        let (mut ok, mut dead) = (Vec::new(), Vec::new());
        let receipt = Receipt {
            device: &device,
            patient: Some(&patient),
            received_ns: now,
        };
        validator.validate(receipt, &decoded, &mut ok, &mut dead);
        println!("{format:?}:");
        for r in ok {
            println!(
                "  stored       {} = {} {}",
                r.metric,
                r.value,
                r.metric.canonical_unit().ucum()
            );
        }
        for d in dead {
            println!("  dead letter  {}: {}", d.reason, d.detail);
        }
    }
}
