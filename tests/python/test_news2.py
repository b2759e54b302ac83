"""`wardflow news2` agrees with an independent NEWS2 oracle on every band edge.

The oracle (news2_oracle.py) is written from the RCP NEWS2 chart (December
2017, Chart 1: The NEWS scoring system; Chart 2: NEWS thresholds and
triggers), not from the Rust code. This module:

  - OracleExamples: hand-worked sets checked against the oracle alone;
  - GeneratorCoverage: the deterministic generator hits every band edge of
    every parameter, off-grid and half values, extremes, both SpO2 scales,
    air and oxygen, all ACVPU levels and every risk band;
  - BinaryAgreement: feeds all sets to `$WARDFLOW_BIN news2` once as JSON
    Lines and compares its answers with the oracle's. Fails (never skips)
    when WARDFLOW_BIN is unset.

Stdlib only: python3 -m unittest -v test_news2 (from tests/python).
"""

import collections
import json
import os
import random
import subprocess
import sys
import unittest
from decimal import Decimal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import news2_oracle as oracle  # noqa: E402  (needs the path above)

SEED = 20171219  # fixed: the same sets on every run
TOTAL_SETS = 12_000
EDGE_REPEATS = 3  # each edge value appears with this many random backgrounds
MIN_PER_RISK_BAND = 1_000
KEYS = ("rr", "spo2", "spo2_scale", "oxygen", "sbp", "hr", "consciousness", "temp")
RISKS = ("low", "low-medium", "medium", "high")
MEASURED = ("rr", "spo2", "sbp", "hr", "temp")
STEP = {"rr": Decimal("1"), "spo2": Decimal("1"), "sbp": Decimal("1"),
        "hr": Decimal("1"), "temp": Decimal("0.1")}

# Last value of each band but the top one (Chart 1); the next band starts
# one step later. SpO2 lists both scales' edges, tried on both scales.
BOUNDARIES = {
    "rr": ["8", "11", "20", "24"],
    "spo2": ["83", "85", "87", "91", "92", "93", "94", "95", "96"],
    "sbp": ["90", "100", "110", "219"],
    "hr": ["40", "50", "90", "110", "130"],
    "temp": ["35.0", "36.0", "38.0", "39.0"],
}
# Offsets from a boundary, in chart steps: on-grid neighbours, then off-grid
# values either side of the rounding point, and exact halves (x.5 steps).
OFFSETS = ["-1", "0", "1", "2", "-0.6", "-0.5", "0.4", "0.49", "0.5", "0.51", "0.6", "1.5"]

# Plausible extremes (also drawn as "abnormal" random values).
RANGES = {"rr": ("0", "60"), "spo2": ("50", "100"), "sbp": ("40", "300"),
          "hr": ("20", "250"), "temp": ("30.0", "43.0")}
# Mostly the 1- and 2-point zones of Chart 1, for "mildly ill" random values
# (so that totals of 5 and more also come up without any red score).
MILD = {"rr": ("9", "24"), "spo2": ("92", "95"), "spo2_scale2": ("84", "96"),
        "sbp": ("91", "110"), "hr": ("41", "130"), "temp": ("35.1", "39.5")}
# Score-0 ranges of Chart 1, for "normal" random values.
NORMAL = {"rr": ("12", "20"), "spo2": ("96", "100"), "spo2_scale2": ("88", "92"),
          "sbp": ("111", "219"), "hr": ("51", "90"), "temp": ("36.1", "38.0")}

# 3-point zones of Chart 1, for sets with one red parameter.
RED = {"rr": [("0", "8"), ("25", "60")], "spo2": [("50", "91")], "spo2_scale2": [("50", "83")],
       "sbp": [("40", "90"), ("220", "300")], "hr": [("20", "40"), ("131", "250")],
       "temp": [("30.0", "35.0")]}


# ---------------------------------------------------------------- generator

def as_json_number(param, d):
    """Whole values of whole-number parameters as ints, everything else as
    floats whose repr is the decimal we meant (float(Decimal) is exact-nearest)."""
    if param != "temp" and d == d.to_integral_value():
        return int(d)
    return float(d)


def edge_values(param):
    """Every boundary, a step either side, off-grid values and halves."""
    values = [Decimal(b) + Decimal(k) * STEP[param]
              for b in BOUNDARIES[param] for k in OFFSETS]
    values += [Decimal(x) for x in RANGES[param]]
    if param == "spo2":
        values = [v for v in values if v <= 100]  # SpO2 cannot exceed 100 %
    return sorted(set(values))


def draw(rng, param, lo, hi):
    """A random value in [lo, hi]: mostly on the chart's grid, some with one
    extra decimal (so some land on halves), some arbitrary floats."""
    lo, hi, step = Decimal(lo), Decimal(hi), STEP[param]
    kind = rng.random()
    if kind < 0.1:
        return rng.uniform(float(lo), float(hi))
    if kind >= 0.6:
        step /= 10
    d = lo + step * rng.randint(0, int((hi - lo) / step))
    value = as_json_number(param, d)
    if rng.random() < 0.03:  # whole values also arrive as 20.0 or 37
        value = int(value) if param == "temp" and value == int(value) else float(value)
    return value


def random_set(rng, p=None, extreme=None):
    """A complete set; `p` sets how ill the patient is (default: random, so
    that all four risk bands come up often) and `extreme` how often an
    abnormal value may be anywhere in the range rather than mild (default p)."""
    if p is None:
        p = rng.random() ** 1.2
    if extreme is None:
        extreme = p
    scale = 2 if rng.random() < 0.3 else 1
    obs = {"rr": None, "spo2": None, "spo2_scale": scale,
           "oxygen": "o2" if rng.random() < p else "air",
           "sbp": None, "hr": None,
           "consciousness": rng.choice("CVPU") if rng.random() < p / 2 else "A",
           "temp": None}
    for param in MEASURED:
        key = "spo2_scale2" if param == "spo2" and scale == 2 else param
        if rng.random() >= p:
            lo, hi = NORMAL[key]
        elif rng.random() >= extreme:
            lo, hi = MILD[key]
        else:
            lo, hi = RANGES[param]
        obs[param] = draw(rng, param, lo, hi)
    return obs


def red_set(rng):
    """A fairly well patient with one parameter in a 3-point zone: the
    "low-medium" band needs a red score with an aggregate of at most 4."""
    obs = random_set(rng, p=0.1)
    param = rng.choice(MEASURED + ("consciousness",))
    if param == "consciousness":
        obs[param] = rng.choice("CVPU")
    elif param == "spo2" and obs["spo2_scale"] == 2 and obs["oxygen"] == "o2":
        obs[param] = draw(rng, param, *rng.choice([("50", "83"), ("97", "100")]))
    else:
        key = "spo2_scale2" if param == "spo2" and obs["spo2_scale"] == 2 else param
        obs[param] = draw(rng, param, *rng.choice(RED[key]))
    return obs


def mild_set(rng):
    """Several parameters in their 1- and 2-point zones and none at 3 (as far
    as MILD allows): aggregates of 5 and more without a red score."""
    return random_set(rng, p=rng.uniform(0.5, 1.0), extreme=0.0)


def edge_overrides():
    """Each targeted value, as the keys it overrides in a random set."""
    for param in ("rr", "sbp", "hr", "temp"):
        for v in edge_values(param):
            yield {param: as_json_number(param, v)}
    for scale in (1, 2):
        for oxygen in ("air", "o2"):
            for v in edge_values("spo2"):
                yield {"spo2": as_json_number("spo2", v), "spo2_scale": scale, "oxygen": oxygen}
            for level in "ACVPU":
                yield {"consciousness": level, "spo2_scale": scale, "oxygen": oxygen}


def generate():
    """TOTAL_SETS observation sets, the same on every call."""
    rng = random.Random(SEED)
    sets = []
    for override in edge_overrides():
        for _ in range(EDGE_REPEATS):
            sets.append({**random_set(rng), **override})
    while len(sets) < TOTAL_SETS:
        kind = rng.random()
        sets.append(red_set(rng) if kind < 0.15 else mild_set(rng) if kind < 0.25 else random_set(rng))
    rng.shuffle(sets)
    return sets


_SETS = None


def sets_and_expected():
    """Generated once per process: (sets, oracle answers)."""
    global _SETS
    if _SETS is None:
        sets = generate()
        _SETS = (sets, [oracle.score(s) for s in sets])
    return _SETS


def exact(x):
    """A sent number as the decimal it denotes (8, 8.0 and 8.00 are equal)."""
    return Decimal(repr(float(x)))


# ------------------------------------------------------------ oracle alone

BASE = {"rr": 16, "spo2": 97, "spo2_scale": 1, "oxygen": "air",
        "sbp": 120, "hr": 70, "consciousness": "A", "temp": 37.0}


def obs(**changes):
    return {**BASE, **changes}


class OracleExamples(unittest.TestCase):
    """Worked by hand from Chart 1 and Chart 2."""

    def check(self, o, total, risk, red=None, **scores):
        r = oracle.score(o)
        self.assertEqual(r["total"], total, r)
        self.assertEqual(r["risk"], risk, r)
        if red is not None:
            self.assertIs(r["red"], red, r)
        for k, v in scores.items():
            self.assertEqual(r["scores"][k], v, (k, r))

    def test_all_normal_scores_zero(self):
        self.check(obs(), 0, "low", red=False)

    def test_oxygen_alone_scores_two(self):
        self.check(obs(oxygen="o2"), 2, "low", red=False, oxygen=2, spo2=0)

    def test_each_cvpu_level_is_a_red_score(self):
        for level in "CVPU":
            self.check(obs(consciousness=level), 3, "low-medium", red=True, consciousness=3)

    def test_red_with_total_four_is_low_medium(self):
        # pulse 35 (3) + SpO2 95 on Scale 1 (1) = 4
        self.check(obs(hr=35, spo2=95), 4, "low-medium", red=True, hr=3, spo2=1)

    def test_four_without_red_is_low(self):
        # RR 10 (1) + pulse 45 (1) + SBP 105 (1) + temp 38.5 (1)
        self.check(obs(rr=10, hr=45, sbp=105, temp=38.5), 4, "low", red=False)

    def test_five_is_medium_even_with_red(self):
        # SBP 90 (3) + oxygen (2) = 5: the aggregate threshold wins
        self.check(obs(sbp=90, oxygen="o2"), 5, "medium", red=True)
        # RR 22 (2) + SpO2 95 (1) + SBP 105 (1) + pulse 95 (1) = 5
        self.check(obs(rr=22, spo2=95, sbp=105, hr=95), 5, "medium", red=False)

    def test_seven_is_high(self):
        # RR 25 (3) + pulse 111 (2) + temp 39.1 (2)
        self.check(obs(rr=25, hr=111, temp=39.1), 7, "high", rr=3, hr=2, temp=2)

    def test_maximum_total(self):
        self.check(obs(rr=30, spo2=85, oxygen="o2", sbp=80, hr=140, consciousness="U",
                       temp=40.0), 19, "high", red=True)
        self.check(obs(rr=30, spo2=85, oxygen="o2", sbp=250, hr=140, consciousness="U",
                       temp=34.0), 20, "high", sbp=3, temp=3)

    def test_scale_two(self):
        s2 = dict(spo2_scale=2)
        self.check(obs(spo2=90, oxygen="o2", **s2), 2, "low", spo2=0, oxygen=2)
        self.check(obs(spo2=88, **s2), 0, "low", spo2=0)
        self.check(obs(spo2=87, **s2), 1, "low", spo2=1)
        self.check(obs(spo2=84, **s2), 2, "low", spo2=2)
        self.check(obs(spo2=83, **s2), 3, "low-medium", spo2=3)
        self.check(obs(spo2=100, **s2), 0, "low", spo2=0)  # >=93 on air
        self.check(obs(spo2=93, oxygen="o2", **s2), 3, "low", spo2=1)
        self.check(obs(spo2=96, oxygen="o2", **s2), 4, "low", spo2=2)
        self.check(obs(spo2=97, oxygen="o2", **s2), 5, "medium", red=True, spo2=3)

    def test_scale_one_ignores_oxygen_for_spo2(self):
        self.check(obs(spo2=97, oxygen="o2"), 2, "low", spo2=0)
        self.check(obs(spo2=91), 3, "low-medium", spo2=3)
        self.check(obs(spo2=92), 2, "low", spo2=2)

    def test_rounding_rule(self):
        self.check(obs(temp=35.05), 1, "low", temp=1)   # -> 35.1
        self.check(obs(temp=35.04), 3, "low-medium", temp=3)  # -> 35.0
        self.check(obs(temp=34.95), 3, "low-medium", temp=3)  # -> 35.0
        self.check(obs(temp=38.05), 1, "low", temp=1)   # -> 38.1
        self.check(obs(rr=20.5), 2, "low", rr=2)        # -> 21
        self.check(obs(rr=20.4), 0, "low", rr=0)        # -> 20
        self.check(obs(rr=8.5), 1, "low", rr=1)         # -> 9
        self.check(obs(rr=8.4), 3, "low-medium", rr=3)  # -> 8
        self.check(obs(sbp=110.5), 0, "low", sbp=0)     # -> 111
        self.check(obs(hr=90.5), 1, "low", hr=1)        # -> 91
        self.check(obs(spo2=95.5), 0, "low", spo2=0)    # -> 96

    def test_integers_and_floats_agree(self):
        self.assertEqual(oracle.score(obs(temp=37)), oracle.score(obs(temp=37.0)))
        self.assertEqual(oracle.score(obs(rr=20.0)), oracle.score(obs(rr=20)))

    def test_rejects_unknown_categories(self):
        for bad in (obs(oxygen="O2"), obs(consciousness="X"), obs(spo2_scale=3)):
            with self.assertRaises(ValueError):
                oracle.score(bad)


# ------------------------------------------------------- generator coverage

class GeneratorCoverage(unittest.TestCase):
    """Fails if the generated sets stop covering what they must."""

    @classmethod
    def setUpClass(cls):
        cls.sets, cls.expected = sets_and_expected()

    def values(self, param, **where):
        return {exact(s[param]) for s in self.sets
                if all(s[k] == v for k, v in where.items())}

    def assert_covers(self, param, required, **where):
        missing = sorted(set(required) - self.values(param, **where))
        self.assertFalse(missing, f"{param} {where} never generated: {missing}")

    def test_size_and_determinism(self):
        self.assertGreaterEqual(len(self.sets), 10_000)
        self.assertEqual(generate(), self.sets)

    def test_sets_have_exactly_the_interface_keys(self):
        for s in self.sets:
            self.assertEqual(tuple(s), KEYS)
            for k in MEASURED:
                self.assertIn(type(s[k]), (int, float), s)

    def required_edges(self, bands, step):
        """From the oracle's Chart 1 tables: each band's last value, one step
        either side, the next band's first value and one beyond, values just
        inside and outside the rounding point, and the half itself."""
        out = set()
        for _lo, hi, _pts in bands:
            if hi is not None:
                for k in ("-1", "0", "1", "2", "-0.5", "0.4", "0.5", "0.6"):
                    out.add(Decimal(hi) + Decimal(k) * step)
        return out

    def test_every_band_edge_of_every_parameter(self):
        tables = {"rr": oracle.RR_BANDS, "sbp": oracle.SBP_BANDS,
                  "hr": oracle.HR_BANDS, "temp": oracle.TEMP_BANDS}
        for param, bands in tables.items():
            self.assert_covers(param, self.required_edges(bands, STEP[param]))
        spo2_tables = oracle.SPO2_SCALE1_BANDS + oracle.SPO2_SCALE2_O2_BANDS
        spo2_edges = {v for v in self.required_edges(spo2_tables, STEP["spo2"]) if v <= 100}
        for scale in (1, 2):
            for oxygen in ("air", "o2"):
                self.assert_covers("spo2", spo2_edges, spo2_scale=scale, oxygen=oxygen)

    def test_named_off_grid_halves_and_extremes(self):
        d = lambda *xs: {Decimal(x) for x in xs}  # noqa: E731
        self.assert_covers("temp", d("35.04", "35.05", "35.06", "34.95", "30", "43"))
        self.assert_covers("rr", d("8.4", "8.5", "8.6", "20.5", "0", "60"))
        self.assert_covers("spo2", d("50", "100", "91.5", "95.5"))
        self.assert_covers("sbp", d("40", "300", "90.5", "219.5"))
        self.assert_covers("hr", d("20", "250", "40.5", "130.5"))

    def test_categories(self):
        counts = collections.Counter()
        for s in self.sets:
            counts.update([("scale", s["spo2_scale"]), ("oxygen", s["oxygen"]),
                           ("acvpu", s["consciousness"]),
                           ("scale+oxygen", s["spo2_scale"], s["oxygen"])])
        required = ([("scale", n) for n in (1, 2)] + [("oxygen", o) for o in ("air", "o2")]
                    + [("acvpu", c) for c in "ACVPU"]
                    + [("scale+oxygen", n, o) for n in (1, 2) for o in ("air", "o2")])
        for key in required:
            self.assertGreaterEqual(counts[key], 100, (key, counts))

    def test_every_score_of_every_parameter(self):
        seen = collections.Counter()
        for s, r in zip(self.sets, self.expected):
            for k, v in r["scores"].items():
                seen[(k, v)] += 1
            seen[("spo2", s["spo2_scale"], s["oxygen"], r["scores"]["spo2"])] += 1
        required = [(k, v) for k in ("rr", "spo2", "sbp", "hr", "temp") for v in (0, 1, 2, 3)]
        required += [("oxygen", 0), ("oxygen", 2), ("consciousness", 0), ("consciousness", 3)]
        required += [("spo2", 1, o, v) for o in ("air", "o2") for v in (0, 1, 2, 3)]
        required += [("spo2", 2, "air", v) for v in (0, 1, 2, 3)]
        required += [("spo2", 2, "o2", v) for v in (0, 1, 2, 3)]
        for key in required:
            self.assertGreaterEqual(seen[key], 50, (key, seen[key]))

    def test_every_risk_band_many_times(self):
        risks = collections.Counter(r["risk"] for r in self.expected)
        for risk in RISKS:
            self.assertGreaterEqual(risks[risk], MIN_PER_RISK_BAND, risks)
        # The aggregate thresholds must be exercised with and without a red score.
        combos = collections.Counter((r["risk"], r["red"]) for r in self.expected)
        for key in [("medium", True), ("medium", False), ("high", True), ("high", False),
                    ("low", False), ("low-medium", True)]:
            self.assertGreaterEqual(combos[key], 100, (key, combos))
        # Every total from 0 to the maximum, 20, occurs.
        totals = collections.Counter(r["total"] for r in self.expected)
        for total in range(21):
            self.assertGreaterEqual(totals[total], 10, (total, totals))


# ---------------------------------------------------- binary vs the oracle

def same(a, b):
    """Equal and of the same JSON type (so true != 1 and 5.0 != 5)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def project(line):
    """The binary's answer reduced to the oracle's keys (extra keys ignored)."""
    try:
        r = json.loads(line)
    except ValueError:
        return f"<not JSON: {line[:200]!r}>"
    if not isinstance(r, dict):
        return f"<not an object: {line[:200]!r}>"
    scores = r.get("scores")
    if isinstance(scores, dict):
        scores = {k: scores.get(k) for k in oracle.PARAMETERS}
    return {"total": r.get("total"), "scores": scores, "red": r.get("red"), "risk": r.get("risk")}


class BinaryAgreement(unittest.TestCase):
    """`$WARDFLOW_BIN news2`: JSON Lines in (keys KEYS), one JSON object out
    per line (total, scores, red, risk)."""

    _run = None  # (stdin lines, CompletedProcess), shared by the tests below

    def run_binary(self):
        binary = os.environ.get("WARDFLOW_BIN")
        if not binary:
            self.fail("WARDFLOW_BIN is not set: set it to the wardflow binary "
                      "(e.g. target/debug/wardflow) to compare `wardflow news2` with the NEWS2 oracle")
        if BinaryAgreement._run is None:
            sets, _ = sets_and_expected()
            lines = [json.dumps(s) for s in sets]
            try:
                proc = subprocess.run([binary, "news2"], input="\n".join(lines) + "\n",
                                      capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                self.fail(f"could not run {binary} news2: {e}")
            BinaryAgreement._run = (lines, proc)
        return BinaryAgreement._run

    def test_exits_zero(self):
        _, proc = self.run_binary()
        self.assertEqual(proc.returncode, 0, f"news2 exited {proc.returncode}; stderr:\n{proc.stderr[-2000:]}")

    def test_one_line_per_set(self):
        lines, proc = self.run_binary()
        self.assertEqual(len(proc.stdout.splitlines()), len(lines),
                         f"sent {len(lines)} sets; stderr:\n{proc.stderr[-2000:]}")

    def test_every_set_agrees_with_oracle(self):
        lines, proc = self.run_binary()
        _, expected = sets_and_expected()
        out = proc.stdout.splitlines()
        mismatches = []
        for i, (sent, want) in enumerate(zip(lines, expected)):
            got = project(out[i]) if i < len(out) else "<no line>"
            if not same(got, want):
                mismatches.append((i, sent, want, got))
        risks = collections.Counter(r["risk"] for r in expected)
        print(f"news2: {len(lines)} sets compared with the oracle; risk bands: "
              + ", ".join(f"{k}={risks[k]}" for k in RISKS), file=sys.stderr)
        if mismatches:
            detail = "\n".join(f"  #{i}: input {sent}\n    oracle {json.dumps(want)}\n    binary {json.dumps(got)}"
                               for i, sent, want, got in mismatches[:10])
            self.fail(f"{len(mismatches)} of {len(lines)} sets disagree with the oracle; first 10:\n{detail}")


if __name__ == "__main__":
    unittest.main()
