//! Validation: a decoded reading becomes a stored [`Reading`] or a
//! [`DeadLetter`] with its reason. Nothing is dropped silently: the only
//! readings neither stored nor dead-lettered are exact resends, which are
//! counted as duplicates.
//!
//! Checks, in order:
//! 1. Sequence (per device). Wardflow remembers exactly which sequence
//!    numbers each device has sent, as a set of ranges ([`SeqSet`]; one range
//!    while nothing is missing). A number already in the set is a resend and
//!    dropped, unless its time is newer than anything the device sent before:
//!    then the device restarted its counter, and the set starts afresh
//!    (counted as a sequence reset). A number not in the set is new, however
//!    late it arrives (a device resending after a reconnect, out of order);
//!    a jump forward is counted as a gap. Without a sequence number, a reading
//!    at the same time as the newest of its device and metric is a resend; an
//!    earlier one is dead-lettered as out of order (it cannot be told from a
//!    resend).
//! 2. Metric known; unit known and of the metric's quantity (converted to
//!    the canonical unit); value a finite number within the metric's
//!    plausible range; time no further ahead of the receipt than the allowed
//!    clock skew and no older than the acceptance window.
//!
//! Validation depends only on the readings and the receipt time stored in the
//! write-ahead log, never on the wall clock, so replaying the log after a
//! crash gives the same answers.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use wardflow_model::{
    DeadLetter, DeviceId, Metric, PatientId, Quality, Reading, RejectReason, TimestampNs,
};

use crate::codec::{DecodeError, DecodedMetric, DecodedReading, DecodedUnit, DecodedValue};

/// Validation limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationConfig {
    /// How far ahead of the receipt a device clock may run, in ms.
    pub max_future_skew_ms: u64,
    /// How old a reading may be on receipt, in ms (store-and-forward devices
    /// upload backlogs; beyond this they are dead-lettered).
    pub max_age_ms: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_future_skew_ms: 30_000,
            max_age_ms: 24 * 3_600_000,
        }
    }
}

/// The sequence numbers a device has sent: sorted, disjoint, inclusive
/// ranges. Contiguous numbering keeps one range; each hole adds one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSet {
    ranges: Vec<(u64, u64)>,
    /// Numbers below this are no longer tracked (see [`SeqSet::MAX_RANGES`]).
    floor: u64,
}

/// Where a sequence number stands against a [`SeqSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    New,
    Seen,
    /// Below the tracked window: whether it was seen is no longer known.
    BelowWindow,
}

impl SeqSet {
    /// Most holes remembered per device; past this the oldest range is
    /// forgotten and numbers below it are dead-lettered rather than guessed.
    pub const MAX_RANGES: usize = 256;

    pub fn status(&self, seq: u64) -> SeqStatus {
        if seq < self.floor {
            return SeqStatus::BelowWindow;
        }
        // The first range ending at or after seq.
        let i = self.ranges.partition_point(|&(_, end)| end < seq);
        match self.ranges.get(i) {
            Some(&(start, _)) if start <= seq => SeqStatus::Seen,
            _ => SeqStatus::New,
        }
    }

    /// Adds `seq`; returns how many numbers it skipped past the highest seen.
    pub fn insert(&mut self, seq: u64) -> u64 {
        let gap = match self.ranges.last() {
            Some(&(_, end)) if seq > end => seq - end - 1,
            _ => 0,
        };
        let i = self
            .ranges
            .partition_point(|&(_, end)| end.saturating_add(1) < seq);
        match self.ranges.get(i).copied() {
            Some((start, end)) if start <= seq && seq <= end => return 0,
            Some((start, _)) if start == seq.saturating_add(1) => self.ranges[i].0 = seq,
            Some((_, end)) if end.saturating_add(1) == seq => {
                self.ranges[i].1 = seq;
                // Joining the next range closes a hole.
                if let Some(&(next_start, next_end)) = self.ranges.get(i + 1)
                    && next_start == seq.saturating_add(1)
                {
                    self.ranges[i].1 = next_end;
                    self.ranges.remove(i + 1);
                }
            }
            _ => self.ranges.insert(i, (seq, seq)),
        }
        if self.ranges.len() > Self::MAX_RANGES {
            let (_, end) = self.ranges.remove(0);
            self.floor = end + 1;
        }
        gap
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
        self.floor = 0;
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}

/// What validation remembers of a device: enough to tell resends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The sequence numbers received since the device's last counter reset.
    pub seen: SeqSet,
    /// The newest reading time of the device.
    pub max_time_ns: TimestampNs,
    /// The newest reading time per metric.
    pub metric_max_time_ns: [TimestampNs; Metric::COUNT],
}

impl Default for DeviceState {
    fn default() -> Self {
        Self {
            seen: SeqSet::default(),
            max_time_ns: i64::MIN,
            metric_max_time_ns: [i64::MIN; Metric::COUNT],
        }
    }
}

/// Counters since the last [`Validator::take_counts`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationCounts {
    pub accepted: u64,
    pub rejected: [u64; RejectReason::ALL.len()],
    pub duplicates: u64,
    pub gap_readings: u64,
    pub seq_resets: u64,
}

impl ValidationCounts {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Per-worker validation state.
#[derive(Debug, Default)]
pub struct Validator {
    config: ValidationConfig,
    devices: HashMap<DeviceId, DeviceState>,
    counts: ValidationCounts,
}

/// The receipt of one publish: who sent it, for whom, when.
#[derive(Debug, Clone, Copy)]
pub struct Receipt<'a> {
    pub device: &'a DeviceId,
    pub patient: Option<&'a PatientId>,
    pub received_ns: TimestampNs,
}

enum Verdict {
    Accept(Reading),
    Duplicate,
    Reject(RejectReason, String),
}

impl Validator {
    pub fn new(config: ValidationConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Restores device states, e.g. from the storage checkpoint.
    pub fn restore(&mut self, states: impl IntoIterator<Item = (DeviceId, DeviceState)>) {
        self.devices.extend(states);
    }

    pub fn device_state(&self, device: &str) -> Option<&DeviceState> {
        self.devices.get(device)
    }

    pub fn take_counts(&mut self) -> ValidationCounts {
        std::mem::take(&mut self.counts)
    }

    /// Validates the decoded readings of one publish. Accepted readings are
    /// appended to `readings`, rejected ones to `dead`. Returns the device's
    /// state afterwards.
    pub fn validate(
        &mut self,
        receipt: Receipt<'_>,
        decoded: &[DecodedReading],
        readings: &mut Vec<Reading>,
        dead: &mut Vec<DeadLetter>,
    ) -> DeviceState {
        let config = self.config;
        let state = match self.devices.get_mut(receipt.device.as_str()) {
            Some(s) => s,
            None => self.devices.entry(receipt.device.clone()).or_default(),
        };
        for d in decoded {
            let verdict = match check_sequence(&mut self.counts, state, d) {
                Some(v) => v,
                None => check_content(&config, receipt.received_ns, d),
            };
            match verdict {
                Verdict::Accept(r) => {
                    self.counts.accepted += 1;
                    readings.push(r);
                }
                Verdict::Duplicate => self.counts.duplicates += 1,
                Verdict::Reject(reason, detail) => {
                    self.counts.rejected[reason as usize] += 1;
                    dead.push(dead_letter(receipt, reason, detail, Some(d), None));
                }
            }
            if let DecodedMetric::Known(m) = d.metric {
                let slot = &mut state.metric_max_time_ns[m as usize];
                *slot = (*slot).max(d.time_ns);
            }
            state.max_time_ns = state.max_time_ns.max(d.time_ns);
        }
        state.clone()
    }

    /// Records a publish that could not be decoded at all.
    pub fn reject_payload(
        &mut self,
        receipt: Receipt<'_>,
        error: &DecodeError,
        payload: &[u8],
        dead: &mut Vec<DeadLetter>,
    ) {
        let reason = match error {
            DecodeError::UnknownFormat => RejectReason::UnknownFormat,
            _ => RejectReason::MalformedPayload,
        };
        self.counts.rejected[reason as usize] += 1;
        dead.push(dead_letter(
            receipt,
            reason,
            error.to_string(),
            None,
            Some(payload),
        ));
    }
}

/// Decides resends and records `d` in the device's sequence set. `None`
/// means the reading is new and goes on to the content checks.
fn check_sequence(
    counts: &mut ValidationCounts,
    state: &mut DeviceState,
    d: &DecodedReading,
) -> Option<Verdict> {
    match d.seq {
        Some(seq) => match state.seen.status(seq) {
            SeqStatus::Seen if d.time_ns > state.max_time_ns => {
                // Newer than anything the device sent: it restarted its counter.
                counts.seq_resets += 1;
                state.seen.clear();
                state.seen.insert(seq);
                None
            }
            SeqStatus::Seen => Some(Verdict::Duplicate),
            SeqStatus::BelowWindow => Some(Verdict::Reject(
                RejectReason::OutOfOrder,
                format!(
                    "sequence number {seq} is older than the {} ranges of numbers remembered for this device",
                    SeqSet::MAX_RANGES
                ),
            )),
            SeqStatus::New => {
                counts.gap_readings += state.seen.insert(seq);
                None
            }
        },
        None => {
            let DecodedMetric::Known(m) = d.metric else {
                return None;
            };
            let newest = state.metric_max_time_ns[m as usize];
            if d.time_ns == newest {
                return Some(Verdict::Duplicate);
            }
            (d.time_ns < newest).then(|| {
                Verdict::Reject(
                    RejectReason::OutOfOrder,
                    format!(
                        "reading without seq at {} ns is before the device's newest {m} reading at {newest} ns",
                        d.time_ns
                    ),
                )
            })
        }
    }
}

#[inline]
fn check_content(
    config: &ValidationConfig,
    received_ns: TimestampNs,
    d: &DecodedReading,
) -> Verdict {
    let metric = match &d.metric {
        DecodedMetric::Known(m) => *m,
        DecodedMetric::Unknown(name) => {
            let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
            return Verdict::Reject(
                RejectReason::UnknownMetric,
                format!(
                    "unknown metric {name:?}; known metrics are {}",
                    known.join(", ")
                ),
            );
        }
    };
    let value = match &d.value {
        DecodedValue::Number(v) => *v,
        DecodedValue::NotANumber(what) => {
            return Verdict::Reject(
                RejectReason::MissingValue,
                format!("{metric}: value must be a number, got {what}"),
            );
        }
        DecodedValue::Missing => {
            return Verdict::Reject(
                RejectReason::MissingValue,
                format!("{metric}: record has no value"),
            );
        }
    };
    let canonical = metric.canonical_unit();
    let (value, converted) = match &d.unit {
        DecodedUnit::Canonical => (value, false),
        DecodedUnit::Known(u) => match metric.to_canonical(value, *u) {
            Some(v) => (v, *u != canonical),
            None => {
                return Verdict::Reject(
                    RejectReason::UnitNotConvertible,
                    format!(
                        "{metric}: unit {} is not convertible to {}",
                        u.ucum(),
                        canonical.ucum()
                    ),
                );
            }
        },
        DecodedUnit::Unknown(u) => {
            return Verdict::Reject(
                RejectReason::UnitNotConvertible,
                format!(
                    "{metric}: unknown unit {u:?}; expected {}",
                    canonical.ucum()
                ),
            );
        }
    };
    if !value.is_finite() {
        return Verdict::Reject(
            RejectReason::NonFiniteValue,
            format!("{metric}: value is {value}"),
        );
    }
    let range = metric.plausible_range();
    if !range.contains(value) {
        return Verdict::Reject(
            RejectReason::ImplausibleValue,
            format!(
                "{metric}: {value} {} is outside the plausible range {}..{}",
                canonical.ucum(),
                range.min,
                range.max
            ),
        );
    }
    let ahead_ms = d.time_ns.saturating_sub(received_ns) / 1_000_000;
    if ahead_ms > config.max_future_skew_ms as i64 {
        return Verdict::Reject(
            RejectReason::TimestampInFuture,
            format!(
                "time is {ahead_ms} ms after receipt; the allowed clock skew is {} ms",
                config.max_future_skew_ms
            ),
        );
    }
    if ahead_ms < -(config.max_age_ms as i64) {
        return Verdict::Reject(
            RejectReason::TimestampTooOld,
            format!(
                "reading is {} ms old on receipt; the acceptance window is {} ms",
                ahead_ms.unsigned_abs(),
                config.max_age_ms
            ),
        );
    }
    let mut quality = Quality(d.quality & Quality::DEVICE_BITS);
    if converted {
        quality = quality.with(Quality::CONVERTED);
    }
    Verdict::Accept(Reading {
        time_ns: d.time_ns,
        metric,
        value,
        seq: d.seq,
        quality,
    })
}

/// Most bytes of an undecodable payload kept in its dead letter.
const PAYLOAD_EXCERPT: usize = 256;

fn dead_letter(
    receipt: Receipt<'_>,
    reason: RejectReason,
    detail: String,
    reading: Option<&DecodedReading>,
    payload: Option<&[u8]>,
) -> DeadLetter {
    let mut raw = String::new();
    if let Some(d) = reading {
        match &d.value {
            DecodedValue::Number(v) => {
                let _ = write!(raw, "{v}");
                match &d.unit {
                    DecodedUnit::Canonical => {}
                    DecodedUnit::Known(u) => {
                        let _ = write!(raw, " {}", u.ucum());
                    }
                    DecodedUnit::Unknown(u) => {
                        let _ = write!(raw, " {u}");
                    }
                }
            }
            DecodedValue::NotANumber(what) => raw.push_str(what),
            DecodedValue::Missing => {}
        }
    }
    if let Some(p) = payload {
        let cut = &p[..p.len().min(PAYLOAD_EXCERPT)];
        match std::str::from_utf8(cut) {
            Ok(text) => raw.push_str(text),
            Err(_) => raw.push_str(&hex::encode(cut)),
        }
        if p.len() > PAYLOAD_EXCERPT {
            let _ = write!(raw, "… ({} bytes)", p.len());
        }
    }
    DeadLetter {
        received_ns: receipt.received_ns,
        device: receipt.device.clone(),
        patient: receipt.patient.cloned(),
        reason,
        detail,
        metric: reading.map(|d| match &d.metric {
            DecodedMetric::Known(m) => m.name().to_string(),
            DecodedMetric::Unknown(name) => name.to_string(),
        }),
        raw,
        time_ns: reading.map(|d| d.time_ns),
        seq: reading.and_then(|d| d.seq),
    }
}

#[cfg(test)]
mod tests {
    use wardflow_model::Unit;

    use super::*;

    const NOW: TimestampNs = 1_764_000_000_000_000_000;
    const SEC: i64 = 1_000_000_000;

    fn reading(metric: Metric, value: f64, dt_s: i64, seq: Option<u64>) -> DecodedReading {
        DecodedReading {
            time_ns: NOW + dt_s * SEC,
            metric: DecodedMetric::Known(metric),
            unit: DecodedUnit::Canonical,
            value: DecodedValue::Number(value),
            seq,
            quality: 0,
        }
    }

    struct Run {
        v: Validator,
        device: DeviceId,
        patient: PatientId,
    }

    impl Run {
        fn new() -> Self {
            Self {
                v: Validator::new(ValidationConfig::default()),
                device: DeviceId::new("mon-1").unwrap(),
                patient: PatientId::new("p-1").unwrap(),
            }
        }
        fn go(&mut self, decoded: &[DecodedReading]) -> (Vec<Reading>, Vec<DeadLetter>) {
            let (mut ok, mut dead) = (Vec::new(), Vec::new());
            let receipt = Receipt {
                device: &self.device,
                patient: Some(&self.patient),
                received_ns: NOW,
            };
            self.v.validate(receipt, decoded, &mut ok, &mut dead);
            (ok, dead)
        }
    }

    #[test]
    fn accepts_and_converts() {
        let mut run = Run::new();
        let mut temp = reading(Metric::Temp, 98.6, 0, Some(1));
        temp.unit = DecodedUnit::Known(Unit::Fahrenheit);
        let (ok, dead) = run.go(&[reading(Metric::Hr, 72.0, 0, Some(0)), temp]);
        assert!(dead.is_empty(), "{dead:?}");
        assert_eq!(ok.len(), 2);
        assert!((ok[1].value - 37.0).abs() < 1e-9);
        assert!(ok[1].quality.contains(Quality::CONVERTED));
        assert!(!ok[0].quality.contains(Quality::CONVERTED));
        assert_eq!(run.v.take_counts().accepted, 2);
    }

    #[test]
    fn each_content_rule_has_its_reason() {
        let mut run = Run::new();
        let mut wrong_unit = reading(Metric::Hr, 37.0, 0, Some(5));
        wrong_unit.unit = DecodedUnit::Known(Unit::Celsius);
        let mut unknown_unit = reading(Metric::Hr, 60.0, 0, Some(6));
        unknown_unit.unit = DecodedUnit::Unknown("furlong".into());
        let mut unknown_metric = reading(Metric::Hr, 1.0, 0, Some(7));
        unknown_metric.metric = DecodedMetric::Unknown("glucose".into());
        let mut missing = reading(Metric::Hr, 0.0, 0, Some(8));
        missing.value = DecodedValue::NotANumber("string \"x\"".into());
        let cases = [
            (
                reading(Metric::Hr, f64::NAN, 0, Some(1)),
                RejectReason::NonFiniteValue,
            ),
            (
                reading(Metric::Spo2, 140.0, 0, Some(2)),
                RejectReason::ImplausibleValue,
            ),
            (
                reading(Metric::Hr, 60.0, 3600, Some(3)),
                RejectReason::TimestampInFuture,
            ),
            (
                reading(Metric::Hr, 60.0, -3 * 86400, Some(4)),
                RejectReason::TimestampTooOld,
            ),
            (wrong_unit, RejectReason::UnitNotConvertible),
            (unknown_unit, RejectReason::UnitNotConvertible),
            (unknown_metric, RejectReason::UnknownMetric),
            (missing, RejectReason::MissingValue),
        ];
        for (d, reason) in cases {
            let (ok, dead) = run.go(std::slice::from_ref(&d));
            assert!(ok.is_empty(), "{reason}");
            assert_eq!(dead.len(), 1, "{reason}");
            assert_eq!(dead[0].reason, reason);
            assert_eq!(dead[0].device.as_str(), "mon-1");
            assert_eq!(dead[0].seq, d.seq);
            assert!(!dead[0].detail.is_empty());
        }
        let counts = run.v.take_counts();
        assert_eq!(counts.rejected_total(), 8);
        assert_eq!(counts.accepted, 0);
    }

    #[test]
    fn resends_are_dropped_once_and_gaps_counted() {
        let mut run = Run::new();
        let batch = [
            reading(Metric::Hr, 60.0, 0, Some(10)),
            reading(Metric::Hr, 61.0, 1, Some(11)),
        ];
        assert_eq!(run.go(&batch).0.len(), 2);
        let (ok, dead) = run.go(&batch);
        assert!(ok.is_empty() && dead.is_empty());
        let (ok, _) = run.go(&[reading(Metric::Hr, 62.0, 2, Some(15))]);
        assert_eq!(ok.len(), 1);
        let c = run.v.take_counts();
        assert_eq!((c.accepted, c.duplicates, c.gap_readings), (3, 2, 3));
    }

    #[test]
    fn a_restarted_sequence_with_newer_times_is_accepted() {
        let mut run = Run::new();
        run.go(&[
            reading(Metric::Hr, 60.0, 0, Some(0)),
            reading(Metric::Hr, 61.0, 1, Some(1)),
        ]);
        // The device rebooted and counts from 0 again, with newer times.
        let (ok, _) = run.go(&[
            reading(Metric::Hr, 62.0, 5, Some(0)),
            reading(Metric::Hr, 63.0, 6, Some(1)),
        ]);
        assert_eq!(ok.len(), 2);
        let c = run.v.take_counts();
        assert_eq!((c.seq_resets, c.duplicates), (1, 0));
        assert_eq!(run.v.device_state("mon-1").unwrap().seen.ranges(), [(0, 1)]);
    }

    #[test]
    fn rejected_readings_advance_the_sequence_so_resends_are_not_dead_lettered_twice() {
        let mut run = Run::new();
        let bad = [reading(Metric::Spo2, 140.0, 0, Some(1))];
        assert_eq!(run.go(&bad).1.len(), 1);
        assert_eq!(run.go(&bad).1.len(), 0);
        assert_eq!(run.v.take_counts().duplicates, 1);
    }

    #[test]
    fn late_readings_that_were_never_seen_are_accepted() {
        // A device reconnects, sends new readings, then resends what the
        // server never got: the late ones are new, not resends.
        let mut run = Run::new();
        assert_eq!(run.go(&[reading(Metric::Hr, 60.0, 0, Some(0))]).0.len(), 1);
        assert_eq!(run.go(&[reading(Metric::Hr, 62.0, 2, Some(2))]).0.len(), 1);
        let (ok, dead) = run.go(&[reading(Metric::Hr, 61.0, 1, Some(1))]);
        assert_eq!((ok.len(), dead.len()), (1, 0));
        assert_eq!(run.v.device_state("mon-1").unwrap().seen.ranges(), [(0, 2)]);
        assert_eq!(
            run.go(&[reading(Metric::Hr, 61.0, 1, Some(1))]).0.len(),
            0,
            "now it is a resend"
        );
        let c = run.v.take_counts();
        assert_eq!((c.accepted, c.duplicates, c.gap_readings), (3, 1, 1));
    }

    #[test]
    fn seq_set_matches_a_plain_set() {
        use proptest::prelude::*;
        proptest!(|(ops in proptest::collection::vec(0u64..600, 0..400))| {
            let mut set = SeqSet::default();
            let mut model = std::collections::BTreeSet::new();
            for seq in ops {
                let expected = if model.contains(&seq) { SeqStatus::Seen } else { SeqStatus::New };
                prop_assert_eq!(set.status(seq), expected);
                set.insert(seq);
                model.insert(seq);
                // Ranges stay sorted, disjoint and non-adjacent.
                for w in set.ranges().windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "{:?}", set.ranges());
                }
            }
            let covered: u64 = set.ranges().iter().map(|(a, b)| b - a + 1).sum();
            prop_assert_eq!(covered, model.len() as u64);
        });
    }

    #[test]
    fn too_many_holes_forget_the_oldest_numbers_and_say_so() {
        let mut set = SeqSet::default();
        for i in 0..=SeqSet::MAX_RANGES as u64 {
            set.insert(i * 2);
        }
        assert_eq!(set.ranges().len(), SeqSet::MAX_RANGES);
        assert_eq!(set.status(0), SeqStatus::BelowWindow);
        assert_eq!(set.status(1), SeqStatus::New, "known to be a hole");
        assert_eq!(set.status(2), SeqStatus::Seen);
        let mut run = Run::new();
        run.v.restore([(
            run.device.clone(),
            DeviceState {
                seen: set,
                max_time_ns: NOW,
                ..DeviceState::default()
            },
        )]);
        let (ok, dead) = run.go(&[reading(Metric::Hr, 60.0, -1, Some(0))]);
        assert!(ok.is_empty());
        assert_eq!(dead[0].reason, RejectReason::OutOfOrder);
    }

    #[test]
    fn readings_without_seq_dedupe_on_time() {
        let mut run = Run::new();
        let a = reading(Metric::Hr, 60.0, 0, None);
        assert_eq!(run.go(std::slice::from_ref(&a)).0.len(), 1);
        assert_eq!(run.go(std::slice::from_ref(&a)).0.len(), 0);
        let (ok, dead) = run.go(&[
            reading(Metric::Hr, 59.0, -1, None),
            reading(Metric::Rr, 14.0, -1, None),
        ]);
        assert_eq!(ok.len(), 1, "another metric is independent");
        assert_eq!(dead[0].reason, RejectReason::OutOfOrder);
        assert_eq!(run.v.take_counts().duplicates, 1);
    }

    #[test]
    fn undecodable_payloads_keep_an_excerpt() {
        let mut run = Run::new();
        let mut dead = Vec::new();
        let receipt = Receipt {
            device: &run.device,
            patient: Some(&run.patient),
            received_ns: NOW,
        };
        let payload = vec![0xffu8; 1000];
        run.v
            .reject_payload(receipt, &DecodeError::UnknownFormat, &payload, &mut dead);
        assert_eq!(dead[0].reason, RejectReason::UnknownFormat);
        assert!(dead[0].raw.starts_with("ffff"));
        assert!(dead[0].raw.ends_with("(1000 bytes)"));
    }
}
