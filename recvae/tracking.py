"""MLflow integration: the tracking store, the bundle as a pyfunc model, the registry.

This is the only module of the library that imports mlflow (install the ``track`` extra).
Defaults follow MLflow's own advice now that its file store is deprecated: an embedded sqlite
store in the working directory with an explicit artifact location; any ``MLFLOW_TRACKING_URI``
(a remote server included) wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "configure_tracking",
    "get_or_create_experiment",
    "RecvaePyfuncModel",
    "log_bundle_model",
    "register_model",
    "set_alias",
    "resolve_bundle",
    "BUNDLE_ARTIFACT",
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
    mlflow.set_tracking_uri(uri)
    return uri


def get_or_create_experiment(name: str, *, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it with an explicit artifact location when new.

    With the default sqlite store the artifacts go to ``./mlartifacts/`` (an absolute
    ``file:`` URI), as ``mlflow server`` does by default.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    if artifact_location is None and mlflow.get_tracking_uri().startswith("sqlite:"):
        artifact_location = Path(DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=artifact_location))


class RecvaePyfuncModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """``mlflow.pyfunc`` wrapper of a bundle.

    ``predict`` takes histories (a list of item-id lists, a dict with ``histories``, or a
    DataFrame with a ``history`` column of lists) and returns one record per history with the
    ranked ``item_ids`` and ``scores``. ``params`` may set ``k`` (default 20) and
    ``exclude_seen`` (default true).
    """

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


def log_bundle_model(
    bundle_path: str | Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
) -> Any:
    """Log a bundle as a pyfunc model of the active run (optionally registering a version).

    Returns:
        mlflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``).
    """
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=RecvaePyfuncModel(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_path)},
        registered_model_name=registered_model_name,
        pip_requirements=["recvae", "torch", "numpy", "scipy"],
    )


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
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=None if dst is None else str(dst)
            )
        )
    except Exception as exc:
        raise ValueError(f"cannot resolve model {model_uri!r}: {exc}") from exc
    bundle = local / "artifacts" / BUNDLE_ARTIFACT
    if not (bundle / "meta.json").is_file():
        raise ValueError(f"model {model_uri!r} holds no recvae bundle (looked in {bundle})")
    return bundle
