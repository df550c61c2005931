"""The served-model holder: load, reload, swap atomically, and poll a registry alias.

The model being served sits behind one attribute, :attr:`ModelState.current`. A reload loads and
verifies the new model beside the old one (building its caches, the anomaly reference included:
``ServedModel.build``) and then rebinds that attribute, a single reference assignment that is
atomic in CPython. A request reads the reference once (``serving/deps.py``), so it finishes on
the model it started with; the old model is freed when its last request ends.
A model that fails to load or verify is never swapped in: the old one keeps serving.

MLflow is touched only here, lazily, through ``recvae.tracking`` (``alias_model_version`` and
``resolve_bundle``), and only for ``models:/...``-style sources.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from recvae.recommender import Recommender
from serving.metrics import ServingMetrics
from serving.served import ServedModel
from serving.settings import ServingSettings

__all__ = [
    "ModelSource",
    "ModelState",
    "ReloadOutcome",
    "ReloadError",
    "ReloadInProgressError",
    "is_alias_uri",
    "parse_alias_uri",
]

logger = logging.getLogger(__name__)


class ReloadError(RuntimeError):
    """A model could not be loaded or verified; the previous model (if any) keeps serving."""


class ReloadInProgressError(RuntimeError):
    """Another reload is running."""


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """``(name, alias)`` of a ``models:/NAME@ALIAS`` URI; None for any other URI."""
    if not uri.startswith("models:/"):
        return None
    name, sep, alias = uri[len("models:/") :].rstrip("/").rpartition("@")
    if not (sep and name and alias):
        return None
    return name, alias


def uri_registry_version(uri: str) -> str | None:
    """The version a ``models:/NAME/VERSION`` URI names (``"3"`` of ``models:/recvae/3``);
    None for an alias, a stage, ``latest`` or any other URI."""
    if not uri.startswith("models:/") or parse_alias_uri(uri) is not None:
        return None
    name, _, version = uri[len("models:/") :].rstrip("/").rpartition("/")
    return str(int(version)) if name and version.isascii() and version.isdigit() else None


def is_alias_uri(uri: str) -> bool:
    """Whether ``uri`` names a registry alias (``models:/NAME@ALIAS``), which can move."""
    return parse_alias_uri(uri) is not None


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from: a bundle directory or an MLflow model URI."""

    kind: Literal["bundle", "uri"]
    location: str

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> ModelSource | None:
        if settings.bundle is not None:
            return cls("bundle", settings.bundle)
        if settings.model_uri is not None:
            return cls("uri", settings.model_uri)
        return None

    def __str__(self) -> str:
        return self.location


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a successful (re)load did."""

    previous_version: str | None
    model_version: str
    source: str
    registry_version: str | None
    seconds: float

    @property
    def changed(self) -> bool:
        return self.previous_version != self.model_version


Loader = Callable[[ModelSource], ServedModel]
AliasResolver = Callable[[str], "str | None"]


class ModelState:
    """Holds the served model and replaces it safely.

    Args:
        settings: Serving settings (source, tracking URI, poll interval).
        metrics: Where loads, failures and poll errors are counted.
        loader: Builds a :class:`ServedModel` from a source (default: bundle path or MLflow).
        alias_resolver: Returns the registry version an alias URI points at, raising
            ``ValueError`` when it cannot (default: ``recvae.tracking.alias_model_version``).
    """

    def __init__(
        self,
        settings: ServingSettings,
        metrics: ServingMetrics,
        *,
        loader: Loader | None = None,
        alias_resolver: AliasResolver | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._loader: Loader = loader or self._load_source
        self._alias_resolver: AliasResolver = alias_resolver or self._alias_version
        self._current: ServedModel | None = None
        self._source = ModelSource.from_settings(settings)
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._tracking_uri: str | None = None  # set once the tracking store is configured
        self._failed_registry_version: str | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ reading
    @property
    def current(self) -> ServedModel | None:
        """The model being served (None before the first successful load). Read it once."""
        return self._current

    @property
    def source(self) -> ModelSource | None:
        """The source that the next plain reload (and the alias poll) uses."""
        return self._source

    # ------------------------------------------------------------------ loading
    def reload(self, source: ModelSource | None = None) -> ReloadOutcome:
        """Load a model beside the current one and swap it in.

        Args:
            source: What to load; default the current source (re-read it, e.g. after the
                bundle on disk or the alias changed).

        Returns:
            What was loaded.

        Raises:
            ReloadInProgressError: another reload is running.
            ReloadError: no source is configured, or the model failed to load or verify (the
                current model keeps serving).
        """
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadInProgressError("a model reload is already in progress")
        try:
            target = source or self._source
            if target is None:
                raise ReloadError("no model source is configured: give a bundle or a model_uri")
            start = time.perf_counter()
            try:
                served = self._loader(target)
            except Exception as exc:
                self.metrics.record_reload(None)
                self.last_error = f"{target}: {exc}"
                # %r: the location comes from a request, and must not forge log lines.
                if self._current is not None:
                    logger.error(
                        "loading model from %r failed (still serving %s): %s",
                        target.location,
                        self._current.version,
                        exc,
                    )
                else:
                    logger.error("loading model from %r failed: %s", target.location, exc)
                raise ReloadError(str(exc)) from exc
            previous = self._current
            self._current = served  # the atomic swap
            self._source = target
            self.last_error = None
            self._failed_registry_version = None
            self.metrics.record_reload(served)
            outcome = ReloadOutcome(
                previous_version=None if previous is None else previous.version,
                model_version=served.version,
                source=served.source,
                registry_version=served.registry_version,
                seconds=time.perf_counter() - start,
            )
            logger.info(
                "serving model %s from %s (was %s; loaded in %.2fs)",
                outcome.model_version,
                outcome.source,
                outcome.previous_version,
                outcome.seconds,
            )
            return outcome
        finally:
            self._reload_lock.release()

    def _load_source(self, source: ModelSource) -> ServedModel:
        if source.kind == "bundle":
            recommender = Recommender.load(source.location)
            return ServedModel.build(recommender, source=source.location)
        return self._load_uri(source.location)

    def _tracking(self) -> ModuleType:
        try:
            from recvae import tracking
        except ImportError as exc:
            raise ReloadError(
                f"loading a model URI needs MLflow (pip install 'recvae[track]'): {exc}"
            ) from exc
        if self._tracking_uri is None:
            self._tracking_uri = tracking.configure_tracking(self.settings.tracking_uri)
        elif self._tracking_uri.startswith(("http://", "https://")):
            # MLflow retries a call to a server that is gone for minutes: a reload or alias poll
            # would hang that long (holding the reload lock) before it fails.
            tracking.check_reachable(self._tracking_uri)
        return tracking

    def _alias_version(self, uri: str) -> str | None:
        parsed = parse_alias_uri(uri)
        if parsed is None:
            return None
        version: object = self._tracking().alias_model_version(*parsed)
        if version is None:
            raise ValueError(f"the registry alias {uri} is not set")
        return str(version)

    def _load_uri(self, uri: str) -> ServedModel:
        tracking = self._tracking()
        parsed = parse_alias_uri(uri)
        registry_version = (
            self._alias_resolver(uri) if parsed is not None else uri_registry_version(uri)
        )
        resolved = uri
        if parsed is not None and registry_version is not None:
            # Download the exact version the alias named a moment ago, not whatever it names
            # by the time the download starts.
            resolved = f"models:/{parsed[0]}/{registry_version}"
        # A failed download can leave files that the clean-up then fails on: that error must
        # not replace the download's own.
        with tempfile.TemporaryDirectory(prefix="recvae-serve-", ignore_cleanup_errors=True) as tmp:
            bundle = tracking.resolve_bundle(resolved, dst=Path(tmp))
            recommender = Recommender.load(bundle)  # reads everything into memory
        return ServedModel.build(recommender, source=uri, registry_version=registry_version)

    # ------------------------------------------------------------------ alias polling
    def poll_once(self) -> bool:
        """Check the alias behind the current source and reload if it moved.

        Returns:
            True when a new model was swapped in.
        """
        source = self._source
        if source is None or source.kind != "uri" or not is_alias_uri(source.location):
            return False
        try:
            version = self._alias_resolver(source.location)
        except Exception as exc:
            self.metrics.poll_errors.inc()
            logger.warning("checking %s failed (model unchanged): %s", source.location, exc)
            return False
        current = self._current
        if version is None or (current is not None and current.registry_version == version):
            return False
        if version == self._failed_registry_version:
            return False  # already failed once; wait for the alias to move again
        logger.info("alias %s now points at version %s; reloading", source.location, version)
        try:
            self.reload(source)
        except ReloadInProgressError:
            return False
        except ReloadError:
            self._failed_registry_version = version
            return False
        return True

    def start_polling(self) -> None:
        """Start the background alias poll (no-op when ``poll_interval`` is 0)."""
        interval = self.settings.poll_interval
        if interval <= 0 or self._poller is not None:
            return
        self._stop.clear()
        self._poller = threading.Thread(
            target=self._poll_loop, args=(interval,), name="recvae-alias-poll", daemon=True
        )
        self._poller.start()

    def stop_polling(self, timeout: float = 10.0) -> None:
        """Stop the poll thread (waits for a reload in progress, up to ``timeout`` seconds)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
            self._poller = None

    def _poll_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception:  # never let the thread die: the next round may succeed
                logger.exception("alias poll failed")
