"""The MLflow side of the nightly job: the champion, promotion, rollback and the run record.

Bundles are logged and resolved through ``recvae.tracking``; the registry operations that
module does not offer (reading an alias, version tags, searching versions) use mlflow's
``MlflowClient`` directly.

Every version this job registers carries the tags ``nightly_date``, ``nightly_run_id``,
``nightly_bundle_version`` (the bundle's content id), ``nightly_ndcg`` and
``nightly_previous_champion`` (the version the alias pointed at before, empty for the first).
``rollback`` follows that last tag.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.nightly.settings import MlflowSettings

__all__ = [
    "ChampionRef",
    "RollbackResult",
    "current_champion",
    "download_champion",
    "find_version",
    "get_version",
    "open_tracking",
    "promote",
    "restore_alias",
    "rollback",
]

logger = logging.getLogger(__name__)

TAG_DATE = "nightly_date"
TAG_RUN = "nightly_run_id"
TAG_BUNDLE = "nightly_bundle_version"
TAG_NDCG = "nightly_ndcg"
TAG_PREVIOUS = "nightly_previous_champion"
TAG_ROLLED_BACK = "nightly_rolled_back_at"


@dataclass(frozen=True)
class ChampionRef:
    """The registry version an alias points at."""

    name: str
    alias: str
    version: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RollbackResult:
    """Where the alias was and where it points now; ``tag_error`` says why the version rolled
    back from could not be tagged (the alias moved all the same)."""

    name: str
    alias: str
    from_version: str
    to_version: str
    tag_error: str | None = None


def open_tracking(settings: MlflowSettings) -> tuple[str, str]:
    """Point mlflow at the configured store; return ``(tracking_uri, experiment_id)``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from recvae.tracking import configure_tracking, get_or_create_experiment

    uri = configure_tracking(settings.tracking_uri)
    experiment_id = get_or_create_experiment(
        settings.experiment, artifact_location=settings.artifact_location
    )
    return uri, experiment_id


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def current_champion(settings: MlflowSettings) -> ChampionRef | None:
    """The version behind ``NAME@ALIAS``, or None when the model or alias does not exist.

    Raises:
        mlflow.exceptions.MlflowException: the registry cannot be read.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        model = client.get_registered_model(settings.registered_model)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(settings.alias)
    if version is None:
        return None
    mv = client.get_model_version(settings.registered_model, str(version))
    return ChampionRef(settings.registered_model, settings.alias, str(version), dict(mv.tags))


def get_version(settings: MlflowSettings, version: str) -> ChampionRef:
    """A registered version as a :class:`ChampionRef` (whether or not the alias points at it)."""
    mv = _client().get_model_version(settings.registered_model, version)
    return ChampionRef(settings.registered_model, settings.alias, str(version), dict(mv.tags))


def download_champion(ref: ChampionRef, dst: Path) -> Path:
    """Download the champion's bundle into ``dst`` (replaced) and return the bundle directory.

    Raises:
        ValueError: the version holds no recvae bundle.
    """
    import shutil

    from recvae.tracking import resolve_bundle

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    return resolve_bundle(ref.uri, dst)


def find_version(settings: MlflowSettings, *, day: str, bundle_version: str) -> str | None:
    """A version already registered for this date and bundle (a rerun after a late crash)."""
    client = _client()
    query = (
        f"name = '{settings.registered_model}' and tags.{TAG_DATE} = '{day}' "
        f"and tags.{TAG_BUNDLE} = '{bundle_version}'"
    )
    found = client.search_model_versions(query)
    if not found:
        return None
    return str(max(int(v.version) for v in found))


def promote(
    settings: MlflowSettings,
    bundle: Path,
    *,
    day: str,
    run_id: str,
    bundle_version: str,
    ndcg: float,
    previous: str | None,
) -> str:
    """Register the bundle (logged under the active run) and move the alias to it.

    A version already registered for this date and bundle is reused, so a rerun after a crash
    between registration and the alias move does not register twice.

    Returns:
        The new champion version.
    """
    import mlflow

    from recvae.tracking import log_bundle_model, set_alias

    client = _client()
    tags = {
        TAG_DATE: day,
        TAG_RUN: run_id,
        TAG_BUNDLE: bundle_version,
        TAG_NDCG: f"{ndcg:.6f}",
        TAG_PREVIOUS: previous or "",
    }
    version = find_version(settings, day=day, bundle_version=bundle_version)
    if version is None:
        info = log_bundle_model(bundle)
        # Registered with its tags in one call: a crash can never leave an untagged version
        # that find_version would miss (and a rerun register twice).
        mv = mlflow.register_model(info.model_uri, settings.registered_model, tags=tags)
        version = str(mv.version)
    else:
        recorded = client.get_model_version(settings.registered_model, version).tags
        if previous == version:
            # A rerun after this version became champion: keep the previous champion it
            # recorded, so that rollback can still follow it.
            tags[TAG_PREVIOUS] = recorded.get(TAG_PREVIOUS, "")
        for key, value in tags.items():
            if recorded.get(key) != value:
                client.set_model_version_tag(settings.registered_model, version, key, value)
    set_alias(settings.registered_model, settings.alias, version)
    logger.info("%s@%s -> version %s", settings.registered_model, settings.alias, version)
    return version


def restore_alias(settings: MlflowSettings, version: str | None) -> None:
    """Point the alias at ``version`` again, or remove it when there was none."""
    from recvae.tracking import set_alias

    if version is None:
        _client().delete_registered_model_alias(settings.registered_model, settings.alias)
    else:
        set_alias(settings.registered_model, settings.alias, version)
    logger.warning("%s@%s restored to %s", settings.registered_model, settings.alias, version)


def rollback(settings: MlflowSettings, *, to_version: str | None = None) -> RollbackResult:
    """Move the alias back to the previous champion (or to ``to_version``).

    The current version is tagged ``nightly_rolled_back_at`` once the alias has moved; a failure
    to tag it (the registry went away in between) is logged and returned as ``tag_error``, not
    raised: the rollback happened, and a rollback reported as failed would be retried and go
    back one version further.

    Raises:
        ValueError: there is no champion, no previous champion is recorded, or the target
            version does not exist.
    """
    from mlflow.exceptions import MlflowException

    from recvae.tracking import set_alias

    ref = current_champion(settings)
    name, alias = settings.registered_model, settings.alias
    if ref is None:
        raise ValueError(f"no champion to roll back: {name}@{alias} does not exist")
    target = to_version or ref.tags.get(TAG_PREVIOUS) or ""
    if not target:
        raise ValueError(
            f"{name}@{alias} is version {ref.version}, which records no previous champion; "
            "pass --to VERSION to choose one"
        )
    if target == ref.version:
        raise ValueError(f"{name}@{alias} already points at version {target}")
    client = _client()
    try:
        client.get_model_version(name, target)
    except MlflowException as exc:
        raise ValueError(f"cannot roll back to {name} version {target}: {exc.message}") from exc
    set_alias(name, alias, target)
    logger.warning("rolled back %s@%s from version %s to %s", name, alias, ref.version, target)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        client.set_model_version_tag(name, ref.version, TAG_ROLLED_BACK, stamp)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        tag_error = f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
        logger.warning("could not tag version %s %s: %s", ref.version, TAG_ROLLED_BACK, tag_error)
        return RollbackResult(name, alias, ref.version, target, tag_error)
    return RollbackResult(name, alias, ref.version, target)
