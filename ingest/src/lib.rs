//! Wardflow's edge toward devices: everything between a device's TCP socket
//! and the dataflow's input.
//!
//! This crate owns the MQTT server ([`server`], on ntex-mqtt, v3.1.1 and v5),
//! the device registry with salted secret hashes ([`registry`]), the payload
//! codecs ([`codec`]: SenML JSON per RFC 8428 and the Wardflow binary
//! frame), validation of decoded readings ([`validate`]), the write-ahead log
//! whose fsync precedes every QoS 1 PUBACK ([`wal`]), and the memory budget
//! that turns overload into TCP backpressure ([`budget`]); and the
//! clinician side of the same server: admissions and clinician accounts
//! ([`census`]), alert feeds and clinicians' commands ([`feeds`]), manual
//! observations ([`observations`]). It does not evaluate rules, run
//! the dataflow, store readings or serve HTTP: `engine` wires this crate to
//! timely and `storage`.
//!
//! Decoding and validating a publish:
//!
//! ```
//! use wardflow_ingest::codec;
//! use wardflow_ingest::validate::{Receipt, ValidationConfig, Validator};
//! use wardflow_model::{DeviceId, PatientId};
//!
//! let now = 1_764_000_000_000_000_000;
//! let payload = br#"[{"bn":"bed7:","bt":1764000000,"n":"hr","u":"beat/min","v":72,"seq":1},
//!                    {"n":"spo2","v":140,"seq":2}]"#;
//! let mut decoded = Vec::new();
//! codec::decode(payload, now, &mut decoded).unwrap();
//!
//! let device = DeviceId::new("mon-7").unwrap();
//! let patient = PatientId::new("p-7").unwrap();
//! let receipt = Receipt { device: &device, patient: Some(&patient), received_ns: now };
//! let (mut readings, mut dead) = (Vec::new(), Vec::new());
//! Validator::new(ValidationConfig::default()).validate(receipt, &decoded, &mut readings, &mut dead);
//! assert_eq!(readings.len(), 1);
//! assert_eq!(dead[0].reason.code(), "implausible_value");
//! ```

pub mod budget;
pub mod census;
pub mod codec;
pub mod envelope;
pub mod feeds;
pub mod jsonstore;
pub mod metrics;
pub mod observations;
pub mod priority;
pub mod registry;
pub mod server;
pub mod validate;
pub mod wal;

pub use envelope::{Envelope, Payload, route_hash};
