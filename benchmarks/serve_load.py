"""Open-loop HTTP load generator for the serving API (loopback only).

Requests are sent at a fixed rate whatever the server does (open loop): request ``i`` is due at
``start + i / rate``. Latency is measured from that due time to the end of the response, so time
spent queued because the server (or this client) fell behind counts, and a slow server cannot
hide it by slowing the load down (no coordinated omission). The client is a minimal HTTP/1.1
keep-alive client on asyncio streams, so that the generator itself uses little of the CPU it
shares with the server.

Each request is ``POST /v1/recommendations`` with a history of real item ids drawn from the
bundle's training users (50 items by default) and ``k = 100``.

Usage (starts ``recvae serve`` on a free loopback port, loads it for 60 s, stops it)::

    .venv/bin/python benchmarks/serve_load.py --bundle runs/ml1m/bundle --rate 300 --duration 60

or against a server already running: ``--url http://127.0.0.1:8000 --bundle PATH`` (the bundle
then only supplies histories). Targets (issue 4): at least 300 requests/s with p99 under 50 ms
and zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from serve_common import machine, percentiles, sample_histories, write_json

ROOT = Path(__file__).resolve().parents[1]


# uvicorn closes a keep-alive connection after 5 s idle; reusing one that old could race with
# that close, so older idle connections are dropped and replaced.
MAX_IDLE_S = 3.0


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Connections opened on demand, reused when free, at most ``size`` at a time."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.free: list[Connection] = []
        self.slots = asyncio.Semaphore(size)

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        async with self.slots:
            conn = self.free.pop() if self.free else None
            if conn is not None and time.monotonic() - conn.last_used > MAX_IDLE_S:
                conn.close()
                conn = None
            if conn is None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                conn = Connection(reader, writer)
            try:
                result = await conn.request(payload)
            except BaseException:
                conn.close()
                raise
            conn.last_used = time.monotonic()
            self.free.append(conn)
            return result

    def close(self) -> None:
        for conn in self.free:
            conn.close()


def build_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + data


async def run_load(
    url: str,
    payloads: list[bytes],
    *,
    rate: float,
    duration: float,
    connections: int,
    timeout: float,
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    pool = Pool(host, port, connections)
    n_requests = int(rate * duration)
    latencies: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        try:
            status, body = await asyncio.wait_for(
                pool.request(payloads[i % len(payloads)]), timeout
            )
        except Exception as exc:  # a failed request is counted, never fatal
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            return
        end = time.perf_counter()
        if status != 200 or b'"items"' not in body:
            key = f"HTTP {status}"
            errors[key] = errors.get(key, 0) + 1
            return
        latencies.append(end - due)
        service.append(end - sent)

    loop_lag_max = 0.0
    start = time.perf_counter() + 0.1
    for i in range(n_requests):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            loop_lag_max = max(loop_lag_max, -delay)
        tasks.append(asyncio.create_task(one(i, due)))
    send_end = time.perf_counter()
    await asyncio.gather(*tasks)
    end = time.perf_counter()
    pool.close()
    return {
        "target_rate": rate,
        "duration_s": duration,
        "requests": n_requests,
        "ok": len(latencies),
        "errors": errors,
        "n_errors": sum(errors.values()),
        "throughput_rps": round(len(latencies) / (end - start), 1),
        "send_phase_s": round(send_end - start, 2),
        "max_generator_lag_ms": round(loop_lag_max * 1000, 2),
        "latency_from_due_time": percentiles(latencies),
        "latency_from_send": percentiles(service),
    }


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1] is the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(bundle: Path, port: int, workers: int, threads: int, log: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECVAE_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    code = "import sys; from pipelines.cli import main; sys.exit(main())"
    command = [
        sys.executable,
        "-c",
        code,
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    out = log.open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"server not ready in 180 s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, required=True, help="bundle (histories come from it)"
    )
    parser.add_argument("--url", help="a running server; default: start one on a free port")
    parser.add_argument("--name", default="", help="label in the output")
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--history", type=int, default=50, help="items per history")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--connections", type=int, default=64, help="most open connections")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (s)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (own server)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback only: --url must point at 127.0.0.1 or localhost")

    histories = sample_histories(args.bundle, 2000, args.history, seed=1)
    process = None
    url = args.url
    if url is None:
        port = free_port()
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"recvae-serve-bench-{port}.log"
        process = start_server(args.bundle, port, args.workers, args.threads, log)
        url = f"http://127.0.0.1:{port}"
    parts = urlsplit(url)
    payloads = [
        build_request(
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            "/v1/recommendations",
            {"history": h, "k": args.k},
        )
        for h in histories
    ]
    try:
        if args.warmup > 0:
            asyncio.run(
                run_load(
                    url,
                    payloads,
                    rate=args.rate,
                    duration=args.warmup,
                    connections=args.connections,
                    timeout=args.timeout,
                )
            )
        before = machine()
        server_cpu = None if process is None else process_tree_cpu_seconds(process.pid)
        client_cpu = time.process_time()
        result = asyncio.run(
            run_load(
                url,
                payloads,
                rate=args.rate,
                duration=args.duration,
                connections=args.connections,
                timeout=args.timeout,
            )
        )
        after = machine()
        client_cpu = time.process_time() - client_cpu
        if process is not None and server_cpu is not None:
            server_cpu = process_tree_cpu_seconds(process.pid) - server_cpu
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    write_json(
        {
            "model": args.name,
            "bundle": str(args.bundle),
            "server": {"workers": args.workers, "torch_threads": args.threads, "url": url},
            "history_length": args.history,
            "k": args.k,
            "machine_before": before,
            "machine_after": after,
            **result,
            # CPU per answered request: what the server costs regardless of how busy the
            # machine is (wall-clock latency is not, on a shared machine).
            "server_cpu_ms_per_request": None
            if server_cpu is None or not result["ok"]
            else round(1000 * server_cpu / result["ok"], 3),
            "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, result["requests"]), 3),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
