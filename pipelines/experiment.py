"""``recvae experiment``: every configured model on one split, one table, one MLflow parent run.

The TOML config adds to the ``recvae train`` sections (``[data]``, ``[protocol]``, ``[run]``)::

    [experiment]
    models = ["multvae", "ease", "popularity"]   # labels to run, in order (default: all tables)
    threads = 1                                  # torch, BLAS and implicit threads
    plots = true                                 # PNG plots (per model and combined)
    ks = [5, 10, 20, 50, 100]                    # cut-offs of the metrics-vs-K plot
    fairness_k = 20                              # K of coverage, Gini and popularity rank
    register = "multvae"                         # whose bundle goes to the model registry

    [models.multvae]                             # one table per model: its config fields
    model = "multvae"                            # the type (default: the label)
    epochs = 200

    [models.ease]
    lambdas = [100.0, 200.0, 500.0, 1000.0]      # chosen on validation NDCG@100

    [mlflow]
    experiment = "recvae-ml-1m"                  # default: recvae-<dataset>
    registered_model = "recvae-ml-1m"            # omit to skip registration
    alias = "staging"

Every model is fitted on the training users, chosen on the validation users only (the best epoch
for autoencoders, ``lambda`` for EASE) and scored once on the test users, all by the same
:func:`recvae.evaluate`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.folders import writable_folder_problem
from pipelines.settings import JobSettings, check_known_keys, is_int, table
from pipelines.tracking_hooks import Tracker, evaluation_metrics, run_tags
from pipelines.train_job import (
    PreparedData,
    TrainOutcome,
    default_output_dir,
    prepare,
    run_train,
)

if TYPE_CHECKING:
    from recvae.baselines import BaselineConfig
    from recvae.config import ModelConfig
    from recvae.evaluation import EvaluationResult, Ranker
    from recvae.split import Split

logger = logging.getLogger(__name__)

AUTOENCODERS = ("multvae", "multdae", "recvae")
BASELINES = ("popularity", "ease", "als", "bpr", "itemknn")
IMPLICIT_BASELINES = ("als", "bpr", "itemknn")
PAPER_METRICS = ("recall@20", "recall@50", "ndcg@100")
_EXPERIMENT_KEYS = {
    "models",
    "output_dir",
    "threads",
    "ks",
    "fairness_k",
    "register",
    "device",
    "plots",
}
_MLFLOW_KEYS = {"tracking_uri", "artifact_location", "experiment", "registered_model", "alias"}
# ExperimentSettings fields that hold a string or None -> their place in the TOML file.
_STRING_KEYS = {
    "output_dir": "[experiment] output_dir",
    "register": "[experiment] register",
    "device": "[experiment] device",
    "experiment_name": "[mlflow] experiment",
    "tracking_uri": "[mlflow] tracking_uri",
    "registered_model": "[mlflow] registered_model",
}
# MLflow's rules for registry aliases (mlflow.utils.validation): word characters and dashes, at
# most 255 characters, not "latest" and not a version alias such as "v3".
_ALIAS_PATTERN = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS_PATTERN = re.compile(r"^[vV]\d+$")
_MAX_ALIAS_LENGTH = 255


def model_types() -> tuple[str, ...]:
    """Every model type a ``[models.<label>]`` table, ``--models`` or ``--model`` accepts."""
    from recvae.baselines import BASELINE_CONFIGS
    from recvae.config import CONFIG_TYPES

    known = AUTOENCODERS + BASELINES
    return known + tuple(sorted((set(CONFIG_TYPES) | set(BASELINE_CONFIGS)) - set(known)))


def check_registered_model_name(name: str) -> None:
    """Apply MLflow's rules for a registered model name, so a bad one fails before training.

    Raises:
        ValueError: The name is blank, contains ``/`` or ``:``, or is not a plain path segment
            (MLflow rejects ``.``, ``..``, leading ``/`` and names that normalize to others).
    """
    where = "[mlflow] registered_model (--registered-model)"
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} must be a non-empty name, got {name!r}")
    if "/" in name or ":" in name:
        raise ValueError(f"{where}: invalid name {name!r}: it cannot contain '/' or ':'")
    normalized = posixpath.normpath(name)
    if normalized != name or normalized == "." or normalized.startswith(".."):
        raise ValueError(f"{where}: invalid name {name!r}: it would resolve to {normalized!r}")


def check_alias(alias: str) -> None:
    """Apply MLflow's rules for a registry alias, so a bad one fails before training.

    Raises:
        ValueError: Not only letters, digits, ``_`` and ``-``; longer than 255 characters;
            ``latest``; or a version alias such as ``v3`` (both reserved by MLflow).
    """
    where = "[mlflow] alias (--alias)"
    if not isinstance(alias, str) or not alias:
        raise ValueError(f"{where} must be a non-empty name, got {alias!r}")
    if not _ALIAS_PATTERN.match(alias):
        raise ValueError(f"{where}: invalid alias {alias!r}: use only letters, digits, '_' and '-'")
    if len(alias) > _MAX_ALIAS_LENGTH:
        raise ValueError(f"{where}: at most {_MAX_ALIAS_LENGTH} characters, got {len(alias)}")
    if alias.lower() == "latest" or _VERSION_ALIAS_PATTERN.match(alias):
        raise ValueError(f"{where}: {alias!r} is reserved by MLflow; choose another alias")


def output_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a run directory (it or a parent is a file, or the folder cannot be
    created or written: :func:`pipelines.folders.writable_folder_problem`), or None when it can.

    Checked before the data is loaded, so the mistake costs nothing.
    """
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                if candidate == path:
                    return f"{path} is an existing file, not a directory; pass a directory"
                return f"{path}: {candidate} is a file, not a directory"
            break
    problem = writable_folder_problem(path)
    if problem is None or problem.startswith(f"{path} "):  # it names the path itself
        return problem
    return f"{path}: {problem}"


def check_output_dir(path: Path) -> None:
    """Raise when ``path`` cannot be a run directory.

    Raises:
        NotADirectoryError: It or one of its parents is a file.
    """
    problem = output_dir_problem(path)
    if problem is not None:
        raise NotADirectoryError(f"output directory {problem}")


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ModelSpec:
    """One model of an experiment: its label, its config and (EASE) the lambdas to choose from.

    Attributes:
        label: The name in the table and the MLflow child run (the ``[models.<label>]`` key).
        config: A ``ModelConfig`` (autoencoders) or a ``BaselineConfig``.
        lambdas: For EASE, candidate regularizations chosen on validation NDCG@100; empty means
            the config's own ``regularization``.
    """

    label: str
    config: ModelConfig | BaselineConfig
    lambdas: tuple[float, ...] = ()

    @property
    def model(self) -> str:
        return str(self.config.model)

    @property
    def is_autoencoder(self) -> bool:
        from recvae.baselines import BASELINE_CONFIGS

        return self.model not in BASELINE_CONFIGS

    def params(self) -> dict[str, Any]:
        """The config as flat params, plus the label and the lambda candidates."""
        params = {"label": self.label, **self.config.to_dict()}
        if self.lambdas:
            params["lambda_candidates"] = list(self.lambdas)
        return params


@dataclass(frozen=True)
class ExperimentSettings:
    """The ``[experiment]``, ``[models.*]`` and ``[mlflow]`` sections."""

    models: tuple[ModelSpec, ...]
    output_dir: str | None = None
    threads: int | None = None
    ks: tuple[int, ...] = (5, 10, 20, 50, 100)
    fairness_k: int = 20
    register: str | None = "multvae"
    device: str | None = None
    plots: bool = True
    experiment_name: str | None = None
    tracking_uri: str | None = None
    registered_model: str | None = None
    alias: str = "staging"
    artifact_location: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("the experiment has no models: add [models.<label>] tables")
        labels = [spec.label for spec in self.models]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"model label(s) given twice: {', '.join(duplicates)}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise ValueError(f"[experiment] threads must be an int >= 1, got {self.threads!r}")
        if not self.ks or any(not is_int(k) or k < 1 for k in self.ks):
            raise ValueError(f"[experiment] ks must be positive ints, got {list(self.ks)}")
        if not is_int(self.fairness_k) or self.fairness_k < 1:
            raise ValueError(
                f"[experiment] fairness_k must be an int >= 1, got {self.fairness_k!r}"
            )
        check_alias(self.alias)
        if not isinstance(self.plots, bool):
            raise ValueError(f"[experiment] plots must be true or false, got {self.plots!r}")
        for attr, key in _STRING_KEYS.items():
            value = getattr(self, attr)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")
        if self.device is not None and not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ValueError(
                f"[experiment] device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.registered_model is not None:
            check_registered_model_name(self.registered_model)

    @property
    def eval_ks(self) -> tuple[int, ...]:
        """Every cut-off the evaluations compute: the plot's, the paper's and ``fairness_k``."""
        return tuple(sorted({*self.ks, 20, 50, 100, self.fairness_k}))

    def with_models(self, labels: Sequence[str]) -> ExperimentSettings:
        """Keep only ``labels``, in that order; a label without a table but naming a model type
        gets that type's defaults.

        Raises:
            ValueError: An unknown label.
        """
        by_label = {spec.label: spec for spec in self.models}
        chosen = []
        for label in labels:
            if label in by_label:
                chosen.append(by_label[label])
            elif label in model_types():
                chosen.append(model_spec(label, {}))
            else:
                raise ValueError(
                    f"unknown model {label!r}: not a [models.{label}] table of the config "
                    f"({', '.join(by_label) or 'none'}) nor a model type "
                    f"({', '.join(model_types())})"
                )
        return dataclasses.replace(self, models=tuple(chosen))

    def with_epochs(self, epochs: int) -> ExperimentSettings:
        """Set ``epochs`` of every autoencoder (baselines have their own iteration counts).

        Raises:
            ValueError: ``epochs < 1``.
        """
        specs = tuple(
            dataclasses.replace(spec, config=spec.config.replace(epochs=epochs))
            if spec.is_autoencoder
            else spec
            for spec in self.models
        )
        return dataclasses.replace(self, models=specs)


def model_spec(label: str, table: Mapping[str, Any]) -> ModelSpec:
    """Build a :class:`ModelSpec` from a ``[models.<label>]`` table.

    Raises:
        ValueError: An unknown model type, unknown fields or invalid values (named).
    """
    from recvae.baselines import BASELINE_CONFIGS, baseline_config_from_dict
    from recvae.config import config_from_dict

    data = dict(table)
    model = str(data.pop("model", label))
    lambdas_raw = data.pop("lambdas", None)
    if model not in model_types():
        raise ValueError(
            f"[models.{label}]: unknown model {model!r} (known: {', '.join(model_types())})"
        )
    try:
        if model in BASELINE_CONFIGS:
            config: ModelConfig | BaselineConfig = baseline_config_from_dict(
                {"model": model, **data}
            )
        else:
            config = config_from_dict({"model": model, **data})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"[models.{label}]: {exc}") from exc
    lambdas: tuple[float, ...] = ()
    if lambdas_raw is not None:
        if model != "ease":
            raise ValueError(f"[models.{label}]: 'lambdas' applies to EASE only, not {model}")
        if not isinstance(lambdas_raw, list) or not lambdas_raw:
            raise ValueError(f"[models.{label}]: 'lambdas' must be a non-empty list of numbers")
        try:
            lambdas = tuple(float(value) for value in lambdas_raw)
        except (TypeError, ValueError):
            raise ValueError(f"[models.{label}]: 'lambdas' must hold numbers") from None
        if any(not (math.isfinite(value) and value > 0) for value in lambdas):
            raise ValueError(f"[models.{label}]: every lambda must be > 0, got {list(lambdas)}")
    return ModelSpec(label=label, config=config, lambdas=lambdas)


def mlflow_from_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[mlflow]`` table of a parsed TOML document (empty when absent).

    Raises:
        ValueError: It is not a table, has unknown keys, or a value that is not a string.
    """
    section = table(raw, "mlflow")
    check_known_keys(section, _MLFLOW_KEYS, "mlflow")
    for key, value in section.items():
        if not isinstance(value, str):
            raise ValueError(f"[mlflow] {key} must be a string, got {value!r}")
    return section


def experiment_from_dict(raw: Mapping[str, Any]) -> ExperimentSettings:
    """Read the experiment sections of a parsed TOML document.

    Raises:
        ValueError: Unknown keys, a bad model table or invalid values, with the place named.
    """
    section = table(raw, "experiment")
    check_known_keys(section, _EXPERIMENT_KEYS, "experiment")
    mlflow_section = mlflow_from_dict(raw)
    ks = section.get("ks", list(ExperimentSettings.ks))
    if not isinstance(ks, list):
        raise ValueError(f"[experiment] ks must be a list of positive ints, got {ks!r}")
    tables = raw.get("models", {})
    if not isinstance(tables, Mapping):
        raise ValueError("[models] must hold one table per model: [models.<label>]")
    specs = []
    for label, fields in tables.items():
        if not isinstance(fields, Mapping):
            raise ValueError(f"[models.{label}] must be a table of config fields")
        specs.append(model_spec(str(label), fields))
    if not specs:
        specs = [model_spec(name, {}) for name in ("multvae", "ease", "popularity")]
    settings = ExperimentSettings(
        models=tuple(specs),
        output_dir=section.get("output_dir"),
        threads=section.get("threads"),
        ks=tuple(ks),
        fairness_k=section.get("fairness_k", ExperimentSettings.fairness_k),
        register=section.get("register", ExperimentSettings.register),
        device=section.get("device"),
        plots=section.get("plots", True),
        experiment_name=mlflow_section.get("experiment"),
        tracking_uri=mlflow_section.get("tracking_uri"),
        artifact_location=mlflow_section.get("artifact_location"),
        registered_model=mlflow_section.get("registered_model"),
        alias=mlflow_section.get("alias", ExperimentSettings.alias),
    )
    if "models" in section:
        labels = section["models"]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("[experiment] models must be a list of model labels")
        settings = settings.with_models(labels)
    labels = [spec.label for spec in settings.models]
    if "register" in section and settings.register is not None and settings.register not in labels:
        raise ValueError(
            f"[experiment] register: {settings.register!r} is not one of the models "
            f"({', '.join(labels)})"
        )
    return settings


# ------------------------------------------------------------------------------ results
@dataclass
class ModelResult:
    """One model's outcome on the experiment's split.

    Attributes:
        label: The model's label.
        model: Its type (``multvae``, ``ease``, ...).
        params: Its config as params (what MLflow received).
        validation: Validation-user evaluation of the chosen model.
        test: Test-user evaluation, computed once.
        train_seconds: Fit time, including per-epoch validation or the lambda search.
        segments: Test NDCG@100 by quartile of fold-in history length.
        history: Per-epoch records (autoencoders).
        notes: What was chosen on validation (``best_epoch``, ``lambda``), and the like.
        bundle_path: The saved bundle (autoencoders).
        ranker: The fitted model (kept in memory for notebooks; not serialized).
        run_id: The MLflow child run.
        logged_model: The MLflow model of the bundle (``model_uri``, and ``registered_model``,
            ``version`` and ``alias`` when registered).
    """

    label: str
    model: str
    params: dict[str, Any]
    validation: EvaluationResult
    test: EvaluationResult
    train_seconds: float
    segments: list[dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    bundle_path: Path | None = None
    ranker: Ranker | None = None
    run_id: str | None = None
    logged_model: dict[str, str] | None = None


@dataclass
class ExperimentResult:
    """Everything an experiment produced.

    Attributes:
        dataset: The dataset's name.
        split: The split's summary counts.
        results: One :class:`ModelResult` per model that finished, in order.
        failures: Label -> error message for models that failed.
        output_dir: The run directory (table, CSV, plots, bundles, ``results.json``).
        table: The comparison table (markdown).
        seconds: Wall time of the whole experiment.
        run_id: The MLflow parent run.
        registered: ``{"registered_model", "version", "alias", "model_uri"}`` when a bundle was
            registered.
        tracking_errors: MLflow calls that failed (the run went on without them).
    """

    dataset: str
    split: dict[str, Any]
    results: list[ModelResult]
    failures: dict[str, str]
    output_dir: Path
    table: str
    seconds: float
    run_id: str | None = None
    registered: dict[str, str] | None = None
    tracking_errors: list[str] = field(default_factory=list)


def _cell(result: EvaluationResult, name: str) -> str:
    return f"{result.mean(name):.4f} ± {result.stderr(name):.4f}"


def _aggregate(result: EvaluationResult, name: str, spec: str) -> str:
    value = result.aggregate.get(name)
    return "" if value is None or math.isnan(value) else format(value, spec)


def _segment_cells(segments: Sequence[Mapping[str, float]]) -> list[str]:
    cells = []
    for row in segments:
        cells.append("" if math.isnan(row["mean"]) else f"{row['mean']:.3f}")
    return cells + [""] * (4 - len(cells))


def _notes(notes: Mapping[str, Any]) -> str:
    parts = []
    for key, value in notes.items():
        parts.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def comparison_table(
    results: Sequence[ModelResult], *, fairness_k: int = 20, failures: Mapping[str, str] = {}
) -> str:
    """The markdown comparison: the paper's metrics (mean ± standard error over test users),
    validation NDCG@100, train time, popularity bias and NDCG@100 by activity quartile.

    Args:
        results: The models, in table order.
        fairness_k: K of the coverage, Gini and popularity-rank columns.
        failures: Label -> error, listed below the table.

    Returns:
        The table (and a line per failure), without a trailing newline.
    """
    k = fairness_k
    header = [
        "model",
        "Recall@20",
        "Recall@50",
        "NDCG@100",
        "val NDCG@100",
        "train s",
        f"coverage@{k}",
        f"Gini@{k}",
        f"pop. rank@{k}",
        "NDCG@100 Q1",
        "Q2",
        "Q3",
        "Q4 (most active)",
        "chosen on validation",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for result in results:
        cells = [
            result.label,
            *(_cell(result.test, name) for name in PAPER_METRICS),
            f"{result.validation.mean('ndcg@100'):.4f}",
            f"{result.train_seconds:.1f}",
            _aggregate(result.test, f"coverage@{k}", ".3f"),
            _aggregate(result.test, f"gini@{k}", ".3f"),
            _aggregate(result.test, f"popularity_rank@{k}", ".0f"),
            *_segment_cells(result.segments),
            _notes(result.notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for label, error in failures.items():
        lines.append(f"\n{label}: FAILED ({error})")
    return "\n".join(lines)


def comparison_rows(
    results: Sequence[ModelResult], *, fairness_k: int = 20
) -> list[dict[str, Any]]:
    """The table as records (full precision) for the CSV file and for notebooks."""
    k = fairness_k
    rows = []
    for result in results:
        row: dict[str, Any] = {"model": result.label, "type": result.model}
        for name in PAPER_METRICS:
            row[name] = result.test.mean(name)
            row[f"{name}_se"] = result.test.stderr(name)
        row["recall_plain@20"] = result.test.mean("recall_plain@20")
        row["validation_ndcg@100"] = result.validation.mean("ndcg@100")
        row["train_seconds"] = result.train_seconds
        for name in ("coverage", "gini", "popularity_rank"):
            row[f"{name}@{k}"] = result.test.aggregate.get(f"{name}@{k}", math.nan)
        for q, segment in enumerate(result.segments, 1):
            row[f"ndcg@100_q{q}"] = segment["mean"]
            row[f"ndcg@100_q{q}_se"] = segment["se"]
            row[f"history_q{q}"] = f"{segment['lower']:g}-{segment['upper']:g}"
        row["n_test_users"] = result.test.n_users
        row["chosen_on_validation"] = _notes(result.notes)
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write records as CSV (the union of their keys as columns, first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------ running
@contextmanager
def thread_limits(threads: int | None) -> Iterator[None]:
    """Limit torch and BLAS (threadpoolctl, when installed) to ``threads`` within the block."""
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # the baselines extra is not installed: torch's limit only
            yield
        else:
            with threadpool_limits(limits=threads):
                yield
    finally:
        torch.set_num_threads(previous)


def build_baseline(spec: ModelSpec, *, threads: int | None, device: str) -> Any:
    """An unfitted baseline for ``spec`` (implicit's models are imported here, lazily).

    Raises:
        ValueError: implicit is needed but not installed.
    """
    from recvae.baselines import EASE, Popularity

    config: Any = spec.config
    if spec.model == "popularity":
        return Popularity(config)
    if spec.model == "ease":
        return EASE(config, device=device)
    try:
        from recvae import baselines_implicit
    except ImportError as exc:
        raise ValueError(
            f"model {spec.label!r} needs implicit: pip install 'recvae[baselines]' ({exc})"
        ) from exc
    n_threads = threads or 1
    cls = {"als": baselines_implicit.ALS, "bpr": baselines_implicit.BPR}.get(
        spec.model, baselines_implicit.ItemKNN
    )
    return cls(config, num_threads=n_threads, blas_threads=n_threads)


def _previous_labels(out: Path) -> set[str]:
    """The model labels of the experiment whose ``results.json`` is in ``out`` (none: empty)."""
    try:
        previous = json.loads((out / "results.json").read_text())
        return {str(m["label"]) for m in previous.get("models", [])} | set(
            previous.get("failures", {})
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def _other_data_problem(out: Path, prepared: PreparedData) -> str | None:
    """Why ``out`` cannot take this experiment: its ``results.json`` records an experiment on
    other data or another split (None when it records none, or this one's).

    A rerun into the same folder resumes the autoencoders and rewrites the comparison, so the
    earlier run must be on the same data and split; otherwise its tables would be overwritten
    and its bundles and checkpoints mixed with this run's.
    """
    try:
        previous = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict):
        return None
    recorded = previous.get("data_fingerprint")
    split = json.loads(json.dumps(_json_safe(prepared.split.summary())))
    if isinstance(recorded, str) and recorded != prepared.fingerprint:
        difference = (
            f"other data ({previous.get('dataset')}, fingerprint {recorded[:12]}; this run: "
            f"{prepared.name}, {prepared.fingerprint[:12]})"
        )
    elif isinstance(previous.get("split"), dict) and previous["split"] != split:
        changed = sorted(
            key
            for key in split.keys() | previous["split"].keys()
            if split.get(key) != previous["split"].get(key)
        )
        difference = f"another split of {prepared.name} ({', '.join(changed)} differ)"
    else:
        return None
    return (
        f"the output directory {out} holds an experiment on {difference}: rerunning into it "
        "would overwrite its comparison and mix its bundles and checkpoints with this run's; "
        "pass another --output"
    )


def _checkpoint_problem(out: Path, settings: ExperimentSettings, split: Split) -> str | None:
    """Why an autoencoder of this experiment could not resume its checkpoint in ``out``
    (written with other settings or data), or None: checked before any model is fitted, so
    that a rerun with, say, other epochs does not fail the autoencoder only after the
    baselines have rewritten the comparison.
    """
    from pipelines.train_job import checkpoint_differences
    from recvae.config import ModelConfig as _ModelConfig

    fingerprint: str | None = None
    for spec in settings.models:
        if not spec.is_autoencoder or not isinstance(spec.config, _ModelConfig):
            continue
        path = out / spec.label / "checkpoints" / "checkpoint.pt"
        if not path.is_file():
            continue
        fingerprint = fingerprint or split.train.fingerprint()
        changed = checkpoint_differences(path, spec.config, fingerprint)
        if changed:
            return (
                f"{spec.label}: the checkpoint {path} was written with other settings or data "
                f"(differs in {', '.join(changed)}), so this run could not resume it: pass "
                f"another --output, or delete {path.parent} to train {spec.label} anew"
            )
    return None


def registration_problem(settings: ExperimentSettings) -> str | None:
    """Why ``settings.registered_model`` would register nothing, or None when it would.

    Only the ``[experiment] register`` model is registered, and only an autoencoder has a
    bundle to register.
    """
    if settings.registered_model is None:
        return None
    labels = [spec.label for spec in settings.models]
    spec = next((s for s in settings.models if s.label == settings.register), None)
    if settings.register is None:
        return "[experiment] register names no model whose bundle to register"
    if spec is None:
        return (
            f"the registered model is the bundle of {settings.register!r} ([experiment] "
            f"register), which is not among the models run ({', '.join(labels)}); add it to "
            "--models"
        )
    if not spec.is_autoencoder:
        return (
            f"{spec.label!r} ([experiment] register) is a baseline ({spec.model}), which has no "
            "bundle to register; register an autoencoder (multvae, multdae, recvae)"
        )
    return None


def check_requirements(settings: ExperimentSettings, run: Mapping[str, Any] | None = None) -> None:
    """Fail before any training when a configured model cannot run here.

    Args:
        settings: The models.
        run: The job's ``[run]`` options, checked against each autoencoder's trainer.

    Raises:
        ValueError: implicit is missing for ALS/BPR/item-kNN, or a run option does not apply
            to a model (bf16 or compile for RecVAE).
    """
    import importlib.util

    if run is not None:
        from recvae.config import RunOptions
        from recvae.training import check_run_options

        options = RunOptions(**run)
        for spec in settings.models:
            if spec.is_autoencoder:
                try:
                    check_run_options(spec.config, options)  # type: ignore[arg-type]
                except ValueError as exc:
                    raise ValueError(f"[models.{spec.label}]: {exc}") from None

    needs_implicit = [s.label for s in settings.models if s.model in IMPLICIT_BASELINES]
    if needs_implicit and importlib.util.find_spec("implicit") is None:
        raise ValueError(
            f"model(s) {', '.join(needs_implicit)} need implicit: "
            "pip install 'recvae[baselines]', or leave them out with --models"
        )


def _evaluate(
    ranker: Ranker,
    part: Any,
    *,
    ks: Sequence[int],
    popularity: Any,
    device: str = "cpu",
) -> EvaluationResult:
    from recvae.evaluation import evaluate

    return evaluate(
        ranker,
        part.fold_in.matrix,
        part.targets.matrix,
        ks=tuple(ks),
        item_popularity=popularity,
        device=device,
    )


def fit_model(
    spec: ModelSpec,
    job: JobSettings,
    prepared: PreparedData,
    *,
    output_dir: Path,
    tracker: Tracker,
    ks: Sequence[int],
    threads: int | None,
    device: str | None,
    registered_model: str | None = None,
    alias: str | None = None,
    plots: bool = True,
) -> ModelResult:
    """Fit one model, evaluate it (validation, then test once) and log it to the active run.

    Autoencoders train through :func:`pipelines.train_job.run_train` (checkpoints in
    ``output_dir/checkpoints``, so a rerun resumes; the bundle in ``output_dir/bundle``). EASE
    with ``lambdas`` picks its regularization on validation NDCG@100 first. ``threads`` and
    ``device`` override the job's ``[run]`` options when given (baselines default to the CPU).

    Returns:
        The :class:`ModelResult`.

    Raises:
        ValueError: The model cannot be built or trained with these settings.
    """
    split = prepared.split
    popularity = split.train.item_counts()
    test_lengths = split.test.fold_in.user_counts()
    tracker.log_params(spec.params())
    notes: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    bundle_path: Path | None = None
    if spec.is_autoencoder:
        run = dict(job.run)
        if threads is not None:
            run["num_threads"] = threads
        if device:
            run["device"] = device
        model_job = dataclasses.replace(job, model=spec.config.to_dict(), run=run)
        outcome = run_train(
            model_job,
            output_dir=output_dir,
            prepared=prepared,
            on_epoch=tracker.epoch_hook(),
            ks=tuple(ks),
        )
        ranker: Any = outcome.recommender
        validation, test = outcome.validation, outcome.test
        seconds = outcome.train_seconds
        history = list(outcome.recommender.meta.get("history", []))
        notes["best_epoch"] = outcome.recommender.meta.get("best_epoch")
        bundle_path = outcome.bundle_path
        tracker.log_metrics({"best_epoch": float(notes["best_epoch"] or 0)})
    else:
        start = time.perf_counter()
        if spec.model == "ease" and spec.lambdas:
            from recvae.baselines import select_ease_lambda

            selection = select_ease_lambda(
                split.train,
                split.validation,
                spec.lambdas,
                config=spec.config,  # type: ignore[arg-type]
                device=device or "cpu",
            )
            ranker = selection.model
            notes["lambda"] = selection.best
            for step, (value, score) in enumerate(selection.scores.items()):
                tracker.log_metrics(
                    {"lambda_search_lambda": value, "lambda_search_validation_ndcg@100": score},
                    step=step,
                )
            tracker.log_params({"regularization_chosen": selection.best})
        else:
            ranker = build_baseline(spec, threads=threads, device=device or "cpu").fit(split.train)
        seconds = time.perf_counter() - start
        validation = _evaluate(ranker, split.validation, ks=ks, popularity=popularity)
        test = _evaluate(ranker, split.test, ks=ks, popularity=popularity)
    segments = test.by_segment("ndcg@100", test_lengths, 4)
    tracker.log_evaluations(
        validation,
        test,
        test_history_lengths=test_lengths,
        validation_history_lengths=split.validation.fold_in.user_counts(),
    )
    tracker.log_metrics({"train_seconds": seconds})
    result = ModelResult(
        label=spec.label,
        model=spec.model,
        params=spec.params(),
        validation=validation,
        test=test,
        train_seconds=seconds,
        segments=segments,
        history=history,
        notes=notes,
        bundle_path=bundle_path,
        ranker=ranker,
    )
    if plots:
        _model_plots(result, output_dir, tracker, dataset=prepared.name)
    if bundle_path is not None:
        result.logged_model = tracker.log_bundle(
            bundle_path, registered_model=registered_model, alias=alias
        )
    return result


def _model_plots(result: ModelResult, output_dir: Path, tracker: Tracker, *, dataset: str) -> None:
    from pipelines import plots

    plot_dir = output_dir / "plots"
    title = f"{result.label} on {dataset}"
    files = [plot_dir / "metrics_vs_k.png"]
    plots.metrics_vs_k({result.label: result.test}, files[0], title=f"{title} (test users)")
    if result.history:
        files.append(plot_dir / "learning_curve.png")
        plots.learning_curves({result.label: result.history}, files[-1], title=title)
    for path in files:
        tracker.log_artifact(path, "plots")


def tracked_train(
    job: JobSettings,
    *,
    tracker: Tracker | None = None,
    output_dir: Path | None = None,
    registered_model: str | None = None,
    alias: str | None = None,
    prepared: PreparedData | None = None,
) -> TrainOutcome:
    """``recvae train`` with MLflow: one run logged exactly like an experiment's child run.

    With a disabled tracker this is :func:`pipelines.train_job.run_train` (no plots either).

    Args:
        job: The training job (``[model]`` gives the config).
        tracker: MLflow logging (disabled when None).
        output_dir: The run directory (default ``runs/<dataset>-<model>-<time>``).
        registered_model: Register the bundle under this name.
        alias: Move this alias to the new version.
        prepared: The job's data and split, when already prepared.

    Returns:
        The :class:`pipelines.train_job.TrainOutcome`.
    """
    tracker = tracker or Tracker.disabled()
    prepared = prepared or prepare(job)
    config = job.model_config()
    out = output_dir or default_output_dir(job, config.model)
    spec = ModelSpec(label=config.model, config=config)
    device = str(job.run.get("device") or "auto")
    tags = run_tags(
        dataset=prepared.name,
        fingerprint=prepared.fingerprint,
        device=device,
        kind="train",
        model=config.model,
    )
    # The MLflow run writing into `out`: a rerun after `kill -9` ends it KILLED (it stayed
    # RUNNING forever, beside the new run that resumes the checkpoint).
    marker = Path(out) / "mlflow_run.json"
    if tracker.enabled and marker.is_file():
        try:
            previous = json.loads(marker.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            previous = None
        if isinstance(previous, str) and tracker.run_exists(previous):
            tracker.close_stale_run(previous)
    with tracker.run(f"train-{prepared.name}-{config.model}", tags=tags) as run_id:
        if run_id is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"run_id": run_id}))
        tracker.log_params({**job.to_dict(), "split": prepared.split.summary()})
        result = fit_model(
            spec,
            job,
            prepared,
            output_dir=out,
            tracker=tracker,
            ks=(20, 50, 100),
            threads=None,
            device=None,
            registered_model=registered_model,
            alias=alias,
            plots=tracker.enabled,
        )
    return TrainOutcome(
        recommender=result.ranker,  # type: ignore[arg-type]
        split=prepared.split,
        test=result.test,
        validation=result.validation,
        bundle_path=result.bundle_path,
        train_seconds=result.train_seconds,
        dataset=prepared.name,
        registered=result.logged_model if (result.logged_model or {}).get("version") else None,
    )


def default_experiment_dir(dataset: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"experiment-{dataset}-{stamp}"


def run_experiment(
    job: JobSettings,
    settings: ExperimentSettings,
    *,
    tracker: Tracker | None = None,
    output_dir: Path | None = None,
    prepared: PreparedData | None = None,
    report: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run every model of ``settings`` on the split of ``job``; write and log the comparison.

    Writes into ``output_dir``: ``comparison.md``, ``comparison.csv``, ``results.json``,
    ``plots/`` and one folder per model (bundles, checkpoints). A model that fails is recorded
    in ``failures`` (and its MLflow run marked failed); the others still run.

    Args:
        job: Data, protocol and run options (``[data]``, ``[protocol]``, ``[run]``).
        settings: The models and experiment options.
        tracker: MLflow logging (disabled when None).
        output_dir: The run directory; default ``settings.output_dir`` or a new
            ``runs/experiment-<dataset>-<time>``.
        prepared: An already loaded split (notebooks reuse one).
        report: Called with a short progress line per step (the CLI prints them).

    Returns:
        The :class:`ExperimentResult`.

    Raises:
        ValueError: A model cannot run here (checked before any training), bad data.
    """
    tracker = tracker or Tracker.disabled()
    say = report or (lambda message: logger.info("%s", message))
    check_requirements(settings, job.run)
    if output_dir or settings.output_dir:
        check_output_dir(Path(output_dir or settings.output_dir or ""))
    start = time.perf_counter()
    prepared = prepared or prepare(job)
    split = prepared.split
    out = Path(output_dir or settings.output_dir or default_experiment_dir(prepared.name))
    problem = _other_data_problem(out, prepared) or _checkpoint_problem(out, settings, split)
    if problem is not None:
        raise ValueError(problem)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"cannot create the output directory {out}: {exc.strerror or exc}"
        ) from None
    leftover = _previous_labels(out) - {spec.label for spec in settings.models}
    if leftover:
        say(
            f"warning: {out} holds results of an earlier experiment with "
            f"{', '.join(sorted(leftover))}, which this one does not run: their folders are left "
            "as they are, and comparison.md/.csv and results.json will list only this run's "
            "models (use another --output to keep the two apart)"
        )
    summary = split.summary()
    say(
        f"{prepared.name}: {summary['n_train_users']} training users, {summary['n_items']} items, "
        f"{summary['n_validation_users_with_targets']} validation and "
        f"{summary['n_test_users_with_targets']} test users scored; output {out}"
    )
    device = settings.device or str(job.run.get("device") or "auto")
    baseline_device = "cpu" if device == "auto" else device
    results: list[ModelResult] = []
    failures: dict[str, str] = {}
    registered: dict[str, str] | None = None
    tags = run_tags(
        dataset=prepared.name, fingerprint=prepared.fingerprint, device=device, kind="experiment"
    )
    with (
        thread_limits(settings.threads),
        tracker.run(f"experiment-{prepared.name}", tags=tags) as parent_id,
    ):
        tracker.log_params(
            {
                **job.to_dict(),
                "split": summary,
                "experiment": {
                    "models": [spec.label for spec in settings.models],
                    "ks": list(settings.ks),
                    "fairness_k": settings.fairness_k,
                    "threads": settings.threads,
                },
            }
        )
        for spec in settings.models:
            say(f"{spec.label}: fitting {spec.model} ...")
            model_dir = out / spec.label
            try:
                with tracker.run(
                    spec.label, nested=True, tags={**tags, "model": spec.model, "label": spec.label}
                ) as child_id:
                    result = fit_model(
                        spec,
                        job,
                        prepared,
                        output_dir=model_dir,
                        tracker=tracker,
                        ks=settings.eval_ks,
                        threads=settings.threads,
                        device=device if spec.is_autoencoder else baseline_device,
                        registered_model=settings.registered_model
                        if spec.label == settings.register
                        else None,
                        alias=settings.alias,
                        plots=settings.plots,
                    )
                    result.run_id = child_id
            except (ValueError, FloatingPointError, RuntimeError, MemoryError) as exc:
                failures[spec.label] = f"{type(exc).__name__}: {exc}"
                logger.error("model %s failed: %s", spec.label, exc)
                say(f"{spec.label}: FAILED: {exc}")
                continue
            if result.logged_model and "version" in result.logged_model:
                registered = result.logged_model
            results.append(result)
            say(
                f"{spec.label}: test NDCG@100 {_cell(result.test, 'ndcg@100')}, "
                f"Recall@20 {_cell(result.test, 'recall@20')} ({result.train_seconds:.1f}s)"
            )
            tracker.log_metrics(
                {f"{spec.label}_test_{name}": result.test.mean(name) for name in PAPER_METRICS}
            )
        table = comparison_table(results, fairness_k=settings.fairness_k, failures=failures)
        _write_outputs(out, prepared, settings, results, failures, table, tracker)
        seconds = time.perf_counter() - start
        tracker.log_metrics({"experiment_seconds": seconds})
    return ExperimentResult(
        dataset=prepared.name,
        split=summary,
        results=results,
        failures=failures,
        output_dir=out,
        table=table,
        seconds=seconds,
        run_id=parent_id,
        registered=registered,
        tracking_errors=list(tracker.errors),
    )


def _write_outputs(
    out: Path,
    prepared: PreparedData,
    settings: ExperimentSettings,
    results: Sequence[ModelResult],
    failures: Mapping[str, str],
    table: str,
    tracker: Tracker,
) -> None:
    from pipelines import plots

    title = f"{prepared.name}: {prepared.split.test.n_users_with_targets} test users"
    (out / "comparison.md").write_text(f"# {title}\n\n{table}\n")
    rows = comparison_rows(results, fairness_k=settings.fairness_k)
    write_csv(rows, out / "comparison.csv")
    payload = {
        "dataset": prepared.name,
        "data_fingerprint": prepared.fingerprint,
        "split": prepared.split.summary(),
        "models": [
            {
                "label": r.label,
                "params": r.params,
                "train_seconds": r.train_seconds,
                "notes": r.notes,
                "validation": evaluation_metrics("validation", r.validation),
                "test": evaluation_metrics(
                    "test", r.test, history_lengths=prepared.split.test.fold_in.user_counts()
                ),
                "history": r.history,
                "bundle": None if r.bundle_path is None else str(r.bundle_path),
            }
            for r in results
        ],
        "failures": dict(failures),
    }
    (out / "results.json").write_text(json.dumps(_json_safe(payload), indent=2))
    tracker.log_artifact(out / "comparison.md")
    tracker.log_artifact(out / "comparison.csv")
    tracker.log_artifact(out / "results.json")
    if not results or not settings.plots:
        return
    plot_dir = out / "plots"
    figures = [plot_dir / "metrics_vs_k.png", plot_dir / "ndcg_by_activity.png"]
    plots.metrics_vs_k({r.label: r.test for r in results}, figures[0], title=title)
    plots.ndcg_by_activity({r.label: r.segments for r in results}, figures[1], title=title)
    curves = {r.label: r.history for r in results if r.history}
    if curves:
        figures.append(plot_dir / "learning_curves.png")
        plots.learning_curves(curves, figures[-1], title=prepared.name)
    for path in figures:
        tracker.log_artifact(path, "plots")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
