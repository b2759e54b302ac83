//! What ingest hands to the dataflow: one publish, as written to the log.

use std::sync::Arc;

use ntex_bytes::Bytes;
use serde::{Deserialize, Serialize};
use wardflow_model::{DeviceId, PatientId, TimestampNs};

use crate::budget::Permit;

/// A publish's payload, shared without copying inside a process.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Payload(pub Bytes);

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Payload;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Payload, E> {
                Ok(Payload(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
                Ok(Payload(Bytes::from(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Payload, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Payload(Bytes::from(v)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// One logged publish: the unit the dataflow receives from ingest, as soon
/// as it is written to the write-ahead log (its fsync follows; see
/// [`crate::wal`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The dataflow time of the write-ahead-log write that logged it
    /// (milliseconds since the epoch, monotone per process).
    pub epoch: u64,
    /// Its position in the write-ahead log.
    pub lsn: u64,
    pub received_ns: TimestampNs,
    pub device: DeviceId,
    /// The patient the device was bound to on receipt.
    pub patient: Option<PatientId>,
    pub payload: Payload,
    /// Memory budget held while the publish is in flight; released when the
    /// envelope is dropped (or serialized to another process).
    #[serde(skip)]
    pub permit: Option<Arc<Permit>>,
}

impl Envelope {
    /// The worker-independent hash the dataflow routes this envelope by: the
    /// patient, so one worker sees all of a patient's readings.
    pub fn route(&self) -> u64 {
        match &self.patient {
            Some(p) => route_hash(p.as_str()),
            None => route_hash(self.device.as_str()),
        }
    }
}

/// A stable 64-bit hash of an id (FNV-1a), the same in every process and
/// every build, for sharding by device and exchanging by patient.
#[inline]
pub fn route_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits are weak for short keys; fold the high half in.
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_hash_spreads_sequential_ids() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[(route_hash(&format!("patient-{i}")) % 4) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
        assert_eq!(route_hash("p-1"), route_hash("p-1"));
    }

    #[test]
    fn payload_serializes_as_bytes() {
        let p = Payload(Bytes::from_static(b"[1,2]"));
        let json = serde_json::to_string(&p).unwrap();
        let back: Payload = serde_json::from_str(&json).unwrap();
        assert_eq!(&*back, b"[1,2]");
    }
}
