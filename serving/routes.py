"""The API's routes: validate, call the served model, map the result.

Scoring handlers are plain ``def``: scoring is CPU-bound (torch releases the GIL), so FastAPI runs
them in its thread pool and the event loop stays free. Each handler gets the model through one
dependency, read once per request, so a reload in the middle never mixes two models. The probes
and ``/metrics`` are ``async def`` so they answer even when every pool thread is busy scoring.
A large JSON body is decoded and validated in the thread pool too (``JSONBodyRoute``), not on
the event loop, so a body near the size limit does not hold up the probes either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from recvae.data.interactions import UnknownUserError
from serving.deps import (
    AdminDep,
    ContextDep,
    RecommenderDep,
    StateDep,
)
from serving.guards import JSONBodyRoute, reject_unknown_query
from serving.metrics import CONTENT_TYPE_LATEST, ServingMetrics
from serving.schemas import (
    EXPLORE_DESCRIPTION,
    EXPLORE_ONLY_MESSAGE,
    SEED_DESCRIPTION,
    TEMPERATURE_DESCRIPTION,
    AnomalyRequest,
    AnomalyResponse,
    BatchRecommendationRequest,
    BatchRecommendationResponse,
    ErrorResponse,
    HealthResponse,
    Limits,
    ModelInfo,
    ReadyResponse,
    RecommendationRequest,
    RecommendationResponse,
    ReloadErrorResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarItemsResponse,
    UserRecommendationResponse,
    ValidationErrorResponse,
)
from serving.served import HistoryResult, ServedModel, UnknownItemError
from serving.settings import ServingSettings
from serving.state import ModelSource, ReloadError, ReloadInProgressError

__all__ = ["router"]

logger = logging.getLogger(__name__)

# A query parameter a route does not declare (a typo such as ?exlude_seen=) is a 422, as an
# unknown body field is. JSONBodyRoute parses a large JSON body in a worker thread, not on the
# event loop (where FastAPI parses it), so that the probes answer during a 16 MiB parse.
router = APIRouter(dependencies=[Depends(reject_unknown_query)], route_class=JSONBodyRoute)

_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "No model is loaded yet."}
}
# What the request guard (serving/guards.py) answers on every route that takes a body.
_UNREADABLE_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read (e.g. not UTF-8)."},
    413: {"model": ErrorResponse, "description": "The body is over the server's size limit."},
    415: {"model": ErrorResponse, "description": "The body is not declared application/json."},
}
# Routes without parameters still answer 422 for an unknown query parameter
# (reject_unknown_query); FastAPI documents a 422 only where a route declares input.
_UNKNOWN_QUERY: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorResponse, "description": "An unknown query parameter."}
}
_K_QUERY = Query(ge=1, description="Number of items, 1 to max_k (default: the server's default_k).")
_PATH_ID = Path(min_length=1, max_length=256)
_EXPLORE_QUERY = Query(description=EXPLORE_DESCRIPTION)
_TEMPERATURE_QUERY = Query(
    ge=0.0, le=10.0, allow_inf_nan=False, description=TEMPERATURE_DESCRIPTION
)
_SEED_QUERY = Query(ge=0, le=2**63 - 1, description=SEED_DESCRIPTION)
_NO_KNOWN_ITEM = "no item of the history is known to the model"


# ---------------------------------------------------------------------------- validation helpers
def _invalid(loc: Sequence[str | int], message: str, value: Any, kind: str, **ctx: Any) -> NoReturn:
    """Raise a 422 in FastAPI's own format, naming the field."""
    error: dict[str, Any] = {"type": kind, "loc": tuple(loc), "msg": message, "input": value}
    if ctx:
        error["ctx"] = ctx
    raise RequestValidationError([error])


def _k(k: int | None, settings: ServingSettings, loc: Sequence[str | int]) -> int:
    if k is None:
        return settings.default_k
    if k > settings.max_k:
        _invalid(
            loc,
            f"Input should be less than or equal to {settings.max_k} (the server's max_k)",
            k,
            "less_than_equal",
            le=settings.max_k,
        )
    return k


def _max_len(values: Sequence[Any], limit: int, loc: Sequence[str | int], setting: str) -> None:
    if len(values) > limit:
        _invalid(
            loc,
            f"List should have at most {limit} items (the server's {setting}), not {len(values)}",
            f"<{len(values)} items>",
            "too_long",
            max_length=limit,
            actual_length=len(values),
        )


def _check_explore(served: ServedModel, loc: Sequence[str | int]) -> None:
    """422 naming ``explore`` when the model has no posterior to sample from (Mult-DAE)."""
    try:
        served.check_explore()
    except ValueError as exc:
        _invalid(loc, str(exc), True, "value_error")


class FastJSONResponse(Response):
    """JSON built straight from plain dicts and lists.

    The scoring routes return one of these instead of a response model: FastAPI then skips
    re-validating a hundred ``ScoredItem`` objects per answer (in an extra thread-pool hop),
    which cost more CPU than scoring itself. The payloads are built only by the helpers below,
    field for field the documented response models (``response_model`` still documents them,
    and the schema-conformance fuzz test checks every answer against them).
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _items(pairs: list[tuple[Any, float]]) -> list[dict[str, Any]]:
    """``ScoredItem`` payloads."""
    return [{"item_id": item, "score": score} for item, score in pairs]


def _result(result: HistoryResult) -> dict[str, Any]:
    """A ``RecommendationResult`` payload."""
    latent = None
    if result.mu is not None and result.sigma is not None:
        latent = {"mu": result.mu, "sigma": result.sigma}
    return {
        "items": _items(result.items),
        "unknown_items": result.unknown_items,
        "fallback": result.fallback,
        "latent": latent,
        "confidence": result.confidence,
    }


def _count(metrics: ServingMetrics, results: Sequence[HistoryResult], *, explore: bool) -> None:
    metrics.recommendations.labels(explore="true" if explore else "false").inc(len(results))
    n_fallback = sum(r.fallback is not None for r in results)
    n_unknown = sum(len(r.unknown_items) for r in results)
    if n_fallback:
        metrics.fallbacks.labels(reason="popularity").inc(n_fallback)
    if n_unknown:
        metrics.unknown_items.inc(n_unknown)


# ---------------------------------------------------------------------------- probes
@router.get(
    "/healthz",
    response_model=HealthResponse,
    tags=["probes"],
    summary="Liveness",
    responses=_UNKNOWN_QUERY,
)
async def healthz() -> HealthResponse:
    """The process is up and its event loop answers."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    tags=["probes"],
    summary="Readiness",
    responses={**_NOT_READY, **_UNKNOWN_QUERY},
)
async def readyz(state: StateDep) -> ReadyResponse | JSONResponse:
    """200 once a model is loaded and serving, 503 before."""
    served = state.current
    if served is None:
        detail = "no model is loaded"
        if state.last_error:
            detail += f" (last load failed: {state.last_error})"
        return JSONResponse(status_code=503, content={"detail": detail})
    return ReadyResponse(model_version=served.version)


# The probes answer HEAD too (load balancers send it), with the GET status and no body.
router.add_api_route(
    "/healthz", healthz, methods=["HEAD"], response_model=HealthResponse, include_in_schema=False
)
router.add_api_route(
    "/readyz", readyz, methods=["HEAD"], response_model=ReadyResponse, include_in_schema=False
)


@router.get(
    "/metrics",
    tags=["probes"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."},
        **_UNKNOWN_QUERY,
    },
)
async def metrics_endpoint(state: StateDep) -> Response:
    """Request counts and latency histograms by route template and status, model info,
    reloads and fallbacks, in the Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------- recommendations
@router.post(
    "/v1/recommendations",
    response_model=RecommendationResponse,
    tags=["recommendations"],
    summary="Recommend for any history",
    responses={**_UNREADABLE_BODY, **_NOT_READY},
)
def recommend(
    body: RecommendationRequest,
    context: ContextDep,
) -> Response:
    """Fold a history (a new user's too) into the model and rank every item.

    Unknown history items are ignored and listed in ``unknown_items``. A history with no known
    item gets the most popular training items, flagged ``fallback: "popularity"``. ``confidence``
    says how much the history pins down the user's latent code (null for Mult-DAE).

    With ``explore: true`` the ranking comes from a sample of the user's posterior (Thompson-
    style exploration); ``temperature`` scales its spread and ``seed`` makes it reproducible.
    """
    served, settings = context.served, context.settings
    k = _k(body.k, settings, ("body", "k"))
    _max_len(body.history, settings.max_history, ("body", "history"), "max_history")
    _max_len(body.exclude, settings.max_history, ("body", "exclude"), "max_history")
    if body.explore:
        _check_explore(served, ("body", "explore"))
    result = context.batcher.recommend(
        served,
        body.history,
        k,
        weights=body.weights,
        exclude=body.exclude,
        exclude_seen=body.exclude_seen,
        include_latent=body.include_latent,
        explore=body.explore,
        temperature=body.sampling_temperature,
        seed=body.seed,
    )
    _count(context.metrics, [result], explore=body.explore)
    return FastJSONResponse({**_result(result), "model_version": served.version})


@router.post(
    "/v1/recommendations/batch",
    response_model=BatchRecommendationResponse,
    tags=["recommendations"],
    summary="Recommend for many histories at once",
    responses={**_UNREADABLE_BODY, **_NOT_READY},
)
def recommend_batch(
    body: BatchRecommendationRequest,
    context: ContextDep,
) -> Response:
    """Score many histories as one batch; results come back in request order.

    With ``explore``, one seed draws the samples of the whole batch in order: a history's
    sample depends on its place in the batch (histories without a known item take none).
    """
    served, settings = context.served, context.settings
    k = _k(body.k, settings, ("body", "k"))
    _max_len(body.histories, settings.max_batch, ("body", "histories"), "max_batch")
    for i, history in enumerate(body.histories):
        loc = ("body", "histories", i)
        _max_len(history.history, settings.max_history, (*loc, "history"), "max_history")
        _max_len(history.exclude, settings.max_history, (*loc, "exclude"), "max_history")
    if body.explore:
        _check_explore(served, ("body", "explore"))
    weighted = any(h.weights is not None for h in body.histories)
    results = served.recommend_histories(
        [h.history for h in body.histories],
        k,
        weights=[h.weights for h in body.histories] if weighted else None,
        exclude=[h.exclude for h in body.histories],
        exclude_seen=body.exclude_seen,
        include_latent=body.include_latent,
        explore=body.explore,
        temperature=body.sampling_temperature,
        seed=body.seed,
    )
    _count(context.metrics, results, explore=body.explore)
    return FastJSONResponse(
        {"model_version": served.version, "results": [_result(r) for r in results]}
    )


@router.get(
    "/v1/users/{user_id}/recommendations",
    response_model=UserRecommendationResponse,
    tags=["recommendations"],
    summary="Recommend for a training user",
    responses={404: {"model": ErrorResponse, "description": "Unknown user."}, **_NOT_READY},
)
def recommend_user(
    user_id: Annotated[str, _PATH_ID],
    context: ContextDep,
    recommender: RecommenderDep,
    k: Annotated[int | None, _K_QUERY] = None,
    exclude_seen: Annotated[bool, Query(description="Leave out the user's items.")] = True,
    explore: Annotated[bool, _EXPLORE_QUERY] = False,
    temperature: Annotated[float | None, _TEMPERATURE_QUERY] = None,
    seed: Annotated[int | None, _SEED_QUERY] = None,
) -> Response:
    """Top items for a user known from the training data, from the stored history.

    ``explore``, ``temperature`` and ``seed`` work as for ``POST /v1/recommendations``.
    """
    k_ = _k(k, context.settings, ("query", "k"))
    if not explore:
        for name, value in (("temperature", temperature), ("seed", seed)):
            if value is not None:
                _invalid(("query", name), EXPLORE_ONLY_MESSAGE, value, "value_error")
    else:
        _check_explore(context.served, ("query", "explore"))
    uid = context.served.user_id(user_id)
    try:
        result = recommender.recommend(
            [uid],
            k_,
            exclude_seen=exclude_seen,
            explore=explore,
            temperature=1.0 if temperature is None else temperature,
            seed=seed,
        )
    except UnknownUserError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"unknown user {user_id!r}: not a training user"
        ) from None
    context.metrics.recommendations.labels(explore="true" if explore else "false").inc()
    pairs = result.to_lists()[0]
    confidence = None if result.confidence is None else float(result.confidence[0])
    return FastJSONResponse(
        {
            "model_version": recommender.version,
            "user_id": uid,
            "items": _items(pairs),
            "confidence": confidence,
        }
    )


# ---------------------------------------------------------------------------- anomaly
@router.post(
    "/v1/anomaly",
    response_model=AnomalyResponse,
    tags=["anomaly"],
    summary="How unusual a history is",
    responses={**_UNREADABLE_BODY, **_NOT_READY},
)
def anomaly(body: AnomalyRequest, context: ContextDep) -> AnomalyResponse:
    """Score one history under the served model: its negative ELBO per item (``score``, in
    nats; higher is more unusual) and where that falls among reference histories of a similar
    length (``percentile``). Use it to spot bots, shared accounts or broken event streams.

    Leave ``reference`` at ``"auto"``. A bundle calibrated on held-out users then gives
    percentiles that suit new users (on MovieLens-1M, 2.9% of normal new users land above the
    95th). An uncalibrated bundle falls back to the model's training users, which it fits better
    than anyone new: new normal users' percentiles then run high (median about 74 on
    MovieLens-1M), so set thresholds accordingly. ``reference`` in the answer says which one was
    used.

    Unknown items are ignored and listed in ``unknown_items``; a history with no known item
    gets a 422, as does ``reference: "held-out"`` on a bundle without that calibration.
    """
    served, settings = context.served, context.settings
    _max_len(body.items, settings.max_history, ("body", "items"), "max_history")
    matrix, unknown = served.history_matrix([body.items])
    if matrix.nnz == 0:
        _invalid(("body", "items"), _NO_KNOWN_ITEM, body.items, "value_error")
    try:
        result = served.recommender.anomaly_scores(matrix, reference=body.reference)
    except ValueError as exc:  # e.g. "held-out" on a bundle without a calibration
        _invalid(("body", "reference"), str(exc), body.reference, "value_error")
    if unknown[0]:
        context.metrics.unknown_items.inc(len(unknown[0]))
    return AnomalyResponse(
        score=float(result.scores[0]),
        percentile=float(result.percentiles[0]),
        history_length=int(result.history_lengths[0]),
        reconstruction=float(result.reconstruction[0]),
        kl=float(result.kl[0]),
        reference=result.reference,  # type: ignore[arg-type]  # "training" or "held-out"
        unknown_items=unknown[0],
        model_version=served.version,
    )


@router.get(
    "/v1/items/{item_id}/similar",
    response_model=SimilarItemsResponse,
    tags=["items"],
    summary="Similar items",
    responses={404: {"model": ErrorResponse, "description": "Unknown item."}, **_NOT_READY},
)
def similar_items(
    item_id: Annotated[str, _PATH_ID],
    context: ContextDep,
    k: Annotated[int | None, _K_QUERY] = None,
) -> Response:
    """Items closest to this one by cosine similarity in the decoder's item embedding space."""
    served = context.served
    k_ = _k(k, context.settings, ("query", "k"))
    iid = served.item_id(item_id)
    try:
        pairs = served.similar_items(iid, k_)
    except UnknownItemError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"unknown item {item_id!r}: not in the model"
        ) from None
    return FastJSONResponse(
        {"model_version": served.version, "item_id": iid, "items": _items(pairs)}
    )


# ---------------------------------------------------------------------------- model
@router.get(
    "/v1/model",
    response_model=ModelInfo,
    tags=["model"],
    summary="The served model",
    responses={**_NOT_READY, **_UNKNOWN_QUERY},
)
def model_info(context: ContextDep) -> ModelInfo:
    """Version, training metrics, catalog size and provenance of the model being served."""
    return _model_info(context.served, context.settings)


def _model_info(served: ServedModel, settings: ServingSettings) -> ModelInfo:
    meta = served.meta
    metrics = meta.get("metrics")
    config = served.recommender.config
    return ModelInfo(
        model_version=served.version,
        model_type=str(config.model),
        n_items=served.n_items,
        n_users=served.n_users,
        latent_dim=int(getattr(config, "latent_dim", 0)),
        item_id_type=served.item_kind,
        user_id_type=served.user_kind,
        created_at=None if meta.get("created_at") is None else str(meta["created_at"]),
        loaded_at=served.loaded_at,
        source=served.source,
        registry_version=served.registry_version,
        metrics=metrics if isinstance(metrics, dict) else {},
        limits=Limits(
            default_k=settings.default_k,
            max_k=settings.max_k,
            max_history=settings.max_history,
            max_batch=settings.max_batch,
        ),
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    tags=["admin"],
    summary="Reload the model without a restart",
    dependencies=[AdminDep],
    responses={
        **_UNREADABLE_BODY,
        401: {"model": ErrorResponse, "description": "No bearer token."},
        403: {"model": ErrorResponse, "description": "Wrong token, or admin routes disabled."},
        409: {"model": ErrorResponse, "description": "Another reload is running."},
        422: {
            "model": ReloadErrorResponse | ValidationErrorResponse,
            "description": "The model failed to load or verify (the old one keeps serving), "
            "or the request body is invalid.",
        },
    },
)
def reload_model(
    state: StateDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse | JSONResponse:
    """Load a model beside the current one and swap it in atomically.

    With no body, re-reads the current source (the bundle path, or the registry alias, which
    may have moved). Requests in flight finish on the old model. With several workers, only the
    worker that answers reloads: use the alias poll (RECVAE_POLL_INTERVAL) there.
    """
    source = None
    if body is not None and (body.reason or body.version or body.date):
        logger.info(
            "reload requested: reason %r, expected registry version %r, date %r",
            body.reason,
            body.version,
            body.date,
        )
    if body is not None and body.bundle is not None:
        source = ModelSource("bundle", body.bundle)
    elif body is not None and body.model_uri is not None:
        source = ModelSource("uri", body.model_uri)
    try:
        outcome = state.reload(source)
    except ReloadInProgressError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except ReloadError as exc:
        current = state.current
        return JSONResponse(
            status_code=422,
            content={
                "detail": (
                    "reload failed, the previous model keeps serving: "
                    if current is not None
                    else "reload failed, no model is loaded: "
                )
                + str(exc),
                "model_version": None if current is None else current.version,
            },
        )
    expected = None if body is None else body.version
    if expected is not None and outcome.registry_version not in (None, expected):
        logger.warning(
            "reload asked for registry version %r but the alias names %s now",
            expected,
            outcome.registry_version,
        )
    return ReloadResponse(
        model_version=outcome.model_version,
        previous_version=outcome.previous_version,
        changed=outcome.changed,
        source=outcome.source,
        registry_version=outcome.registry_version,
        load_seconds=outcome.seconds,
        worker_pid=os.getpid(),
    )
