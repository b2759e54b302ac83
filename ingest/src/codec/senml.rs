//! SenML JSON decoding, RFC 8428.
//!
//! A pack is a JSON array of records (§5). Base fields (`bn`, `bt`, `bu`,
//! `bv`, `bver`) apply to the record that carries them and every later record
//! of the pack (§4.6, resolved records). Resolution here:
//!
//! - name = `bn` + `n` (§4.5.1); the metric is the last segment of the name
//!   after a `:` or `/` (`urn:dev:mac:0024befffe804ff1:hr` is `hr`). The
//!   device is the authenticated MQTT client, never the name.
//! - time = `bt` + `t` in seconds; a result below 2^28 is relative to the
//!   time of receipt (§4.5.3), so `t` absent or 0 means "now".
//! - unit = `u`, else `bu`, else the metric's canonical unit.
//! - value = `bv` + `v` (§4.5.2); a record with `vs`, `vb` or `vd` instead
//!   has no numeric value and becomes a dead letter.
//! - a record with neither name nor value only sets base fields.
//! - `bver` above 10 and any unknown label ending in `_` ("must
//!   understand", §4.4) reject the pack.
//!
//! Wardflow's one extension label is `seq`: the device's sequence number of
//! the record (an unsigned integer), used to drop resends exactly once. It is
//! optional and not "must understand"; other SenML receivers ignore it.
//!
//! Decoding borrows every string from the payload (JSON strings with escapes
//! are the exception: they are unescaped into an inline buffer) and visits
//! records one at a time, so nothing is allocated per record.

use std::fmt;

use compact_str::CompactString;
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use wardflow_model::{Metric, TimestampNs, Unit};

use super::{DecodedMetric, DecodedReading, DecodedUnit, DecodedValue};

/// Times below this are relative to now (RFC 8428 §4.5.3).
const RELATIVE_TIME_LIMIT: f64 = 268_435_456.0;
/// The SenML version this decoder implements (RFC 8428 §4.4).
const SUPPORTED_VERSION: u64 = 10;

/// Why a SenML pack was rejected as a whole.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SenmlError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("record {record}: unknown must-understand label {label:?} (RFC 8428 §4.4)")]
    MustUnderstand { record: usize, label: String },
    #[error("record {record}: bver {version} is newer than the supported version 10")]
    Version { record: usize, version: u64 },
    #[error("record {record}: time {seconds} s is not representable")]
    TimeOutOfRange { record: usize, seconds: f64 },
}

/// Decodes a SenML JSON pack, appending one reading per record with a name
/// or a value.
pub fn decode(
    payload: &[u8],
    now_ns: TimestampNs,
    out: &mut Vec<DecodedReading>,
) -> Result<(), SenmlError> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let mut failure = None;
    let visitor = PackVisitor {
        now_ns,
        out,
        failure: &mut failure,
    };
    let parsed = de.deserialize_seq(visitor).and_then(|()| de.end());
    match (parsed, failure) {
        (_, Some(semantic)) => Err(semantic),
        (Err(e), None) => Err(SenmlError::Json(e.to_string())),
        (Ok(()), None) => Ok(()),
    }
}

/// A string borrowed from the payload, or unescaped inline when it had escapes.
enum Text<'de> {
    Borrowed(&'de str),
    Owned(CompactString),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s.as_str(),
        }
    }
}

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text::Owned(CompactString::new(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// `v` as sent: a number, or something else kept for the dead letter.
enum RawValue {
    Number(f64),
    Other(CompactString),
}

impl<'de> de::Deserialize<'de> for RawValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawValue, E> {
                Ok(RawValue::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
                Ok(RawValue::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
                Ok(RawValue::Number(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
                Ok(RawValue::Other(compact_str::format_compact!(
                    "string {v:?}"
                )))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
                Ok(RawValue::Other(compact_str::format_compact!("boolean {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawValue, E> {
                Ok(RawValue::Other(CompactString::const_new("null")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Base fields in force (RFC 8428 §4.6).
#[derive(Default)]
struct Base<'de> {
    name: Option<Text<'de>>,
    time: f64,
    unit: Option<Text<'de>>,
    value: f64,
}

struct PackVisitor<'o, 'f> {
    now_ns: TimestampNs,
    out: &'o mut Vec<DecodedReading>,
    failure: &'f mut Option<SenmlError>,
}

impl<'de> Visitor<'de> for PackVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML pack (a JSON array of records)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut base = Base::default();
        let mut index = 0;
        while seq
            .next_element_seed(RecordSeed {
                index,
                now_ns: self.now_ns,
                base: &mut base,
                out: self.out,
                failure: self.failure,
            })?
            .is_some()
        {
            index += 1;
        }
        Ok(())
    }
}

struct RecordSeed<'b, 'de, 'o, 'f> {
    index: usize,
    now_ns: TimestampNs,
    base: &'b mut Base<'de>,
    out: &'o mut Vec<DecodedReading>,
    failure: &'f mut Option<SenmlError>,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, 'de, '_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, 'de, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SenML record (a JSON object)")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let index = self.index;
        let mut name: Option<Text<'de>> = None;
        let mut unit: Option<Text<'de>> = None;
        let mut value: Option<RawValue> = None;
        let mut non_numeric: Option<&'static str> = None;
        let mut time = 0.0;
        let mut seq = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.as_str() {
                "bn" => self.base.name = Some(map.next_value()?),
                "bt" => self.base.time = map.next_value()?,
                "bu" => self.base.unit = Some(map.next_value()?),
                "bv" => self.base.value = map.next_value()?,
                "bver" => {
                    let version: u64 = map.next_value()?;
                    if version > SUPPORTED_VERSION {
                        return Err(self.fail(SenmlError::Version {
                            record: index,
                            version,
                        }));
                    }
                }
                "n" => name = Some(map.next_value()?),
                "u" => unit = Some(map.next_value()?),
                "v" => value = Some(map.next_value()?),
                "vs" | "vb" | "vd" => {
                    non_numeric = Some(match key.as_str() {
                        "vs" => "a string value (vs)",
                        "vb" => "a boolean value (vb)",
                        _ => "a data value (vd)",
                    });
                    map.next_value::<IgnoredAny>()?;
                }
                "t" => time = map.next_value()?,
                "seq" => seq = Some(map.next_value::<u64>()?),
                other if other.ends_with('_') => {
                    let label = other.to_string();
                    return Err(self.fail(SenmlError::MustUnderstand {
                        record: index,
                        label,
                    }));
                }
                // bs, s, ut and registered or private labels we do not use.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }

        if name.is_none() && value.is_none() && non_numeric.is_none() {
            return Ok(()); // a record of base fields only
        }

        let seconds = self.base.time + time;
        let Some(time_ns) = resolve_time(seconds, self.now_ns) else {
            return Err(self.fail(SenmlError::TimeOutOfRange {
                record: index,
                seconds,
            }));
        };
        let metric = resolve_metric(
            self.base.name.as_ref().map(Text::as_str),
            name.as_ref().map(Text::as_str),
        );
        let unit = match unit.as_ref().or(self.base.unit.as_ref()) {
            None => DecodedUnit::Canonical,
            Some(u) => match Unit::parse(u.as_str()) {
                Ok(u) => DecodedUnit::Known(u),
                Err(_) => DecodedUnit::Unknown(CompactString::new(u.as_str())),
            },
        };
        let value = match (value, non_numeric) {
            (Some(RawValue::Number(v)), _) => DecodedValue::Number(self.base.value + v),
            (Some(RawValue::Other(what)), _) => DecodedValue::NotANumber(what),
            (None, Some(what)) => DecodedValue::NotANumber(CompactString::const_new(what)),
            (None, None) => DecodedValue::Missing,
        };
        self.out.push(DecodedReading {
            time_ns,
            metric,
            unit,
            value,
            seq,
            quality: 0,
        });
        Ok(())
    }
}

impl RecordSeed<'_, '_, '_, '_> {
    /// Records a semantic failure and returns an error that stops parsing.
    fn fail<E: de::Error>(self, failure: SenmlError) -> E {
        let text = failure.to_string();
        *self.failure = Some(failure);
        E::custom(text)
    }
}

/// Resolves a SenML time in seconds to nanoseconds since the epoch.
fn resolve_time(seconds: f64, now_ns: TimestampNs) -> Option<TimestampNs> {
    // i64 nanoseconds span about ±292 years.
    if !seconds.is_finite() || seconds.abs() >= 9.0e9 {
        return None;
    }
    // Whole and fractional seconds apart keep sub-microsecond precision.
    let whole = seconds.trunc() as i64;
    let frac = (seconds.fract() * 1e9).round() as i64;
    let ns = whole * 1_000_000_000 + frac;
    if seconds < RELATIVE_TIME_LIMIT {
        now_ns.checked_add(ns)
    } else {
        Some(ns)
    }
}

/// The metric named by `bn` + `n`: the last segment after `:` or `/`.
fn resolve_metric(base_name: Option<&str>, name: Option<&str>) -> DecodedMetric {
    let is_sep = |c: char| c == ':' || c == '/';
    let name = name.unwrap_or("");
    let last = if let Some(pos) = name.rfind(is_sep) {
        &name[pos + 1..]
    } else {
        let base = base_name.unwrap_or("");
        let tail = base.rfind(is_sep).map_or(base, |pos| &base[pos + 1..]);
        if !tail.is_empty() {
            // The metric spans bn and n, e.g. bn "dev:h", n "r": rare.
            let joined = compact_str::format_compact!("{tail}{name}");
            return match Metric::from_name(&joined) {
                Some(m) => DecodedMetric::Known(m),
                None => DecodedMetric::Unknown(joined),
            };
        }
        name
    };
    match Metric::from_name(last) {
        Some(m) => DecodedMetric::Known(m),
        None => DecodedMetric::Unknown(CompactString::new(last)),
    }
}

/// Encodes readings as a SenML pack with a base time; used by the simulator
/// and tests. Values are written as given, units in UCUM.
pub fn encode(
    base_time_ns: TimestampNs,
    records: impl IntoIterator<Item = (Metric, TimestampNs, f64, Option<u64>)>,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    let bt = base_time_ns as f64 / 1e9;
    out.push(b'[');
    for (i, (metric, t, v, seq)) in records.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        if i == 0 {
            let _ = write!(out, "\"bt\":{bt:.6},");
        }
        let dt = (t - base_time_ns) as f64 / 1e9;
        let _ = write!(
            out,
            "\"n\":\"{}\",\"u\":\"{}\",\"v\":{v}",
            metric.name(),
            metric.canonical_unit().ucum()
        );
        if dt != 0.0 {
            let _ = write!(out, ",\"t\":{dt:.6}");
        }
        if let Some(seq) = seq {
            let _ = write!(out, ",\"seq\":{seq}");
        }
        out.push(b'}');
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: TimestampNs = 1_764_000_000_000_000_000;

    fn decode_ok(json: &str) -> Vec<DecodedReading> {
        let mut out = Vec::new();
        decode(json.as_bytes(), NOW, &mut out).unwrap_or_else(|e| panic!("{json}: {e}"));
        out
    }

    #[test]
    fn rfc8428_multiple_datapoints_example_resolves_base_fields() {
        // RFC 8428 §5.1.2, with our metric names.
        let out = decode_ok(
            r#"[
              {"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,"bu":"Cel","n":"temp","v":37.3},
              {"n":"temp","t":1,"v":37.5},
              {"n":"hr","u":"beat/min","t":2,"v":72}
            ]"#,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].metric, DecodedMetric::Known(Metric::Temp));
        assert_eq!(out[0].unit, DecodedUnit::Known(Unit::Celsius));
        assert_eq!(out[0].time_ns, 1_320_067_464_000_000_000);
        assert_eq!(out[1].time_ns, 1_320_067_465_000_000_000);
        assert_eq!(out[1].value, DecodedValue::Number(37.5));
        assert_eq!(out[2].unit, DecodedUnit::Known(Unit::PerMinute));
        assert_eq!(out[2].metric, DecodedMetric::Known(Metric::Hr));
    }

    #[test]
    fn relative_and_absent_times_resolve_against_receipt() {
        let out = decode_ok(r#"[{"n":"hr","v":60},{"n":"hr","v":61,"t":-5}]"#);
        assert_eq!(out[0].time_ns, NOW);
        assert_eq!(out[1].time_ns, NOW - 5_000_000_000);
    }

    #[test]
    fn base_value_is_added_and_seq_is_read() {
        let out = decode_ok(r#"[{"bv":100,"n":"sbp","v":20,"seq":7},{"n":"dbp","v":-30,"seq":8}]"#);
        assert_eq!(out[0].value, DecodedValue::Number(120.0));
        assert_eq!(out[1].value, DecodedValue::Number(70.0));
        assert_eq!((out[0].seq, out[1].seq), (Some(7), Some(8)));
        assert_eq!(out[0].unit, DecodedUnit::Canonical);
    }

    #[test]
    fn unknown_metric_unit_and_non_numeric_values_are_kept_for_dead_letters() {
        let out = decode_ok(
            r#"[{"n":"glucose","v":5},{"n":"hr","u":"furlong","v":1},{"n":"hr","vs":"high"},{"n":"rr","v":"NaN"},{"n":"spo2"}]"#,
        );
        assert_eq!(out[0].metric, DecodedMetric::Unknown("glucose".into()));
        assert_eq!(out[1].unit, DecodedUnit::Unknown("furlong".into()));
        assert!(matches!(&out[2].value, DecodedValue::NotANumber(s) if s.contains("vs")));
        assert!(matches!(&out[3].value, DecodedValue::NotANumber(s) if s.contains("NaN")));
        assert_eq!(out[4].value, DecodedValue::Missing);
    }

    #[test]
    fn names_resolve_to_their_last_segment() {
        assert_eq!(
            resolve_metric(Some("bed4/"), Some("spo2")),
            DecodedMetric::Known(Metric::Spo2)
        );
        assert_eq!(
            resolve_metric(None, Some("urn:x:rr")),
            DecodedMetric::Known(Metric::Rr)
        );
        assert_eq!(
            resolve_metric(Some("mon:h"), Some("r")),
            DecodedMetric::Known(Metric::Hr)
        );
        assert_eq!(
            resolve_metric(Some("urn:x:temp"), None),
            DecodedMetric::Known(Metric::Temp)
        );
        assert_eq!(
            resolve_metric(None, None),
            DecodedMetric::Unknown("".into())
        );
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let out = decode_ok(r#"[{"n":"h\u0072","v":1}]"#);
        assert_eq!(out[0].metric, DecodedMetric::Known(Metric::Hr));
    }

    #[test]
    fn structural_errors_reject_the_pack() {
        let mut out = Vec::new();
        for (bad, needle) in [
            (r#"[{"n":"hr","v":NaN}]"#, "invalid JSON"),
            (r#"[{"n":"hr","v":60}"#, "invalid JSON"),
            (r#"{"n":"hr"}"#, "invalid JSON"),
            (r#"[{"n":"hr","v":60}] trailing"#, "invalid JSON"),
            (r#"[{"n":"hr","v":60,"crit_":1}]"#, "must-understand"),
            (r#"[{"bver":11,"n":"hr","v":60}]"#, "bver 11"),
            (r#"[{"n":"hr","v":60,"bt":1e300}]"#, "not representable"),
            (r#"[{"n":"hr","v":60,"seq":-1}]"#, "invalid JSON"),
            (r#"[1]"#, "invalid JSON"),
        ] {
            let err = decode(bad.as_bytes(), NOW, &mut out).unwrap_err();
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn encode_then_decode_is_identity() {
        let t0 = 1_764_000_000_123_456_000;
        let recs = [
            (Metric::Hr, t0, 72.0, Some(10)),
            (Metric::Spo2, t0 + 1_000_000, 97.5, Some(11)),
            (Metric::Temp, t0 + 2_000_000_000, 37.25, None),
        ];
        let mut buf = Vec::new();
        encode(t0, recs, &mut buf);
        let out = decode_ok(std::str::from_utf8(&buf).unwrap());
        assert_eq!(out.len(), 3);
        for (d, (m, t, v, s)) in out.iter().zip(recs) {
            assert_eq!(d.metric, DecodedMetric::Known(m));
            assert!((d.time_ns - t).abs() < 1_000, "{} vs {t}", d.time_ns);
            assert_eq!(d.value, DecodedValue::Number(v));
            assert_eq!(d.seq, s);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            let _ = decode(&bytes, NOW, &mut out);
        }

        #[test]
        fn arbitrary_records_round_trip(
            vals in proptest::collection::vec((0usize..Metric::COUNT, -1.0e6f64..1.0e6, 0i64..3_600_000_000_000, proptest::option::of(0u64..u64::MAX / 2)), 1..20)
        ) {
            let t0 = 1_764_000_000_000_000_000;
            let recs: Vec<_> = vals.iter().map(|&(m, v, dt, s)| (Metric::ALL[m], t0 + dt, v, s)).collect();
            let mut buf = Vec::new();
            encode(t0, recs.iter().copied(), &mut buf);
            let out = decode_ok(std::str::from_utf8(&buf).unwrap());
            proptest::prop_assert_eq!(out.len(), recs.len());
            for (d, (m, t, v, s)) in out.iter().zip(recs) {
                proptest::prop_assert_eq!(&d.metric, &DecodedMetric::Known(m));
                proptest::prop_assert!((d.time_ns - t).abs() < 2_000, "{} vs {}", d.time_ns, t);
                proptest::prop_assert_eq!(&d.value, &DecodedValue::Number(v));
                proptest::prop_assert_eq!(d.seq, s);
            }
        }
    }
}
