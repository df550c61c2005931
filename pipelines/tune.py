"""``recvae tune``: hyperparameter search on validation NDCG@100 (optuna), test scored once.

The search is described in the config's ``[tune]`` section; the fixed settings of the tuned
model come from its ``[models.<label>]`` table (or the type's defaults)::

    [tune]
    model = "multvae"          # a [models.<label>] label or a model type
    sampler = "tpe"            # "tpe" or "random"
    n_trials = 20              # budget in completed trials (across resumptions) ...
    timeout_minutes = 60       # ... and/or in minutes per invocation
    seed = 0

    [tune.space]
    beta_max = { low = 0.05, high = 0.5, log = true }
    dropout = { low = 0.2, high = 0.7 }
    latent_dim = { choices = [100, 200, 400] }
    hidden_dims = { choices = [[300], [600], [600, 300]] }
    learning_rate = { low = 1e-4, high = 3e-3, log = true }
    epochs = { low = 50, high = 200, step = 50 }

    [tune.spaces.als]          # used by `recvae tune --model als`
    factors = { choices = [64, 128, 256] }
    regularization = { low = 0.01, high = 100.0, log = true }

A range with integer bounds is an integer parameter. Each trial trains on the training users and
is scored on the validation users only; it is logged as a child MLflow run of the tuning run.
When the budget is spent, the best trial's model (its checkpoint when it is an autoencoder) is
scored once on the test users and saved (``best.json``, ``best/bundle``). The tuning run holds
the current best after every invocation: its params as ``best.<name>`` tags (tags, unlike
params, follow a new best after a resumption), ``best_trial``, ``best_validation_ndcg_at_100``
and the test metrics at step = the completed trials, and ``best.json`` (and ``best.toml``).

The study lives in ``<output>/optuna.db`` (sqlite): rerunning the same command resumes it,
retrying once a trial an interruption (Ctrl-C, a killed process) cut short (from its
checkpoint), and counting completed trials against ``n_trials`` (a failed trial does not count).
A resumed study's sampler draws new parameters: its seed derives from ``seed`` and the number of
trials so far. A study may not be resumed with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.experiment import (
    PAPER_METRICS,
    ModelSpec,
    _evaluate,
    build_baseline,
    check_output_dir,
    check_requirements,
    model_spec,
    model_types,
    thread_limits,
)
from pipelines.settings import JobSettings, check_known_keys, is_int, option_flag, table
from pipelines.tracking_hooks import Tracker, evaluation_metrics, run_tags
from pipelines.train_job import PreparedData, prepare

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

SELECT_METRIC = "ndcg@100"
STUDY_NAME = "tune"
_TUNE_KEYS = {
    "model",
    "sampler",
    "n_trials",
    "timeout_minutes",
    "seed",
    "space",
    "spaces",
    "output_dir",
}
_SPACE_KEYS = {"low", "high", "log", "step", "choices"}


# ------------------------------------------------------------------------------ settings
def _is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ParamSpace:
    """One searched parameter: a range (``low``/``high``, optional ``log`` or ``step``) or a
    list of ``choices`` (lists among them, such as ``hidden_dims``, are allowed)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    table: str = field(default="tune.space", compare=False, repr=False)  # for messages

    def __post_init__(self) -> None:
        where = f"[{self.table}] {self.name}"
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError(f"{where}: give either choices or low/high, not both")
            if not self.choices:
                raise ValueError(f"{where}: choices must not be empty")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"{where}: give low and high, or choices")
        if not isinstance(self.log, bool):
            raise ValueError(f"{where}: log must be true or false")
        for bound in (self.low, self.high):
            if not _is_number(bound):
                raise ValueError(f"{where}: low and high must be finite numbers")
        if not self.low <= self.high:
            raise ValueError(f"{where}: low must be <= high, got {self.low} > {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError(f"{where}: log and step cannot be combined")
        if self.step is not None and not (_is_number(self.step) and self.step > 0):
            raise ValueError(f"{where}: step must be a number > 0, got {self.step!r}")

    @property
    def is_int(self) -> bool:
        return is_int(self.low) and is_int(self.high) and (self.step is None or is_int(self.step))

    @classmethod
    def from_dict(cls, name: str, data: Any, table: str = "tune.space") -> ParamSpace:
        """Build from a TOML inline table of the table ``[<table>]``.

        Raises:
            ValueError: Unknown keys or invalid bounds, named.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"[{table}] {name} must be a table such as {{ low = 0.1, high = 0.5 }} "
                "or { choices = [...] }"
            )
        unknown = sorted(set(data) - _SPACE_KEYS)
        if unknown:
            raise ValueError(
                f"[{table}] {name}: unknown key(s) {', '.join(unknown)} "
                f"(valid: {', '.join(sorted(_SPACE_KEYS))})"
            )
        choices = data.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise ValueError(f"[{table}] {name}: choices must be a list, got {choices!r}")
        return cls(
            name=name,
            low=data.get("low"),
            high=data.get("high"),
            log=data.get("log", False),
            step=data.get("step"),
            choices=None if choices is None else tuple(_hashable(c) for c in choices),
            table=table,
        )

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": [_plain(c) for c in self.choices]}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter for ``trial`` (lists come back as tuples)."""
        if self.choices is not None:
            # optuna stores categorical values as JSON-able scalars: encode lists as strings.
            encoded = [json.dumps(_plain(c)) for c in self.choices]
            return _hashable(json.loads(trial.suggest_categorical(self.name, encoded)))
        assert self.low is not None and self.high is not None
        if self.is_int:
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=self.step, log=self.log
        )


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list | tuple) else value


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class TuneSettings:
    """The ``[tune]`` section and the model it tunes."""

    spec: ModelSpec
    space: tuple[ParamSpace, ...]
    sampler: str = "tpe"
    n_trials: int | None = 20
    timeout_minutes: float | None = None
    seed: int = 0
    output_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("[tune.space] is empty: give at least one parameter to search")
        if self.sampler not in ("tpe", "random"):
            raise ValueError(f"[tune] sampler must be 'tpe' or 'random', got {self.sampler!r}")
        if self.n_trials is None and self.timeout_minutes is None:
            raise ValueError("[tune] needs a budget: n_trials and/or timeout_minutes")
        if self.n_trials is not None and (not is_int(self.n_trials) or self.n_trials < 1):
            raise ValueError(f"[tune] n_trials must be an int >= 1, got {self.n_trials!r}")
        if self.timeout_minutes is not None and not (
            _is_number(self.timeout_minutes) and self.timeout_minutes > 0
        ):
            raise ValueError(f"[tune] timeout_minutes must be > 0, got {self.timeout_minutes!r}")
        if not is_int(self.seed):
            raise ValueError(f"[tune] seed must be an int, got {self.seed!r}")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            raise ValueError(f"[tune] output_dir must be a path, got {self.output_dir!r}")
        fields = set(self.spec.config.to_dict()) - {"model"}
        unknown = sorted(p.name for p in self.space if p.name not in fields)
        if unknown:
            raise ValueError(
                f"[tune.space] {', '.join(unknown)}: not a field of {self.spec.model} "
                f"(fields: {', '.join(sorted(fields))})"
            )

    def study_settings(
        self, data_fingerprint: str, protocol: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """What a resumed study must match, as JSON-able values (kept in the study).

        Args:
            data_fingerprint: The interactions' fingerprint.
            protocol: The split's settings (:func:`split_protocol`): a trial's score means
                something only next to trials scored on the same validation users. None gives
                the settings of a study made before the split was recorded.
        """
        settings = {
            "model": self.spec.config.to_dict(),
            "space": {p.name: p.to_dict() for p in self.space},
            "sampler": self.sampler,
            "seed": self.seed,
            "data": data_fingerprint,
        }
        if protocol is not None:
            settings["protocol"] = dict(protocol)
            settings["metric"] = f"validation {SELECT_METRIC}"
        return settings

    def fingerprint(self, data_fingerprint: str, protocol: Mapping[str, Any] | None = None) -> str:
        """A hash of :meth:`study_settings`: the model, its fixed config, the space, the sampler,
        the data and (when given) the split protocol and the selection metric."""
        payload = self.study_settings(data_fingerprint, protocol)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def split_protocol(job: JobSettings, prepared: PreparedData) -> dict[str, Any]:
    """The settings of the split the trials are scored on (those of ``prepared``'s split)."""
    split = prepared.split
    return {
        "seed": int(split.seed),
        "n_heldout": int(split.n_heldout),
        "holdout_fraction": float(split.holdout_fraction),
        "min_user_count": int(job.protocol.min_user_count),
    }


def _settings_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Readable differences between a study's recorded settings and this run's."""
    names = {
        "model": "the model's fixed config",
        "space": "the search space",
        "sampler": "the sampler (--sampler)",
        "seed": "the sampler seed (--sampler-seed)",
        "data": "the data (its fingerprint)",
        "metric": "the selection metric",
    }
    differences = []
    for key, value in current.items():
        if key not in stored or stored[key] == value:
            continue
        if key == "protocol" and isinstance(stored[key], Mapping):
            for field_name, now in value.items():
                before = stored[key].get(field_name)
                if before != now:
                    flag = option_flag(field_name)
                    differences.append(f"split {field_name} ({flag}) {before} -> {now}")
        else:
            differences.append(names.get(key, key))
    return differences


def tune_from_dict(raw: Mapping[str, Any], *, model: str | None = None) -> TuneSettings:
    """Read ``[tune]`` (and the tuned model's ``[models.<label>]`` table) of a parsed config.

    Args:
        raw: The parsed TOML document.
        model: Override ``[tune] model``.

    Raises:
        ValueError: A missing or invalid section, unknown keys, a space that does not fit the
            model.
    """
    section = table(raw, "tune")
    check_known_keys(section, _TUNE_KEYS, "tune")
    label = model or section.get("model")
    if not label:
        raise ValueError("[tune] model is missing: name the model to tune (or pass --model)")
    if not isinstance(label, str):
        raise ValueError(f"[tune] model must be a model label (a string), got {label!r}")
    tables = raw.get("models", {})
    if not isinstance(tables, Mapping):
        tables = {}
    if label not in tables and label not in model_types():
        raise ValueError(
            f"unknown model {label!r} to tune: not a [models.<label>] table of the config "
            f"({', '.join(map(str, tables)) or 'none'}) nor a model type "
            f"({', '.join(model_types())})"
        )
    fixed = tables.get(label, {})
    if not isinstance(fixed, Mapping):
        raise ValueError(f"[models.{label}] must be a table of config fields")
    spec = model_spec(str(label), fixed)
    spaces = section.get("spaces", {})
    if not isinstance(spaces, Mapping):
        raise ValueError("[tune.spaces] must hold one table per model: [tune.spaces.<label>]")
    if label in spaces:
        space_raw, where = spaces[label], f"tune.spaces.{label}"
    elif label == section.get("model"):
        space_raw, where = section.get("space", {}), "tune.space"
    else:
        raise ValueError(
            f"no search space for {label!r}: add [tune.spaces.{label}] "
            f"(spaces given: {', '.join(spaces) or 'none'})"
        )
    if not isinstance(space_raw, Mapping):
        raise ValueError(f"the search space of {label!r} must be a table of parameter ranges")
    return TuneSettings(
        spec=dataclasses.replace(spec, lambdas=()),
        space=tuple(ParamSpace.from_dict(name, value, where) for name, value in space_raw.items()),
        sampler=section.get("sampler", "tpe"),
        n_trials=section.get("n_trials", 20 if "timeout_minutes" not in section else None),
        timeout_minutes=section.get("timeout_minutes"),
        seed=section.get("seed", 0),
        output_dir=section.get("output_dir"),
    )


# ------------------------------------------------------------------------------ results
@dataclass
class TuneResult:
    """The outcome of a (possibly resumed) search.

    Attributes:
        best_trial: The chosen trial's number.
        best_params: Its searched parameters.
        best_config: The full config it trained with.
        validation: Its validation metrics (``validation_ndcg@100``, ...).
        test: Its test metrics, from the single test scoring.
        trials: One record per finished trial (number, state, params, validation value).
        n_new_trials: Trials run by this invocation.
        output_dir: The study's directory.
        seconds: Wall time of this invocation.
        test_reused: The test metrics came from ``best.json`` (the best trial had already been
            scored), not from a new scoring.
        run_id: The MLflow parent run.
        bundle_path: The best autoencoder's bundle.
    """

    best_trial: int
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    validation: dict[str, float]
    test: dict[str, float]
    trials: list[dict[str, Any]]
    n_new_trials: int
    output_dir: Path
    seconds: float
    test_reused: bool = False
    run_id: str | None = None
    bundle_path: Path | None = None
    tracking_errors: list[str] = field(default_factory=list)


def _trial_dir(out: Path, config: Mapping[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:12]
    return out / "trials" / key


def _sampler_seed(seed: int, n_existing: int) -> int:
    """The sampler's seed for a run that finds ``n_existing`` trials in the study.

    A new study uses ``seed`` itself. A resumed one must not: a sampler seeded afresh restarts
    its random stream and would draw the parameter sets of the first run again. Its seed is
    derived from ``seed`` and the number of trials already there, so that the draws are new
    and the same sequence of runs still draws the same parameters.
    """
    if n_existing == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{n_existing}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _sampler(settings: TuneSettings, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded for a study holding ``n_existing`` trials."""
    import optuna

    seed = _sampler_seed(settings.seed, n_existing)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _recover_interrupted(study: optuna.Study) -> int:
    """Queue again, once, the params of every trial an interruption cut short.

    Such a trial is RUNNING (the process was killed; it is marked failed here) or FAIL with the
    ``interrupted`` attribute (Ctrl-C: the objective marked it before optuna failed it). Its
    retry carries ``retry_of``, so that a later resumption does not queue it a second time.

    Returns:
        The number of trials queued again.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    queued = 0
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")):
            continue
        if trial.number in retried or _requeued_before(trial, trials):
            continue
        study.enqueue_trial(
            dict(trial.params), user_attrs={"retry_of": trial.number}, skip_if_exists=False
        )
        logger.warning("trial %d was interrupted; it will run again", trial.number)
        queued += 1
    return queued


def _requeued_before(trial: Any, trials: Sequence[Any]) -> bool:
    """Whether a later trial was queued with ``trial``'s params without a ``retry_of`` mark,
    as studies of earlier versions retried a killed trial."""
    return any(
        later.number > trial.number
        and "retry_of" not in later.user_attrs
        and later.system_attrs.get("fixed_params") == trial.params
        for later in trials
    )


def _complete(study: optuna.Study) -> int:
    """The trials that count against ``n_trials``: those that completed."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class _QuietInterruptedTrials(logging.Filter):
    """Drops optuna's "Trial N failed" records (a traceback among them) for trials that Ctrl-C
    cut short: the command reports the interruption itself and exits like the others."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


def _finished(study: optuna.Study) -> list[Any]:
    from optuna.trial import TrialState

    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        and not trial.user_attrs.get("interrupted")
    ]


def _fit(
    spec: ModelSpec,
    job: JobSettings,
    prepared: PreparedData,
    *,
    checkpoint_dir: Path,
    threads: int | None,
    device: str,
    on_epoch: Any = None,
) -> tuple[Any, float]:
    """Fit on the training users (autoencoders: best epoch on validation); ``(ranker, s)``."""
    split = prepared.split
    start = time.perf_counter()
    if spec.is_autoencoder:
        from recvae.training import train

        options = job.run_options(
            checkpoint_dir=str(checkpoint_dir),
            **({"num_threads": threads} if threads is not None else {}),
            **({"device": device} if device else {}),
        )
        ranker = train(
            split.train,
            spec.config,  # type: ignore[arg-type]
            validation=split.validation,
            options=options,
            on_epoch=on_epoch,
        )
    else:
        ranker = build_baseline(
            spec, threads=threads, device="cpu" if device == "auto" else device
        ).fit(split.train)
    return ranker, time.perf_counter() - start


def run_tune(
    job: JobSettings,
    settings: TuneSettings,
    *,
    tracker: Tracker | None = None,
    output_dir: Path | None = None,
    prepared: PreparedData | None = None,
    threads: int | None = None,
    device: str | None = None,
    registered_model: str | None = None,
    alias: str | None = None,
    report: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search the space on validation NDCG@100, then score the chosen config once on test.

    Args:
        job: Data, protocol and run options.
        settings: The model, space, sampler and budget.
        tracker: MLflow logging (disabled when None): a parent run, one child run per trial.
        output_dir: The study directory (default ``runs/tune-<dataset>-<label>``, stable, so
            that rerunning resumes).
        prepared: An already loaded split.
        threads: torch, BLAS and implicit threads.
        device: Device of autoencoders (default the job's).
        registered_model: Register the best autoencoder's bundle under this name.
        alias: Move this alias to it.
        report: Called with a progress line per trial.

    Returns:
        The :class:`TuneResult`.

    Raises:
        ValueError: The study directory holds a study with other settings, or a model cannot
            run here, or no trial finished.
    """
    import optuna

    tracker = tracker or Tracker.disabled()
    say = report or (lambda message: logger.info("%s", message))
    check_requirements(_as_experiment(settings), job.run)
    start = time.perf_counter()
    prepared = prepared or prepare(job)
    split = prepared.split
    label = settings.spec.label
    out = Path(output_dir or settings.output_dir or Path("runs") / f"tune-{prepared.name}-{label}")
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or str(job.run.get("device") or "auto")
    protocol = split_protocol(job, prepared)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(out / "optuna.db", settings)
    _check_study_settings(study, settings, prepared.fingerprint, protocol, out=out, say=say)
    recovered = _recover_interrupted(study)
    study.sampler = _sampler(settings, n_existing=len(study.trials))
    done = _complete(study)
    finished_before = len(_finished(study))
    remaining = None if settings.n_trials is None else max(0, settings.n_trials - done)
    say(
        f"study {out / 'optuna.db'}: {done} trial(s) complete"
        + (f" ({finished_before - done} failed)" if finished_before > done else "")
        + (f", {recovered} interrupted one(s) queued again" if recovered else "")
        + (f"; {remaining} to run" if remaining is not None else "")
        + (f", at most {settings.timeout_minutes:g} min" if settings.timeout_minutes else "")
    )
    tags = run_tags(
        dataset=prepared.name,
        fingerprint=prepared.fingerprint,
        device=device,
        kind="tune",
        model=settings.spec.model,
    )
    parent_id = study.user_attrs.get("mlflow_run_id")
    if parent_id and not tracker.run_exists(parent_id):
        parent_id = None  # another store (or tracking off then): start a new parent run
    popularity = split.train.item_counts()
    with (
        thread_limits(threads),
        tracker.run(
            f"tune-{prepared.name}-{label}", run_id=parent_id, tags=None if parent_id else tags
        ) as run_id,
    ):
        if run_id and not parent_id:
            study.set_user_attr("mlflow_run_id", run_id)
            tracker.log_params(
                {
                    **job.to_dict(),
                    "split": split.summary(),
                    "tune": {
                        "label": label,
                        "sampler": settings.sampler,
                        "n_trials": settings.n_trials,
                        "timeout_minutes": settings.timeout_minutes,
                        "seed": settings.seed,
                        "metric": f"validation {SELECT_METRIC}",
                    },
                    "space": {p.name: json.dumps(p.to_dict()) for p in settings.space},
                    "base": settings.spec.config.to_dict(),
                }
            )
        for trial in study.get_trials(deepcopy=False):
            child = trial.user_attrs.get("mlflow_run_id")
            if child and trial.user_attrs.get("interrupted"):
                tracker.close_stale_run(child)  # a killed trial's run never ended itself
        best_so_far = _best_value(study)
        quiet = _QuietInterruptedTrials()

        def objective(trial: optuna.Trial) -> float:
            try:
                return run_trial(trial)
            except KeyboardInterrupt:
                # optuna fails the trial next, and a finished trial cannot be changed: mark it
                # now, so that the next run retries its params (see _recover_interrupted).
                trial.set_user_attr("interrupted", True)
                quiet.numbers.add(trial.number)
                say(f"trial {trial.number}: interrupted; rerunning the command retries it")
                raise

        def run_trial(trial: optuna.Trial) -> float:
            nonlocal best_so_far
            params = {p.name: p.suggest(trial) for p in settings.space}
            config = settings.spec.config.replace(**params)
            spec = ModelSpec(label=label, config=config)
            trial_dir = _trial_dir(out, config.to_dict())
            trial.set_user_attr("config", _jsonable(config.to_dict()))
            with tracker.run(
                f"trial-{trial.number}", nested=True, tags={**tags, "trial": str(trial.number)}
            ) as child_id:
                if child_id:
                    trial.set_user_attr("mlflow_run_id", child_id)
                tracker.log_params({"trial": trial.number, **spec.params()})
                ranker, seconds = _fit(
                    spec,
                    job,
                    prepared,
                    checkpoint_dir=trial_dir,
                    threads=threads,
                    device=device,
                    on_epoch=tracker.epoch_hook(),
                )
                validation = _evaluate(
                    ranker, split.validation, ks=(20, 50, 100), popularity=popularity
                )
                metrics = evaluation_metrics("validation", validation)
                value = validation.mean(SELECT_METRIC)
                tracker.log_metrics({**metrics, "train_seconds": seconds})
            if not math.isfinite(value):
                raise ValueError("the validation users have no targets: nothing to select on")
            trial.set_user_attr("validation", _jsonable(_paper(metrics, "validation")))
            trial.set_user_attr("train_seconds", seconds)
            if value > best_so_far:
                _drop_checkpoint(out, keep=trial_dir)
                best_so_far = value
            elif trial_dir.exists():
                shutil.rmtree(trial_dir, ignore_errors=True)
            say(
                f"trial {trial.number}: validation {SELECT_METRIC} {value:.4f} "
                f"(best {best_so_far:.4f}) {params} {seconds:.1f}s"
            )
            return value

        if remaining is None or remaining > 0:
            from optuna.study import _optimize

            optuna_log = logging.getLogger(_optimize.__name__)  # where optuna logs failures
            optuna_log.addFilter(quiet)
            try:
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=None
                    if settings.timeout_minutes is None
                    else settings.timeout_minutes * 60,
                    catch=(ValueError, FloatingPointError, RuntimeError),
                    gc_after_trial=True,
                )
            finally:
                optuna_log.removeFilter(quiet)
        n_new = len(_finished(study)) - finished_before
        result = _finish(
            study,
            settings,
            job,
            prepared,
            out=out,
            tracker=tracker,
            threads=threads,
            device=device,
            registered_model=registered_model,
            alias=alias,
            say=say,
        )
        result.n_new_trials = n_new
        result.run_id = run_id
        result.seconds = time.perf_counter() - start
    result.tracking_errors = list(tracker.errors)
    return result


def _open_study(path: Path, settings: TuneSettings) -> optuna.Study:
    """Create or load the study in the sqlite file ``path``.

    Raises:
        ValueError: ``path`` is not a sqlite database, or not one of optuna's.
    """
    import sqlite3
    from contextlib import closing

    import optuna
    import sqlalchemy.exc

    if path.exists():
        problem = None
        try:
            # Read-only: a file that is not a study must be left as it is.
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                rows = db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                tables = {str(row[0]) for row in rows}
        except sqlite3.Error as exc:
            problem = f"not a sqlite database ({exc})"
        else:
            if tables and not {"studies", "trials"} <= tables:
                problem = "a sqlite database without optuna's tables"
        if problem:
            raise ValueError(
                f"{path} is not an optuna study: {problem}; move it away, or pass another "
                "--output to start a new search"
            )
    try:
        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{path.resolve()}",
            direction="maximize",
            sampler=_sampler(settings),
            load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.OptunaError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot open the study {path}: {first}") from exc


def _check_study_settings(
    study: optuna.Study,
    settings: TuneSettings,
    data_fingerprint: str,
    protocol: Mapping[str, Any],
    *,
    out: Path,
    say: Callable[[str], None],
) -> None:
    """Record this run's settings in a new study; refuse to resume one made with others.

    Raises:
        ValueError: The study's model, space, sampler, data or split differ (each named).
    """
    fingerprint = settings.fingerprint(data_fingerprint, protocol)
    current = settings.study_settings(data_fingerprint, protocol)
    attrs = study.user_attrs
    stored = attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("settings", current)
        study.set_user_attr("model", settings.spec.config.to_dict())
        study.set_user_attr("space", {p.name: p.to_dict() for p in settings.space})
        return
    if stored == fingerprint:
        return
    if "settings" not in attrs and stored == settings.fingerprint(data_fingerprint):
        # A study from before the split was recorded: its model, space and data match, its
        # split cannot be checked. Record this one so that later resumptions are checked.
        say(
            f"warning: {out / 'optuna.db'} does not record its split; assuming it is this one "
            f"({', '.join(f'{k} {v}' for k, v in protocol.items())})"
        )
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("settings", current)
        return
    previous = attrs.get("settings")
    differences = (
        _settings_differences(previous, current)
        if isinstance(previous, Mapping)
        else ["model, space, sampler, seed or data"]
    )
    raise ValueError(
        f"{out} holds a study of other settings ({'; '.join(differences) or 'fingerprint'} "
        f"differ{'s' if len(differences) == 1 else ''}): its trials were scored under those; "
        "rerun with the study's settings, or pass another --output to start a new search"
    )


def _as_experiment(settings: TuneSettings) -> Any:
    from pipelines.experiment import ExperimentSettings

    return ExperimentSettings(models=(settings.spec,))


def _best_value(study: optuna.Study) -> float:
    from optuna.trial import TrialState

    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max((v for v in values if v is not None), default=-math.inf)


def _drop_checkpoint(out: Path, *, keep: Path) -> None:
    """Remove every trial checkpoint but ``keep`` (the new best), saving disk."""
    trials = out / "trials"
    if not trials.is_dir():
        return
    for path in trials.iterdir():
        if path != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _paper(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    names = [f"{prefix}_{n}" for n in PAPER_METRICS] + [f"{prefix}_{n}_se" for n in PAPER_METRICS]
    return {name: metrics[name] for name in names if name in metrics}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finish(
    study: optuna.Study,
    settings: TuneSettings,
    job: JobSettings,
    prepared: PreparedData,
    *,
    out: Path,
    tracker: Tracker,
    threads: int | None,
    device: str,
    registered_model: str | None,
    alias: str | None,
    say: Callable[[str], None],
) -> TuneResult:
    """Score the best trial once on the test users (or reuse that score) and record it."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"no trial finished in {out}: see the log for the failures")
    best = study.best_trial
    assert best.value is not None  # a COMPLETE trial has its value
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": _decode(settings, t.params),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    best_file = out / "best.json"
    previous = json.loads(best_file.read_text()) if best_file.is_file() else None
    config_dict = dict(best.user_attrs["config"])
    if previous and previous.get("trial") == best.number and previous.get("test"):
        say(f"best trial {best.number} was already scored on the test users: {best_file}")
        bundle = previous.get("bundle")
        if settings.spec.is_autoencoder:
            _write_best_toml(out, job, config_dict, best.number)
        # Again: a new tuning run (another store, or tracking off before) has none of it yet,
        # and an earlier recording may have failed (MLflow errors do not stop the search).
        _record_best(tracker, previous, value=best.value, n_complete=len(complete), out=out)
        return TuneResult(
            best_trial=best.number,
            best_params=dict(previous["params"]),
            best_config=config_dict,
            validation=dict(previous["validation"]),
            test=dict(previous["test"]),
            trials=trials,
            n_new_trials=0,
            output_dir=out,
            seconds=0.0,
            test_reused=True,
            bundle_path=Path(bundle) if bundle else None,
        )
    spec = ModelSpec(label=settings.spec.label, config=_config_from(settings, config_dict))
    say(
        f"best trial {best.number} (validation {SELECT_METRIC} {best.value:.4f}): "
        "scoring the test users"
    )
    # An autoencoder's checkpoint of the best trial is kept, so this loads rather than retrains.
    ranker, _ = _fit(
        spec,
        job,
        prepared,
        checkpoint_dir=_trial_dir(out, config_dict),
        threads=threads,
        device=device,
    )
    split = prepared.split
    popularity = split.train.item_counts()
    test = _evaluate(ranker, split.test, ks=(20, 50, 100), popularity=popularity)
    test_metrics = evaluation_metrics(
        "test", test, history_lengths=split.test.fold_in.user_counts()
    )
    bundle_path: Path | None = None
    if spec.is_autoencoder:
        # What `recvae train` records, so that `recvae evaluate` re-creates this split.
        ranker.meta.update(
            {
                "dataset": prepared.name,
                "data_fingerprint": prepared.fingerprint,
                "split": split.summary(),
                "job": job.to_dict(),
            }
        )
        bundle_path = ranker.save(out / "best" / "bundle", overwrite=True)
    record = {
        "trial": best.number,
        "params": _decode(settings, best.params),
        "config": config_dict,
        "validation": dict(best.user_attrs.get("validation", {})),
        "test": _jsonable(test_metrics),
        "bundle": None if bundle_path is None else str(bundle_path),
    }
    tmp = best_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(best_file)
    if spec.is_autoencoder:
        _write_best_toml(out, job, config_dict, best.number)
    _record_best(tracker, record, value=best.value, n_complete=len(complete), out=out)
    if bundle_path is not None:
        tracker.log_bundle(bundle_path, registered_model=registered_model, alias=alias)
    return TuneResult(
        best_trial=best.number,
        best_params=record["params"],
        best_config=config_dict,
        validation=record["validation"],
        test=record["test"],
        trials=trials,
        n_new_trials=0,
        output_dir=out,
        seconds=0.0,
        bundle_path=bundle_path,
    )


def _record_best(
    tracker: Tracker, record: Mapping[str, Any], *, value: float, n_complete: int, out: Path
) -> None:
    """Record the current best on the tuning run, so that it reads right after any resumption.

    MLflow params cannot change once logged, and a resumed study may find a new best, so the
    best trial's params are tags ``best.<name>`` (set again on every invocation). The metrics
    ``best_trial``, ``best_validation_ndcg_at_100`` and the test metrics are logged at step = the
    completed trials, so their latest value is the current best and their history the best so
    far. ``best.json`` and ``best.toml`` (autoencoders) are logged again, replacing the earlier
    copies. A tuning run from before the best went into tags also holds ``best.*`` params: they
    stay those of its first best (MLflow cannot change or delete them); its tags are current.

    Args:
        tracker: The tracker whose tuning run is active.
        record: The best trial's record (``best.json``: ``trial``, ``params``, ``test``).
        value: The best trial's validation NDCG@100.
        n_complete: The completed trials of the study.
        out: The study directory.
    """
    tracker.set_tags({f"best.{name}": _tag_value(v) for name, v in record["params"].items()})
    best = {"best_trial": float(record["trial"]), f"best_validation_{SELECT_METRIC}": value}
    # best.json keeps a NaN metric (a segment without users) as null: not a number to log.
    test = {name: v for name, v in record["test"].items() if _is_number(v)}
    tracker.log_metrics({**best, **test}, step=n_complete)
    for name in ("best.json", "best.toml"):
        if (out / name).is_file():
            tracker.log_artifact(out / name)


def _tag_value(value: Any) -> str:
    """A best param as a tag's text (lists as JSON, as params are logged)."""
    return json.dumps(_plain(value)) if isinstance(value, list | tuple) else str(value)


def _decode(settings: TuneSettings, params: Mapping[str, Any]) -> dict[str, Any]:
    """optuna's stored params as the config values (categorical choices are JSON strings)."""
    categorical = {p.name for p in settings.space if p.choices is not None}
    return {
        name: json.loads(value) if name in categorical and isinstance(value, str) else value
        for name, value in params.items()
    }


def _config_from(settings: TuneSettings, config: Mapping[str, Any]) -> Any:
    return settings.spec.config.from_dict(dict(config))


def trials_table(trials: Sequence[Mapping[str, Any]], *, limit: int | None = None) -> str:
    """A plain-text table of trials, best validation value first."""
    done = [t for t in trials if t["value"] is not None]
    done.sort(key=lambda t: -t["value"])
    if limit is not None:
        done = done[:limit]
    lines = [f"{'trial':>5}  {'val ' + SELECT_METRIC:>14}  params"]
    for t in done:
        lines.append(f"{t['number']:>5}  {t['value']:>14.4f}  {json.dumps(t['params'])}")
    return "\n".join(lines)


def result_summary(result: TuneResult) -> list[str]:
    """Printable lines: the choice and its single test scoring."""
    lines = [f"best trial   {result.best_trial}: {json.dumps(result.best_params)}"]
    for name in PAPER_METRICS:
        val = result.validation.get(f"validation_{name}")
        test = result.test.get(f"test_{name}")
        se = result.test.get(f"test_{name}_se")
        val_text = "" if val is None else f"validation {val:.4f}   "
        test_text = "" if test is None else f"test {test:.4f} ± {se or 0:.4f}"
        lines.append(f"  {name:<10} {val_text}{test_text}")
    return lines


def _write_best_toml(out: Path, job: JobSettings, config: dict[str, Any], trial: int) -> None:
    """``<out>/best.toml``: ``recvae train --config`` it to retrain the best trial's model on
    this split with all its settings (``hidden_dims`` among them, which has no flag)."""
    from pipelines.settings import to_toml

    text = to_toml({**job.to_dict(), "model": config})
    tmp = out / "best.toml.tmp"
    tmp.write_text(
        f"# The best trial ({trial}) of the study in {out}: recvae train --config this\n{text}"
    )
    tmp.replace(out / "best.toml")
