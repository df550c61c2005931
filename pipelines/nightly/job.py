"""The nightly retraining run: validate, build, train, evaluate, gate, promote, notify.

One call of :func:`run_retrain` is one night. It holds the single-run lock for its whole
duration, records itself as an MLflow run, and writes a JSON summary. Everything it keeps
between calls lives in the state directory::

    state_dir/
      retrain.lock                 the single-run lock (fcntl.flock; holder info inside)
      last_run.json                summary of the latest run (any outcome)
      rollbacks.jsonl              one line per rollback
      runs/YYYY-MM-DD/
        summary.json               the night's final summary (promoted/kept mark it done)
        attempt.json               the MLflow run id of the current attempt
        checkpoints/checkpoint.pt  the challenger's per-epoch checkpoint (a rerun resumes)
        bundle/                    the challenger (removed once registered)
        champion/                  the champion downloaded for comparison (removed at the end)

Exit codes (:class:`ExitCode`): 0 promoted, 3 champion kept, 4 data rejected, 5 another run
holds the lock, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.nightly.lock import LockBusyError, RunLock
from pipelines.nightly.settings import NightlySettings
from recvae import _durable

if TYPE_CHECKING:
    from recvae.recommender import Recommender

__all__ = [
    "DONE_STATUSES",
    "ExitCode",
    "RetrainOutcome",
    "StateDir",
    "UsageError",
    "default_date",
    "run_retrain",
    "run_rollback",
]

logger = logging.getLogger(__name__)


class ExitCode(IntEnum):
    """Process exit codes of ``recvae retrain``, for schedulers."""

    PROMOTED = 0  # success: the challenger is the new champion
    FAILED = 1  # something broke (training diverged, registry unreachable, ...)
    USAGE = 2  # bad command line or configuration
    KEPT = 3  # success: the champion stays (the challenger did not pass the gate)
    REJECTED = 4  # the new data failed validation; nothing changed
    BUSY = 5  # another run holds the lock; nothing was done


_STATUS_CODES = {
    "promoted": ExitCode.PROMOTED,
    "kept": ExitCode.KEPT,
    "rejected": ExitCode.REJECTED,
    "failed": ExitCode.FAILED,
    "busy": ExitCode.BUSY,
}
DONE_STATUSES = ("promoted", "kept")


class UsageError(ValueError):
    """The run was asked for something it must not do (e.g. an older date without --force)."""


@dataclass
class RetrainOutcome:
    """What a call of :func:`run_retrain` did.

    Attributes:
        status: ``promoted``, ``kept``, ``rejected``, ``failed`` or ``busy``.
        reason: One readable sentence.
        summary: The machine-readable summary (also written as JSON).
        already_done: True when the date had completed before and nothing was rerun.
    """

    status: str
    reason: str
    summary: dict[str, Any] = field(default_factory=dict)
    already_done: bool = False

    @property
    def exit_code(self) -> int:
        return int(_STATUS_CODES[self.status])


def default_date() -> date:
    """Yesterday in UTC: a nightly run processes the partition of the day that just ended."""
    return datetime.now(UTC).date() - timedelta(days=1)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically and durably (flushed temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True))
    _durable.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class StateDir:
    """Paths and records of the state directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def lock_path(self) -> Path:
        return self.root / "retrain.lock"

    @property
    def last_summary_path(self) -> Path:
        return self.root / "last_run.json"

    @property
    def rollback_log(self) -> Path:
        return self.root / "rollbacks.jsonl"

    def run_dir(self, day: date) -> Path:
        return self.root / "runs" / day.isoformat()

    def checkpoint_dir(self, day: date) -> Path:
        return self.run_dir(day) / "checkpoints"

    def bundle_dir(self, day: date) -> Path:
        # The directory must be called "bundle": recvae.tracking finds it by that name.
        return self.run_dir(day) / "bundle"

    def champion_dir(self, day: date) -> Path:
        return self.run_dir(day) / "champion"

    def summary_path(self, day: date) -> Path:
        return self.run_dir(day) / "summary.json"

    def attempt_path(self, day: date) -> Path:
        return self.run_dir(day) / "attempt.json"

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
            return None
        return data if isinstance(data, dict) else None

    def summary(self, day: date) -> dict[str, Any] | None:
        return self.read_json(self.summary_path(day))

    def completed(self) -> dict[date, str]:
        """Dates whose run completed (promoted or kept), with the status."""
        out: dict[date, str] = {}
        runs = self.root / "runs"
        if not runs.is_dir():
            return out
        for child in runs.iterdir():
            try:
                day = date.fromisoformat(child.name)
            except ValueError:
                continue
            summary = self.read_json(child / "summary.json")
            if summary and summary.get("status") in DONE_STATUSES:
                out[day] = str(summary["status"])
        return out

    def reset(self, day: date) -> None:
        """Forget a date's previous attempt (``--force``): the old summary is archived."""
        run_dir = self.run_dir(day)
        old = self.summary_path(day)
        if old.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            old.rename(run_dir / f"summary.{stamp}.json")
        for path in (self.checkpoint_dir(day), self.bundle_dir(day), self.champion_dir(day)):
            shutil.rmtree(path, ignore_errors=True)
        self.attempt_path(day).unlink(missing_ok=True)

    def prune_challenger_bundles(self, keep: int) -> None:
        """Keep only the ``keep`` most recent local bundles of challengers."""
        runs = self.root / "runs"
        bundles = sorted(p for p in runs.glob("*/bundle") if p.is_dir()) if runs.is_dir() else []
        for old in bundles[: max(0, len(bundles) - keep)]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- MLflow run
# The per-epoch validation curves: ``train.`` and the trainer's ``val_ndcg@100`` and the like.
_EPOCH_VALIDATION_PREFIX = "train.val_"


def _metric_name(name: str) -> str:
    return name.replace("@", "_at_")


def _flat_params(settings: NightlySettings, day: date, window: dict[str, Any]) -> dict[str, str]:
    """The run's params: date and window, then every split, gate, training and validation
    setting (``split.seed``, ``gate.min_ndcg``, ...) and the model config (``model.*``)."""
    params: dict[str, Any] = {
        "date": day.isoformat(),
        "window_days": settings.window_days,
        "window_start": window.get("start"),
        "window_end": window.get("end"),
        "recent_days": settings.recent_days,
        "lake": str(settings.lake),
    }
    for section in ("split", "gate", "training", "validation"):
        for key, value in dataclasses.asdict(getattr(settings, section)).items():
            params[f"{section}.{key}"] = value
    for key, value in settings.model_config().to_dict().items():
        params[f"model.{key}"] = value
    return {k: str(v) for k, v in params.items()}


class _MlflowRun:
    """The MLflow run of one attempt; a rerun after a crash continues the same run."""

    def __init__(self, state: StateDir, day: date, experiment_id: str) -> None:
        self.state = state
        self.day = day
        self.experiment_id = experiment_id
        self.run_id: str | None = None
        self.resumed = False
        self.params: dict[str, str] = {}

    def start(self) -> str:
        import mlflow

        attempt = self.state.read_json(self.state.attempt_path(self.day)) or {}
        previous = attempt.get("run_id")
        if previous:
            client = mlflow.MlflowClient()
            try:
                status = client.get_run(previous).info.status
            except Exception:  # deleted or from another store
                status = None
            if status == "RUNNING":
                mlflow.start_run(run_id=previous)
                self.run_id, self.resumed = str(previous), True
                mlflow.set_tag("nightly.resumed", "true")
                return self.run_id
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"retrain-{self.day.isoformat()}"
        )
        self.run_id = run.info.run_id
        _write_json(
            self.state.attempt_path(self.day), {"run_id": self.run_id, "started_at": _now()}
        )
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        import mlflow

        self.params = params
        existing = mlflow.get_run(self.run_id).data.params if self.run_id else {}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            # The interrupted attempt ran with other settings: it cannot be continued.
            self.restart("settings changed before the rerun")
            existing = {}
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def restart(self, why: str) -> str:
        """End the continued run (``FAILED``, tagged ``nightly.superseded``) and start a new one
        with the same params, so that one run never holds the curves of two trainings."""
        import mlflow

        mlflow.set_tag("nightly.superseded", why)
        mlflow.end_run("FAILED")
        self.resumed = False
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"retrain-{self.day.isoformat()}"
        )
        self.run_id = run.info.run_id
        _write_json(
            self.state.attempt_path(self.day), {"run_id": self.run_id, "started_at": _now()}
        )
        if self.params:
            mlflow.log_params(self.params)
        return self.run_id

    def finish(self, summary: dict[str, Any], status: str) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        decision = summary.get("gate") or {}
        tags = {
            "nightly.date": self.day.isoformat(),
            "nightly.status": status,
            "nightly.reason": str(summary.get("reason", ""))[:4900],
            "nightly.checks_failed": str(
                sum(1 for c in summary.get("checks", []) if not c.get("ok"))
            ),
        }
        registry = summary.get("registry") or {}
        for key in ("champion_version", "new_version"):
            if registry.get(key):
                tags[f"nightly.{key}"] = str(registry[key])
        metrics: dict[str, float] = {}
        for key, value in (summary.get("counts") or {}).items():
            metrics[f"data.{key}"] = float(value)
        for who in ("challenger", "champion"):
            for key, value in (decision.get(who) or {}).items():
                if value is not None and math.isfinite(float(value)):
                    metrics[f"{who}.{_metric_name(key)}"] = float(value)
        for key in ("delta", "delta_se"):
            value = decision.get(key)
            if value is not None and math.isfinite(float(value)):
                metrics[f"gate.{key}"] = float(value)
        training = summary.get("training") or {}
        if training.get("resumed_from_epoch") is not None:
            metrics["train.resumed_from_epoch"] = float(training["resumed_from_epoch"])
        if training.get("best_epoch") is not None:
            metrics["train.best_epoch"] = float(training["best_epoch"])
            metrics.update(self._best_epoch_metrics(int(training["best_epoch"])))
        mlflow.set_tags(tags)
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict(_jsonable(summary), "nightly_summary.json")
        mlflow.end_run("FINISHED" if status != "failed" else "FAILED")

    def _best_epoch_metrics(self, best_epoch: int) -> dict[str, float]:
        """The per-epoch validation metrics of the epoch the challenger keeps, as run-level
        metrics: ``train.val_ndcg_at_100`` at step ``best_epoch`` becomes
        ``train.best_val_ndcg_at_100`` (a curve's latest value is its last epoch's, which the
        challenger need not be).

        Epochs logged to an earlier run (a rerun that resumed training from the checkpoint in a
        new MLflow run) are not in this one's curves: their values are left out.
        """
        import mlflow

        assert self.run_id is not None
        client = mlflow.MlflowClient()
        out: dict[str, float] = {}
        for key in client.get_run(self.run_id).data.metrics:
            if not key.startswith(_EPOCH_VALIDATION_PREFIX):
                continue
            at_best = [
                m for m in client.get_metric_history(self.run_id, key) if m.step == best_epoch
            ]
            if at_best:  # a resumed attempt may have logged the epoch twice: the later counts
                value = max(at_best, key=lambda m: m.timestamp).value
                name = key[len(_EPOCH_VALIDATION_PREFIX) :]
                out[f"train.best_val_{name}"] = float(value)
        return out


def _end_active_run(status: str = "FAILED") -> None:
    """Close a run left open by an error, so that the next run in this process starts clean.

    Never raises: when the store cannot record the end (it is what failed), the run stays
    RUNNING in the store (a rerun continues it) and only this process forgets it.
    """
    import mlflow

    if mlflow.active_run() is None:
        return
    try:
        mlflow.end_run(status)  # forgets the run locally first, then tells the store
    except Exception as exc:
        logger.warning("could not mark the MLflow run %s: %s", status, _one_line(exc))


def _server_not_answering(uri: str | None) -> ConnectionError | None:
    """Why an HTTP tracking server does not answer its ``/health`` now, None when it does (or
    the store is not a server).

    Once a call of the night has failed because the server went away, each further call would
    pay MLflow's retries again (about four minutes by default) before failing too; one quick
    request says at once whether recording the run is worth trying.
    """
    if uri is None or not uri.startswith(("http://", "https://")):
        return None
    from recvae.tracking import check_reachable

    try:
        check_reachable(uri, timeout=5.0)
    except ConnectionError as exc:
        return exc
    return None


def _epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A trainer epoch's metrics as the run's ``train.*`` curves hold them (finite values)."""
    return {
        f"train.{_metric_name(k)}": float(v)
        for k, v in metrics.items()
        if k != "epoch" and isinstance(v, int | float) and math.isfinite(v)
    }


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (MLflow errors carry whole SQL statements)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


# ---------------------------------------------------------------------------------- the run
def run_retrain(
    settings: NightlySettings,
    day: date | None = None,
    *,
    force: bool = False,
    summary_path: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> RetrainOutcome:
    """Run one night.

    Args:
        settings: Job settings.
        day: The run date (default: yesterday in UTC); its partition must exist.
        force: Run again even if the date completed before, and allow a date older than the
            latest completed one.
        summary_path: Also write the JSON summary here (for the scheduler).
        on_epoch: Extra per-epoch callback ``(epoch, metrics)`` (telemetry).

    Returns:
        The outcome; ``outcome.exit_code`` is the process exit code.

    Raises:
        UsageError: ``day`` is older than the latest completed run and ``force`` is not set.
    """
    day = day or default_date()
    state = StateDir(settings.state_dir)
    lock = RunLock(
        state.lock_path, max_age_hours=settings.lock.max_age_hours, purpose=f"retrain {day}"
    )
    try:
        lock.acquire()
    except LockBusyError as exc:
        outcome = RetrainOutcome(
            "busy", str(exc), {"date": day.isoformat(), "status": "busy", "reason": str(exc)}
        )
        if summary_path is not None:
            _write_json(summary_path, outcome.summary)
        logger.error("%s", exc)
        return outcome
    try:
        outcome = _Night(settings, day, state, lock, force=force, on_epoch=on_epoch).run()
    except BaseException:
        # Interrupted (Ctrl-C, SystemExit) or a usage error: close the MLflow run as killed;
        # the checkpoint stays, so the next run of this date resumes.
        if "mlflow" in sys.modules:
            _end_active_run("KILLED")
        raise
    finally:
        lock.release()
    if summary_path is not None:
        try:
            _write_json(summary_path, outcome.summary)
        except OSError as exc:  # the night is done; its record is in the state directory
            logger.error("could not write the summary copy %s: %s", summary_path, exc)
    return outcome


class _Night:
    """One locked run (split into steps so that each one reads on its own)."""

    def __init__(
        self,
        settings: NightlySettings,
        day: date,
        state: StateDir,
        lock: RunLock,
        *,
        force: bool,
        on_epoch: Callable[[int, dict[str, float]], None] | None,
    ) -> None:
        self.settings = settings
        self.day = day
        self.state = state
        self.force = force
        self.on_epoch = on_epoch
        self.started = time.time()
        self.summary: dict[str, Any] = {
            "date": day.isoformat(),
            "status": "running",
            "started_at": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lock": lock.describe(),
            "state_dir": str(state.root),
            "settings": settings.to_dict(),
            "checks": [],
        }
        self.mlflow_run: _MlflowRun | None = None
        self.tracking_uri: str | None = None
        self.stage = "start"
        self._stage_started = time.perf_counter()
        self.summary["timings_s"] = {}

    def _enter(self, stage: str) -> None:
        """Start a step: the time of the previous one goes into ``summary["timings_s"]``."""
        now = time.perf_counter()
        timings = self.summary["timings_s"]
        timings[self.stage] = round(timings.get(self.stage, 0.0) + now - self._stage_started, 3)
        self.stage, self._stage_started = stage, now

    # ------------------------------------------------------------------ entry
    def run(self) -> RetrainOutcome:
        done = self._already_done()
        if done is not None:
            return done
        if self.force:
            self.state.reset(self.day)
        try:
            self._enter("tracking")
            from pipelines.nightly.registry import open_tracking
            from recvae.tracking import redact_uri

            uri, experiment_id = open_tracking(self.settings.mlflow)
            self.tracking_uri = uri
            self.mlflow_run = _MlflowRun(self.state, self.day, experiment_id)
            run_id = self.mlflow_run.start()
            self.summary["mlflow"] = {
                "tracking_uri": redact_uri(uri),
                "experiment_id": experiment_id,
                "run_id": run_id,
                "resumed_run": self.mlflow_run.resumed,
            }
            return self._steps()
        except Exception as exc:
            logger.exception("nightly run for %s failed during %s", self.day, self.stage)
            return self._finish("failed", f"{self.stage} failed: {_one_line(exc)}")

    def _already_done(self) -> RetrainOutcome | None:
        previous = self.state.summary(self.day)
        if previous and previous.get("status") in DONE_STATUSES and not self.force:
            status = str(previous["status"])
            reason = (
                f"{self.day} already completed ({status}) at {previous.get('finished_at')}; "
                "nothing to do (--force runs it again)"
            )
            logger.info("%s", reason)
            return RetrainOutcome(
                status, reason, {**previous, "already_done": True, "note": reason}, True
            )
        later = sorted(d for d in self.state.completed() if d > self.day)
        if later and not self.force:
            raise UsageError(
                f"{self.day} is older than the last completed run ({later[-1]}): retraining on "
                "older data could replace a newer champion; pass --force to do it anyway"
            )
        return None

    def _finish(self, status: str, reason: str) -> RetrainOutcome:
        self._enter("finish")
        self.summary["status"] = status
        self.summary["exit_code"] = int(_STATUS_CODES[status])
        self.summary["reason"] = reason
        self.summary["finished_at"] = _now()
        self.summary["duration_s"] = round(time.time() - self.started, 3)
        (logger.info if status in DONE_STATUSES else logger.error)(
            "nightly run %s: %s: %s", self.day, status, reason
        )
        if self.mlflow_run is not None:
            # A server that went away (often what failed the night) is not asked to record the
            # run call after call: the run stays RUNNING and the rerun continues it.
            down = _server_not_answering(self.tracking_uri)
            try:
                if down is not None:
                    raise down
                self.mlflow_run.finish(self.summary, status)
            except Exception as exc:
                logger.error("could not record the MLflow run: %s", _one_line(exc))
                self.summary["mlflow_error"] = _one_line(exc)
                if status != "promoted":  # a moved alias stays moved; anything else failed
                    status = "failed"
                    self.summary["status"] = status
                    self.summary["exit_code"] = int(ExitCode.FAILED)
            finally:
                from recvae.tracking import single_attempt

                with single_attempt() if down is not None else nullcontext():
                    _end_active_run()
        _write_json(self.state.summary_path(self.day), self.summary)
        _write_json(self.state.last_summary_path, self.summary)
        if status in DONE_STATUSES:
            shutil.rmtree(self.state.checkpoint_dir(self.day), ignore_errors=True)
            shutil.rmtree(self.state.champion_dir(self.day), ignore_errors=True)
            if status == "promoted":
                shutil.rmtree(self.state.bundle_dir(self.day), ignore_errors=True)
            self.state.prune_challenger_bundles(self.settings.keep_challenger_bundles)
        return RetrainOutcome(status, reason, _jsonable(self.summary))

    # ------------------------------------------------------------------ steps
    def _steps(self) -> RetrainOutcome:
        from pipelines.nightly.checks import failed_checks, validate_partitions
        from pipelines.nightly.dataset import DataRejectedError, build_nightly_data
        from pipelines.nightly.lake import QUARANTINE_MARKER, list_partitions, window_partitions

        settings, day = self.settings, self.day
        # 1. Validate the partitions that arrived since the last completed run.
        self._enter("validation")
        partitions = list_partitions(settings.lake, settings.lake_format)
        window = window_partitions(partitions, day, settings.window_days)
        completed = [d for d in self.state.completed() if d < day]
        since = max(completed) if completed else None
        new = [p for p in window if since is None or p.day > since]
        # Partitions validated by an earlier night whose files changed since (a late file in
        # an old day) are validated again.
        validated = (self.state.summary(since) or {}) if since else {}
        recorded = validated.get("partition_fingerprints") or {}
        prints = {p.day.isoformat(): p.fingerprint() for p in window}
        changed = [
            p
            for p in window
            if p not in new
            and recorded.get(p.day.isoformat()) not in (None, prints[p.day.isoformat()])
        ]
        self.summary["partition_fingerprints"] = prints
        self.summary["window"] = {
            "start": window[0].day.isoformat() if window else None,
            "end": day.isoformat(),
            "days": settings.window_days,
            "partitions": len(window),
            "new_partitions": [p.day.isoformat() for p in new],
            "changed_partitions": [p.day.isoformat() for p in changed],
            "last_completed": since.isoformat() if since else None,
        }
        if changed:
            logger.warning(
                "validating again partition(s) whose files changed since %s: %s",
                since,
                ", ".join(p.name for p in changed),
            )
        assert self.mlflow_run is not None
        self.mlflow_run.log_params(_flat_params(settings, day, self.summary["window"]))
        own = settings.lake / f"date={day.isoformat()}"
        if (own / QUARANTINE_MARKER).exists():
            # Quarantined by an operator after a rejection: the night has nothing new to
            # learn from, so it completes with the champion unchanged (later nights go on).
            return self._finish(
                "kept",
                f"partition {own.name} is quarantined ({own / QUARANTINE_MARKER}): nothing new "
                "to train on; the champion stays",
            )
        if not any(p.day == day for p in window):
            latest = partitions[-1].name if partitions else "none"
            message = (
                f"no usable partition date={day.isoformat()} in {settings.lake} (latest: {latest})"
            )
            self.summary["checks"] = [
                {
                    "check": "partition",
                    "partition": day.isoformat(),
                    "ok": False,
                    "message": message,
                }
            ]
            return self._finish("rejected", message)
        to_check = sorted([*new, *changed], key=lambda p: p.day)
        checks = validate_partitions(
            to_check, partitions, settings.lake_format, settings.validation
        )
        self.summary["checks"] = [c.to_dict() for c in checks]
        rows = [c for c in checks if c.check == "rows" and c.partition == day.isoformat()]
        if rows and rows[0].value is not None:
            self.summary["partition_rows"] = int(rows[0].value)
        failed = failed_checks(checks)
        if failed:
            return self._finish("rejected", "; ".join(c.message for c in failed))

        # 2. The champion (for the split's exclusions, the warm start and the comparison).
        self._enter("champion")
        champion = self._load_champion()

        # 3. Training matrix and evaluation split.
        self._enter("build")
        exclude = None if champion is None else set(champion.user_ids.tolist())
        try:
            data = build_nightly_data(window, day, settings, exclude_test_users=exclude)
        except DataRejectedError as exc:
            return self._finish("rejected", str(exc))
        self.summary["counts"] = data.counts
        try:
            data = self._exclude_anomalies(data, champion)
        except DataRejectedError as exc:
            return self._finish("rejected", str(exc))

        # 4. Train the challenger.
        self._enter("training")
        challenger = self._train(data, champion)

        # 5. Evaluate both on the same users and decide.
        self._enter("evaluation")
        decision = self._evaluate(data, challenger, champion)
        self.summary["gate"] = decision.to_dict()
        if not decision.promote:
            self._undo_interrupted_promotion()
            return self._finish("kept", decision.reason)

        # 6. Promote, then notify. The bundle carries the metrics it was promoted on (what
        # the server's /v1/model reports); they live in meta.json, outside its content id.
        self._enter("promotion")
        challenger.meta["metrics"] = {"nightly_test": dict(decision.challenger)}
        challenger.save(self.state.bundle_dir(self.day), overwrite=True)
        self._promote(challenger, decision.challenger["ndcg@100"])
        self._enter("notification")
        self._notify()
        return self._finish("promoted", decision.reason)

    def _load_champion(self) -> Recommender | None:
        from pipelines.nightly.registry import (
            TAG_DATE,
            TAG_PREVIOUS,
            current_champion,
            download_champion,
            get_version,
        )
        from recvae.recommender import Recommender

        ref = current_champion(self.settings.mlflow)
        interrupted_promotion = None
        if ref is not None and not self.force and ref.tags.get(TAG_DATE) == self.day.isoformat():
            # The night is not done, yet its challenger is champion: an earlier attempt moved
            # the alias and was interrupted before it finished. The champion to beat is the one
            # it replaced (comparing the challenger with itself would erase the previous
            # champion that rollback follows).
            interrupted_promotion = ref.version
            previous = ref.tags.get(TAG_PREVIOUS) or None
            logger.warning(
                "an interrupted attempt of this night already made version %s the champion; "
                "comparing with the version it replaced (%s)",
                ref.version,
                previous or "none",
            )
            ref = None if previous is None else get_version(self.settings.mlflow, previous)
        self.summary["registry"] = {
            "model": self.settings.mlflow.registered_model,
            "alias": self.settings.mlflow.alias,
            "champion_version": None if ref is None else ref.version,
            "champion_date": None if ref is None else ref.tags.get("nightly_date"),
        }
        if interrupted_promotion is not None:
            self.summary["registry"]["interrupted_promotion"] = interrupted_promotion
        if ref is None:
            logger.info("no champion yet: the first challenger that passes the sanity checks wins")
            return None
        bundle = download_champion(ref, self.state.champion_dir(self.day))
        return Recommender.load(bundle)

    def _exclude_anomalies(self, data: Any, champion: Recommender | None) -> Any:
        import dataclasses

        from pipelines.nightly.dataset import exclude_anomalous_users

        percentile = self.settings.training.exclude_anomalies_above_percentile
        if percentile is None:
            return data
        if champion is None:
            self.summary["anomalies"] = {
                "applied": False,
                "reason": "no champion yet to score the training users with",
            }
            return data
        train, info = exclude_anomalous_users(data.train, champion, percentile)
        self.summary["anomalies"] = info
        self.summary["counts"]["train_users_after_anomaly_exclusion"] = int(train.n_users)
        return dataclasses.replace(data, train=train)

    def _train(self, data: Any, champion: Recommender | None) -> Recommender:
        import mlflow

        from pipelines.nightly.warm_start import WarmStart, warm_start_state
        from recvae.training import CheckpointMismatchError, train

        settings, day = self.settings, self.day
        config = settings.model_config()
        if champion is None:
            warm = WarmStart(None, "no champion")
        elif not settings.training.warm_start:
            warm = WarmStart(None, "warm start disabled")
        else:
            warm = warm_start_state(champion, config, data.train.item_ids)
        checkpoint_dir = self.state.checkpoint_dir(day)
        options = settings.run_options(checkpoint_dir=str(checkpoint_dir))
        epochs: list[int] = []

        def hook(epoch: int, metrics: dict[str, float]) -> None:
            epochs.append(epoch)
            from pipelines.cli import terminations_deferred

            with terminations_deferred():  # a SIGTERM waits for the store call to finish
                mlflow.log_metrics(_epoch_metrics(metrics), step=epoch)
            if self.on_epoch is not None:
                self.on_epoch(epoch, metrics)

        def fit() -> Recommender:
            return train(
                data.train,
                config,
                validation=data.validation,
                options=options,
                on_epoch=hook,
                initial_state=warm.state,
            )

        discarded = False
        try:
            challenger = fit()
        except CheckpointMismatchError as exc:
            # The data or config changed since the interrupted attempt: start over.
            logger.warning("discarding the checkpoint of an earlier attempt: %s", exc)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            discarded = True
            epochs.clear()
            assert self.mlflow_run is not None
            if self.mlflow_run.resumed:
                # The continued run holds the discarded attempt's curves: start a fresh one.
                run_id = self.mlflow_run.restart("its checkpoint was discarded (the data changed)")
                self.summary["mlflow"].update(run_id=run_id, resumed_run=False)
            challenger = fit()
        epochs_run = int(challenger.meta.get("epochs_run", 0))
        resumed_from = epochs[0] - 1 if epochs else epochs_run
        if resumed_from and warm.state is not None:
            # The checkpoint's weights replaced the warm start (it applies to a fresh start).
            warm = dataclasses.replace(
                warm,
                state=None,
                reason=f"not applied: resumed from the checkpoint after epoch {resumed_from} "
                "(a warm start applies to a fresh start only)",
            )
        self.summary["training"] = {
            "model": config.model,
            "epochs_run": epochs_run,
            "best_epoch": challenger.meta.get("best_epoch"),
            "resumed_from_epoch": resumed_from,
            "checkpoint_discarded": discarded,
            "warm_start": warm.to_dict(),
        }
        if resumed_from:
            logger.info("resumed the challenger from its checkpoint after epoch %d", resumed_from)
            assert self.mlflow_run is not None
            if self.mlflow_run.resumed:
                self._log_checkpointed_epoch(challenger, resumed_from)
        challenger.meta.update(
            {
                "nightly": {
                    "date": day.isoformat(),
                    "window": self.summary.get("window"),
                    "counts": data.counts,
                    "eval_salt": settings.split.eval_salt,
                    "eval_user_fraction": settings.split.eval_user_fraction,
                }
            }
        )
        challenger.save(self.state.bundle_dir(day), overwrite=True)
        self.summary["challenger_bundle_version"] = challenger.version
        return challenger

    def _log_checkpointed_epoch(self, challenger: Recommender, epoch: int) -> None:
        """Log the checkpointed epoch's metrics to the continued run if they are not there.

        The trainer writes an epoch's checkpoint before the hook logs its metrics: an attempt
        that died in between (the tracking server went away at that very call, ``kill -9``)
        left the epoch out of the run's curves, and the rerun starts after it.
        """
        import mlflow

        assert self.mlflow_run is not None and self.mlflow_run.run_id is not None
        history = challenger.meta.get("history") or []
        entry = next((h for h in history if int(h.get("epoch", -1)) == epoch), None)
        if entry is None:
            return
        metrics = _epoch_metrics(entry)
        if not metrics:
            return
        logged = mlflow.MlflowClient().get_metric_history(
            self.mlflow_run.run_id, next(iter(metrics))
        )
        if any(m.step == epoch for m in logged):
            return
        mlflow.log_metrics(metrics, step=epoch)

    def _evaluate(self, data: Any, challenger: Recommender, champion: Recommender | None) -> Any:
        from pipelines.nightly.gate import (
            VocabularyAdapter,
            decide,
            evaluate_model,
            finite_scores,
        )

        test = data.test
        chal_result = evaluate_model(challenger, test)
        finite = finite_scores(challenger, test.fold_in.matrix)
        champ_result = None
        if champion is not None:
            adapter = VocabularyAdapter(champion, data.train.item_ids)
            self.summary["counts"]["items_known_to_champion"] = adapter.n_known
            champ_result = evaluate_model(adapter, test)
        return decide(self.settings.gate, chal_result, champ_result, challenger_finite=finite)

    def _promote(self, challenger: Recommender, ndcg: float) -> None:
        from pipelines.nightly.registry import promote

        registry = self.summary["registry"]
        assert self.mlflow_run is not None and self.mlflow_run.run_id is not None
        version = promote(
            self.settings.mlflow,
            self.state.bundle_dir(self.day),
            day=self.day.isoformat(),
            run_id=self.mlflow_run.run_id,
            bundle_version=challenger.version,
            ndcg=ndcg,
            previous=registry.get("champion_version"),
        )
        registry["new_version"] = version
        registry["previous_version"] = registry.get("champion_version")
        registry["model_uri"] = f"models:/{registry['model']}@{registry['alias']}"

    def _undo_interrupted_promotion(self) -> None:
        """The challenger lost this time: the alias an interrupted attempt moved goes back."""
        registry = self.summary["registry"]
        if registry.get("interrupted_promotion") is None:
            return
        from pipelines.nightly.registry import restore_alias

        restore_alias(self.settings.mlflow, registry.get("champion_version"))
        registry["alias_restored"] = True

    def _notify(self) -> None:
        from pipelines.nightly.notify import notify_reload, reload_payload

        registry = self.summary["registry"]
        self.summary["notify"] = notify_reload(
            self.settings.deploy,
            reload_payload(
                registry["model_uri"],
                registry["new_version"],
                "promoted",
                self.day.isoformat(),
            ),
        )


def run_rollback(settings: NightlySettings, *, to_version: str | None = None) -> dict[str, Any]:
    """Move the champion alias back (to the previous champion or to ``to_version``).

    Holds the run lock, so a rollback never interleaves with a promotion; notifies the serving
    layer and appends a line to ``rollbacks.jsonl``.

    Returns:
        ``{"from_version", "to_version", "model", "alias", "notify", "at"}``, and
        ``"tag_error"`` when the version rolled back from could not be tagged.

    Raises:
        LockBusyError: a run is in progress.
        ValueError: nothing to roll back to.
    """
    from pipelines.nightly.notify import notify_reload, reload_payload
    from pipelines.nightly.registry import open_tracking, rollback

    state = StateDir(settings.state_dir)
    with RunLock(state.lock_path, max_age_hours=settings.lock.max_age_hours, purpose="rollback"):
        open_tracking(settings.mlflow)
        result = rollback(settings.mlflow, to_version=to_version)
        record: dict[str, Any] = {
            "at": _now(),
            "model": result.name,
            "alias": result.alias,
            "from_version": result.from_version,
            "to_version": result.to_version,
        }
        if result.tag_error is not None:
            record["tag_error"] = result.tag_error
        record["notify"] = notify_reload(
            settings.deploy,
            reload_payload(f"models:/{result.name}@{result.alias}", result.to_version, "rollback"),
        )
        state.root.mkdir(parents=True, exist_ok=True)
        with state.rollback_log.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record
