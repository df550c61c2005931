"""Frozen configuration objects for models and runs.

Every hyperparameter lives in one frozen dataclass with a default and a comment. The same names
appear in TOML presets, in MLflow params and in a bundle's ``config.json``; ``to_dict`` /
``from_dict`` round-trip through JSON and reject unknown keys.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

__all__ = [
    "ModelConfig",
    "MultVAEConfig",
    "MultDAEConfig",
    "RunOptions",
    "config_from_dict",
    "check_field_types",
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


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field '{name}': {message}")


def _is_int(value: Any) -> bool:
    """An integer, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


_FIELD_HINTS: dict[type, dict[str, Any]] = {}  # config class -> resolved annotations


def _field_hints(cls: type) -> dict[str, Any]:
    hints = _FIELD_HINTS.get(cls)
    if hints is None:
        hints = _FIELD_HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (the simple types configs use; others pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return any(_type_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_type_matches, value, args))
    return True


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
    """Check every dataclass field of ``config`` against its annotation (a list given for a
    tuple field becomes a tuple). Values from TOML, JSON or a command line can be of any type;
    this names the field before any comparison of a wrongly typed value fails obscurely.

    Raises:
        ValueError: ``invalid config field '<name>': must be <type>, got <value>``.
    """
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints.get(f.name, Any), getattr(config, f.name)
        if typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, f.name, value)  # frozen dataclass
        _check(
            _type_matches(value, hint),
            f.name,
            f"must be {_describe_type(hint)}, got {value!r}",
        )


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
            f"unknown config field(s) for {cls.model}: {', '.join(unknown)} "
            f"(valid: {', '.join(sorted(names)) or 'none'})"
        )
    return data


def _replace_config(config: _ConfigT, changes: dict[str, Any]) -> _ConfigT:
    """``dataclasses.replace`` that names unknown fields in a ``ValueError``."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise ValueError(f"unknown config field(s) for {config.model}: {', '.join(unknown)}")
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
    patience: int | None = None  # stop after this many epochs without a better validation NDCG
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
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "seed",
            "must be an int",
        )
        _check("@" in self.select_metric, "select_metric", "must look like 'ndcg@100'")

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
    """Mult-DAE (Liang et al. 2018): [I, 200, I], tanh, dropout 0.5, L2 weight decay 0.01."""

    model: ClassVar[str] = "multdae"

    hidden_dims: tuple[int, ...] = ()  # hidden sizes before the code layer
    latent_dim: int = 200  # size of the code layer
    weight_decay: float = 0.01
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
            and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
            "device",
            "must be auto, cpu, cuda or cuda:N",
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
        for name in ("progress", "compile", "distributed"):
            _check(isinstance(getattr(self, name), bool), name, "must be true or false")
        _check(
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, str | os.PathLike),
            "checkpoint_dir",
            "must be a path",
        )
        _check(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")
