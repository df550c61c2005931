"""Sequential keep-alive latency of ``recvae serve`` with 1 and N workers (loopback only).

One client, one keep-alive connection, one request at a time: no queueing, so the median is the
per-request cost of the whole stack. A fixed ~40 ms on top of it is the signature of Nagle's
algorithm meeting the client's delayed ACK (a listener without ``TCP_NODELAY``), which is what
``recvae serve --workers N`` suffered from before the listener was built with ``IPPROTO_TCP``.

Usage::

    .venv/bin/python benchmarks/serve_keepalive.py --bundle runs/ml1m/bundle --workers 1 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from pathlib import Path

from serve_common import machine, sample_histories
from serve_load import free_port, start_server


def sequential_ms(port: int, method: str, path: str, body: str | None, n: int) -> list[float]:
    """Latencies (ms) of ``n`` sequential requests on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    out = []
    for _ in range(n):
        start = time.perf_counter()
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}")
        out.append((time.perf_counter() - start) * 1000)
    connection.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per route")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    history = sample_histories(args.bundle, 1, 50, seed=1)[0]
    body = json.dumps({"history": history, "k": 100})
    results = []
    for workers in args.workers:
        port = free_port()
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"recvae-serve-keepalive-{port}.log"
        process = start_server(args.bundle, port, workers, 1, log)
        try:
            row = {"workers": workers}
            for label, method, path, payload in (
                ("recommendations", "POST", "/v1/recommendations", body),
                ("healthz", "GET", "/healthz", None),
            ):
                times = sequential_ms(port, method, path, payload, args.warmup + args.requests)
                times = times[args.warmup :]
                row[f"{label}_median_ms"] = round(statistics.median(times), 2)
                row[f"{label}_max_ms"] = round(max(times), 2)
            results.append(row)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
