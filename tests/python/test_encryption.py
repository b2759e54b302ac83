"""Encryption at rest and erasure, as an operator and an attacker see them.

A real `wardflow serve` with a master key stores two patients' readings
(published with paho-mqtt); the CLI reads them back with the key and is
refused without it. After `wardflow patients erase`, the erased patient's
values are nowhere in the data directory (text or binary), and the data
keys that remain, unwrapped here independently of the Rust code with the
`cryptography` package from the documented format (docs/storage.md), open
the other patient's sealed runs and none of the erased patient's.
"""

import glob
import json
import os
import struct
import subprocess
import tempfile
import unittest

import paho.mqtt.client as mqtt
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wardflow_harness import BIN, Server, now_s, wait_for, wardflow

SECONDS = 20
METRICS = [("hr", 70.0), ("spo2", 96.0), ("rr", 15.0)]


def value(patient_index, second, metric_index):
    """Normal vitals, each with a fraction no other reading has."""
    base = METRICS[metric_index][1]
    return round(base + second / 10 + patient_index * 0.3 + metric_index * 0.01 + 0.000731, 6)


def sealed_bytes_of(v):
    return [str(v).encode(), struct.pack("<d", v)]


def files_under(root):
    for dirpath, _, names in os.walk(root):
        for n in names:
            yield os.path.join(dirpath, n)


def holders(root, values):
    """Files under root holding any of the values, as text or f64 bytes."""
    found = set()
    for path in files_under(root):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        for v in values:
            if any(b in data for b in sealed_bytes_of(v)):
                found.add((os.path.relpath(path, root), v))
    return sorted(found)


def unwrap(master, name, entry):
    raw = bytes.fromhex(entry["wrapped"])
    aad = b"wardflow data key v1\0" + name.encode() + b"\0" + struct.pack("<I", entry["generation"])
    return AESGCM(master).decrypt(raw[:12], raw[12:], aad)


def sealed_runs(data_dir):
    """(patient, seal, ciphertext) of every sealed run in the readings files."""
    runs = []
    for path in glob.glob(os.path.join(data_dir, "readings", "**", "*.parquet"), recursive=True):
        t = pq.read_table(path)
        assert "value_sealed" in t.column_names and "value" not in t.column_names, path
        patients = t.column("patient_id").to_pylist()
        sealed = t.column("value_sealed").to_pylist()
        seals = t.column("seal").to_pylist()
        i = 0
        while i < len(patients):
            assert seals[i] is not None, f"{path}: row {i} starts no run"
            j = i + 1
            while j < len(patients) and seals[j] is None:
                j += 1
            runs.append((patients[i], seals[i], b"".join(sealed[i:j])))
            i = j
    return runs


def aes_key(data_key):
    """The AES-256-GCM key of a data key: HKDF-SHA-256, as docs/storage.md says."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"wardflow data key v1",
                info=b"aes-256-gcm").derive(data_key)


def open_run(key, name, seal, ciphertext):
    generation = struct.unpack("<I", seal[:4])[0]
    aad = b"wardflow/readings/value" + name.encode() + b"\0" + struct.pack("<I", generation)
    plain = AESGCM(aes_key(key)).decrypt(seal[4:16], ciphertext + seal[16:32], aad)
    return list(struct.unpack(f"<{len(plain) // 8}d", plain))


class EncryptionAtRest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.keydir = tempfile.TemporaryDirectory(prefix="wardflow-key-")
        cls.key_file = os.path.join(cls.keydir.name, "master.key")
        out = subprocess.run([BIN, "keys", "new-master", "--out", cls.key_file], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        cls.master_arg = ["--master-key", f"file:{cls.key_file}"]
        cls.server = Server(*cls.master_arg)
        cls.secrets = {p: cls.server.add_device(f"mon-{p}", p) for p in ("p-a", "p-b")}
        cls.server.start()
        cls.t0 = now_s() - SECONDS
        for i, p in enumerate(("p-a", "p-b")):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mon-{p}", protocol=mqtt.MQTTv5)
            c.username_pw_set(f"mon-{p}", cls.secrets[p])
            c.connect("127.0.0.1", cls.server.mqtt_port)
            c.loop_start()
            for s in range(SECONDS):
                records = [{"bt": cls.t0 + s, "n": m, "v": value(i, s, k), "seq": s * 3 + k} if k == 0
                           else {"n": m, "v": value(i, s, k), "seq": s * 3 + k}
                           for k, (m, _) in enumerate(METRICS)]
                c.publish(f"wardflow/v1/devices/mon-{p}/readings", json.dumps(records), qos=1).wait_for_publish(10)
            # An implausible value: a dead letter whose raw payload holds it.
            bad = {"bt": cls.t0 + SECONDS, "n": "hr", "v": 987.654321 + i, "seq": 999}
            c.publish(f"wardflow/v1/devices/mon-{p}/readings", json.dumps([bad]), qos=1).wait_for_publish(10)
            c.disconnect()
            c.loop_stop()

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.keydir.cleanup()

    def cli(self, *args, check=True):
        return wardflow(self.server.data, *args, *self.master_arg, check=check)

    def query(self, patient):
        out = self.cli("query", "--patient", patient, "--format", "json")
        return json.loads(out.stdout), out.stderr

    def values_of(self, i):
        return [value(i, s, k) for s in range(SECONDS) for k in range(len(METRICS))]

    def test_encryption_then_erasure(self):
        n = SECONDS * len(METRICS)
        rows = wait_for(lambda: len(self.query("p-a")[0]) >= n and len(self.query("p-b")[0]) >= n, timeout=30)
        self.assertTrue(rows, "readings never became queryable")
        for i, p in enumerate(("p-a", "p-b")):
            got, _ = self.query(p)
            self.assertEqual(sorted(r["value"] for r in got), sorted(self.values_of(i)))

        # Without the master key the store refuses to be read (or written).
        out = wardflow(self.server.data, "query", "--patient", "p-a", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("encrypted at rest", out.stderr)

        # The store's files hold no value in the clear (the write-ahead
        # log holds payloads as received until they are stored).
        stored = [os.path.join(self.server.data, t) for t in ("readings", "deadletters")]
        for root in stored:
            self.assertEqual(holders(root, self.values_of(0) + self.values_of(1) + [987.654321]), [])

        # The search finds what is there: the log's current segment holds
        # the payloads as they were received.
        self.assertTrue(holders(os.path.join(self.server.data, "wal"), self.values_of(0)[:3]))

        # Dead letters read back with the key, sealed payload opened.
        dls = json.loads(self.cli("deadletters", "list", "--format", "json").stdout)
        self.assertTrue(any("987.654321" in d["raw"] for d in dls), dls)

        out = self.cli("patients", "erase", "p-a", "--reason", "the patient's request")
        self.assertIn("destroyed", out.stdout)

        got, err = self.query("p-a")
        self.assertEqual(got, [])
        self.assertIn("erased", err)
        got, err = self.query("p-b")
        self.assertEqual(sorted(r["value"] for r in got), sorted(self.values_of(1)))

        # The running engine lets its log segment go; then no file in the
        # data directory holds any of the erased patient's values.
        erased_values = self.values_of(0) + [987.654321]
        left = wait_for(lambda: not holders(self.server.data, erased_values), timeout=30)
        self.assertTrue(left, holders(self.server.data, erased_values))

        # An export (the patient's right of access) says so too, and holds
        # the other patient's values read with the key.
        out = self.cli("export", "--patient", "p-a", "--format", "fhir")
        self.assertIn("erased", out.stderr)
        bundle = json.loads(out.stdout)
        self.assertFalse([e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"])
        out = self.cli("export", "--patient", "p-b", "--format", "fhir")
        got = sorted(c["valueQuantity"]["value"] for c in
                     (e["resource"] for e in json.loads(out.stdout)["entry"])
                     if c["resourceType"] == "Observation")
        self.assertEqual(got, sorted(self.values_of(1)))

        # The erasure is on the audit trail.
        audit = self.cli("audit", "--patient", "p-a").stdout
        self.assertIn("erase", audit)

        self.server.stop()
        self.assertEqual(holders(self.server.data, erased_values), [])

        # The remaining keys, unwrapped with the master key, open p-b's runs
        # and none of p-a's.
        with open(self.key_file) as f:
            master = bytes.fromhex(f.read().strip())
        with open(os.path.join(self.server.data, "keys", "keyring.json")) as f:
            ring = json.load(f)
        self.assertNotIn("p-a", ring["keys"])
        self.assertEqual([e["generation"] for e in ring["erased"]["p-a"]], [1])
        keys = {name: unwrap(master, name, e) for name, e in ring["keys"].items()}
        self.assertIn("p-b", keys)
        runs = sealed_runs(self.server.data)
        opened_b = []
        a_runs = 0
        for patient, seal, ct in runs:
            if patient == "p-b":
                opened_b += open_run(keys["p-b"], "p-b", seal, ct)
            elif patient == "p-a":
                a_runs += 1
                for name, key in keys.items():
                    for aad_name in {name, "p-a"}:
                        with self.assertRaises(InvalidTag):
                            open_run(key, aad_name, seal, ct)
        self.assertGreater(a_runs, 0)
        self.assertEqual(sorted(opened_b), sorted(self.values_of(1)))


if __name__ == "__main__":
    unittest.main()
