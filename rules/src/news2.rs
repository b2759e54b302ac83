//! The National Early Warning Score 2 (Royal College of Physicians, *NEWS2:
//! Standardising the assessment of acute-illness severity in the NHS*,
//! December 2017): Chart 1 (the scoring of seven parameters) and Chart 2
//! (the aggregate thresholds and triggers).
//!
//! The chart's bands are on a grid: whole numbers, temperature to one
//! decimal. A measurement between two grid points (20.5 breaths/min,
//! 35.05 °C) is first rounded to the chart's resolution, to nearest, exact
//! halves away from zero, on the value's shortest decimal representation
//! (so 35.05 is 35.1, as a nurse reading "35.05" would round it, although
//! the binary double nearest to 35.05 lies just below it).
//!
//! ```
//! use wardflow_rules::news2::{Acvpu, News2Input, Oxygen, Risk, Spo2Scale};
//!
//! let obs = News2Input {
//!     rr: 22.0, spo2: 95.0, spo2_scale: Spo2Scale::One, oxygen: Oxygen::Air,
//!     sbp: 105.0, hr: 100.0, consciousness: Acvpu::Alert, temp: 38.4,
//! };
//! let s = obs.score();
//! assert_eq!(s.total, 2 + 1 + 1 + 1 + 1);
//! assert_eq!(s.risk, Risk::Medium);
//! ```

use serde::{Deserialize, Serialize};

/// Level of consciousness on the ACVPU scale (Chart 1; C is new confusion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Acvpu {
    #[serde(rename = "A")]
    Alert,
    #[serde(rename = "C")]
    Confusion,
    #[serde(rename = "V")]
    Voice,
    #[serde(rename = "P")]
    Pain,
    #[serde(rename = "U")]
    Unresponsive,
}

impl Acvpu {
    pub fn parse(s: &str) -> Option<Acvpu> {
        Some(match s {
            "A" | "a" => Acvpu::Alert,
            "C" | "c" => Acvpu::Confusion,
            "V" | "v" => Acvpu::Voice,
            "P" | "p" => Acvpu::Pain,
            "U" | "u" => Acvpu::Unresponsive,
            _ => return None,
        })
    }

    pub fn letter(self) -> &'static str {
        match self {
            Acvpu::Alert => "A",
            Acvpu::Confusion => "C",
            Acvpu::Voice => "V",
            Acvpu::Pain => "P",
            Acvpu::Unresponsive => "U",
        }
    }
}

/// Whether the patient breathes air or receives supplemental oxygen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Oxygen {
    Air,
    O2,
}

impl Oxygen {
    pub fn parse(s: &str) -> Option<Oxygen> {
        match s {
            "air" => Some(Oxygen::Air),
            "o2" | "oxygen" => Some(Oxygen::O2),
            _ => None,
        }
    }
}

/// Which SpO2 scale applies. Scale 2 is for patients with hypercapnic
/// respiratory failure whose prescribed target range is 88–92 %; it must be
/// chosen by a clinician and recorded (RCP 2017, Chart 1 note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Spo2Scale {
    #[default]
    #[serde(rename = "1")]
    One,
    #[serde(rename = "2")]
    Two,
}

impl Spo2Scale {
    pub fn from_number(n: u8) -> Option<Spo2Scale> {
        match n {
            1 => Some(Spo2Scale::One),
            2 => Some(Spo2Scale::Two),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Spo2Scale::One => 1,
            Spo2Scale::Two => 2,
        }
    }
}

/// Chart 2's clinical risk bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Risk {
    /// Aggregate 0–4 and no single parameter scoring 3.
    #[serde(rename = "low")]
    Low,
    /// A score of 3 in any single parameter (aggregate below 5).
    #[serde(rename = "low-medium")]
    LowMedium,
    /// Aggregate 5–6: key threshold for urgent response.
    #[serde(rename = "medium")]
    Medium,
    /// Aggregate 7 or more: emergency response.
    #[serde(rename = "high")]
    High,
}

impl Risk {
    pub fn name(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::LowMedium => "low-medium",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// One complete observation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct News2Input {
    /// Respiration rate, breaths per minute.
    pub rr: f64,
    /// Oxygen saturation, %.
    pub spo2: f64,
    pub spo2_scale: Spo2Scale,
    pub oxygen: Oxygen,
    /// Systolic blood pressure, mmHg.
    pub sbp: f64,
    /// Pulse, per minute.
    pub hr: f64,
    pub consciousness: Acvpu,
    /// Temperature, °C.
    pub temp: f64,
}

/// The score of each parameter, in Chart 1's row order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct News2Parts {
    pub rr: u8,
    pub spo2: u8,
    pub oxygen: u8,
    pub sbp: u8,
    pub hr: u8,
    pub consciousness: u8,
    pub temp: u8,
}

impl News2Parts {
    pub fn total(&self) -> u8 {
        self.rr + self.spo2 + self.oxygen + self.sbp + self.hr + self.consciousness + self.temp
    }

    /// Chart 2's "red score": 3 in any single parameter.
    pub fn red(&self) -> bool {
        [
            self.rr,
            self.spo2,
            self.oxygen,
            self.sbp,
            self.hr,
            self.consciousness,
            self.temp,
        ]
        .contains(&3)
    }
}

/// A NEWS2 result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct News2Score {
    pub total: u8,
    pub parts: News2Parts,
    pub red: bool,
    pub risk: Risk,
}

impl News2Score {
    pub fn from_parts(parts: News2Parts) -> News2Score {
        let total = parts.total();
        let red = parts.red();
        News2Score {
            total,
            parts,
            red,
            risk: risk(total, red),
        }
    }
}

/// Chart 2: 7 or more is high; 5–6 medium; otherwise a single 3 is
/// low-medium; otherwise low. The aggregate takes precedence.
pub fn risk(total: u8, red: bool) -> Risk {
    if total >= 7 {
        Risk::High
    } else if total >= 5 {
        Risk::Medium
    } else if red {
        Risk::LowMedium
    } else {
        Risk::Low
    }
}

impl News2Input {
    pub fn score(&self) -> News2Score {
        News2Score::from_parts(News2Parts {
            rr: rr_score(self.rr),
            spo2: spo2_score(self.spo2, self.spo2_scale, self.oxygen),
            oxygen: oxygen_score(self.oxygen),
            sbp: sbp_score(self.sbp),
            hr: hr_score(self.hr),
            consciousness: consciousness_score(self.consciousness),
            temp: temp_score(self.temp),
        })
    }
}

/// Chart 1, respiration rate: ≤8 → 3; 9–11 → 1; 12–20 → 0; 21–24 → 2; ≥25 → 3.
pub fn rr_score(rr: f64) -> u8 {
    match to_grid(rr, 0) {
        ..=8 => 3,
        9..=11 => 1,
        12..=20 => 0,
        21..=24 => 2,
        _ => 3,
    }
}

/// Chart 1, SpO2. Scale 1: ≤91 → 3; 92–93 → 2; 94–95 → 1; ≥96 → 0.
/// Scale 2: ≤83 → 3; 84–85 → 2; 86–87 → 1; 88–92 → 0, and ≥93 on air → 0;
/// on oxygen 93–94 → 1, 95–96 → 2, ≥97 → 3.
pub fn spo2_score(spo2: f64, scale: Spo2Scale, oxygen: Oxygen) -> u8 {
    let v = to_grid(spo2, 0);
    match scale {
        Spo2Scale::One => match v {
            ..=91 => 3,
            92..=93 => 2,
            94..=95 => 1,
            _ => 0,
        },
        Spo2Scale::Two => match (v, oxygen) {
            (..=83, _) => 3,
            (84..=85, _) => 2,
            (86..=87, _) => 1,
            (88..=92, _) | (_, Oxygen::Air) => 0,
            (93..=94, Oxygen::O2) => 1,
            (95..=96, Oxygen::O2) => 2,
            (_, Oxygen::O2) => 3,
        },
    }
}

/// Chart 1, air or oxygen: oxygen → 2; air → 0.
pub fn oxygen_score(oxygen: Oxygen) -> u8 {
    match oxygen {
        Oxygen::Air => 0,
        Oxygen::O2 => 2,
    }
}

/// Chart 1, systolic blood pressure: ≤90 → 3; 91–100 → 2; 101–110 → 1;
/// 111–219 → 0; ≥220 → 3.
pub fn sbp_score(sbp: f64) -> u8 {
    match to_grid(sbp, 0) {
        ..=90 => 3,
        91..=100 => 2,
        101..=110 => 1,
        111..=219 => 0,
        _ => 3,
    }
}

/// Chart 1, pulse: ≤40 → 3; 41–50 → 1; 51–90 → 0; 91–110 → 1; 111–130 → 2;
/// ≥131 → 3.
pub fn hr_score(hr: f64) -> u8 {
    match to_grid(hr, 0) {
        ..=40 => 3,
        41..=50 => 1,
        51..=90 => 0,
        91..=110 => 1,
        111..=130 => 2,
        _ => 3,
    }
}

/// Chart 1, consciousness: Alert → 0; new confusion, voice, pain or
/// unresponsive → 3.
pub fn consciousness_score(c: Acvpu) -> u8 {
    match c {
        Acvpu::Alert => 0,
        _ => 3,
    }
}

/// Chart 1, temperature (tenths of °C): ≤35.0 → 3; 35.1–36.0 → 1;
/// 36.1–38.0 → 0; 38.1–39.0 → 1; ≥39.1 → 2.
pub fn temp_score(temp: f64) -> u8 {
    match to_grid(temp, 1) {
        ..=350 => 3,
        351..=360 => 1,
        361..=380 => 0,
        381..=390 => 1,
        _ => 2,
    }
}

/// `x` rounded to `decimals` places and scaled to an integer (35.05 with one
/// decimal is 351), halves away from zero, on the shortest decimal string
/// that reads back as `x`. Values beyond ±1e15 saturate: they lie far
/// outside every band either way.
pub fn to_grid(x: f64, decimals: u32) -> i64 {
    const LIMIT: f64 = 1e15;
    if x.is_nan() {
        return 0;
    }
    if x >= LIMIT {
        return i64::MAX / 2;
    }
    if x <= -LIMIT {
        return i64::MIN / 2;
    }
    // Away from an exact half, binary and decimal rounding agree (the
    // shortest decimal string differs from x by far less than 1e-6 of a
    // grid step): round directly, without printing.
    let scaled = x.abs() * 10f64.powi(decimals as i32);
    let frac = scaled - scaled.floor();
    if (frac - 0.5).abs() > 1e-6 {
        let r = (scaled + 0.5).floor() as i64;
        return if x < 0.0 { -r } else { r };
    }
    // Rust prints an f64 with the fewest digits that read back exactly,
    // without an exponent: the same digits as Python's repr.
    let text = format!("{}", x.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let mut scaled: i64 = int.parse().unwrap_or(0);
    let frac = frac.as_bytes();
    for i in 0..decimals as usize {
        let d = frac.get(i).map_or(0, |b| (b - b'0') as i64);
        scaled = scaled * 10 + d;
    }
    if frac.get(decimals as usize).is_some_and(|&b| b >= b'5') {
        scaled += 1;
    }
    if x < 0.0 { -scaled } else { scaled }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> News2Input {
        News2Input {
            rr: 16.0,
            spo2: 97.0,
            spo2_scale: Spo2Scale::One,
            oxygen: Oxygen::Air,
            sbp: 125.0,
            hr: 72.0,
            consciousness: Acvpu::Alert,
            temp: 37.0,
        }
    }

    #[test]
    fn grid_rounding_uses_the_decimal_text() {
        assert_eq!(to_grid(35.05, 1), 351);
        assert_eq!(to_grid(35.04999, 1), 350);
        assert_eq!(to_grid(20.5, 0), 21);
        assert_eq!(to_grid(20.49, 0), 20);
        assert_eq!(to_grid(-2.5, 0), -3);
        assert_eq!(to_grid(1e-7, 0), 0);
        assert_eq!(to_grid(39.0, 1), 390);
        assert_eq!(to_grid(1e300, 0), i64::MAX / 2);
        assert_eq!(
            to_grid(0.15, 1),
            2,
            "0.15 is below .15 in binary, 0.2 on its decimal text"
        );
        assert_eq!(to_grid(2.675, 2), 268);
    }

    #[test]
    fn the_fast_path_agrees_with_the_decimal_text() {
        // Every value on a fine grid near the band edges: the direct rounding
        // and the printed decimal's rounding agree.
        for i in 0..200_000 {
            let x = 30.0 + i as f64 * 0.000_37;
            for d in [0, 1] {
                let text = format!("{x}");
                let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
                let mut want: i64 = int.parse().unwrap();
                let f = frac.as_bytes();
                for k in 0..d {
                    want = want * 10 + f.get(k).map_or(0, |b| (b - b'0') as i64);
                }
                if f.get(d).is_some_and(|&b| b >= b'5') {
                    want += 1;
                }
                assert_eq!(to_grid(x, d as u32), want, "{x} to {d} decimals");
            }
        }
    }

    #[test]
    fn every_band_edge() {
        let rr: Vec<u8> = [8.0, 9.0, 11.0, 12.0, 20.0, 21.0, 24.0, 25.0]
            .map(rr_score)
            .to_vec();
        assert_eq!(rr, [3, 1, 1, 0, 0, 2, 2, 3]);
        let sbp: Vec<u8> = [90.0, 91.0, 100.0, 101.0, 110.0, 111.0, 219.0, 220.0]
            .map(sbp_score)
            .to_vec();
        assert_eq!(sbp, [3, 2, 2, 1, 1, 0, 0, 3]);
        let hr: Vec<u8> = [
            40.0, 41.0, 50.0, 51.0, 90.0, 91.0, 110.0, 111.0, 130.0, 131.0,
        ]
        .map(hr_score)
        .to_vec();
        assert_eq!(hr, [3, 1, 1, 0, 0, 1, 1, 2, 2, 3]);
        let temp: Vec<u8> = [35.0, 35.1, 36.0, 36.1, 38.0, 38.1, 39.0, 39.1]
            .map(temp_score)
            .to_vec();
        assert_eq!(temp, [3, 1, 1, 0, 0, 1, 1, 2]);
        let s1: Vec<u8> = [91.0, 92.0, 93.0, 94.0, 95.0, 96.0]
            .map(|v| spo2_score(v, Spo2Scale::One, Oxygen::O2))
            .to_vec();
        assert_eq!(s1, [3, 2, 2, 1, 1, 0]);
        let s2_o2: Vec<u8> = [
            83.0, 84.0, 85.0, 86.0, 87.0, 88.0, 92.0, 93.0, 94.0, 95.0, 96.0, 97.0,
        ]
        .map(|v| spo2_score(v, Spo2Scale::Two, Oxygen::O2))
        .to_vec();
        assert_eq!(s2_o2, [3, 2, 2, 1, 1, 0, 0, 1, 1, 2, 2, 3]);
        assert_eq!(spo2_score(99.0, Spo2Scale::Two, Oxygen::Air), 0);
    }

    #[test]
    fn chart_two_bands() {
        assert_eq!(normal().score().total, 0);
        assert_eq!(normal().score().risk, Risk::Low);
        let confused = News2Input {
            consciousness: Acvpu::Confusion,
            ..normal()
        };
        assert_eq!(confused.score().risk, Risk::LowMedium);
        let five = News2Input {
            consciousness: Acvpu::Voice,
            oxygen: Oxygen::O2,
            ..normal()
        };
        assert_eq!((five.score().total, five.score().risk), (5, Risk::Medium));
        let seven = News2Input {
            hr: 135.0,
            rr: 26.0,
            temp: 39.5,
            ..normal()
        };
        assert_eq!((seven.score().total, seven.score().risk), (8, Risk::High));
    }
}
