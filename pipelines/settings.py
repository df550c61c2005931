"""Job settings: where the data comes from, the protocol, the model config and run options.

A job is described by a TOML file (``pipelines/configs/*.toml``) and command-line overrides::

    [data]      dataset = "ml-1m"  (or path = "log.parquet", user_col, item_col, rating_col, ...)
    [protocol]  n_heldout, holdout_fraction, seed, min_user_count
    [model]     model = "multvae", epochs, batch_size, ... (the config dataclass fields)
    [run]       device, num_threads, progress
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recvae.config import ModelConfig, RunOptions
    from recvae.data import Interactions

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_DATASET = "ml-latest-small"


@dataclass(frozen=True)
class DataSettings:
    """Either a built-in dataset by name or an interaction file with its column names."""

    dataset: str | None = DEFAULT_DATASET
    data_dir: str | None = None
    path: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = None
    threshold: float | None = 3.5
    separator: str | None = None
    has_header: bool = True  # False: columns are 0-based positions ("0", "1", ...)

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if self.threshold is not None and not math.isfinite(self.threshold):
            # Say what to do instead: -inf means "every row", which leaving out the rating
            # column already gives; no rating is above nan or inf.
            if self.threshold < 0:
                hint = "to read every row as a positive, leave out rating_col (--rating-col)"
            else:
                hint = f"no rating is above {self.threshold}, so nothing would be a positive"
            raise ValueError(
                f"[data] threshold (--threshold) must be a finite number, got {self.threshold}: "
                f"{hint}"
            )

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else str(self.dataset)


@dataclass(frozen=True)
class ProtocolSettings:
    """The strong-generalization protocol (PROTOCOL.md)."""

    n_heldout: int | None = None  # None: the dataset's default (PROTOCOL.md table)
    holdout_fraction: float = 0.2
    seed: int = 98765
    min_user_count: int = 5

    def __post_init__(self) -> None:
        _check_types(self, "protocol")
        # The ranges split_users and the readers check, here too so a job stops before loading.
        if self.n_heldout is not None and self.n_heldout < 1:
            raise ValueError(
                f"[protocol] n_heldout (--n-heldout) must be >= 1, got {self.n_heldout}"
            )
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(
                "[protocol] holdout_fraction (--holdout-fraction) must be in (0, 1), "
                f"got {self.holdout_fraction}"
            )
        if self.min_user_count < 0:
            raise ValueError(
                "[protocol] min_user_count (--min-user-count) must be >= 0, "
                f"got {self.min_user_count}"
            )


def _check_types(settings: Any, where: str) -> None:
    """Check each field of ``settings`` against its annotation (ranges are checked where the
    values are used).

    Raises:
        ValueError: ``[<where>]: invalid config field '<name>': must be <type>, got <value>``.
    """
    from recvae.config import check_field_types

    try:
        check_field_types(settings)
    except ValueError as exc:
        raise ValueError(f"[{where}]: {exc}") from None


@dataclass(frozen=True)
class JobSettings:
    data: DataSettings = field(default_factory=DataSettings)
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    model: dict[str, Any] = field(default_factory=lambda: {"model": "multvae"})
    run: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        from recvae.config import config_from_dict

        return config_from_dict({"model": "multvae", **self.model})

    def run_options(self, **extra: Any) -> RunOptions:
        from recvae.config import RunOptions

        return RunOptions(**{**self.run, **extra})

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": dataclasses.asdict(self.data),
            "protocol": dataclasses.asdict(self.protocol),
            "model": dict(self.model),
            "run": dict(self.run),
        }


def option_flag(field_name: str) -> str:
    """The command-line flag of a ``[data]`` or ``[protocol]`` field (``path`` is ``--data``)."""
    special = {"path": "--data", "has_header": "--no-header"}
    return special.get(field_name) or "--" + field_name.replace("_", "-")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a bare preset name is looked up in ``pipelines/configs``.

    Raises:
        FileNotFoundError: no such file or preset.
        ValueError: the path is a folder, or the file cannot be read or is not valid TOML.
    """
    p = Path(path)
    preset = CONFIG_DIR / f"{p}.toml"
    # A bare name is a preset unless a file of that name exists: a folder of that name (e.g.
    # the dataset folder ml-1m/ in the working directory) is never a config file.
    if not p.is_file() and not p.suffix and preset.is_file():
        p = preset
    if p.is_dir():
        raise ValueError(f"config file {path} is a folder; give a .toml file")
    if not p.is_file():
        presets = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.toml")))
        raise FileNotFoundError(f"config file not found: {path} (presets: {presets})")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {p} is not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {p} is not valid TOML: {exc}") from exc
    except OSError as exc:  # permission denied, an I/O error: a message, not a traceback
        raise ValueError(f"config file {p} cannot be read: {exc.strerror or exc}") from exc


def to_toml(document: Mapping[str, Any]) -> str:
    """A small TOML writer for configs: tables (nested ones as ``[a.b]``) of strings, numbers,
    booleans and lists of them; ``None`` values are left out (TOML has no null).

    Raises:
        TypeError: a value of another type.
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            if isinstance(v, float) and not math.isfinite(v):
                return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan")
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        raise TypeError(f"cannot write {type(v).__name__} value {v!r} as TOML")

    lines: list[str] = []

    def write_table(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(
            f"{k} = {value(v)}"
            for k, v in body.items()
            if v is not None and not isinstance(v, Mapping)
        )
        lines.append("")
        for k, v in body.items():
            if isinstance(v, Mapping):
                write_table(f"{name}.{k}", v)

    for name, body in document.items():
        write_table(name, body)
    return "\n".join(lines)


def table(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The TOML table ``[name]`` of a parsed document, as a dict (empty when absent).

    Raises:
        ValueError: ``name`` holds something other than a table (``run = 3``).
    """
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"[{name}] must be a table, got {name} = {value!r}")
    return dict(value)


def is_int(value: Any) -> bool:
    """An integer, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_known_keys(section: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Reject keys of the TOML table ``[where]`` that are not in ``valid``.

    Raises:
        ValueError: Naming the unknown keys, the nearest valid name of each mistyped one and
            the valid ones.
    """
    from recvae.config import did_you_mean

    names = set(valid)
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) in [{where}]: {', '.join(unknown)}{did_you_mean(unknown, names)} "
            f"(valid: {', '.join(sorted(names))})"
        )


def _take(section: dict[str, Any], cls: type, where: str) -> Any:
    check_known_keys(section, (f.name for f in dataclasses.fields(cls)), where)
    return cls(**section)


def job_from_dict(raw: dict[str, Any]) -> JobSettings:
    """Build settings from a parsed TOML document (unknown sections or keys are rejected)."""
    allowed = {
        "data",
        "protocol",
        "model",
        "run",
        "models",
        "experiment",
        "tune",
        "nightly",
        "search",
        "serve",
        "mlflow",
        "report",
    }
    unknown = sorted(set(raw) - allowed)
    if unknown:
        from recvae.config import did_you_mean

        raise ValueError(
            f"unknown section(s) in config: {', '.join(unknown)}{did_you_mean(unknown, allowed)} "
            f"(valid: {', '.join(sorted(allowed))})"
        )
    for name in raw:
        table(raw, name)
    from recvae.config import RunOptions

    run = table(raw, "run")
    check_known_keys(run, (f.name for f in dataclasses.fields(RunOptions)), "run")
    RunOptions(**run)  # checks the values now, before any model of an experiment trains
    return JobSettings(
        data=_take(table(raw, "data"), DataSettings, "data"),
        protocol=_take(table(raw, "protocol"), ProtocolSettings, "protocol"),
        model=table(raw, "model") if "model" in raw else {"model": "multvae"},
        run=run,
    )


def with_overrides(job: JobSettings, **sections: dict[str, Any]) -> JobSettings:
    """Apply non-None overrides per section (``data``, ``protocol``, ``model``, ``run``)."""

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None}

    data = dataclasses.replace(job.data, **clean(sections.get("data", {})))
    protocol = dataclasses.replace(job.protocol, **clean(sections.get("protocol", {})))
    model = {**job.model, **clean(sections.get("model", {}))}
    run = {**job.run, **clean(sections.get("run", {}))}
    return JobSettings(data=data, protocol=protocol, model=model, run=run)


def load_data(data: DataSettings, *, min_user_count: int = 5) -> tuple[Interactions, int | None]:
    """Load and binarize the configured data; also return the dataset's default ``n_heldout``.

    Raises:
        DataError / FileNotFoundError: with the problem named.
    """
    from recvae.data import get_dataset_spec, load_dataset, load_interactions

    if data.path:
        interactions = load_interactions(
            data.path,
            user_col=_file_column(data.user_col, data, "user_col"),
            item_col=_file_column(data.item_col, data, "item_col"),
            rating_col=None
            if data.rating_col is None
            else _file_column(data.rating_col, data, "rating_col"),
            threshold=data.threshold if data.rating_col else None,
            min_user_count=min_user_count,
            separator=data.separator,
            has_header=data.has_header,
        )
        return interactions, None
    if not data.dataset:
        raise ValueError("no data given: set a dataset name (--dataset) or a file (--data)")
    spec = get_dataset_spec(data.dataset)
    interactions = load_dataset(data.dataset, data.data_dir, min_user_count=min_user_count)
    return interactions, spec.n_heldout


def _file_column(column: str, data: DataSettings, field_name: str) -> str | int:
    """A column of a ``--data`` file: its header name, or its 0-based position (``"0"``) in a
    file without a header (``--no-header``).

    Raises:
        ValueError: a file without a header and a column that is not a position.
    """
    if data.has_header:
        return column
    if not column.isdigit():
        raise ValueError(
            f"[data] {field_name} ({option_flag(field_name)}) is {column!r}, but the file has "
            "no header (--no-header): name its columns by 0-based position, e.g. --user-col 0 "
            "--item-col 1 --rating-col 2"
        )
    return int(column)


def default_n_heldout(n_users: int) -> int:
    """For arbitrary files: 10% of users in each held-out part, at least 1, at most 10,000."""
    return max(1, min(10_000, n_users // 10))
