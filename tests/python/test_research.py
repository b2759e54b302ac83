"""Research studies as a pyarrow.flight client sees them.

Ten patients (4 F, 4 M, 2 X) consent to a study grouped by sex with k = 3,
their monitors publish heart rates over MQTT (paho), and a researcher
reads the study's live stream over Arrow Flight. The test checks the
schema, that no released row has fewer than k consenting patients (from
the cohorts it set up), that the readings counted match what was sent
within the noise the study's budget plan states, that a revoked patient
stops contributing from the next window, that replay returns what the
live stream gave, the Flight status codes, and the usage meter.
"""

import json
import math
import os
import re
import threading
import time
import unittest

import paho.mqtt.client as mqtt
import pyarrow as pa
import pyarrow.flight as flight

from wardflow_harness import Server, free_port, wait_for, wardflow

STUDY = "hr-by-sex"
K = 3
WINDOW_S = 2
RATE_HZ = 4  # readings per patient per second

PATIENTS = {f"p-f{i}": "f" for i in range(4)}
PATIENTS.update({f"p-m{i}": "m" for i in range(4)})
PATIENTS.update({f"p-x{i}": "x" for i in range(2)})

STUDY_TOML = f"""
id = "{STUDY}"
title = "Heart rate by sex"
researchers = ["r-one"]
metrics = ["hr"]
window = "{WINDOW_S}s"
statistics = ["count", "mean", "p50"]
k = {K}
running_totals = true

[cohort]
group_by = ["sex"]

[privacy]
epsilon = 60.0
delta = 1e-6
windows = 400

[clamp]
hr = [30, 200]
max_readings = 12
max_readings_total = 100000
"""

SPENT_TOML = """
id = "short"
title = "A study whose budget covers two windows"
researchers = ["r-one"]
metrics = ["hr"]
window = "1s"
statistics = ["count"]
k = 2

[privacy]
epsilon = 1.0
delta = 1e-6
windows = 2

[clamp]
hr = [30, 200]
max_readings = 10
"""


def topic(device):
    return f"wardflow/v1/devices/{device}/readings"


class Publisher(threading.Thread):
    """One paho client per monitor, publishing heart rates at RATE_HZ;
    records the wall-clock millisecond of every acknowledged reading."""

    def __init__(self, server, secrets):
        super().__init__(daemon=True)
        self.stop_flag = threading.Event()
        self.sent = {p: [] for p in secrets}
        self.clients = {}
        for patient, secret in secrets.items():
            device = "mon-" + patient
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
            c.username_pw_set(device, secret)
            c.connect("127.0.0.1", server.mqtt_port)
            c.loop_start()
            self.clients[patient] = c

    def run(self):
        seq = 0
        while not self.stop_flag.is_set():
            seq += 1
            for patient, c in self.clients.items():
                now = time.time()
                info = c.publish(topic("mon-" + patient),
                                 json.dumps([{"bt": now, "n": "hr", "v": 70 + seq % 7, "seq": seq}]), qos=1)
                info.wait_for_publish(10)
                self.sent[patient].append(int(time.time() * 1000))
            time.sleep(1.0 / RATE_HZ)

    def stop(self):
        self.stop_flag.set()
        self.join(10)
        for c in self.clients.values():
            c.loop_stop()
            c.disconnect()


class ResearchStreams(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.flight_port = free_port()
        cls.server = Server("--flight", f"127.0.0.1:{cls.flight_port}").start()
        data = cls.server.data
        cls.secret = wardflow(data, "researchers", "add", "r-one").stdout.strip()
        cls.other_secret = wardflow(data, "researchers", "add", "r-two").stdout.strip()
        cls.keys = {}
        cls.grants = {}
        secrets = {}
        for i, (patient, sex) in enumerate(PATIENTS.items()):
            wardflow(data, "patients", "admit", patient, "--unit", "icu-a", "--bed", f"b{i}",
                     "--age-years", str(40 + i), "--sex", sex)
            key = os.path.join(cls.server.tmp.name, f"{patient}.key")
            wardflow(data, "consent", "keygen", "--out", key)
            wardflow(data, "consent", "register", "--patient", patient, "--key", key)
            out = wardflow(data, "consent", "grant", "--key", key, "--patient", patient, "--to", STUDY,
                           "--purpose", f"research:{STUDY}", "--scope", "vitals", "--minutes", "60").stdout
            cls.grants[patient] = re.search(r"grant ([0-9a-f]{32})", out).group(1)
            cls.keys[patient] = key
            secrets[patient] = cls.server.add_device("mon-" + patient, patient)
        study = os.path.join(cls.server.tmp.name, "study.toml")
        with open(study, "w") as f:
            f.write(STUDY_TOML)
        wardflow(data, "studies", "add", study)
        show = wardflow(data, "studies", "show", STUDY).stdout
        cls.sigma_readings = float(re.search(r"σ readings ([0-9.]+)", show).group(1))
        cls.sigma_tree = float(re.search(r"σ per tree node ([0-9.]+)", show).group(1))
        cls.publisher = Publisher(cls.server, secrets)
        cls.publisher.start()
        cls.client = flight.FlightClient(f"grpc://127.0.0.1:{cls.flight_port}")
        cls.options = flight.FlightCallOptions(headers=[cls.client.authenticate_basic_token("r-one", cls.secret)])

    @classmethod
    def tearDownClass(cls):
        cls.publisher.stop()
        cls.client.close()
        cls.server.close()

    def usage(self, study=STUDY):
        out = wardflow(self.server.data, "studies", "usage", study).stdout
        windows = {}
        in_patients = False
        for line in out.splitlines():
            if line.startswith("patient\t"):
                in_patients = True
            elif in_patients:
                p, n = line.split("\t")
                windows[p] = int(n)
        return out, windows

    def live(self, n, timeout=60):
        """The next n windows of the live stream."""
        ticket = flight.Ticket(json.dumps({"study": STUDY}).encode())
        reader = self.client.do_get(ticket, self.options)
        batches = []
        deadline = time.time() + timeout
        while len(batches) < n and time.time() < deadline:
            chunk = reader.read_chunk()
            batches.append(chunk.data)
        reader.cancel()
        self.assertEqual(len(batches), n)
        return batches

    def consenting(self, revoked_at=None):
        """The true patients per sex cell of a window starting at start."""
        return lambda start: {
            sex: sum(1 for p, s in PATIENTS.items() if s == sex and (revoked_at is None or p != "p-m0" or start < revoked_at))
            for sex in ("f", "m", "x")
        }

    def test_1_list_schema_and_live_values(self):
        flights = list(self.client.list_flights(options=self.options))
        self.assertEqual([f.descriptor.path[0].decode() for f in flights], [STUDY])
        schema = self.client.get_schema(flight.FlightDescriptor.for_path(STUDY), self.options).schema
        self.assertEqual(schema.names, ["window_start", "window_end", "sex", "metric", "patients", "readings",
                                        "mean", "p50", "readings_total"])
        self.assertEqual(schema.field("window_start").type, pa.timestamp("ms", tz="UTC"))
        # The stream's first window may be partial (the publishers started
        # during it); skip one.
        batches = self.live(7)[1:]
        # One batch per window, each window once, one after the other.
        bounds = [(b.column("window_start")[0].as_py(), b.column("window_end")[0].as_py()) for b in batches]
        for (_, end), (start, _) in zip(bounds, bounds[1:]):
            self.assertEqual(start, end, bounds)
        received = 0
        sent = 0
        sexes = {"F": "f", "M": "m", "X": "x"}
        for b in batches:
            self.assertEqual(b.schema, schema)
            rows = b.to_pylist()
            self.assertTrue(rows, "a window with ten consenting patients released no row")
            starts = {r["window_start"] for r in rows}
            self.assertEqual(len(starts), 1)
            start_ms = int(rows[0]["window_start"].timestamp() * 1000)
            end_ms = int(rows[0]["window_end"].timestamp() * 1000)
            self.assertEqual(end_ms - start_ms, WINDOW_S * 1000)
            # Identifiers never leave.
            text = json.dumps([{k: str(v) for k, v in r.items()} for r in rows])
            for p in PATIENTS:
                self.assertNotIn(p, text)
            # k: every released row has at least K consenting patients.
            truth = self.consenting()(start_ms)
            for r in rows:
                cell = sexes.get(r["sex"])
                true_n = sum(truth.values()) if r["sex"] == "*" else truth[cell]
                self.assertGreaterEqual(true_n, K, f"row {r} has {true_n} patients")
                self.assertNotEqual(r["sex"], "X", "the X cell has 2 patients and must be withheld")
                self.assertTrue(30 <= r["mean"] <= 200)
            total = [r for r in rows if r["sex"] == "*"]
            self.assertEqual(len(total), 1, rows)
            received += total[0]["readings"]
            sent += sum(1 for ts in self.publisher.sent.values() for t in ts if start_ms <= t < end_ms)
        # Counts match what was sent within the noise: 4 σ of the sum of
        # the windows' Gaussian noise, plus one reading per patient and
        # window for acknowledgements landing across a window boundary.
        slack = 4 * self.sigma_readings * math.sqrt(len(batches)) + len(PATIENTS) * len(batches)
        self.assertLess(abs(received - sent), slack, f"released {received:.0f} readings, sent {sent}")
        self.assertGreater(sent, 0)

    def test_2_revoked_patient_stops_contributing(self):
        self.live(2)
        _, before = self.usage()
        self.assertGreater(before.get("p-m0", 0), 0, before)
        wardflow(self.server.data, "consent", "revoke", "--key", self.keys["p-m0"], "--patient", "p-m0",
                 "--grant", self.grants["p-m0"])
        # The revocation is read within a poll (200 ms); the window it
        # falls in may still count the patient, the next ones must not.
        time.sleep(1)
        _, at_revocation = self.usage()
        self.live(4)
        _, after = self.usage()
        self.assertLessEqual(after["p-m0"], at_revocation["p-m0"] + 1, (at_revocation, after))
        self.assertGreaterEqual(after["p-m1"], at_revocation["p-m1"] + 3, (at_revocation, after))

    def test_3_replay_returns_what_was_released(self):
        live = self.live(2)
        start = int(live[0].column("window_start")[0].as_py().timestamp() * 1000)
        end = int(live[1].column("window_end")[0].as_py().timestamp() * 1000)
        ticket = flight.Ticket(json.dumps({"study": STUDY, "from_ms": start, "to_ms": end}).encode())
        replayed = self.client.do_get(ticket, self.options).read_all()
        self.assertEqual(replayed, pa.Table.from_batches(live))

    def test_4_status_codes(self):
        with self.assertRaises(flight.FlightUnauthenticatedError):
            self.client.authenticate_basic_token("r-one", "not-the-secret")
        bad = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer 0000")])
        with self.assertRaises(flight.FlightUnauthenticatedError):
            list(self.client.list_flights(options=bad))
        other = flight.FlightCallOptions(headers=[self.client.authenticate_basic_token("r-two", self.other_secret)])
        self.assertEqual(list(self.client.list_flights(options=other)), [])
        with self.assertRaises(flight.FlightUnauthorizedError):
            self.client.do_get(flight.Ticket(json.dumps({"study": STUDY}).encode()), other).read_all()
        with self.assertRaises(flight.FlightUnauthorizedError):
            self.client.get_flight_info(flight.FlightDescriptor.for_path(STUDY), other)
        with self.assertRaises(KeyError):
            self.client.do_get(flight.Ticket(b'{"study": "no-such-study"}'), self.options).read_all()

    def test_5_spent_budget_ends_the_stream(self):
        study = os.path.join(self.server.tmp.name, "short.toml")
        with open(study, "w") as f:
            f.write(SPENT_TOML)
        wardflow(self.server.data, "studies", "add", study)
        self.assertTrue(wait_for(lambda: any(f.descriptor.path[0] == b"short" for f in
                                             self.client.list_flights(options=self.options)), timeout=10))
        reader = self.client.do_get(flight.Ticket(b'{"study": "short"}'), self.options)
        got = 0
        with self.assertRaises(pa.ArrowInvalid) as ended:
            while True:
                reader.read_chunk()
                got += 1
        self.assertIn("budget spent", str(ended.exception))
        self.assertLessEqual(got, 2)
        with self.assertRaises(pa.ArrowInvalid):
            self.client.do_get(flight.Ticket(b'{"study": "short"}'), self.options).read_all()
        out, _ = self.usage("short")
        self.assertIn("2 windows released", out)
        spent = float(re.search(r"ε spent ([0-9.]+) of", out).group(1))
        self.assertLessEqual(spent, 1.0 + 1e-9)
        self.assertGreater(spent, 0.99)

    def test_6_usage_is_metered(self):
        self.live(1)
        out, windows = self.usage()
        line = next(line for line in out.splitlines() if line.startswith("r-one\t"))
        streams, batches, rows, nbytes = (int(x) for x in line.split("\t")[1:])
        self.assertGreaterEqual(streams, 1)
        self.assertGreaterEqual(batches, 1)
        self.assertGreaterEqual(rows, batches)
        self.assertGreater(nbytes, rows * 8)
        self.assertTrue(windows and all(p in PATIENTS for p in windows), windows)
        metrics = self.server.metrics()
        self.assertIn(f'wardflow_research_rows_read{{study="{STUDY}",researcher="r-one"}}', metrics)
        self.assertRegex(metrics, rf'wardflow_research_epsilon_spent{{study="{STUDY}"}} [0-9.]+')

    def test_7_closing_a_study_ends_its_streams(self):
        study = os.path.join(self.server.tmp.name, "closable.toml")
        with open(study, "w") as f:
            f.write(SPENT_TOML.replace('"short"', '"closable"').replace("windows = 2", "windows = 1000"))
        wardflow(self.server.data, "studies", "add", study)
        self.assertTrue(wait_for(lambda: any(f.descriptor.path[0] == b"closable" for f in
                                             self.client.list_flights(options=self.options)), timeout=10))
        reader = self.client.do_get(flight.Ticket(b'{"study": "closable"}'), self.options)
        reader.read_chunk()
        wardflow(self.server.data, "studies", "close", "closable")
        started = time.time()
        with self.assertRaises(pa.ArrowException) as ended:
            while True:
                reader.read_chunk()
        self.assertIn("closed", str(ended.exception))
        self.assertLess(time.time() - started, 10)
        listing = wardflow(self.server.data, "studies", "list").stdout
        self.assertRegex(listing, r"closable\tclosed\t")


if __name__ == "__main__":
    unittest.main()
