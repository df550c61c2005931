"""FastAPI dependencies: the served model (read once per request), settings, admin auth.

Everything a handler needs comes from one dependency, :data:`ContextDep`: a
:class:`RequestContext` holding the model reference read once for this request, the settings
and the metrics. One dependency instead of four keeps FastAPI's per-request dependency solving
cheap (it was a measurable share of a request's CPU time). FastAPI caches a dependency per
request, so a handler that also asks for :data:`ServedModelDep` or :data:`RecommenderDep` gets
the same model. The model-reading dependencies are ``async def``: they only read a reference
and need no thread-pool hop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from recvae.recommender import Recommender
from serving.batching import MicroBatcher
from serving.metrics import ServingMetrics
from serving.served import ServedModel
from serving.settings import ServingSettings
from serving.state import ModelState

__all__ = [
    "RequestContext",
    "get_state",
    "get_context",
    "get_served_model",
    "get_recommender",
    "require_admin",
    "StateDep",
    "ContextDep",
    "ServedModelDep",
    "RecommenderDep",
    "AdminDep",
    "NOT_READY",
]

NOT_READY = "no model is loaded yet; see GET /readyz"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What one request works with; ``served`` was read from the holder exactly once."""

    served: ServedModel
    settings: ServingSettings
    metrics: ServingMetrics
    batcher: MicroBatcher


async def get_state(request: Request) -> ModelState:
    """The app's model holder."""
    state: ModelState = request.app.state.model_state
    return state


StateDep = Annotated[ModelState, Depends(get_state)]


async def get_context(request: Request) -> RequestContext:
    """The model serving this request (the holder's reference, read once), settings, metrics.

    Raises:
        HTTPException: 503 when no model is loaded.
    """
    state: ModelState = request.app.state.model_state
    served = state.current
    if served is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=NOT_READY)
    return RequestContext(served, state.settings, state.metrics, request.app.state.batcher)


ContextDep = Annotated[RequestContext, Depends(get_context)]


async def get_served_model(context: ContextDep) -> ServedModel:
    """The model serving this request."""
    return context.served


ServedModelDep = Annotated[ServedModel, Depends(get_served_model)]


async def get_recommender(context: ContextDep) -> Recommender:
    """The recommender of the model serving this request."""
    return context.served.recommender


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]

_bearer = HTTPBearer(auto_error=False, description="RECVAE_ADMIN_TOKEN of the server")


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admit only requests bearing the configured admin token.

    Raises:
        HTTPException: 403 when no token is configured (admin routes disabled) or the token is
            wrong; 401 when the request has no bearer token.
    """
    settings: ServingSettings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="admin routes are disabled: the server has no RECVAE_ADMIN_TOKEN",
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token: send 'Authorization: Bearer <RECVAE_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(
        credentials.credentials.encode("utf-8"), settings.admin_token.encode("utf-8")
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid admin token")


AdminDep = Depends(require_admin)
