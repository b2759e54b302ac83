//! Virtual patients: plausible, correlated adult vital signs.
//!
//! Each patient has its own baseline, drawn from adult resting ranges, and
//! a shared latent "sympathetic tone" that moves slowly (an AR(1) process
//! with a time constant of minutes) and pulls heart rate, respiratory rate
//! and blood pressure up together and saturation slightly down, as arousal,
//! pain or fever do. On top come per-metric measurement noise, a slow
//! circadian-like drift of temperature, and occasional motion artefacts:
//! for a few seconds the oximeter reads low and the heart rate jumps, and
//! the readings carry the QUESTIONABLE quality flag, as a real monitor's
//! signal-quality index would mark them.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use wardflow_model::{Metric, Quality};

/// The metrics a bedside monitor reports, in publishing order.
pub const MONITOR_METRICS: [Metric; 7] = [
    Metric::Hr,
    Metric::Spo2,
    Metric::Rr,
    Metric::Sbp,
    Metric::Dbp,
    Metric::Map,
    Metric::Temp,
];

/// One reading of a virtual patient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vital {
    pub metric: Metric,
    pub value: f64,
    pub quality: Quality,
}

/// A virtual patient.
pub struct VirtualPatient {
    rng: SmallRng,
    hr: f64,
    spo2: f64,
    rr: f64,
    sbp: f64,
    dbp: f64,
    temp: f64,
    /// Latent tone, roughly standard normal.
    tone: f64,
    /// Seconds of artefact left.
    artefact: f64,
    artefact_depth: f64,
    elapsed: f64,
}

impl VirtualPatient {
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut pick = |lo: f64, hi: f64| lo + (hi - lo) * rng.random::<f64>();
        let (hr, spo2, rr, sbp, dbp, temp) = (
            pick(58.0, 92.0),
            pick(95.0, 99.0),
            pick(12.0, 18.0),
            pick(108.0, 138.0),
            pick(64.0, 86.0),
            pick(36.4, 37.2),
        );
        Self {
            rng,
            hr,
            spo2,
            rr,
            sbp,
            dbp,
            temp,
            tone: 0.0,
            artefact: 0.0,
            artefact_depth: 0.0,
            elapsed: 0.0,
        }
    }

    fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.rng)
    }

    /// Advances the patient by `dt` seconds and returns one reading of each
    /// monitored metric.
    pub fn step(&mut self, dt: f64) -> [Vital; 7] {
        self.elapsed += dt;
        // AR(1) with a 5-minute time constant: tone_{t+dt} = a·tone + sqrt(1-a²)·ε.
        let a = (-dt / 300.0).exp();
        self.tone = a * self.tone + (1.0 - a * a).sqrt() * self.normal();

        if self.artefact > 0.0 {
            self.artefact -= dt;
        } else if self.rng.random::<f64>() < dt / 600.0 {
            // About one motion artefact per ten minutes, 2-8 s long.
            self.artefact = 2.0 + 6.0 * self.rng.random::<f64>();
            self.artefact_depth = 5.0 + 15.0 * self.rng.random::<f64>();
        }
        let in_artefact = self.artefact > 0.0;

        let t = self.tone;
        let drift = 0.15 * (self.elapsed / 3600.0 * std::f64::consts::TAU / 24.0).sin();
        let mut hr = self.hr + 8.0 * t + 1.5 * self.normal();
        let mut spo2 = (self.spo2 - 0.6 * t.max(0.0) + 0.4 * self.normal()).min(100.0);
        let rr = (self.rr + 2.0 * t + 0.8 * self.normal()).max(4.0);
        let sbp = self.sbp + 7.0 * t + 2.0 * self.normal();
        let dbp = (self.dbp + 4.0 * t + 1.5 * self.normal()).min(sbp - 15.0);
        let map = dbp + (sbp - dbp) / 3.0;
        let temp = self.temp + drift + 0.05 * self.normal();
        let mut quality = Quality::default();
        if in_artefact {
            spo2 -= self.artefact_depth;
            hr += 20.0 * self.normal();
            quality = Quality::QUESTIONABLE;
        }
        let round = |v: f64, step: f64| (v / step).round() * step;
        let ok = Quality::default();
        [
            Vital {
                metric: Metric::Hr,
                value: round(hr.clamp(20.0, 250.0), 1.0),
                quality,
            },
            Vital {
                metric: Metric::Spo2,
                value: round(spo2.clamp(50.0, 100.0), 1.0),
                quality,
            },
            Vital {
                metric: Metric::Rr,
                value: round(rr, 1.0),
                quality: ok,
            },
            Vital {
                metric: Metric::Sbp,
                value: round(sbp, 1.0),
                quality: ok,
            },
            Vital {
                metric: Metric::Dbp,
                value: round(dbp, 1.0),
                quality: ok,
            },
            Vital {
                metric: Metric::Map,
                value: round(map, 1.0),
                quality: ok,
            },
            Vital {
                metric: Metric::Temp,
                value: round(temp, 0.1),
                quality: ok,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_of_vitals_is_plausible_and_correlated() {
        let mut p = VirtualPatient::new(7);
        let (mut hr, mut sbp) = (Vec::new(), Vec::new());
        let mut artefacts = 0;
        for _ in 0..86_400 {
            let v = p.step(1.0);
            for r in v {
                assert!(r.metric.plausible_range().contains(r.value), "{r:?}");
            }
            assert!(v[4].value < v[3].value, "diastolic below systolic");
            if v[0].quality.contains(Quality::QUESTIONABLE) {
                artefacts += 1;
            } else {
                hr.push(v[0].value);
                sbp.push(v[3].value);
            }
        }
        // Heart rate and systolic pressure move together through the tone.
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let (mh, ms) = (mean(&hr), mean(&sbp));
        let cov: f64 = hr.iter().zip(&sbp).map(|(a, b)| (a - mh) * (b - ms)).sum();
        let var = |x: &[f64], m: f64| x.iter().map(|a| (a - m) * (a - m)).sum::<f64>();
        let r = cov / (var(&hr, mh) * var(&sbp, ms)).sqrt();
        assert!(r > 0.5, "correlation {r}");
        // About one artefact of ~5 s every 10 minutes: 144 a day, ~700 s.
        assert!(
            (200..2_000).contains(&artefacts),
            "{artefacts} artefact seconds"
        );
    }

    #[test]
    fn patients_differ_and_seeds_repeat() {
        let a = VirtualPatient::new(1).step(1.0);
        let b = VirtualPatient::new(2).step(1.0);
        let a2 = VirtualPatient::new(1).step(1.0);
        assert_ne!(a, b);
        assert_eq!(a, a2);
    }
}
