"""How long ``GET /healthz`` waits while ``recvae serve`` parses a large JSON body (loopback only).

Starts ``recvae serve`` on a free 127.0.0.1 port (``serve_load.start_server``: one worker, the
serving defaults, so a 16 MiB body cap), times idle ``/healthz``, then for each body shape sends
one POST from a thread while the main thread polls ``GET /healthz`` every 5 ms on its own
keep-alive connection, until the POST is answered. Each repeat reports the POST's status and
time and the count, median and worst of the probe latencies during it.

The bodies are sized to just under the body cap (``--max-bytes``):

- ``batch``: ``POST /v1/recommendations/batch`` with histories of 10 ids each (190,301 of them
  in 16 MiB);
- ``single``: ``POST /v1/recommendations`` with one history of consecutive ids (2,236,039 in
  16 MiB).

Both exceed the server's ``max_batch`` / ``max_history``, so the answer is a 422, which is
fine: the handler checks those limits only after the whole body has been decoded and validated,
and that parse (and where it runs: the event loop, or a worker thread) is what is measured.

Usage::

    .venv/bin/python benchmarks/serve_probe_delay.py --repeats 3 --json results.json
    .venv/bin/python benchmarks/serve_probe_delay.py --bundle runs/ml1m/bundle --shapes single

Without ``--bundle`` a tiny Mult-VAE is trained on synthetic data first (a few seconds); the
model does not matter, since no request gets as far as scoring. The JSON also names which
``serving/guards.py`` the server's checkout imports, and whether it has ``JSONBodyRoute``, so
that a run from an older checkout (a git worktree) can be told apart.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from serve_common import machine, write_json
from serve_load import ROOT, free_port, start_server

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # the serving default (RECVAE_MAX_BODY_BYTES)
BATCH_HISTORY_LENGTH = 10
PATHS = {"batch": "/v1/recommendations/batch", "single": "/v1/recommendations"}


def batch_body(max_bytes: int, length: int = BATCH_HISTORY_LENGTH) -> tuple[bytes, int]:
    """The largest ``{"histories": [{"history": [...]}, ...]}`` of ``length``-id histories
    (ids 0, 1, 2, ... in order) within ``max_bytes``, and its number of histories."""
    head, tail = '{"histories":[', "]}"
    total = len(head) + len(tail)
    pieces: list[str] = []
    while True:
        start = len(pieces) * length
        ids = ",".join(map(str, range(start, start + length)))
        piece = '{"history":[' + ids + "]}"
        grown = total + len(piece) + (1 if pieces else 0)
        if grown > max_bytes:
            break
        pieces.append(piece)
        total = grown
    return (head + ",".join(pieces) + tail).encode(), len(pieces)


def single_body(max_bytes: int) -> tuple[bytes, int]:
    """The largest ``{"history": [0, 1, 2, ...]}`` within ``max_bytes``, and its number of ids."""
    head, tail = '{"history":[', "]}"
    total = len(head) + len(tail)
    n = 0
    while True:
        grown = total + len(str(n)) + (1 if n else 0)
        if grown > max_bytes:
            break
        total = grown
        n += 1
    return (head + ",".join(map(str, range(n))) + tail).encode(), n


def build_small_bundle(path: Path) -> Path:
    """A tiny Mult-VAE (100 items) trained for one epoch on synthetic data."""
    from recvae.config import MultVAEConfig, RunOptions
    from recvae.data import synthetic_interactions
    from recvae.training import train

    data = synthetic_interactions(n_users=300, n_items=100, n_interactions=3000, seed=0)
    config = MultVAEConfig(hidden_dims=(16,), latent_dim=8, epochs=1, batch_size=64, seed=0)
    return train(data, config, options=RunOptions(device="cpu", progress=False)).save(path)


def server_code() -> dict[str, Any]:
    """Which ``serving.guards`` a server started from ``ROOT`` imports (same interpreter, cwd
    and environment as ``start_server``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECVAE_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    code = (
        "import json, serving.guards as g; "
        "print(json.dumps({'guards': g.__file__, 'json_body_route': hasattr(g, 'JSONBodyRoute')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def get_ms(connection: http.client.HTTPConnection, path: str) -> tuple[int, float]:
    start = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    return response.status, (time.perf_counter() - start) * 1000


def idle_probes(port: int, warmup: int, n: int) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(warmup):
            get_ms(connection, "/healthz")
        times = []
        for _ in range(n):
            status, ms = get_ms(connection, "/healthz")
            if status != 200:
                raise RuntimeError(f"idle /healthz answered {status}")
            times.append(ms)
    finally:
        connection.close()
    return {
        "n": n,
        "median_ms": round(statistics.median(times), 3),
        "max_ms": round(max(times), 3),
    }


def post_once(port: int, path: str, body: bytes, timeout: float, result: dict[str, Any]) -> None:
    """Send the POST on a fresh connection; fill ``result`` (status, ms, detail or error)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        answer = response.read()
        result["post_ms"] = round((time.perf_counter() - start) * 1000, 1)
        result["post_status"] = response.status
        try:
            detail = json.loads(answer)["detail"]
            first = detail[0] if isinstance(detail, list) and detail else detail
            result["post_detail"] = str(first.get("msg") if isinstance(first, dict) else first)[
                :160
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            result["post_detail"] = answer[:160].decode("utf-8", "replace")
    except Exception as exc:  # a failed POST is recorded, never fatal
        result["post_ms"] = round((time.perf_counter() - start) * 1000, 1)
        result["post_status"] = None
        result["post_error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        connection.close()


def probe_during_post(
    port: int, path: str, body: bytes, *, interval: float, timeout: float
) -> dict[str, Any]:
    """One repeat: the POST in a thread, ``GET /healthz`` every ``interval`` s until it ends."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=post_once, args=(port, path, body, timeout, result), daemon=True
    )
    probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    get_ms(probe, "/healthz")  # the connection is open before the POST starts
    times: list[float] = []
    errors = 0
    deadline = time.monotonic() + timeout + 30
    max_probes = int((timeout + 30) / interval) + 1
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() < deadline and len(times) < max_probes:
            try:
                status, ms = get_ms(probe, "/healthz")
            except (OSError, http.client.HTTPException):
                errors += 1
                probe.close()
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            if status != 200:
                errors += 1
            times.append(ms)
            time.sleep(interval)
    finally:
        probe.close()
        thread.join(timeout=timeout + 30)
    if thread.is_alive():
        result.setdefault("post_error", "POST still running after the deadline")
    return {
        **result,
        "healthz_n": len(times),
        "healthz_errors": errors,
        "healthz_median_ms": round(statistics.median(times), 2) if times else None,
        "healthz_max_ms": round(max(times), 2) if times else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle; default: train a tiny one")
    parser.add_argument("--name", default="", help="label in the output (e.g. before/after)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(PATHS), default=["batch", "single"])
    parser.add_argument("--repeats", type=int, default=3, help="POSTs per body shape")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="body size to stay within (default: the server's 16 MiB cap)",
    )
    parser.add_argument("--interval-ms", type=float, default=5.0, help="pause between probes")
    parser.add_argument("--idle", type=int, default=100, help="idle /healthz requests timed")
    parser.add_argument("--timeout", type=float, default=120.0, help="POST timeout (s)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 64 <= args.max_bytes <= DEFAULT_MAX_BYTES:
        parser.error(f"--max-bytes must be between 64 and {DEFAULT_MAX_BYTES}")
    if args.interval_ms <= 0 or args.timeout <= 0 or args.idle < 1:
        parser.error("--interval-ms, --timeout and --idle must be positive")

    builders = {"batch": batch_body, "single": single_body}
    bodies = {shape: builders[shape](args.max_bytes) for shape in args.shapes}
    code = server_code()
    with tempfile.TemporaryDirectory(prefix="recvae-probe-delay-") as scratch:
        bundle = args.bundle or build_small_bundle(Path(scratch) / "bundle")
        port = free_port()
        log = Path(scratch) / "serve.log"
        before = machine()
        process = start_server(bundle, port, 1, 1, log)
        try:
            code["server_cwd"] = os.readlink(f"/proc/{process.pid}/cwd")
            idle = idle_probes(port, 20, args.idle)
            shapes = []
            for shape, (body, count) in bodies.items():
                runs = []
                for repeat in range(args.repeats):
                    run = probe_during_post(
                        port,
                        PATHS[shape],
                        body,
                        interval=args.interval_ms / 1000,
                        timeout=args.timeout,
                    )
                    runs.append(run)
                    print(
                        f"{shape} #{repeat + 1}: POST {run.get('post_status')} in "
                        f"{run['post_ms']:.0f} ms; /healthz n={run['healthz_n']}, median "
                        f"{run['healthz_median_ms']} ms, max {run['healthz_max_ms']} ms",
                        file=sys.stderr,
                    )
                shapes.append(
                    {
                        "shape": shape,
                        "path": PATHS[shape],
                        "bytes": len(body),
                        "histories" if shape == "batch" else "ids": count,
                        "runs": runs,
                    }
                )
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        after = machine()
        result = {
            "name": args.name,
            "bundle": str(args.bundle) if args.bundle else "tiny synthetic (built by the script)",
            "server": {"workers": 1, "torch_threads": 1, "root": str(ROOT), **code},
            "versions": {
                "python": sys.version.split()[0],
                "torch": version("torch"),
                "fastapi": version("fastapi"),
                "pydantic": version("pydantic"),
            },
            "max_bytes": args.max_bytes,
            "interval_ms": args.interval_ms,
            "machine_before": before,
            "machine_after": after,
            "idle_healthz": idle,
            "shapes": shapes,
        }
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
