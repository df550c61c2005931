"""The nightly retraining job: simulation scenarios, validation, lock, idempotency, exit codes,
rollback, warm start, the gate and the reload notification.

One in-process simulation (replayed ml-latest-small, tiny model, 3 epochs) runs once for the
module and its MLflow store is shared by the other MLflow tests, because creating an sqlite
store costs seconds. The real ``kill -9`` and real concurrent-process scenarios are ``slow``.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.nightly.checks import CheckResult, failed_checks, validate_partitions
from pipelines.nightly.job import ExitCode, StateDir, UsageError, run_retrain, run_rollback
from pipelines.nightly.lake import (
    QUARANTINE_MARKER,
    SUCCESS_MARKER,
    canonical_frame,
    day_start_epoch,
    list_partitions,
    window_partitions,
)
from pipelines.nightly.lock import LockBusyError, LockInfo, RunLock
from pipelines.nightly.settings import (
    DeploySettings,
    LakeSettings,
    NightlySettings,
    TrainingSettings,
    ValidationSettings,
    load_settings,
    settings_from_dict,
)
from pipelines.nightly.simulate import (
    SimulationOptions,
    SimulationResult,
    expectations,
    format_timeline,
    run_simulation,
)
from pipelines.settings import to_toml

ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENV = "RECVAE_TEST_NIGHTLY_TOKEN"
TOKEN = "s3cret-token"


# ---------------------------------------------------------------------------------- helpers
@dataclass
class ReloadStub:
    """A loopback HTTP server standing in for the serving layer's reload endpoint."""

    url: str
    requests: list[dict[str, Any]]


@pytest.fixture(scope="module")
def reload_stub() -> Iterator[ReloadStub]:
    requests: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            auth = self.headers.get("Authorization")
            requests.append({"path": self.path, "auth": auth, "body": body})
            ok = auth == f"Bearer {TOKEN}" and self.path == "/v1/admin/reload"
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"reloaded": true}' if ok else b'{"detail": "bad token"}')

        def log_message(self, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ReloadStub(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sim(
    tmp_path_factory: pytest.TempPathFactory, reload_stub: ReloadStub
) -> Iterator[SimulationResult]:
    """Five nights: normal, corrupt, cripple, kill (in-process), concurrent."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        options = SimulationOptions(
            output=tmp_path_factory.mktemp("nightly") / "sim",
            days=5,
            history_days=8,
            scenarios={"corrupt": 2, "cripple": 3, "kill": 4, "concurrent": 5},
            epochs=3,
            hidden_dims=(32,),
            latent_dim=16,
            subprocess_scenarios=False,
            extra_config={"nightly": {"deploy": {"url": reload_stub.url, "token_env": TOKEN_ENV}}},
        )
        result = run_simulation(options)
        yield result


def _sim_settings(sim: SimulationResult, **changes: Any) -> NightlySettings:
    return load_settings(sim.config).replace(**changes)


def _row(sim: SimulationResult, scenario: str) -> Any:
    return next(r for r in sim.rows if r.scenario == scenario)


def _write_partition(lake: Path, day: date, frame: Any, name: str = "part-0.parquet") -> Path:
    folder = lake / f"date={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".csv"):
        frame.write_csv(folder / name)
    else:
        frame.write_parquet(folder / name)
    return folder


def _day_frame(
    day: date, n_users: int = 150, n_items: int = 60, per_user: int = 3, seed: int = 0
) -> Any:
    """Synthetic positives of one day: every user rates ``per_user`` items 4.0 or 5.0."""
    import polars as pl

    rng = np.random.default_rng([seed, day.toordinal()])
    users = np.repeat(np.arange(1, n_users + 1), per_user)
    # Users like items near their own id (structure a model can learn).
    items = (users * 7 + rng.integers(0, 12, size=len(users))) % n_items + 1
    start = day_start_epoch(day)
    return pl.DataFrame(
        {
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "rating": rng.choice([4.0, 5.0], size=len(users)),
            "timestamp": start + rng.integers(0, 86_000, size=len(users)),
        }
    )


def _tiny_lake(root: Path, days: int, start: date = date(2024, 3, 1)) -> list[date]:
    dates = [start + timedelta(days=i) for i in range(days)]
    for i, day in enumerate(dates):
        _write_partition(root, day, _day_frame(day, seed=i))
    return dates


def _tiny_config(
    tmp: Path, store: SimulationResult | None, *, registered_model: str, **nightly: Any
) -> Path:
    """A nightly config over a tiny lake in ``tmp``.

    It shares the simulation's MLflow store when ``store`` is given (a new sqlite store costs
    seconds), else it gets its own in ``tmp``.
    """
    if store is not None:
        base = dataclasses.asdict(load_settings(store.config).mlflow)
    else:
        base = {
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "artifact_location": (tmp / "mlartifacts").as_uri(),
        }
    document = {
        "nightly": {
            "lake": str(tmp / "lake"),
            "state_dir": str(tmp / "state"),
            "window_days": 0,
            "split": {
                "eval_user_fraction": 0.25,
                "n_heldout": 60,
                "n_validation": 0,
                "min_eval_users": 5,
            },
            **nightly,
        },
        "mlflow": {
            **{k: v for k, v in base.items() if v is not None},
            "registered_model": registered_model,
            "experiment": registered_model,
        },
        "model": {
            "model": "multvae",
            "hidden_dims": [16],
            "latent_dim": 8,
            "epochs": 2,
            "batch_size": 64,
        },
        "run": {"device": "cpu", "num_threads": 1, "progress": False},
    }
    path = tmp / "nightly.toml"
    path.write_text(to_toml(document))
    return path


# ---------------------------------------------------------------------------------- simulation
def test_simulation_meets_every_expectation(sim: SimulationResult) -> None:
    options = SimulationOptions(
        output=sim.config.parent,
        days=5,
        epochs=3,
        scenarios={"corrupt": 2, "cripple": 3, "kill": 4, "concurrent": 5},
    )
    checks = expectations(sim.rows, options)
    assert len(checks) == 6
    failed = [c["message"] for c in checks if not c["ok"]]
    assert not failed, failed


def test_simulation_champion_advances_on_normal_nights(sim: SimulationResult) -> None:
    first = _row(sim, "normal")
    assert (first.status, first.exit_code, first.champion_version) == ("promoted", 0, "1")
    assert first.champion_ndcg is None  # no champion yet
    # The nights after the bad ones are ordinary nights for the data: the champion advances.
    later = [_row(sim, "kill"), _row(sim, "concurrent")]
    assert [(r.status, r.champion_version) for r in later] == [("promoted", "2"), ("promoted", "3")]
    for row in later:
        assert row.challenger_ndcg is not None and row.champion_ndcg is not None
        assert 0.0 < row.challenger_ndcg <= 1.0
        assert row.challenger_ndcg >= row.champion_ndcg - 0.01


def test_simulation_corrupt_partition_is_rejected_and_champion_unchanged(
    sim: SimulationResult,
) -> None:
    row = _row(sim, "corrupt")
    assert (row.status, row.exit_code, row.champion_version) == ("rejected", 4, "1")
    assert "null value" in row.reason and "does not parse" in row.reason
    assert "repeat an earlier" in row.reason
    summary = json.loads((sim.config.parent / "state/runs" / row.date / "summary.json").read_text())
    failed = {c["check"] for c in summary["checks"] if not c["ok"]}
    assert failed == {"nulls", "unparsable", "duplicates"}
    assert "gate" not in summary and "training" not in summary  # stopped before training


def test_simulation_crippled_challenger_is_not_promoted(sim: SimulationResult) -> None:
    row = _row(sim, "cripple")
    assert (row.status, row.exit_code, row.champion_version) == ("kept", 3, "1")
    assert row.challenger_ndcg < row.champion_ndcg - 0.01
    summary = json.loads((sim.config.parent / "state/runs" / row.date / "summary.json").read_text())
    assert summary["counts"]["train_users"] < 0.05 * summary["counts"]["train_users_before_sample"]
    assert summary["training"]["warm_start"]["used"] is False
    # The kept challenger's bundle stays on disk for inspection.
    assert (sim.config.parent / "state/runs" / row.date / "bundle" / "meta.json").is_file()


def test_simulation_killed_run_resumes_from_its_checkpoint(sim: SimulationResult) -> None:
    row = _row(sim, "kill")
    assert row.status in ("promoted", "kept")
    assert row.resumed_from_epoch == 2  # the crash came after epoch 2 of 3
    summary = json.loads((sim.config.parent / "state/runs" / row.date / "summary.json").read_text())
    assert summary["training"]["epochs_run"] == 3
    assert not (sim.config.parent / "state/runs" / row.date / "checkpoints").exists()
    # The checkpoint's weights replaced the warm start: the summary must not claim it.
    warm = summary["training"]["warm_start"]
    assert warm["used"] is False and "resumed from the checkpoint after epoch 2" in warm["reason"]


def test_simulation_concurrent_runs_cannot_both_proceed(sim: SimulationResult) -> None:
    refused = _row(sim, "2nd run")
    holder = _row(sim, "concurrent")
    assert (refused.status, refused.exit_code) == ("busy", 5)
    assert "another run holds the lock" in refused.reason
    assert holder.status in ("promoted", "kept") and holder.date == refused.date


def test_simulation_timeline_files(sim: SimulationResult) -> None:
    rows = json.loads(sim.timeline_json.read_text())
    assert [r["scenario"] for r in rows] == [
        "normal",
        "corrupt",
        "cripple",
        "kill",
        "2nd run",
        "concurrent",
    ]
    assert sim.plot is not None and sim.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_timeline(sim.rows)
    assert all(r.date in table for r in sim.rows) and "challenger" in table


def test_promotions_notify_the_serving_layer(
    sim: SimulationResult, reload_stub: ReloadStub
) -> None:
    promoted = [r for r in sim.rows if r.status == "promoted"]
    posts = [r for r in reload_stub.requests if r["body"].get("reason") == "promoted"]
    assert len(posts) == len(promoted) >= 3
    assert all(p["path"] == "/v1/admin/reload" and p["auth"] == f"Bearer {TOKEN}" for p in posts)
    assert [p["body"]["version"] for p in posts] == [r.champion_version for r in promoted]
    summary = json.loads((sim.config.parent / "state/last_run.json").read_text())
    assert summary["notify"]["ok"] is True and summary["notify"]["status"] == 200


def test_every_run_is_an_mlflow_run(sim: SimulationResult) -> None:
    import mlflow

    settings = _sim_settings(sim)
    experiment = mlflow.get_experiment_by_name(settings.mlflow.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    by_status = {}
    for run in runs:
        tags = run.data.tags
        by_status.setdefault(tags.get("nightly.status"), []).append(run)
    # One finished run per night, plus the attempt interrupted by the simulated kill.
    assert len(by_status["promoted"]) == 3 and len(by_status["kept"]) == 1
    assert len(by_status["rejected"]) == 1 and len(by_status[None]) == 1
    assert by_status[None][0].info.status == "KILLED"
    run = by_status["kept"][0]
    assert run.data.params["window_end"] == _row(sim, "cripple").date
    assert run.data.metrics["challenger.ndcg_at_100"] < run.data.metrics["champion.ndcg_at_100"]
    assert run.data.metrics["data.positive_pairs"] > 0
    assert "worse" in run.data.tags["nightly.reason"] or "sanity" in run.data.tags["nightly.reason"]
    rejected = by_status["rejected"][0]
    assert int(rejected.data.tags["nightly.checks_failed"]) == 3


def test_recvae_runs_lists_a_nightly_runs_metrics(
    sim: SimulationResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    _tiny_lake(tmp_path / "lake", days=3)
    split = {"eval_user_fraction": 0.3, "n_heldout": 20, "n_validation": 20, "min_eval_users": 5}
    config = _tiny_config(tmp_path, sim, registered_model="recvae-runs", split=split)
    store = load_settings(config).mlflow.tracking_uri
    assert main(["retrain", "--config", str(config), "--date", "2024-03-03"]) == 0
    summary = json.loads((tmp_path / "state/runs/2024-03-03/summary.json").read_text())
    run_id = summary["mlflow"]["run_id"]
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    # The night's own names stay; the validation score of the epoch the challenger keeps (not
    # the curve's last epoch) is a run-level metric too.
    challenger = summary["gate"]["challenger"]
    assert metrics["challenger.ndcg_at_100"] == challenger["ndcg@100"]
    best_epoch = summary["training"]["best_epoch"]
    history = client.get_metric_history(run_id, "train.val_ndcg_at_100")
    (at_best,) = [m.value for m in history if m.step == best_epoch]
    assert metrics["train.best_val_ndcg_at_100"] == at_best
    assert metrics["train.best_epoch"] == best_epoch
    capsys.readouterr()

    assert main(["runs", "--tracking-uri", store, "--experiment", "recvae-runs"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    titles = [title.strip() for title in header.split("  ") if title.strip()]
    assert titles[-5:] == ["val NDCG@100", "R@20", "R@50", "NDCG@100", "± se"]
    cells = row.split()
    assert "retrain-2024-03-03" in cells and "multvae" in cells
    expected = [
        at_best,
        challenger["recall@20"],
        challenger["recall@50"],
        challenger["ndcg@100"],
        challenger["ndcg@100_se"],
    ]
    assert cells[-5:] == [f"{value:.4f}" for value in expected]


# ---------------------------------------------------------------------------------- idempotency
def test_rerun_of_a_completed_date_does_nothing(sim: SimulationResult) -> None:
    import mlflow

    settings = _sim_settings(sim)
    last = sim.rows[-1]
    experiment = mlflow.get_experiment_by_name(settings.mlflow.experiment)
    before = len(mlflow.search_runs([experiment.experiment_id], output_format="list"))
    outcome = run_retrain(settings, date.fromisoformat(last.date))
    assert outcome.already_done and outcome.status == last.status
    assert outcome.exit_code == last.exit_code
    assert "nothing to do" in outcome.reason
    after = len(mlflow.search_runs([experiment.experiment_id], output_format="list"))
    assert after == before


def test_older_date_needs_force(sim: SimulationResult, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _sim_settings(sim)
    backlog = (date.fromisoformat(sim.rows[0].date) - timedelta(days=1)).isoformat()  # never run
    with pytest.raises(UsageError, match="older than the last completed run"):
        run_retrain(settings, date.fromisoformat(backlog))
    code = main(["retrain", "--config", str(sim.config), "--date", backlog])
    assert code == ExitCode.USAGE
    assert "pass --force" in capsys.readouterr().err


def test_cli_rerun_of_completed_date_returns_its_recorded_exit_code(
    sim: SimulationResult, capsys: pytest.CaptureFixture[str]
) -> None:
    row = _row(sim, "cripple")  # kept: exit 3 again, although a later night completed
    state = StateDir(load_settings(sim.config).state_dir)
    assert state.summary(date.fromisoformat(row.date))["status"] == "kept"
    code = main(["retrain", "--config", str(sim.config), "--date", row.date])
    assert code == ExitCode.KEPT == 3
    assert "already done" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- exit codes
@pytest.fixture(scope="module")
def tiny_job(sim: SimulationResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic lake with its own registered model, sharing the simulation's store."""
    tmp = tmp_path_factory.mktemp("tiny")
    _tiny_lake(tmp / "lake", days=5)
    return _tiny_config(tmp, sim, registered_model="recvae-tiny")


def test_cli_exit_codes(tiny_job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tiny_job.parent / "lake"
    # 4: a corrupted partition (null item ids) is rejected with a message naming the problem.
    bad_day = date(2024, 3, 6)
    frame = _day_frame(bad_day, seed=9)
    import polars as pl

    frame = frame.with_columns(
        pl.when(pl.arange(0, frame.height) % 4 == 0)
        .then(None)
        .otherwise(pl.col("item_id"))
        .alias("item_id")
    )
    _write_partition(lake, bad_day, frame)
    code = main(["retrain", "--config", str(tiny_job), "--date", "2024-03-06"])
    err = capsys.readouterr().err
    assert code == ExitCode.REJECTED == 4
    assert "date=2024-03-06" in err and "null value" in err and "item_id 113" in err

    # 4: no partition at all for the date.
    code = main(["retrain", "--config", str(tiny_job), "--date", "2024-03-20"])
    assert code == 4 and "no usable partition date=2024-03-20" in capsys.readouterr().err

    # 5: another run holds the lock.
    settings = load_settings(tiny_job)
    with RunLock(StateDir(settings.state_dir).lock_path, purpose="test holder"):
        code = main(["retrain", "--config", str(tiny_job), "--date", "2024-03-05"])
    err = capsys.readouterr().err
    assert code == ExitCode.BUSY == 5
    assert f"pid {os.getpid()}" in err and "test holder" in err

    # 0: the first champion (and --summary writes the scheduler's copy).
    summary_file = tiny_job.parent / "scheduler-summary.json"
    code = main(
        [
            "retrain",
            "--config",
            str(tiny_job),
            "--date",
            "2024-03-05",
            "--summary",
            str(summary_file),
        ]
    )
    assert code == ExitCode.PROMOTED == 0, capsys.readouterr().err
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "promoted" and summary["exit_code"] == 0
    assert summary["registry"]["new_version"] == "1"
    assert summary["window"]["new_partitions"] == [f"2024-03-0{i}" for i in range(1, 6)]

    # 2: configuration errors name the key.
    bad = tiny_job.parent / "bad.toml"
    bad.write_text(
        tiny_job.read_text().replace("[nightly.split]", "[nightly.split]\nn_helduot = 3")
    )
    assert main(["retrain", "--config", str(bad)]) == 2
    assert "n_helduot" in capsys.readouterr().err
    assert main(["retrain", "--date", "2024-03-05"]) == 2
    assert "--config is required" in capsys.readouterr().err
    # ... and so do a missing lake and a summary path that cannot be written, before the night
    # runs (no new run folder).
    runs_before = sorted((settings.state_dir / "runs").iterdir())
    missing = tiny_job.parent / "no-such-lake"
    assert main(["retrain", "--config", str(tiny_job), "--lake", str(missing)]) == 2
    assert f"the data lake {missing} is not a folder" in capsys.readouterr().err
    for target, message in (
        (summary_file / "s.json", f"{summary_file} is not a folder"),
        (tiny_job.parent, "is a folder; give a file path"),
    ):
        argv = ["retrain", "--config", str(tiny_job), "--date", "2024-03-06"]
        assert main([*argv, "--summary", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert sorted((settings.state_dir / "runs").iterdir()) == runs_before


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine without CUDA to fail"
)
def test_cli_failure_exit_code_and_failed_mlflow_run(
    sim: SimulationResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    _tiny_lake(tmp_path / "lake", days=3)
    config = _tiny_config(tmp_path, sim, registered_model="recvae-fail")
    config.write_text(config.read_text().replace('device = "cpu"', 'device = "cuda"'))
    code = main(["retrain", "--config", str(config), "--date", "2024-03-03"])
    err = capsys.readouterr().err
    assert code == ExitCode.FAILED == 1
    assert "training failed" in err and "CUDA is not available" in err
    summary = json.loads((tmp_path / "state/runs/2024-03-03/summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    run = mlflow.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["nightly.status"] == "failed"


def test_force_reruns_a_completed_date(tiny_job: Path) -> None:
    settings = load_settings(tiny_job)
    day = date(2024, 3, 5)
    if StateDir(settings.state_dir).summary(day) is None:  # when run on its own
        run_retrain(settings, day)
    first = StateDir(settings.state_dir).summary(day)
    assert first is not None and first["status"] in ("promoted", "kept")
    # The rerun also drops the training users the champion finds most anomalous.
    excluding = settings.replace(training=TrainingSettings(exclude_anomalies_above_percentile=90.0))
    outcome = run_retrain(excluding, day, force=True)
    assert not outcome.already_done and outcome.status in ("promoted", "kept")
    assert outcome.summary["mlflow"]["run_id"] != first["mlflow"]["run_id"]
    anomalies = outcome.summary["anomalies"]
    counts = outcome.summary["counts"]
    assert anomalies["applied"] and anomalies["reference"] == "training"
    assert 0 < anomalies["excluded_users"] < 0.3 * counts["train_users"]
    assert counts["train_users_after_anomaly_exclusion"] == (
        counts["train_users"] - anomalies["excluded_users"]
    )
    archived = list((settings.state_dir / "runs/2024-03-05").glob("summary.*.json"))
    assert len(archived) == 1


# ---------------------------------------------------------------------------------- rollback
def test_rollback_moves_the_alias_back_and_notifies(
    sim: SimulationResult, reload_stub: ReloadStub, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.nightly.registry import current_champion

    settings = _sim_settings(sim)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        before = current_champion(settings.mlflow)
        assert before is not None and before.version == sim.rows[-1].champion_version == "3"
        previous = before.tags["nightly_previous_champion"]
        assert previous == "2"
        code = main(["rollback", "--config", str(sim.config)])
        assert code == 0
        assert "version 3 -> 2" in capsys.readouterr().out
        assert current_champion(settings.mlflow).version == "2"
        assert reload_stub.requests[-1]["body"] == {
            "model_uri": "models:/recvae-sim@champion",
            "version": "2",
            "reason": "rollback",
        }
        # Again: follows the chain of previous champions; then an explicit version.
        assert run_rollback(settings)["to_version"] == "1"
        assert main(["retrain", "rollback", "--config", str(sim.config), "--to", "3"]) == 0
        assert current_champion(settings.mlflow).version == "3"
    log = [json.loads(line) for line in settings.state_dir.joinpath("rollbacks.jsonl").open()]
    assert [(r["from_version"], r["to_version"]) for r in log] == [
        ("3", "2"),
        ("2", "1"),
        ("1", "3"),
    ]


def test_rollback_errors(sim: SimulationResult, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _sim_settings(sim)
    current = run_rollback(settings, to_version="1")["from_version"]
    try:
        with pytest.raises(ValueError, match="already points at version 1"):
            run_rollback(settings, to_version="1")
        with pytest.raises(ValueError, match="cannot roll back to recvae-sim version 99"):
            run_rollback(settings, to_version="99")
        # Version 1 was the first champion: nothing before it.
        with pytest.raises(ValueError, match="version 1, which records no previous champion"):
            run_rollback(settings)
    finally:
        run_rollback(settings, to_version=current)
    with RunLock(StateDir(settings.state_dir).lock_path):
        assert main(["rollback", "--config", str(sim.config)]) == ExitCode.BUSY
    assert "another run holds the lock" in capsys.readouterr().err


def _promoting_nights(
    tmp_path: Path, sim: SimulationResult, model: str, *, nights: int
) -> tuple[Path, Any]:
    """``(config, settings)`` of a tiny lake after ``nights`` promoted nights of ``model``
    (versions 1..nights, the last the champion)."""
    days = _tiny_lake(tmp_path / "lake", days=nights + 2)
    config = _tiny_config(tmp_path, sim, registered_model=model)
    settings = _always_promote(config)
    for day in days[2:]:
        assert run_retrain(settings, day).status == "promoted"
    return config, settings


def test_a_rollback_whose_tagging_fails_after_the_alias_moved_is_done_and_recorded(
    sim: SimulationResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The registry went away between moving the alias and tagging the old version: the
    # rollback happened, so it is recorded and notified, not reported as failed (a retry of a
    # "failed" rollback went back one version further).
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.nightly.registry import current_champion

    config, settings = _promoting_nights(tmp_path, sim, "recvae-rollback-tag", nights=3)
    assert current_champion(settings.mlflow).version == "3"

    def gone(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("API request to http://mlflow/... failed: Connection refused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "set_model_version_tag", gone)
        assert main(["rollback", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "version 3 -> 2" in out
    assert "version 3 not tagged nightly_rolled_back_at: MlflowException: API request" in err
    assert current_champion(settings.mlflow).version == "2"
    (line,) = (settings.state_dir / "rollbacks.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["from_version"], record["to_version"]) == ("3", "2")
    assert record["tag_error"].startswith("MlflowException: API request")


def test_a_registry_failure_during_a_rollback_is_a_one_line_error_and_nothing_is_recorded(
    sim: SimulationResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The registry failing inside the rollback (a server error, or a server gone after the
    # reachability check) was a traceback.
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.nightly.registry import current_champion

    config, settings = _promoting_nights(tmp_path, sim, "recvae-rollback-fails", nights=2)

    def fails(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("API request to http://mlflow/... failed: 503 Service Unavailable")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MlflowClient, "set_registered_model_alias", fails)
        capsys.readouterr()  # the nights' output
        assert main(["rollback", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("recvae: error: the MLflow registry failed during the rollback")
    assert "503 Service Unavailable" in err and "Traceback" not in err
    assert current_champion(settings.mlflow).version == "2"
    assert not (settings.state_dir / "rollbacks.jsonl").exists()
    assert main(["rollback", "--config", str(config)]) == 0  # the registry is back
    assert current_champion(settings.mlflow).version == "1"


# ---------------------------------------------------------------------------------- validation
def _check_partition(
    tmp_path: Path, frame: Any, *, name: str = "part-0.parquet", **limits: Any
) -> list[CheckResult]:
    lake = tmp_path / "lake"
    day = date(2024, 5, 10)
    for i in range(4):  # history for the volume check
        _write_partition(lake, day - timedelta(days=4 - i), _day_frame(day - timedelta(days=4 - i)))
    _write_partition(lake, day, frame, name=name)
    lake_settings = LakeSettings()
    every = list_partitions(lake, lake_settings)
    new = [p for p in every if p.day == day]
    return validate_partitions(new, every, lake_settings, ValidationSettings(**limits))


def _corrupt(column: str, value: Any, every: int = 5) -> Any:
    import polars as pl

    frame = _day_frame(date(2024, 5, 10)).with_columns(pl.col(column).cast(pl.String))
    return frame.with_columns(
        pl.when(pl.arange(0, frame.height) % every == 0)
        .then(pl.lit(value, dtype=pl.String))
        .otherwise(pl.col(column))
        .alias(column)
    )


@pytest.mark.parametrize(
    ("make", "check", "expected"),
    [
        (lambda: _corrupt("user_id", None), "nulls", "have a null value [user_id 90]"),
        (lambda: _corrupt("item_id", "sku-7"), "unparsable", "does not parse [item_id 90]"),
        (lambda: _corrupt("timestamp", "yesterday"), "unparsable", "[timestamp 90]"),
        (lambda: _corrupt("rating", "five"), "unparsable", "[rating 90]"),
        (lambda: _corrupt("timestamp", "2019-01-01T00:00:00"), "timestamps", "outside"),
        (
            lambda: __import__("polars").concat([_day_frame(date(2024, 5, 10))] * 2),
            "duplicates",
            "450 of 900 rows (50.00%) repeat an earlier",
        ),
        (
            lambda: _day_frame(date(2024, 5, 9)),  # yesterday's file delivered again
            "repeats",
            "450 of 450 rows (100.00%) repeat a (user, item, timestamp) row of an earlier "
            "partition (date=2024-05-06, date=2024-05-07, date=2024-05-08, date=2024-05-09)",
        ),
        (lambda: _day_frame(date(2024, 5, 10)).head(40), "volume", "volume drop"),
        (
            lambda: _day_frame(date(2024, 5, 10), per_user=12),
            "volume",
            "1800 rows vs median 450",
        ),
        (lambda: _day_frame(date(2024, 5, 10)).head(0), "rows", "empty partition"),
        (
            lambda: _day_frame(date(2024, 5, 10)).drop("rating"),
            "schema",
            "missing column(s) rating",
        ),
    ],
    ids=[
        "null-ids",
        "bad-item-ids",
        "bad-timestamps",
        "bad-ratings",
        "out-of-range",
        "duplicates",
        "yesterday-again",
        "volume-drop",
        "volume-spike",
        "empty",
        "missing-column",
    ],
)
def test_validation_failures_have_clear_messages(
    tmp_path: Path, make: Any, check: str, expected: str
) -> None:
    results = _check_partition(tmp_path, make(), name="part-0.csv")
    failed = failed_checks(results)
    assert [r.check for r in failed] == [check], [r.message for r in failed]
    assert "partition date=2024-05-10" in failed[0].message
    assert expected in failed[0].message


def test_validation_passes_clean_data_and_skips_volume_without_history(tmp_path: Path) -> None:
    results = _check_partition(tmp_path, _day_frame(date(2024, 5, 10)))
    assert not failed_checks(results)
    assert {r.check for r in results} == {
        "files",
        "schema",
        "rows",
        "nulls",
        "unparsable",
        "duplicates",
        "repeats",
        "timestamps",
        "volume",
    }
    lake = LakeSettings()
    every = list_partitions(tmp_path / "lake", lake)
    first = validate_partitions(every[:1], every, lake, ValidationSettings())
    volume = next(r for r in first if r.check == "volume")
    assert volume.ok and volume.skipped and "skipped" in volume.message


def test_a_broken_file_in_an_earlier_partition_fails_the_volume_check_by_name(
    tmp_path: Path,
) -> None:
    lake = tmp_path / "lake"
    _tiny_lake(lake, days=4)
    (lake / "date=2024-03-02" / "part-late.parquet").write_bytes(b"PAR1 truncated")
    _write_partition(lake, date(2024, 3, 5), _day_frame(date(2024, 3, 5), seed=4))
    every = list_partitions(lake, LakeSettings())
    results = validate_partitions(every[-1:], every, LakeSettings(), ValidationSettings())
    failed = failed_checks(results)
    assert [r.check for r in failed] == ["volume"]
    assert "cannot count the rows of the earlier partition date=2024-03-02" in failed[0].message


def test_partition_without_data_files_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "lake" / "date=2024-05-10"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").touch()
    every = list_partitions(tmp_path / "lake", LakeSettings())
    results = validate_partitions(every, every, LakeSettings(), ValidationSettings())
    assert [(r.check, r.ok) for r in results] == [("files", False)]
    assert "holds no data files" in results[0].message


def test_quarantine_and_success_markers(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    days = _tiny_lake(lake, days=3)
    (lake / f"date={days[1].isoformat()}" / QUARANTINE_MARKER).touch()
    (lake / "notes").mkdir()
    assert [p.day for p in list_partitions(lake, LakeSettings())] == [days[0], days[2]]
    (lake / f"date={days[0].isoformat()}" / SUCCESS_MARKER).touch()
    strict = LakeSettings(require_success_marker=True)
    assert [p.day for p in list_partitions(lake, strict)] == [days[0]]
    assert [
        p.day for p in window_partitions(list_partitions(lake, LakeSettings()), days[2], 1)
    ] == [days[2]]


def test_lake_parses_string_ids_iso_and_millisecond_timestamps(tmp_path: Path) -> None:
    import polars as pl

    file = tmp_path / "x.csv"
    pl.DataFrame(
        {
            "uid": ["u1", " u2 ", ""],
            "sku": ["a", "b", "c"],
            "when": ["2024-01-01T10:00:00", "2024-01-01T11:00:00", "2024-01-01T12:00:00"],
        }
    ).write_csv(file)
    lake = LakeSettings(
        user_col="uid",
        item_col="sku",
        timestamp_col="when",
        rating_col=None,
        user_id_type="str",
        item_id_type="str",
    )
    out = canonical_frame(file, lake).collect()
    assert out["user_id"].to_list() == ["u1", "u2", None]  # blank is not an id
    assert out["timestamp"][0] == day_start_epoch(date(2024, 1, 1)) + 36_000
    ms = tmp_path / "y.parquet"
    pl.DataFrame(
        {"user_id": [1], "item_id": [2.0], "rating": [4], "timestamp": [1_700_000_000_123]}
    ).write_parquet(ms)
    out = canonical_frame(ms, LakeSettings(timestamp_unit="ms")).collect()
    assert out.row(0) == (1, 2, 1_700_000_000, 4.0)


# ---------------------------------------------------------------------------------- the data
def test_nightly_split_never_trains_on_evaluation_users(tmp_path: Path) -> None:
    from pipelines.nightly.dataset import build_nightly_data, is_eval_user

    lake = tmp_path / "lake"
    days = _tiny_lake(lake, days=6)
    settings = settings_from_dict(
        {
            "nightly": {
                "lake": str(lake),
                "state_dir": str(tmp_path / "s"),
                "recent_days": 2,
                "split": {
                    "eval_user_fraction": 0.3,
                    "n_heldout": 20,
                    "n_validation": 10,
                    "min_eval_users": 5,
                },
            }
        }
    )
    partitions = list_partitions(lake, settings.lake_format)
    data = build_nightly_data(partitions, days[-1], settings)
    train_users = set(data.train.user_ids.tolist())
    test_users = set(data.test.fold_in.user_ids.tolist())
    assert data.validation is not None
    validation_users = set(data.validation.fold_in.user_ids.tolist())
    assert len(test_users) == 20 and len(validation_users) == 10
    assert not train_users & test_users and not train_users & validation_users
    assert not test_users & validation_users
    frac = settings.split.eval_user_fraction
    assert all(is_eval_user(u, salt="recvae-nightly", fraction=frac) for u in test_users)
    assert not any(is_eval_user(u, salt="recvae-nightly", fraction=frac) for u in train_users)
    # The vocabulary is that of the training users; test targets only use it.
    assert data.test.fold_in.n_items == data.train.n_items
    assert (data.train.item_counts() > 0).all()
    # Seeded by the date: same date, same split; another date on the same data, another draw.
    again = build_nightly_data(partitions, days[-1], settings)
    assert again.test.fold_in.user_ids.tolist() == data.test.fold_in.user_ids.tolist()
    assert (again.test.targets.matrix != data.test.targets.matrix).nnz == 0
    other = build_nightly_data(partitions, days[-1] + timedelta(days=1), settings)
    assert other.test.fold_in.user_ids.tolist() != data.test.fold_in.user_ids.tolist()
    # Users the champion trained on are never test users.
    excluded = build_nightly_data(
        partitions, days[-1], settings, exclude_test_users=set(list(test_users)[:5])
    )
    assert not set(excluded.test.fold_in.user_ids.tolist()) & set(list(test_users)[:5])


# ---------------------------------------------------------------------------------- warm start
def test_warm_start_copies_shared_items_and_training_uses_it_only_fresh(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    import scipy.sparse as sp
    import torch

    from pipelines.nightly.warm_start import warm_start_state
    from recvae.config import RunOptions
    from recvae.data import Interactions
    from recvae.recommender import Recommender
    from recvae.training import train

    champion = Recommender.load(tiny_bundle)
    old_ids = champion.item_ids
    new_ids = np.concatenate([old_ids[5:][::-1], np.asarray([9001, 9002])])  # reordered + new
    warm = warm_start_state(champion, champion.config, new_ids)
    assert warm.state is not None and (warm.shared_items, warm.new_items) == (len(old_ids) - 5, 2)
    old = champion.model.state_dict()
    for j, item in enumerate(new_ids[:-2].tolist()):
        i = int(np.flatnonzero(old_ids == item)[0])
        assert torch.equal(warm.state["encoder.0.weight"][:, j], old["encoder.0.weight"][:, i])
        assert torch.equal(warm.state["decoder.1.weight"][j], old["decoder.1.weight"][i])
        assert torch.equal(warm.state["decoder.1.bias"][j], old["decoder.1.bias"][i])
    assert torch.equal(warm.state["encoder.1.weight"], old["encoder.1.weight"])

    rng = np.random.default_rng(0)
    matrix = (rng.random((40, len(new_ids))) < 0.3).astype(np.float32)
    data = Interactions(sp.csr_array(matrix), np.arange(40), new_ids)
    config = champion.config.replace(epochs=1, learning_rate=1e-12, dropout=0.0)
    options = RunOptions(device="cpu", progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    fresh = train(data, config, options=options, initial_state=warm.state)
    for key, value in warm.state.items():
        assert torch.allclose(fresh.model.state_dict()[key], value, atol=1e-6), key
    # A resumed run ignores the initial state: the checkpoint wins.
    other = {k: torch.zeros_like(v) for k, v in warm.state.items()}
    resumed = train(data, config, options=options, initial_state=other)
    assert torch.equal(
        resumed.model.state_dict()["encoder.0.weight"], fresh.model.state_dict()["encoder.0.weight"]
    )

    different = champion.config.replace(latent_dim=4)
    skipped = warm_start_state(champion, different, new_ids)
    assert skipped.state is None and "architecture changed" in skipped.reason


def test_exclude_anomalous_users_drops_histories_the_champion_finds_unusual(
    tiny_bundle: Path,
) -> None:
    import scipy.sparse as sp

    from pipelines.nightly.dataset import exclude_anomalous_users
    from recvae.data import Interactions
    from recvae.recommender import Recommender

    champion = Recommender.load(tiny_bundle)  # trained on the checkerboard: parity classes
    normal = champion.train_matrix.toarray()
    n_items = champion.n_items
    mixed = np.zeros((3, n_items), dtype=np.float32)
    mixed[:, : n_items // 2] = 1.0  # both parities at once: unlike any training user
    matrix = np.vstack([normal, mixed])
    ids = np.concatenate([champion.item_ids[::-1], np.asarray([999_999])])  # reordered + new
    matrix = np.hstack([matrix[:, ::-1], np.ones((len(matrix), 1), dtype=np.float32)])
    train = Interactions(sp.csr_array(matrix), np.arange(len(matrix)), ids)
    kept, info = exclude_anomalous_users(train, champion, 95.0)
    dropped = set(range(len(matrix))) - set(kept.user_ids.tolist())
    assert {len(normal), len(normal) + 1, len(normal) + 2} <= dropped  # the mixed users
    assert len(dropped) - 3 <= int(0.05 * len(normal)) + 1  # about 5% of ordinary users
    assert info["excluded_users"] == len(dropped) and info["scored_users"] == len(matrix)
    assert kept.n_items == train.n_items  # the vocabulary does not change


# ---------------------------------------------------------------------------------- the gate
def test_vocabulary_adapter_maps_items_by_id(tiny_bundle: Path) -> None:
    import scipy.sparse as sp
    import torch

    from pipelines.nightly.gate import VocabularyAdapter
    from recvae.recommender import Recommender

    champion = Recommender.load(tiny_bundle)
    ids = champion.item_ids
    today = np.concatenate([np.asarray([777]), ids[::-1][:-3]])  # a new item, reordered, 3 gone
    adapter = VocabularyAdapter(champion, today)
    assert adapter.n_items == len(today) and adapter.n_known == len(today) - 1
    rows = sp.csr_array(np.eye(2, len(today), k=1, dtype=np.float32))  # history: one known item
    scores = adapter.score(rows)
    assert torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    direct = champion.score(
        sp.csr_array(
            (
                np.ones(2),
                (
                    [0, 1],
                    [
                        int(np.flatnonzero(ids == today[1])[0]),
                        int(np.flatnonzero(ids == today[2])[0]),
                    ],
                ),
            ),
            shape=(2, champion.n_items),
            dtype=np.float32,
        )
    )
    for j in range(1, len(today)):
        i = int(np.flatnonzero(ids == today[j])[0])
        assert torch.allclose(scores[:, j], direct[:, i])


def _result(ndcg: list[float], coverage: float) -> Any:
    from recvae.evaluation import EvaluationResult

    values = np.asarray(ndcg, dtype=np.float64)
    return EvaluationResult(
        per_user={"ndcg@100": values},
        aggregate={"coverage@100": coverage},
        n_users=len(values),
        user_has_targets=np.ones(len(values), dtype=bool),
    )


@pytest.mark.parametrize(
    ("challenger", "champion", "finite", "promote", "reason"),
    [
        (([0.30, 0.32], 0.2), ([0.30, 0.31], 0.2), True, True, "within tolerance"),
        (([0.30, 0.30], 0.2), ([0.303, 0.303], 0.2), True, True, "within tolerance"),
        (([0.20, 0.22], 0.2), ([0.30, 0.31], 0.2), True, False, "challenger is worse"),
        # The reason says by how much (it said only "coverage").
        (
            ([0.40, 0.40], 0.05),
            ([0.30, 0.31], 0.2),
            True,
            False,
            "coverage (challenger coverage@100 0.0500 (floor 0.0000, 0.5 x champion's 0.2000))",
        ),
        (([0.40, 0.40], 0.2), ([0.30, 0.31], 0.2), False, False, "finite_scores"),
        (([0.10, 0.10], 0.2), None, True, True, "no champion yet"),
        (([0.10, 0.10], 0.2), None, False, False, "no champion yet, but sanity"),
    ],
)
def test_gate_rule(
    challenger: Any, champion: Any, finite: bool, promote: bool, reason: str
) -> None:
    from pipelines.nightly.gate import decide
    from pipelines.nightly.settings import GateSettings

    decision = decide(
        GateSettings(tolerance=0.005, min_coverage_ratio=0.5),
        _result(*challenger),
        None if champion is None else _result(*champion),
        challenger_finite=finite,
    )
    assert decision.promote is promote and reason in decision.reason
    if champion is not None:
        expected = np.mean(challenger[0]) - np.mean(champion[0])
        assert decision.delta == pytest.approx(expected)


# ---------------------------------------------------------------------------------- notify
def test_notify_reports_failures_without_raising(
    reload_stub: ReloadStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.nightly.notify import notify_reload

    assert notify_reload(DeploySettings(), {})["ok"] is None
    deploy = DeploySettings(url=reload_stub.url, token_env=TOKEN_ENV, timeout_s=2)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    missing = notify_reload(deploy, {"version": "1"})
    assert missing["ok"] is False and TOKEN_ENV in missing["error"]
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    denied = notify_reload(deploy, {"version": "1"})
    assert (denied["ok"], denied["status"]) == (False, 401) and "bad token" in denied["error"]
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert notify_reload(deploy, {"version": "1"})["ok"] is True
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = notify_reload(DeploySettings(url=f"http://127.0.0.1:{port}", token_env=TOKEN_ENV), {})
    assert down["ok"] is False and "cannot reach" in down["error"]


# ---------------------------------------------------------------------------------- the lock
def test_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "retrain.lock"
    with RunLock(path, purpose="first"):
        with pytest.raises(LockBusyError, match=rf"pid {os.getpid()} .*\(first\)"):
            RunLock(path).acquire()
    with RunLock(path) as again:  # released on exit
        assert again.held and again.stale is None


def test_lock_left_by_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "retrain.lock"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    path.write_text(
        json.dumps(
            {
                "pid": pid,
                "host": os.uname().nodename,
                "started_at": time.time() - 7200,
                "purpose": "crashed",
            }
        )
    )
    with RunLock(path) as lock:
        assert lock.stale is not None and lock.stale.pid == pid
        assert LockInfo.read(path).pid == os.getpid()
    assert path.read_text() == ""  # a clean release leaves no holder behind


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    path = tmp_path / "retrain.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pipelines.nightly.lock import RunLock\n"
            f"lock = RunLock(__import__('pathlib').Path({str(path)!r}), purpose='victim')\n"
            "lock.acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockBusyError, match=rf"pid {holder.pid} .*victim"):
            RunLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(path) as lock:  # kill -9 never leaves the job stuck
        assert lock.stale is not None and lock.stale.pid == holder.pid


def test_lock_reports_a_probably_hung_holder(tmp_path: Path) -> None:
    path = tmp_path / "retrain.lock"
    with RunLock(path):
        info = json.loads(path.read_text())
        path.write_text(json.dumps({**info, "started_at": time.time() - 30 * 3600}))
        with pytest.raises(LockBusyError, match="probably hung"):
            RunLock(path, max_age_hours=12).acquire()


# ---------------------------------------------------------------------------------- settings
def test_shipped_config_parses() -> None:
    settings = load_settings(ROOT / "pipelines/configs/nightly.toml")
    assert settings.gate.tolerance == 0.005 and settings.mlflow.alias == "champion"
    assert settings.model_config().model == "multvae"
    assert settings.training.exclude_anomalies_above_percentile is None  # off by default
    on = settings_from_dict(
        {"nightly": {"lake": "x", "training": {"exclude_anomalies_above_percentile": 99.5}}}
    )
    assert on.training.exclude_anomalies_above_percentile == 99.5


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"nightly": {"lake": "x", "windw_days": 3}}, "unknown key(s) in [nightly]: windw_days"),
        ({"nightly": {"lake": "x", "gate": {"tolerence": 0.1}}}, "[nightly.gate]: tolerence"),
        ({"nightly": {"lake": "x", "gate": {"tolerance": -1}}}, "[nightly.gate] tolerance"),
        ({"nightly": {}}, "[nightly] lake is required"),
        ({"nightly": {"lake": "x"}, "extra": {}}, "unknown section(s) in nightly config: extra"),
        ({"nightly": {"lake": "x", "columns": {"user_id_type": "uuid"}}}, "user_id_type"),
        ({"nightly": {"lake": "x", "deploy": {"url": "ftp://x"}}}, "[nightly.deploy] url"),
        ({"nightly": {"lake": "x"}, "model": {"epochs": 0}}, "epochs"),
        ({"nightly": {"lake": "x"}, "run": {"devices": "cpu"}}, "unknown key(s) in [run]: devices"),
        (
            {"nightly": {"lake": "x", "training": {"exclude_anomalies_above_percentile": 120}}},
            "must be in (0, 100)",
        ),
        ({"nightly": 3}, "[nightly] must be a table"),
        (
            {"nightly": {"lake": "x", "split": {"eval_salt": " "}}},
            "[nightly.split] eval_salt: must be a non-empty string",
        ),
        ({"nightly": {"lake": "x"}, "mlflow": 3}, "[mlflow] must be a table"),
        ({"nightly": {"lake": "x", "columns": 3}}, "[nightly.columns] must be a table"),
        ({"nightly": {"lake": 3}}, "[nightly] lake: must be a path, got 3"),
        ({"nightly": {"lake": "x", "state_dir": 7}}, "[nightly] state_dir: must be a path"),
        ({"nightly": {"lake": "x"}, "mlflow": {"tracking_uri": 3}}, "[mlflow] tracking_uri"),
        (
            {"nightly": {"lake": "x", "columns": {"timestamp_unit": ["s"]}}},
            "[nightly.columns] timestamp_unit: must be one of s, ms, us, ns",
        ),
    ],
)
def test_bad_settings_name_the_key(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        settings_from_dict(document)
    assert message in str(info.value)


# ------------------------------------------------------------------------- slow: real processes
@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes(tmp_path: Path) -> None:
    _tiny_lake(tmp_path / "lake", days=4)
    config = _tiny_config(tmp_path, None, registered_model="recvae-kill")
    config.write_text(
        config.read_text().replace("epochs = 2", "epochs = 30").replace("[16]", "[256]")
    )
    checkpoint = tmp_path / "state/runs/2024-03-04/checkpoints/checkpoint.pt"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "retrain",
            "--config",
            str(config),
            "--date",
            "2024-03-04",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = StateDir(tmp_path / "state")
    assert state.summary(date(2024, 3, 4)) is None  # died before writing anything final
    outcome = run_retrain(load_settings(config), date(2024, 3, 4))
    assert outcome.status == "promoted"
    resumed = outcome.summary["training"]["resumed_from_epoch"]
    assert 0 < resumed < 30
    assert outcome.summary["mlflow"]["resumed_run"] is True  # the killed run's MLflow run goes on


@pytest.mark.slow
def test_simulation_command_with_real_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "retrain",
            "simulate",
            "--days",
            "6",
            "--history-days",
            "8",
            "--epochs",
            "4",
            "--output",
            str(tmp_path / "sim"),
            "--no-plot",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "sim/timeline.json").read_text())
    kill = next(r for r in rows if r["scenario"] == "kill")
    assert kill["note"].startswith("killed pid") and 0 < kill["resumed_from_epoch"] < 4
    assert "[FAIL]" not in out and "2nd run" in out and "busy" in out


def test_simulation_with_bad_options_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    argv = ["retrain", "simulate", "--tolerance", "-5", "--output", str(out), "--no-plot"]
    assert main(argv) == 2
    assert "tolerance" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------- recovery
def _always_promote(config: Path) -> NightlySettings:
    """The tiny job's settings with a gate every challenger passes."""
    from pipelines.nightly.settings import GateSettings

    return load_settings(config).replace(gate=GateSettings(tolerance=0.99, min_coverage_ratio=0.0))


def test_an_interrupted_promotion_is_finished_without_losing_the_rollback_chain(
    sim: SimulationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    import recvae.tracking
    from pipelines.nightly import notify
    from pipelines.nightly.registry import current_champion

    days = _tiny_lake(tmp_path / "lake", days=4)
    settings = _always_promote(_tiny_config(tmp_path, sim, registered_model="recvae-interrupt"))
    assert run_retrain(settings, days[2]).summary["registry"]["new_version"] == "1"

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    # 1. Interrupted after registering the version, before the alias moved.
    with monkeypatch.context() as mp:
        mp.setattr(recvae.tracking, "set_alias", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_retrain(settings, days[3])
    assert current_champion(settings.mlflow).version == "1"
    # 2. Interrupted after the alias moved, before the night was recorded as done.
    with monkeypatch.context() as mp:
        mp.setattr(notify, "notify_reload", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_retrain(settings, days[3])
    assert current_champion(settings.mlflow).version == "2"
    # 3. The rerun compares with version 1 (not with itself) and finishes the night.
    outcome = run_retrain(settings, days[3])
    registry = outcome.summary["registry"]
    assert outcome.status == "promoted", outcome.reason
    assert registry["champion_version"] == "1" and registry["new_version"] == "2"
    assert registry["interrupted_promotion"] == "2"
    versions = mlflow.MlflowClient().search_model_versions("name = 'recvae-interrupt'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]  # registered once
    tags = current_champion(settings.mlflow).tags
    assert tags["nightly_previous_champion"] == "1" and tags["nightly_date"] == "2024-03-04"
    assert run_rollback(settings)["to_version"] == "1"
    # Every split and gate setting is a param of the run.
    params = mlflow.get_run(outcome.summary["mlflow"]["run_id"]).data.params
    assert params["split.eval_salt"] == "recvae-nightly" and params["gate.tolerance"] == "0.99"
    assert {"split.seed", "gate.min_ndcg", "gate.min_coverage_ratio"} <= set(params)


def test_an_mlflow_store_failing_at_the_end_still_leaves_the_nights_record(
    sim: SimulationResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    days = _tiny_lake(tmp_path / "lake", days=3)
    settings = _always_promote(_tiny_config(tmp_path, sim, registered_model="recvae-storefail"))

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("(sqlite3.OperationalError) unable to open database file\n[SQL: ...]")

    monkeypatch.setattr(MlflowClient, "set_terminated", unavailable)
    scheduler_copy = tmp_path / "last.json"
    outcome = run_retrain(settings, days[-1], summary_path=scheduler_copy)
    assert outcome.status == "promoted"  # the alias moved before the store failed
    assert outcome.summary["mlflow_error"].startswith("MlflowException: (sqlite3.Operational")
    assert "[SQL" not in outcome.summary["mlflow_error"]
    for path in (
        scheduler_copy,
        settings.state_dir / "last_run.json",
        settings.state_dir / "runs/2024-03-03/summary.json",
    ):
        assert json.loads(path.read_text())["status"] == "promoted"
    assert "Traceback" not in caplog.text


def test_a_late_file_in_a_validated_partition_is_validated_again(
    sim: SimulationResult, tmp_path: Path
) -> None:
    import polars as pl

    days = _tiny_lake(tmp_path / "lake", days=4)
    settings = _always_promote(_tiny_config(tmp_path, sim, registered_model="recvae-late"))
    assert run_retrain(settings, days[2]).status == "promoted"
    late = _day_frame(days[0], seed=7).with_columns(pl.lit(None, dtype=pl.Int64).alias("item_id"))
    _write_partition(tmp_path / "lake", days[0], late, name="part-late.parquet")
    outcome = run_retrain(settings, days[3])
    assert outcome.status == "rejected" and outcome.exit_code == 4
    assert outcome.summary["window"]["changed_partitions"] == ["2024-03-01"]
    assert "partition date=2024-03-01" in outcome.reason and "null value" in outcome.reason
    # Quarantined, the bad day is left out and the night goes on.
    (tmp_path / "lake/date=2024-03-01/_QUARANTINE").touch()
    assert run_retrain(settings, days[3]).status == "promoted"


def test_a_quarantined_night_completes_with_the_champion_kept(
    sim: SimulationResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    days = _tiny_lake(tmp_path / "lake", days=4)
    config = _tiny_config(tmp_path, sim, registered_model="recvae-quarantine")
    assert main(["retrain", "--config", str(config), "--date", "2024-03-03"]) == 0
    (tmp_path / "lake/date=2024-03-04/_QUARANTINE").touch()
    assert main(["retrain", "--config", str(config), "--date", "2024-03-04"]) == ExitCode.KEPT
    assert "date=2024-03-04 is quarantined" in capsys.readouterr().out
    # Done: a rerun does nothing and prints what that night did, not a current champion.
    assert main(["retrain", "--config", str(config), "--date", "2024-03-03"]) == 0
    out = capsys.readouterr().out
    assert "(already done)" in out and "that night made version 1 the champion" in out
    assert days[-1] == date(2024, 3, 4)


def test_a_discarded_checkpoint_starts_a_new_mlflow_run(
    sim: SimulationResult, tmp_path: Path
) -> None:
    import mlflow

    days = _tiny_lake(tmp_path / "lake", days=3)
    settings = _always_promote(_tiny_config(tmp_path, sim, registered_model="recvae-discard"))

    def killed(epoch: int, metrics: dict[str, float]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_retrain(settings, days[-1], on_epoch=killed)
    state = StateDir(settings.state_dir)
    first = state.read_json(state.attempt_path(days[-1]))["run_id"]
    # As after kill -9: the run is still RUNNING in the store, the checkpoint on disk.
    mlflow.MlflowClient().update_run(first, status="RUNNING")
    assert (state.checkpoint_dir(days[-1]) / "checkpoint.pt").is_file()
    # More data for the night: the checkpoint no longer matches and is discarded.
    _write_partition(
        tmp_path / "lake", days[-1], _day_frame(days[-1], seed=11), name="part-1.parquet"
    )
    outcome = run_retrain(settings, days[-1])
    assert outcome.status == "promoted"
    assert outcome.summary["training"]["checkpoint_discarded"] is True
    run_id = outcome.summary["mlflow"]["run_id"]
    assert run_id != first and outcome.summary["mlflow"]["resumed_run"] is False
    old = mlflow.get_run(first)
    assert old.info.status == "FAILED" and "discarded" in old.data.tags["nightly.superseded"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "train.loss")
    assert sorted(m.step for m in history) == [1, 2]  # one training's curve
    assert mlflow.get_run(run_id).data.params["date"] == "2024-03-03"


def test_a_continued_run_gets_the_checkpointed_epoch_its_attempt_could_not_log(
    sim: SimulationResult, tmp_path: Path
) -> None:
    # The tracking server went away at the call logging epoch 2, after its checkpoint was
    # written: the run stays RUNNING and the rerun, starting after epoch 2, continues it.
    import mlflow
    from mlflow.exceptions import MlflowException

    days = _tiny_lake(tmp_path / "lake", days=3)
    config = _tiny_config(tmp_path, sim, registered_model="recvae-epoch-gap")
    config.write_text(config.read_text().replace("epochs = 2", "epochs = 3"))
    settings = _always_promote(config)
    real = mlflow.log_metrics

    def gone_at_epoch_2(metrics: dict[str, float], step: int | None = None, **kw: Any) -> Any:
        if step == 2:
            raise MlflowException("API request to .../runs/log-batch failed: Connection refused")
        return real(metrics, step=step, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow, "log_metrics", gone_at_epoch_2)
        failed = run_retrain(settings, days[-1])
    assert failed.status == "failed" and "training failed" in failed.reason
    run_id = failed.summary["mlflow"]["run_id"]
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")  # as the gone server left it
    outcome = run_retrain(settings, days[-1])
    assert outcome.status == "promoted", outcome.reason
    assert outcome.summary["mlflow"]["run_id"] == run_id
    assert outcome.summary["training"]["resumed_from_epoch"] == 2
    client = mlflow.MlflowClient()
    for key in ("train.loss", "train.kl"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3]


def test_cli_state_dir_and_summary_problems(
    sim: SimulationResult,
    tiny_job: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipelines.folders as folders

    argv = ["retrain", "--config", str(tiny_job), "--date", "2024-03-06"]
    not_a_folder = tmp_path / "state-file"
    not_a_folder.write_text("x")
    assert main([*argv, "--state-dir", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    assert f"the state directory {not_a_folder} is not a folder ([nightly] state_dir" in err
    assert main([*argv, "--state-dir", str(not_a_folder / "below")]) == 2
    assert "[nightly] state_dir, --state-dir): " in capsys.readouterr().err

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as mp:
        mp.setattr(folders.tempfile, "NamedTemporaryFile", read_only)
        assert main([*argv, "--summary", str(tmp_path / "s.json")]) == 2
        assert f"{tmp_path} is not writable (Read-only file system)" in capsys.readouterr().err
    # A night refused before it runs still leaves the scheduler a summary of this date.
    summary = tmp_path / "refused.json"
    summary.write_text('{"status": "promoted"}')  # the previous night's
    backlog = (date.fromisoformat(sim.rows[0].date) - timedelta(days=1)).isoformat()
    argv = ["retrain", "--config", str(sim.config), "--date", backlog, "--summary", str(summary)]
    assert main(argv) == 2
    record = json.loads(summary.read_text())
    assert record["status"] == "error" and record["exit_code"] == 2
    assert record["date"] == backlog and "older than the last completed" in record["reason"]


def test_a_refused_night_records_the_exit_code_of_its_cause(tmp_path: Path) -> None:
    from pipelines.cli import Terminated
    from pipelines.commands.retrain import _write_refusal

    day = date(2024, 3, 1)
    for exc, status, code in (
        (Terminated(), "interrupted", 143),
        (KeyboardInterrupt(), "interrupted", 130),
        (ValueError("bad config"), "error", 2),
        (RuntimeError("broke"), "error", 1),
    ):
        _write_refusal(tmp_path / "s.json", day, exc)
        record = json.loads((tmp_path / "s.json").read_text())
        assert (record["status"], record["exit_code"], record["date"]) == (
            status,
            code,
            "2024-03-01",
        )


def test_records_are_on_the_disk_before_they_take_their_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.nightly.job import _write_json
    from tests.conftest import record_fsyncs

    events = record_fsyncs(monkeypatch)
    target = tmp_path / "state" / "last.json"
    _write_json(target, {"outcome": "promoted"})
    assert json.loads(target.read_text()) == {"outcome": "promoted"}
    [(kind, tmp), *rest] = events
    assert kind == "fsync" and Path(tmp).name.startswith(".last.json.")
    assert rest == [("rename", str(target.resolve())), ("fsync", str(target.parent.resolve()))]


def test_an_already_done_rerun_reports_that_nights_failed_notification_as_history(
    sim: SimulationResult,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The rerun printed "warning: serving layer not notified: ..." as if it had just failed.
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RECVAE_ADMIN_TOKEN", "t")
    _tiny_lake(tmp_path / "lake", days=2)
    config = _tiny_config(
        tmp_path,
        sim,
        registered_model="recvae-notify-history",
        deploy={"url": f"http://127.0.0.1:{port}", "timeout_s": 2},
    )
    assert main(["retrain", "--config", str(config), "--date", "2024-03-02"]) == 0
    err = capsys.readouterr().err
    assert "warning: serving layer was not notified" in err
    assert main(["retrain", "--config", str(config), "--date", "2024-03-02"]) == 0
    err = capsys.readouterr().err
    assert "warning: that night, the serving layer was not notified" in err


def test_both_rollback_commands_take_the_state_dir(tmp_path: Path) -> None:
    # `recvae rollback --state-dir X` was refused (unrecognized argument) while
    # `recvae retrain --state-dir X rollback` took it: a rollback must be able to use the
    # job's own lock whichever form is used.
    from pipelines.cli import build_parser, parse_args

    parser = build_parser()
    for argv in (
        ["rollback", "--config", "nightly", "--state-dir", str(tmp_path)],
        ["retrain", "--config", "nightly", "rollback", "--state-dir", str(tmp_path)],
        ["retrain", "--config", "nightly", "--state-dir", str(tmp_path), "rollback"],
    ):
        args = parse_args(parser, argv)
        assert Path(args.state_dir) == tmp_path, argv
    args = parse_args(parser, ["rollback", "--config", "nightly"])
    assert getattr(args, "state_dir", None) is None


def test_a_promoted_bundle_carries_the_metrics_it_was_promoted_on(
    sim: SimulationResult, tmp_path: Path
) -> None:
    # The server's /v1/model showed "metrics": {} for every nightly champion.
    from recvae import tracking
    from recvae.recommender import Recommender

    settings = _sim_settings(sim)
    tracking.configure_tracking(settings.mlflow.tracking_uri)
    uri = f"models:/{settings.mlflow.registered_model}@{settings.mlflow.alias}"
    bundle = tracking.resolve_bundle(uri, dst=tmp_path)
    meta = Recommender.read_meta(bundle)
    last = [r for r in sim.rows if r.status == "promoted"][-1]
    summary = json.loads(
        (sim.config.parent / "state/runs" / last.date / "summary.json").read_text()
    )
    assert meta["metrics"]["nightly_test"] == summary["gate"]["challenger"]
    assert meta["metrics"]["nightly_test"]["ndcg@100"] > 0
    assert Recommender.load(bundle).version == meta["model_version"]
