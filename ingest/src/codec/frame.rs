//! The Wardflow binary frame: batched readings in fixed-size records.
//!
//! Documented byte by byte in `docs/binary-frame.md`; in short, all integers
//! little-endian:
//!
//! ```text
//! header (24 bytes)                      record (16 bytes), `count` times
//!  0  2  magic "WF" (0x57 0x46)           0  4  time offset, µs after base time (u32)
//!  2  1  version = 1                      4  4  metric, IEEE 11073 MDC code (u32)
//!  3  1  record size = 16                 8  4  value, IEEE 11073-20601 FLOAT (u32)
//!  4  2  count of records (u16, ≥ 1)     12  1  unit id (u8, 0 = canonical)
//!  6  2  flags, reserved = 0             13  1  quality flags (u8, bits 4-7 = 0)
//!  8  8  sequence number of record 0     14  2  reserved = 0
//! 16  8  base time, ns since epoch (i64)
//! ```
//!
//! Record `i` has sequence number `seq + i`. Values use the 32-bit FLOAT of
//! IEEE 11073-20601 §F.8 (8-bit signed exponent, 24-bit signed mantissa,
//! value = mantissa × 10^exponent), which medical devices already produce
//! and which carries decimal values such as 36.6 exactly.

use compact_str::format_compact;
use wardflow_model::{Metric, TimestampNs, Unit};

use super::{DecodedMetric, DecodedReading, DecodedUnit, DecodedValue};

pub const MAGIC: [u8; 2] = *b"WF";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
pub const RECORD_LEN: usize = 16;
/// Most records one frame may carry (the count field is a u16).
pub const MAX_RECORDS: usize = u16::MAX as usize;

/// Why a frame was rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is {len} bytes, shorter than the 24-byte header")]
    ShortHeader { len: usize },
    #[error("bad magic {found:02x?}, expected \"WF\"")]
    BadMagic { found: [u8; 2] },
    #[error("unsupported version {0}, this server reads version 1")]
    Version(u8),
    #[error("record size {0}, version 1 records are 16 bytes")]
    RecordSize(u8),
    #[error("count is 0; a frame carries at least one record")]
    Empty,
    #[error("reserved header flags {0:#06x} must be zero")]
    Flags(u16),
    #[error("header says {count} records ({expected} bytes) but the frame is {len} bytes")]
    Length {
        count: usize,
        expected: usize,
        len: usize,
    },
    #[error("record {index}: reserved bits set (quality {quality:#04x}, reserved {reserved:#06x})")]
    Reserved {
        index: usize,
        quality: u8,
        reserved: u16,
    },
}

/// Unit ids of the frame's unit byte. 0 means the metric's canonical unit.
const UNIT_IDS: [Option<Unit>; 12] = [
    None,
    Some(Unit::PerMinute),
    Some(Unit::PerSecond),
    Some(Unit::Percent),
    Some(Unit::Ratio),
    Some(Unit::MillimetreMercury),
    Some(Unit::Pascal),
    Some(Unit::Hectopascal),
    Some(Unit::Kilopascal),
    Some(Unit::Celsius),
    Some(Unit::Kelvin),
    Some(Unit::Fahrenheit),
];

/// The frame's unit id for `unit`.
pub fn unit_id(unit: Unit) -> u8 {
    UNIT_IDS
        .iter()
        .position(|u| *u == Some(unit))
        .expect("every unit has an id") as u8
}

#[inline]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The parsed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub count: usize,
    pub seq: u64,
    pub base_time_ns: TimestampNs,
}

/// Checks the header and the length of a frame.
pub fn header(b: &[u8]) -> Result<Header, FrameError> {
    if b.len() < HEADER_LEN {
        return Err(FrameError::ShortHeader { len: b.len() });
    }
    if b[0..2] != MAGIC {
        return Err(FrameError::BadMagic {
            found: [b[0], b[1]],
        });
    }
    if b[2] != VERSION {
        return Err(FrameError::Version(b[2]));
    }
    if b[3] as usize != RECORD_LEN {
        return Err(FrameError::RecordSize(b[3]));
    }
    let count = u16_at(b, 4) as usize;
    if count == 0 {
        return Err(FrameError::Empty);
    }
    let flags = u16_at(b, 6);
    if flags != 0 {
        return Err(FrameError::Flags(flags));
    }
    let expected = HEADER_LEN + count * RECORD_LEN;
    if b.len() != expected {
        return Err(FrameError::Length {
            count,
            expected,
            len: b.len(),
        });
    }
    Ok(Header {
        count,
        seq: u64_at(b, 8),
        base_time_ns: u64_at(b, 16) as i64,
    })
}

/// Decodes a frame, appending one reading per record.
pub fn decode(b: &[u8], out: &mut Vec<DecodedReading>) -> Result<(), FrameError> {
    let h = header(b)?;
    // Check every record's reserved bits before emitting any, so a bad frame
    // is rejected whole.
    for (index, r) in b[HEADER_LEN..].chunks_exact(RECORD_LEN).enumerate() {
        let (quality, reserved) = (r[13], u16_at(r, 14));
        if quality & !wardflow_model::Quality::DEVICE_BITS != 0 || reserved != 0 {
            return Err(FrameError::Reserved {
                index,
                quality,
                reserved,
            });
        }
    }
    out.reserve(h.count);
    for (i, r) in b[HEADER_LEN..].chunks_exact(RECORD_LEN).enumerate() {
        out.push(decode_record(&h, i, r));
    }
    Ok(())
}

#[inline]
fn decode_record(h: &Header, i: usize, r: &[u8]) -> DecodedReading {
    let offset_us = u32_at(r, 0) as i64;
    let mdc = u32_at(r, 4);
    let metric = match Metric::from_mdc_code(mdc) {
        Some(m) => DecodedMetric::Known(m),
        None => DecodedMetric::Unknown(format_compact!("mdc:{mdc}")),
    };
    let unit = match UNIT_IDS.get(r[12] as usize) {
        Some(None) => DecodedUnit::Canonical,
        Some(Some(u)) => DecodedUnit::Known(*u),
        None => DecodedUnit::Unknown(format_compact!("unit id {}", r[12])),
    };
    let bits = u32_at(r, 8);
    let value = match float_from_bits(bits) {
        Ok(v) => DecodedValue::Number(v),
        // NaN and the infinities are numbers, just not finite ones.
        Err(_) if bits & 0x00ff_ffff == 0x007f_ffff => DecodedValue::Number(f64::NAN),
        Err(_) if bits & 0x00ff_ffff == 0x007f_fffe => DecodedValue::Number(f64::INFINITY),
        Err(_) if bits & 0x00ff_ffff == 0x0080_0002 => DecodedValue::Number(f64::NEG_INFINITY),
        Err(special) => DecodedValue::NotANumber(special.into()),
    };
    DecodedReading {
        time_ns: h.base_time_ns.saturating_add(offset_us * 1_000),
        metric,
        unit,
        value,
        seq: Some(h.seq.wrapping_add(i as u64)),
        quality: r[13],
    }
}

/// Decodes an IEEE 11073-20601 FLOAT. Special values come back as their name.
pub fn float_from_bits(bits: u32) -> Result<f64, &'static str> {
    let exponent = (bits >> 24) as u8 as i8;
    let mantissa = bits & 0x00ff_ffff;
    match mantissa {
        0x007f_ffff => return Err("NaN (11073 FLOAT 0x007FFFFF)"),
        0x0080_0000 => return Err("NRes (11073 FLOAT 0x00800000)"),
        0x007f_fffe => return Err("+INFINITY (11073 FLOAT 0x007FFFFE)"),
        0x0080_0002 => return Err("-INFINITY (11073 FLOAT 0x00800002)"),
        0x0080_0001 => return Err("reserved (11073 FLOAT 0x00800001)"),
        _ => {}
    }
    // Sign-extend the 24-bit mantissa.
    let m = ((mantissa << 8) as i32 >> 8) as f64;
    let e = exponent as i32;
    // Dividing by an exact power of ten rounds once, so 366e-1 is 36.6.
    Ok(if e >= 0 {
        m * 10f64.powi(e)
    } else {
        m / 10f64.powi(-e)
    })
}

/// Encodes `v` as an IEEE 11073-20601 FLOAT with the finest exponent that
/// fits (down to 10^-6). NaN and infinities map to the special values.
pub fn float_to_bits(v: f64) -> u32 {
    const MAX_M: f64 = 8_388_605.0; // 0x7FFFFD, below the special values
    if v.is_nan() {
        return 0x007f_ffff;
    }
    if v.is_infinite() {
        return if v > 0.0 { 0x007f_fffe } else { 0x0080_0002 };
    }
    for e in -6i32..=127 {
        let m = if e >= 0 {
            v / 10f64.powi(e)
        } else {
            v * 10f64.powi(-e)
        };
        if m.abs() <= MAX_M {
            let m = m.round() as i32;
            return ((e as i8 as u8 as u32) << 24) | (m as u32 & 0x00ff_ffff);
        }
    }
    if v > 0.0 { 0x007f_fffe } else { 0x0080_0002 }
}

/// One record to encode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    pub offset_us: u32,
    pub mdc_code: u32,
    pub value_bits: u32,
    pub unit_id: u8,
    pub quality: u8,
}

impl Record {
    /// A reading of `metric` in its canonical unit.
    pub fn new(metric: Metric, offset_us: u32, value: f64, quality: u8) -> Record {
        Record {
            offset_us,
            mdc_code: metric.mdc_code(),
            value_bits: float_to_bits(value),
            unit_id: 0,
            quality,
        }
    }
}

/// Appends a frame to `out`.
pub fn encode(seq: u64, base_time_ns: TimestampNs, records: &[Record], out: &mut Vec<u8>) {
    assert!(
        !records.is_empty() && records.len() <= MAX_RECORDS,
        "a frame carries 1..=65535 records"
    );
    out.reserve(HEADER_LEN + records.len() * RECORD_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(RECORD_LEN as u8);
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&base_time_ns.to_le_bytes());
    for r in records {
        out.extend_from_slice(&r.offset_us.to_le_bytes());
        out.extend_from_slice(&r.mdc_code.to_le_bytes());
        out.extend_from_slice(&r.value_bits.to_le_bytes());
        out.push(r.unit_id);
        out.push(r.quality);
        out.extend_from_slice(&0u16.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn float_examples() {
        assert_eq!(float_from_bits(0xff00_016e), Ok(36.6)); // 366 x 10^-1
        assert_eq!(float_from_bits(float_to_bits(36.6)), Ok(36.6));
        assert_eq!(float_from_bits(float_to_bits(72.0)), Ok(72.0));
        assert_eq!(float_from_bits(float_to_bits(-12.5)), Ok(-12.5));
        assert!(
            float_from_bits(float_to_bits(f64::NAN))
                .unwrap_err()
                .starts_with("NaN")
        );
        assert!(
            float_from_bits(float_to_bits(f64::INFINITY))
                .unwrap_err()
                .contains("INFINITY")
        );
        assert!(
            float_from_bits(0x0080_0000)
                .unwrap_err()
                .starts_with("NRes")
        );
    }

    #[test]
    fn encode_decode_example() {
        let recs = [
            Record::new(Metric::Hr, 0, 72.0, 0),
            Record::new(
                Metric::Spo2,
                1_000,
                97.0,
                wardflow_model::Quality::QUESTIONABLE.0,
            ),
            Record {
                unit_id: unit_id(Unit::Fahrenheit),
                ..Record::new(Metric::Temp, 2_000_000, 98.6, 0)
            },
        ];
        let mut buf = Vec::new();
        encode(41, 1_764_000_000_000_000_000, &recs, &mut buf);
        assert_eq!(buf.len(), HEADER_LEN + 3 * RECORD_LEN);
        let mut out = Vec::new();
        decode(&buf, &mut out).unwrap();
        assert_eq!(out[0].metric, DecodedMetric::Known(Metric::Hr));
        assert_eq!(out[0].seq, Some(41));
        assert_eq!(out[2].seq, Some(43));
        assert_eq!(out[1].time_ns, 1_764_000_000_000_000_000 + 1_000_000);
        assert_eq!(out[1].quality, 1);
        assert_eq!(out[2].unit, DecodedUnit::Known(Unit::Fahrenheit));
        assert_eq!(out[2].value, DecodedValue::Number(98.6));
    }

    #[test]
    fn the_example_in_docs_binary_frame_md_decodes() {
        let hex = "57 46 01 10 02 00 00 00 29 00 00 00 00 00 00 00 00 40 68 02 6a 41 eb 18 \
                   00 00 00 00 82 41 02 00 48 00 00 00 00 00 00 00 \
                   e8 03 00 00 b8 4b 02 00 61 00 00 00 00 00 00 00";
        let bytes: Vec<u8> = hex
            .split_whitespace()
            .map(|t| u8::from_str_radix(t, 16).unwrap())
            .collect();
        let mut out = Vec::new();
        decode(&bytes, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (&out[0].metric, &out[0].value, out[0].seq),
            (
                &DecodedMetric::Known(Metric::Hr),
                &DecodedValue::Number(72.0),
                Some(41)
            )
        );
        assert_eq!(
            (&out[1].metric, &out[1].value, out[1].seq),
            (
                &DecodedMetric::Known(Metric::Spo2),
                &DecodedValue::Number(97.0),
                Some(42)
            )
        );
        assert_eq!(out[0].time_ns, 1_795_600_800_000_000_000);
        assert_eq!(out[1].time_ns, 1_795_600_800_001_000_000);
        assert_eq!(float_from_bits(0xfe00_1c20), Ok(72.0));
    }

    #[test]
    fn structural_errors() {
        let mut good = Vec::new();
        encode(1, 0, &[Record::new(Metric::Hr, 0, 60.0, 0); 2], &mut good);
        let mut out = Vec::new();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "shorter than the 24-byte header"),
            (
                good[..good.len() - 1].to_vec(),
                "header says 2 records (56 bytes) but the frame is 55 bytes",
            ),
            (
                [good.as_slice(), &[0]].concat(),
                "but the frame is 57 bytes",
            ),
            (
                {
                    let mut b = good.clone();
                    b[2] = 2;
                    b
                },
                "unsupported version 2",
            ),
            (
                {
                    let mut b = good.clone();
                    b[3] = 20;
                    b
                },
                "record size 20",
            ),
            (
                {
                    let mut b = good.clone();
                    b[4] = 0;
                    b[5] = 0;
                    b
                },
                "count is 0",
            ),
            (
                {
                    let mut b = good.clone();
                    b[6] = 1;
                    b
                },
                "reserved header flags",
            ),
            (
                {
                    let mut b = good.clone();
                    b[24 + 16 + 13] = 0x10;
                    b
                },
                "record 1: reserved bits",
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "bad magic",
            ),
        ];
        for (bytes, needle) in cases {
            let err = decode(&bytes, &mut out).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} !~ {needle}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn unknown_codes_are_kept_for_dead_letters() {
        let mut buf = Vec::new();
        let rec = Record {
            mdc_code: 999,
            unit_id: 200,
            ..Record::new(Metric::Hr, 0, 1.0, 0)
        };
        encode(0, 0, &[rec], &mut buf);
        let mut out = Vec::new();
        decode(&buf, &mut out).unwrap();
        assert_eq!(out[0].metric, DecodedMetric::Unknown("mdc:999".into()));
        assert_eq!(out[0].unit, DecodedUnit::Unknown("unit id 200".into()));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = decode(&bytes, &mut out);
            let mut framed = b"WF\x01\x10".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed, &mut out);
        }

        #[test]
        fn encode_decode_is_identity(
            seq in any::<u64>(),
            base in 0i64..4_000_000_000_000_000_000,
            recs in proptest::collection::vec((any::<u32>(), 0usize..Metric::COUNT, -80_000i32..80_000, 0u8..16), 1..64)
        ) {
            let records: Vec<Record> = recs.iter().map(|&(off, m, centi, q)| {
                Record::new(Metric::ALL[m], off, centi as f64 / 100.0, q)
            }).collect();
            let mut buf = Vec::new();
            encode(seq, base, &records, &mut buf);
            let mut out = Vec::new();
            decode(&buf, &mut out).unwrap();
            prop_assert_eq!(out.len(), records.len());
            for (i, (d, &(off, m, centi, q))) in out.iter().zip(&recs).enumerate() {
                prop_assert_eq!(d.seq, Some(seq.wrapping_add(i as u64)));
                prop_assert_eq!(d.time_ns, base + off as i64 * 1000);
                prop_assert_eq!(&d.metric, &DecodedMetric::Known(Metric::ALL[m]));
                prop_assert_eq!(&d.value, &DecodedValue::Number(centi as f64 / 100.0));
                prop_assert_eq!(d.quality, q);
            }
        }
    }
}
