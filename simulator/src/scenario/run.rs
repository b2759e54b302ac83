//! The offline generator: a scenario's readings in simulated time.
//!
//! Each patient has a resting physiology (a [`Profile`]): per-patient
//! baselines drawn from the profile's ranges, and a latent sympathetic tone
//! (an AR(1) process with a time constant of minutes, softly bounded) that
//! moves heart rate, breathing and blood pressure together and saturation a
//! little the other way, plus measurement noise and a slow daily swing of
//! temperature. Deteriorations add their effect on top, scaled by their
//! course; a disconnect removes readings; an artefact replaces them for a
//! second or three.
//!
//! Each patient draws from its own random streams (one for the physiology,
//! one per artefact event), so a patient's underlying vitals do not change
//! when artefacts are added to the script, and the same seed always gives
//! the same readings.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use wardflow_model::{DeviceId, Metric, PatientId, Quality};

use super::{Artefacts, Course, Effect, EventKind, PatientScript, Profile, Scenario, splitmix64};
use crate::physiology::MONITOR_METRICS;

/// One reading of a scenario run.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioReading {
    /// The patient's place in [`Scenario::patients`].
    pub patient_index: usize,
    pub patient: PatientId,
    pub device: DeviceId,
    /// Simulated time since the start of the scenario (whole seconds).
    pub offset: Duration,
    pub metric: Metric,
    /// In the metric's canonical unit.
    pub value: f64,
    /// Empty, except during artefacts of an `artefacts` event with
    /// `flagged = true` (QUESTIONABLE).
    pub quality: Quality,
}

/// Ground truth: a scripted event of one patient.
#[derive(Debug, Clone, PartialEq)]
pub struct EventOnset {
    /// The patient's place in [`Scenario::patients`].
    pub patient_index: usize,
    pub patient: PatientId,
    pub device: DeviceId,
    pub kind: EventKind,
    /// Since the start of the scenario.
    pub onset: Duration,
    /// When its effect is over, since the start of the scenario; `None` if it
    /// lasts to the end.
    pub end: Option<Duration>,
}

/// Ground truth: one motion artefact as it was generated.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtefactInterval {
    /// The patient's place in [`Scenario::patients`].
    pub patient_index: usize,
    pub patient: PatientId,
    /// Offset of the first artefact reading.
    pub start: Duration,
    /// Offset just after the last artefact reading (readings at `start`,
    /// `start + 1s`, ... up to, not including, `end`).
    pub end: Duration,
    /// The metrics that read wrong: `spo2`, `hr` or both.
    pub metrics: Vec<Metric>,
}

/// A scenario being played: readings at 1 Hz for each patient and monitor
/// metric, in simulated time, with no clock and no network.
///
/// ```
/// use std::path::Path;
/// use std::time::Duration;
/// use wardflow_simulator::scenario::{Scenario, ScenarioRun};
///
/// let scenario = Scenario::parse(r#"
/// name = "example"
/// duration = "10m"
/// [[patients]]
/// id = "pt-1"
/// [[patients.events]]
/// kind = "tachycardia"
/// onset = "60s"
/// "#, Path::new("example.toml")).unwrap();
/// let mut run = ScenarioRun::new(&scenario);
/// let mut readings = Vec::new();
/// run.step(Duration::from_secs(300), &mut readings); // the first five minutes
/// assert_eq!(readings.len(), 300 * 7);
/// assert_eq!(run.events()[0].onset, Duration::from_secs(60));
/// ```
pub struct ScenarioRun {
    patients: Vec<PatientRun>,
    events: Vec<EventOnset>,
    duration: Duration,
    next_tick: u64,
}

impl ScenarioRun {
    /// Starts a run at offset zero.
    pub fn new(scenario: &Scenario) -> ScenarioRun {
        let patients: Vec<PatientRun> = scenario
            .patients
            .iter()
            .enumerate()
            .map(|(i, p)| PatientRun::new(i, p))
            .collect();
        let events = scenario
            .patients
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.events.iter().map(move |e| EventOnset {
                    patient_index: i,
                    patient: p.id.clone(),
                    device: p.device.clone(),
                    kind: e.kind(),
                    onset: e.onset,
                    end: e.end(),
                })
            })
            .collect();
        ScenarioRun {
            patients,
            events,
            duration: scenario.duration,
            next_tick: 0,
        }
    }

    /// The scenario's duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The offset of the next reading `step` will produce.
    pub fn position(&self) -> Duration {
        Duration::from_secs(self.next_tick)
    }

    /// Appends to `out` every reading with an offset before `until` not
    /// produced yet: for each second, each patient in order, each monitor
    /// metric in order (hr, spo2, rr, sbp, dbp, map, temp), less the ones a
    /// disconnect silences. Runs may go on past the scenario's duration:
    /// events keep their last state.
    pub fn step(&mut self, until: Duration, out: &mut Vec<ScenarioReading>) {
        let end = ticks_before(until);
        while self.next_tick < end {
            for p in &mut self.patients {
                p.tick(self.next_tick, out);
            }
            self.next_tick += 1;
        }
        for p in &mut self.patients {
            p.next_tick = p.next_tick.max(end);
        }
    }

    /// Every scripted event, patient by patient in file order.
    pub fn events(&self) -> &[EventOnset] {
        &self.events
    }

    /// The motion artefacts generated so far, by start, then patient.
    pub fn artefacts(&self) -> Vec<ArtefactInterval> {
        let mut all: Vec<ArtefactInterval> = self
            .patients
            .iter()
            .flat_map(|p| p.recorded.iter().cloned())
            .collect();
        all.sort_by_key(|a| (a.start, a.patient_index));
        all
    }

    /// Splits the run into one generator per patient (for publishing each
    /// patient from its own device task).
    pub(crate) fn into_patients(self) -> Vec<PatientRun> {
        self.patients
    }
}

/// Readings are due at whole seconds; this many come before `until`.
fn ticks_before(until: Duration) -> u64 {
    let s = until.as_secs();
    if until.subsec_nanos() > 0 { s + 1 } else { s }
}

/// One patient's generator.
pub(crate) struct PatientRun {
    index: usize,
    patient: PatientId,
    device: DeviceId,
    body: Body,
    deteriorations: Vec<Deterioration>,
    disconnects: Vec<Disconnect>,
    artefacts: Vec<ArtefactSource>,
    recorded: Vec<ArtefactInterval>,
    next_tick: u64,
}

/// Indices into a patient's vital vector.
const HR: usize = 0;
const SPO2: usize = 1;
const RR: usize = 2;
const SBP: usize = 3;
const DBP: usize = 4;
const MAP: usize = 5;
const TEMP: usize = 6;

struct Deterioration {
    onset: f64,
    course: Course,
    /// Change of each vital at full effect (MAP unused: it follows).
    delta: [f64; 7],
    /// The stretch of the ramp over which each vital changes, as fractions.
    within: [(f64, f64); 7],
}

/// Every vital changes over the whole ramp.
const WHOLE_RAMP: [(f64, f64); 7] = [(0.0, 1.0); 7];

/// Sepsis: fever and tachycardia lead, tachypnoea follows, pressure and
/// saturation fall last (hr, spo2, rr, sbp, dbp, map, temp).
const SEPSIS_STAGES: [(f64, f64); 7] = [
    (0.1, 0.7),
    (0.4, 1.0),
    (0.2, 0.8),
    (0.35, 1.0),
    (0.35, 1.0),
    (0.0, 1.0),
    (0.0, 0.6),
];

struct Disconnect {
    start: Duration,
    end: Duration,
    silenced: [bool; 7],
}

impl PatientRun {
    fn new(index: usize, script: &PatientScript) -> PatientRun {
        let body = Body::new(script.profile, splitmix64(script.seed));
        let base = body.base;
        let mut deteriorations = Vec::new();
        let mut disconnects = Vec::new();
        let mut artefacts = Vec::new();
        for (j, event) in script.events.iter().enumerate() {
            let onset = event.onset.as_secs_f64();
            let mut delta = [0.0; 7];
            match &event.effect {
                Effect::Desaturation {
                    course,
                    spo2,
                    hr_rise,
                    rr_rise,
                } => {
                    delta[SPO2] = spo2 - base[SPO2];
                    delta[HR] = *hr_rise;
                    delta[RR] = *rr_rise;
                    deteriorations.push(Deterioration {
                        onset,
                        course: *course,
                        delta,
                        within: WHOLE_RAMP,
                    });
                }
                Effect::Tachycardia { course, hr } => {
                    delta[HR] = hr - base[HR];
                    deteriorations.push(Deterioration {
                        onset,
                        course: *course,
                        delta,
                        within: WHOLE_RAMP,
                    });
                }
                Effect::Hypotension {
                    course,
                    sbp,
                    dbp,
                    hr_rise,
                } => {
                    delta[SBP] = sbp - base[SBP];
                    delta[DBP] = dbp.unwrap_or(base[DBP] * sbp / base[SBP]) - base[DBP];
                    delta[HR] = *hr_rise;
                    deteriorations.push(Deterioration {
                        onset,
                        course: *course,
                        delta,
                        within: WHOLE_RAMP,
                    });
                }
                Effect::Sepsis {
                    course,
                    temp,
                    hr,
                    rr,
                    sbp,
                    spo2,
                } => {
                    delta[TEMP] = temp - base[TEMP];
                    delta[HR] = hr - base[HR];
                    delta[RR] = rr - base[RR];
                    delta[SBP] = sbp - base[SBP];
                    delta[DBP] = base[DBP] * sbp / base[SBP] - base[DBP];
                    delta[SPO2] = spo2 - base[SPO2];
                    deteriorations.push(Deterioration {
                        onset,
                        course: *course,
                        delta,
                        within: SEPSIS_STAGES,
                    });
                }
                Effect::Disconnect { duration, metrics } => {
                    let mut silenced = [false; 7];
                    for (k, m) in MONITOR_METRICS.iter().enumerate() {
                        silenced[k] = metrics.contains(m);
                    }
                    disconnects.push(Disconnect {
                        start: event.onset,
                        end: event.onset + *duration,
                        silenced,
                    });
                }
                Effect::Artefacts(a) => artefacts.push(ArtefactSource::new(
                    a.clone(),
                    event.onset,
                    splitmix64(script.seed ^ splitmix64(1_000 + j as u64)),
                )),
            }
        }
        PatientRun {
            index,
            patient: script.id.clone(),
            device: script.device.clone(),
            body,
            deteriorations,
            disconnects,
            artefacts,
            recorded: Vec::new(),
            next_tick: 0,
        }
    }

    /// The patient's device.
    pub(crate) fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The offset of the next reading `step` will produce.
    pub(crate) fn position(&self) -> Duration {
        Duration::from_secs(self.next_tick)
    }

    /// The artefacts generated so far.
    pub(crate) fn artefacts(&self) -> &[ArtefactInterval] {
        &self.recorded
    }

    /// Appends every reading with an offset before `until` not produced yet.
    pub(crate) fn step(&mut self, until: Duration, out: &mut Vec<ScenarioReading>) {
        let end = ticks_before(until);
        while self.next_tick < end {
            self.tick(self.next_tick, out);
            self.next_tick += 1;
        }
    }

    /// The readings at second `k`.
    fn tick(&mut self, k: u64, out: &mut Vec<ScenarioReading>) {
        let t = k as f64;
        let offset = Duration::from_secs(k);
        let mut v = self.body.sample(t);
        for d in &self.deteriorations {
            let since = t - d.onset;
            if since < 0.0 {
                continue;
            }
            for ((x, dx), (from, to)) in v.iter_mut().zip(d.delta).zip(d.within) {
                if dx != 0.0 {
                    *x += d.course.level_within(since, from, to) * dx;
                }
            }
        }
        let mut v = finish(v);
        let mut quality = [Quality::default(); 7];
        for a in &mut self.artefacts {
            if let Some(hit) = a.at(k, self.index, &self.patient, &mut self.recorded) {
                for (i, value) in [(SPO2, hit.spo2), (HR, hit.hr)] {
                    if let Some(value) = value {
                        v[i] = value.round();
                        if hit.flagged {
                            quality[i] = Quality::QUESTIONABLE;
                        }
                    }
                }
            }
        }
        for (i, metric) in MONITOR_METRICS.into_iter().enumerate() {
            if self
                .disconnects
                .iter()
                .any(|d| d.silenced[i] && d.start <= offset && offset < d.end)
            {
                continue;
            }
            out.push(ScenarioReading {
                patient_index: self.index,
                patient: self.patient.clone(),
                device: self.device.clone(),
                offset,
                metric,
                value: v[i],
                quality: quality[i],
            });
        }
    }
}

/// Keeps the vitals physiologically consistent and rounds them as a monitor
/// displays them.
fn finish(mut v: [f64; 7]) -> [f64; 7] {
    v[HR] = v[HR].clamp(20.0, 250.0).round();
    v[SPO2] = v[SPO2].clamp(50.0, 100.0).round();
    v[RR] = v[RR].clamp(4.0, 60.0).round();
    v[SBP] = v[SBP].clamp(40.0, 260.0).round();
    v[DBP] = v[DBP].clamp(20.0, v[SBP] - 10.0).round();
    // Mean arterial pressure: diastolic plus a third of the pulse pressure.
    v[MAP] = (v[DBP] + (v[SBP] - v[DBP]) / 3.0).round();
    v[TEMP] = (v[TEMP].clamp(33.0, 43.0) * 10.0).round() / 10.0;
    v
}

/// How one vital rests: its baseline range, how strongly the tone moves it,
/// and its measurement noise (standard deviation).
#[derive(Clone, Copy)]
struct Vital {
    lo: f64,
    hi: f64,
    gain: f64,
    noise: f64,
}

struct ProfileParams {
    /// Time constant of the tone, seconds.
    tau: f64,
    /// The tone is softly bounded to ±cap standard deviations (tanh), so
    /// that a resting patient never strays into alarm territory.
    cap: f64,
    vitals: [Vital; 7],
    /// Amplitude of the daily swing of temperature, °C.
    temp_swing: f64,
}

fn params(profile: Profile) -> ProfileParams {
    let v = |lo, hi, gain, noise| Vital {
        lo,
        hi,
        gain,
        noise,
    };
    // Order: hr, spo2, rr, sbp, dbp, map (unused: derived), temp. The ranges
    // sit inside the NEWS2 zero-score bands (RCP 2017, Chart 1: RR 12-20,
    // SpO2 >= 96, SBP 111-219, pulse 51-90, temperature 36.1-38.0).
    match profile {
        Profile::Stable => ProfileParams {
            tau: 300.0,
            cap: 2.5,
            vitals: [
                v(62.0, 80.0, 5.0, 1.2),
                v(97.0, 99.0, 0.5, 0.5),
                v(14.0, 16.0, 1.0, 0.6),
                v(118.0, 135.0, 6.0, 2.0),
                v(68.0, 80.0, 3.5, 1.5),
                v(0.0, 0.0, 0.0, 0.0),
                v(36.6, 37.1, 0.0, 0.04),
            ],
            temp_swing: 0.2,
        },
        Profile::Labile => ProfileParams {
            tau: 120.0,
            cap: 2.5,
            vitals: [
                v(64.0, 78.0, 8.0, 2.0),
                v(97.0, 98.5, 0.8, 0.7),
                v(14.0, 17.0, 1.8, 0.8),
                v(118.0, 135.0, 8.0, 3.0),
                v(66.0, 80.0, 6.0, 2.0),
                v(0.0, 0.0, 0.0, 0.0),
                v(36.6, 37.1, 0.0, 0.05),
            ],
            temp_swing: 0.3,
        },
    }
}

/// A patient's resting physiology.
struct Body {
    rng: SmallRng,
    params: ProfileParams,
    /// Baseline of each vital (MAP unused).
    base: [f64; 7],
    /// Latent tone before bounding, roughly standard normal.
    tone: f64,
    /// AR(1) coefficients for one-second steps.
    keep: f64,
    innovate: f64,
    temp_phase: f64,
}

impl Body {
    fn new(profile: Profile, seed: u64) -> Body {
        let params = params(profile);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut base = [0.0; 7];
        for (b, v) in base.iter_mut().zip(params.vitals) {
            *b = v.lo + (v.hi - v.lo) * rng.random::<f64>();
        }
        let keep = (-1.0 / params.tau).exp();
        let tone: f64 = StandardNormal.sample(&mut rng);
        let temp_phase = std::f64::consts::TAU * rng.random::<f64>();
        Body {
            rng,
            base,
            tone,
            keep,
            innovate: (1.0 - keep * keep).sqrt(),
            temp_phase,
            params,
        }
    }

    fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.rng)
    }

    /// The vitals at second `t` (advances the tone by one second; MAP is
    /// left for `finish`).
    fn sample(&mut self, t: f64) -> [f64; 7] {
        self.tone = self.keep * self.tone + self.innovate * self.normal();
        let cap = self.params.cap;
        let tone = cap * (self.tone / cap).tanh();
        let p = self.params.vitals;
        let mut v = [0.0; 7];
        v[HR] = self.base[HR] + p[HR].gain * tone;
        v[SPO2] = self.base[SPO2] - p[SPO2].gain * tone.max(0.0);
        v[RR] = self.base[RR] + p[RR].gain * tone;
        v[SBP] = self.base[SBP] + p[SBP].gain * tone;
        v[DBP] = self.base[DBP] + p[DBP].gain * tone;
        let day = std::f64::consts::TAU * t / 86_400.0;
        v[TEMP] = self.base[TEMP] + self.params.temp_swing * (day + self.temp_phase).sin();
        for i in [HR, SPO2, RR, SBP, DBP, TEMP] {
            v[i] += p[i].noise * self.normal();
        }
        v[SPO2] = v[SPO2].min(100.0);
        v
    }
}

/// The readings an artefact replaces at one second.
struct Hit {
    spo2: Option<f64>,
    hr: Option<f64>,
    flagged: bool,
}

struct Active {
    end: u64,
    spo2: Option<f64>,
    hr: Option<f64>,
}

/// Generates the artefacts of one `artefacts` event, lazily, second by second.
struct ArtefactSource {
    config: Artefacts,
    /// The window artefacts may fall in, whole seconds.
    from: u64,
    until: Option<u64>,
    rng: SmallRng,
    next_start: u64,
    active: Option<Active>,
}

/// Artefacts start at least this long after the previous one ended, so
/// that two never merge into one longer excursion.
const MIN_GAP_S: u64 = 10;

impl ArtefactSource {
    fn new(config: Artefacts, onset: Duration, seed: u64) -> ArtefactSource {
        let from = ticks_before(onset);
        let until = config.duration.map(|d| ticks_before(onset + d));
        let mut source = ArtefactSource {
            config,
            from,
            until,
            rng: SmallRng::seed_from_u64(seed),
            next_start: from,
            active: None,
        };
        source.next_start = from + source.gap();
        source
    }

    /// Seconds from one artefact's start to the next: exponential with mean
    /// `every`.
    fn gap(&mut self) -> u64 {
        let u: f64 = self.rng.random();
        (-(1.0 - u).ln() * self.config.every.as_secs_f64()).round() as u64
    }

    fn uniform(&mut self, range: [f64; 2]) -> f64 {
        range[0] + (range[1] - range[0]) * self.rng.random::<f64>()
    }

    fn at(
        &mut self,
        k: u64,
        patient_index: usize,
        patient: &PatientId,
        recorded: &mut Vec<ArtefactInterval>,
    ) -> Option<Hit> {
        if self.active.as_ref().is_some_and(|a| k >= a.end) {
            self.active = None;
        }
        if self.active.is_none() && k >= self.next_start && k >= self.from {
            let (min, max) = (
                self.config.min_length.as_secs(),
                self.config.max_length.as_secs(),
            );
            let len = self.rng.random_range(min..=max);
            if self.until.is_none_or(|u| k + len <= u) {
                let (spo2, hr) = match self.config.metrics.as_slice() {
                    [Metric::Spo2] => (true, false),
                    [Metric::Hr] => (false, true),
                    _ => match self.rng.random_range(0..3u8) {
                        0 => (true, false),
                        1 => (false, true),
                        _ => (true, true),
                    },
                };
                let (spo2_range, hr_range) = (self.config.spo2_range, self.config.hr_range);
                let spo2 = spo2.then(|| self.uniform(spo2_range));
                let hr = hr.then(|| self.uniform(hr_range));
                let mut metrics = Vec::with_capacity(2);
                if hr.is_some() {
                    metrics.push(Metric::Hr);
                }
                if spo2.is_some() {
                    metrics.push(Metric::Spo2);
                }
                recorded.push(ArtefactInterval {
                    patient_index,
                    patient: patient.clone(),
                    start: Duration::from_secs(k),
                    end: Duration::from_secs(k + len),
                    metrics,
                });
                self.active = Some(Active {
                    end: k + len,
                    spo2,
                    hr,
                });
            }
            self.next_start = k + (len + MIN_GAP_S).max(self.gap());
        }
        let (spo2, hr) = match &self.active {
            Some(a) => (a.spo2, a.hr),
            None => return None,
        };
        // A little second-to-second jitter, kept inside the configured ranges.
        let (s, h) = (self.config.spo2_range, self.config.hr_range);
        let spo2 = spo2.map(|x| (x + 2.0 * self.rng.random::<f64>() - 1.0).clamp(s[0], s[1]));
        let hr = hr.map(|x| (x + 6.0 * self.rng.random::<f64>() - 3.0).clamp(h[0], h[1]));
        Some(Hit {
            spo2,
            hr,
            flagged: self.config.flagged,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::scenario::tests::shipped;

    /// Clinical alarm limits a resting patient must not cross.
    fn alarming(metric: Metric, v: f64) -> bool {
        match metric {
            Metric::Spo2 => v < 90.0,
            Metric::Hr => !(45.0..=130.0).contains(&v),
            Metric::Sbp => !(90.0..=180.0).contains(&v),
            Metric::Rr => !(8.0..=28.0).contains(&v),
            Metric::Temp => v > 38.5,
            _ => false,
        }
    }

    /// NEWS2 score of one parameter (RCP 2017, Chart 1; SpO2 scale 1).
    fn news2_part(metric: Metric, v: f64) -> u32 {
        let bands: &[(f64, u32)] = match metric {
            // Upper bounds of each band, inclusive.
            Metric::Rr => &[(8.0, 3), (11.0, 1), (20.0, 0), (24.0, 2), (f64::MAX, 3)],
            Metric::Spo2 => &[(91.0, 3), (93.0, 2), (95.0, 1), (f64::MAX, 0)],
            Metric::Sbp => &[(90.0, 3), (100.0, 2), (110.0, 1), (219.0, 0), (f64::MAX, 3)],
            Metric::Hr => &[
                (40.0, 3),
                (50.0, 1),
                (90.0, 0),
                (110.0, 1),
                (130.0, 2),
                (f64::MAX, 3),
            ],
            Metric::Temp => &[(35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1), (f64::MAX, 2)],
            _ => return 0,
        };
        bands.iter().find(|(hi, _)| v <= *hi).map_or(0, |b| b.1)
    }

    /// NEWS2 total (patient alert, on air) for one second's readings.
    fn news2(second: &[ScenarioReading]) -> u32 {
        second.iter().map(|r| news2_part(r.metric, r.value)).sum()
    }

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn generate(s: &Scenario) -> (Vec<ScenarioReading>, ScenarioRun) {
        let mut run = ScenarioRun::new(s);
        let mut out = Vec::new();
        run.step(s.duration, &mut out);
        (out, run)
    }

    /// Values of one metric of one patient, by second.
    fn series(readings: &[ScenarioReading], patient: usize, metric: Metric) -> Vec<(u64, f64)> {
        readings
            .iter()
            .filter(|r| r.patient_index == patient && r.metric == metric)
            .map(|r| (r.offset.as_secs(), r.value))
            .collect()
    }

    /// The longest run of consecutive seconds in which `pred` holds.
    fn longest(series: &[(u64, f64)], pred: impl Fn(f64) -> bool) -> u64 {
        let (mut best, mut run, mut last) = (0, 0, None);
        for &(t, v) in series {
            if pred(v) {
                run = if last == Some(t.wrapping_sub(1)) {
                    run + 1
                } else {
                    1
                };
                last = Some(t);
                best = best.max(run);
            } else {
                last = None;
            }
        }
        best
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    }

    /// Median of a metric over [from, to) seconds.
    fn median_in(s: &[(u64, f64)], from: u64, to: u64) -> f64 {
        median(
            s.iter()
                .filter(|(t, _)| (from..to).contains(t))
                .map(|p| p.1)
                .collect(),
        )
    }

    fn onset_and_ramp(s: &Scenario, patient: usize, kind: EventKind) -> (u64, u64) {
        let e = s.patients[patient]
            .events
            .iter()
            .find(|e| e.kind() == kind)
            .unwrap();
        let ramp = match &e.effect {
            Effect::Desaturation { course, .. }
            | Effect::Tachycardia { course, .. }
            | Effect::Hypotension { course, .. }
            | Effect::Sepsis { course, .. } => course.ramp,
            _ => Duration::ZERO,
        };
        (e.onset.as_secs(), (e.onset + ramp).as_secs())
    }

    fn resting(profile: &str, patients: usize, hours: u32) -> Scenario {
        let mut text = format!("name = \"rest\"\nduration = \"{hours}h\"\nseed = 42\n");
        for i in 0..patients {
            text.push_str(&format!(
                "[[patients]]\nid = \"p{i}\"\nprofile = \"{profile}\"\n"
            ));
        }
        scenario(&text)
    }

    #[test]
    fn resting_patients_stay_clear_of_alarm_limits_for_a_day() {
        // 24 patient-hours of each profile.
        for profile in ["stable", "labile"] {
            let s = resting(profile, 8, 3);
            let (readings, run) = generate(&s);
            assert_eq!(readings.len(), 8 * 3 * 3600 * 7);
            assert!(run.artefacts().is_empty() && run.events().is_empty());
            let mut news2_parts = [0u64; 4];
            for p in 0..8 {
                for metric in MONITOR_METRICS {
                    let s = series(&readings, p, metric);
                    let run = longest(&s, |v| alarming(metric, v));
                    assert!(
                        run <= 3,
                        "{profile} patient {p}: {metric} alarming for {run} s"
                    );
                    for (_, v) in &s {
                        news2_parts[news2_part(metric, *v) as usize] += 1;
                    }
                }
            }
            let total: u64 = news2_parts.iter().sum();
            let share = |n: u64| n as f64 / total as f64;
            assert!(
                readings.iter().all(|r| r.quality == Quality::default()),
                "no flags"
            );
            match profile {
                "stable" => {
                    assert_eq!(news2_parts[3], 0, "{news2_parts:?}");
                    assert!(share(news2_parts[2]) < 0.002, "{news2_parts:?}");
                    assert!(share(news2_parts[0]) > 0.97, "{news2_parts:?}");
                }
                _ => {
                    assert!(share(news2_parts[3]) < 0.0005, "{news2_parts:?}");
                    assert!(share(news2_parts[2]) < 0.02, "{news2_parts:?}");
                }
            }
            // Every reading is plausible for its metric.
            for r in &readings {
                assert!(r.metric.plausible_range().contains(r.value), "{r:?}");
            }
        }
    }

    #[test]
    fn runs_repeat_for_a_seed_and_steps_compose() {
        let s = &shipped()
            .into_iter()
            .find(|(p, _)| p.ends_with("artefacts.toml"))
            .unwrap()
            .1;
        let (a, run_a) = generate(s);
        let mut run_b = ScenarioRun::new(s);
        let mut b = Vec::new();
        // Uneven steps, including fractions of a second, give the same stream.
        let mut t = Duration::ZERO;
        while t < s.duration {
            t = (t + Duration::from_millis(2_345)).min(s.duration);
            run_b.step(t, &mut b);
        }
        assert_eq!(a, b);
        assert_eq!(run_a.artefacts(), run_b.artefacts());
        assert_eq!(run_b.position(), s.duration);
        let mut other = s.clone();
        other.patients[0].seed ^= 1;
        let (c, _) = generate(&other);
        assert_ne!(
            series(&a, 0, Metric::Hr),
            series(&c, 0, Metric::Hr),
            "another seed, other vitals"
        );
        assert_eq!(
            series(&a, 1, Metric::Hr),
            series(&c, 1, Metric::Hr),
            "the other patients are untouched"
        );
    }

    #[test]
    fn desaturation_drives_spo2_below_88_with_hr_and_rr_up() {
        let s = scenario(
            r#"
name = "d"
duration = "15m"
[[patients]]
id = "p"
[[patients.events]]
kind = "desaturation"
onset = "60s"
ramp = "2m"
spo2 = 82
"#,
        );
        let (r, run) = generate(&s);
        let spo2 = series(&r, 0, Metric::Spo2);
        let (onset, full) = onset_and_ramp(&s, 0, EventKind::Desaturation);
        assert!(spo2.iter().take(onset as usize).all(|p| p.1 >= 94.0));
        let after: Vec<(u64, f64)> = spo2.iter().filter(|p| p.0 >= full).copied().collect();
        assert!(longest(&after, |v| v < 88.0) >= 30);
        assert!(median_in(&spo2, full, 900) <= 83.0);
        for metric in [Metric::Hr, Metric::Rr] {
            let m = series(&r, 0, metric);
            assert!(
                median_in(&m, full, 900) > median_in(&m, 0, onset) + 3.0,
                "{metric} rises"
            );
        }
        assert_eq!(run.events()[0].onset, Duration::from_secs(60));
    }

    #[test]
    fn each_shipped_deterioration_crosses_its_alarm_limit_after_its_ramp() {
        let mut checked = 0;
        for (path, s) in shipped() {
            let (r, run) = generate(&s);
            for e in run.events() {
                let (onset, full) = onset_and_ramp(&s, e.patient_index, e.kind);
                let end = e.end.map_or(s.duration.as_secs(), |d| d.as_secs());
                let p = e.patient_index;
                let hold = |metric| -> Vec<(u64, f64)> {
                    series(&r, p, metric)
                        .into_iter()
                        .filter(|(t, _)| (full..end).contains(t))
                        .collect()
                };
                let what = format!("{} patient {p} {}", path.display(), e.kind);
                match e.kind {
                    EventKind::Desaturation => {
                        assert!(longest(&hold(Metric::Spo2), |v| v < 88.0) >= 30, "{what}")
                    }
                    EventKind::Tachycardia => {
                        assert!(longest(&hold(Metric::Hr), |v| v > 140.0) >= 30, "{what}")
                    }
                    EventKind::Hypotension => {
                        assert!(longest(&hold(Metric::Sbp), |v| v < 85.0) >= 30, "{what}");
                        let hr = series(&r, p, Metric::Hr);
                        assert!(
                            median_in(&hr, full, end) > median_in(&hr, 0, onset) + 10.0,
                            "{what}: compensatory tachycardia"
                        );
                    }
                    EventKind::Sepsis => {
                        // Late in the run.
                        let late = s.duration.as_secs() - 600;
                        let med = |m| median_in(&series(&r, p, m), late, s.duration.as_secs());
                        assert!(med(Metric::Temp) > 39.0, "{what}");
                        assert!(med(Metric::Hr) > 110.0, "{what}");
                        assert!(med(Metric::Rr) > 24.0, "{what}");
                        assert!(med(Metric::Sbp) < 100.0, "{what}");
                    }
                    _ => continue,
                }
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} deteriorations checked");
    }

    #[test]
    fn sepsis_news2_climbs_from_zero_through_five_to_seven() {
        let (_, s) = shipped()
            .into_iter()
            .find(|(p, _)| p.ends_with("sepsis.toml"))
            .unwrap();
        let (r, _) = generate(&s);
        let (onset, full) = onset_and_ramp(&s, 0, EventKind::Sepsis);
        // NEWS2 per second, then its median per five minutes.
        let per_second: Vec<u32> = r
            .iter()
            .filter(|x| x.patient_index == 0)
            .collect::<Vec<_>>()
            .chunk_by(|a, b| a.offset == b.offset)
            .map(|second| news2(&second.iter().map(|x| (*x).clone()).collect::<Vec<_>>()))
            .collect();
        let per_5min: Vec<f64> = per_second
            .chunks(300)
            .map(|c| median(c.iter().map(|&x| x as f64).collect()))
            .collect();
        assert!(per_5min[0] <= 1.0, "{per_5min:?}");
        assert!(
            per_second[..onset as usize].iter().all(|&x| x <= 3),
            "before onset"
        );
        let first = |at_least: f64| per_5min.iter().position(|&x| x >= at_least);
        let (five, seven) = (first(5.0).unwrap(), first(7.0).unwrap());
        assert!(five < seven, "{per_5min:?}");
        // From 0 to 7+ over tens of minutes, not in a jump.
        assert!(
            (seven * 300) as u64 > onset + 1_800,
            "7+ after at least 30 min: {per_5min:?}"
        );
        assert!(
            (seven * 300) as u64 <= full,
            "7+ within the ramp: {per_5min:?}"
        );
        // The trend never falls back by more than a point on the way up.
        for w in per_5min.windows(2) {
            assert!(w[1] >= w[0] - 1.0, "{per_5min:?}");
        }
        assert!(*per_5min.last().unwrap() >= 9.0, "{per_5min:?}");
    }

    #[test]
    fn disconnect_silences_its_metrics_for_its_window_only() {
        let s = scenario(
            r#"
name = "d"
duration = "5m"
[[patients]]
id = "a"
[[patients.events]]
kind = "disconnect"
onset = "60s"
duration = "90s"
metrics = ["spo2"]
[[patients]]
id = "b"
[[patients.events]]
kind = "disconnect"
onset = "30s"
duration = "10s"
"#,
        );
        let (r, _) = generate(&s);
        let spo2 = series(&r, 0, Metric::Spo2);
        assert!(spo2.iter().all(|(t, _)| !(60..150).contains(t)));
        assert_eq!(spo2.len(), 300 - 90);
        assert!(spo2.iter().any(|(t, _)| *t == 59) && spo2.iter().any(|(t, _)| *t == 150));
        assert_eq!(series(&r, 0, Metric::Hr).len(), 300, "other metrics go on");
        for metric in MONITOR_METRICS {
            let b = series(&r, 1, metric);
            assert_eq!(b.len(), 290, "{metric}");
            assert!(b.iter().all(|(t, _)| !(30..40).contains(t)));
        }
    }

    #[test]
    fn artefacts_are_brief_recorded_unflagged_and_the_only_excursions() {
        let (path, s) = shipped()
            .into_iter()
            .find(|(p, _)| p.ends_with("artefacts.toml"))
            .unwrap();
        let (r, run) = generate(&s);
        let artefacts = run.artefacts();
        let patient_hours = s.patients.len() as f64 * s.duration.as_secs_f64() / 3600.0;
        assert!(
            artefacts.len() as f64 > patient_hours * 10.0,
            "{}: {} artefacts",
            path.display(),
            artefacts.len()
        );
        let inside = |p: usize, t: u64, m: Metric| {
            artefacts.iter().any(|a| {
                a.patient_index == p
                    && a.metrics.contains(&m)
                    && (a.start.as_secs()..a.end.as_secs()).contains(&t)
            })
        };
        for a in &artefacts {
            let len = (a.end - a.start).as_secs();
            assert!((1..=3).contains(&len), "{a:?}");
            assert!(!a.metrics.is_empty());
        }
        for w in artefacts.windows(2) {
            if w[0].patient_index == w[1].patient_index {
                assert!(w[1].start >= w[0].end + Duration::from_secs(MIN_GAP_S));
            }
        }
        assert!(
            r.iter().all(|x| x.quality == Quality::default()),
            "unflagged"
        );
        for x in &r {
            let hit = inside(x.patient_index, x.offset.as_secs(), x.metric);
            match x.metric {
                Metric::Spo2 if hit => assert!((70.0..=85.0).contains(&x.value), "{x:?}"),
                Metric::Hr if hit => assert!((140.0..=170.0).contains(&x.value), "{x:?}"),
                m => assert!(!alarming(m, x.value), "outside artefacts: {x:?}"),
            }
        }
        // Both kinds of hit occur.
        for m in [Metric::Spo2, Metric::Hr] {
            assert!(artefacts.iter().any(|a| a.metrics == [m]));
        }
        assert!(artefacts.iter().any(|a| a.metrics.len() == 2));
    }

    #[test]
    fn flagged_artefacts_carry_the_questionable_flag_and_windows_bound_them() {
        let s = scenario(
            r#"
name = "f"
duration = "30m"
[[patients]]
id = "p"
[[patients.events]]
kind = "artefacts"
onset = "5m"
duration = "10m"
every = "30s"
metrics = ["spo2"]
flagged = true
"#,
        );
        let (r, run) = generate(&s);
        let artefacts = run.artefacts();
        assert!(artefacts.len() >= 5, "{artefacts:?}");
        for a in &artefacts {
            assert!(a.start >= Duration::from_secs(300) && a.end <= Duration::from_secs(900));
            assert_eq!(a.metrics, [Metric::Spo2]);
        }
        let flagged: Vec<&ScenarioReading> = r
            .iter()
            .filter(|x| x.quality == Quality::QUESTIONABLE)
            .collect();
        let seconds: u64 = artefacts.iter().map(|a| (a.end - a.start).as_secs()).sum();
        assert_eq!(flagged.len() as u64, seconds);
        assert!(flagged.iter().all(|x| x.metric == Metric::Spo2));
    }

    #[test]
    fn shipped_stable_patients_stay_stable() {
        let (_, s) = shipped()
            .into_iter()
            .find(|(p, _)| p.ends_with("stable.toml"))
            .unwrap();
        let (r, run) = generate(&s);
        assert!(run.events().is_empty() && run.artefacts().is_empty());
        for p in 0..s.patients.len() {
            for metric in MONITOR_METRICS {
                let run = longest(&series(&r, p, metric), |v| alarming(metric, v));
                assert!(run <= 3, "patient {p} {metric}: {run} s");
            }
        }
    }
}
