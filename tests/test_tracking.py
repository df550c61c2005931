"""MLflow logging against a temporary sqlite store: runs, params, per-epoch metrics, artifacts,
the bundle as a registered pyfunc model with its alias, and the command-line integration."""

from __future__ import annotations

import os
import re
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.cli import main  # noqa: E402
from pipelines.tracking_hooks import Tracker, make_tracker  # noqa: E402
from recvae import tracking  # noqa: E402
from recvae.recommender import Recommender  # noqa: E402
from tests.conftest import write_interactions_csv  # noqa: E402


def _planted_csv(path: Path, n_users: int = 160, n_items: int = 40) -> Path:
    from recvae.data import planted_interactions

    data = planted_interactions(n_users=n_users, n_items=n_items, n_clusters=4, seed=3)
    return write_interactions_csv(data, path)


def test_metric_keys_are_mlflow_safe() -> None:
    assert tracking.metric_key("val_ndcg@100") == "val_ndcg_at_100"
    assert tracking.metric_key("weird key!") == "weird key_"


def test_runs_params_epoch_metrics_and_artifacts(mlflow_uri: str, tmp_path: Path) -> None:
    assert tracking.configure_tracking(mlflow_uri) == mlflow_uri
    experiment_id = tracking.get_or_create_experiment("unit")
    assert tracking.get_or_create_experiment("unit") == experiment_id
    note = tmp_path / "note.md"
    note.write_text("| a | b |\n")
    with tracking.start_run(experiment_id=experiment_id, run_name="parent") as parent_id:
        tracking.log_params({"model": {"hidden_dims": (600,), "beta_max": 0.2}, "seed": None})
        tracking.set_tags({"data.fingerprint": "abc", "skipped": None})
        hook = tracking.epoch_logger()
        for epoch in (1, 2, 3):
            hook(epoch, {"loss": 10.0 / epoch, "val_ndcg@100": 0.1 * epoch, "kl": float("nan")})
        tracking.log_metrics({"test_ndcg@100": 0.31, "test_ndcg@100_q1": float("nan")})
        tracking.log_artifact(note)
        with pytest.raises(FileNotFoundError):
            tracking.log_artifact(tmp_path / "missing.png")
        with tracking.start_run(experiment_id=experiment_id, run_name="child", nested=True) as cid:
            tracking.log_metrics({"train_seconds": 1.5})
    client = MlflowClient()
    run = client.get_run(parent_id)
    assert run.data.params == {
        "model.hidden_dims": "[600]",
        "model.beta_max": "0.2",
        "seed": "None",
    }
    assert run.data.tags["data.fingerprint"] == "abc" and "skipped" not in run.data.tags
    history = client.get_metric_history(parent_id, "val_ndcg_at_100")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.data.metrics["test_ndcg_at_100"] == pytest.approx(0.31)
    assert "kl" not in run.data.metrics and "test_ndcg_at_100_q1" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(parent_id)] == ["note.md"]
    assert client.get_run(cid).data.tags["mlflow.parentRunId"] == parent_id
    assert run.info.status == "FINISHED"
    # Artifacts live beside the sqlite file, not in the working directory.
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (Path(mlflow_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    # The same runs through the listing that `recvae runs` prints.
    runs = tracking.recent_runs(experiment_names=["unit"], limit=10)
    assert {r.name for r in runs} == {"parent", "child"}
    child = next(r for r in runs if r.name == "child")
    assert child.parent_run_id == parent_id and child.metrics["train_seconds"] == 1.5
    assert len(tracking.recent_runs(limit=1)) == 1
    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        tracking.recent_runs(experiment_names=["nope"])
    with pytest.raises(ValueError, match="limit"):
        tracking.recent_runs(limit=0)


def test_failed_block_marks_the_run_failed(mlflow_uri: str) -> None:
    tracking.configure_tracking(mlflow_uri)
    experiment_id = tracking.get_or_create_experiment("failing")
    with pytest.raises(RuntimeError), tracking.start_run(experiment_id=experiment_id) as run_id:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    assert tracking.run_exists(run_id) and not tracking.run_exists("0" * 32)


def test_interrupted_block_marks_the_run_killed(mlflow_uri: str) -> None:
    # Ctrl-C (KeyboardInterrupt, or a subclass of it) ends the run KILLED, not FAILED; so do the
    # enclosing runs it passes through.
    class Interrupted(KeyboardInterrupt):
        pass

    tracking.configure_tracking(mlflow_uri)
    experiment_id = tracking.get_or_create_experiment("interrupted")
    client = MlflowClient()
    with (
        pytest.raises(KeyboardInterrupt),
        tracking.start_run(experiment_id=experiment_id) as run_id,
    ):
        raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "KILLED"
    with (
        pytest.raises(Interrupted),
        tracking.start_run(experiment_id=experiment_id) as parent_id,
        tracking.start_run(experiment_id=experiment_id, nested=True) as child_id,
    ):
        raise Interrupted
    assert client.get_run(child_id).info.status == "KILLED"
    assert client.get_run(parent_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    with tracking.start_run(experiment_id=experiment_id) as finished_id:
        pass
    assert client.get_run(finished_id).info.status == "FINISHED"


def test_bundle_registry_alias_and_pyfunc_predict_with_params(
    mlflow_uri: str, tiny_bundle: Path
) -> None:
    tracking.configure_tracking(mlflow_uri)
    experiment_id = tracking.get_or_create_experiment("registry")
    with tracking.start_run(experiment_id=experiment_id):
        info = tracking.log_bundle_model(tiny_bundle, registered_model_name="recvae-unit")
    version = str(info.registered_model_version)
    assert tracking.alias_model_version("recvae-unit", "staging") is None
    tracking.set_alias("recvae-unit", "staging", version)
    assert tracking.alias_model_version("recvae-unit", "staging") == version
    # A second version moves the alias only when told to.
    with tracking.start_run(experiment_id=experiment_id):
        second = tracking.log_bundle_model(tiny_bundle, registered_model_name="recvae-unit")
    assert str(second.registered_model_version) != version
    assert tracking.alias_model_version("recvae-unit", "staging") == version

    model = mlflow.pyfunc.load_model("models:/recvae-unit@staging")
    params = model.metadata.signature.params
    assert {p.name: p.default for p in params.params} == {"k": 20, "exclude_seen": True}
    recommender = Recommender.load(tiny_bundle)
    history = [int(i) for i in recommender.item_ids[:3]]
    expected = recommender.recommend_histories([history], 4).to_lists()[0]
    for payload in ([history], {"histories": [history]}):
        out = model.predict(payload, params={"k": 4})
        assert len(out) == 1 and out[0]["item_ids"] == [i for i, _ in expected]
        assert not set(out[0]["item_ids"]) & set(history)
        np.testing.assert_allclose(out[0]["scores"], [s for _, s in expected], rtol=1e-6)
    import pandas as pd

    frame = pd.DataFrame({"history": [history, history[:1]]})
    out = model.predict(frame, params={"k": 2, "exclude_seen": False})
    assert [len(row["item_ids"]) for row in out] == [2, 2]
    seen = recommender.recommend_histories([history], 2, exclude_seen=False).to_lists()[0]
    assert out[0]["item_ids"] == [i for i, _ in seen]
    default_k = min(20, recommender.n_items - len(history))  # the signature's default k
    assert len(model.predict([history])[0]["item_ids"]) == default_k
    # The registry alias resolves back to the bundle that serving loads.
    bundle = tracking.resolve_bundle("models:/recvae-unit@staging")
    assert Recommender.load(bundle).version == recommender.version


def _log_registered_model(mlflow_uri: str, bundle: Path, name: str) -> Any:
    tracking.configure_tracking(mlflow_uri)
    experiment_id = tracking.get_or_create_experiment("pyfunc")
    with tracking.start_run(experiment_id=experiment_id):
        info = tracking.log_bundle_model(bundle, registered_model_name=name)
    tracking.set_alias(name, "staging", str(info.registered_model_version))
    return info


def _repo_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports the recvae under test (this checkout)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(Path(tracking.__file__).resolve().parents[1])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.update(extra)
    return env


def test_pyfunc_predict_accepts_the_numpy_inputs_of_mlflows_scoring_server(
    mlflow_uri: str, tiny_bundle: Path
) -> None:
    # `mlflow models serve` parses JSON "inputs" into numpy arrays before predict sees them:
    # {"inputs": [[1, 2, 3]]} is a 2-D int array, {"inputs": {"histories": ...}} a dict of them.
    _log_registered_model(mlflow_uri, tiny_bundle, "recvae-numpy")
    model = mlflow.pyfunc.load_model("models:/recvae-numpy@staging")
    recommender = Recommender.load(tiny_bundle)
    first = [int(i) for i in recommender.item_ids[:3]]
    second = [int(recommender.item_ids[5])]

    def ranked(histories: list[list[int]]) -> list[list[int]]:
        rows = recommender.recommend_histories(histories, 3).to_lists()
        return [[item for item, _ in row] for row in rows]

    def predicted(model_input: object) -> list[list[int]]:
        return [row["item_ids"] for row in model.predict(model_input, params={"k": 3})]

    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.array(first), np.array(second)]
    cases: list[tuple[object, list[list[int]]]] = [
        (np.array([first]), [first]),  # 2-D array of ids
        (np.array(first), [first]),  # one history
        (np.array([first, second], dtype=object), [first, second]),  # object array of lists
        (ragged, [first, second]),  # object array of arrays
        ({"histories": np.array([first, first])}, [first, first]),
        ({"histories": ragged}, [first, second]),
        ([np.array(first)], [first]),
    ]
    for model_input, histories in cases:
        assert predicted(model_input) == ranked(histories), model_input
    out = model.predict(np.array([first]), params={"k": 3})
    assert all(type(item) is int for item in out[0]["item_ids"])  # JSON-ready, not numpy ints
    for bad, message in [
        (np.zeros((1, 2, 3), dtype=np.int64), "3-D array"),
        ({"items": [first]}, "without a 'histories' key"),
        ("1,2,3", "predict got str"),
        ([first, second[0]], "mixes item-id lists and single item ids"),
        ([[first]], "flat list of item ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.predict(bad)


@pytest.mark.slow
def test_scoring_server_answers_inputs_lists_and_dicts(
    mlflow_uri: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    import json
    import signal
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    _log_registered_model(mlflow_uri, tiny_bundle, "recvae-served")
    recommender = Recommender.load(tiny_bundle)
    history = [int(i) for i in recommender.item_ids[:3]]
    expected = [i for i, _ in recommender.recommend_histories([history], 3).to_lists()[0]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve"]
    command += ["-m", "models:/recvae-served@staging", "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_repo_env(MLFLOW_TRACKING_URI=mlflow_uri),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server and its uvicorn child end together
        )
    base = f"http://127.0.0.1:{port}"

    def post(body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer on {base}/ping:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        status, answer = post({"inputs": [history], "params": {"k": 3}})
        assert status == 200, answer
        assert answer["predictions"][0]["item_ids"] == expected
        status, answer = post({"inputs": {"histories": [history, history]}, "params": {"k": 3}})
        assert status == 200, answer
        assert [row["item_ids"] for row in answer["predictions"]] == [expected, expected]
        # Histories of different lengths: as dataframe records (the README's advice).
        records = [{"history": history}, {"history": history[:1]}]
        status, answer = post({"dataframe_records": records, "params": {"k": 3}})
        assert status == 200, answer
        assert answer["predictions"][0]["item_ids"] == expected
        assert len(answer["predictions"]) == 2 and len(answer["predictions"][1]["item_ids"]) == 3
        # ... or as records in "inputs" (ragged lists there are refused by MLflow's parser).
        status, answer = post({"inputs": records, "params": {"k": 3}})
        assert status == 200, answer
        assert answer["predictions"][0]["item_ids"] == expected
        status, answer = post({"inputs": [history, history[:1]]})
        assert status == 400 and "inhomogeneous" in answer, answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_logged_model_carries_its_code_and_pinned_requirements(
    mlflow_uri: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    import importlib.metadata

    info = _log_registered_model(mlflow_uri, tiny_bundle, "recvae-code")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    code = local / "code" / "recvae"
    for module in ("__init__.py", "tracking.py", "recommender.py", "data/__init__.py"):
        assert (code / module).is_file(), module
    assert not list(code.rglob("__pycache__")) and not list(code.rglob("*.zip"))
    requirements = (local / "requirements.txt").read_text().split()
    names = {re.split(r"[=<>~!\[ ]", line, maxsplit=1)[0].lower() for line in requirements}
    assert "recvae" not in names and "polars" not in names
    for name in ("torch", "numpy", "scipy"):
        installed = importlib.metadata.version(name).split("+")[0]
        assert f"{name}=={installed}" in requirements, (name, requirements)


@pytest.mark.slow
def test_logged_model_predicts_where_recvae_is_not_installed(
    mlflow_uri: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # A fresh interpreter that sees site-packages without processing its .pth files, so the
    # editable install of this checkout is not importable: only the model's own code can be.
    import json
    import subprocess
    import sysconfig

    info = _log_registered_model(mlflow_uri, tiny_bundle, "recvae-isolated")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    recommender = Recommender.load(tiny_bundle)
    history = [int(i) for i in recommender.item_ids[:3]]
    expected = [i for i, _ in recommender.recommend_histories([history], 3).to_lists()[0]]
    script = f"""
import importlib.util, json, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
assert importlib.util.find_spec("recvae") is None, "recvae is importable without the model"
import mlflow.pyfunc
model = mlflow.pyfunc.load_model({str(local)!r})
import recvae
print(json.dumps({{"file": recvae.__file__, "out": model.predict({history!r}, params={{"k": 3}})}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(local.resolve())
    assert result["out"][0]["item_ids"] == expected


_OPEN_DEFAULT_STORE = """
import sys, time
from pathlib import Path
from recvae import tracking
ready = Path(f"ready-{sys.argv[1]}")
ready.touch()
while len(list(Path().glob("ready-*"))) < int(sys.argv[2]):  # start together
    time.sleep(0.01)
uri = tracking.configure_tracking()
tracking.get_or_create_experiment("parallel")
print(uri)
"""


@pytest.mark.slow
def test_parallel_first_use_of_a_fresh_default_store_succeeds(tmp_path: Path) -> None:
    # MLflow migrates a new sqlite schema without a lock; processes that open a fresh store
    # together used to collide ("duplicate column name: step").
    import subprocess

    n_processes = 4
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_DEFAULT_STORE, str(i), str(n_processes)],
            cwd=tmp_path,
            env=_repo_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_processes)
    ]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.strip() == tracking.DEFAULT_TRACKING_URI
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in MlflowClient().search_experiments()].count("parallel") == 1


def test_disabled_tracker_is_a_no_op(tmp_path: Path) -> None:
    tracker = Tracker.disabled()
    with tracker.run("x", nested=True) as run_id:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"b": 2.0}, step=1)
        tracker.log_artifact(tmp_path / "missing")
        assert tracker.epoch_hook() is None
        assert tracker.log_bundle(tmp_path) is None
    assert run_id is None and tracker.errors == []


def test_tracking_default_and_explicit_choices(
    monkeypatch: pytest.MonkeyPatch, mlflow_uri: str
) -> None:
    monkeypatch.setenv("RECVAE_TRACKING", "off")
    assert not make_tracker(track=None, tracking_uri=None, experiment="e").enabled
    assert make_tracker(track=None, tracking_uri=mlflow_uri, experiment="e").enabled
    assert not make_tracker(track=False, tracking_uri=mlflow_uri, experiment="e").enabled
    monkeypatch.setenv("RECVAE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    tracker = make_tracker(track=None, tracking_uri=None, experiment="from-env")
    assert tracker.enabled and tracker.tracking_uri == mlflow_uri


def test_tracker_fails_fast_on_a_bad_store_and_survives_logging_errors(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot open the MLflow store"):
        Tracker(enabled=True, tracking_uri=f"sqlite:///{blocker}/x.db", experiment="e")
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="e")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "log_metrics", broken)
    with tracker.run("r") as run_id:
        tracker.log_metrics({"a": 1.0})  # reported, not raised
        tracker.log_params({"b": 2})
    assert tracker.errors and "disk full" in tracker.errors[0]
    assert MlflowClient().get_run(run_id).data.params == {"b": "2"}


@pytest.mark.slow
def test_train_command_logs_the_run_and_runs_lists_it(
    mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _planted_csv(tmp_path / "log.csv")
    argv = ["train", "--data", str(data), "--n-heldout", "20", "--epochs", "3"]
    argv += ["--batch-size", "32", "--latent-dim", "8", "--no-progress", "--device", "cpu"]
    argv += ["-o", str(tmp_path / "run"), "--tracking-uri", mlflow_uri]
    argv += ["--experiment-name", "cli"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mlflow" in out and mlflow_uri in out
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.data.params["epochs"] == "3" and run.data.params["latent_dim"] == "8"
    assert run.data.params["protocol.n_heldout"] == "20"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ndcg_at_100")] == [
        1,
        2,
        3,
    ]
    for name in ("loss", "nll", "kl", "beta"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3
    for name in ("test_ndcg_at_100", "test_ndcg_at_100_se", "validation_recall_at_20"):
        assert name in run.data.metrics
    assert "test_coverage_at_20" in run.data.metrics and "test_gini_at_20" in run.data.metrics
    tags = run.data.tags
    assert tags["data.name"] == "log" and len(tags["data.fingerprint"]) == 64
    assert tags["recvae.version"] and tags["device"] == "cpu"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/metrics_vs_k.png"}
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id

    assert main(["runs", "--tracking-uri", mlflow_uri, "--experiment", "cli"]) == 0
    listing = capsys.readouterr().out
    assert "train-log-multvae" in listing and "finished" in listing
    ndcg = run.data.metrics["test_ndcg_at_100"]
    assert f"{ndcg:.4f}" in listing


def test_runs_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["runs", "--tracking-uri", missing]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert main(["runs", "--limit", "0"]) == 2


def test_an_http_tracking_server_that_is_not_there_fails_fast() -> None:
    # MLflow's own client would retry a refused connection with backoff for minutes.
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from recvae.tracking import check_reachable, configure_tracking

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(
        ConnectionError, match=f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}"
    ):
        configure_tracking(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 30
    code = main(["runs", "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert code == 1  # a one-line error (the CLI's test of the message is the line above)
    # The advice fits the command: only those that can run untracked suggest it.
    with pytest.raises(ConnectionError) as raised:
        check_reachable(f"http://127.0.0.1:{port}")
    assert "tracking off" not in str(raised.value) and "--no-track" not in str(raised.value)
    with pytest.raises(
        ValueError, match=r"cannot reach .*; or run without tracking \(--no-track\)"
    ):
        Tracker(enabled=True, tracking_uri=f"http://127.0.0.1:{port}", experiment="e")

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")  # an answer: reachable
    finally:
        server.shutdown()
        thread.join()


class _Healthy(BaseHTTPRequestHandler):
    """Answers every GET with 200, as a tracking server's /health does."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _health_server(context: ssl.SSLContext | None = None) -> Iterator[int]:
    """A thread serving ``_Healthy`` on a free loopback port (TLS with ``context``)."""
    server = HTTPServer(("127.0.0.1", 0), _Healthy)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` of a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_reachability_check_accepts_credentials_in_the_uri() -> None:
    # MLflow (through requests) sends http://user:password@host as basic auth; the check used
    # to read "user:password@host" as the host name and refuse a server MLflow reaches.
    from recvae.tracking import check_reachable

    with _health_server() as port:
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}")
    with pytest.raises(ConnectionError) as raised:
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}")  # closed now
    assert "s3cret" not in str(raised.value) and "alice:***@" in str(raised.value)


def test_a_password_in_the_tracking_uri_is_masked_where_it_is_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Messages, the printed summary lines and the nightly summary get logged and kept: a
    # password in the URI (basic auth) must not be in them.
    from recvae.tracking import redact_uri

    assert redact_uri("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_uri("https://token@host/") == "https://token@host/"  # no password
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    tracker = Tracker.disabled()
    assert tracker.display_uri is None
    tracker.tracking_uri = "http://alice:s3cret@host"
    assert tracker.display_uri == "http://alice:***@host"
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # restored afterwards
    with _health_server() as port:  # answers /health only: no MLflow API behind it
        uri = f"http://alice:s3cret@127.0.0.1:{port}"
        with pytest.raises(ValueError) as raised:
            Tracker(enabled=True, tracking_uri=uri, experiment="x")
        assert "alice:***@" in str(raised.value) and "s3cret" not in str(raised.value)
        assert main(["runs", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "alice:***@" in err and "s3cret" not in err


def test_reachability_check_follows_mlflows_tls_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server with a private CA or a self-signed certificate, which MLflow talks to with
    # MLFLOW_TRACKING_SERVER_CERT_PATH or MLFLOW_TRACKING_INSECURE_TLS, used to be refused
    # before MLflow was ever asked.
    from recvae.tracking import check_reachable

    cert, key = _self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS", raising=False)
    with _health_server(context) as port:
        uri = f"https://127.0.0.1:{port}"
        with pytest.raises(ConnectionError, match="(?i)certificate"):
            check_reachable(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        check_reachable(uri)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # urllib3's InsecureRequestWarning: asked for
            check_reachable(uri)


def test_a_store_failure_when_a_run_ends_never_hides_the_block(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ending a run is a call to the store; a server gone by then used to raise out of the
    # `with`, replacing a training's result (or its own error) with MLflow's traceback.
    tracking.configure_tracking(mlflow_uri)
    experiment_id = tracking.get_or_create_experiment("ending")

    def gone(*args: object, **kwargs: object) -> None:
        raise mlflow.exceptions.MlflowException("API request failed: connection refused")

    monkeypatch.setattr(MlflowClient, "set_terminated", gone)
    with pytest.raises(RuntimeError, match="training diverged"):
        with tracking.start_run(experiment_id=experiment_id):
            raise RuntimeError("training diverged")
    assert mlflow.active_run() is None
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(experiment_id=experiment_id):
            raise KeyboardInterrupt
    with pytest.raises(mlflow.exceptions.MlflowException, match="connection refused"):
        with tracking.start_run(experiment_id=experiment_id):
            pass  # nothing else to report: the library raises it
    assert mlflow.active_run() is None

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="ending")
    with tracker.run("r") as run_id:
        tracker.log_metrics({"a": 1.0})
    assert run_id is not None and mlflow.active_run() is None
    assert tracker.errors and "ending run 'r' failed" in tracker.errors[0]
    assert MlflowClient().get_run(run_id).data.metrics == {"a": 1.0}


def test_tracker_skips_calls_while_the_tracking_server_is_down(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow retries each call to a server that went away for about four minutes: a run that
    # logs every epoch used to stall that long per epoch.
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="down")
    calls: list[Mapping[str, float]] = []

    def log(metrics: Mapping[str, float], *, step: int | None = None) -> None:
        calls.append(metrics)
        raise mlflow.exceptions.MlflowException("API request failed: connection refused")

    monkeypatch.setattr(tracking, "log_metrics", log)
    with _health_server() as port:
        tracker.tracking_uri = f"http://127.0.0.1:{port}"  # as if the server were this one
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_metrics({"loss": 0.9}, step=2)  # answers /health: tried again
    assert len(calls) == 2
    start = time.monotonic()
    for epoch in range(3, 10):
        tracker.log_metrics({"loss": 0.5}, step=epoch)
    with tracker.run("later") as run_id:
        pass
    assert time.monotonic() - start < 30
    assert len(calls) == 2 and run_id is None
    assert any("skipped: cannot reach the MLflow tracking server" in e for e in tracker.errors)


def _fake_reachability(monkeypatch: pytest.MonkeyPatch, *, down: bool) -> dict[str, bool]:
    """The tracking server's health check, answering as the test sets ``server["down"]``."""
    server = {"down": down}

    def reachable(uri: str, *, timeout: float = 10.0) -> None:
        if server["down"]:
            raise ConnectionError("cannot reach the MLflow tracking server (test)")

    monkeypatch.setattr(tracking, "check_reachable", reachable)
    return server


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The tracker's monotonic clock, set by the test (``clock["now"]``)."""
    import types

    from pipelines import tracking_hooks

    clock = {"now": 1000.0}
    monkeypatch.setattr(
        tracking_hooks, "time", types.SimpleNamespace(monotonic=lambda: clock["now"])
    )
    return clock


def test_a_server_that_stays_down_is_asked_again_less_and_less_often(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host that drops packets makes each health check wait for its timeout: while the server
    # stays down it is asked again after 5, 10, 20 ... s (at most 5 minutes), calls in between
    # skipped at once; once it answers, calls go through and the wait starts over.
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="backoff")
    tracker.tracking_uri = "http://127.0.0.1:9"  # checked as a server; the store is sqlite
    tracker._record_failure("log_metrics", RuntimeError("connection refused"))
    checks: list[float] = []
    server = {"down": True}

    def reachable(uri: str, *, timeout: float = 10.0) -> None:
        checks.append(clock["now"])
        if server["down"]:
            raise ConnectionError("cannot reach the MLflow tracking server (test)")

    monkeypatch.setattr(tracking, "check_reachable", reachable)
    clock = _fake_clock(monkeypatch)
    logged: list[Mapping[str, float]] = []
    monkeypatch.setattr(tracking, "log_metrics", lambda metrics, step=None: logged.append(metrics))
    for second in range(0, 400):
        clock["now"] = 1000.0 + second
        tracker.log_metrics({"loss": float(second)})
    assert [t - 1000.0 for t in checks] == [0, 5, 15, 35, 75, 155, 315]  # waits 5 .. 160 s
    assert logged == []
    waits = [b - a for a, b in zip(checks, checks[1:], strict=False)]
    clock["now"] = checks[-1] + 2 * waits[-1] + 1
    checks.clear()
    server["down"] = False
    tracker.log_metrics({"loss": -1.0})
    assert len(checks) == 1 and logged == [{"loss": -1.0}]
    server["down"] = True
    tracker.log_metrics({"loss": -2.0})  # fails the check: the wait starts over at 5 s
    clock["now"] += 4
    tracker.log_metrics({"loss": -3.0})
    clock["now"] += 1
    tracker.log_metrics({"loss": -4.0})
    assert len(checks) == 3 and len(logged) == 1
    for _ in range(20):  # the wait stops growing at 5 minutes
        clock["now"] += 301
        tracker.log_metrics({"loss": 0.0})
    assert len(checks) == 23


def test_calls_inside_a_run_skipped_while_the_server_was_down_reach_no_other_run(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child run skipped because the server was down yields None; if the server comes back
    # inside its block, its calls must not land in the parent run (MLflow's active run).
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="skipped-child")
    server = _fake_reachability(monkeypatch, down=True)
    clock = _fake_clock(monkeypatch)
    with tracker.run("parent") as parent_id:
        tracker.tracking_uri = "http://127.0.0.1:9"  # checked as a server; the store is sqlite
        tracker._record_failure("log_metrics", RuntimeError("connection refused"))
        with tracker.run("child", nested=True) as child_id:
            assert child_id is None
            server["down"] = False  # back
            with tracker.run("grandchild", nested=True) as grandchild_id:
                tracker.log_metrics({"grandchild_metric": 1.0})
            tracker.log_metrics({"child_metric": 1.0})
            tracker.set_tags({"child": "yes"})
        assert grandchild_id is None
        clock["now"] += 6.0  # past the wait before the server is asked again
        tracker.log_metrics({"parent_metric": 2.0})  # the parent's own calls resume
    assert parent_id is not None
    run = MlflowClient().get_run(parent_id)
    assert run.data.metrics == {"parent_metric": 2.0}
    assert "child" not in run.data.tags
    experiment = MlflowClient().get_experiment_by_name("skipped-child")
    assert len(MlflowClient().search_runs([experiment.experiment_id])) == 1


def test_a_run_that_fails_to_start_is_skipped_not_raised(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store failing as a child run starts (a server gone between two models of an
    # experiment) raised out of the experiment: it is a logging failure like any other.
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="no-start")
    real_start = tracking.start_run

    @contextmanager
    def failing_start(**kwargs: Any) -> Iterator[str]:
        if kwargs.get("nested"):
            raise mlflow.exceptions.MlflowException("API request failed: connection refused")
        with real_start(**kwargs) as run_id:
            yield run_id

    monkeypatch.setattr(tracking, "start_run", failing_start)
    with tracker.run("parent") as parent_id:
        with tracker.run("child", nested=True) as child_id:
            tracker.log_metrics({"child_metric": 1.0})
            result = "trained"
        tracker.log_metrics({"parent_metric": 2.0})
    assert result == "trained" and child_id is None and parent_id is not None
    assert tracker.errors and "starting run 'child' failed" in tracker.errors[0]
    run = MlflowClient().get_run(parent_id)
    assert run.data.metrics == {"parent_metric": 2.0} and run.info.status == "FINISHED"
    with pytest.raises(ZeroDivisionError):  # the block's own errors still go through
        with tracker.run("parent-2"):
            with tracker.run("child-2", nested=True):
                raise ZeroDivisionError
    assert mlflow.active_run() is None


def test_ending_a_run_while_the_server_is_down_is_a_single_attempt(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each run still open when the server went away paid MLflow's retries (about four minutes)
    # again as it ended; with the server known down, ending it is one attempt without retries
    # (the process's retry settings are restored after).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="quick-end")
    server = _fake_reachability(monkeypatch, down=False)
    ended_with: list[tuple[str | None, str | None]] = []
    real_terminated = MlflowClient.set_terminated

    def set_terminated(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        ended_with.append(
            (
                os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"),
            )
        )
        if server["down"]:
            raise mlflow.exceptions.MlflowException("API request failed: connection refused")
        real_terminated(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", set_terminated)
    with tracker.run("up"):
        pass
    tracker.tracking_uri = "http://127.0.0.1:9"  # checked as a server; the store is sqlite
    with tracker.run("parent"):
        with tracker.run("child", nested=True):
            server["down"] = True
            tracker._record_failure("log_metrics", RuntimeError("connection refused"))
    assert ended_with == [("7", None), ("0", "5"), ("0", "5")]  # child, then parent: one try
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert mlflow.active_run() is None
    assert sum("ending run" in e and "failed" in e for e in tracker.errors) == 2


def test_a_sigterm_during_a_store_call_waits_for_it_and_the_run_ends_killed(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM raised in the middle of a store call can leave a sqlite transaction open (the
    # database locked), and the run could then not be ended KILLED: it stayed RUNNING. The
    # termination now waits for the call to finish.
    import signal

    from pipelines.cli import Terminated, _on_sigterm, _raise_terminated

    tracker = Tracker(enabled=True, tracking_uri=mlflow_uri, experiment="sigterm")
    real_log = tracking.log_metrics
    finished: list[int | None] = []

    def log(metrics: Mapping[str, float], *, step: int | None = None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, unless the termination is deferred
        real_log(metrics, step=step)
        finished.append(step)

    monkeypatch.setattr(tracking, "log_metrics", log)
    previous = _on_sigterm(_raise_terminated)
    try:
        with pytest.raises(Terminated):
            with tracker.run("r") as run_id:
                tracker.log_metrics({"loss": 1.0}, step=1)
                raise AssertionError("the termination is raised as the store call ends")
    finally:
        _on_sigterm(previous)
    assert finished == [1]
    assert run_id is not None
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"loss": 1.0}


def test_train_command_finishes_when_the_store_fails_at_the_end(
    mlflow_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tracking server that went away during training used to end `recvae train` with MLflow's
    # traceback and exit 1 once the run was to be ended, the trained bundle never reported.
    def gone(*args: object, **kwargs: object) -> None:
        raise mlflow.exceptions.MlflowException("API request failed: connection refused")

    monkeypatch.setattr(MlflowClient, "set_terminated", gone)
    data = _planted_csv(tmp_path / "log.csv")
    argv = ["train", "--data", str(data), "--n-heldout", "20", "--epochs", "1"]
    argv += ["--batch-size", "32", "--latent-dim", "4", "--no-progress", "--device", "cpu"]
    argv += ["-o", str(tmp_path / "run"), "--tracking-uri", mlflow_uri]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"bundle       {tmp_path / 'run' / 'bundle'}" in captured.out
    assert "warning: 1 MLflow call(s) failed; first: MLflow: ending run" in captured.err
    assert (tmp_path / "run" / "bundle" / "meta.json").is_file()
