"""Settings of the nightly retraining job, read from a TOML file such as ``nightly.toml``.

All job settings live under ``[nightly]`` and its sub-tables, so the file also passes the shared
section check of :func:`pipelines.settings.job_from_dict`::

    [nightly]             lake, state_dir, window_days, recent_days
    [nightly.columns]     column names, id types, rating threshold, timestamp unit
    [nightly.validation]  thresholds of the checks on new partitions
    [nightly.split]       the persistent evaluation users and the held-out split
    [nightly.training]    warm start, training-user sample, anomaly exclusion
    [nightly.gate]        promotion rule and sanity checks
    [nightly.deploy]      the serving layer to notify after a promotion or rollback
    [nightly.lock]        lock age after which a holder is reported as probably hung
    [model]               the model config (``MultVAEConfig``/``MultDAEConfig`` fields)
    [run]                 ``RunOptions`` fields (device, num_threads, progress)
    [mlflow]              tracking URI, experiment, registered model, alias

Unknown keys are rejected and every bad value raises a ``ValueError`` that names the key.
This module imports only the standard library (``recvae.config`` is imported when the model
config is built).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings import check_known_keys, table

if TYPE_CHECKING:
    from recvae.config import ModelConfig, RunOptions

__all__ = [
    "DeploySettings",
    "GateSettings",
    "LakeSettings",
    "LockSettings",
    "MlflowSettings",
    "NightlySettings",
    "SplitSettings",
    "TrainingSettings",
    "ValidationSettings",
    "load_settings",
    "settings_from_dict",
]

_ID_TYPES = ("int", "str")
_TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _fail(where: str, key: str, message: str) -> None:
    raise ValueError(f"invalid config key [{where}] {key}: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LakeSettings:
    """How to read the partition files: column names and types."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    timestamp_col: str = "timestamp"
    rating_col: str | None = "rating"  # None for implicit logs: every row is a positive
    threshold: float | None = 3.5  # rating (or weight) > threshold is a positive
    user_id_type: str = "int"  # "int" or "str": how ids are parsed
    item_id_type: str = "int"
    timestamp_unit: str = "s"  # unit of integer timestamps: s, ms, us or ns
    require_success_marker: bool = False  # a partition counts only once it holds _SUCCESS

    def __post_init__(self) -> None:
        where = "nightly.columns"
        for key in ("user_col", "item_col", "timestamp_col"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                _fail(where, key, "must be a non-empty column name")
        if self.rating_col is not None and (
            not isinstance(self.rating_col, str) or not self.rating_col
        ):
            _fail(where, "rating_col", "must be a column name or absent")
        names = [self.user_col, self.item_col, self.timestamp_col, self.rating_col]
        present = [n for n in names if n is not None]
        if len(set(present)) != len(present):
            _fail(where, "user_col/item_col/timestamp_col/rating_col", "must be distinct columns")
        if self.threshold is not None and not _number(self.threshold):
            _fail(where, "threshold", "must be a number or absent")
        for key in ("user_id_type", "item_id_type"):
            if getattr(self, key) not in _ID_TYPES:
                _fail(where, key, f"must be one of {', '.join(_ID_TYPES)}")
        if not isinstance(self.timestamp_unit, str) or self.timestamp_unit not in _TIMESTAMP_UNITS:
            _fail(where, "timestamp_unit", f"must be one of {', '.join(_TIMESTAMP_UNITS)}")
        if not isinstance(self.require_success_marker, bool):
            _fail(where, "require_success_marker", "must be true or false")

    @property
    def timestamp_divisor(self) -> int:
        """Integer timestamps are divided by this to get seconds."""
        return _TIMESTAMP_UNITS[self.timestamp_unit]


@dataclass(frozen=True)
class ValidationSettings:
    """Thresholds of the checks run on each new partition before anything is trained."""

    min_rows: int = 1  # fewer rows: the partition is rejected as empty
    max_null_fraction: float = 0.0  # rows with a null user, item, timestamp (or rating)
    max_unparsable_fraction: float = 0.0  # ids, timestamps (or ratings) that do not parse
    max_duplicate_fraction: float = 0.01  # exact repeats of (user, item, timestamp)
    max_out_of_range_fraction: float = 0.01  # timestamps outside the partition's day
    late_days: int = 2  # events up to this many days before the partition date are in range
    volume_ratio: float = 3.0  # reject below median/ratio or above median*ratio
    volume_lookback: int = 7  # previous partitions whose median row count is the reference
    volume_min_history: int = 3  # with fewer previous partitions the volume check is skipped

    def __post_init__(self) -> None:
        where = "nightly.validation"
        if not _integer(self.min_rows) or self.min_rows < 1:
            _fail(where, "min_rows", "must be an int >= 1")
        for key in (
            "max_null_fraction",
            "max_unparsable_fraction",
            "max_duplicate_fraction",
            "max_out_of_range_fraction",
        ):
            value = getattr(self, key)
            if not _number(value) or not 0.0 <= value <= 1.0:
                _fail(where, key, "must be a fraction in [0, 1]")
        if not _integer(self.late_days) or self.late_days < 0:
            _fail(where, "late_days", "must be an int >= 0")
        if not _number(self.volume_ratio) or self.volume_ratio <= 1.0:
            _fail(where, "volume_ratio", "must be a number > 1")
        if not _integer(self.volume_lookback) or self.volume_lookback < 1:
            _fail(where, "volume_lookback", "must be an int >= 1")
        if not _integer(self.volume_min_history) or not (
            1 <= self.volume_min_history <= self.volume_lookback
        ):
            _fail(where, "volume_min_history", "must be an int in [1, volume_lookback]")


@dataclass(frozen=True)
class SplitSettings:
    """The evaluation users and the split of each night.

    A user belongs to the evaluation group when ``sha256(salt + user_id)`` falls in the first
    ``eval_user_fraction`` of the hash space: the assignment never changes from night to night,
    so no model of this job ever trains on an evaluation user, and champion and challenger are
    compared on users that neither has seen (strong generalization).
    """

    eval_user_fraction: float = 0.1  # share of users never trained on (hash-assigned)
    eval_salt: str = "recvae-nightly"  # changing it reshuffles the groups (and leaks)
    n_heldout: int = 1000  # test users drawn from the most recently active evaluation users
    n_validation: int = 500  # other evaluation users that pick the best epoch (0: none)
    min_eval_users: int = 50  # fewer test users with targets: the run is rejected
    holdout_fraction: float = 0.2  # share of a test user's positives that are targets
    min_user_count: int = 5  # users with fewer positives in the window are dropped
    seed: int = 98765  # combined with the date: the split is a pure function of both

    def __post_init__(self) -> None:
        where = "nightly.split"
        if not _number(self.eval_user_fraction) or not 0.0 < self.eval_user_fraction < 1.0:
            _fail(where, "eval_user_fraction", "must be in (0, 1)")
        if not isinstance(self.eval_salt, str) or not self.eval_salt.strip():
            # An empty salt still splits, but is almost always an unset variable; a fixed,
            # named salt keeps the groups reproducible and separate from other jobs' hashes.
            _fail(where, "eval_salt", "must be a non-empty string")
        if not _integer(self.n_heldout) or self.n_heldout < 1:
            _fail(where, "n_heldout", "must be an int >= 1")
        if not _integer(self.n_validation) or self.n_validation < 0:
            _fail(where, "n_validation", "must be an int >= 0")
        if not _integer(self.min_eval_users) or not 1 <= self.min_eval_users <= self.n_heldout:
            _fail(where, "min_eval_users", "must be an int in [1, n_heldout]")
        if not _number(self.holdout_fraction) or not 0.0 < self.holdout_fraction < 1.0:
            _fail(where, "holdout_fraction", "must be in (0, 1)")
        if not _integer(self.min_user_count) or self.min_user_count < 2:
            _fail(where, "min_user_count", "must be an int >= 2 (a fold-in and a target)")
        if not _integer(self.seed):
            _fail(where, "seed", "must be an int")


@dataclass(frozen=True)
class TrainingSettings:
    """How the challenger is trained."""

    warm_start: bool = True  # start from the champion's weights for the items both know
    train_user_fraction: float = 1.0  # seeded sample of training users (1.0 = all)
    # Drop training users whose anomaly percentile under the champion is above this (None:
    # keep all); see ``pipelines.nightly.dataset.exclude_anomalous_users``.
    exclude_anomalies_above_percentile: float | None = None

    def __post_init__(self) -> None:
        where = "nightly.training"
        if not isinstance(self.warm_start, bool):
            _fail(where, "warm_start", "must be true or false")
        if not _number(self.train_user_fraction) or not 0.0 < self.train_user_fraction <= 1.0:
            _fail(where, "train_user_fraction", "must be in (0, 1]")
        p = self.exclude_anomalies_above_percentile
        if p is not None and (not _number(p) or not 0.0 < p < 100.0):
            _fail(where, "exclude_anomalies_above_percentile", "must be in (0, 100) or absent")


@dataclass(frozen=True)
class GateSettings:
    """When a challenger replaces the champion."""

    tolerance: float = 0.005  # promote if challenger NDCG@100 >= champion NDCG@100 - tolerance
    min_ndcg: float = 0.0  # absolute floor of the challenger's NDCG@100
    min_coverage: float = 0.0  # absolute floor of the challenger's coverage@100
    min_coverage_ratio: float = 0.5  # challenger coverage@100 >= ratio * champion's

    def __post_init__(self) -> None:
        where = "nightly.gate"
        if not _number(self.tolerance) or not 0.0 <= self.tolerance < 1.0:
            _fail(where, "tolerance", "must be in [0, 1)")
        for key in ("min_ndcg", "min_coverage", "min_coverage_ratio"):
            value = getattr(self, key)
            if not _number(value) or not 0.0 <= value <= 1.0:
                _fail(where, key, "must be in [0, 1]")


@dataclass(frozen=True)
class DeploySettings:
    """The serving layer to tell about a new champion (``url`` empty: nobody is notified)."""

    url: str = ""  # e.g. http://recvae-serving:8000; POST {url}/v1/admin/reload
    token_env: str = "RECVAE_ADMIN_TOKEN"  # environment variable holding the bearer token
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        where = "nightly.deploy"
        if not isinstance(self.url, str):
            _fail(where, "url", "must be a string")
        if self.url and not self.url.startswith(("http://", "https://")):
            _fail(where, "url", f"must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.token_env, str) or not self.token_env:
            _fail(where, "token_env", "must name an environment variable")
        if not _number(self.timeout_s) or self.timeout_s <= 0:
            _fail(where, "timeout_s", "must be a number > 0")


@dataclass(frozen=True)
class LockSettings:
    """The single-run lock."""

    max_age_hours: float = 12.0  # a holder older than this is reported as probably hung

    def __post_init__(self) -> None:
        if not _number(self.max_age_hours) or self.max_age_hours <= 0:
            _fail("nightly.lock", "max_age_hours", "must be a number > 0")


@dataclass(frozen=True)
class MlflowSettings:
    """Tracking store and model registry."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    artifact_location: str | None = None  # only used when the experiment is created
    experiment: str = "recvae-nightly"
    registered_model: str = "recvae"
    alias: str = "champion"

    def __post_init__(self) -> None:
        for key in ("experiment", "registered_model", "alias"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                _fail("mlflow", key, "must be a non-empty string")
        for key in ("tracking_uri", "artifact_location"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                _fail("mlflow", key, "must be a string or absent")


@dataclass(frozen=True)
class NightlySettings:
    """Everything the nightly job needs; built by :func:`load_settings`."""

    lake: Path
    state_dir: Path = Path("nightly-state")
    window_days: int = 90  # partitions in (date - window_days, date]; 0 = everything
    recent_days: int = 7  # test users are evaluation users active in the last days
    keep_challenger_bundles: int = 5  # local bundles of recent unpromoted challengers to keep
    lake_format: LakeSettings = field(default_factory=LakeSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    lock: LockSettings = field(default_factory=LockSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    model: dict[str, Any] = field(default_factory=lambda: {"model": "multvae"})
    run: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _integer(self.window_days) or self.window_days < 0:
            _fail("nightly", "window_days", "must be an int >= 0 (0 = every partition)")
        if not _integer(self.recent_days) or self.recent_days < 1:
            _fail("nightly", "recent_days", "must be an int >= 1")
        if not _integer(self.keep_challenger_bundles) or self.keep_challenger_bundles < 0:
            _fail("nightly", "keep_challenger_bundles", "must be an int >= 0")

    def model_config(self) -> ModelConfig:
        """The challenger's model config (validated by ``recvae.config``).

        Raises:
            ValueError: unknown or invalid ``[model]`` fields.
        """
        from recvae.config import config_from_dict

        return config_from_dict({"model": "multvae", **self.model})

    def run_options(self, **extra: Any) -> RunOptions:
        """``RunOptions`` from ``[run]`` plus ``extra``.

        Raises:
            ValueError: unknown or invalid ``[run]`` fields.
        """
        from recvae.config import RunOptions

        check_known_keys(self.run, (f.name for f in dataclasses.fields(RunOptions)), "run")
        return RunOptions(**{**self.run, **extra})

    def replace(self, **changes: Any) -> NightlySettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the run summary and MLflow params)."""
        out = dataclasses.asdict(self)
        out["lake"] = str(self.lake)
        out["state_dir"] = str(self.state_dir)
        return out


def _section(raw: dict[str, Any], cls: type, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"[{where}] must be a table")
    check_known_keys(raw, (f.name for f in dataclasses.fields(cls)), where)
    try:
        return cls(**raw)
    except TypeError as exc:  # pragma: no cover - unknown keys are caught above
        raise ValueError(f"[{where}]: {exc}") from exc


_SUBTABLES: dict[str, tuple[str, type]] = {
    "columns": ("lake_format", LakeSettings),
    "validation": ("validation", ValidationSettings),
    "split": ("split", SplitSettings),
    "training": ("training", TrainingSettings),
    "gate": ("gate", GateSettings),
    "deploy": ("deploy", DeploySettings),
    "lock": ("lock", LockSettings),
}
_TOP_KEYS = ("lake", "state_dir", "window_days", "recent_days", "keep_challenger_bundles")
_SECTIONS = ("nightly", "model", "run", "mlflow")


def settings_from_dict(
    raw: dict[str, Any], *, base_dir: Path | None = None, **overrides: Any
) -> NightlySettings:
    """Build settings from a parsed TOML document.

    Args:
        raw: The document.
        base_dir: Relative ``lake`` and ``state_dir`` paths are resolved against it (the
            current directory when None).
        overrides: Top-level fields to set (``lake``, ``state_dir``, ``window_days``, ...);
            None values are ignored.

    Returns:
        The settings.

    Raises:
        ValueError: an unknown section or key, a missing ``lake``, or an invalid value.
    """
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown section(s) in nightly config: {', '.join(unknown)} "
            f"(valid: {', '.join(_SECTIONS)})"
        )
    nightly = table(raw, "nightly")
    kwargs: dict[str, Any] = {}
    for name, (attr, cls) in _SUBTABLES.items():
        if name in nightly:
            kwargs[attr] = _section(nightly.pop(name), cls, f"nightly.{name}")
    bad = sorted(set(nightly) - set(_TOP_KEYS))
    if bad:
        valid = ", ".join([*_TOP_KEYS, *(f"[nightly.{n}]" for n in _SUBTABLES)])
        raise ValueError(f"unknown key(s) in [nightly]: {', '.join(bad)} (valid: {valid})")
    nightly.update({k: v for k, v in overrides.items() if v is not None})
    if not nightly.get("lake"):
        raise ValueError("[nightly] lake is required: the directory of date=YYYY-MM-DD partitions")
    base = base_dir or Path.cwd()
    for key in ("lake", "state_dir"):
        if key in nightly:
            if not isinstance(nightly[key], str | os.PathLike):
                _fail("nightly", key, f"must be a path, got {nightly[key]!r}")
            path = Path(nightly[key]).expanduser()
            nightly[key] = path if path.is_absolute() else base / path
    kwargs["mlflow"] = _section(raw.get("mlflow", {}), MlflowSettings, "mlflow")
    model = raw.get("model", {"model": "multvae"})
    run = raw.get("run", {})
    if not isinstance(model, dict) or not isinstance(run, dict):
        raise ValueError("[model] and [run] must be tables")
    settings = NightlySettings(**nightly, **kwargs, model=dict(model), run=dict(run))
    settings.model_config()  # fail early on a bad [model]
    settings.run_options()
    return settings


def load_settings(path: str | Path, **overrides: Any) -> NightlySettings:
    """Read a nightly config file.

    Relative paths in it are resolved against the current directory (cron and Kubernetes
    jobs set their working directory explicitly).

    Args:
        path: The TOML file.
        overrides: Top-level fields to override (see :func:`settings_from_dict`).

    Returns:
        The settings.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not valid TOML or holds an invalid setting.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"nightly config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"nightly config {p} is not valid TOML: {exc}") from exc
    return settings_from_dict(raw, **overrides)
