"""Independent NEWS2 oracle, written from the chart, not from the Rust code.

Source: Royal College of Physicians. National Early Warning Score (NEWS) 2:
Standardising the assessment of acute-illness severity in the NHS. Updated
report of a working party. London: RCP, December 2017.
  - Chart 1: The NEWS scoring system (the per-parameter bands below);
  - Chart 2: NEWS thresholds and triggers (the risk bands in `risk_band`).

The chart's bands are discrete (whole numbers, temperature to one decimal),
so values between two bands (20.5 breaths/min, 35.05 degC) need a rule. The
project's documented convention: round each measurement to the chart's
resolution, to nearest, exact halves away from zero, on the value's shortest
decimal representation (repr of the float). Hence 35.05 -> 35.1, 20.5 -> 21.

`score(obs)` takes a dict with keys rr, spo2, spo2_scale (1 or 2, default 1),
oxygen ("air"/"o2"), sbp, hr, consciousness ("A"/"C"/"V"/"P"/"U"), temp and
returns {"total", "scores", "red", "risk"}.
"""

import math
from decimal import ROUND_HALF_UP, Decimal

WHOLE = Decimal("1")
TENTH = Decimal("0.1")

# A band is (lowest, highest, score), both ends inclusive and on the chart's
# grid; None means open-ended. Each table is read row by row off Chart 1.

# Chart 1, row "Respiration rate (per minute)": <=8 | 9-11 | 12-20 | 21-24 | >=25
RR_BANDS = [(None, 8, 3), (9, 11, 1), (12, 20, 0), (21, 24, 2), (25, None, 3)]

# Chart 1, row "SpO2 Scale 1 (%)": <=91 | 92-93 | 94-95 | >=96
SPO2_SCALE1_BANDS = [(None, 91, 3), (92, 93, 2), (94, 95, 1), (96, None, 0)]

# Chart 1, row "SpO2 Scale 2 (%)", patient breathing air:
# <=83 | 84-85 | 86-87 | 88-92, >=93 on air
SPO2_SCALE2_AIR_BANDS = [(None, 83, 3), (84, 85, 2), (86, 87, 1), (88, None, 0)]

# Chart 1, row "SpO2 Scale 2 (%)", patient on oxygen: same lower bands, then
# 88-92 | 93-94 on oxygen | 95-96 on oxygen | >=97 on oxygen
SPO2_SCALE2_O2_BANDS = [
    (None, 83, 3), (84, 85, 2), (86, 87, 1), (88, 92, 0),
    (93, 94, 1), (95, 96, 2), (97, None, 3),
]

# Chart 1, row "Air or oxygen?": Oxygen 2 | Air 0
OXYGEN_SCORES = {"air": 0, "o2": 2}

# Chart 1, row "Systolic blood pressure (mmHg)": <=90 | 91-100 | 101-110 | 111-219 | >=220
SBP_BANDS = [(None, 90, 3), (91, 100, 2), (101, 110, 1), (111, 219, 0), (220, None, 3)]

# Chart 1, row "Pulse (per minute)": <=40 | 41-50 | 51-90 | 91-110 | 111-130 | >=131
HR_BANDS = [
    (None, 40, 3), (41, 50, 1), (51, 90, 0),
    (91, 110, 1), (111, 130, 2), (131, None, 3),
]

# Chart 1, row "Consciousness": Alert 0 | CVPU 3 (C = new confusion)
CONSCIOUSNESS_SCORES = {"A": 0, "C": 3, "V": 3, "P": 3, "U": 3}

# Chart 1, row "Temperature (degC)": <=35.0 | 35.1-36.0 | 36.1-38.0 | 38.1-39.0 | >=39.1
TEMP_BANDS = [
    (None, "35.0", 3), ("35.1", "36.0", 1), ("36.1", "38.0", 0),
    ("38.1", "39.0", 1), ("39.1", None, 2),
]

# Chart resolution per measured parameter (the convention above).
RESOLUTION = {"rr": WHOLE, "spo2": WHOLE, "sbp": WHOLE, "hr": WHOLE, "temp": TENTH}

PARAMETERS = ("rr", "spo2", "oxygen", "sbp", "hr", "consciousness", "temp")


def to_grid(x, resolution):
    """Round x to the chart's resolution, halves away from zero, on repr(x)."""
    f = float(x)
    if not math.isfinite(f):
        raise ValueError(f"not a finite number: {x!r}")
    # Decimal's ROUND_HALF_UP rounds halves away from zero, as the rule asks.
    return Decimal(repr(f)).quantize(resolution, rounding=ROUND_HALF_UP)


def band_score(value, bands):
    """Score of the band containing an on-grid value."""
    for lo, hi, pts in bands:
        if (lo is None or value >= Decimal(lo)) and (hi is None or value <= Decimal(hi)):
            return pts
    raise AssertionError(f"chart table has a gap at {value}")  # tables are contiguous


def spo2_bands(scale, oxygen):
    """Chart 1: Scale 1 for everyone except hypercapnic patients (Scale 2),
    whose upper bands depend on whether they are on oxygen."""
    if scale == 1:
        return SPO2_SCALE1_BANDS
    if scale == 2:
        return SPO2_SCALE2_O2_BANDS if oxygen == "o2" else SPO2_SCALE2_AIR_BANDS
    raise ValueError(f"spo2_scale must be 1 or 2, got {scale!r}")


def lookup(table, key, name):
    if key not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {key!r}")
    return table[key]


def risk_band(total, red):
    """Chart 2 (NEWS thresholds and triggers): 7+ high; 5-6 medium; a score
    of 3 in any single parameter low-medium; otherwise (0-4) low. The
    aggregate thresholds take precedence over the red score."""
    if total >= 7:
        return "high"
    if total >= 5:
        return "medium"
    if red:
        return "low-medium"
    return "low"


def score(obs):
    """NEWS2 per Chart 1 and Chart 2 for one complete observation set."""
    oxygen = obs["oxygen"]
    scale = obs.get("spo2_scale", 1)
    lookup(OXYGEN_SCORES, oxygen, "oxygen")  # validate before using it below
    scores = {
        "rr": band_score(to_grid(obs["rr"], WHOLE), RR_BANDS),
        "spo2": band_score(to_grid(obs["spo2"], WHOLE), spo2_bands(scale, oxygen)),
        "oxygen": OXYGEN_SCORES[oxygen],
        "sbp": band_score(to_grid(obs["sbp"], WHOLE), SBP_BANDS),
        "hr": band_score(to_grid(obs["hr"], WHOLE), HR_BANDS),
        "consciousness": lookup(CONSCIOUSNESS_SCORES, obs["consciousness"], "consciousness"),
        "temp": band_score(to_grid(obs["temp"], TENTH), TEMP_BANDS),
    }
    total = sum(scores.values())
    red = any(v == 3 for v in scores.values())
    return {"total": total, "scores": scores, "red": red, "risk": risk_band(total, red)}
