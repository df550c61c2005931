"""Request guards: body size and type, unknown query parameters, and JSON errors that never fail.

- :class:`RequestGuard` (pure ASGI middleware) answers a request body larger than
  ``max_body_bytes`` with 413 (from ``Content-Length`` before reading, or as soon as a streamed
  body passes the limit), and a non-empty body that is not declared JSON with 415. It also turns
  an unexpected error into a JSON 500 *without* re-raising it, so the server keeps the client's
  keep-alive connection open (Starlette's last-resort handler re-raises after answering, and the
  server then drops the connection, failing the client's next, valid request too).
- :func:`validation_error` is the 422 handler: FastAPI's own format, with every echoed ``input``
  made JSON-safe. JSON allows no ``NaN``, ``Infinity`` or lone UTF-16 surrogates, and FastAPI's
  default handler fails (a 500) when it echoes them back.
- It also shortens a start-up that failed because the model did not load to its one-line
  reason (no traceback).
- :class:`JSONBodyRoute` (the router's route class) parses a JSON body itself: strictly as UTF-8
  (RFC 8259), with a 400 naming why a body cannot be read (not UTF-8, nested too deeply, a number
  too long), and a large body in a worker thread rather than on the event loop.
- :func:`http_error` answers FastAPI's own 400 for a body it could not parse with the reason, not
  just "There was an error parsing the body".
- :func:`reject_unknown_query` is a router dependency: a query parameter the route does not
  declare is a 422 naming it, as an unknown field of a body is.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from fastapi import Request, params
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "RequestGuard",
    "BodyTooLarge",
    "StartupError",
    "validation_error",
    "http_error",
    "reject_unknown_query",
    "JSONBodyRoute",
    "parse_json_body",
]

logger = logging.getLogger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_ECHO_LIMIT = 1000  # characters of an invalid input echoed back in a 422


class BodyTooLarge(HTTPException):
    """A request body over the server's limit (413). An ``HTTPException``, so that FastAPI's
    body reading passes it on instead of reporting a generic parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"request body exceeds {limit:,} bytes (the server's RECVAE_MAX_BODY_BYTES)",
        )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _send_json(send: Send, status: int, detail: str) -> None:
    response = JSONResponse(status_code=status, content={"detail": detail})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class StartupError(RuntimeError):
    """The model named at start-up failed to load: the server stops with this one-line reason
    (:class:`RequestGuard` leaves the traceback out of the start-up failure)."""


_STARTUP_ERROR = f"{StartupError.__name__}: "  # how a traceback's last line names it


def _short_startup_failure(send: Send) -> Send:
    """``send`` that reports a :class:`StartupError` by its message alone.

    Starlette reports a failed start-up with the whole traceback (both chained exceptions, 50
    lines and more) and the server logs it; for a model that does not load, the reason is the
    one line that matters, and the loader has logged it already. Any other start-up failure (a
    bug) keeps its traceback.
    """

    async def wrapped(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            text = str(message.get("message") or "").rstrip()
            last = text.rsplit("\n", 1)[-1]
            if _STARTUP_ERROR in last:
                message = {**message, "message": last.split(_STARTUP_ERROR, 1)[1]}
        await send(message)

    return wrapped


class RequestGuard:
    """Pure ASGI middleware: body size (413) and type (415) checks, and a JSON 500 that keeps
    the connection open.

    Args:
        app: The wrapped ASGI app.
        max_body_bytes: Largest request body accepted.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _short_startup_failure(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            rejection = self._check_headers(Headers(scope=scope))
            if rejection is not None:
                await _send_json(send, *rejection)
                return
        limit = self.max_body_bytes
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception as exc:
            if started:  # too late to answer: let the server handle it
                raise
            logger.error(
                "unhandled error on %s %s", scope["method"], scope.get("path"), exc_info=exc
            )
            await _send_json(send, 500, "internal server error")

    def _check_headers(self, headers: Headers) -> tuple[int, str] | None:
        """``(status, detail)`` when the declared body cannot be accepted, else None."""
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return 400, f"invalid Content-Length header: {length[:40]!r}"
            if size > self.max_body_bytes:
                return 413, BodyTooLarge(self.max_body_bytes).detail
            if size == 0:
                return None  # no body: nothing to parse (e.g. a reload without one)
        elif "chunked" not in headers.get("transfer-encoding", "").lower():
            return None  # no body
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return 415, f"Content-Encoding {encoding[:40]!r} is not supported: send the JSON as is"
        content_type = headers.get("content-type")
        if content_type is None:
            return 415, "request body needs Content-Type: application/json (none given)"
        if not _is_json(content_type):
            return 415, f"Content-Type must be application/json, got {content_type[:100]!r}"
        return None


def _json_safe(value: Any) -> Any:
    """``value`` (already through ``jsonable_encoder``) with non-finite floats as strings and
    lone surrogates escaped, so that strict JSON can encode it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _short_input(value: Any) -> Any:
    """An echoed input, or its start when its JSON is long (a 100,000-id list is not echoed)."""
    text = repr(value)
    if len(text) <= _ECHO_LIMIT:
        return value
    return text[:_ECHO_LIMIT] + "... (truncated)"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 in FastAPI's format (``{"detail": [{"type", "loc", "msg", "input", ...}]}``), safe to
    encode whatever the client sent."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        error = dict(error)
        if "input" in error:
            error["input"] = _short_input(error["input"])
        errors.append(error)
    content = _json_safe(jsonable_encoder(errors))
    return JSONResponse(status_code=422, content={"detail": content})


# FastAPI's 400 when reading a body as JSON raised something other than a JSON syntax error
# (which is a 422); the original error is its ``__cause__``.
_FASTAPI_PARSE_ERROR = "There was an error parsing the body"
# Byte order marks that json.loads takes for a UTF-32 or UTF-16 body (UTF-32 LE first: it starts
# with the UTF-16 LE mark).
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _wide_encoding(raw: bytes) -> str | None:
    """``"UTF-16"`` or ``"UTF-32"`` when ``raw`` looks like JSON in that encoding: a byte order
    mark, or NUL bytes among the first four (how RFC 4627 told the encodings apart; JSON text
    has no NUL byte)."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            return name
    head = raw[:4]
    if len(head) == 4 and 0 in head:
        return "UTF-32" if head.count(0) == 3 else "UTF-16"
    return None


def _not_utf8(encoding: str) -> str:
    return (
        f"request body is not UTF-8 encoded JSON: it looks like {encoding} "
        f"(JSON must be UTF-8, RFC 8259)"
    )


def _unparsable_body(cause: BaseException) -> str:
    """Why a body could not be parsed, for the client."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"request body is not UTF-8 encoded JSON: {cause.reason} at byte {cause.start} "
            f"(send JSON in UTF-8)"
        )
    if isinstance(cause, RecursionError):
        return "request body JSON is nested too deeply to parse"
    reason = str(cause).split(";", 1)[0] or type(cause).__name__
    return f"request body could not be parsed as JSON: {reason[:200]}"


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body.

    JSON between systems must be UTF-8 (RFC 8259, section 8.1): the body is decoded strictly so,
    and a leading byte order mark is ignored (which the RFC allows). ``json.loads`` on bytes
    would also take UTF-16 and UTF-32 (guessed from NUL bytes) and UTF-8-encoded lone
    surrogates; here those are errors.

    Args:
        raw: The body as received (not empty).

    Returns:
        The decoded JSON value.

    Raises:
        HTTPException: 400 naming why the body cannot be read: not UTF-8 (the byte where it
            fails, or that it looks like UTF-16 or UTF-32), nested too deeply, or a number too
            long to convert.
        RequestValidationError: the text is not valid JSON (FastAPI's ``json_invalid``, a 422).
    """
    wide = _wide_encoding(raw)
    if wide is not None:
        raise HTTPException(status_code=400, detail=_not_utf8(wide))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(status_code=400, detail=_unparsable_body(exc)) from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # Word for word FastAPI's error for a JSON syntax error.
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ],
            body=exc.doc,
        ) from exc
    except (RecursionError, ValueError) as exc:  # ValueError: an integer over 4300 digits
        raise HTTPException(status_code=400, detail=_unparsable_body(exc)) from exc


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's ``HTTPException`` handler, except that a body that could not be parsed gets a
    400 naming the reason (FastAPI says only "There was an error parsing the body")."""
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR and cause is not None:
        return JSONResponse(status_code=400, content={"detail": _unparsable_body(cause)})
    return await http_exception_handler(request, exc)


# A body up to this size is parsed on the event loop: the hop to a worker thread would cost
# more than the parse (at most about 2 ms for 16 KiB of the slowest shape, a batch of short
# histories, on the 2-core test machine).
INLINE_PARSE_BYTES = 16 * 1024


# What FastAPI gets for a body that the worker found invalid: a plain tuple, which no body model
# validates (a model is built from a dict or from an object's attributes), so FastAPI's validation
# fails on it with one error whose input is this object (checked per route at start-up).
_INVALID_BODY = ("<a body that failed validation>",)


class _ParsedRequest(Request):
    """The request whose body was read and validated already: FastAPI's request handler gets
    the validated body model from ``json()``."""

    def __init__(self, request: Request, raw: bytes, value: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._parsed_raw = raw
        self._parsed_value = value

    async def stream(self) -> AsyncGenerator[bytes, None]:
        yield self._parsed_raw

    async def body(self) -> bytes:
        return self._parsed_raw

    async def json(self) -> Any:
        return self._parsed_value


def _single_json_body(route: APIRoute) -> bool:
    """Whether the route's body is one JSON model, not embedded under its name (nor a form):
    the only kind :class:`JSONBodyRoute` parses itself."""
    field = route.body_field
    if field is None or len(route.dependant.body_params) != 1:
        return False
    info = field.field_info
    return isinstance(info, params.Body) and not isinstance(info, params.Form) and not info.embed


class JSONBodyRoute(APIRoute):
    """A route that decodes and validates its JSON body off the event loop.

    FastAPI decodes a body and validates it against the route's body model in its async request
    handling, on the event loop, even for a plain ``def`` handler: a 16 MiB body (the default
    RECVAE_MAX_BODY_BYTES) held every other request, ``/healthz`` and ``/readyz`` included, for
    up to 2 seconds. This route reads the body, then decodes it (:func:`parse_json_body`) and
    validates it against the body field FastAPI built, in a worker thread when the body is over
    :data:`INLINE_PARSE_BYTES`. FastAPI's own handler then gets the validated model, which its
    validation passes through as is (pydantic does not revalidate a model instance).

    The worker still shares the GIL: ``json.loads`` (one C call) and the garbage collector hold
    it for a few hundred milliseconds on a 16 MiB body, so the loop is held that long at worst
    rather than for the whole parse (BENCHMARKS.md has the numbers).

    Errors are FastAPI's, in FastAPI's order (a body that is not JSON first; then the route's
    dependencies: authentication, readiness, unknown query parameters; then the body's
    validation errors located under ``"body"``), except that a body that cannot be read is a
    400 naming why. The route's
    parameters, and so its OpenAPI document, are FastAPI's unchanged. A route whose body is
    not one JSON model (none, several parameters, embedded, a form) is left to FastAPI.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not _single_json_body(self):
            return handler
        field = self.body_field
        assert field is not None  # _single_json_body checked it
        _, marker_errors = field.validate(_INVALID_BODY, {}, loc=("body",))
        if not marker_errors or any(e.get("input") is not _INVALID_BODY for e in marker_errors):
            return handler  # this pydantic would take the marker for a body: FastAPI parses

        def parse(raw: bytes) -> tuple[Any, RequestValidationError | None]:
            body = parse_json_body(raw)
            time.sleep(0)  # hand the GIL back between the two long calls that hold it
            value, errors = field.validate(body, {}, loc=("body",))
            if errors:
                return None, RequestValidationError(errors, body=body)
            return value, None

        async def parse_then_handle(request: Request) -> Response:
            try:
                raw = await request.body()
            except HTTPException:  # 413 from the request guard
                raise
            except Exception as exc:  # as FastAPI: the client went away mid-body, for one
                raise HTTPException(status_code=400, detail=_unparsable_body(exc)) from exc
            if not raw or not _is_json(request.headers.get("content-type", "")):
                return await handler(request)  # no body, or not JSON: FastAPI's answer
            if len(raw) <= INLINE_PARSE_BYTES:
                value, invalid = parse(raw)
            else:
                value, invalid = await run_in_threadpool(parse, raw)
            if invalid is None:
                return await handler(_ParsedRequest(request, raw, value))
            # As FastAPI orders them, the route's dependencies answer first (a 401/403, a 503
            # before a model is loaded, an unknown query parameter), then the body's errors:
            # FastAPI gets the marker, resolves the dependencies, fails to validate the marker,
            # and the worker's errors replace that one error.
            try:
                return await handler(_ParsedRequest(request, raw, _INVALID_BODY))
            except RequestValidationError as exc:
                others = [e for e in exc.errors() if e.get("input") is not _INVALID_BODY]
                if len(others) == len(exc.errors()):
                    raise
                raise RequestValidationError(
                    [*others, *invalid.errors()], body=invalid.body
                ) from None

        return parse_then_handle


_DECLARED: dict[int, frozenset[str]] = {}  # id(route) -> its query parameter names


def _query_names(dependant: Any) -> list[str]:
    """The query parameters of a route's dependant and all its sub-dependencies."""
    names = [param.alias for param in dependant.query_params]
    for sub in dependant.dependencies:
        names += _query_names(sub)
    return names


def reject_unknown_query(request: Request) -> None:
    """Router dependency: a query parameter the matched route does not declare is a 422."""
    if not request.query_params:
        return
    route: Any = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    declared = _DECLARED.get(id(route))
    if declared is None:
        declared = _DECLARED[id(route)] = frozenset(_query_names(dependant))
    unknown = [name for name in request.query_params if name not in declared]
    if unknown:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": "Unknown query parameter"
                    + (f" (this route takes: {', '.join(sorted(declared))})" if declared else ""),
                    "input": request.query_params.getlist(name)[0],
                }
                for name in dict.fromkeys(unknown)
            ]
        )
