"""MLflow integration: the tracking store, the bundle as a pyfunc model, the registry.

This is the only module of the library that imports mlflow (install the ``track`` extra).
Defaults follow MLflow's own advice now that its file store is deprecated: an embedded sqlite
store in the working directory with an explicit artifact location; any ``MLFLOW_TRACKING_URI``
(a remote server included) wins.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.entities import RunStatus
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
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
    "redact_uri",
    "run_exists",
    "set_tags",
    "single_attempt",
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


# Absolute paths of the sqlite databases this process has opened through _open_store.
_OPENED_STORES: set[Path] = set()


def _sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (absolute), None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def _open_store() -> None:
    """Create (or migrate) the current sqlite store once per process, one process at a time.

    MLflow builds a sqlite store's schema on first use by running its migrations, with no lock:
    several processes opening the same fresh database at once (three ``recvae train`` started
    together in an empty folder) collide half-way ("duplicate column name: step"). An exclusive
    ``flock`` on a sidecar file ``<database>.lock`` serializes that first initialization; once
    the schema is there, later openers only read the version and pass the lock at once. Other
    stores (a server, another database) are left to MLflow.
    """
    uri = mlflow.get_tracking_uri()
    database = _sqlite_database(uri)
    if database is None or database in _OPENED_STORES:
        return
    with _exclusive_lock(database.with_name(database.name + ".lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # builds the tracking store: its tables
        client.search_registered_models(max_results=1)  # and the registry's
    _OPENED_STORES.add(database)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    Where the lock cannot be taken (Windows, a folder the user may not write) the block runs
    unlocked: MLflow then fails as it would have, with its own message.
    """
    if sys.platform == "win32":
        yield
        return
    import fcntl

    try:
        handle = path.open("a")
    except OSError as exc:
        logger.debug("no lock file %s (%s): opening the store unlocked", path, exc)
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_reachable(uri: str, *, timeout: float = 10.0) -> None:
    """Fail fast when nothing answers at an HTTP tracking server's address.

    MLflow's client retries a refused connection with exponential backoff for minutes before it
    reports anything; one request with a short timeout says at once that no server is there.
    Any HTTP answer (even an error status) counts as reachable: only the network is checked.
    The request goes out as MLflow's own would: through ``requests`` (credentials in the URI,
    proxies and ``REQUESTS_CA_BUNDLE`` apply), with MLflow's TLS settings
    (``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH``,
    ``MLFLOW_TRACKING_CLIENT_CERT_PATH``), so a server MLflow can talk to passes.

    Raises:
        ConnectionError: the connection is refused, times out, the host does not resolve, or
            the TLS handshake fails.
    """
    import requests
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_CLIENT_CERT_PATH,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )

    # As MLflow's MlflowHostCreds.verify: a CA bundle, else verification unless switched off.
    server_cert = MLFLOW_TRACKING_SERVER_CERT_PATH.get()  # type: ignore[no-untyped-call]
    insecure = bool(MLFLOW_TRACKING_INSECURE_TLS.get())  # type: ignore[no-untyped-call]
    verify: bool | str = str(server_cert) if server_cert else not insecure
    client_cert = MLFLOW_TRACKING_CLIENT_CERT_PATH.get()  # type: ignore[no-untyped-call]
    try:
        with requests.get(
            f"{uri.rstrip('/')}/health",
            timeout=timeout,
            verify=verify,
            cert=client_cert,
            allow_redirects=False,
            stream=True,  # only the status line is needed
        ):
            pass
    except (requests.RequestException, OSError) as exc:
        raise ConnectionError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri)} "
            f"({_root_cause(exc)}): start it, or track to a local store (e.g. "
            "sqlite:///mlflow.db)"
        ) from None


def redact_uri(uri: str) -> str:
    """``uri`` with the password of ``user:password@host`` masked, for messages, logs and
    summaries (``http://me:secret@host`` -> ``http://me:***@host``)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", uri)


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a ``requests`` error (refused, timed out, certificate ...)."""
    seen = {id(exc)}
    while True:
        reason = getattr(exc, "reason", None)
        inner = reason if isinstance(reason, BaseException) else exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return str(exc)
        seen.add(id(inner))
        exc = inner


def get_or_create_experiment(name: str, *, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it with an explicit artifact location when new.

    With a sqlite store the artifacts go to ``mlartifacts/`` beside the database file (for the
    default ``sqlite:///mlflow.db``, ``./mlartifacts/``, as ``mlflow server`` does), as an
    absolute ``file:`` URI. A plain path as ``artifact_location`` is relative to the working
    directory of this process, whatever the store: it becomes an absolute ``file:`` URI here,
    because a tracking server would otherwise resolve it against its own working directory
    (where this process, which writes the artifacts, then puts them).
    """
    _open_store()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    uri = mlflow.get_tracking_uri()
    if artifact_location is not None and _is_local_path(artifact_location):
        artifact_location = Path(artifact_location).expanduser().resolve().as_uri()
    if artifact_location is None and uri.startswith("sqlite:"):
        database = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else Path()
        root = database.parent if database.name else Path()
        artifact_location = (root / DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except mlflow.exceptions.MlflowException as exc:
        # Another process created it since the lookup above (parallel runs of a new experiment).
        experiment = client.get_experiment_by_name(name)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
            raise
        return str(experiment.experiment_id)


def _is_local_path(location: str) -> bool:
    """Whether an artifact location is a plain filesystem path (no URI scheme; a Windows drive
    letter is not a scheme)."""
    from urllib.parse import urlparse

    return len(urlparse(location).scheme) <= 1


class RecvaePyfuncModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """``mlflow.pyfunc`` wrapper of a bundle.

    ``predict`` takes histories (a list of item-id lists, a list of ``{"history": [...]}``
    records, a dict with ``histories``, a DataFrame with a ``history`` column of lists, or the
    numpy arrays that MLflow's scoring server makes of these) and returns one record per history
    with the ranked ``item_ids``, their ``scores`` and ``fallback`` (``"popularity"`` for a
    history with no known item, which gets the most popular training items, as from the HTTP
    API; else None). ``params`` may set ``k`` (default 20) and
    ``exclude_seen`` (default true). An input in none of these forms raises a ``ValueError``
    that is also an ``MlflowException``, so that ``mlflow models serve`` answers it with a 400
    carrying the message.
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
        try:
            histories = _histories_from_input(model_input)
            result = self.recommender.recommend_histories(histories, k, exclude_seen=exclude_seen)
        except ValueError as exc:  # the request's fault: a 400 from the scoring server
            raise _PredictInputError(str(exc)) from exc
        records = []
        for history, row in zip(histories, result.to_lists(), strict=True):
            # As the HTTP API and `recvae recommend`: a history with no known item gets the
            # most popular training items, flagged (their scores are popularity shares).
            fallback = None
            if not len(self.recommender.vocab.item_indices(history)[0]):
                fallback, row = "popularity", self.recommender.popular_items(k)
            records.append(
                {
                    "item_ids": [i for i, _ in row],
                    "scores": [s for _, s in row],
                    "fallback": fallback,
                }
            )
        return records


class _PredictInputError(mlflow.exceptions.MlflowException, ValueError):
    """A bad predict input or param: a ``ValueError`` in-process, a 400 from the scoring server.

    MLflow's scoring server answers any other exception of ``predict`` with a generic
    "unexpected error while evaluating the model" and keeps the message in a stack trace.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


_INPUT_FORMS = (
    "a list of item-id lists, one list of item ids, a list of {'history': [...]} records, a 2-D "
    "array of item ids, a 1-D object array of item-id lists, {'histories': ...} holding any of "
    "these, or a DataFrame with a 'history' column"
)


def _histories_from_input(model_input: Any) -> list[list[Any]]:
    """The histories in a pyfunc input, in every form that MLflow may hand to ``predict``.

    In-process callers pass lists, dicts and DataFrames; MLflow's scoring server parses the JSON
    ``inputs``/``instances`` into numpy arrays first (``[[1, 2, 3]]`` becomes a 2-D int array,
    ``{"histories": [[1, 2, 3]]}`` a dict holding one, and ``[{"history": [1, 2, 3]}, ...]`` a
    list of dicts each holding a 1-D array), so both kinds are accepted. Item ids come back as
    Python scalars.

    Raises:
        ValueError: any other input, named with its type.
    """
    if isinstance(model_input, Mapping):
        key = next((name for name in ("histories", "history") if name in model_input), None)
        if key is None:
            raise ValueError(
                f"predict got a dict without a 'histories' key (keys: "
                f"{', '.join(map(repr, model_input)) or 'none'}); it expects {_INPUT_FORMS}"
            )
        model_input = model_input[key]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "history" if "history" in model_input.columns else model_input.columns[0]
        return [_history(value) for value in model_input[column].tolist()]
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 2:
            return [_history(row) for row in model_input.tolist()]
        if model_input.ndim == 1:
            return _histories_from_sequence(list(model_input))
        raise ValueError(f"predict got a {model_input.ndim}-D array; it expects {_INPUT_FORMS}")
    if isinstance(model_input, list | tuple):
        return _histories_from_sequence(model_input)
    raise ValueError(f"predict got {type(model_input).__name__}; it expects {_INPUT_FORMS}")


def _is_history(value: Any) -> bool:
    return isinstance(value, list | tuple | np.ndarray)


def _histories_from_sequence(values: Sequence[Any]) -> list[list[Any]]:
    """A sequence of histories, of ``{"history": [...]}`` records, or the items of one history
    (never a mix of these)."""
    records = [isinstance(value, Mapping) for value in values]
    if values and all(records):
        return [_history(_record_history(value)) for value in values]
    if any(records):
        raise ValueError(
            "predict got a sequence that mixes {'history': [...]} records with other values; "
            "it expects " + _INPUT_FORMS
        )
    nested = [_is_history(value) for value in values]
    if all(nested):
        return [_history(value) for value in values]
    if not any(nested):
        return [_history(values)]
    raise ValueError(
        "predict got a sequence that mixes item-id lists and single item ids; it expects "
        + _INPUT_FORMS
    )


def _record_history(record: Mapping[str, Any]) -> Any:
    """The history of one ``{"history": [...]}`` record (a row of ``dataframe_records``)."""
    if "history" not in record:
        raise ValueError(
            f"predict got a record without a 'history' key (keys: "
            f"{', '.join(map(repr, record)) or 'none'}); it expects {_INPUT_FORMS}"
        )
    return record["history"]


def _history(value: Any) -> list[Any]:
    """One history as a list of Python item ids."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(
                f"a history must be a 1-D list of item ids, got a {value.ndim}-D array"
            )
        value = value.tolist()
    elif not isinstance(value, list | tuple):
        raise ValueError(
            f"a history must be a list of item ids, got {type(value).__name__}: {value!r:.80}"
        )
    if any(_is_history(item) or isinstance(item, Mapping) for item in value):
        raise ValueError(f"a history must be a flat list of item ids, got {value!r:.80}")
    return [item.item() if isinstance(item, np.generic) else item for item in value]


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
    #
    # Without an input schema MLflow's scoring server turns the JSON "inputs" (a list, or each
    # value of a dict) into one numpy array before predict is called, so histories of different
    # lengths, {"inputs": [[1, 2, 3], [4]]}, are refused there ("inhomogeneous shape", a 400);
    # records, {"inputs": [{"history": [1, 2, 3]}, {"history": [4]}]}, and "dataframe_records"
    # get through. No input schema lifts that without losing other forms: an object tensor,
    # Tensor('object', (-1,)), refuses in-process lists and dicts, {"inputs": {"histories": ...}}
    # and "dataframe_records"; a column, ColSpec(AnyType(), "history"), refuses in-process lists,
    # arrays and dicts and {"inputs": {"histories": ...}} ("missing inputs ['history']").
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
    (bool, default true), so ``model.predict(histories, params={"k": 5})`` is honored. It
    declares no input schema (see :class:`RecvaePyfuncModel` for the accepted inputs); through
    ``mlflow models serve``, histories of different lengths go as records,
    ``{"inputs": [{"history": [1, 2]}, {"history": [3]}]}`` or ``{"dataframe_records": ...}``,
    since MLflow refuses ragged lists in ``inputs`` before the model sees them.

    The model is self-contained: it carries the ``recvae`` package's code, which MLflow puts on
    ``sys.path`` when it loads the model (this package is not published on PyPI), and pins what
    loading a bundle and predicting import (torch, numpy, scipy) to the versions installed here,
    so ``mlflow models serve`` can build its own environment.

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
        package = _copy_package_code(Path(tmp) / "code")
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
                code_paths=[str(package)],
                pip_requirements=_pinned_requirements(),
            )
    for warning in caught:
        if not _NOISE.search(str(warning.message)):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return info


# What loading a bundle and predicting import besides mlflow (which MLflow pins itself); polars
# is not among them: it stops at Interactions.from_polars.
_MODEL_REQUIREMENTS = ("torch", "numpy", "scipy")


def _pinned_requirements() -> list[str]:
    """``name==version`` of each model requirement as installed here.

    A local version label (torch's ``2.13.0+cpu``) is dropped: no index but the vendor's own
    serves it, and the plain release is the same code.
    """
    return [
        f"{name}=={importlib.metadata.version(name).split('+', 1)[0]}"
        for name in _MODEL_REQUIREMENTS
    ]


def _copy_package_code(folder: Path) -> Path:
    """Copy the ``recvae`` package's Python files into ``folder``; returns the copy's path."""
    package = Path(__file__).resolve().parent
    target = folder / package.name
    shutil.copytree(package, target, ignore=_not_code)
    return target


def _not_code(folder: str, names: list[str]) -> set[str]:
    # Bytecode and data files (the bundled sample dataset) have no place in a model's code.
    return {
        name
        for name in names
        if name == "__pycache__"
        or (not name.endswith((".py", ".typed")) and Path(folder, name).is_file())
    }


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
    _open_store()
    version = mlflow.register_model(model_uri, name)
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``name@alias`` at ``version`` (an atomic move of the alias)."""
    _open_store()
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def resolve_bundle(model_uri: str, dst: str | Path | None = None) -> Path:
    """Download a logged model (e.g. ``models:/NAME@ALIAS``) and return its bundle directory.

    Raises:
        ValueError: the URI does not resolve to a recvae model.
    """
    try:
        _open_store()
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
        _open_store()
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
    on_end_error: Callable[[Exception], None] | None = None,
    end_quickly: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Start (or resume, with ``run_id``) a run; a nested run becomes a child of the active one.

    The run ends when the block ends: FINISHED, or KILLED when the block raises
    ``KeyboardInterrupt`` (Ctrl-C), or FAILED when it raises anything else. Ending it is a call
    to the store, which may fail (a tracking server that went away during the block): the
    block's own exception is never replaced by that failure, which is then logged.

    Args:
        experiment_id: The experiment (from :func:`get_or_create_experiment`).
        run_name: A readable name.
        run_id: Resume this run instead of starting a new one.
        nested: Make the run a child of the active run.
        tags: Tags set at start.
        on_end_error: Called with the error when ending the run fails, instead of raising it
            (the run then stays ``RUNNING`` in the store; it is no longer active here).
        end_quickly: Asked as the run ends: true makes ending it a single attempt
            (:func:`single_attempt`; the tracking server is known not to answer).

    Yields:
        The run id.

    Raises:
        mlflow.exceptions.MlflowException: Ending the run failed after a block that did not
            raise, and no ``on_end_error`` was given.
    """
    _open_store()
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        run_id=run_id,
        nested=nested,
        tags=dict(tags) if tags else None,
    )
    active_id = str(run.info.run_id)
    status = RunStatus.FINISHED
    try:
        yield active_id
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        _end_run(active_id, status, on_end_error, end_quickly)


@contextmanager
def single_attempt(timeout: float = 5.0) -> Iterator[None]:
    """MLflow's HTTP calls in the block make one attempt of at most ``timeout`` seconds, with no
    retries: for a tracking server known not to answer, where a call only has to fail (MLflow's
    default retries take about four minutes). The process's settings are restored after."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end_run(
    run_id: str,
    status: int,
    on_end_error: Callable[[Exception], None] | None,
    end_quickly: Callable[[], bool] | None = None,
) -> None:
    """End ``run_id`` with ``status`` if it is still the active run (the block may have ended it).

    MLflow takes the run off its active stack before it calls the store, so a failed call
    leaves no active run behind; with ``end_quickly()`` true that call is a single attempt.
    """
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        with single_attempt() if end_quickly is not None and end_quickly() else nullcontext():
            mlflow.end_run(RunStatus.to_string(status))
    except Exception as exc:
        if on_end_error is not None:
            on_end_error(exc)
        elif status != RunStatus.FINISHED:  # the block raised: its exception goes on
            logger.warning(
                "could not end MLflow run %s as %s (it stays RUNNING in the store): %s",
                run_id,
                RunStatus.to_string(status),
                exc,
            )
        else:
            raise


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


def end_stale_run(run_id: str, status: str = "KILLED") -> None:
    """End ``run_id`` with ``status`` if it is still RUNNING: the run of a process that was
    killed (``kill -9``, out of memory) never ended itself."""
    _open_store()
    client = MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def run_exists(run_id: str) -> bool:
    """Whether the store holds a run with this id."""
    _open_store()
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
    client = MlflowClient()  # an existing store only (recvae runs checks): no _open_store
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
