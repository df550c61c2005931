"""Prometheus metrics of the API, in a registry owned by one app instance.

Each :func:`serving.app.create_app` call gets its own ``CollectorRegistry`` (tests build many apps
in one process). With several uvicorn workers each process keeps its own counters; a scrape of
``/metrics`` reads the worker that answered it.

Exposed series:

- ``recvae_http_requests_total{method, route, status}``
- ``recvae_http_request_duration_seconds{method, route, status}`` (histogram)
- ``recvae_http_requests_in_flight``
- ``recvae_model_info{version, source, registry_version}`` (1 for the model being served)
- ``recvae_model_loaded`` (1 when a model is loaded), ``recvae_model_items``
- ``recvae_model_reloads_total{result}`` (``success`` or ``failure``)
- ``recvae_model_last_reload_timestamp_seconds``
- ``recvae_model_poll_errors_total`` (registry alias checks that failed)
- ``recvae_recommendation_fallbacks_total{reason}``, ``recvae_unknown_items_total``
- ``recvae_recommendations_total{explore}`` (lists returned; ``explore`` is ``true`` when ranked
  from a posterior sample)
- ``recvae_micro_batch_size`` (histogram: single-history requests scored together)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from serving.served import ServedModel

__all__ = ["ServingMetrics", "MetricsMiddleware", "CONTENT_TYPE_LATEST", "UNMATCHED_ROUTE"]

UNMATCHED_ROUTE = "<unmatched>"  # label for paths no route matched (keeps label sets bounded)

# Latency buckets from 0.5 ms to 10 s: scoring takes about a millisecond, batches longer.
_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ServingMetrics:
    """The app's Prometheus collectors.

    Args:
        registry: Registry to register in; a fresh one (with process metrics) by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        self.requests = Counter(
            "recvae_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "recvae_http_request_duration_seconds",
            "HTTP request latency by method, route template and status code.",
            ["method", "route", "status"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "recvae_http_requests_in_flight", "HTTP requests being handled.", registry=registry
        )
        self.model_info = Gauge(
            "recvae_model_info",
            "The model being served (value 1).",
            ["version", "source", "registry_version"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            "recvae_model_loaded", "1 when a model is loaded and serving.", registry=registry
        )
        self.model_items = Gauge(
            "recvae_model_items", "Items in the served model's catalog.", registry=registry
        )
        self.reloads = Counter(
            "recvae_model_reloads",
            "Model loads (start-up, admin reload, alias poll) by result.",
            ["result"],
            registry=registry,
        )
        self.last_reload = Gauge(
            "recvae_model_last_reload_timestamp_seconds",
            "Unix time of the last successful model load.",
            registry=registry,
        )
        self.poll_errors = Counter(
            "recvae_model_poll_errors",
            "Registry alias checks that failed (the served model stays).",
            registry=registry,
        )
        self.fallbacks = Counter(
            "recvae_recommendation_fallbacks",
            "Histories answered without the model, by reason.",
            ["reason"],
            registry=registry,
        )
        self.unknown_items = Counter(
            "recvae_unknown_items",
            "History items that the served model does not know (ignored).",
            registry=registry,
        )
        self.recommendations = Counter(
            "recvae_recommendations",
            "Recommendation lists returned (histories and users), by whether they were ranked "
            "from a posterior sample (explore).",
            ["explore"],
            registry=registry,
        )
        self.micro_batch_size = Histogram(
            "recvae_micro_batch_size",
            "Single-history requests scored together by the micro-batcher.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        self.fallbacks.labels(reason="popularity")
        for explore in ("true", "false"):
            self.recommendations.labels(explore=explore)

    def record_reload(self, served: ServedModel | None) -> None:
        """Count a model load; ``served`` is the new model, or None when the load failed."""
        if served is None:
            self.reloads.labels(result="failure").inc()
            return
        self.reloads.labels(result="success").inc()
        self.last_reload.set(time.time())
        self.model_info.clear()
        self.model_info.labels(
            version=served.version,
            source=served.source,
            registry_version=served.registry_version or "",
        ).set(1)
        self.model_loaded.set(1)
        self.model_items.set(served.n_items)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware that counts and times every HTTP request.

    Requests are labelled by the matched route's path template (``/v1/users/{user_id}/...``),
    not the raw path, so ids never become label values.

    Args:
        app: The wrapped ASGI app.
        metrics: Where to record.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before responding
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            labels = (_method_label(scope["method"]), _route_template(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_label(method: str) -> str:
    """The method as a label value; any other (a client can send any token) is ``other``, so
    that invented methods cannot add label values without bound."""
    return method if method in _METHODS else "other"


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE
