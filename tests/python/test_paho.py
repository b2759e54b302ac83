"""Wardflow as paho-mqtt (and a raw socket) see it: MQTT 3.1.1 and 5.0."""

import threading
import time
import unittest

import paho.mqtt.client as mqtt
import pyarrow.dataset as ds

from wardflow_harness import Server, frame, now_s, raw_connack, wait_for


def topic(device):
    return f"wardflow/v1/devices/{device}/readings"


class Device:
    """A paho client that records PUBACK reason codes and disconnects."""

    def __init__(self, server, device, secret, protocol):
        self.acks = {}
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.connack = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=protocol)
        self.client.username_pw_set(device, secret)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect("127.0.0.1", server.mqtt_port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks[mid] = reason_code

    def publish(self, topic_name, payload, qos=1):
        info = self.client.publish(topic_name, payload, qos=qos)
        if qos == 1:
            info.wait_for_publish(10)
            deadline = time.time() + 10
            while info.mid not in self.acks and time.time() < deadline:
                time.sleep(0.01)
            return self.acks.get(info.mid)
        return None

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class PahoTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        cls.secret = cls.server_add("mon-1", "p-1")
        cls.server.start()

    @classmethod
    def server_add(cls, device, patient):
        return cls.server.add_device(device, patient)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def device(self, name, protocol, secret=None):
        d = Device(self.server, name, secret or self.secret, protocol)
        self.assertTrue(d.connected.wait(10), "CONNACK")
        return d

    def test_wrong_secret_gets_the_exact_codes(self):
        port = self.server.mqtt_port
        self.assertEqual(raw_connack(port, 4, "mon-1", "mon-1", "wrong-secret-here"), 4)
        self.assertEqual(raw_connack(port, 5, "mon-1", "mon-1", "wrong-secret-here"), 0x86)
        self.assertEqual(raw_connack(port, 5, "nobody", "nobody", "wrong-secret-here"), 0x86)
        # Client id and username must both be the device id.
        self.assertEqual(raw_connack(port, 5, "mon-1", "mon-2", self.secret), 0x86)
        self.assertEqual(raw_connack(port, 4, "not/valid", "not/valid", self.secret), 2)
        self.assertEqual(raw_connack(port, 5, "not/valid", "not/valid", self.secret), 0x85)
        self.assertEqual(raw_connack(port, 5, "mon-1", "mon-1", self.secret), 0)
        # paho sees the same refusal.
        d = Device(self.server, "mon-1", "wrong-secret-here", mqtt.MQTTv5)
        self.assertTrue(d.connected.wait(10))
        self.assertEqual(d.connack.value, 0x86)
        d.close()

    def test_qos_0_and_1_over_both_versions_are_stored(self):
        secret = self.server.add_device("mon-q", "p-q")
        bt = now_s() - 30
        for i, protocol in enumerate([mqtt.MQTTv311, mqtt.MQTTv5]):
            d = self.device("mon-q", protocol, secret)
            base = 100 * i
            rc = d.publish(topic("mon-q"), f'[{{"bt":{bt},"n":"hr","v":{60 + i},"seq":{base + 1}}}]', qos=1)
            self.assertFalse(rc.is_failure, rc)
            d.publish(topic("mon-q"), f'[{{"bt":{bt},"t":1,"n":"rr","v":{12 + i},"seq":{base + 2}}}]', qos=0)
            d.close()
        rows = self.server.wait_rows("p-q", 4)
        self.assertEqual(sorted((r["metric"], r["value"]) for r in rows),
                         [("hr", 60.0), ("hr", 61.0), ("rr", 12.0), ("rr", 13.0)])

    def test_v5_foreign_topic_gets_puback_0x87_and_the_connection_stays(self):
        secret = self.server.add_device("mon-v5", "p-v5")
        d = self.device("mon-v5", mqtt.MQTTv5, secret)
        before = self.server.metric('wardflow_mqtt_publishes_refused_total{reason="topic"}') or 0
        rc = d.publish(topic("mon-1"), '[{"n":"hr","v":70}]', qos=1)
        self.assertEqual(rc.value, 0x87)
        rc = d.publish("wardflow/v1/alerts/icu/x", '[{"n":"hr","v":70}]', qos=1)
        self.assertEqual(rc.value, 0x87)
        self.assertTrue(d.client.is_connected())
        rc = d.publish(topic("mon-v5"), f'[{{"bt":{now_s()},"n":"hr","v":71,"seq":1}}]', qos=1)
        self.assertFalse(rc.is_failure, rc)
        d.close()
        self.assertEqual(self.server.metric('wardflow_mqtt_publishes_refused_total{reason="topic"}'), before + 2)
        rows = wait_for(lambda: self.server.query("p-v5"))
        self.assertEqual([(r["metric"], r["value"]) for r in rows], [("hr", 71.0)])
        self.assertEqual(self.server.query("p-1"), [], "nothing reached mon-1's patient")

    def test_v3_foreign_topic_closes_the_connection(self):
        secret = self.server.add_device("mon-v3", "p-v3")
        d = self.device("mon-v3", mqtt.MQTTv311, secret)
        before = self.server.metric('wardflow_mqtt_publishes_refused_total{reason="topic"}') or 0
        d.client.publish(topic("mon-1"), '[{"n":"hr","v":70}]', qos=1)
        self.assertTrue(d.disconnected.wait(10), "MQTT 3.1.1 can only close the connection")
        d.client.loop_stop()
        self.assertEqual(self.server.metric('wardflow_mqtt_publishes_refused_total{reason="topic"}'), before + 1)

    def test_a_reconnecting_device_takes_over_its_old_connection(self):
        secret = self.server.add_device("mon-t", "p-t")
        reasons = []
        old = Device(self.server, "mon-t", secret, mqtt.MQTTv5)
        self.assertTrue(old.connected.wait(10))
        old.client.on_disconnect = lambda c, u, flags, rc, props: (reasons.append(rc.value), old.disconnected.set())
        new = self.device("mon-t", mqtt.MQTTv5, secret)
        self.assertTrue(old.disconnected.wait(10), "the older connection is closed")
        old.client.loop_stop()
        self.assertEqual(reasons, [0x8E], "MQTT 5 DISCONNECT: Session taken over")
        rc = new.publish(topic("mon-t"), f'[{{"bt":{now_s()},"n":"hr","v":66,"seq":1}}]', qos=1)
        self.assertFalse(rc.is_failure)
        new.close()
        self.assertEqual([r["value"] for r in self.server.wait_rows("p-t", 1)], [66.0])
        self.assertEqual(self.server.metric("wardflow_mqtt_session_takeovers_total"), 1)

    def test_subscriptions_are_refused(self):
        secret = self.server.add_device("mon-s", "p-s")
        d = self.device("mon-s", mqtt.MQTTv5, secret)
        granted = []
        done = threading.Event()
        d.client.on_subscribe = lambda c, u, mid, codes, props: (granted.extend(codes), done.set())
        d.client.subscribe("wardflow/v1/devices/#", qos=1)
        self.assertTrue(done.wait(10))
        self.assertEqual([c.value for c in granted], [0x87])
        d.close()

    def test_malformed_payloads_become_dead_letters_and_the_device_stays_connected(self):
        secret = self.server.add_device("mon-bad", "p-bad")
        d = self.device("mon-bad", mqtt.MQTTv5, secret)
        t = now_s()
        ns = t * 1_000_000_000
        good_frame = frame(100, ns, [(0, "hr", 72.0, "canonical", 0), (1000, "spo2", 97.0, "%", 0)])
        bad = [
            ("broken JSON", b'[{"n":"hr","v":72', "malformed_payload"),
            ("JSON NaN", b'[{"n":"hr","v":NaN}]', "malformed_payload"),
            ("truncated frame", good_frame[:-3], "malformed_payload"),
            ("neither format", b"hello", "unknown_format"),
            ("NaN as a string", f'[{{"bt":{t},"n":"hr","v":"NaN","seq":1}}]'.encode(), "missing_value"),
            ("NaN in a frame", frame(2, ns, [(0, "hr", float("nan"), "canonical", 0)]), "non_finite_value"),
            ("absurd value", f'[{{"bt":{t},"n":"spo2","u":"%","v":140,"seq":3}}]'.encode(), "implausible_value"),
            ("wrong unit", f'[{{"bt":{t},"n":"hr","u":"Cel","v":37,"seq":4}}]'.encode(), "unit_not_convertible"),
            ("unknown unit", f'[{{"bt":{t},"n":"hr","u":"furlong","v":37,"seq":5}}]'.encode(), "unit_not_convertible"),
            ("unknown metric", f'[{{"bt":{t},"n":"glucose","v":5,"seq":6}}]'.encode(), "unknown_metric"),
            ("from the future", f'[{{"bt":{t + 3600},"n":"hr","v":70,"seq":7}}]'.encode(), "timestamp_in_future"),
            ("too old", f'[{{"bt":{t - 3 * 86400},"n":"hr","v":70,"seq":8}}]'.encode(), "timestamp_too_old"),
        ]
        for what, payload, _ in bad:
            rc = d.publish(topic("mon-bad"), payload, qos=1)
            self.assertFalse(rc.is_failure, f"{what}: a bad payload is logged and acknowledged, got {rc}")
        self.assertTrue(d.client.is_connected())
        rc = d.publish(topic("mon-bad"), good_frame, qos=1)
        self.assertFalse(rc.is_failure)
        d.close()

        rows = self.server.wait_rows("p-bad", 2)
        self.assertEqual(sorted((r["metric"], r["value"], r["seq"]) for r in rows), [("hr", 72.0, 100), ("spo2", 97.0, 101)])
        mine = lambda: [x for x in self.server.dead_letters() if x["device"] == "mon-bad"]  # noqa: E731
        wait_for(lambda: len(mine()) >= len(bad))
        dead = mine()
        reasons = sorted(x["reason"] for x in dead)
        self.assertEqual(reasons, sorted(r for _, _, r in bad))
        for x in dead:
            self.assertTrue(x["detail"], x)
            self.assertEqual(x["patient"], "p-bad")
        absurd = next(x for x in dead if x["reason"] == "implausible_value")
        self.assertEqual((absurd["metric"], absurd["raw"], absurd["seq"]), ("spo2", "140 %", 3))
        broken = next(x for x in dead if x["raw"].startswith('[{"n":"hr","v":72'))
        self.assertIn("invalid JSON", broken["detail"])
        truncated = next(x for x in dead if "binary frame" in x["detail"])
        self.assertIn("header says 2 records", truncated["detail"])

    def test_the_store_is_plain_parquet(self):
        secret = self.server.add_device("mon-pq", "p-pq")
        d = self.device("mon-pq", mqtt.MQTTv5, secret)
        t = now_s() - 10
        for i in range(5):
            d.publish(topic("mon-pq"), f'[{{"bt":{t + i},"n":"map","u":"kPa","v":{12 + i},"seq":{i}}}]', qos=1)
        d.close()
        rows = self.server.wait_rows("p-pq", 5)
        self.assertEqual(len(rows), 5)
        table = ds.dataset(f"{self.server.data}/readings", format="parquet", partitioning="hive").to_table(
            filter=ds.field("patient_id") == "p-pq")
        self.assertEqual(table.num_rows, 5)
        self.assertEqual(table.schema.field("time").type.tz, "UTC")
        self.assertEqual(set(table.column("unit").to_pylist()), {"mm[Hg]"})
        values = sorted(table.column("value").to_pylist())
        self.assertAlmostEqual(values[0], 12 * 1000 / 133.322, places=9)
        self.assertEqual(sorted(r["value"] for r in rows), values)


if __name__ == "__main__":
    unittest.main()
