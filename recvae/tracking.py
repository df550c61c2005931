"""MLflow integration: the tracking store, the bundle as a pyfunc model, the registry.

This is the only module of the library that imports mlflow (install the ``track`` extra).
Defaults follow MLflow's own advice now that its file store is deprecated: an embedded sqlite
store in the working directory with an explicit artifact location; any ``MLFLOW_TRACKING_URI``
(a remote server included) wins.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import ParamSchema, ParamSpec

__all__ = [
    "DEFAULT_TRACKING_URI",
    "configure_tracking",
    "check_reachable",
    "get_or_create_experiment",
    "RecvaePyfuncModel",
    "log_bundle_model",
    "register_model",
    "set_alias",
    "resolve_bundle",
    "BUNDLE_ARTIFACT",
    "PREDICT_PARAMS",
    "RunSummary",
    "alias_model_version",
    "epoch_logger",
    "log_artifact",
    "log_metrics",
    "log_params",
    "metric_key",
    "recent_runs",
    "run_exists",
    "set_tags",
    "start_run",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlartifacts"
BUNDLE_ARTIFACT = "bundle"  # name of the bundle inside a logged pyfunc model's artifacts


def configure_tracking(tracking_uri: str | None = None) -> str:
    """Point mlflow at ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db.

    Returns:
        The tracking URI in use.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_reachable(uri: str, *, timeout: float = 10.0) -> None:
    """Fail fast when nothing answers at an HTTP tracking server's address.

    MLflow's client retries a refused connection with exponential backoff for minutes before it
    reports anything; one request with a short timeout says at once that no server is there.
    Any HTTP answer (even an error status) counts as reachable: only the network is checked.

    Raises:
        ConnectionError: the connection is refused, times out, or the host does not resolve.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # something answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}): start it, or track "
            "to a local store (e.g. sqlite:///mlflow.db), or turn tracking off"
        ) from None


def get_or_create_experiment(name: str, *, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it with an explicit artifact location when new.

    With a sqlite store the artifacts go to ``mlartifacts/`` beside the database file (for the
    default ``sqlite:///mlflow.db``, ``./mlartifacts/``, as ``mlflow server`` does), as an
    absolute ``file:`` URI.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    uri = mlflow.get_tracking_uri()
    if artifact_location is None and uri.startswith("sqlite:"):
        database = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else Path()
        root = database.parent if database.name else Path()
        artifact_location = (root / DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=artifact_location))


class RecvaePyfuncModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """``mlflow.pyfunc`` wrapper of a bundle.

    ``predict`` takes histories (a list of item-id lists, a dict with ``histories``, or a
    DataFrame with a ``history`` column of lists) and returns one record per history with the
    ranked ``item_ids`` and ``scores``. ``params`` may set ``k`` (default 20) and
    ``exclude_seen`` (default true).
    """

    # predict accepts several input shapes and checks them itself; MLflow's type-hint based
    # validation (which cannot express that) is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from recvae.recommender import Recommender

        self.recommender = Recommender.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        k = int(params.get("k", 20))
        exclude_seen = bool(params.get("exclude_seen", True))
        histories = _histories_from_input(model_input)
        result = self.recommender.recommend_histories(histories, k, exclude_seen=exclude_seen)
        return [
            {"item_ids": [i for i, _ in row], "scores": [s for _, s in row]}
            for row in result.to_lists()
        ]


def _histories_from_input(model_input: Any) -> list[list[Any]]:
    if isinstance(model_input, dict):
        model_input = model_input.get("histories", model_input.get("history"))
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "history" if "history" in model_input.columns else model_input.columns[0]
        return [list(v) for v in model_input[column].tolist()]
    if isinstance(model_input, list | tuple):
        if model_input and not isinstance(model_input[0], list | tuple):
            return [list(model_input)]
        return [list(h) for h in model_input]
    raise ValueError(
        "predict expects histories: a list of item-id lists, {'histories': [...]}, or a "
        "DataFrame with a 'history' column"
    )


PREDICT_PARAMS: dict[str, Any] = {"k": 20, "exclude_seen": True}
"""The inference params of the pyfunc model and their defaults (its signature's params schema)."""

# Logged "from code": MLflow stores this small script instead of a pickled Python object, in
# keeping with the bundle's no-pickle rule; loading the model runs it.
_PYFUNC_CODE = """\
from mlflow.models import set_model

from recvae.tracking import RecvaePyfuncModel

set_model(RecvaePyfuncModel())
"""


def _pyfunc_signature() -> ModelSignature:
    # No input schema: predict accepts several shapes (a list of item-id lists, a dict, a
    # DataFrame), and item ids may be ints or strings. The params schema makes MLflow pass
    # ``params={"k": 5}`` through (without it, MLflow warns and drops them).
    return ModelSignature(
        inputs=None,
        params=ParamSchema(
            [
                ParamSpec("k", DataType.long, PREDICT_PARAMS["k"]),
                ParamSpec("exclude_seen", DataType.boolean, PREDICT_PARAMS["exclude_seen"]),
            ]
        ),
    )


def log_bundle_model(
    bundle_path: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
) -> Any:
    """Log a bundle as a pyfunc model of the active run (optionally registering a version).

    The model's signature declares the params ``k`` (int, default 20) and ``exclude_seen``
    (bool, default true), so ``model.predict(histories, params={"k": 5})`` is honored.

    Args:
        bundle_path: A bundle directory written by ``Recommender.save``.
        name: The model's name within the run.
        registered_model_name: When given, also register a new version under this name.

    Returns:
        mlflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``).

    Raises:
        ValueError: ``bundle_path`` is not a bundle.
    """
    bundle = Path(bundle_path)
    if not (bundle / "meta.json").is_file():
        raise ValueError(f"{bundle} is not a recvae bundle (meta.json is missing)")
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "recvae_pyfunc.py"
        code.write_text(_PYFUNC_CODE)
        # MLflow resets its warning filters inside log_model, so its advice is recorded here
        # and only the warnings that are not noise for this model are passed on.
        with warnings.catch_warnings(record=True) as caught, _no_progress_bars():
            warnings.simplefilter("always")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={BUNDLE_ARTIFACT: str(bundle)},
                signature=_pyfunc_signature(),
                registered_model_name=registered_model_name,
                pip_requirements=["recvae", "torch", "numpy", "scipy"],
            )
    for warning in caught:
        if not _NOISE.search(str(warning.message)):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return info


# The model takes free-form histories, so MLflow's advice on type hints and input examples does
# not apply to it.
_NOISE = re.compile(r"type hint|input example|input_example")


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow's per-file download bars off while a model is logged or resolved."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def register_model(model_uri: str, name: str) -> str:
    """Register ``model_uri`` under ``name``; returns the new version number."""
    version = mlflow.register_model(model_uri, name)
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``name@alias`` at ``version`` (an atomic move of the alias)."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def resolve_bundle(model_uri: str, dst: str | Path | None = None) -> Path:
    """Download a logged model (e.g. ``models:/NAME@ALIAS``) and return its bundle directory.

    Raises:
        ValueError: the URI does not resolve to a recvae model.
    """
    try:
        with _no_progress_bars():
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=None if dst is None else str(dst)
                )
            )
    except Exception as exc:
        raise ValueError(f"cannot resolve model {model_uri!r}: {exc}") from exc
    bundle = local / _bundle_path_in_model(local)
    if not (bundle / "meta.json").is_file():
        raise ValueError(f"model {model_uri!r} holds no recvae bundle (looked in {bundle})")
    return bundle


def _bundle_path_in_model(model_dir: Path) -> str:
    """Where a logged model keeps its bundle: MLflow copies the bundle directory under its own
    name (``artifacts/<name>``) and records that path in ``MLmodel``."""
    try:
        flavor = mlflow.models.Model.load(str(model_dir / "MLmodel")).flavors["python_function"]
        return str(flavor["artifacts"][BUNDLE_ARTIFACT]["path"])
    except Exception:  # not a pyfunc model of ours: fall back to the conventional place
        return f"artifacts/{BUNDLE_ARTIFACT}"


def alias_model_version(name: str, alias: str) -> str | None:
    """The version that ``name@alias`` points at, or None when the alias is not set.

    Raises:
        ValueError: The registry cannot be reached.
    """
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise ValueError(f"cannot read alias {name}@{alias}: {exc}") from exc


# ---------------------------------------------------------------------------- run logging
_METRIC_NAME_BAD = re.compile(r"[^/\w.\- ]")
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_MAX_BATCH = 100  # MLflow's limit on params per batch


def metric_key(name: str) -> str:
    """An MLflow-safe metric or param key: ``"ndcg@100"`` becomes ``"ndcg_at_100"``.

    MLflow accepts only letters, digits and ``_ - . / :`` and spaces in names.
    """
    return _METRIC_NAME_BAD.sub("_", name.replace("@", "_at_"))


@contextmanager
def start_run(
    *,
    experiment_id: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Start (or resume, with ``run_id``) a run; a nested run becomes a child of the active one.

    The run ends when the block ends: FINISHED, or FAILED (KILLED on Ctrl-C) when it raises.

    Args:
        experiment_id: The experiment (from :func:`get_or_create_experiment`).
        run_name: A readable name.
        run_id: Resume this run instead of starting a new one.
        nested: Make the run a child of the active run.
        tags: Tags set at start.

    Yields:
        The run id.
    """
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        run_id=run_id,
        nested=nested,
        tags=dict(tags) if tags else None,
    ) as run:
        yield str(run.info.run_id)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
            continue
        if isinstance(value, list | tuple):
            text = json.dumps(list(value), default=str)
        elif value is None:
            text = "None"
        else:
            text = str(value)
        if len(text) > _MAX_PARAM_LENGTH:
            text = text[: _MAX_PARAM_LENGTH - 3] + "..."
        flat[metric_key(name)] = text
    return flat


def run_exists(run_id: str) -> bool:
    """Whether the store holds a run with this id."""
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def log_params(params: Mapping[str, Any], *, prefix: str = "") -> None:
    """Log params on the active run; nested dicts flatten to ``a.b`` keys, lists to JSON.

    Args:
        params: Param values by name (a config's ``to_dict()``, the job's sections, ...).
        prefix: Put before every key (e.g. ``"model."``).
    """
    flat = _flatten(params, prefix)
    items = sorted(flat.items())
    for start in range(0, len(items), _MAX_BATCH):
        mlflow.log_params(dict(items[start : start + _MAX_BATCH]))


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log metrics on the active run; keys are made MLflow-safe, non-finite values skipped.

    A metric such as NDCG of a segment without users is NaN: it is left out, not logged as NaN.

    Args:
        metrics: Values by name (``"val_ndcg@100"`` is logged as ``"val_ndcg_at_100"``).
        step: The step (the epoch for per-epoch metrics).
    """
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            clean[metric_key(name)] = number
        else:
            logger.debug("metric %s=%s not logged (not finite)", name, value)
    if clean:
        mlflow.log_metrics(clean, step=step)


def epoch_logger(
    *, prefix: str = "", also: Callable[[int, dict[str, float]], None] | None = None
) -> Callable[[int, dict[str, float]], None]:
    """A trainer ``on_epoch`` hook that logs each epoch's metrics with ``step=epoch``.

    The trainer reports ``loss``, ``nll`` (reconstruction), ``kl``, ``beta``, timing and the
    validation metrics (``val_ndcg@100``, ``val_recall@20``, ``val_recall@50``). They go to the
    run that is active when the hook is called.

    Args:
        prefix: Put before every metric name.
        also: Another hook to call after logging (hooks chain).

    Returns:
        The hook ``(epoch, metrics) -> None``.
    """

    def hook(epoch: int, metrics: dict[str, float]) -> None:
        log_metrics({f"{prefix}{name}": value for name, value in metrics.items()}, step=epoch)
        if also is not None:
            also(epoch, metrics)

    return hook


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (values become strings; None values are skipped)."""
    mlflow.set_tags({key: str(value) for key, value in tags.items() if value is not None})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or a directory's files, as artifacts of the active run.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    local = Path(path)
    if not local.exists():
        raise FileNotFoundError(f"cannot log artifact {local}: no such file or directory")
    if local.is_dir():
        mlflow.log_artifacts(str(local), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(local), artifact_path=artifact_path)


@dataclass(frozen=True)
class RunSummary:
    """One run as ``recvae runs`` lists it.

    Attributes:
        run_id: MLflow's run id.
        experiment: The experiment's name.
        name: The run name.
        status: ``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``.
        start_time: Start, in milliseconds since the epoch.
        end_time: End in milliseconds, None while running.
        parent_run_id: The parent's id for a child run.
        metrics: Latest value of every metric.
        params: Every param.
        tags: Tags that do not start with ``mlflow.``.
    """

    run_id: str
    experiment: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    parent_run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def recent_runs(
    *, experiment_names: Sequence[str] | None = None, limit: int = 20
) -> list[RunSummary]:
    """The most recent runs in the store, newest first.

    Args:
        experiment_names: Only these experiments; all of them when None.
        limit: At most this many runs (>= 1).

    Returns:
        One :class:`RunSummary` per run.

    Raises:
        ValueError: ``limit < 1``, or an experiment name that does not exist.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    client = MlflowClient()
    if experiment_names:
        experiments = []
        for name in experiment_names:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                known = sorted(e.name for e in client.search_experiments())
                raise ValueError(
                    f"no experiment named {name!r} in {mlflow.get_tracking_uri()} "
                    f"(experiments: {', '.join(known) or 'none'})"
                )
            experiments.append(experiment)
    else:
        experiments = list(client.search_experiments())
    if not experiments:
        return []
    names = {str(e.experiment_id): str(e.name) for e in experiments}
    runs = client.search_runs(
        experiment_ids=list(names),
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    summaries = []
    for run in runs:
        tags = dict(run.data.tags)
        summaries.append(
            RunSummary(
                run_id=str(run.info.run_id),
                experiment=names.get(str(run.info.experiment_id), str(run.info.experiment_id)),
                name=str(run.info.run_name or ""),
                status=str(run.info.status),
                start_time=int(run.info.start_time or 0),
                end_time=None if run.info.end_time is None else int(run.info.end_time),
                parent_run_id=tags.get("mlflow.parentRunId"),
                metrics=dict(run.data.metrics),
                params=dict(run.data.params),
                tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")},
            )
        )
    return summaries
