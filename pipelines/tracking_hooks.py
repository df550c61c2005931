"""MLflow logging for ``recvae train``, ``experiment`` and ``tune``, one code path for all three.

:class:`Tracker` wraps :mod:`recvae.tracking` (the one module that imports mlflow) with what the
pipelines need: runs and child runs, the trainer's ``on_epoch`` hook, final metrics with
standard errors, the fairness report, plots, the bundle as a registered pyfunc model, and tags
(git commit, package version, dataset fingerprint, device). A disabled tracker does nothing, so
callers never branch on whether tracking is on.

Tracking is on by default when mlflow is installed; ``RECVAE_TRACKING=off`` in the environment
turns the default off (the test suite does this), and an explicit ``--track``/``--no-track``
wins over both. Setting up the store fails fast, before any training; a logging call that fails
later (a locked database, a full disk) is reported once as a warning and the run goes on, so a
long experiment is never lost to its telemetry. ``Tracker.errors`` lists what went wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from recvae.evaluation import EvaluationResult
    from recvae.training import EpochCallback

logger = logging.getLogger(__name__)

TRACKING_ENV = "RECVAE_TRACKING"
_OFF = {"0", "false", "off", "no"}
_T = TypeVar("_T")


def tracking_available() -> bool:
    """Whether mlflow can be imported (the ``track`` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def tracking_default() -> bool:
    """On when mlflow is installed, unless ``$RECVAE_TRACKING`` is off, 0, false or no."""
    if os.environ.get(TRACKING_ENV, "").strip().lower() in _OFF:
        return False
    return tracking_available()


def git_commit(path: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (this package by default).

    Returns ``(None, None)`` outside a checkout or without git.
    """
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return commit.stdout.strip() or None, dirty


def run_tags(
    *, dataset: str, fingerprint: str, device: str | None = None, **extra: Any
) -> dict[str, str]:
    """The tags every run carries: code version, data identity and device."""
    from recvae import __version__

    commit, dirty = git_commit()
    if device == "auto":  # record where the run actually executes
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tags: dict[str, Any] = {
        "recvae.version": __version__,
        "git.commit": commit,
        "git.dirty": dirty,
        "data.name": dataset,
        "data.fingerprint": fingerprint,
        "device": device,
        **extra,
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def evaluation_metrics(
    prefix: str, result: EvaluationResult, *, history_lengths: NDArray[Any] | None = None
) -> dict[str, float]:
    """Flat metrics of one evaluation: means, standard errors, aggregates, activity segments.

    Keys look like ``test_ndcg@100``, ``test_ndcg@100_se``, ``test_coverage@20`` and, with
    ``history_lengths``, ``test_ndcg@100_q1`` ... ``test_ndcg@100_q4`` (quartiles of fold-in
    history length, shortest first) with ``_se`` and ``_n_users``.
    """
    metrics = {f"{prefix}_{name}": value for name, value in result.summary().items()}
    if history_lengths is not None and "ndcg@100" in result.per_user:
        for segment in result.by_segment("ndcg@100", history_lengths, 4):
            q = int(segment["segment"]) + 1
            metrics[f"{prefix}_ndcg@100_q{q}"] = segment["mean"]
            metrics[f"{prefix}_ndcg@100_q{q}_se"] = segment["se"]
            metrics[f"{prefix}_ndcg@100_q{q}_n_users"] = segment["n_users"]
    return metrics


_FIRST_CHECK_WAIT = 5.0  # seconds before a server that did not answer is asked again
_LAST_CHECK_WAIT = 300.0  # the longest such wait (it doubles each time)


class Tracker:
    """MLflow logging for the pipelines, or nothing at all when disabled.

    Args:
        enabled: Log to MLflow.
        tracking_uri: The store; None means ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``.
        experiment: The MLflow experiment's name (created when new).
        artifact_location: Where a new experiment keeps its artifacts (``[mlflow]
            artifact_location``); an existing experiment keeps its own.

    Raises:
        ValueError: ``enabled`` but mlflow is not installed, or the store cannot be opened.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        tracking_uri: str | None = None,
        experiment: str = "recvae",
        artifact_location: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.experiment = experiment
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.errors: list[str] = []
        # Runs skipped because the server was down, still open: their calls are skipped too,
        # or they would go to the enclosing run (or a new one) once the server is back.
        self._skipped_runs = 0
        # While the server does not answer: when to ask it again, and the wait after that.
        self._next_check = 0.0
        self._check_wait = _FIRST_CHECK_WAIT
        if not enabled:
            return
        if not tracking_available():
            raise ValueError(
                "MLflow tracking was asked for but mlflow is not installed: "
                "pip install 'recvae[track]', or pass --no-track"
            )
        from recvae.tracking import configure_tracking, get_or_create_experiment

        try:
            self.tracking_uri = configure_tracking(tracking_uri)
            self.experiment_id = get_or_create_experiment(
                experiment, artifact_location=artifact_location
            )
        except Exception as exc:
            from recvae.tracking import redact_uri

            shown = redact_uri(tracking_uri) if tracking_uri else "(default)"
            raise ValueError(
                f"cannot open the MLflow store {shown}: {exc}; or run without tracking (--no-track)"
            ) from exc
        logger.info("tracking to %s, experiment %r", self.display_uri, experiment)

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker that logs nothing."""
        return cls(enabled=False)

    @property
    def display_uri(self) -> str | None:
        """The tracking URI as messages show it: a password in it masked."""
        if self.tracking_uri is None:
            return None
        from recvae.tracking import redact_uri

        return redact_uri(self.tracking_uri)

    # ------------------------------------------------------------------ guarded calls
    def _guard(self, what: str, call: Callable[[], _T]) -> _T | None:
        if not self.enabled or self._skipped_runs:
            return None
        if self._server_down(what):
            return None
        from pipelines.cli import terminations_deferred

        try:
            with terminations_deferred():  # a SIGTERM waits for the store call to finish
                return call()
        except Exception as exc:  # telemetry must not lose a finished computation
            self._record_failure(what, exc)
            return None

    def _record_failure(self, what: str, exc: Exception) -> None:
        message = f"MLflow: {what} failed: {exc}"
        if not self.errors:
            logger.warning("%s (the run goes on; later failures are logged at debug)", message)
        else:
            logger.debug(message)
        self.errors.append(message)

    def _server_down(self, what: str) -> bool:
        """After a failed call to a tracking server, whether it still does not answer.

        MLflow retries every call to a server that is gone for minutes (about four, by
        default) before it fails: once a call has failed, a later one first asks the server's
        health endpoint (an immediate answer from a host that refuses, at most the check's
        timeout from one that drops packets) and is skipped while nothing answers, so a long
        run is not slowed by minutes per epoch. While it stays down the server is asked again
        only after a wait that doubles from 5 s up to 5 minutes, calls in between skipped; calls
        resume once it answers.
        """
        uri = self.tracking_uri or ""
        if not self.errors or not uri.startswith(("http://", "https://")):
            return False
        now = time.monotonic()
        if now < self._next_check:
            self.errors.append(f"MLflow: {what} skipped: the tracking server did not answer")
            return True
        from recvae.tracking import check_reachable

        try:
            check_reachable(uri)
        except ConnectionError as exc:
            message = f"MLflow: {what} skipped: {exc}"
            logger.debug(message)
            self.errors.append(message)
            self._next_check = time.monotonic() + self._check_wait
            self._check_wait = min(2 * self._check_wait, _LAST_CHECK_WAIT)
            return True
        self._next_check, self._check_wait = 0.0, _FIRST_CHECK_WAIT
        return False

    # ------------------------------------------------------------------ runs
    @contextmanager
    def run(
        self,
        name: str,
        *,
        nested: bool = False,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[str | None]:
        """A run (a child of the active one with ``nested``); yields its id, None if disabled.

        The run's end is a guarded call too: when ending it fails (the tracking server went
        away), the failure is recorded in :attr:`errors` and the run stays ``RUNNING`` in the
        store. A run that cannot start (the server is known to be down, or starting it fails)
        yields None, with the failure in :attr:`errors`, and every call inside its block is
        skipped (none goes to an enclosing run): the block itself runs as without tracking.

        Args:
            name: The run name.
            nested: Start it as a child of the active run.
            run_id: Resume this run instead.
            tags: Tags set at start.
        """
        if not self.enabled:
            yield None
            return
        with ExitStack() as stack:
            active: str | None = None
            if not self._skipped_runs and not self._server_down(f"starting run {name!r}"):
                from pipelines.cli import terminations_deferred
                from recvae.tracking import start_run

                try:
                    with terminations_deferred():  # as for every call to the store
                        active = stack.enter_context(
                            start_run(
                                experiment_id=self.experiment_id,
                                run_name=None if run_id else name,
                                run_id=run_id,
                                nested=nested,
                                tags=tags,
                                on_end_error=lambda exc: self._record_failure(
                                    f"ending run {name!r}", exc
                                ),
                                end_quickly=lambda: self._server_down(f"ending run {name!r}"),
                            )
                        )
                except Exception as exc:  # telemetry must not stop the computation
                    self._record_failure(f"starting run {name!r}", exc)
            if active is not None:
                yield active
                return
            self._skipped_runs += 1
            try:
                yield None
            finally:
                self._skipped_runs -= 1

    def run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a run of this store (False when disabled)."""
        if not self.enabled:
            return False
        from recvae.tracking import run_exists

        return run_exists(run_id)

    def close_stale_run(self, run_id: str) -> None:
        """End ``run_id`` as KILLED if it is still RUNNING: a run whose process was killed
        (``kill -9``, out of memory) never ended itself."""

        def call() -> None:
            from recvae.tracking import end_stale_run

            end_stale_run(run_id)

        self._guard("close_stale_run", call)

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any], *, prefix: str = "") -> None:
        """Log params (nested dicts flatten to dotted keys)."""

        def call() -> None:
            from recvae.tracking import log_params

            log_params(params, prefix=prefix)

        self._guard("log_params", call)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        """Log metrics (``@`` in names becomes ``_at_``; non-finite values are skipped)."""

        def call() -> None:
            from recvae.tracking import log_metrics

            log_metrics(metrics, step=step)

        self._guard("log_metrics", call)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the active run."""

        def call() -> None:
            from recvae.tracking import set_tags

            set_tags(tags)

        self._guard("set_tags", call)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a directory's files as artifacts of the active run."""

        def call() -> None:
            from recvae.tracking import log_artifact

            log_artifact(path, artifact_path)

        self._guard(f"log_artifact {path}", call)

    def epoch_hook(self, also: EpochCallback | None = None) -> EpochCallback | None:
        """The trainer's ``on_epoch`` hook: each epoch's metrics with ``step=epoch``.

        Returns ``also`` unchanged when disabled.
        """
        if not self.enabled:
            return also

        def hook(epoch: int, metrics: dict[str, float]) -> None:
            self.log_metrics(metrics, step=epoch)
            if also is not None:
                also(epoch, metrics)

        return hook

    def log_bundle(
        self,
        bundle_path: str | Path,
        *,
        registered_model: str | None = None,
        alias: str | None = None,
    ) -> dict[str, str] | None:
        """Log a bundle as the run's pyfunc model; register a version and move ``alias`` to it.

        Returns:
            ``{"model_uri": ..., "version": ..., "registered_model": ...}`` (version and name
            only when registered), or None when disabled or logging failed.
        """
        if not self.enabled:
            return None

        def call() -> dict[str, str]:
            from recvae.tracking import log_bundle_model, set_alias

            info = log_bundle_model(bundle_path, registered_model_name=registered_model)
            out = {"model_uri": str(info.model_uri)}
            version = getattr(info, "registered_model_version", None)
            if registered_model and version is not None:
                out.update({"registered_model": registered_model, "version": str(version)})
                if alias:
                    set_alias(registered_model, alias, version)
                    out["alias"] = alias
            return out

        return self._guard("logging the model bundle", call)

    def log_evaluations(
        self,
        validation: EvaluationResult | None,
        test: EvaluationResult | None,
        *,
        test_history_lengths: NDArray[Any] | None = None,
        validation_history_lengths: NDArray[Any] | None = None,
    ) -> None:
        """Final validation and test metrics, standard errors and activity segments."""
        metrics: dict[str, float] = {}
        if validation is not None:
            metrics.update(
                evaluation_metrics(
                    "validation", validation, history_lengths=validation_history_lengths
                )
            )
        if test is not None:
            metrics.update(evaluation_metrics("test", test, history_lengths=test_history_lengths))
        self.log_metrics(metrics)


def add_tracking_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_experiment: str = "[mlflow] experiment of the config, else recvae-<dataset>",
) -> None:
    """Add ``--track/--no-track``, ``--tracking-uri`` and ``--experiment-name`` to a command
    (``default_experiment`` says, in the help, which experiment it logs to without the flag)."""
    group = parser.add_argument_group("MLflow tracking")
    group.add_argument(
        "--track",
        dest="track",
        action="store_true",
        default=None,
        help=f"log to MLflow (the default when mlflow is installed and ${TRACKING_ENV} is not off)",
    )
    group.add_argument("--no-track", dest="track", action="store_false", help="do not log")
    group.add_argument(
        "--tracking-uri",
        help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    group.add_argument(
        "--experiment-name", help=f"MLflow experiment (default: {default_experiment})"
    )


def make_tracker(
    *,
    track: bool | None,
    tracking_uri: str | None,
    experiment: str,
    artifact_location: str | None = None,
) -> Tracker:
    """The tracker a command asked for: ``track`` None means the default (:func:`tracking_default`).

    An explicit ``--tracking-uri`` turns tracking on unless ``--no-track`` was given.

    Raises:
        ValueError: Tracking asked for but impossible (see :class:`Tracker`).
    """
    if track is None:
        track = True if tracking_uri else tracking_default()
    return Tracker(
        enabled=track,
        tracking_uri=tracking_uri,
        experiment=experiment,
        artifact_location=artifact_location,
    )
