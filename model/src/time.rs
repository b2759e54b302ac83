//! Time: nanoseconds since the Unix epoch, UTC, as an `i64` (good until 2262).

/// Nanoseconds since 1970-01-01T00:00:00Z.
pub type TimestampNs = i64;

/// The current wall-clock time.
pub fn now_ns() -> TimestampNs {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}
