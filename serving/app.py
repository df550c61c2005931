"""The FastAPI app factory.

``create_app(settings)`` builds an app whose lifespan handler loads the model once at start-up
(never at import). ``app_from_env`` is the factory that ``recvae serve`` hands to uvicorn by
import string (``serving.app:app_from_env``, ``factory=True``); it reads the ``RECVAE_*``
environment variables through :class:`serving.settings.ServingSettings`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batching import MicroBatcher
from serving.guards import RequestGuard, StartupError, http_error, validation_error
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.routes import router
from serving.settings import ServingSettings
from serving.state import AliasResolver, Loader, ModelState, ReloadError

__all__ = ["create_app", "app_from_env", "StartupError"]

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Top-K recommendations from a Mult-VAE / Mult-DAE model (Liang et al., WWW 2018).

The encoder folds any history into a latent code without retraining, so new and changed users
get recommendations at once. Unknown item ids are ignored and listed; a history with no known
item gets the most popular training items (flagged `fallback: "popularity"`). Every response
carries `model_version`. Errors are JSON: `{"detail": ...}`; invalid input (an unknown field or
query parameter included) gets a 422 naming it, a body not sent as `application/json` a 415,
one over the server's size limit a 413. Responses may gain optional fields: clients should
ignore fields they do not know.

What only a variational model gives: every recommendation carries a posterior `confidence`
(null for Mult-DAE); `explore: true` ranks from a posterior sample (Thompson-style, with an
optional `temperature` and `seed`); `POST /v1/anomaly` says how unusual a history is.
"""


def create_app(
    settings: ServingSettings | None = None,
    *,
    loader: Loader | None = None,
    alias_resolver: AliasResolver | None = None,
) -> FastAPI:
    """Build the API.

    The model named by ``settings`` is loaded in the lifespan handler, so creating the app is
    cheap and importing this module loads nothing. A model that fails to load at start-up
    stops the start-up with the reason (a server that cannot serve should not look healthy);
    an app configured with no model starts unready (``/readyz`` answers 503) until an admin
    reload names one.

    Args:
        settings: Serving settings (default: read from ``RECVAE_*`` variables).
        loader: Replaces how a model source is loaded (tests).
        alias_resolver: Replaces how a registry alias is resolved to a version (tests).

    Returns:
        The FastAPI application.
    """
    settings = settings if settings is not None else ServingSettings.from_env()
    metrics = ServingMetrics()
    state = ModelState(settings, metrics, loader=loader, alias_resolver=alias_resolver)
    batcher = MicroBatcher(settings.micro_batch, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        # Requests run concurrently in the thread pool; one intra-op thread each (by default)
        # keeps them from fighting over the cores.
        torch.set_num_threads(settings.torch_threads)
        if state.current is None and state.source is not None:
            try:
                await run_in_threadpool(state.reload)
            except ReloadError as exc:
                raise StartupError(
                    f"cannot serve: the model from {state.source} failed to load: {exc}"
                ) from exc
        state.start_polling()
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            state.stop_polling()

    from recvae import __version__

    app = FastAPI(
        title="recvae recommendation API",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        # A trailing slash is a 404 (JSON), not a redirect with an empty body.
        redirect_slashes=False,
        openapi_tags=[
            {"name": "recommendations", "description": "Top-K items for histories and users."},
            {"name": "items", "description": "Item-to-item similarity."},
            {"name": "anomaly", "description": "How unusual a history is under the model."},
            {"name": "model", "description": "The model being served."},
            {"name": "admin", "description": "Reload (bearer token: RECVAE_ADMIN_TOKEN)."},
            {"name": "probes", "description": "Liveness, readiness and Prometheus metrics."},
        ],
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.model_state = state
    app.state.batcher = batcher
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Inside the metrics middleware (added later = outer), so that its 413, 415 and 500 answers
    # are counted. The 500 is the last resort: the fuzz tests must never reach it.
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """The app configured from ``RECVAE_*`` environment variables (uvicorn factory).

    Raises:
        ValueError: a variable is invalid (names it).
    """
    return create_app(ServingSettings.from_env())
