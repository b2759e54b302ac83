//! Shared vocabulary of Wardflow: the types every stage speaks.
//!
//! This crate owns the identifiers ([`DeviceId`], [`PatientId`]), the metric
//! catalogue ([`Metric`], with its LOINC and IEEE 11073 MDC codes, canonical
//! UCUM unit and plausible range), unit parsing and conversion ([`Unit`]),
//! the validated [`Reading`] and the [`DeadLetter`] that explains a rejected
//! one. It does no I/O and knows nothing of MQTT, timely or storage formats:
//! those belong to `ingest`, `engine` and `storage`.
//!
//! ```
//! use wardflow_model::{Metric, Unit};
//!
//! let metric = Metric::from_name("temp").unwrap();
//! let unit = Unit::parse("[degF]").unwrap();
//! let celsius = metric.to_canonical(98.6, unit).unwrap();
//! assert!((celsius - 37.0).abs() < 1e-9);
//! assert_eq!(metric.loinc(), "8310-5");
//! ```

mod deadletter;
mod ids;
mod metric;
mod reading;
mod spec;
mod time;
mod unit;

pub use deadletter::{DeadLetter, RejectReason};
pub use ids::{DeviceId, IdError, PatientId};
pub use metric::{Metric, PlausibleRange};
pub use reading::{Quality, Reading};
pub use spec::SpecError;
pub use time::{TimestampNs, now_ns};
pub use unit::{Unit, UnitError};
