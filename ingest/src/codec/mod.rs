//! Payload codecs: SenML JSON (RFC 8428) and the Wardflow binary frame.
//!
//! Both decoders read the payload in place (`&[u8]`, no copy of its bytes)
//! and append [`DecodedReading`]s to a buffer the caller reuses from publish
//! to publish, so decoding allocates nothing per reading. A decoded reading
//! is not yet valid: metric, unit and value are as the device sent them, and
//! [`crate::validate`] decides whether it is stored or becomes a dead letter.
//!
//! A structural error (broken JSON, a truncated frame) rejects the whole
//! payload: the caller truncates the buffer back and records one dead letter.

use compact_str::CompactString;
use wardflow_model::{Metric, TimestampNs, Unit};

pub mod frame;
pub mod senml;

/// The wire format of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// SenML JSON, RFC 8428 (`application/senml+json`).
    SenmlJson,
    /// The Wardflow binary frame (docs/binary-frame.md).
    Frame,
}

impl PayloadFormat {
    /// Tells the format from the first bytes: a frame starts with its magic,
    /// a SenML pack is a JSON array (RFC 8428 §5).
    pub fn sniff(payload: &[u8]) -> Option<PayloadFormat> {
        if payload.starts_with(&frame::MAGIC) {
            return Some(PayloadFormat::Frame);
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Some(PayloadFormat::SenmlJson),
            _ => None,
        }
    }
}

/// The metric of a decoded reading.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedMetric {
    Known(Metric),
    /// As the device named it (SenML name, or `mdc:<code>` for a frame).
    Unknown(CompactString),
}

/// The unit of a decoded reading.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedUnit {
    /// None given: the metric's canonical unit.
    Canonical,
    Known(Unit),
    Unknown(CompactString),
}

/// The value of a decoded reading.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedValue {
    Number(f64),
    /// Present but not a number; the text says what it was.
    NotANumber(CompactString),
    Missing,
}

/// A reading as the device sent it, with base fields resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedReading {
    pub time_ns: TimestampNs,
    pub metric: DecodedMetric,
    pub unit: DecodedUnit,
    pub value: DecodedValue,
    pub seq: Option<u64>,
    /// Device quality bits (see [`wardflow_model::Quality`]).
    pub quality: u8,
}

/// Why a payload could not be decoded at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "payload is neither SenML JSON (starts with '[') nor a Wardflow frame (starts with \"WF\")"
    )]
    UnknownFormat,
    #[error("SenML: {0}")]
    Senml(#[from] senml::SenmlError),
    #[error("binary frame: {0}")]
    Frame(#[from] frame::FrameError),
}

/// Decodes `payload`, appending its readings to `out`.
///
/// `now_ns` is the receive time, which SenML relative times (RFC 8428
/// §4.5.3) are resolved against. On error `out` is left as it was.
pub fn decode(
    payload: &[u8],
    now_ns: TimestampNs,
    out: &mut Vec<DecodedReading>,
) -> Result<PayloadFormat, DecodeError> {
    let mark = out.len();
    let format = PayloadFormat::sniff(payload).ok_or(DecodeError::UnknownFormat)?;
    let result = match format {
        PayloadFormat::SenmlJson => senml::decode(payload, now_ns, out).map_err(DecodeError::from),
        PayloadFormat::Frame => frame::decode(payload, out).map_err(DecodeError::from),
    };
    match result {
        Ok(()) => Ok(format),
        Err(e) => {
            out.truncate(mark);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_formats() {
        assert_eq!(
            PayloadFormat::sniff(b"  [{\"n\":\"hr\"}]"),
            Some(PayloadFormat::SenmlJson)
        );
        assert_eq!(PayloadFormat::sniff(b"WF\x01"), Some(PayloadFormat::Frame));
        assert_eq!(PayloadFormat::sniff(b"{\"n\":1}"), None);
        assert_eq!(PayloadFormat::sniff(b""), None);
    }

    #[test]
    fn failed_decode_leaves_buffer_untouched() {
        let mut out = Vec::new();
        decode(br#"[{"n":"hr","v":60,"t":1.7e9}]"#, 0, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let err = decode(br#"[{"n":"hr","v":60},{"n":"rr","v":"#, 0, &mut out).unwrap_err();
        assert!(matches!(err, DecodeError::Senml(_)), "{err}");
        assert_eq!(out.len(), 1);
        assert_eq!(
            decode(b"hello", 0, &mut out),
            Err(DecodeError::UnknownFormat)
        );
    }
}
