"""Nothing acknowledged is lost: kill -9 the server mid-stream, restart it,
resend what was not acknowledged (and some of what was), and find every
reading stored exactly once."""

import threading
import time
import unittest

import paho.mqtt.client as mqtt

from wardflow_harness import Server, frame

READINGS_PER_PUBLISH = 10
METRICS = ["hr", "spo2", "rr", "sbp", "dbp"]


class Publisher:
    """A QoS 1 device that remembers which publishes were acknowledged.

    paho calls on_publish on its network thread while holding its own locks,
    so no paho call is made under this class's lock (that would deadlock).
    Message ids are per connection, so acks are resolved connection by
    connection.
    """

    def __init__(self, server, device, secret):
        self.server, self.device, self.secret = server, device, secret
        self.topic = f"wardflow/v1/devices/{device}/readings"
        self.payloads = {}  # publish index -> bytes
        self.acked = set()  # publish indices acknowledged, over all connections
        self.lock = threading.Lock()
        self.client = None
        self.mid_to_index = {}
        self.acked_mids = set()

    def connect(self):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device, protocol=mqtt.MQTTv311)
        c.username_pw_set(self.device, self.secret)
        c.max_inflight_messages_set(32)
        c.on_publish = self._on_publish
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        with self.lock:
            self.mid_to_index, self.acked_mids = {}, set()
        c.connect("127.0.0.1", self.server.mqtt_port)
        c.loop_start()
        assert connected.wait(20), "connect"
        self.client = c

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if not reason_code.is_failure:
            with self.lock:
                self.acked_mids.add(mid)

    def resolve(self):
        with self.lock:
            for mid in self.acked_mids:
                if mid in self.mid_to_index:
                    self.acked.add(self.mid_to_index[mid])
            return len(self.acked)

    def payload(self, index):
        if index not in self.payloads:
            seq = index * READINGS_PER_PUBLISH
            base = time.time_ns() - 5_000_000_000
            records = [(k * 1000, METRICS[k % len(METRICS)], 50.0 + (seq + k) % 40, "canonical", 0)
                       for k in range(READINGS_PER_PUBLISH)]
            self.payloads[index] = frame(seq, base, records)
        return self.payloads[index]

    def send(self, index):
        info = self.client.publish(self.topic, self.payload(index), qos=1)
        with self.lock:
            self.mid_to_index[info.mid] = index

    def drop(self):
        if self.client:
            self.client.loop_stop()
            try:
                self.client.disconnect()
            except Exception:
                pass
            self.client = None
        self.resolve()


class CrashTest(unittest.TestCase):
    def test_kill_9_mid_stream_loses_no_acknowledged_reading_and_stores_none_twice(self):
        # 1 MiB log segments, so the stream crosses segments, prepared
        # ahead and fresh, and the kills land in them.
        server = Server("--flush-interval-ms", "200", "--wal-segment-mb", "1")
        try:
            secret = server.add_device("crash-1", "p-crash")
            server.start()
            pub = Publisher(server, "crash-1", secret)
            next_index = 0
            acked_before_crash = set()
            prepared = 0
            for crash in range(3):
                pub.connect()
                # Stream for a while, then kill the server while publishes are in flight.
                until = time.time() + 1.5 + 0.4 * crash
                while time.time() < until:
                    pub.send(next_index)
                    next_index += 1
                    time.sleep(0.0005)
                prepared += server.metric("wardflow_wal_segments_prepared_total") or 0
                # A burst, and the kill lands while it is in flight.
                for _ in range(300):
                    pub.send(next_index)
                    next_index += 1
                time.sleep(0.002 * crash)
                server.proc.kill()  # SIGKILL
                server.proc.wait()
                pub.drop()
                acked_before_crash |= set(pub.acked)
                self.assertGreater(len(pub.acked), 100, f"crash {crash}: too few publishes acknowledged to test much")
                server.start()

            # Resend everything not acknowledged, and the last 200 that were: as a
            # client unsure of its session would.
            pub.connect()
            resend = [i for i in range(next_index) if i not in pub.acked]
            resend += sorted(pub.acked)[-200:]
            for i in resend:
                pub.send(i)
            deadline = time.time() + 60
            while time.time() < deadline and pub.resolve() < next_index:
                time.sleep(0.05)
            pub.drop()
            self.assertEqual(len(pub.acked), next_index, "every publish acknowledged in the end")
            self.assertLess(len(acked_before_crash), next_index, "some publishes were in flight at a kill")

            expected = next_index * READINGS_PER_PUBLISH
            rows = server.wait_rows("p-crash", expected, timeout=60)
            seqs = [r["seq"] for r in rows]
            self.assertEqual(len(seqs), len(set(seqs)), "no reading stored twice")
            stored = set(seqs)
            missing_acked = [i for i in acked_before_crash
                             if any(i * READINGS_PER_PUBLISH + k not in stored for k in range(READINGS_PER_PUBLISH))]
            self.assertEqual(missing_acked, [], "acknowledged before a crash but not stored")
            self.assertEqual(stored, set(range(expected)))
            replayed = server.metric("wardflow_wal_replayed_total")
            self.assertGreater(prepared, 0, "the stream crossed into prepared log segments")
            duplicates = server.metric("wardflow_readings_duplicate_total")
            print(f"\ncrash test: {next_index} publishes, {len(acked_before_crash)} acknowledged before crashes, "
                  f"{len(resend)} resent; after the last restart {replayed:.0f} publishes replayed, "
                  f"{duplicates:.0f} duplicate readings dropped")
            self.assertGreater(duplicates, 0, "the resent acknowledged publishes were recognised as duplicates")
        finally:
            server.close()


if __name__ == "__main__":
    unittest.main()
