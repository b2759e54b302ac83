"""The web console's API with a real HTTP client (urllib with a cookie jar)
while paho-mqtt devices publish: sign-in and sessions, what each role may
see (units, consents, the patient's own data), the live stream and the end
of an access at a revocation, trends, devices, the patient's consent pages
and access log, and the page served when the console is not built.
"""

import http.cookiejar
import json
import os
import re
import time
import unittest
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt

from wardflow_harness import Server, wait_for, wardflow


class Browser:
    """One signed-in user agent: a cookie jar over urllib."""

    def __init__(self, port):
        self.port = port
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def call(self, method, path, body=None, content_type="application/json"):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content_type and method == "POST" else {}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=data if method == "POST" else None, headers=headers)
        if method == "POST" and data is None:
            req.data = b"{}"
        try:
            with self.opener.open(req, timeout=15) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, method, path, body=None):
        status, _, raw = self.call(method, path, body)
        return status, json.loads(raw) if raw else None

    def sign_in(self, **login):
        status, headers, raw = self.call("POST", "/v1/console/login", login)
        return status, headers, json.loads(raw)


def senml(device_t, values):
    return json.dumps([{"n": n, "u": u, "v": v, "t": device_t} for n, u, v in values])


class ConsoleApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        data = cls.server.data
        wardflow(data, "patients", "admit", "p-a", "--unit", "icu-a", "--bed", "b1")
        wardflow(data, "patients", "admit", "p-b", "--unit", "icu-b", "--bed", "b1")
        secret = lambda out: re.search(r"secret: (\S+)", out).group(1)
        cls.rn_a = secret(wardflow(data, "clinicians", "add", "rn-a", "--units", "icu-a").stdout)
        cls.rn_b = secret(wardflow(data, "clinicians", "add", "rn-b", "--units", "icu-b").stdout)
        cls.admin = secret(wardflow(data, "admins", "add", "it-1").stdout)
        cls.admin2 = secret(wardflow(data, "admins", "add", "it-2").stdout)
        cls.key = os.path.join(cls.server.tmp.name, "p-a.key")
        wardflow(data, "consent", "keygen", "--out", cls.key)
        wardflow(data, "consent", "register", "--patient", "p-a", "--key", cls.key)
        out = wardflow(data, "consent", "grant", "--key", cls.key, "--patient", "p-a", "--to", "rn-b",
                       "--purpose", "treatment", "--scope", "vitals", "--minutes", "60").stdout
        cls.grant = re.search(r"grant ([0-9a-f]{32})", out).group(1)
        wardflow(data, "observe", "p-a", "--consciousness", "V")
        cls.server.start()
        cls.port = cls.server.http_port
        cls.devices = {}
        for device, patient in (("mon-a", "p-a"), ("mon-b", "p-b")):
            secret = cls.server.add_device(device, patient)
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
            c.username_pw_set(device, secret)
            c.connect("127.0.0.1", cls.server.mqtt_port)
            c.loop_start()
            cls.devices[device] = c
        cls.sent = []
        for i in range(5):
            t = time.time()
            hr = 70 + i
            cls.sent.append((t, hr))
            for device, c in cls.devices.items():
                c.publish(f"wardflow/v1/devices/{device}/readings",
                          senml(t, [("hr", "/min", hr), ("spo2", "%", 97), ("rr", "/min", 14),
                                    ("sbp", "mm[Hg]", 120), ("dbp", "mm[Hg]", 70),
                                    ("temp", "Cel", 37.0)]), qos=1).wait_for_publish(10)
            time.sleep(0.3)
        assert cls.server.wait_rows("p-a", 30), "the readings were not stored"

    @classmethod
    def tearDownClass(cls):
        for c in cls.devices.values():
            c.disconnect()
            c.loop_stop()
        cls.server.close()

    def clinician(self, who):
        b = Browser(self.port)
        status, _, me = b.sign_in(role="clinician", id=who, secret={"rn-a": self.rn_a, "rn-b": self.rn_b}[who])
        self.assertEqual(status, 200, me)
        return b

    def patient(self):
        token = wardflow(self.server.data, "consent", "token", "--key", self.key, "--patient", "p-a").stdout.strip()
        b = Browser(self.port)
        status, _, me = b.sign_in(role="patient", patient="p-a", token=token)
        self.assertEqual(status, 200, me)
        self.assertEqual(me["role"], "patient")
        return b

    def test_a_sign_in_and_sessions(self):
        b = Browser(self.port)
        status, _, body = b.sign_in(role="clinician", id="rn-a", secret="not-the-secret-1234")
        self.assertEqual(status, 401, body)
        status, _, _ = b.call("POST", "/v1/console/login",
                              {"role": "clinician", "id": "rn-a", "secret": self.rn_a}, content_type="text/plain")
        self.assertEqual(status, 415, "a change must be sent as JSON")
        self.assertEqual(b.call("GET", "/v1/console/me")[0], 401)
        status, headers, me = b.sign_in(role="clinician", id="rn-a", secret=self.rn_a)
        self.assertEqual(status, 200)
        cookie = headers["Set-Cookie"]
        self.assertIn("wardflow_session=", cookie)
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        self.assertEqual(me, {"role": "clinician", "id": "rn-a", "units": ["icu-a"], "patient": None})
        self.assertEqual(b.json("GET", "/v1/console/me")[1]["id"], "rn-a")
        # An administrator's secret is not a clinician's, and the other way round.
        self.assertEqual(Browser(self.port).sign_in(role="clinician", id="it-1", secret=self.admin)[0], 401)
        self.assertEqual(Browser(self.port).sign_in(role="admin", id="rn-a", secret=self.rn_a)[0], 401)
        # A patient's token signed by another key is refused.
        self.assertEqual(Browser(self.port).sign_in(role="patient", patient="p-b", token="1:00")[0], 401)
        # Guessing: after five failures an account waits, whatever is tried.
        guesser = Browser(self.port)
        codes = [guesser.sign_in(role="admin", id="it-2", secret=f"guess-{i:012d}")[0] for i in range(6)]
        self.assertEqual(codes, [401] * 5 + [429])
        self.assertEqual(guesser.sign_in(role="admin", id="it-2", secret=self.admin2)[0], 429)
        self.assertEqual(Browser(self.port).sign_in(role="admin", id="it-1", secret=self.admin)[0], 200,
                         "another account is not held up")
        self.assertEqual(b.call("POST", "/v1/console/logout")[0], 200)
        self.assertEqual(b.call("GET", "/v1/console/me")[0], 401, "signed out")

    def test_b_what_each_role_sees(self):
        tiles = lambda b: {t["patient"]: t for t in b.json("GET", "/v1/console/tiles")[1]}
        a = tiles(self.clinician("rn-a"))
        self.assertEqual(set(a), {"p-a"})
        self.assertEqual(a["p-a"]["via"], "unit")
        b_tiles = wait_for(lambda: (lambda t: t if "hr" in t.get("p-b", {}).get("values", {}) else None)(
            tiles(self.clinician("rn-b"))), timeout=10)
        self.assertEqual(set(b_tiles), {"p-a", "p-b"}, "rn-b sees their unit and the consenting patient")
        self.assertEqual(b_tiles["p-a"]["via"], "consent")
        self.assertEqual(b_tiles["p-b"]["values"]["hr"]["v"], self.sent[-1][1], "the latest heart rate")
        self.assertEqual(b_tiles["p-b"]["values"]["spo2"]["v"], 97)
        self.assertFalse(b_tiles["p-b"]["values"]["hr"]["stale"])
        admin = Browser(self.port)
        self.assertEqual(admin.sign_in(role="admin", id="it-1", secret=self.admin)[0], 200)
        self.assertEqual(set(tiles(admin)), {"p-a", "p-b"})
        patient = self.patient()
        self.assertEqual(set(tiles(patient)), {"p-a"})

        rn_a = self.clinician("rn-a")
        status, body = rn_a.json("GET", "/v1/console/patients/p-b/trend?hours=1")
        self.assertEqual(status, 403, body)
        self.assertEqual(patient.json("GET", "/v1/console/patients/p-b/trend?hours=1")[0], 403)
        self.assertEqual(rn_a.json("GET", "/v1/console/patients/p-a/trend?hours=3")[0], 400)
        status, trend = self.clinician("rn-b").json("GET", "/v1/console/patients/p-a/trend?hours=1")
        self.assertEqual(status, 200, trend)
        self.assertEqual(trend["series"]["hr"]["v"], [hr for _, hr in self.sent])
        for got, (t, _) in zip(trend["series"]["hr"]["t"], self.sent):
            self.assertAlmostEqual(got, t * 1000, delta=1)
        self.assertEqual(set(trend["series"]), {"hr", "spo2", "rr", "sbp", "dbp", "temp"})
        self.assertIsInstance(trend["news2"]["v"], list)
        # The consent covers vitals only: not the manual observations, which
        # the patient's own unit sees.
        self.assertEqual(trend["observations"], [])
        own = self.clinician("rn-a").json("GET", "/v1/console/patients/p-a/trend?hours=1")[1]
        self.assertEqual([o["consciousness"] for o in own["observations"]], ["V"])

    def test_c_devices_and_alarm_commands(self):
        admin = Browser(self.port)
        admin.sign_in(role="admin", id="it-1", secret=self.admin)
        status, rows = admin.json("GET", "/v1/console/devices")
        self.assertEqual(status, 200)
        by = {r["device"]: r for r in rows}
        self.assertEqual(set(by), {"mon-a", "mon-b"})
        self.assertEqual(by["mon-a"]["patient"], "p-a")
        self.assertEqual(by["mon-a"]["unit"], "icu-a")
        self.assertIn(by["mon-a"]["status"], ("online", "offline"))
        self.assertGreaterEqual(by["mon-a"]["rate"], 0)
        self.assertEqual(by["mon-a"]["dead_letters"], 0)
        rows = self.clinician("rn-a").json("GET", "/v1/console/devices")[1]
        self.assertEqual([r["device"] for r in rows], ["mon-a"], "a clinician sees their unit's devices")
        patient = self.patient()
        self.assertEqual(patient.json("GET", "/v1/console/devices")[0], 403)
        self.assertEqual(patient.json("POST", "/v1/console/alerts/anything/ack")[0], 403)
        self.assertEqual(self.clinician("rn-a").json("POST", "/v1/console/alerts/no-such-alert/ack")[0], 404)

    def test_d_patient_pages(self):
        patient = self.patient()
        status, consents = patient.json("GET", "/v1/console/me/consents")
        self.assertEqual(status, 200)
        mine = {c["id"]: c for c in consents}
        self.assertIn(self.grant, mine)
        self.assertEqual(mine[self.grant]["grantee"], "rn-b")
        self.assertTrue(mine[self.grant]["in_force"])
        # What the browser is given to sign: the consent record itself.
        status, prepared = patient.json("POST", "/v1/console/me/consents/prepare",
                                        {"op": "revoke", "grant": self.grant})
        self.assertEqual(status, 200, prepared)
        payload = bytes.fromhex(prepared["payload"])
        self.assertTrue(payload.startswith(b"WFC1"))
        self.assertEqual(json.loads(payload[4:]), {"op": "revoke", "patient": "p-a", "grant": self.grant})
        status, body = patient.json("POST", "/v1/console/me/consents",
                                    {"payload": prepared["payload"], "signature": "00" * 64})
        self.assertEqual(status, 400, "a signature that is not the patient's is refused")
        self.assertIn("not the patient's", body["error"])
        self.assertEqual(patient.json("POST", "/v1/console/me/consents/prepare",
                                      {"op": "revoke", "grant": "0" * 32})[0], 404)
        self.assertEqual(patient.json("POST", "/v1/console/me/consents/prepare",
                                      {"op": "grant", "grantee": "rn-a", "purpose": "treatment",
                                       "scope": ["everything"], "days": 3})[0], 400)
        # Pages of the patient's own are not for clinicians.
        self.assertEqual(self.clinician("rn-b").json("GET", "/v1/console/me/consents")[0], 403)
        # rn-b's view of p-a is on p-a's access log, with its proof status.
        self.clinician("rn-b").json("GET", "/v1/console/patients/p-a/trend?hours=8")
        rows = wait_for(lambda: [r for r in patient.json("GET", "/v1/console/me/access")[1]
                                 if r["actor"] == "clinician:rn-b" and r["action"] == "view"
                                 and "8 h" in r["detail"]], timeout=15)
        self.assertTrue(rows, "the view is on the access log")
        self.assertEqual(rows[-1]["purpose"], "treatment")
        admin = Browser(self.port)
        admin.sign_in(role="admin", id="it-1", secret=self.admin)
        admin.json("GET", "/v1/console/tiles")
        self.assertTrue(wait_for(lambda: [r for r in patient.json("GET", "/v1/console/me/access")[1]
                                          if r["actor"] == "admin:it-1" and r["purpose"] == "administration"],
                                 timeout=15), "an administrator's view is recorded as theirs")
        self.assertIn(self.grant, rows[-1]["detail"], "the consent it was under")
        self.assertTrue(rows[-1]["proof"])

    def open_stream(self, browser):
        """The console stream of `browser`, and a reader of its events."""
        r = browser.opener.open(urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/console/stream"),
                                timeout=15)
        events = []

        def read_until(pred, timeout):
            deadline = time.time() + timeout
            name = None
            while time.time() < deadline:
                line = r.readline()
                if not line:
                    return "closed"
                line = line.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if pred(events[-1]):
                        return events[-1]
            return None

        return r, read_until

    def test_f_signing_out_ends_the_stream_and_a_transfer_removes_the_tile(self):
        b = self.clinician("rn-b")
        r, read_until = self.open_stream(b)
        with r:
            self.assertIsNotNone(read_until(lambda e: e[0] == "tile" and e[1]["patient"] == "p-b", 5))
            wardflow(self.server.data, "patients", "transfer", "p-b", "--unit", "icu-a", "--bed", "b2")
            gone = read_until(lambda e: e[0] == "access", 10)
            self.assertEqual(gone[1], {"patient": "p-b", "lost": True}, "transferred out of rn-b's unit")
            wardflow(self.server.data, "patients", "transfer", "p-b", "--unit", "icu-b", "--bed", "b1")
            back = read_until(lambda e: e[0] == "tile" and e[1]["patient"] == "p-b", 10)
            self.assertEqual(back[1]["unit"], "icu-b")
            self.assertEqual(b.call("POST", "/v1/console/logout")[0], 200)
            self.assertEqual(read_until(lambda e: False, 10), "closed", "signing out ends the open stream")

    def test_e_stream_and_the_end_of_an_access(self):
        b = self.clinician("rn-b")
        r, read_until = self.open_stream(b)
        with r:
            self.assertEqual(r.headers["Content-Type"], "text/event-stream")
            hello = read_until(lambda e: e[0] == "hello", 5)
            self.assertEqual(hello[1]["id"], "rn-b")
            tile = read_until(lambda e: e[0] == "tile" and e[1]["patient"] == "p-a", 5)
            self.assertEqual(tile[1]["via"], "consent")
            # The patient revokes (with the CLI, their wallet's stand-in).
            wardflow(self.server.data, "consent", "revoke", "--key", self.key, "--patient", "p-a",
                     "--grant", self.grant)
            lost = read_until(lambda e: e[0] == "access", 10)
            self.assertEqual(lost[1], {"patient": "p-a", "lost": True})
        status, _ = b.json("GET", "/v1/console/patients/p-a/trend?hours=1")
        self.assertEqual(status, 403, "the revocation ends the access")
        self.assertEqual({t["patient"] for t in b.json("GET", "/v1/console/tiles")[1]}, {"p-b"})
        consents = {c["id"]: c for c in self.patient().json("GET", "/v1/console/me/consents")[1]}
        self.assertTrue(consents[self.grant]["revoked"])


class ConsoleFiles(unittest.TestCase):
    def test_a_page_says_how_to_build_a_missing_console(self):
        server = Server()
        os.environ["WARDFLOW_CONSOLE_DIR"] = os.path.join(server.tmp.name, "no-console-here")
        try:
            server.start()
        finally:
            del os.environ["WARDFLOW_CONSOLE_DIR"]
        try:
            b = Browser(server.http_port)
            status, headers, body = b.call("GET", "/")
            self.assertEqual(status, 503)
            self.assertIn("text/html", headers["Content-Type"])
            text = body.decode()
            self.assertIn("npm ci", text)
            self.assertIn("npm run build", text)
            self.assertIn("no-console-here", text)
            self.assertEqual(b.call("GET", "/assets/app.js")[0], 404)
            # The rest of the engine serves on.
            self.assertEqual(b.call("GET", "/healthz")[0], 200)
        finally:
            server.close()

    def test_b_the_built_console_is_served_with_its_policy(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.isfile(os.path.join(root, "console", "dist", "index.html")):
            self.fail("the console is not built (cd console && npm ci && npm run build)")
        server = Server().start()
        try:
            b = Browser(server.http_port)
            status, headers, body = b.call("GET", "/")
            self.assertEqual(status, 200)
            self.assertIn("default-src 'self'", headers["Content-Security-Policy"])
            self.assertEqual(headers["X-Frame-Options"], "DENY")
            script = re.search(r'src="(/assets/[^"]+\.js)"', body.decode()).group(1)
            status, headers, _ = b.call("GET", script)
            self.assertEqual(status, 200)
            self.assertIn("javascript", headers["Content-Type"])
            self.assertIn("immutable", headers["Cache-Control"])
            self.assertEqual(b.call("GET", "/../Cargo.toml")[0], 404)
            self.assertEqual(b.call("GET", "/assets/%2e%2e/%2e%2e/Cargo.toml")[0], 404)
        finally:
            server.close()


if __name__ == "__main__":
    unittest.main()
