"""`wardflow export` as a patient (and an analyst) would use it: readings
published by a real paho-mqtt device, an alert raised and resolved, an
access by a clinician; then the export as FHIR, validated with the
fhir.resources package, and as CSV and Parquet, read with pyarrow.

fhir.resources 8.x ships FHIR R5 as its default models, R4B (4.3.0) and
STU3, but not R4 (4.0.1). R4B is R4 with a few resources added and
changed (medication definitions, Subscription); Bundle, Patient, Device,
Observation, DetectedIssue and AuditEvent are the same as in R4, so the
bundle is validated with the R4B models, the closest to R4 it ships.
"""

import csv
import json
import os
import shutil
import tempfile
import time
import unittest
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from wardflow_harness import Server, frame, wait_for, wardflow

RULES = """
[[rule]]
id = "spo2-low"
description = "SpO2 below 88 % for 2 s"
priority = "high"
when = { metric = "spo2", below = 88, exit = 92 }
for = "2s"
"""

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
VITALS = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
# metric -> (LOINC, UCUM code, specific vital-signs profile or None)
CODES = {
    "hr": ("8867-4", "/min", "heartrate"),
    "spo2": ("59408-5", "%", "oxygensat"),
    "rr": ("9279-1", "/min", "resprate"),
    "sbp": ("8480-6", "mm[Hg]", None),
    "dbp": ("8462-4", "mm[Hg]", None),
    "map": ("8478-0", "mm[Hg]", None),
    "temp": ("8310-5", "Cel", "bodytemp"),
}


def rfc3339(ns):
    """RFC 3339 in UTC with as many fractional digits as needed, as Wardflow writes it."""
    s, frac = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def plain_rows(table):
    """Rows of an Arrow table, nanosecond timestamps as integers (datetime stops at microseconds)."""
    cols = [c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c for c in table.columns]
    return pa.table(cols, names=table.column_names).to_pylist()


def rfc3339_ns(text):
    """Nanoseconds since the epoch of an RFC 3339 UTC time with up to nine fractional digits."""
    whole, _, frac = text.rstrip("Z").partition(".")
    s = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return int(s) * 1_000_000_000 + int((frac + "000000000")[:9])


class ExportTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.device = cls.server = cls.tmp = None
        try:
            cls.set_up()
        except BaseException:
            # tearDownClass does not run when setUpClass fails: stop the server here.
            cls.tearDownClass()
            raise

    @classmethod
    def set_up(cls):
        cls.tmp = tempfile.mkdtemp(prefix="wardflow-export-")
        rules = os.path.join(cls.tmp, "rules")
        os.makedirs(rules)
        with open(os.path.join(rules, "icu.toml"), "w") as f:
            f.write(RULES)
        cls.server = Server("--rules", rules)
        wardflow(cls.server.data, "patients", "admit", "p-1", "--unit", "icu-a", "--bed", "bed-1")
        cls.server.start()
        secret = cls.server.add_device("mon-1", "p-1")
        other = cls.server.add_device("mon-9", "p-9")
        cls.device = cls.connect("mon-1", secret)
        cls.published = cls.publish_all()
        # Another patient's reading must not leak into p-1's export.
        d9 = cls.connect("mon-9", other)
        d9.publish("wardflow/v1/devices/mon-9/readings",
                   json.dumps([{"n": "hr", "u": "/min", "v": 99, "t": time.time() - 5}]), qos=1).wait_for_publish(10)
        d9.disconnect()
        d9.loop_stop()
        rows = cls.server.wait_rows("p-1", len(cls.published), timeout=30)
        assert len(rows) == len(cls.published), f"stored {len(rows)} of {len(cls.published)}"
        cls.alert = wait_for(lambda: [a for a in cls.alerts() if a["state"] == "resolved"], timeout=20)
        assert cls.alert, "no resolved spo2-low alert: " + cls.server.log_text()[-3000:]
        cls.alert = cls.alert[0]
        # A clinician reads the patient's data: an access the export must list.
        wardflow(cls.server.data, "query", "--patient", "p-1", "--as", "clinician:rn-a",
                 "--purpose", "treatment")
        # ... which the engine records and seals into an anchored batch.
        proven = wait_for(lambda: [r for r in cls.audit() if r["actor"] == "clinician:rn-a"
                                   and r["proof"].startswith("proven")], timeout=30)
        assert proven, f"the query never got proven: {cls.audit()}"
        # Exports happen while the engine runs (it records each access).
        cls.bundle_path = os.path.join(cls.tmp, "p-1.json")
        cls.fhir = wardflow(cls.server.data, "export", "--patient", "p-1", "--format", "fhir",
                            "--out", cls.bundle_path)
        cls.csv_dir = os.path.join(cls.tmp, "csv")
        wardflow(cls.server.data, "export", "--patient", "p-1", "--format", "csv", "--out", cls.csv_dir)
        cls.parquet_dir = os.path.join(cls.tmp, "parquet")
        wardflow(cls.server.data, "export", "--patient", "p-1", "--format", "parquet",
                 "--out", cls.parquet_dir, "--as", "analyst:ann", "--purpose", "research:s1")
        with open(cls.bundle_path) as f:
            cls.bundle = json.load(f)

    @classmethod
    def tearDownClass(cls):
        if cls.device is not None:
            cls.device.disconnect()
            cls.device.loop_stop()
        if cls.server is not None:
            cls.server.close()
        if cls.tmp is not None:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def connect(cls, device, secret):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
        c.username_pw_set(device, secret)
        c.connect("127.0.0.1", cls.server.mqtt_port)
        c.loop_start()
        return c

    @classmethod
    def audit(cls):
        return json.loads(wardflow(cls.server.data, "audit", "--patient", "p-1", "--format", "json").stdout)

    @classmethod
    def alerts(cls):
        return json.loads(wardflow(cls.server.data, "alerts", "list", "--patient", "p-1",
                                   "--format", "json").stdout)

    @classmethod
    def publish_all(cls):
        """Publishes p-1's readings; returns (metric, time_ns, value, quality) of each."""
        topic = "wardflow/v1/devices/mon-1/readings"
        out = []

        def send(payload):
            cls.device.publish(topic, payload, qos=1).wait_for_publish(10)

        base = int(time.time()) - 20
        # Two hours earlier, in another hour of the store: the export
        # reads hour by hour.
        early = (base - 7200) * 1_000_000_000 + 500_000_000
        send(json.dumps([{"n": "hr", "u": "/min", "v": 64, "t": base - 7200 + 0.5}]))
        out.append(("hr", early, 64.0, 0))
        # SenML: seven vitals an eighth of a second past a whole second
        # (exact in binary, so the time survives SenML's float seconds).
        t = base + 0.125
        vitals = [("hr", 72, "/min"), ("spo2", 97, "%"), ("rr", 16, "/min"), ("sbp", 121, "mm[Hg]"),
                  ("dbp", 79, "mm[Hg]"), ("map", 93, "mm[Hg]"), ("temp", 37.2, "Cel")]
        send(json.dumps([{"n": n, "u": u, "v": v, "t": t} for n, v, u in vitals]))
        ns = base * 1_000_000_000 + 125_000_000
        out += [(n, ns, float(v), 0) for n, v, _ in vitals]
        # The binary frame: nanosecond times, a questionable heart rate,
        # and a temperature sent in Fahrenheit (converted on ingest).
        bt = (base + 2) * 1_000_000_000 + 123_456_789
        send(frame(1, bt, [(0, "hr", 131.0, "canonical", 0x01), (1, "temp", 98.6, "[degF]", 0)]))
        out += [("hr", bt, 131.0, 0x01), ("temp", bt + 1000, 37.0, 0x80)]
        # SpO2 below 88 % for 3 s raises the alert; 96 % resolves it.
        for i, v in enumerate([84, 85, 84, 83, 96, 97]):
            ti = base + 5 + i
            send(json.dumps([{"n": "spo2", "u": "%", "v": v, "t": ti}]))
            out.append(("spo2", ti * 1_000_000_000, float(v), 0))
        return out

    # --- FHIR ---------------------------------------------------------------

    def resources(self, kind):
        return [e["resource"] for e in self.bundle["entry"] if e["resource"]["resourceType"] == kind]

    def test_bundle_reads_as_fhir_json(self):
        with open(self.bundle_path) as f:
            text = f.read()
        self.assertTrue(text.startswith('{\n  "resourceType": "Bundle"'), text[:80])
        # stdout gives the same kind of bundle; --from leaves the early reading out.
        out = json.loads(wardflow(self.server.data, "export", "--patient", "p-1", "--from", "-1h",
                                  "--as", "p-1").stdout)
        Bundle.model_validate(out)

        def times(b):
            return sorted(e["resource"]["effectiveDateTime"] for e in b["entry"]
                          if e["resource"]["resourceType"] == "Observation")
        early = rfc3339(min(ns for _, ns, _, _ in self.published))
        self.assertIn(early, times(self.bundle))
        self.assertEqual(times(out), [t for t in times(self.bundle) if t != early])
        self.assertNotEqual(out["id"], self.bundle["id"], "a fresh bundle id per export")

    def test_bundle_validates_with_fhir_resources(self):
        bundle = Bundle.model_validate(self.bundle)
        self.assertEqual(bundle.type, "collection")
        self.assertIsNotNone(bundle.timestamp)
        self.assertTrue(bundle.identifier.value.startswith("urn:uuid:"))
        # Each entry against its own resource model too.
        kinds = set()
        for e in self.bundle["entry"]:
            kind = e["resource"]["resourceType"]
            kinds.add(kind)
            get_fhir_model_class(kind).model_validate(e["resource"])
        self.assertEqual(kinds, {"Patient", "Device", "Observation", "DetectedIssue", "AuditEvent"})

    def test_references_resolve_inside_the_bundle(self):
        full_urls = {e["fullUrl"] for e in self.bundle["entry"]}
        for e in self.bundle["entry"]:
            self.assertEqual(e["fullUrl"], "urn:uuid:" + e["resource"]["id"])

        def refs(node):
            if isinstance(node, dict):
                if "reference" in node:
                    yield node["reference"]
                for v in node.values():
                    yield from refs(v)
            elif isinstance(node, list):
                for v in node:
                    yield from refs(v)

        found = list(refs(self.bundle))
        self.assertTrue(found)
        for r in found:
            self.assertIn(r, full_urls)
        (patient,) = self.resources("Patient")
        self.assertEqual(patient["identifier"][0]["value"], "p-1")
        (device,) = self.resources("Device")
        self.assertEqual(device["identifier"][0]["value"], "mon-1", "only p-1's device")

    def test_observations_match_what_was_published(self):
        obs = [o for o in self.resources("Observation") if o["code"]["coding"][0]["code"] != "85354-9"]
        self.assertEqual(len(obs), len(self.published))
        (patient,) = self.resources("Patient")
        (device,) = self.resources("Device")
        by_loinc = {v[0]: k for k, v in CODES.items()}
        got = []
        for o in obs:
            coding = o["code"]["coding"][0]
            self.assertEqual(coding["system"], LOINC)
            metric = by_loinc[coding["code"]]
            loinc, ucum, profile = CODES[metric]
            q = o["valueQuantity"]
            self.assertEqual((q["system"], q["code"]), (UCUM, ucum), metric)
            self.assertEqual(o["status"], "final")
            self.assertEqual(o["category"][0]["coding"][0]["code"], "vital-signs")
            self.assertIn(VITALS, o["meta"]["profile"])
            if profile:
                self.assertIn(f"http://hl7.org/fhir/StructureDefinition/{profile}", o["meta"]["profile"])
            self.assertEqual(o["subject"]["reference"], "urn:uuid:" + patient["id"])
            self.assertEqual(o["device"]["reference"], "urn:uuid:" + device["id"])
            quality = o.get("interpretation", [{}])[0].get("coding", [{}])[0].get("code")
            got.append((metric, o["effectiveDateTime"], q["value"], quality))
        expected = [(m, rfc3339(ns), v, "questionable" if q & 1 else None) for m, ns, v, q in self.published]
        key = lambda x: (x[1], x[0])
        got.sort(key=key)
        expected.sort(key=key)
        self.assertEqual([(m, t, q) for m, t, _, q in got], [(m, t, q) for m, t, _, q in expected])
        for (m, t, v, _), (_, _, w, _) in zip(got, expected):
            self.assertAlmostEqual(v, w, places=6, msg=f"{m} at {t}")
        # The nanoseconds of the binary frame survive.
        self.assertTrue(any(t.endswith(".123456789Z") for _, t, _, _ in got))
        # SpO2 also carries 2708-6, which the oxygensat profile fixes.
        spo2 = next(o for o in obs if o["code"]["coding"][0]["code"] == "59408-5")
        self.assertIn("2708-6", [c["code"] for c in spo2["code"]["coding"]])

    def test_blood_pressure_panel(self):
        panels = [o for o in self.resources("Observation") if o["code"]["coding"][0]["code"] == "85354-9"]
        self.assertEqual(len(panels), 1)
        p = panels[0]
        self.assertIn("http://hl7.org/fhir/StructureDefinition/bp", p["meta"]["profile"])
        comp = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in p["component"]}
        self.assertEqual(comp["8480-6"]["value"], 121)
        self.assertEqual(comp["8462-4"]["value"], 79)
        self.assertEqual(comp["8480-6"]["code"], "mm[Hg]")

    def test_alert_is_a_detected_issue(self):
        (issue,) = self.resources("DetectedIssue")
        self.assertEqual(issue["identifier"][0]["value"], self.alert["id"])
        self.assertEqual(issue["code"]["coding"][0]["code"], "spo2-low")
        self.assertEqual(issue["severity"], "high")
        self.assertEqual(issue["status"], "final")
        self.assertIn("end", issue["identifiedPeriod"])
        # The evidence points at the SpO2 readings in the bundle.
        ids = {o["id"]: o for o in self.resources("Observation")}
        evidence = [d["reference"].removeprefix("urn:uuid:") for e in issue.get("evidence", [])
                    for d in e.get("detail", [])]
        self.assertTrue(evidence)
        for i in evidence:
            self.assertEqual(ids[i]["code"]["coding"][0]["code"], "59408-5")
            self.assertLess(ids[i]["valueQuantity"]["value"], 88)

    def test_access_log_is_audit_events(self):
        events = self.resources("AuditEvent")
        actions = [(e["subtype"][0]["code"], e["agent"][0]["who"]["display"],
                    e["purposeOfEvent"][0]["text"]) for e in events]
        self.assertIn(("query", "clinician:rn-a", "treatment"), actions)
        # (The harness's own queries while waiting for rows are accesses too.)
        (query,) = [e for e in events if e["subtype"][0]["code"] == "query"
                    and e["agent"][0]["who"]["display"] == "clinician:rn-a"]
        details = {d["type"]: d["valueString"] for d in query["entity"][0]["detail"]}
        self.assertEqual(details["proof-status"], "proven", "sealed and anchored before the export")
        self.assertTrue(details["proof"].startswith("proven in batch"))
        self.assertEqual(query["type"]["code"], "110112")
        self.assertEqual(query["purposeOfEvent"][0]["coding"][0]["code"], "TREAT")
        # The export lists itself.
        mine = [e for e in events if e["subtype"][0]["code"] == "export"]
        self.assertEqual(len(mine), 1, actions)
        self.assertEqual(mine[0]["type"]["code"], "110106")
        self.assertEqual(mine[0]["purposeOfEvent"][0]["coding"][0]["code"], "PATRQT")
        for e in events:
            details = {d["type"]: d["valueString"] for d in e["entity"][0]["detail"]}
            self.assertIn(details["proof-status"],
                          {"proven", "not-sealed", "not-recorded", "not-in-batch", "batch-mismatch"})

    def test_every_export_is_in_the_audit_trail(self):
        def exports():
            return [r for r in self.audit() if r["action"] == "export"]
        rows = wait_for(lambda: len(exports()) >= 3 and exports(), timeout=20)
        # The three of setUpClass (another test may add one of its own).
        self.assertGreaterEqual(len(rows), 3)
        self.assertEqual({r["purpose"] for r in rows}, {"patient-request", "research:s1"})
        self.assertIn("analyst:ann", {r["actor"] for r in rows})

    # --- CSV and Parquet ------------------------------------------------------

    def check_readings(self, times_ns, metrics, values, loinc, units, quality):
        expected = sorted(self.published, key=lambda x: (x[1], x[0]))
        got = sorted(zip(times_ns, metrics, values, loinc, units, quality), key=lambda x: (x[0], x[1]))
        self.assertEqual(len(got), len(expected))
        for (t, m, v, lo, u, q), (em, et, ev, eq) in zip(got, expected):
            self.assertEqual((t, m, q), (et, em, eq))
            self.assertAlmostEqual(v, ev, places=6)
            self.assertEqual((lo, u), CODES[m][:2])

    def test_csv_tables(self):
        self.assertEqual(sorted(os.listdir(self.csv_dir)), ["access.csv", "alerts.csv", "readings.csv"])
        with open(os.path.join(self.csv_dir, "readings.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        ns = [rfc3339_ns(r["time"]) for r in rows]
        self.check_readings(ns, [r["metric"] for r in rows], [float(r["value"]) for r in rows],
                            [r["loinc"] for r in rows], [r["unit"] for r in rows],
                            [int(r["quality"]) for r in rows])
        self.assertIn("questionable", {r["quality_flags"] for r in rows})
        # pyarrow reads it too.
        table = pacsv.read_csv(os.path.join(self.csv_dir, "readings.csv"))
        self.assertEqual(table.num_rows, len(self.published))
        alerts = plain_rows(pacsv.read_csv(os.path.join(self.csv_dir, "alerts.csv")))
        self.assertEqual([(a["id"], a["rule"], a["state"]) for a in alerts],
                         [(self.alert["id"], "spo2-low", "resolved")])
        with open(os.path.join(self.csv_dir, "access.csv"), newline="") as f:
            access = list(csv.DictReader(f))
        self.assertIn(("clinician:rn-a", "query"), {(a["actor"], a["action"]) for a in access})
        self.assertIn("export", {a["action"] for a in access})

    def test_parquet_tables(self):
        readings = pq.read_table(os.path.join(self.parquet_dir, "readings.parquet"))
        self.assertEqual(readings.schema.field("time").type, pa.timestamp("ns", tz="UTC"))
        self.assertEqual(readings.schema.field("value").type, pa.float64())
        times = readings.column("time").cast(pa.int64()).to_pylist()
        self.check_readings(times, readings.column("metric").to_pylist(), readings.column("value").to_pylist(),
                            readings.column("loinc").to_pylist(), readings.column("unit").to_pylist(),
                            readings.column("quality").to_pylist())
        alerts = plain_rows(pq.read_table(os.path.join(self.parquet_dir, "alerts.parquet")))
        self.assertEqual(len(alerts), 1)
        self.assertEqual(alerts[0]["priority"], "high")
        self.assertEqual(alerts[0]["id"], self.alert["id"])
        self.assertGreater(alerts[0]["resolved"], alerts[0]["raised"])
        access = plain_rows(pq.read_table(os.path.join(self.parquet_dir, "access.parquet")))
        mine = [a for a in access if a["actor"] == "analyst:ann"]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["purpose"], "research:s1")
        # Recorded by the engine a moment after the export read the log, or not yet.
        self.assertIn(mine[0]["proof_status"], {"not-recorded", "not-sealed", "proven"})

    def test_csv_and_parquet_need_a_directory(self):
        out = wardflow(self.server.data, "export", "--patient", "p-1", "--format", "csv", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("--out DIR", out.stderr)


if __name__ == "__main__":
    unittest.main()
