"""Against a real ``mlflow server`` (started as users start it, artifacts proxied over HTTP):
``recvae train`` through ``MLFLOW_TRACKING_URI``, its run, artifacts and registered version.

The other tracking tests use an embedded sqlite store; these check what only a server shows
(``mlflow-artifacts:`` URIs, paths resolved on another machine). The server is a subprocess on
a free loopback port, its store and artifacts in a temporary folder, shared by the module's
tests; they skip when it does not start in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from tests.conftest import write_interactions_csv  # noqa: E402

START_TIMEOUT = 90.0  # seconds for the server to answer /health on a slow, shared machine
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    root: Path  # the server's working directory, holding its store and artifacts


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """A child's environment: this checkout's recvae, no tracking settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECVAE_", "MLFLOW_TRACKING"))}
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server and its workers (its own process group), then reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    else:
        try:  # workers of a server that exited on its own
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def _keep_the_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore MLflow's process-wide tracking URI after each test: these point it at the
    server, which is gone once the module ends (a later call there would retry for minutes)."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)


def _mlflow_executable() -> Path:
    if sys.platform == "win32":
        pytest.skip("the server fixture uses POSIX process groups")
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.is_file():
        found = shutil.which("mlflow")
        if found is None:
            pytest.skip("no mlflow command to start a tracking server with")
        executable = Path(found)
    return executable


def _start_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """``mlflow server`` on ``port`` with its sqlite store and artifacts in ``root`` (kept
    between starts), once it answers; skips the test when it does not start in time."""
    executable = _mlflow_executable()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(executable),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = root / "server.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=_env(TMPDIR=str(root / "tmp")),  # MLflow's db_init_lock file goes there
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers stop with it
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(uri):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            tail = log.read_text(errors="replace")[-2000:]
            pytest.skip(
                f"mlflow server did not answer at {uri} within {START_TIMEOUT:.0f}s "
                f"(exit code {process.poll()}): {tail}"
            )
        time.sleep(0.5)
    return process


def _kill(process: subprocess.Popen[bytes]) -> None:
    """The server dies at once (SIGKILL to its process group), as a crashed host would."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=15)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """``mlflow server`` with a sqlite store and proxied artifacts, under a temporary folder;
    one for the module (starting it takes 5-10 s)."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    process = _start_server(root, port)
    try:
        yield TrackingServer(f"http://127.0.0.1:{port}", root)
    finally:
        _stop(process)


def _recvae(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``recvae ARGS`` in ``cwd``, its temporary files in ``cwd/../tmp``."""
    tmp = cwd.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]
        + list(args),
        cwd=cwd,
        env=_env(TMPDIR=str(tmp), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_logs_run_artifacts_model_and_registry_to_a_tracking_server(
    tracking_server: TrackingServer, tmp_path: Path
) -> None:
    from recvae.data import planted_interactions
    from recvae.recommender import Recommender
    from recvae.tracking import configure_tracking, resolve_bundle

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    data = planted_interactions(n_users=160, n_items=40, n_clusters=4, seed=3)
    log = write_interactions_csv(data, client_dir / "log.csv")
    server = tracking_server.uri
    argv = ["train", "--data", str(log), "--n-heldout", "20", "--epochs", "3"]
    argv += ["--batch-size", "32", "--latent-dim", "8", "--no-progress", "--device", "cpu"]
    argv += ["--threads", "1", "-o", "run", "--experiment-name", "e2e"]
    argv += ["--registered-model", "recvae-e2e", "--alias", "staging"]
    done = _recvae(*argv, cwd=client_dir, MLFLOW_TRACKING_URI=server, RECVAE_TRACKING="on")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"mlflow       {server}, experiment 'e2e'" in done.stdout
    assert "registered   models:/recvae-e2e@staging (version 1)" in done.stdout
    # Nothing tracked locally: no store, no artifacts in the job's folder.
    assert sorted(p.name for p in client_dir.iterdir()) == ["log.csv", "run"]

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("e2e")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["latent_dim"] == "8"
    assert run.data.params["protocol.n_heldout"] == "20"
    steps = [m.step for m in client.get_metric_history(run_id, "val_ndcg_at_100")]
    assert steps == [1, 2, 3]
    for name in ("loss", "nll", "kl", "beta"):
        assert len(client.get_metric_history(run_id, name)) == 3
    for name in ("test_ndcg_at_100", "test_ndcg_at_100_se", "validation_ndcg_at_100"):
        assert name in run.data.metrics
    assert run.data.tags["data.name"] == "log" and len(run.data.tags["data.fingerprint"]) == 64
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/metrics_vs_k.png"}
    # The artifacts went over HTTP into the server's artifact store.
    assert list((tracking_server.root / "artifacts").rglob("learning_curve.png"))

    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == run_id
    version = client.get_model_version_by_alias("recvae-e2e", "staging")
    assert version.version == "1" and version.run_id == run_id
    assert version.aliases == ["staging"]

    # The registered bundle downloads through the server and is the one written locally.
    configure_tracking(server)
    bundle = resolve_bundle("models:/recvae-e2e@staging", dst=tmp_path / "download")
    local = Recommender.load(client_dir / "run" / "bundle")
    assert Recommender.load(bundle).version == local.version

    listing = _recvae("runs", "--experiment", "e2e", cwd=client_dir, MLFLOW_TRACKING_URI=server)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert "train-log-multvae" in listing.stdout and "finished" in listing.stdout


def test_a_relative_artifact_location_is_the_jobs_folder_not_the_servers(
    tracking_server: TrackingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `[mlflow] artifact_location = "artifacts-here"` is relative to the job's working
    # directory, as with a sqlite store; a server used to resolve it against its own.
    from pipelines.tracking_hooks import Tracker

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    tracker = Tracker(
        enabled=True,
        tracking_uri=tracking_server.uri,
        experiment="relative",
        artifact_location="artifacts-here",
    )
    assert tracker.experiment_id is not None
    location = MlflowClient(tracking_server.uri).get_experiment(tracker.experiment_id)
    assert location.artifact_location == (job_dir / "artifacts-here").as_uri()
    note = job_dir / "note.txt"
    note.write_text("x")
    with tracker.run("r"):
        tracker.log_artifact(note)
    assert tracker.errors == []
    assert [p.name for p in (job_dir / "artifacts-here").rglob("note.txt")] == ["note.txt"]
    assert not (tracking_server.root / "artifacts-here").exists()


def test_a_server_gone_mid_training_fails_the_night_once_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server is killed after epoch 2 of the night: the night fails after the one call that
    # found it gone (each later call paid MLflow's retries again, about four minutes each by
    # default), keeps its checkpoint and the champion; restarted on the same store, the rerun
    # continues the same MLflow run, with every epoch, and registers the challenger once.
    import mlflow.utils.rest_utils as rest_utils

    from pipelines.nightly.job import StateDir, run_retrain
    from tests.test_nightly import _always_promote, _tiny_config, _tiny_lake

    root = tmp_path / "server"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # MLflow's default is 7
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    days = _tiny_lake(tmp_path / "lake", days=4)
    config = _tiny_config(tmp_path, None, registered_model="recvae-gone")
    text = config.read_text().replace("epochs = 2", "epochs = 4")
    lines = [line for line in text.splitlines() if not line.startswith("artifact_location")]
    config.write_text(
        "\n".join(lines).replace(f'"sqlite:///{tmp_path / "mlflow.db"}"', f'"{uri}"') + "\n"
    )
    settings = _always_promote(config)
    assert settings.mlflow.tracking_uri == uri
    state = StateDir(settings.state_dir)

    process = _start_server(root, port)
    try:
        assert run_retrain(settings, days[2]).summary["registry"]["new_version"] == "1"

        paid_retries: list[str | None] = []
        real_request = rest_utils.http_request

        def counted(*args: object, **kwargs: object) -> object:
            try:
                return real_request(*args, **kwargs)
            except Exception:
                paid_retries.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
                raise

        def kill_after_epoch_2(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 2:
                _kill(process)

        with monkeypatch.context() as mp:
            mp.setattr(rest_utils, "http_request", counted)
            failed = run_retrain(settings, days[3], on_epoch=kill_after_epoch_2)
        assert (failed.status, failed.exit_code) == ("failed", 1)
        assert failed.reason.startswith("training failed: MlflowException: API request to " + uri)
        assert paid_retries == ["1", "0"]  # the call that failed; ending the run, one try
        assert "cannot reach the MLflow tracking server" in failed.summary["mlflow_error"]
        on_disk = state.summary(days[3])
        assert on_disk is not None and on_disk["status"] == "failed"
        assert (state.checkpoint_dir(days[3]) / "checkpoint.pt").is_file()
        run_id = failed.summary["mlflow"]["run_id"]
        assert (state.read_json(state.attempt_path(days[3])) or {})["run_id"] == run_id

        process = _start_server(root, port)  # the same store
        client = MlflowClient(uri)
        assert client.get_model_version_by_alias("recvae-gone", "champion").version == "1"
        assert client.get_run(run_id).info.status == "RUNNING"

        outcome = run_retrain(settings, days[3])
        assert outcome.status == "promoted", outcome.reason
        assert outcome.summary["mlflow"]["run_id"] == run_id
        assert outcome.summary["mlflow"]["resumed_run"] is True
        assert outcome.summary["training"]["resumed_from_epoch"] == 3
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["nightly.status"] == "promoted"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train.loss"))
        assert steps == [1, 2, 3, 4]
        versions = client.search_model_versions("name = 'recvae-gone'")
        assert sorted(str(v.version) for v in versions) == ["1", "2"]
        assert client.get_model_version_by_alias("recvae-gone", "champion").version == "2"
        assert not state.checkpoint_dir(days[3]).exists()
    finally:
        _stop(process)
