"""Alert feeds as clinicians see them: paho-mqtt (3.1.1 and 5.0),
mosquitto_sub, and HTTP (Server-Sent Events and POST acknowledgements),
against a real `wardflow serve` with a rules directory of its own."""

import json
import os
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from wardflow_harness import Server, wait_for, wardflow

# Short sustain times keep the test quick; the shipped rules use 10-60 s.
RULES = """
[[rule]]
id = "spo2-low"
description = "SpO2 below 88 % for 2 s"
priority = "high"
when = { metric = "spo2", below = 88, exit = 92 }
for = "2s"
escalate_after = "1h"

[[rule]]
id = "hr-high"
description = "Heart rate above 140/min for 2 s"
priority = "medium"
when = { metric = "hr", above = 140, exit = 130 }
for = "2s"
"""

BAD_RULES = """
[[rule]]
id = "broken"
priority = "high"
when = { metric = "spo2", below = 90, exit = 80 }
"""


def senml(metric, value, unit, t):
    return json.dumps([{"n": metric, "u": unit, "v": value, "t": t}])


class Clinician:
    """A paho client subscribed to alert topics, recording every message."""

    def __init__(self, server, name, secret, protocol, client_id=None):
        self.messages = []
        self.lock = threading.Lock()
        self.granted = {}
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        self.connack = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"{name}-{protocol}", protocol=protocol)
        self.client.username_pw_set(name, secret)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", server.mqtt_port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted[mid] = reason_codes
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def subscribe(self, topic, qos=1):
        self.subscribed.clear()
        _, mid = self.client.subscribe(topic, qos=qos)
        assert self.subscribed.wait(10), "no SUBACK"
        return self.granted[mid]

    def alerts(self, **match):
        with self.lock:
            return [m for _, m in self.messages if all(m.get(k) == v for k, v in match.items())]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def code(rc):
    return rc.value if isinstance(rc, ReasonCode) else rc


class AlertFeedTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rules_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"wardflow-rules-{os.getpid()}")
        os.makedirs(cls.rules_dir, exist_ok=True)
        with open(os.path.join(cls.rules_dir, "icu.toml"), "w") as f:
            f.write(RULES)
        cls.server = Server("--rules", cls.rules_dir)
        data = cls.server.data
        wardflow(data, "patients", "admit", "p-1", "--unit", "icu-a", "--bed", "bed-1", "--age-years", "70")
        wardflow(data, "patients", "admit", "p-2", "--unit", "icu-b", "--bed", "bed-1")
        cls.nurse = cls.add_clinician("rn-a", "icu-a")
        cls.nurse2 = cls.add_clinician("rn-a2", "icu-a")
        cls.other = cls.add_clinician("rn-b", "icu-b")
        cls.server.start()
        cls.dev_secret = cls.server.add_device("mon-1", "p-1")
        cls.dev2_secret = cls.server.add_device("mon-2", "p-2")
        cls.device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mon-1",
                                 protocol=mqtt.MQTTv311)
        cls.device.username_pw_set("mon-1", cls.dev_secret)
        cls.device.connect("127.0.0.1", cls.server.mqtt_port)
        cls.device.loop_start()

    @classmethod
    def add_clinician(cls, name, units):
        out = wardflow(cls.server.data, "clinicians", "add", name, "--units", units).stdout
        return next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("secret: "))

    @classmethod
    def tearDownClass(cls):
        cls.device.disconnect()
        cls.device.loop_stop()
        cls.server.close()
        for f in os.listdir(cls.rules_dir):
            os.remove(os.path.join(cls.rules_dir, f))
        os.rmdir(cls.rules_dir)

    last_t = 0.0

    def publish_series(self, metric, value, unit, seconds):
        """A reading per simulated second, QoS 1: timestamps a second apart
        from the last one sent (or now), so they never go back in time."""
        cls = type(self)
        for _ in range(seconds):
            cls.last_t = max(time.time(), cls.last_t + 1)
            info = self.device.publish("wardflow/v1/devices/mon-1/readings",
                                       senml(metric, value, unit, cls.last_t), qos=1)
            info.wait_for_publish(10)

    def http(self, method, path, token, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.server.http_port}{path}", method=method,
                                     data=body, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def raise_alert(self, metric, value, unit, rule, watcher):
        self.publish_series(metric, value, unit, 4)
        got = wait_for(lambda: watcher.alerts(rule=rule, event="raised", patient="p-1"), timeout=15)
        self.assertTrue(got, f"no {rule} alert raised; server log:\n{self.server.log_text()[-3000:]}")
        return got[-1]

    def test_1_subscriptions_are_limited_to_the_clinicians_units(self):
        for protocol, refused in ((mqtt.MQTTv5, 0x87), (mqtt.MQTTv311, 0x80)):
            c = Clinician(self.server, "rn-a", self.nurse, protocol)
            try:
                self.assertTrue(c.connected.wait(10))
                self.assertEqual(code(c.connack), 0)
                ok = c.subscribe("wardflow/v1/alerts/icu-a/#")
                self.assertEqual([code(r) for r in ok], [1], "QoS 1 granted on the own unit")
                bad = c.subscribe("wardflow/v1/alerts/icu-b/#")
                self.assertEqual([code(r) for r in bad], [refused], f"other unit refused ({protocol})")
                wild = c.subscribe("wardflow/v1/alerts/+/#")
                self.assertEqual([code(r) for r in wild], [refused], "wildcard unit refused")
            finally:
                c.close()
        # A wrong clinician secret is refused like a device's.
        c = Clinician(self.server, "rn-a", "not-the-secret-at-all", mqtt.MQTTv5)
        self.assertTrue(c.connected.wait(10))
        self.assertEqual(code(c.connack), 0x86)
        c.close()

    def test_2_alerts_reach_every_subscriber_and_acks_change_the_state_for_all(self):
        a = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5)
        b = Clinician(self.server, "rn-a2", self.nurse2, mqtt.MQTTv311)
        other = Clinician(self.server, "rn-b", self.other, mqtt.MQTTv5)
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.server.mqtt_port), "-V", "mqttv311",
             "-u", "rn-a2", "-P", self.nurse2, "-i", "rn-a2-mosquitto", "-q", "1",
             "-t", "wardflow/v1/alerts/icu-a/#"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for c in (a, b, other):
                self.assertTrue(c.connected.wait(10))
            a.subscribe("wardflow/v1/alerts/icu-a/#")
            b.subscribe("wardflow/v1/alerts/icu-a/#")
            other.subscribe("wardflow/v1/alerts/icu-b/#")
            time.sleep(0.5)  # mosquitto_sub connects and subscribes

            alert = self.raise_alert("spo2", 84, "%", "spo2-low", a)
            self.assertEqual(alert["state"], "active")
            self.assertEqual(alert["priority"], "high")
            self.assertEqual(alert["unit"], "icu-a")
            self.assertEqual(alert["bed"], "bed-1")
            self.assertEqual(alert["values"][0]["name"], "spo2")
            self.assertEqual(alert["values"][0]["value"], 84)
            self.assertLessEqual(alert["first_reading_ns"], alert["raised_ns"])
            self.assertTrue(wait_for(lambda: b.alerts(id=alert["id"]), 10), "second subscriber")

            # Acknowledge over MQTT: every subscriber sees the new state.
            a.client.publish(f"wardflow/v1/alerts/icu-a/{alert['id']}/ack", b"", qos=1)
            for c in (a, b):
                acked = wait_for(lambda: c.alerts(id=alert["id"], state="acknowledged"), 10)
                self.assertTrue(acked, "acknowledged state reaches every subscriber")
                self.assertEqual(acked[-1]["by"], "rn-a")
            self.assertFalse(other.alerts(), "icu-b's clinician sees nothing of icu-a")

            # A second alert, acknowledged over HTTP by the other icu-a nurse.
            hr = self.raise_alert("hr", 150, "/min", "hr-high", a)
            status, body = self.http("POST", f"/v1/alerts/{hr['id']}/ack", f"rn-a2:{self.nurse2}")
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["state"], "acknowledged")
            for c in (a, b):
                self.assertTrue(wait_for(lambda: c.alerts(id=hr["id"], state="acknowledged"), 10))
            status, _ = self.http("POST", f"/v1/alerts/{hr['id']}/ack", f"rn-a2:{self.nurse2}")
            self.assertEqual(status, 409, "a second acknowledgement conflicts")
            status, _ = self.http("POST", f"/v1/alerts/{hr['id']}/ack", f"rn-b:{self.other}")
            self.assertEqual(status, 403, "another unit's clinician may not acknowledge")
            status, _ = self.http("POST", f"/v1/alerts/{hr['id']}/ack", "rn-a2:wrong")
            self.assertEqual(status, 401)
            status, _ = self.http("POST", "/v1/alerts/0000000000000000/ack", f"rn-a2:{self.nurse2}")
            self.assertEqual(status, 404)

            # The condition clears: resolved for everyone.
            self.publish_series("hr", 80, "/min", 2)
            self.assertTrue(wait_for(lambda: a.alerts(id=hr["id"], state="resolved"), 10))

            # mosquitto_sub got the transitions too.
            time.sleep(0.5)
            sub.terminate()
            out, _ = sub.communicate(timeout=10)
            seen = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            states = {(m["id"], m["state"]) for m in seen}
            self.assertIn((alert["id"], "active"), states)
            self.assertIn((alert["id"], "acknowledged"), states)
            self.assertIn((hr["id"], "acknowledged"), states)

            # The alert log has every transition.
            listed = json.loads(wardflow(self.server.data, "alerts", "list", "--patient", "p-1",
                                         "--format", "json").stdout)
            by_id = {x["id"]: x for x in listed}
            self.assertEqual(by_id[hr["id"]]["state"], "resolved")
            self.assertEqual(by_id[alert["id"]]["state"], "acknowledged")
            active = json.loads(wardflow(self.server.data, "alerts", "list", "--unit", "icu-a", "--active",
                                         "--format", "json").stdout)
            self.assertEqual({x["id"] for x in active}, {alert["id"]})
        finally:
            if sub.poll() is None:
                sub.kill()
            for c in (a, b, other):
                c.close()
            self.publish_series("spo2", 97, "%", 2)

    def test_3_server_sent_events_and_silence(self):
        token = f"rn-a:{self.nurse}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.server.http_port}/v1/alerts/stream?unit=icu-a",
                                     headers={"Authorization": f"Bearer {token}"})
        events = []
        stop = threading.Event()

        def read():
            with urllib.request.urlopen(req, timeout=30) as r:
                self.assertEqual(r.headers["Content-Type"], "text/event-stream")
                for raw in r:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                    if stop.is_set():
                        return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.5)
        watcher = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-watch")
        try:
            self.assertTrue(watcher.connected.wait(10))
            watcher.subscribe("wardflow/v1/alerts/icu-a/#")
            alert = self.raise_alert("hr", 155, "/min", "hr-high", watcher)
            self.assertTrue(wait_for(lambda: [e for e in events if e["id"] == alert["id"]], 10),
                            "the SSE stream carries the alert")
            status, body = self.http("POST", f"/v1/alerts/{alert['id']}/silence?seconds=30", token)
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["state"], "silenced")
            self.assertTrue(wait_for(lambda: [e for e in events if e["id"] == alert["id"]
                                              and e["state"] == "silenced"], 10))
            status, _ = self.http("POST", f"/v1/alerts/{alert['id']}/silence?seconds=86400", token)
            self.assertEqual(status, 400, "a silence is bounded")
            status, _ = self.http("GET", "/v1/alerts/stream?unit=icu-b", token)
            self.assertEqual(status, 403)
            status, body = self.http("GET", "/v1/alerts?unit=icu-a", token)
            self.assertEqual(status, 200)
            self.assertIn(alert["id"], {a["id"] for a in json.loads(body)})
        finally:
            stop.set()
            watcher.close()
            self.publish_series("hr", 80, "/min", 2)

    def test_4_a_bad_rules_file_is_refused_and_the_old_rules_keep_running(self):
        bad = os.path.join(self.rules_dir, "zz-broken.toml")
        with open(bad, "w") as f:
            f.write(BAD_RULES)
        try:
            check = wardflow(self.server.data, "rules", "check", bad, check=False)
            self.assertNotEqual(check.returncode, 0)
            self.assertIn("zz-broken.toml:5:", check.stderr)
            self.assertIn("when.exit", check.stderr)

            def health():
                with urllib.request.urlopen(f"http://127.0.0.1:{self.server.http_port}/healthz") as r:
                    return json.loads(r.read())
            refused = wait_for(lambda: health().get("rules_error"), timeout=10)
            self.assertTrue(refused and "when.exit" in refused, refused)
            self.assertEqual(health()["rules"], 2, "the previous two rules are in force")
            self.assertIn("alert rules not reloaded", self.server.log_text())
            watcher = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-rules")
            try:
                self.assertTrue(watcher.connected.wait(10))
                watcher.subscribe("wardflow/v1/alerts/icu-a/#")
                self.raise_alert("spo2", 85, "%", "spo2-low", watcher)
            finally:
                watcher.close()
                self.publish_series("spo2", 97, "%", 2)
        finally:
            os.remove(bad)

    def test_5_unbound_devices_raise_a_technical_alert(self):
        data = self.server.data
        out = wardflow(data, "devices", "add", "mon-x").stdout
        secret = next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("secret: "))
        ops_secret = self.add_clinician("ops", "unassigned")
        time.sleep(1.2)  # the server picks the new files up
        ops = Clinician(self.server, "ops", ops_secret, mqtt.MQTTv5)
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mon-x", protocol=mqtt.MQTTv5)
        dev.username_pw_set("mon-x", secret)
        try:
            self.assertTrue(ops.connected.wait(10))
            ops.subscribe("wardflow/v1/alerts/unassigned/#")
            dev.connect("127.0.0.1", self.server.mqtt_port)
            dev.loop_start()
            dev.publish("wardflow/v1/devices/mon-x/readings", senml("hr", 72, "/min", time.time()),
                        qos=1).wait_for_publish(10)
            got = wait_for(lambda: ops.alerts(rule="device-unbound", device="mon-x"), 15)
            self.assertTrue(got, self.server.log_text()[-2000:])
            self.assertTrue(got[0]["technical"])
            # Bound now: the next publish resolves it.
            wardflow(data, "devices", "bind", "mon-x", "p-1")
            time.sleep(1.2)
            dev.publish("wardflow/v1/devices/mon-x/readings", senml("hr", 72, "/min", time.time()),
                        qos=1).wait_for_publish(10)
            self.assertTrue(wait_for(lambda: ops.alerts(rule="device-unbound", state="resolved"), 15))
            wardflow(data, "devices", "unbind", "mon-x", "p-1")
        finally:
            dev.disconnect()
            dev.loop_stop()
            ops.close()

    def test_6_manual_observations_feed_news2(self):
        # Over MQTT, a clinician records V on ACVPU; the CLI records oxygen.
        c = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-obs")
        try:
            self.assertTrue(c.connected.wait(10))
            info = c.client.publish("wardflow/v1/patients/p-1/observations",
                                    json.dumps({"consciousness": "V"}), qos=1)
            info.wait_for_publish(10)
            info = c.client.publish("wardflow/v1/patients/p-2/observations",
                                    json.dumps({"consciousness": "V"}), qos=1)
            info.wait_for_publish(10)
        finally:
            c.close()
        wardflow(self.server.data, "observe", "p-1", "--oxygen", "o2")
        bad = wardflow(self.server.data, "observe", "p-1", "--consciousness", "Q", check=False)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("consciousness", bad.stderr)
        path = os.path.join(self.server.data, "observations.jsonl")
        lines = [json.loads(l) for l in open(path)]
        self.assertEqual([(l["patient"], l.get("consciousness"), l.get("oxygen"), l["by"]) for l in lines],
                         [("p-1", "V", None, "rn-a"), ("p-1", None, "o2", "cli")],
                         "p-2 lies in icu-b: rn-a's observation is refused")

    def test_7_a_scripted_scenario_raises_its_alert_end_to_end(self):
        scenario = os.path.join(self.rules_dir, "..", f"wardflow-scenario-{os.getpid()}.toml")
        with open(scenario, "w") as f:
            f.write("""
name = "quick-desaturation"
duration = "12s"
[[patients]]
id = "pt-scen-1"
device = "scen-mon-1"
unit = "icu-a"
bed = "bed-77"
[[patients.events]]
kind = "desaturation"
onset = "1s"
ramp = "2s"
spo2 = 80
""")
        watcher = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-scenario")
        try:
            self.assertTrue(watcher.connected.wait(10))
            watcher.subscribe("wardflow/v1/alerts/icu-a/#")
            out = wardflow(self.server.data, "simulate", "--target", f"mqtt://127.0.0.1:{self.server.mqtt_port}",
                           "--scenario", scenario, "--register", "--payload", "senml", "--batch", "7",
                           "--qos", "1", "--json")
            report = json.loads(out.stdout)
            self.assertEqual(report["errors"], 0, report)
            onset = next(e["onset_ms"] for e in report["events"] if e["kind"] == "desaturation")
            got = wait_for(lambda: watcher.alerts(rule="spo2-low", patient="pt-scen-1", event="raised"), 15)
            self.assertTrue(got, "the scripted desaturation raises spo2-low")
            alert = got[0]
            self.assertEqual((alert["unit"], alert["bed"]), ("icu-a", "bed-77"), "admitted by --register")
            delay_ms = alert["raised_ns"] / 1e6 - onset
            print(f"\nscripted desaturation over MQTT: spo2-low {delay_ms:.0f} ms after onset", file=sys.stderr)
            self.assertGreater(delay_ms, 0)
            self.assertLess(delay_ms, 10_000)
        finally:
            watcher.close()
            os.remove(scenario)

    def test_8_open_alerts_survive_a_restart(self):
        watcher = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-before")
        try:
            self.assertTrue(watcher.connected.wait(10))
            watcher.subscribe("wardflow/v1/alerts/icu-a/#")
            alert = self.raise_alert("spo2", 83, "%", "spo2-low", watcher)
        finally:
            watcher.close()
        self.server.stop()
        self.server.start()
        after = Clinician(self.server, "rn-a", self.nurse, mqtt.MQTTv5, client_id="rn-a-after")
        try:
            self.assertTrue(after.connected.wait(10))
            after.subscribe("wardflow/v1/alerts/icu-a/#")
            restored = wait_for(lambda: after.alerts(id=alert["id"]), 10)
            self.assertTrue(restored, "the open alert is restored and sent to a new subscriber")
            self.assertEqual(restored[0]["state"], "active")
            status, body = self.http("POST", f"/v1/alerts/{alert['id']}/ack", f"rn-a:{self.nurse}")
            self.assertEqual(status, 200, body)
            self.assertEqual(json.loads(body)["seq"], alert["seq"] + 1, "the same alert continues")
        finally:
            after.close()
        log = json.loads(wardflow(self.server.data, "alerts", "list", "--history", "--patient", "p-1",
                                  "--format", "json", "--limit", "1000").stdout)
        raised = [a for a in log if a["id"] == alert["id"] and a["event"] == "raised"]
        self.assertEqual(len(raised), 1, "the replay after the restart raised it only once")


if __name__ == "__main__":
    unittest.main()
