"""Starts and drives a real `wardflow serve` for the Python client tests.

The binary comes from $WARDFLOW_BIN (the Rust test wrapper sets it).
"""

import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request

BIN = os.environ.get("WARDFLOW_BIN", "wardflow")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wardflow(data_dir, *args, check=True):
    out = subprocess.run([BIN, "--data-dir", data_dir, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"wardflow {args} failed: {out.stderr}")
    return out


class Server:
    """A `wardflow serve` on free ports with its own data directory."""

    def __init__(self, *extra):
        self.tmp = tempfile.TemporaryDirectory(prefix="wardflow-py-")
        self.data = os.path.join(self.tmp.name, "data")
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.extra = list(extra)
        self.log = open(os.path.join(self.tmp.name, "server.log"), "w")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [BIN, "--data-dir", self.data, "--log", "info,ntex=warn,ntex_server=warn,ntex_rt=warn,ntex_mqtt=warn",
             "serve", "--mqtt", f"127.0.0.1:{self.mqtt_port}", "--http", f"127.0.0.1:{self.http_port}", *self.extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("wardflow serve exited: " + self.log_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("wardflow serve never became healthy: " + self.log_text())

    def log_text(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self):
        self.stop()
        self.log.close()
        self.tmp.cleanup()

    def add_device(self, device, patient):
        """Registers a device; on a running server, waits until it picked the change up."""
        out = wardflow(self.data, "devices", "add", device, "--patient", patient).stdout
        secret = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("secret: "))
        if self.proc and self.proc.poll() is None:
            ok = wait_for(lambda: raw_connack(self.mqtt_port, 5, device, device, secret) == 0, timeout=10)
            assert ok, f"server never accepted the new device {device}"
        return secret

    def query(self, patient):
        return json.loads(wardflow(self.data, "query", "--patient", patient, "--format", "json").stdout)

    def wait_rows(self, patient, n, timeout=20.0):
        """The patient's readings once there are n of them (or what there is at the timeout)."""
        rows = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = self.query(patient)
            if len(rows) >= n:
                break
            time.sleep(0.1)
        return rows

    def dead_letters(self):
        return json.loads(wardflow(self.data, "deadletters", "list", "--limit", "100000", "--format", "json").stdout)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name):
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


def wait_for(fn, timeout=20.0):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            return value
        time.sleep(0.1)


def now_s():
    return int(time.time())


# --- the Wardflow binary frame, written from docs/binary-frame.md ----------

MDC = {"hr": 147842, "spo2": 150456, "rr": 151562, "sbp": 150021, "dbp": 150022,
       "map": 150023, "temp": 150364, "pr": 149530, "etco2": 151708}
UNIT = {"canonical": 0, "/min": 1, "/s": 2, "%": 3, "1": 4, "mm[Hg]": 5, "Pa": 6, "hPa": 7,
        "kPa": 8, "Cel": 9, "K": 10, "[degF]": 11}


def float11073(value, exponent=-2):
    """IEEE 11073-20601 FLOAT: 8-bit exponent, 24-bit mantissa."""
    if value != value:
        return 0x007FFFFF
    mantissa = round(value / 10.0 ** exponent)
    return ((exponent & 0xFF) << 24) | (mantissa & 0xFFFFFF)


def frame(seq, base_time_ns, records):
    """records: (offset_us, metric, value, unit, quality); value may be raw FLOAT bits via ('bits', n)."""
    out = bytearray(b"WF" + bytes([1, 16]))
    out += struct.pack("<HHQq", len(records), 0, seq, base_time_ns)
    for offset_us, metric, value, unit, quality in records:
        bits = value[1] if isinstance(value, tuple) else float11073(value)
        out += struct.pack("<IIIBBH", offset_us, MDC[metric], bits, UNIT[unit], quality, 0)
    return bytes(out)


# --- raw MQTT, to see the exact bytes of a refusal ---------------------------

def _string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _remaining_length(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connack(port, version, client_id, username, password):
    """Sends CONNECT (MQTT 3.1.1 if version == 4, 5.0 if 5) and returns the CONNACK's return/reason code."""
    var = _string("MQTT") + bytes([version, 0xC2]) + struct.pack(">H", 30)
    if version == 5:
        var += b"\x00"  # no properties
    payload = _string(client_id) + _string(username) + _string(password)
    body = var + payload
    packet = b"\x10" + _remaining_length(len(body)) + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(packet)
        kind = s.recv(1)
        assert kind == b"\x20", f"expected CONNACK, got {kind!r}"
        length, shift = 0, 0
        while True:
            byte = s.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        rest = b""
        while len(rest) < length:
            chunk = s.recv(length - len(rest))
            if not chunk:
                break
            rest += chunk
        return rest[1]
