"""The real server: ``recvae serve`` started as a subprocess on a free loopback port, called over
HTTP; reloads while threads hammer it; start-up failures of the command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from recvae.recommender import Recommender

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_TIMEOUT = 120.0  # seconds; the shared test machine can be slow to import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recvae_command(*args: str) -> list[str]:
    """The ``recvae`` console command (run through this interpreter)."""
    return [
        sys.executable,
        "-c",
        "import sys; from pipelines.cli import main; sys.exit(main())",
        *args,
    ]


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECVAE_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture(scope="module")
def hammer_bundles(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Two bundles whose rankings differ clearly (so a mixed-up answer would show)."""
    rec = Recommender.load(tiny_bundle)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bias = rec.model.decoder[-1].bias
        bias.add_(3.0 * torch.randn(bias.shape, generator=generator))
    rec.meta.pop("model_version", None)
    other = rec.save(tmp_path_factory.mktemp("hammer") / "other")
    return tiny_bundle, other


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``recvae serve`` on a free loopback port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            recvae_command(
                "serve",
                "--bundle",
                str(tiny_bundle),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-k",
                "50",
                "--max-body-bytes",
                "100000",
                "--no-access-log",
                "--log-level",
                "warning",
            ),
            cwd=ROOT,
            env=server_env(RECVAE_ADMIN_TOKEN=TOKEN),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {START_TIMEOUT}s:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_real_server_answers_over_http(server: str, tiny_bundle: Path) -> None:
    rec = Recommender.load(tiny_bundle)
    history = rec.user_history(4).tolist()
    with httpx.Client(base_url=server, timeout=10) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["model_version"] == rec.version
        response = client.post("/v1/recommendations", json={"history": history, "k": 5})
        assert response.status_code == 200
        expected = rec.recommend_from_history(history, k=5).to_lists()[0]
        assert [e["item_id"] for e in response.json()["items"]] == [i for i, _ in expected]
        assert client.get("/v1/users/4/recommendations?k=3").status_code == 200
        assert client.get("/v1/users/nobody/recommendations").status_code == 404
        assert client.get("/v1/items/20/similar?k=3").status_code == 200
        assert client.get("/v1/model").json()["limits"]["max_k"] == 50  # the flag arrived
        bad = client.post(
            "/v1/recommendations",
            content=b'{"history": [1,',
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 422
        assert client.get("/openapi.json").json()["info"]["title"]
        assert "recvae_http_requests_total" in client.get("/metrics").text


def test_bad_bodies_get_4xx_and_keep_the_connection(server: str) -> None:
    # One keep-alive connection throughout: each refusal must leave it usable.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server, timeout=10, limits=limits) as client:
        refusals = [
            (b'{"history": [1], "weights": [NaN]}', "application/json", 422),
            (b'{"history": ["\\ud800"]}', "application/json", 422),
            (b'{"history": [1]}', "text/plain", 415),
            (b'{"history": [' + b"1, " * 40_000 + b"1]}", "application/json", 413),
        ]
        for content, content_type, status in refusals:
            response = client.post(
                "/v1/recommendations", content=content, headers={"content-type": content_type}
            )
            assert response.status_code == status, response.text
            assert "detail" in response.json()
            assert client.post("/v1/recommendations", json={"history": [1]}).status_code == 200
        assert client.head("/healthz").status_code == 200


def _read_response(stream: Any) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length, read from ``stream``."""
    status_line = stream.readline()
    assert status_line, "the server closed the connection"
    status = int(status_line.split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def test_an_unexpected_error_is_a_json_500_and_keeps_the_connection(tiny_bundle: Path) -> None:
    # uvicorn (in this process, so the model can be broken) behind the real app: Starlette's
    # last-resort handler re-raised after answering, and uvicorn then dropped the connection,
    # so the client's next request failed too.
    import uvicorn

    from serving.app import create_app
    from serving.settings import ServingSettings

    app = create_app(ServingSettings(bundle=str(tiny_bundle)))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        served = app.state.model_state.current

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

        object.__setattr__(served, "recommend_histories", broken)
        # A raw socket: an HTTP client library would quietly reconnect.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            stream = sock.makefile("rb")
            for _ in range(2):
                body = b'{"history": [0]}'
                sock.sendall(
                    b"POST /v1/recommendations HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                status, payload = _read_response(stream)
                assert status == 500 and payload == b'{"detail":"internal server error"}'
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(stream)[0] == 200  # same connection, still open
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_reload_under_concurrent_requests(server: str, hammer_bundles: tuple[Path, Path]) -> None:
    """Threads hammer the server while reloads swap two models back and forth: every request
    succeeds, and every answer is exactly the one its reported model version gives."""
    bundle_a, bundle_b = hammer_bundles
    rec_a, rec_b = Recommender.load(bundle_a), Recommender.load(bundle_b)
    history = rec_a.user_history(2).tolist()
    expected = {
        rec.version: [i for i, _ in rec.recommend_from_history(history, k=8).to_lists()[0]]
        for rec in (rec_a, rec_b)
    }
    assert len(expected) == 2
    assert expected[rec_a.version] != expected[rec_b.version]

    stop = threading.Event()
    failures: list[str] = []
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(base_url=server, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/recommendations", json={"history": history, "k": 8})
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"transport error: {exc!r}")
                    continue
                body: dict[str, Any] = response.json()
                with lock:
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text}")
                        continue
                    version = body["model_version"]
                    seen[version] += 1
                    items = [e["item_id"] for e in body["items"]]
                    if items != expected.get(version):
                        failures.append(f"answer does not match version {version}: {items}")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    reloads = []
    try:
        with httpx.Client(base_url=server, timeout=60, headers=AUTH) as admin:
            for i in range(6):
                target = bundle_b if i % 2 == 0 else bundle_a
                response = admin.post("/v1/admin/reload", json={"bundle": str(target)})
                reloads.append(response.status_code)
                time.sleep(0.15)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert reloads == [200] * 6
    assert not failures, failures[:5]
    assert set(seen) == {rec_a.version, rec_b.version}, seen
    assert sum(seen.values()) > 20


def test_serve_command_rejects_a_missing_bundle(tmp_path: Path) -> None:
    result = subprocess.run(
        recvae_command("serve", "--bundle", str(tmp_path / "missing")),
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no model bundle" in result.stderr
    nothing = subprocess.run(
        recvae_command("serve"), cwd=ROOT, env=server_env(), capture_output=True, text=True
    )
    assert nothing.returncode == 2
    assert "nothing to serve" in nothing.stderr


@pytest.mark.slow
def test_serve_command_fails_on_a_corrupted_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "item_ids.json").write_text('{"kind": "int", "ids": [1]}')
    result = subprocess.run(
        recvae_command("serve", "--bundle", str(bundle), "--port", str(free_port())),
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 3
    assert "checksum of item_ids.json does not match" in result.stderr
    assert "the server did not start" in result.stderr
    # The reason in a few lines, not two chained tracebacks; no "still serving None".
    assert "Traceback" not in result.stderr, result.stderr
    assert "cannot serve: the model from" in result.stderr
    assert "still serving" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8, result.stderr


def test_multi_worker_listener_keeps_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several workers the listener says IPPROTO_TCP, so asyncio sets TCP_NODELAY on every
    accepted connection (uvicorn's own listener does not: ~40 ms per keep-alive request)."""
    import uvicorn
    import uvicorn.supervisors

    from pipelines.commands import serve

    seen: dict[str, Any] = {}

    class FakeSupervisor:
        def __init__(self, config: Any, sockets: list[socket.socket]) -> None:
            seen["workers"], seen["sockets"] = config.workers, sockets

        def run(self) -> None:
            seen["ran"] = True

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", FakeSupervisor)
    serve._run_uvicorn(uvicorn, 2, factory=True, host="127.0.0.1", port=free_port())
    (listener,) = seen["sockets"]
    try:
        assert seen["workers"] == 2 and seen["ran"]
        assert listener.proto == socket.IPPROTO_TCP
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        assert accepted.proto == socket.IPPROTO_TCP  # what asyncio checks before TCP_NODELAY
        accepted.close()
        client.close()
    finally:
        listener.close()
