//! Differential-privacy mechanisms and the budget they are charged to.
//!
//! Accounting is in zero-concentrated DP (zCDP; Bun & Steinke 2016, "Concentrated Differential
//! Privacy: Simplifications, Extensions, and Lower Bounds"). The unit of privacy differs by use:
//! for the running totals ([`BinaryTree`]) it is one patient's readings in one window (event
//! level, as Chan, Shi & Song 2011 define it); for a study's per-window statistics it is one
//! patient, with the cost of every window composed into the study's [`Accountant`].
//!
//! - Composition: the ρ of successive releases adds up; ρ-zCDP implies (ε, δ)-DP for every δ
//!   with ε = ρ + 2√(ρ ln(1/δ)) (Bun & Steinke, Prop. 1.3), see [`epsilon_of`] and [`rho_for`].
//! - The Gaussian mechanism, noise N(0, σ²) with σ = Δ₂/√(2ρ), is ρ-zCDP (Prop. 1.6).
//! - A pure ε-DP mechanism (here [`dp_quantile`]) is ε²/2-zCDP (Prop. 1.4), see [`pure_epsilon`].
//!
//! Known limitation: noise is sampled in floating point (a ziggurat normal and `f64` weights),
//! not with the exact discrete Gaussian of Canonne, Kamath & Steinke 2020 ("The Discrete
//! Gaussian for Differential Privacy"). Floating-point samplers leak through the low bits of
//! their output (Mironov 2012 shows it for the Laplace mechanism), so the guarantees above hold
//! for the idealised real-valued mechanisms, not bit for bit for this implementation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// ln(1/δ), taken as 0 for δ ≥ 1 (no tail to pay for) and ∞ for δ ≤ 0 (pure DP, which no
/// positive ρ reaches); NaN stays NaN.
fn ln_inv_delta(delta: f64) -> f64 {
    if delta >= 1.0 {
        0.0
    } else if delta <= 0.0 {
        f64::INFINITY
    } else {
        -delta.ln()
    }
}

/// The largest ρ whose (ε, δ) conversion stays within `epsilon`: (√(L+ε) − √L)², L = ln(1/δ),
/// the root of Bun & Steinke's Prop. 1.3 bound. Returns 0.0 for `epsilon` ≤ 0 or NaN and for
/// `delta` ≤ 0 or NaN; never panics.
pub fn rho_for(epsilon: f64, delta: f64) -> f64 {
    if epsilon.is_nan() || epsilon <= 0.0 || delta.is_nan() {
        return 0.0;
    }
    let l = ln_inv_delta(delta);
    // ε / (√(L+ε) + √L) is √(L+ε) − √L without the cancellation when ε ≪ L.
    let root = epsilon / ((l + epsilon).sqrt() + l.sqrt());
    let mut rho = root * root;
    // Rounding can leave ε(ρ) an ulp or two above ε; step down until the budget is never
    // overstated. Terminates: ε(0) = 0 < ε.
    while epsilon_of(rho, delta) > epsilon {
        rho = rho.next_down();
    }
    rho
}

/// ε(ρ, δ) = ρ + 2√(ρ ln(1/δ)), the (ε, δ)-DP guarantee of a ρ-zCDP release (Bun & Steinke,
/// Prop. 1.3). Zero for ρ ≤ 0, ∞ for δ ≤ 0 and ρ > 0.
pub fn epsilon_of(rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    rho + 2.0 * (rho * ln_inv_delta(delta)).sqrt()
}

/// σ of the Gaussian mechanism for L2 sensitivity `l2` at cost `rho`: l2 / √(2ρ) (Bun &
/// Steinke, Prop. 1.6). ∞ for ρ = 0: a free release can carry no signal.
pub fn gaussian_sigma(l2: f64, rho: f64) -> f64 {
    l2.abs() / (2.0 * rho).sqrt()
}

/// The ε of a pure ε-DP mechanism costing `rho` in zCDP: √(2ρ), the inverse of Bun & Steinke's
/// Prop. 1.4 (ε-DP ⇒ ε²/2-zCDP).
pub fn pure_epsilon(rho: f64) -> f64 {
    (2.0 * rho.max(0.0)).sqrt()
}

/// A charge refused because it would take the study past its budget.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("privacy budget spent: {spent_rho:.6} of {total_rho:.6} ρ used, {asked:.6} more asked")]
pub struct Exhausted {
    pub total_rho: f64,
    pub spent_rho: f64,
    pub asked: f64,
}

/// Relative slack on the budget so that charges summing to exactly the total (in real
/// arithmetic) are not refused for float rounding. Spending can exceed the total by at most
/// this fraction.
const BUDGET_TOLERANCE: f64 = 1e-9;

/// A study's budget in ρ (zCDP), with what has been spent by sequential composition. Serialized
/// so the store persists it; `spent_rho` only ever grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accountant {
    pub total_rho: f64,
    pub spent_rho: f64,
    pub charges: u64,
}

impl Accountant {
    /// A fresh budget of `total_rho`, typically `rho_for(ε, δ)` of the study's (ε, δ).
    pub fn new(total_rho: f64) -> Self {
        Self {
            total_rho,
            spent_rho: 0.0,
            charges: 0,
        }
    }

    /// Charges `rho` if it fits (with a relative tolerance of 1e-9 for float rounding, never
    /// more); otherwise `Exhausted` and nothing changes. A negative or NaN `rho` is refused
    /// too: it would refund budget. Every comparison with a NaN is false, so a corrupted state
    /// refuses everything.
    pub fn charge(&mut self, rho: f64) -> Result<(), Exhausted> {
        if !self.can_charge(rho) {
            return Err(Exhausted {
                total_rho: self.total_rho,
                spent_rho: self.spent_rho,
                asked: rho,
            });
        }
        self.spent_rho += rho;
        self.charges += 1;
        Ok(())
    }

    /// Whether `charge(rho)` would succeed.
    pub fn can_charge(&self, rho: f64) -> bool {
        rho >= 0.0 && self.spent_rho + rho <= self.total_rho * (1.0 + BUDGET_TOLERANCE)
    }

    /// The ρ still unspent, never negative.
    pub fn remaining_rho(&self) -> f64 {
        (self.total_rho - self.spent_rho).max(0.0)
    }

    /// The (ε, δ) guarantee of everything charged so far: `epsilon_of(spent_rho, delta)`.
    pub fn spent_epsilon(&self, delta: f64) -> f64 {
        epsilon_of(self.spent_rho, delta)
    }
}

/// The noise source: ChaCha12 (`StdRng`), a CSPRNG seeded from the OS, so released noise cannot
/// be predicted from earlier releases. `seeded` is for tests only.
pub struct Noise {
    rng: StdRng,
}

impl Noise {
    /// A generator seeded from the operating system's entropy source.
    pub fn from_os() -> Self {
        Self {
            rng: StdRng::from_os_rng(),
        }
    }

    /// A reproducible generator. Tests only: seeded noise offers no privacy.
    pub fn seeded(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// One draw of N(0, σ²); `sigma == 0` gives exactly 0. The sign of `sigma` does not matter:
    /// N(0, σ²) is symmetric.
    pub fn gaussian(&mut self, sigma: f64) -> f64 {
        if sigma == 0.0 {
            return 0.0;
        }
        let z: f64 = self.rng.sample(StandardNormal);
        sigma * z
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

/// A DP quantile by the exponential mechanism (Smith 2011, "Privacy-preserving statistical
/// estimation with optimal convergence rates"; as in Gillenwater, Joseph & Kulesza 2021,
/// "Differentially private quantiles", Algorithm 1 for a single quantile).
///
/// The values are clamped to [lo, hi] and sorted; the n+1 intervals between consecutive values
/// (with lo and hi as ends) are scored −|i − q·n| for interval i, which has i values below it.
/// Adding or removing one value moves each score by at most max(q, 1−q) ≤ 1, so picking
/// interval i with probability ∝ width · exp(ε·score/2) and then a uniform point inside it is
/// ε-DP for add/remove of one value. Weights are normalised in log space (log-sum-exp), so
/// large ε or n neither overflows nor underflows to all-zero.
///
/// NaN values are dropped (a per-value, data-independent rule, so neighbouring inputs stay
/// neighbours); `values` is reordered. `q` is clamped to [0, 1] (NaN is read as the median); `epsilon` ≤ 0 or NaN gives a
/// uniform draw over [lo, hi] (0-DP). The result always lies in [lo, hi].
///
/// # Panics
/// If `lo` or `hi` is not finite or `lo > hi`: the range is part of the study's definition and
/// must be checked where the study is loaded.
pub fn dp_quantile(
    values: &mut [f64],
    q: f64,
    lo: f64,
    hi: f64,
    epsilon: f64,
    noise: &mut Noise,
) -> f64 {
    assert!(
        lo.is_finite() && hi.is_finite() && lo <= hi,
        "dp_quantile: range [{lo}, {hi}] must be finite and ordered"
    );
    let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
    let half_eps = if epsilon > 0.0 {
        epsilon.min(f64::MAX) / 2.0
    } else {
        0.0
    };

    // Move NaNs to the back and work on the rest.
    let mut n = 0;
    for i in 0..values.len() {
        if !values[i].is_nan() {
            values.swap(i, n);
            n += 1;
        }
    }
    let xs = &mut values[..n];
    for x in xs.iter_mut() {
        *x = x.clamp(lo, hi);
    }
    xs.sort_unstable_by(f64::total_cmp);

    let edge = |i: usize| -> f64 {
        match i {
            0 => lo,
            i if i > n => hi,
            i => xs[i - 1],
        }
    };
    // Interval i runs from edge(i) to edge(i+1), i = 0..=n. Halving before subtracting keeps
    // the width finite for any finite range; the constant factor cancels in the normalisation.
    let qn = q * n as f64;
    let log_weights: Vec<f64> = (0..=n)
        .map(|i| {
            let half_width = edge(i + 1) / 2.0 - edge(i) / 2.0;
            let score = -(i as f64 - qn).abs();
            if half_width > 0.0 {
                half_width.ln() + half_eps * score
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let max = log_weights
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        // Every interval is empty: lo == hi.
        return lo;
    }
    let weights: Vec<f64> = log_weights.iter().map(|lw| (lw - max).exp()).collect();
    let total: f64 = weights.iter().sum();

    // Inverse-CDF draw over the normalised weights; the largest weight is 1, so total ≥ 1.
    let target = noise.uniform() * total;
    let mut chosen = None;
    let mut cumulative = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            chosen = Some(i);
            cumulative += w;
            if target < cumulative {
                break;
            }
        }
    }
    // `max` is finite, so some weight is 1 and `chosen` is set; rounding can only leave the
    // last non-empty interval.
    let i = chosen.unwrap_or(0);
    let (a, b) = (edge(i), edge(i + 1));
    let u = noise.uniform();
    (a * (1.0 - u) + b * u).clamp(a, b)
}

/// Continual release of a running sum: the binary (tree) mechanism of Chan, Shi & Song 2011,
/// "Private and Continual Release of Statistics", §3.4 (their Algorithm 2), with Gaussian noise
/// on each node.
///
/// Node `alpha[i]` holds the exact sum of the last 2^i leaves ending at a step whose lowest set
/// bit is i, and `alpha_hat[i]` that sum plus N(0, σ²); the sum at step t adds the noisy nodes
/// of t's set bits. Each leaf enters at most `levels(horizon)` = ⌊log2 horizon⌋ + 1 noisy nodes,
/// so for a leaf-level L2 sensitivity Δ the whole stream costs `levels·Δ²/(2σ²)` in zCDP
/// (Gaussian mechanism, Bun & Steinke Prop. 1.6, composed over levels), charged once for the
/// horizon.
///
/// Serialized so the noise already drawn survives restarts: drawing it again would release the
/// same sums under fresh noise and spend more than was charged. The serialized state holds
/// exact partial sums and must be stored as confidentially as the readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryTree {
    sigma: f64,
    horizon: u64,
    steps: u64,
    alpha: Vec<f64>,
    alpha_hat: Vec<f64>,
}

impl BinaryTree {
    /// An empty tree releasing up to `horizon` prefix sums with node noise N(0, σ²).
    pub fn new(sigma: f64, horizon: u64) -> Self {
        let levels = Self::levels(horizon) as usize;
        Self {
            sigma,
            horizon,
            steps: 0,
            alpha: vec![0.0; levels],
            alpha_hat: vec![0.0; levels],
        }
    }

    /// ⌊log2 horizon⌋ + 1, the number of tree levels (and the most nodes any leaf enters); 0 for
    /// an empty horizon.
    pub fn levels(horizon: u64) -> u32 {
        u64::BITS - horizon.leading_zeros()
    }

    /// The zCDP cost of the whole horizon for leaf sensitivity `l2` at this sigma:
    /// levels·l2²/(2σ²).
    pub fn rho_cost(l2: f64, sigma: f64, horizon: u64) -> f64 {
        if l2 == 0.0 {
            return 0.0;
        }
        f64::from(Self::levels(horizon)) * l2 * l2 / (2.0 * sigma * sigma)
    }

    /// The sigma that makes the whole horizon cost `rho`: l2·√(levels/(2ρ)).
    pub fn sigma_for(l2: f64, rho: f64, horizon: u64) -> f64 {
        l2.abs() * (f64::from(Self::levels(horizon)) / (2.0 * rho)).sqrt()
    }

    /// Adds the next leaf (step t = steps+1) and returns the noisy sum of all leaves so far;
    /// None once `horizon` leaves were added (the tree's budget covers no more).
    pub fn push(&mut self, leaf: f64, noise: &mut Noise) -> Option<f64> {
        if self.steps >= self.horizon {
            return None;
        }
        let t = self.steps + 1;
        // Algorithm 2: the node at t's lowest set bit absorbs the lower levels and the leaf;
        // the lower levels start afresh.
        let i = t.trailing_zeros() as usize;
        let merged: f64 = self.alpha[..i].iter().sum::<f64>() + leaf;
        self.alpha[..i].fill(0.0);
        self.alpha_hat[..i].fill(0.0);
        self.alpha[i] = merged;
        self.alpha_hat[i] = merged + noise.gaussian(self.sigma);
        self.steps = t;
        let sum = (0..self.alpha_hat.len())
            .filter(|&j| t & (1 << j) != 0)
            .map(|j| self.alpha_hat[j])
            .sum();
        Some(sum)
    }

    /// How many leaves have been added.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// How many noisy nodes the prefix sum at step t adds up: popcount(t). Its error variance is
    /// that times σ².
    pub fn nodes_in_prefix(t: u64) -> u32 {
        t.count_ones()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), extended to x < 0 by
    /// oddness.
    fn erf(x: f64) -> f64 {
        const P: f64 = 0.327_591_1;
        const A: [f64; 5] = [
            0.254_829_592,
            -0.284_496_736,
            1.421_413_741,
            -1.453_152_027,
            1.061_405_429,
        ];
        let ax = x.abs();
        let t = 1.0 / (1.0 + P * ax);
        let poly = A.iter().rev().fold(0.0, |acc, a| acc * t + a) * t;
        let y = 1.0 - poly * (-ax * ax).exp();
        if x < 0.0 { -y } else { y }
    }

    fn normal_cdf(x: f64, sigma: f64) -> f64 {
        0.5 * (1.0 + erf(x / (sigma * std::f64::consts::SQRT_2)))
    }

    #[test]
    fn privacy_erf_matches_known_values() {
        // Reference values of erf; the approximation promises < 1.5e-7.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265_0),
            (-1.0, -0.842_700_792_9),
        ] {
            assert!((erf(x) - want).abs() < 1.5e-7, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn privacy_rho_epsilon_round_trip() {
        for &delta in &[1e-5, 1e-9, 1e-12] {
            for &epsilon in &[1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0] {
                let rho = rho_for(epsilon, delta);
                assert!(rho > 0.0);
                let back = epsilon_of(rho, delta);
                // Never overstated: at most ε plus the 1e-12 the contract allows.
                assert!(back <= epsilon + 1e-12, "ε({rho}) = {back} > {epsilon}");
                // And not wastefully understated: within float rounding (relative 1e-12).
                assert!(
                    (back - epsilon).abs() <= 1e-12 * epsilon,
                    "ε={epsilon} δ={delta}: back {back}"
                );
            }
            for &rho in &[1e-6, 1e-3, 0.05, 1.0, 4.0] {
                let epsilon = epsilon_of(rho, delta);
                let again = rho_for(epsilon, delta);
                // Relative 1e-9: ρ is recovered through a square root of a difference.
                assert!((again - rho).abs() <= 1e-9 * rho, "ρ={rho}: got {again}");
            }
        }
        // The closed form overshoots ε by a few ulps for about a fifth of inputs; the step-down
        // in `rho_for` makes ε(ρ) ≤ ε hold exactly, stricter than the 1e-12 the contract allows.
        for &delta in &[1e-5, 1e-6, 1e-9, 1e-12] {
            for k in 0..2000 {
                let epsilon = 10f64.powf(-3.0 + 4.0 * f64::from(k) / 2000.0);
                assert!(epsilon_of(rho_for(epsilon, delta), delta) <= epsilon);
            }
        }
        assert_eq!(rho_for(0.0, 1e-6), 0.0);
        assert_eq!(rho_for(-1.0, 1e-6), 0.0);
        assert_eq!(rho_for(f64::NAN, 1e-6), 0.0);
        assert_eq!(rho_for(1.0, 0.0), 0.0);
        assert_eq!(epsilon_of(0.0, 1e-6), 0.0);
    }

    #[test]
    fn privacy_sigma_and_pure_epsilon_conversions() {
        // σ = Δ/√(2ρ): Δ = 2, ρ = 0.5 gives σ = 2.
        assert!((gaussian_sigma(2.0, 0.5) - 2.0).abs() < 1e-15);
        // ε-DP costs ε²/2: ε = 1 is ρ = 0.5.
        assert!((pure_epsilon(0.5) - 1.0).abs() < 1e-15);
        assert_eq!(pure_epsilon(-1.0), 0.0);
    }

    #[test]
    fn privacy_gaussian_matches_normal() {
        let sigma = 3.7;
        let n = 40_000;
        let mut noise = Noise::seeded(0x5eed_0001);
        let mut xs: Vec<f64> = (0..n).map(|_| noise.gaussian(sigma)).collect();
        let nf = n as f64;
        let mean = xs.iter().sum::<f64>() / nf;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0)).sqrt();
        // The sample sd has standard error σ/√(2n) ≈ 0.35 % of σ; 3 % is ~8.5 standard errors.
        assert!((sd - sigma).abs() < 0.03 * sigma, "sd {sd}");
        // The mean has standard error σ/√n; allow 4 of them.
        assert!(mean.abs() < 4.0 * sigma / nf.sqrt(), "mean {mean}");

        // Kolmogorov–Smirnov against N(0, σ²); 1.95/√n is the α = 0.001 critical value, and the
        // CDF's own error (< 1.5e-7) is far below it.
        xs.sort_unstable_by(f64::total_cmp);
        let d = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = normal_cdf(x, sigma);
                (f - i as f64 / nf).max((i + 1) as f64 / nf - f)
            })
            .fold(0.0, f64::max);
        assert!(d < 1.95 / nf.sqrt(), "KS statistic {d}");

        assert_eq!(noise.gaussian(0.0), 0.0);
        let u = noise.uniform();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn privacy_accountant_never_overspends() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0003);
        let delta = 1e-6;
        for _ in 0..1000 {
            let epsilon = rng.random_range(0.01..5.0);
            let mut acc = Accountant::new(rho_for(epsilon, delta));
            let limit = acc.total_rho * (1.0 + BUDGET_TOLERANCE);
            for _ in 0..50 {
                let rest = acc.remaining_rho();
                // Mix ordinary charges with ones at and just around the edge of the budget.
                let rho = match rng.random_range(0..6) {
                    0 => rest,
                    1 => rest * (1.0 + 5e-10),
                    2 => rest + acc.total_rho * 2e-9,
                    3 => -rng.random_range(0.0..1.0),
                    _ => acc.total_rho * rng.random_range(0.0..0.4),
                };
                let before = acc.clone();
                match acc.charge(rho) {
                    Ok(()) => {
                        assert!(rho >= 0.0);
                        assert_eq!(acc.charges, before.charges + 1);
                        assert_eq!(acc.spent_rho, before.spent_rho + rho);
                    }
                    Err(e) => {
                        assert_eq!(acc, before, "a refused charge changed the state");
                        assert_eq!(e.asked.to_bits(), rho.to_bits());
                        assert!(!before.can_charge(rho));
                    }
                }
                assert!(acc.spent_rho <= limit, "{} > {limit}", acc.spent_rho);
            }
            // ε(ρ) grows at most proportionally with ρ (ρ + 2√(ρL) scales by ≤ 1+τ when ρ does),
            // so the 1e-9 slack on ρ allows at most 1e-9 relative on ε, plus 1e-12 rounding.
            let spent = acc.spent_epsilon(delta);
            assert!(
                spent <= epsilon * (1.0 + BUDGET_TOLERANCE) + 1e-12,
                "{spent} > {epsilon}"
            );
        }
    }

    #[test]
    fn privacy_accountant_refuses_nan_and_survives_serde() {
        let mut acc = Accountant::new(1.0);
        assert!(acc.charge(f64::NAN).is_err());
        acc.charge(0.25).unwrap();
        let json = serde_json::to_string(&acc).unwrap();
        let back: Accountant = serde_json::from_str(&json).unwrap();
        assert_eq!(back, acc);
        assert_eq!(back.remaining_rho(), 0.75);
        let err = Accountant::new(0.1).charge(0.2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "privacy budget spent: 0.000000 of 0.100000 ρ used, 0.200000 more asked"
        );
    }

    #[test]
    fn privacy_tree_without_noise_is_exact() {
        let mut noise = Noise::seeded(1);
        let mut tree = BinaryTree::new(0.0, 100);
        let mut exact = 0.0;
        for t in 1..=100u64 {
            let leaf = ((t * 37) % 11) as f64 - 5.0;
            exact += leaf;
            // Integer-valued leaves: every partial sum is exact in f64.
            assert_eq!(tree.push(leaf, &mut noise), Some(exact), "step {t}");
            assert_eq!(tree.steps(), t);
        }
        assert_eq!(tree.push(1.0, &mut noise), None);
        assert_eq!(tree.steps(), 100);
    }

    #[test]
    fn privacy_tree_error_variance_is_popcount_sigma_squared() {
        let sigma = 2.0;
        let trials = 4000;
        let checked = [1u64, 7, 32, 63];
        let mut noise = Noise::seeded(0x5eed_0004);
        let mut sq = [0.0f64; 4];
        for _ in 0..trials {
            let mut tree = BinaryTree::new(sigma, 64);
            let mut exact = 0.0;
            for t in 1..=64u64 {
                let leaf = (t % 5) as f64;
                exact += leaf;
                let got = tree.push(leaf, &mut noise).unwrap();
                if let Some(k) = checked.iter().position(|&c| c == t) {
                    sq[k] += (got - exact).powi(2);
                }
            }
            assert_eq!(tree.push(0.0, &mut noise), None);
        }
        for (k, &t) in checked.iter().enumerate() {
            // The error has mean 0, so the mean square estimates its variance with relative
            // standard error √(2/4000) ≈ 2.2 %; 10 % is ~4.5 standard errors.
            let var = sq[k] / trials as f64;
            let want = f64::from(BinaryTree::nodes_in_prefix(t)) * sigma * sigma;
            assert!((var - want).abs() < 0.1 * want, "t={t}: {var} vs {want}");
        }
    }

    #[test]
    fn privacy_tree_levels_and_cost() {
        assert_eq!(BinaryTree::levels(0), 0);
        assert_eq!(BinaryTree::levels(1), 1);
        assert_eq!(BinaryTree::levels(63), 6);
        assert_eq!(BinaryTree::levels(64), 7);
        assert_eq!(BinaryTree::levels(1440), 11);
        assert_eq!(BinaryTree::nodes_in_prefix(63), 6);
        // 7 levels, Δ = 1, σ = 1: 7/2.
        assert!((BinaryTree::rho_cost(1.0, 1.0, 64) - 3.5).abs() < 1e-15);
        for &(l2, rho, horizon) in &[(1.0, 0.1, 64), (3.5, 0.002, 1440), (0.2, 2.0, 1)] {
            let sigma = BinaryTree::sigma_for(l2, rho, horizon);
            let cost = BinaryTree::rho_cost(l2, sigma, horizon);
            // Relative 1e-12: a square root and a square apart.
            assert!((cost - rho).abs() < 1e-12 * rho, "{cost} vs {rho}");
        }
    }

    #[test]
    fn privacy_tree_survives_restart() {
        let mut noise = Noise::seeded(7);
        let mut tree = BinaryTree::new(1.0, 16);
        for _ in 0..5 {
            tree.push(1.0, &mut noise);
        }
        let json = serde_json::to_string(&tree).unwrap();
        let mut restored: BinaryTree = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, tree);
        // Same noise stream after the restart gives the same release: no state was redrawn.
        let mut a = Noise::seeded(8);
        let mut b = Noise::seeded(8);
        assert_eq!(tree.push(2.0, &mut a), restored.push(2.0, &mut b));
    }

    #[test]
    fn privacy_quantile_median_is_accurate_at_large_epsilon() {
        let mut noise = Noise::seeded(0x5eed_0005);
        let mut close = 0;
        for trial in 0..200u64 {
            // Present the values in a trial-dependent order: the result must not depend on it.
            let mut values: Vec<f64> = (0..=1000u64)
                .map(|v| ((v * 7 + trial) % 1001) as f64)
                .collect();
            let m = dp_quantile(&mut values, 0.5, 0.0, 1000.0, 50.0, &mut noise);
            if (m - 500.0).abs() <= 10.0 {
                close += 1;
            }
        }
        // At ε = 50 an interval one rank further off is e^-25 times less likely, so nearly every
        // trial lands in [499, 501]; the contract asks for 95 %.
        assert!(close >= 190, "{close} of 200 within 10");
    }

    #[test]
    fn privacy_quantile_stays_in_range() {
        let mut noise = Noise::seeded(0x5eed_0006);
        let (lo, hi) = (-10.0, 40.0);
        for trial in 0..200 {
            let mut values = vec![
                -1e300,
                1e300,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::NAN,
                -11.0,
                41.0,
                3.0,
                39.999,
            ];
            values.extend((0..trial % 17).map(|v| v as f64 * 5.0 - 30.0));
            for &q in &[0.0, 0.1, 0.5, 0.9, 1.0] {
                for &epsilon in &[1e-12, 0.1, 1.0, 1e6] {
                    let x = dp_quantile(&mut values, q, lo, hi, epsilon, &mut noise);
                    assert!(x.is_finite() && (lo..=hi).contains(&x), "{x} for q={q}");
                }
            }
        }
        // No values: a draw from the single interval [lo, hi].
        let x = dp_quantile(&mut [], 0.5, lo, hi, 1.0, &mut noise);
        assert!((lo..=hi).contains(&x));
        // A degenerate range has one answer.
        assert_eq!(
            dp_quantile(&mut [1.0, 2.0], 0.5, 3.0, 3.0, 1.0, &mut noise),
            3.0
        );
    }

    #[test]
    fn privacy_quantile_tiny_epsilon_is_finite_and_in_range() {
        let mut noise = Noise::seeded(0x5eed_0007);
        let mut values: Vec<f64> = (0..=1000).map(f64::from).collect();
        for _ in 0..100 {
            let x = dp_quantile(&mut values, 0.5, 0.0, 1000.0, 1e-300, &mut noise);
            assert!(x.is_finite() && (0.0..=1000.0).contains(&x), "{x}");
        }
    }
}
