"""Serving settings: the only place in ``serving`` that reads ``RECVAE_*`` environment variables.

``recvae serve`` passes its flags to the server process through these variables, so the app
factory (``serving.app:app_from_env``) sees the same settings whether it was started by the
command line, by ``uvicorn serving.app:app_from_env --factory`` or by a process manager.

=========================== ============================================== ==============
Variable                    Meaning                                        Default
=========================== ============================================== ==============
``RECVAE_BUNDLE``           model bundle directory to serve                (none)
``RECVAE_MODEL_URI``        MLflow model URI, e.g. ``models:/NAME@ALIAS``  (none)
``RECVAE_TRACKING_URI``     MLflow tracking URI for ``RECVAE_MODEL_URI``   MLflow's default
``RECVAE_DEFAULT_K``        items returned when a request gives no ``k``   20
``RECVAE_MAX_K``            largest ``k`` a request may ask for            1000
``RECVAE_MAX_HISTORY``      most items in one history (and its exclusions) 10000
``RECVAE_MAX_BATCH``        most histories in one batch request            1000
``RECVAE_MAX_BODY_BYTES``   largest request body (413 above it)            16777216 (16 MiB)
``RECVAE_ADMIN_TOKEN``      bearer token of ``POST /v1/admin/reload``      (reload off)
``RECVAE_POLL_INTERVAL``    seconds between registry alias checks, 0 = off 0
``RECVAE_TORCH_THREADS``    torch intra-op threads per worker process      1
``RECVAE_MICRO_BATCH``      most concurrent requests scored together, 1=off 32
``RECVAE_HOST``             address ``recvae serve`` binds                 127.0.0.1
``RECVAE_PORT``             port ``recvae serve`` binds                    8000
``RECVAE_WORKERS``          worker processes of ``recvae serve``           1
=========================== ============================================== ==============
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ServingSettings", "ENV_PREFIX", "ENV_VARS"]

ENV_PREFIX = "RECVAE_"

# Settings field -> environment variable (without the prefix).
ENV_VARS: dict[str, str] = {
    "bundle": "BUNDLE",
    "model_uri": "MODEL_URI",
    "tracking_uri": "TRACKING_URI",
    "default_k": "DEFAULT_K",
    "max_k": "MAX_K",
    "max_history": "MAX_HISTORY",
    "max_batch": "MAX_BATCH",
    "max_body_bytes": "MAX_BODY_BYTES",
    "admin_token": "ADMIN_TOKEN",
    "poll_interval": "POLL_INTERVAL",
    "torch_threads": "TORCH_THREADS",
    "micro_batch": "MICRO_BATCH",
    "host": "HOST",
    "port": "PORT",
    "workers": "WORKERS",
}


@dataclass(frozen=True, slots=True)
class ServingSettings:
    """Everything the API needs to know at start-up.

    At most one of ``bundle`` and ``model_uri`` is set. With neither, the app starts without a
    model (``/readyz`` answers 503) until ``POST /v1/admin/reload`` names one.

    Attributes:
        bundle: Path of a model bundle directory.
        model_uri: An MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/3``, ``runs:/...``).
        tracking_uri: MLflow tracking URI used to resolve ``model_uri`` (None: MLflow's own
            default, ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        default_k: Items returned when a request gives no ``k``.
        max_k: Largest ``k`` a request may ask for.
        max_history: Most items in one history, and most items in one exclusion list.
        max_batch: Most histories in one batch request.
        max_body_bytes: Largest request body, in bytes; a larger one gets 413 before it is
            parsed (a body of ``max_batch`` histories of ``max_history`` ids each can exceed
            the default: raise both together).
        admin_token: Bearer token for the admin routes; None disables them.
        poll_interval: Seconds between checks of the registry alias behind ``model_uri``
            (0 disables polling; only ``models:/NAME@ALIAS`` URIs are polled).
        torch_threads: torch intra-op threads per process. Requests already run in parallel in
            the server's thread pool, so 1 avoids oversubscribing the cores.
        micro_batch: Most concurrent single-history requests scored as one batch
            (``serving/batching.py``); 1 scores each request on its own.
        host: Address that ``recvae serve`` binds.
        port: Port that ``recvae serve`` binds.
        workers: Worker processes of ``recvae serve`` (each loads its own copy of the model).
    """

    bundle: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None
    default_k: int = 20
    max_k: int = 1000
    max_history: int = 10_000
    max_batch: int = 1000
    max_body_bytes: int = 16 * 1024 * 1024
    admin_token: str | None = None
    poll_interval: float = 0.0
    torch_threads: int = 1
    micro_batch: int = 32
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1

    def __post_init__(self) -> None:
        if self.bundle is not None and self.model_uri is not None:
            raise ValueError(
                "set either the bundle (RECVAE_BUNDLE) or the model URI (RECVAE_MODEL_URI), "
                "not both"
            )
        for name in ("bundle", "model_uri", "tracking_uri", "admin_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"invalid serving setting '{name}': must be a non-empty string")
        for name in (
            "default_k",
            "max_k",
            "max_history",
            "max_batch",
            "max_body_bytes",
            "torch_threads",
            "micro_batch",
            "workers",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid serving setting '{name}': must be an int >= 1")
        if self.default_k > self.max_k:
            raise ValueError(
                f"invalid serving setting 'default_k': {self.default_k} exceeds max_k "
                f"({self.max_k})"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError("invalid serving setting 'port': must be an int")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"invalid serving setting 'port': {self.port} is not in 0..65535")
        interval = self.poll_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise ValueError("invalid serving setting 'poll_interval': must be a number")
        if not (interval == 0 or 1.0 <= interval < float("inf")):
            raise ValueError(
                f"invalid serving setting 'poll_interval': {interval} must be 0 (off) or a "
                "finite number of seconds >= 1"
            )
        if interval and self.bundle is not None:
            raise ValueError(
                "invalid serving setting 'poll_interval': polling follows a registry alias "
                "(RECVAE_MODEL_URI / --model models:/NAME@ALIAS); a bundle path has none (it "
                "would be ignored): drop it, or reload with POST /v1/admin/reload"
            )

    @property
    def model_source(self) -> str | None:
        """The configured bundle path or model URI, whichever is set."""
        return self.bundle if self.bundle is not None else self.model_uri

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServingSettings:
        """Read ``RECVAE_*`` variables; keyword arguments override them.

        Empty variables count as unset.

        Args:
            environ: The environment to read (default ``os.environ``).
            **overrides: Field values that win over the environment.

        Returns:
            The validated settings.

        Raises:
            ValueError: a variable does not parse or a value is out of range (names the variable).
        """
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown serving setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, suffix in ENV_VARS.items():
            raw = env.get(ENV_PREFIX + suffix)
            if raw is None or not raw.strip():
                continue
            values[name] = _parse(name, ENV_PREFIX + suffix, raw.strip())
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``RECVAE_*`` variables that reproduce these settings (unset fields left out)."""
        out: dict[str, str] = {}
        for name, suffix in ENV_VARS.items():
            value = getattr(self, name)
            if value is not None:
                out[ENV_PREFIX + suffix] = str(value)
        return out


_PARSERS: dict[str, Callable[[str], Any]] = {
    "default_k": int,
    "max_k": int,
    "max_history": int,
    "max_batch": int,
    "max_body_bytes": int,
    "torch_threads": int,
    "micro_batch": int,
    "port": int,
    "workers": int,
    "poll_interval": float,
}


def _parse(name: str, variable: str, raw: str) -> Any:
    parser = _PARSERS.get(name)
    if parser is None:
        return raw
    try:
        return parser(raw)
    except ValueError:
        kind = "an integer" if parser is int else "a number"
        raise ValueError(f"{variable}={raw!r} is not {kind}") from None
