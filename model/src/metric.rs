//! The metric catalogue: what Wardflow measures, how standards name it, which
//! unit it is stored in, and which values are physically plausible.
//!
//! Codes: LOINC for FHIR export (the FHIR R4 vital-signs profile names the
//! LOINC codes used here), IEEE 11073-10101 MDC reference ids and numeric
//! codes (partition 2, SCADA) for device interoperability; units are UCUM.
//!
//! Plausibility ranges reject what cannot be a measurement of a living
//! patient (sensor faults, unit mix-ups, encoding bugs), never what is merely
//! alarming: a heart rate of 0 during asystole is real and must be stored so
//! the alarm stage can see it. Each range is wider than the display range the
//! relevant device standard requires, and cites it.

use serde::{Deserialize, Serialize};

use crate::unit::Unit;

/// A vital sign Wardflow knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Metric {
    /// Heart rate from the ECG.
    Hr = 0,
    /// Peripheral oxygen saturation by pulse oximetry.
    Spo2 = 1,
    /// Respiratory rate.
    Rr = 2,
    /// Systolic blood pressure.
    Sbp = 3,
    /// Diastolic blood pressure.
    Dbp = 4,
    /// Mean arterial pressure.
    Map = 5,
    /// Body temperature.
    Temp = 6,
    /// Pulse rate from the pulse oximeter (plethysmogram).
    Pr = 7,
    /// End-tidal carbon dioxide.
    Etco2 = 8,
}

/// Inclusive bounds of a plausible value, in the metric's canonical unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlausibleRange {
    pub min: f64,
    pub max: f64,
}

impl PlausibleRange {
    #[inline]
    pub fn contains(&self, v: f64) -> bool {
        v >= self.min && v <= self.max
    }
}

impl Metric {
    /// Every metric, in code order.
    pub const ALL: [Metric; 9] = [
        Metric::Hr,
        Metric::Spo2,
        Metric::Rr,
        Metric::Sbp,
        Metric::Dbp,
        Metric::Map,
        Metric::Temp,
        Metric::Pr,
        Metric::Etco2,
    ];

    /// Number of metrics; metric codes are `0..COUNT`.
    pub const COUNT: usize = Self::ALL.len();

    /// The short name devices use in SenML (`n`) and users in queries.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Hr => "hr",
            Metric::Spo2 => "spo2",
            Metric::Rr => "rr",
            Metric::Sbp => "sbp",
            Metric::Dbp => "dbp",
            Metric::Map => "map",
            Metric::Temp => "temp",
            Metric::Pr => "pr",
            Metric::Etco2 => "etco2",
        }
    }

    /// Looks a metric up by its short name.
    #[inline]
    pub fn from_name(name: &str) -> Option<Metric> {
        Some(match name {
            "hr" => Metric::Hr,
            "spo2" => Metric::Spo2,
            "rr" => Metric::Rr,
            "sbp" => Metric::Sbp,
            "dbp" => Metric::Dbp,
            "map" => Metric::Map,
            "temp" => Metric::Temp,
            "pr" => Metric::Pr,
            "etco2" => Metric::Etco2,
            _ => return None,
        })
    }

    /// The metric's dense code, `0..COUNT`.
    #[inline]
    pub fn code(self) -> u8 {
        self as u8
    }

    #[inline]
    pub fn from_code(code: u8) -> Option<Metric> {
        Self::ALL.get(code as usize).copied()
    }

    /// A human label.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Hr => "Heart rate",
            Metric::Spo2 => "Oxygen saturation (SpO2)",
            Metric::Rr => "Respiratory rate",
            Metric::Sbp => "Systolic blood pressure",
            Metric::Dbp => "Diastolic blood pressure",
            Metric::Map => "Mean arterial pressure",
            Metric::Temp => "Body temperature",
            Metric::Pr => "Pulse rate (oximetry)",
            Metric::Etco2 => "End-tidal CO2",
        }
    }

    /// LOINC code, as the FHIR R4 vital-signs profile uses.
    pub fn loinc(self) -> &'static str {
        match self {
            Metric::Hr => "8867-4",
            Metric::Spo2 => "59408-5",
            Metric::Rr => "9279-1",
            Metric::Sbp => "8480-6",
            Metric::Dbp => "8462-4",
            Metric::Map => "8478-0",
            Metric::Temp => "8310-5",
            Metric::Pr => "8889-8",
            Metric::Etco2 => "19889-5",
        }
    }

    /// IEEE 11073-10101 numeric code (partition 2 << 16 | term code).
    pub fn mdc_code(self) -> u32 {
        match self {
            Metric::Hr => 147_842,
            Metric::Spo2 => 150_456,
            Metric::Rr => 151_562,
            Metric::Sbp => 150_021,
            Metric::Dbp => 150_022,
            Metric::Map => 150_023,
            Metric::Temp => 150_364,
            Metric::Pr => 149_530,
            Metric::Etco2 => 151_708,
        }
    }

    /// IEEE 11073-10101 reference id.
    pub fn mdc_ref_id(self) -> &'static str {
        match self {
            Metric::Hr => "MDC_ECG_HEART_RATE",
            Metric::Spo2 => "MDC_PULS_OXIM_SAT_O2",
            Metric::Rr => "MDC_RESP_RATE",
            Metric::Sbp => "MDC_PRESS_BLD_NONINV_SYS",
            Metric::Dbp => "MDC_PRESS_BLD_NONINV_DIA",
            Metric::Map => "MDC_PRESS_BLD_NONINV_MEAN",
            Metric::Temp => "MDC_TEMP_BODY",
            Metric::Pr => "MDC_PULS_OXIM_PULS_RATE",
            Metric::Etco2 => "MDC_AWAY_CO2_ET",
        }
    }

    #[inline]
    pub fn from_mdc_code(code: u32) -> Option<Metric> {
        Self::ALL.iter().copied().find(|m| m.mdc_code() == code)
    }

    /// The unit readings are stored in.
    pub fn canonical_unit(self) -> Unit {
        match self {
            Metric::Hr | Metric::Rr | Metric::Pr => Unit::PerMinute,
            Metric::Spo2 => Unit::Percent,
            Metric::Sbp | Metric::Dbp | Metric::Map | Metric::Etco2 => Unit::MillimetreMercury,
            Metric::Temp => Unit::Celsius,
        }
    }

    /// Converts `value` in `unit` to the canonical unit, or `None` if the
    /// unit measures another quantity (a temperature sent for a heart rate).
    #[inline]
    pub fn to_canonical(self, value: f64, unit: Unit) -> Option<f64> {
        unit.convert(value, self.canonical_unit())
    }

    /// The range outside which a value cannot be a measurement.
    pub fn plausible_range(self) -> PlausibleRange {
        let (min, max) = match self {
            // IEC 60601-2-27 (ECG monitors) requires heart-rate meters to
            // cover at least 30-200 /min for adults and 30-250 /min for
            // neonates; monitors display 0 in asystole. Nothing above
            // 350 /min is conducted by a human ventricle.
            Metric::Hr | Metric::Pr => (0.0, 350.0),
            // A saturation is a percentage by definition (ISO 80601-2-61,
            // pulse oximeters).
            Metric::Spo2 => (0.0, 100.0),
            // Apnoea is 0; neonatal tachypnoea can exceed 100 /min; nothing
            // above 150 /min is ventilation.
            Metric::Rr => (0.0, 150.0),
            // IEC 80601-2-30 (automated NIBP) cuffs measure up to 300 mmHg;
            // invasive transducers (IEC 60601-2-34) to 300 mmHg as well.
            Metric::Sbp | Metric::Dbp | Metric::Map => (0.0, 300.0),
            // Survived extremes of core temperature are about 13.7 °C
            // (accidental hypothermia) and 46.5 °C (heat stroke); 10-47 °C
            // leaves room and rejects ambient or unit-mixed values (98.6).
            Metric::Temp => (10.0, 47.0),
            // Capnometers (ISO 80601-2-55) measure 0-150 mmHg.
            Metric::Etco2 => (0.0, 150.0),
        };
        PlausibleRange { min, max }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_and_mdc_round_trip() {
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
            assert_eq!(Metric::from_code(m.code()), Some(m));
            assert_eq!(Metric::from_mdc_code(m.mdc_code()), Some(m));
            assert!(m.plausible_range().min < m.plausible_range().max);
        }
        assert_eq!(Metric::from_code(Metric::COUNT as u8), None);
        assert_eq!(Metric::from_name("glucose"), None);
    }

    #[test]
    fn design_loinc_codes() {
        assert_eq!(Metric::Hr.loinc(), "8867-4");
        assert_eq!(Metric::Spo2.loinc(), "59408-5");
        assert_eq!(Metric::Rr.loinc(), "9279-1");
        assert_eq!(Metric::Sbp.loinc(), "8480-6");
        assert_eq!(Metric::Dbp.loinc(), "8462-4");
        assert_eq!(Metric::Map.loinc(), "8478-0");
        assert_eq!(Metric::Temp.loinc(), "8310-5");
    }

    #[test]
    fn plausibility_keeps_alarming_values_and_rejects_impossible_ones() {
        assert!(Metric::Hr.plausible_range().contains(0.0));
        assert!(Metric::Spo2.plausible_range().contains(62.0));
        assert!(!Metric::Spo2.plausible_range().contains(101.0));
        assert!(!Metric::Temp.plausible_range().contains(98.6));
        assert!(!Metric::Hr.plausible_range().contains(-1.0));
        assert!(!Metric::Hr.plausible_range().contains(f64::NAN));
    }
}
