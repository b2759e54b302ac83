//! The canonical encoding of audit-trail leaves: what exactly is hashed for
//! each thing Wardflow stores or decides.
//!
//! A leaf's bytes are fixed by this encoding alone, so anyone holding the
//! stored rows can recompute them (docs/ledger.md restates it for readers
//! without Rust). Every leaf starts with the 4-byte tag `WFL1` (format
//! version 1) and a kind byte; then its fields in the order listed on each
//! kind, encoded as:
//!
//! | type | bytes |
//! | --- | --- |
//! | `u8` | 1 byte |
//! | `u64`, `i64` | 8 bytes, big-endian (`i64` two's complement) |
//! | `f64` | the IEEE 754 binary64 bit pattern as a big-endian `u64` |
//! | `str` | `u32` byte length, big-endian, then the UTF-8 bytes |
//! | `opt<T>` | `0x00` for none; `0x01` then `T` |
//!
//! Times are nanoseconds since the Unix epoch (UTC). Lengths are explicit,
//! so no two different field lists encode to the same bytes.

/// Leading tag of every leaf: the format and its version.
pub const TAG: &[u8; 4] = b"WFL1";

/// What a leaf records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LeafKind {
    Reading = 0x01,
    DeadLetter = 0x02,
    AlertTransition = 0x03,
    Access = 0x04,
    ConsentDecision = 0x05,
    SealedReading = 0x06,
    SealedDeadLetter = 0x07,
}

/// A stored reading, as in the `readings` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingLeaf<'a> {
    pub time_ns: i64,
    pub patient: Option<&'a str>,
    pub device: &'a str,
    pub metric: &'a str,
    pub value: f64,
    pub unit: &'a str,
    pub seq: Option<u64>,
    pub quality: u8,
    pub received_ns: i64,
}

/// A stored dead letter, as in the `deadletters` table.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterLeaf<'a> {
    pub received_ns: i64,
    pub device: &'a str,
    pub patient: Option<&'a str>,
    pub reason: &'a str,
    pub detail: &'a str,
    pub metric: Option<&'a str>,
    pub raw: &'a str,
    pub time_ns: Option<i64>,
    pub seq: Option<u64>,
}

/// A reading stored sealed (encryption at rest): the leaf commits to the
/// ciphertext as stored, so it can be checked without the keys, and after
/// the patient's key was destroyed, and reveals nothing of the value.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedReadingLeaf<'a> {
    pub time_ns: i64,
    pub patient: Option<&'a str>,
    pub device: &'a str,
    pub metric: &'a str,
    /// The value's 8 bytes, encrypted.
    pub value_sealed: &'a [u8],
    pub unit: &'a str,
    pub seq: Option<u64>,
    pub quality: u8,
    pub received_ns: i64,
    /// Key generation, nonce and tag, on the first row of a sealed run.
    pub seal: Option<&'a [u8]>,
}

/// A dead letter stored sealed: detail and raw payload are in `sealed`.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedDeadLetterLeaf<'a> {
    pub received_ns: i64,
    pub device: &'a str,
    pub patient: Option<&'a str>,
    pub reason: &'a str,
    pub metric: Option<&'a str>,
    pub time_ns: Option<i64>,
    pub seq: Option<u64>,
    pub seal: &'a [u8],
    pub sealed: &'a [u8],
}

/// An alert transition: the exact line the alert log holds for it (its
/// JSON, without the line break), so the log is what is verified.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertTransitionLeaf<'a> {
    pub log_line: &'a [u8],
}

/// An access to a patient's data: who, what for, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLeaf<'a> {
    pub at_ns: i64,
    pub patient: &'a str,
    /// `clinician:<id>`, `researcher:<id>`, `patient`, `node`.
    pub actor: &'a str,
    /// `query`, `export`, `alert-delivery`, `research-contribution`.
    pub action: &'a str,
    /// The purpose the access was allowed for (`treatment`,
    /// `research:<study>`, `emergency`).
    pub purpose: &'a str,
    /// The reason given (break-glass), or what was accessed.
    pub detail: &'a str,
}

/// A consent decision the engine relied on.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentDecisionLeaf<'a> {
    pub at_ns: i64,
    pub patient: &'a str,
    pub grantee: &'a str,
    pub purpose: &'a str,
    pub allowed: bool,
    /// The consent version decided on: the grant (or break-glass) record's
    /// id, or none when no consent applied.
    pub version: Option<&'a str>,
}

/// Appends leaf bytes to a buffer (reused across leaves by the caller).
struct Enc<'b>(&'b mut Vec<u8>);

impl Enc<'_> {
    fn start(out: &mut Vec<u8>, kind: LeafKind) -> Enc<'_> {
        out.clear();
        out.extend_from_slice(TAG);
        out.push(kind as u8);
        Enc(out)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("a leaf field under 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T) -> &mut Self) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => f(self.u8(1), v),
        }
    }
}

impl ReadingLeaf<'_> {
    /// Fields: `i64 time, opt<str> patient, str device, str metric,
    /// f64 value, str unit, opt<u64> seq, u8 quality, i64 received`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::Reading)
            .i64(self.time_ns)
            .opt(self.patient, Enc::str)
            .str(self.device)
            .str(self.metric)
            .f64(self.value)
            .str(self.unit)
            .opt(self.seq, Enc::u64)
            .u8(self.quality)
            .i64(self.received_ns);
    }
}

impl DeadLetterLeaf<'_> {
    /// Fields: `i64 received, str device, opt<str> patient, str reason,
    /// str detail, opt<str> metric, str raw, opt<i64> time, opt<u64> seq`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::DeadLetter)
            .i64(self.received_ns)
            .str(self.device)
            .opt(self.patient, Enc::str)
            .str(self.reason)
            .str(self.detail)
            .opt(self.metric, Enc::str)
            .str(self.raw)
            .opt(self.time_ns, Enc::i64)
            .opt(self.seq, Enc::u64);
    }
}

impl SealedReadingLeaf<'_> {
    /// Fields: `i64 time, opt<str> patient, str device, str metric,
    /// bytes value_sealed, str unit, opt<u64> seq, u8 quality, i64 received,
    /// opt<bytes> seal` (`bytes` encodes as `str` does).
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::SealedReading)
            .i64(self.time_ns)
            .opt(self.patient, Enc::str)
            .str(self.device)
            .str(self.metric)
            .bytes(self.value_sealed)
            .str(self.unit)
            .opt(self.seq, Enc::u64)
            .u8(self.quality)
            .i64(self.received_ns)
            .opt(self.seal, Enc::bytes);
    }
}

impl SealedDeadLetterLeaf<'_> {
    /// Fields: `i64 received, str device, opt<str> patient, str reason,
    /// opt<str> metric, opt<i64> time, opt<u64> seq, bytes seal, bytes
    /// sealed`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::SealedDeadLetter)
            .i64(self.received_ns)
            .str(self.device)
            .opt(self.patient, Enc::str)
            .str(self.reason)
            .opt(self.metric, Enc::str)
            .opt(self.time_ns, Enc::i64)
            .opt(self.seq, Enc::u64)
            .bytes(self.seal)
            .bytes(self.sealed);
    }
}

impl AlertTransitionLeaf<'_> {
    /// Fields: `str log_line`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::AlertTransition).bytes(self.log_line);
    }
}

impl AccessLeaf<'_> {
    /// Fields: `i64 at, str patient, str actor, str action, str purpose,
    /// str detail`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::Access)
            .i64(self.at_ns)
            .str(self.patient)
            .str(self.actor)
            .str(self.action)
            .str(self.purpose)
            .str(self.detail);
    }
}

impl ConsentDecisionLeaf<'_> {
    /// Fields: `i64 at, str patient, str grantee, str purpose, u8 allowed
    /// (0 or 1), opt<str> version`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        Enc::start(out, LeafKind::ConsentDecision)
            .i64(self.at_ns)
            .str(self.patient)
            .str(self.grantee)
            .str(self.purpose)
            .u8(u8::from(self.allowed))
            .opt(self.version, Enc::str);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leaf_hash;

    use crate::hex;

    fn reading() -> ReadingLeaf<'static> {
        ReadingLeaf {
            time_ns: 1_795_600_800_000_000_000,
            patient: Some("p-1"),
            device: "mon-1",
            metric: "hr",
            value: 72.5,
            unit: "/min",
            seq: Some(7),
            quality: 0,
            received_ns: 1_795_600_800_001_000_000,
        }
    }

    #[test]
    fn a_reading_encodes_byte_for_byte_as_documented() {
        let mut out = Vec::new();
        reading().encode(&mut out);
        let mut want = Vec::new();
        want.extend_from_slice(b"WFL1");
        want.push(0x01);
        want.extend_from_slice(&1_795_600_800_000_000_000i64.to_be_bytes());
        want.extend_from_slice(&[1, 0, 0, 0, 3]);
        want.extend_from_slice(b"p-1");
        want.extend_from_slice(&[0, 0, 0, 5]);
        want.extend_from_slice(b"mon-1");
        want.extend_from_slice(&[0, 0, 0, 2]);
        want.extend_from_slice(b"hr");
        want.extend_from_slice(&0x4052_2000_0000_0000u64.to_be_bytes()); // 72.5
        want.extend_from_slice(&[0, 0, 0, 4]);
        want.extend_from_slice(b"/min");
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.push(0);
        want.extend_from_slice(&1_795_600_800_001_000_000i64.to_be_bytes());
        assert_eq!(hex(&out), hex(&want));
        // The example in docs/ledger.md, its hash computed with Python's
        // hashlib.
        assert_eq!(
            hex(&leaf_hash(&out)),
            "b93827a5c4d1bdae7ed1a4b3290a9c513527acac6f6666550845da930e35af69"
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let mut buf = Vec::new();
        reading().encode(&mut buf);
        let base = leaf_hash(&buf);
        let variants = [
            ReadingLeaf {
                time_ns: 1,
                ..reading()
            },
            ReadingLeaf {
                patient: None,
                ..reading()
            },
            ReadingLeaf {
                device: "mon-2",
                ..reading()
            },
            ReadingLeaf {
                metric: "rr",
                ..reading()
            },
            ReadingLeaf {
                value: 72.50000000000001,
                ..reading()
            },
            ReadingLeaf {
                unit: "1/min",
                ..reading()
            },
            ReadingLeaf {
                seq: None,
                ..reading()
            },
            ReadingLeaf {
                quality: 1,
                ..reading()
            },
            ReadingLeaf {
                received_ns: 0,
                ..reading()
            },
        ];
        for v in variants {
            v.encode(&mut buf);
            assert_ne!(leaf_hash(&buf), base, "{v:?}");
        }
    }

    #[test]
    fn field_boundaries_cannot_shift() {
        // "ab" + "c" and "a" + "bc" must differ: lengths are explicit.
        let mut a = Vec::new();
        let mut b = Vec::new();
        AccessLeaf {
            at_ns: 0,
            patient: "ab",
            actor: "c",
            action: "",
            purpose: "",
            detail: "",
        }
        .encode(&mut a);
        AccessLeaf {
            at_ns: 0,
            patient: "a",
            actor: "bc",
            action: "",
            purpose: "",
            detail: "",
        }
        .encode(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn kinds_are_told_apart() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        AlertTransitionLeaf { log_line: b"{}" }.encode(&mut a);
        ConsentDecisionLeaf {
            at_ns: 0,
            patient: "p",
            grantee: "g",
            purpose: "treatment",
            allowed: true,
            version: None,
        }
        .encode(&mut b);
        assert_eq!(a[4], LeafKind::AlertTransition as u8);
        assert_eq!(b[4], LeafKind::ConsentDecision as u8);
        let mut d = Vec::new();
        DeadLetterLeaf {
            received_ns: 0,
            device: "d",
            patient: None,
            reason: "decode",
            detail: "bad json",
            metric: None,
            raw: "{",
            time_ns: None,
            seq: None,
        }
        .encode(&mut d);
        assert_eq!(&d[..5], b"WFL1\x02");
    }
}
