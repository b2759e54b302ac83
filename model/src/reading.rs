//! A validated reading.

use serde::{Deserialize, Serialize};

use crate::{Metric, TimestampNs};

/// Quality flags a device attaches to a reading, plus the ones Wardflow adds.
///
/// Bits 0-3 come from devices (the binary frame's flag byte; SenML has no
/// field for them); bits 4-6 are reserved and must be zero; bit 7 is set by
/// Wardflow when it converted the value to the canonical unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quality(pub u8);

impl Quality {
    /// The device marks the value as unreliable (motion, poor perfusion, lead off).
    pub const QUESTIONABLE: Quality = Quality(0x01);
    /// The device was calibrating or zeroing its transducer.
    pub const CALIBRATING: Quality = Quality(0x02);
    /// Entered by hand rather than measured.
    pub const MANUAL: Quality = Quality(0x04);
    /// Produced by a simulator or a device in demonstration mode.
    pub const SIMULATED: Quality = Quality(0x08);
    /// Bits a device may set.
    pub const DEVICE_BITS: u8 = 0x0f;
    /// Set by Wardflow: the value was converted to the canonical unit.
    pub const CONVERTED: Quality = Quality(0x80);

    #[inline]
    pub fn contains(self, other: Quality) -> bool {
        self.0 & other.0 == other.0
    }

    #[inline]
    pub fn with(self, other: Quality) -> Quality {
        Quality(self.0 | other.0)
    }
}

/// One validated measurement, in its metric's canonical unit.
///
/// Device and patient are carried once per batch (a publish), not per reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// When the device measured it.
    pub time_ns: TimestampNs,
    pub metric: Metric,
    /// The value in `metric.canonical_unit()`.
    pub value: f64,
    /// The device's sequence number for this reading, when it sends one.
    pub seq: Option<u64>,
    pub quality: Quality,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_bits_combine() {
        let q = Quality::QUESTIONABLE.with(Quality::CONVERTED);
        assert!(q.contains(Quality::QUESTIONABLE));
        assert!(q.contains(Quality::CONVERTED));
        assert!(!q.contains(Quality::MANUAL));
        assert_eq!(Quality::default().0, 0);
    }
}
