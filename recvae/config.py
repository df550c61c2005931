"""Frozen configuration objects for models and runs.

Every hyperparameter lives in one frozen dataclass with a default and a comment. The same names
appear in TOML presets, in MLflow params and in a bundle's ``config.json``; ``to_dict`` /
``from_dict`` round-trip through JSON and reject unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

__all__ = [
    "ModelConfig",
    "MultVAEConfig",
    "MultDAEConfig",
    "RunOptions",
    "config_from_dict",
    "check_field_types",
    "did_you_mean",
    "register_config",
    "CONFIG_TYPES",
]

CONFIG_TYPES: dict[str, type[ModelConfig]] = {}
# Models whose config lives in another module (imported on first use, keeping this one light).
_CONFIG_MODULES: dict[str, str] = {"recvae": "recvae.recvae_model"}


def register_config(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: make a config type loadable by its ``model`` name."""
    CONFIG_TYPES[cls.model] = cls
    return cls


def did_you_mean(unknown: Iterable[str], valid: Iterable[str]) -> str:
    """A hint for mistyped names: ``"; did you mean 'epochs'?"`` (or
    ``"; did you mean 'epochs' for 'epoch', 'seed' for 'sed'?"``), or ``""`` when no unknown
    name is close to a valid one.

    Args:
        unknown: The names that were not recognized.
        valid: The names that would have been.
    """
    names = [str(name) for name in unknown]
    choices = sorted(set(valid))
    pairs = []
    for name in names:
        match = difflib.get_close_matches(name, choices, n=1)
        if match:
            pairs.append((name, match[0]))
    if not pairs:
        return ""
    if len(names) == 1:
        return f"; did you mean '{pairs[0][1]}'?"
    return "; did you mean " + ", ".join(f"'{m}' for '{n}'" for n, m in pairs) + "?"


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field '{name}': {message}")


def _is_int(value: Any) -> bool:
    """An integer (a Python or NumPy one), not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (a Python or NumPy int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: Seeds are stored as signed 64-bit integers by torch and NumPy: [0, 2**63).
SEED_LIMIT = 2**63


def _check_seed(seed: Any, argument: str = "seed") -> int:
    """``seed`` as a Python int, checked to lie in ``[0, 2**63)``.

    Raises:
        ValueError: ``seed`` is not an integer (a bool counts as none) or is out of range; the
            message names ``argument``.
    """
    if not _is_int(seed) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{argument} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


#: Per-user metrics that :func:`recvae.evaluate` computes (the base of ``"ndcg@100"``).
PER_USER_METRICS: tuple[str, ...] = (
    "recall",
    "recall_plain",
    "ndcg",
    "hit_rate",
    "mrr",
    "precision",
)


def _parse_metric(
    metric: Any, argument: str, names: tuple[str, ...] = PER_USER_METRICS
) -> tuple[str, int]:
    """``"ndcg@100"`` -> ``("ndcg", 100)``, with the base one of ``names``.

    Raises:
        ValueError: ``metric`` is not ``"<name>@<k>"`` with a known name and an integer k >= 1;
            the message names ``argument``.
    """
    base, _, k_text = metric.partition("@") if isinstance(metric, str) else ("", "", "")
    if base not in names or not k_text.isdigit() or int(k_text) < 1:
        raise ValueError(
            f"{argument} must look like 'ndcg@100': '<metric>@<k>' with metric one of "
            f"{', '.join(names)} and k an integer >= 1, got {metric!r}"
        )
    return base, int(k_text)


_FIELD_HINTS: dict[type, dict[str, Any]] = {}  # config class -> resolved annotations


def _field_hints(cls: type) -> dict[str, Any]:
    hints = _FIELD_HINTS.get(cls)
    if hints is None:
        hints = _FIELD_HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` has the annotated type (the simple types configs use; others pass),
    and the value to store: NumPy integers and floats become Python ``int`` and ``float``
    (grid searches over ``np.arange`` give them), a list for a tuple becomes a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return (True, int(value)) if _is_int(value) else (False, value)
    if hint is float:
        if not _is_real(value):
            return False, value
        return True, value if isinstance(value, int | float) else float(value)
    if hint is str:
        return isinstance(value, str), value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            ok, conformed = _conform(value, arg)
            if ok:
                return True, conformed
        return False, value
    if origin is tuple:
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            return False, value
        if len(args) == 2 and args[1] is Ellipsis:
            parts = [_conform(v, args[0]) for v in value]
        elif len(value) == len(args):
            parts = list(map(_conform, value, args))
        else:
            return False, value
        if not all(ok for ok, _ in parts):
            return False, value
        return True, tuple(conformed for _, conformed in parts)
    return True, value


def _describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (types.UnionType, typing.Union):
        parts = [_describe_type(a) for a in args if a is not type(None)]
        unset = " or unset" if type(None) in args else ""
        return " or ".join(parts) + unset
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe_type(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return str(hint)


def check_field_types(config: Any) -> None:
    """Check every dataclass field of ``config`` against its annotation. Values from TOML,
    JSON or a command line can be of any type; this names the field before any comparison of a
    wrongly typed value fails obscurely. Accepted values are stored normalized: a list given for
    a tuple field becomes a tuple, and NumPy integers and floats (``numbers.Integral`` and
    ``numbers.Real``, not bool) become Python ``int`` and ``float``.

    Raises:
        ValueError: ``invalid config field '<name>': must be <type>, got <value>``.
    """
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints.get(f.name, Any), getattr(config, f.name)
        ok, conformed = _conform(value, hint)
        _check(ok, f.name, f"must be {_describe_type(hint)}, got {value!r}")
        if conformed is not value:
            object.__setattr__(config, f.name, conformed)  # frozen dataclass


def _check_layer_sizes(hidden_dims: tuple[int, ...], latent_dim: int) -> None:
    _check(
        all(isinstance(d, int) and d >= 1 for d in hidden_dims),
        "hidden_dims",
        "must be positive ints",
    )
    _check(isinstance(latent_dim, int) and latent_dim >= 1, "latent_dim", ">= 1")


def _check_activation(activation: str) -> None:
    _check(
        activation in ("tanh", "relu", "sigmoid", "silu"),
        "activation",
        "must be one of tanh, relu, sigmoid, silu",
    )


class _NamedConfig(Protocol):
    """A config dataclass with a ``model`` name: the model configs here, the baseline configs."""

    model: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


_ConfigT = TypeVar("_ConfigT", bound=_NamedConfig)


def _config_to_dict(config: _NamedConfig) -> dict[str, Any]:
    """``{"model": config.model, field: value, ...}``, tuples as lists (JSON-ready)."""
    out: dict[str, Any] = {"model": config.model}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _config_fields_from_dict(cls: type[_NamedConfig], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without its (optional) ``model`` key, checked against the fields of ``cls``.

    Raises:
        ValueError: A ``model`` other than ``cls.model``, or keys that are not fields.
    """
    data = dict(data)
    name = data.pop("model", cls.model)
    if name != cls.model:
        raise ValueError(f"config is for model '{name}', not '{cls.model}'")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config field(s) for {cls.model}: {', '.join(unknown)}"
            f"{did_you_mean(unknown, names)} (valid: {', '.join(sorted(names)) or 'none'})"
        )
    return data


def _replace_config(config: _ConfigT, changes: dict[str, Any]) -> _ConfigT:
    """``dataclasses.replace`` that names unknown fields in a ``ValueError``."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(
            f"unknown config field(s) for {config.model}: {', '.join(unknown)}"
            f"{did_you_mean(unknown, names)}"
        )
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Fields shared by every trainable model (optimization, schedule, seed)."""

    model: ClassVar[str] = "base"

    epochs: int = 200  # passes over the training users
    batch_size: int = 500  # users per gradient step
    learning_rate: float = 1e-3  # Adam step size
    weight_decay: float = 0.0  # L2 penalty lambda * sum(W**2) on weight matrices (paper style)
    dropout: float = 0.5  # dropout on the normalized input (the "denoising")
    # Stop after this many validations (one every RunOptions.validate_every epochs) without a
    # better validation score.
    patience: int | None = None
    select_metric: str = "ndcg@100"  # validation metric that picks the best epoch
    seed: int = 98765  # seeds weights, shuffling, dropout and sampling

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an int >= 1")
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            "batch_size",
            "must be an int >= 1",
        )
        _check(0 < self.learning_rate < math.inf, "learning_rate", "must be finite and > 0")
        _check(0 <= self.weight_decay < math.inf, "weight_decay", "must be finite and >= 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(
            self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
            "patience",
            "must be None or an int >= 1",
        )
        _check(
            _is_int(self.seed) and 0 <= self.seed < SEED_LIMIT,
            "seed",
            f"must be an int in [0, 2**63), got {self.seed!r}",
        )
        try:
            _parse_metric(self.select_metric, "select_metric")
        except ValueError as exc:
            raise ValueError(f"invalid config field 'select_metric': {exc}") from None

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the ``model`` name."""
        return _config_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (``model`` key optional but must match).

        Raises:
            ValueError: unknown keys, a wrong model name or an invalid value.
        """
        kwargs: dict[str, Any] = {}
        for key, value in _config_fields_from_dict(cls, data).items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ValueError(str(exc)) from exc

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return _replace_config(self, changes)


@register_config
@dataclass(frozen=True, slots=True)
class MultVAEConfig(ModelConfig):
    """Mult-VAE (Liang et al. 2018). Defaults are the paper's: [I, 600, 200, 600, I], tanh.

    KL annealing: ``beta = min(beta_max, step / anneal_steps)``. With ``anneal_steps`` set this is
    the paper's absolute schedule (200000 on ML-20M). When it is None the schedule is relative:
    ``anneal_steps = anneal_cap_fraction * total_steps / beta_max``, so the cap is reached at
    ``anneal_cap_fraction`` of training whatever the dataset size (0.86, the paper's ML-20M shape).
    ``beta_search`` anneals to 1.0 over the whole run and records validation NDCG against beta.
    """

    model: ClassVar[str] = "multvae"

    hidden_dims: tuple[int, ...] = (600,)  # encoder hidden sizes; the decoder mirrors them
    latent_dim: int = 200  # size of z
    beta_max: float = 0.2  # anneal cap for the KL weight
    anneal_steps: int | None = None  # absolute steps to reach beta=1 slope; None = relative
    anneal_cap_fraction: float = 0.86  # relative schedule: fraction of training at the cap
    beta_search: bool = False  # anneal to 1.0 and report the best beta on validation
    activation: Literal["tanh", "relu", "sigmoid", "silu"] = "tanh"

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_layer_sizes(self.hidden_dims, self.latent_dim)
        _check(0.0 <= self.beta_max <= 10.0, "beta_max", "must be in [0, 10]")
        _check(
            self.anneal_steps is None
            or (isinstance(self.anneal_steps, int) and self.anneal_steps > 0),
            "anneal_steps",
            "must be None or an int > 0",
        )
        _check(0.0 < self.anneal_cap_fraction <= 1.0, "anneal_cap_fraction", "must be in (0, 1]")
        _check_activation(self.activation)


@register_config
@dataclass(frozen=True, slots=True)
class MultDAEConfig(ModelConfig):
    """Mult-DAE (Liang et al. 2018): [I, 200, I], tanh, dropout 0.5, L2 weight decay.

    The paper's "lambda = 0.01" is the authors' notebook's ``lam=0.01 / batch_size`` on a
    batch-mean loss plus ``2 * l2_loss`` (``sum(W**2) / 2``): ``0.01 / 500 = 2e-5`` times
    ``sum(W**2)`` at batch 500, which is ``weight_decay`` here (0.01 was 500 times that).
    """

    model: ClassVar[str] = "multdae"

    hidden_dims: tuple[int, ...] = ()  # hidden sizes before the code layer
    latent_dim: int = 200  # size of the code layer
    weight_decay: float = 2e-5
    activation: Literal["tanh", "relu", "sigmoid", "silu"] = "tanh"

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check_layer_sizes(self.hidden_dims, self.latent_dim)
        _check_activation(self.activation)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build the right config type from a dict with a ``model`` key.

    Raises:
        ValueError: missing or unknown model name, unknown fields or invalid values.
    """
    name = data.get("model")
    if name not in CONFIG_TYPES and name in _CONFIG_MODULES:
        importlib.import_module(_CONFIG_MODULES[name])  # registers the config on import
    if name not in CONFIG_TYPES:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(sorted(CONFIG_TYPES))})")
    return CONFIG_TYPES[name].from_dict(data)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Settings that do not change the model: where and how a run executes."""

    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    num_threads: int | None = None  # torch intra-op threads on the CPU; None = torch default
    checkpoint_dir: str | None = None  # write a checkpoint every epoch here and resume from it
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always writes one)
    progress: bool = True  # show a progress bar on a terminal
    eval_batch_size: int = 2048  # users per scoring batch during validation
    validate_every: int = 1  # epochs between validation passes
    precision: str = "fp32"  # "bf16": bf16 autocast for training's forward pass (GPU speed)
    compile: bool = False  # torch.compile the training forward pass (pays on long GPU runs)
    # Training pads the logits to a multiple of this many items (-inf columns, exact; see
    # recvae.model.padded_output); 1 turns it off; None: 64 where it pays (CUDA, and the CPU
    # with more than one thread), else 1.
    item_multiple: int | None = None
    distributed: bool = False  # DDP over the torch.distributed group (see recvae.distributed)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form tags, never used by training

    def __post_init__(self) -> None:
        _check(
            isinstance(self.device, str)
            and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            f"device {self.device!r} is not a device: use auto, cpu, cuda or cuda:N",
        )
        # A TOML [run] table can hold any type: check the type before comparing.
        for name in ("num_threads", "eval_batch_size", "validate_every", "checkpoint_every"):
            value = getattr(self, name)
            optional = name == "num_threads"
            _check(
                (value is None and optional) or (_is_int(value) and value >= 1),
                name,
                "must be an integer >= 1" + (" or unset" if optional else ""),
            )
        _check(
            self.item_multiple is None or (_is_int(self.item_multiple) and self.item_multiple >= 1),
            "item_multiple",
            "must be an integer >= 1 (1: no padding) or unset (automatic)",
        )
        for name in ("num_threads", "eval_batch_size", "validate_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and type(value) is not int:
                object.__setattr__(self, name, int(value))  # a NumPy integer: store an int
        if self.item_multiple is not None and type(self.item_multiple) is not int:
            object.__setattr__(self, "item_multiple", int(self.item_multiple))
        for name in ("progress", "compile", "distributed"):
            _check(isinstance(getattr(self, name), bool), name, "must be true or false")
        _check(
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, str | os.PathLike),
            "checkpoint_dir",
            "must be a path",
        )
        _check(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")
