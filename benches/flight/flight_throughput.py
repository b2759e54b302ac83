"""Arrow Flight throughput to a pyarrow client: Wardflow's research server
against a baseline pyarrow Flight server serving the same batches.

    cargo build --release
    python3 benches/flight/flight_throughput.py [--batches 2000 --rows 2048 --repeat 5]

Wardflow serves a study's release log by time-range replay (the DoGet a
researcher makes for history); the log here is written by this script
with the study's own schema (fetched with GetSchema), so both servers send
the identical batches. The baseline is `pyarrow.flight.FlightServerBase`
holding the same batches in memory, in a process of its own. Each repeat
reads the whole stream from each server in turn with `read_all()`; the
script prints MB/s (Arrow buffer bytes received) and record batches/s, the
medians, and the ratio Wardflow / baseline (median of the repeats' ratios);
the two servers take turns going first.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.flight as flight

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from wardflow_harness import free_port, wardflow  # noqa: E402

STUDY = """
id = "throughput"
researchers = ["r-bench"]
metrics = ["hr", "spo2"]
window = "1m"
statistics = ["count", "mean", "std", "p50", "p90"]
k = 5
running_totals = true

[cohort]
group_by = ["age_band", "sex", "unit_type"]
age_bands = [18, 40, 65, 80]
unit_types = { icu = ["icu-a"] }

[privacy]
epsilon = 10.0
delta = 1e-6
windows = 100000

[clamp]
hr = [30, 200]
spo2 = [70, 100]
max_readings = 120
max_readings_total = 20000
"""

SECRET = "bench-secret-0123456789"


class Baseline(flight.FlightServerBase):
    def __init__(self, location, path):
        super().__init__(location)
        with pa.ipc.open_stream(path) as r:
            self.table = pa.Table.from_batches(list(r), schema=r.schema)

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.table)


def batches_for(schema, n, rows):
    """n batches: 16 distinct sets of values, each batch with its own window."""
    rng = random.Random(7)
    words = ["18-39", "40-64", "65-79", "F", "M", "icu", "other", "hr", "spo2", "*"]
    templates = []
    for _ in range(16):
        cols = {}
        for f in schema:
            if pa.types.is_string(f.type):
                cols[f.name] = pa.array([rng.choice(words) for _ in range(rows)], type=f.type)
            elif pa.types.is_floating(f.type):
                cols[f.name] = pa.array([rng.gauss(80, 10) for _ in range(rows)], type=f.type)
        templates.append(cols)
    out = []
    for i in range(n):
        cols = []
        for f in schema:
            if pa.types.is_timestamp(f.type):
                start = 1_700_000_000_000 + i * 60_000
                v = start if f.name == "window_start" else start + 60_000
                cols.append(pa.array([v] * rows, type=pa.int64()).cast(f.type))
            else:
                cols.append(templates[i % 16][f.name])
        out.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    return out


def read(client, ticket, options):
    t0 = time.perf_counter()
    reader = client.do_get(ticket, options)
    nbytes = nbatches = nrows = 0
    for chunk in reader:
        b = chunk.data
        nbatches += 1
        nrows += b.num_rows
        nbytes += b.nbytes
    return time.perf_counter() - t0, nbytes, nbatches, nrows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--serve-baseline", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_baseline:
        port, path = a.serve_baseline
        Baseline(f"grpc://127.0.0.1:{port}", path).serve()
        return

    tmp = tempfile.TemporaryDirectory(prefix="wardflow-flight-bench-", ignore_cleanup_errors=True)
    data = os.path.join(tmp.name, "data")
    study = os.path.join(tmp.name, "study.toml")
    with open(study, "w") as f:
        f.write(STUDY)
    wardflow(data, "researchers", "add", "r-bench", "--secret", SECRET)
    wardflow(data, "studies", "add", study)
    fport, mport, hport, bport = free_port(), free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [os.environ.get("WARDFLOW_BIN", os.path.join(ROOT, "target", "release", "wardflow")),
         "--data-dir", data, "--log", "warn", "serve", "--mqtt", f"127.0.0.1:{mport}",
         "--http", f"127.0.0.1:{hport}", "--flight", f"127.0.0.1:{fport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    baseline = None
    try:
        client = flight.FlightClient(f"grpc://127.0.0.1:{fport}")
        deadline = time.time() + 60
        while True:
            try:
                options = flight.FlightCallOptions(headers=[client.authenticate_basic_token("r-bench", SECRET)])
                break
            except (flight.FlightUnavailableError, flight.FlightInternalError):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        schema = client.get_schema(flight.FlightDescriptor.for_path("throughput"), options).schema
        log = os.path.join(data, "research", "studies", "throughput", "releases", "00000000000000000001.arrows")
        with pa.OSFile(log, "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            for b in batches_for(schema, a.batches, a.rows):
                w.write_batch(b)
        baseline = subprocess.Popen([sys.executable, __file__, "--serve-baseline", str(bport), log])
        base_client = flight.FlightClient(f"grpc://127.0.0.1:{bport}")
        ticket = flight.Ticket(b'{"study": "throughput", "from_ms": 0}')
        while True:
            try:
                read(base_client, ticket, flight.FlightCallOptions())
                break
            except (flight.FlightUnavailableError, flight.FlightInternalError):
                time.sleep(0.2)
        read(client, ticket, options)  # warm the page cache for both
        results = {"wardflow": [], "pyarrow": []}
        print(f"# Flight throughput: {a.batches} batches x {a.rows} rows, {len(schema)} columns, "
              f"{a.repeat} repeats, the pyarrow baseline and Wardflow in turn, alternating which goes first\n")
        for r in range(a.repeat):
            pair = [("pyarrow", base_client, flight.FlightCallOptions()), ("wardflow", client, options)]
            # Alternate which server goes first, so neither always reads after the other.
            for name, c, o in (pair if r % 2 == 0 else pair[::-1]):
                dt, nbytes, nbatches, nrows = read(c, ticket, o)
                assert nbatches == a.batches and nrows == a.batches * a.rows, (name, nbatches, nrows)
                results[name].append((nbytes / dt / 1e6, nbatches / dt))
                print(f"run {r + 1} {name:<9} {nbytes / dt / 1e6:8.1f} MB/s {nbatches / dt:9.0f} batches/s "
                      f"({nbytes / 1e6:.0f} MB in {dt:.2f} s)")
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
        ratios = [w[0] / p[0] for w, p in zip(results["wardflow"], results["pyarrow"])]
        print("\n| server | MB/s | record batches/s |")
        print("| --- | ---: | ---: |")
        for k in ("pyarrow", "wardflow"):
            print(f"| {k} | {med[k][0]:.1f} | {med[k][1]:.0f} |")
        print(f"\nratio Wardflow / pyarrow (median of pairs): {statistics.median(ratios):.2f}")
    finally:
        if baseline:
            baseline.kill()
        server.send_signal(2)
        server.wait(60)
        tmp.cleanup()


if __name__ == "__main__":
    main()
