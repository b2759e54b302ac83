//! Units of measure and their conversion to each metric's canonical unit.
//!
//! Canonical units are UCUM (the Unified Code for Units of Measure), as FHIR
//! vital-signs profiles require: `/min`, `%`, `mm[Hg]`, `Cel`. Devices may
//! also send the SenML spellings registered by RFC 8428 §12.1 (`beat/min`,
//! `Cel`, `K`, `Pa`, `hPa`, `kPa`, `%`, `/`, `1/s`, `Hz`) and a few common
//! vendor spellings (`bpm`, `mmHg`, `degF`); all are parsed here and converted
//! exactly once, on ingest.

use serde::{Deserialize, Serialize};

/// A unit Wardflow understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Events per minute (UCUM `/min`): heart, pulse and respiratory rate.
    PerMinute,
    /// Events per second (UCUM `/s`, SenML `1/s` and `Hz`).
    PerSecond,
    /// Percent (UCUM and SenML `%`).
    Percent,
    /// Dimensionless ratio 0..1 (SenML `/`, UCUM `1`).
    Ratio,
    /// Millimetres of mercury (UCUM `mm[Hg]`).
    MillimetreMercury,
    /// Pascal (SenML and UCUM `Pa`).
    Pascal,
    /// Hectopascal (`hPa`).
    Hectopascal,
    /// Kilopascal (`kPa`).
    Kilopascal,
    /// Degree Celsius (UCUM and SenML `Cel`).
    Celsius,
    /// Kelvin (`K`).
    Kelvin,
    /// Degree Fahrenheit (UCUM `[degF]`).
    Fahrenheit,
}

/// The physical quantity a unit measures; conversion stays within one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Rate,
    Fraction,
    Pressure,
    Temperature,
}

/// A unit string Wardflow does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown unit {0:?}")]
pub struct UnitError(pub String);

/// One mm[Hg] in pascal, as UCUM defines it (`m[Hg]` = 133.3220 kPa).
const PA_PER_MMHG: f64 = 133.322;

impl Unit {
    /// Parses a SenML or UCUM unit string.
    pub fn parse(s: &str) -> Result<Unit, UnitError> {
        Ok(match s {
            "/min" | "1/min" | "{beat}/min" | "{beats}/min" | "beat/min" | "beats/min"
            | "{breath}/min" | "{breaths}/min" | "breath/min" | "bpm" | "brpm" => Unit::PerMinute,
            "/s" | "1/s" | "Hz" => Unit::PerSecond,
            "%" => Unit::Percent,
            "/" | "1" => Unit::Ratio,
            "mm[Hg]" | "mmHg" => Unit::MillimetreMercury,
            "Pa" => Unit::Pascal,
            "hPa" => Unit::Hectopascal,
            "kPa" => Unit::Kilopascal,
            "Cel" | "degC" => Unit::Celsius,
            "K" => Unit::Kelvin,
            "[degF]" | "degF" => Unit::Fahrenheit,
            other => return Err(UnitError(other.to_string())),
        })
    }

    /// The UCUM code of this unit.
    pub fn ucum(self) -> &'static str {
        match self {
            Unit::PerMinute => "/min",
            Unit::PerSecond => "/s",
            Unit::Percent => "%",
            Unit::Ratio => "1",
            Unit::MillimetreMercury => "mm[Hg]",
            Unit::Pascal => "Pa",
            Unit::Hectopascal => "hPa",
            Unit::Kilopascal => "kPa",
            Unit::Celsius => "Cel",
            Unit::Kelvin => "K",
            Unit::Fahrenheit => "[degF]",
        }
    }

    pub fn dimension(self) -> Dimension {
        match self {
            Unit::PerMinute | Unit::PerSecond => Dimension::Rate,
            Unit::Percent | Unit::Ratio => Dimension::Fraction,
            Unit::MillimetreMercury | Unit::Pascal | Unit::Hectopascal | Unit::Kilopascal => {
                Dimension::Pressure
            }
            Unit::Celsius | Unit::Kelvin | Unit::Fahrenheit => Dimension::Temperature,
        }
    }

    /// Converts `value` in `self` to `to`, if both measure the same quantity.
    #[inline]
    pub fn convert(self, value: f64, to: Unit) -> Option<f64> {
        if self == to {
            return Some(value);
        }
        if self.dimension() != to.dimension() {
            return None;
        }
        // Go through one base unit per dimension: /min, %, Pa, Cel.
        let base = match self {
            Unit::PerMinute => value,
            Unit::PerSecond => value * 60.0,
            Unit::Percent => value,
            Unit::Ratio => value * 100.0,
            Unit::MillimetreMercury => value * PA_PER_MMHG,
            Unit::Pascal => value,
            Unit::Hectopascal => value * 100.0,
            Unit::Kilopascal => value * 1000.0,
            Unit::Celsius => value,
            Unit::Kelvin => value - 273.15,
            Unit::Fahrenheit => (value - 32.0) * 5.0 / 9.0,
        };
        Some(match to {
            Unit::PerMinute => base,
            Unit::PerSecond => base / 60.0,
            Unit::Percent => base,
            Unit::Ratio => base / 100.0,
            Unit::MillimetreMercury => base / PA_PER_MMHG,
            Unit::Pascal => base,
            Unit::Hectopascal => base / 100.0,
            Unit::Kilopascal => base / 1000.0,
            Unit::Celsius => base,
            Unit::Kelvin => base + 273.15,
            Unit::Fahrenheit => base * 9.0 / 5.0 + 32.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senml_and_ucum_spellings_parse() {
        assert_eq!(Unit::parse("beat/min").unwrap(), Unit::PerMinute);
        assert_eq!(Unit::parse("/min").unwrap(), Unit::PerMinute);
        assert_eq!(Unit::parse("mm[Hg]").unwrap(), Unit::MillimetreMercury);
        assert_eq!(Unit::parse("Cel").unwrap(), Unit::Celsius);
        assert_eq!(Unit::parse("[degF]").unwrap(), Unit::Fahrenheit);
        assert_eq!(Unit::parse("furlong").unwrap_err().0, "furlong");
    }

    #[test]
    fn conversions_match_reference_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(
            Unit::Fahrenheit.convert(212.0, Unit::Celsius).unwrap(),
            100.0
        ));
        assert!(close(
            Unit::Kelvin.convert(310.15, Unit::Celsius).unwrap(),
            37.0
        ));
        assert!(close(
            Unit::Celsius.convert(37.0, Unit::Fahrenheit).unwrap(),
            98.6
        ));
        assert!(close(
            Unit::Kilopascal
                .convert(16.0, Unit::MillimetreMercury)
                .unwrap(),
            16_000.0 / 133.322
        ));
        assert!(close(
            Unit::Ratio.convert(0.97, Unit::Percent).unwrap(),
            97.0
        ));
        assert!(close(
            Unit::PerSecond.convert(1.2, Unit::PerMinute).unwrap(),
            72.0
        ));
        assert_eq!(Unit::Celsius.convert(37.0, Unit::Percent), None);
    }

    #[test]
    fn round_trips_within_a_dimension() {
        let all = [
            Unit::PerMinute,
            Unit::PerSecond,
            Unit::Percent,
            Unit::Ratio,
            Unit::MillimetreMercury,
            Unit::Pascal,
            Unit::Hectopascal,
            Unit::Kilopascal,
            Unit::Celsius,
            Unit::Kelvin,
            Unit::Fahrenheit,
        ];
        for a in all {
            assert_eq!(Unit::parse(a.ucum()).unwrap(), a);
            for b in all
                .iter()
                .copied()
                .filter(|b| b.dimension() == a.dimension())
            {
                let there = a.convert(42.5, b).unwrap();
                let back = b.convert(there, a).unwrap();
                assert!(
                    (back - 42.5).abs() < 1e-9,
                    "{a:?} -> {b:?} -> {a:?} = {back}"
                );
            }
        }
    }
}
