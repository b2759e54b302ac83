//! Dead letters: every rejected reading, with the reason it was rejected.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, PatientId, TimestampNs};

/// Why a reading (or a whole payload) was rejected. The `code` is stable: it
/// names the metric label (`wardflow_readings_rejected_total{reason=...}`) and
/// the `reason` column of the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The payload is neither SenML JSON nor a Wardflow binary frame.
    UnknownFormat,
    /// The payload could not be decoded (broken JSON, truncated frame, ...).
    MalformedPayload,
    /// The metric name or code is not in the catalogue.
    UnknownMetric,
    /// A record without a numeric value (SenML `vs`, `vb`, `vd`, or none).
    MissingValue,
    /// The unit is unknown, or measures another quantity than the metric.
    UnitNotConvertible,
    /// NaN or infinite.
    NonFiniteValue,
    /// Outside the metric's plausible range.
    ImplausibleValue,
    /// Further in the future than the configured clock skew allows.
    TimestampInFuture,
    /// Older than the configured acceptance window.
    TimestampTooOld,
    /// A reading without a sequence number whose time is before the newest
    /// reading of the same device and metric: it cannot be told apart from a
    /// resend, so it is kept here rather than stored twice.
    OutOfOrder,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::UnknownFormat,
        RejectReason::MalformedPayload,
        RejectReason::UnknownMetric,
        RejectReason::MissingValue,
        RejectReason::UnitNotConvertible,
        RejectReason::NonFiniteValue,
        RejectReason::ImplausibleValue,
        RejectReason::TimestampInFuture,
        RejectReason::TimestampTooOld,
        RejectReason::OutOfOrder,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectReason::UnknownFormat => "unknown_format",
            RejectReason::MalformedPayload => "malformed_payload",
            RejectReason::UnknownMetric => "unknown_metric",
            RejectReason::MissingValue => "missing_value",
            RejectReason::UnitNotConvertible => "unit_not_convertible",
            RejectReason::NonFiniteValue => "non_finite_value",
            RejectReason::ImplausibleValue => "implausible_value",
            RejectReason::TimestampInFuture => "timestamp_in_future",
            RejectReason::TimestampTooOld => "timestamp_too_old",
            RejectReason::OutOfOrder => "out_of_order",
        }
    }

    pub fn from_code(code: &str) -> Option<RejectReason> {
        Self::ALL.iter().copied().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A rejected reading or payload, kept with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When Wardflow received the publish that carried it.
    pub received_ns: TimestampNs,
    pub device: DeviceId,
    /// The patient the device was bound to on receipt, if any.
    pub patient: Option<PatientId>,
    pub reason: RejectReason,
    /// A sentence naming the field and what was expected.
    pub detail: String,
    /// The metric name as sent, when the record got that far.
    pub metric: Option<String>,
    /// The raw value as sent (or an excerpt of an undecodable payload).
    pub raw: String,
    /// The device's time for the reading, when known.
    pub time_ns: Option<TimestampNs>,
    /// The device's sequence number, when known.
    pub seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_code(r.code()), Some(r));
            assert!(seen.insert(r.code()));
        }
    }
}
