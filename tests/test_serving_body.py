"""How the API reads a JSON request body: strictly as UTF-8 (RFC 8259), with a 400 naming why a
body cannot be read, and a large body parsed off the event loop so that the probes still answer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from recvae.recommender import Recommender
from serving import guards
from serving.app import create_app
from serving.guards import INLINE_PARSE_BYTES, JSONBodyRoute
from serving.routes import router
from serving.schemas import (
    AnomalyRequest,
    BatchRecommendationRequest,
    RecommendationRequest,
    ReloadRequest,
)
from serving.settings import ServingSettings

TOKEN = "body-admin-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
POST_ROUTES = (
    "/v1/recommendations",
    "/v1/recommendations/batch",
    "/v1/anomaly",
    "/v1/admin/reload",
)
GOOD = '{"history": [1, 2], "k": 3}'
# Deadlock guard for the concurrency test: how long the blocked parse waits for the probe. Never
# reached when the server works; a broken server fails after it, not a timed assertion.
GUARD_S = 20.0


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServingSettings(bundle=str(tiny_bundle), admin_token=TOKEN))) as c:
        yield c


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


def post(client: TestClient, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers=HEADERS)


# ---------------------------------------------------------------------------- not UTF-8
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # \xff\xfe (two bytes never valid in UTF-8) then an even number of bytes: json.loads
        # took it for UTF-16 and failed on the garbage (422 json_invalid).
        (b"\xff\xfe" + b'{"history": [1]}', "looks like UTF-16"),
        (b"\xfe\xff" + b'{"items": [1, 2]}x', "looks like UTF-16"),
        # UTF-8-encoded lone surrogates (CESU-8), which json.loads let through: a 422 from
        # pydantic, or a 200 for string ids.
        (b'{"history": ["\xed\xa0\x80"], "k": 3}', "invalid continuation byte at byte 14"),
        (b'{"items": [1, "\xed\xb0\x80"]}', "invalid continuation byte at byte 15"),
        (b'{"history": [1], "k": 3, "x": "\xc0\xaf"}', "invalid start byte at byte 31"),
        (b"\x80" + GOOD.encode(), "invalid start byte at byte 0"),
    ],
    ids=["utf16-bom-le", "utf16-bom-be", "surrogate", "low-surrogate", "overlong", "lead-byte"],
)
def test_a_body_that_is_not_utf8_is_a_400_naming_why_on_every_post_route(
    client: TestClient, body: bytes, reason: str
) -> None:
    """Invalid UTF-8 is a body that cannot be read: a 400 with the reason, wherever it is."""
    for path in POST_ROUTES:
        response = post(client, path, body)
        assert response.status_code == 400, (path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        detail = response.json()["detail"]
        assert detail.startswith("request body is not UTF-8 encoded JSON"), (path, detail)
        assert reason in detail, (path, detail)


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")],
)
def test_a_utf16_or_utf32_body_is_a_400_naming_the_encoding(
    client: TestClient, encoding: str, name: str
) -> None:
    """RFC 8259 (section 8.1): JSON exchanged between systems MUST be UTF-8. json.loads guessed
    UTF-16 and UTF-32 from NUL bytes and answered 200; the server now says what it got."""
    for path in POST_ROUTES:
        response = post(client, path, GOOD.encode(encoding))
        assert response.status_code == 400, (path, response.text)
        assert f"looks like {name}" in response.json()["detail"], response.json()


def test_a_utf8_byte_order_mark_is_ignored(client: TestClient) -> None:
    """RFC 8259 lets a parser ignore a leading BOM: the answer is that of the body without it."""
    plain = post(client, "/v1/recommendations", GOOD.encode())
    marked = post(client, "/v1/recommendations", b"\xef\xbb\xbf" + GOOD.encode())
    assert plain.status_code == marked.status_code == 200, marked.text
    assert marked.json() == plain.json()
    unknown_field = post(client, "/v1/anomaly", b"\xef\xbb\xbf" + GOOD.encode())
    assert unknown_field.status_code == 422  # parsed, then validated as usual


# ---------------------------------------------------------------------------- large bodies
def test_every_post_route_parses_its_body_itself() -> None:
    """Each POST route is a JSONBodyRoute, and hands FastAPI a validated body model that
    FastAPI's own validation passes through unvalidated (else the parse would run twice, the
    second time on the event loop)."""
    models: dict[str, Any] = {
        "/v1/recommendations": RecommendationRequest(history=[1, 2]),
        "/v1/recommendations/batch": BatchRecommendationRequest(histories=[{"history": [1]}]),
        "/v1/anomaly": AnomalyRequest(items=[1, 2]),
        "/v1/admin/reload": ReloadRequest(reason="test"),
    }
    routes = {
        route.path: route
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }
    assert set(routes) == set(POST_ROUTES)
    for path, route in routes.items():
        assert isinstance(route, JSONBodyRoute), path
        assert route.body_field is not None
        value, errors = route.body_field.validate(models[path], {}, loc=("body",))
        assert not errors
        assert value is models[path], path
        # The marker of an invalid body fails validation with one error of its own (else the
        # route would leave its bodies to FastAPI).
        _, errors = route.body_field.validate(guards._INVALID_BODY, {}, loc=("body",))
        assert errors and all(e["input"] is guards._INVALID_BODY for e in errors), path


def test_a_probe_is_answered_while_a_large_body_is_parsed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI decoded and validated a body on the event loop, so a body near the 16 MiB limit
    held every other request, /healthz included (up to 2 s measured). The parse of the large
    body below blocks until /healthz has been answered: on the event loop, it never would be."""
    body = json.dumps({"history": list(range(50_000)), "k": 3}).encode()
    assert len(body) > INLINE_PARSE_BYTES
    original = json.loads
    entered, probe_answered = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def blocking_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        if len(text) == len(body):  # the large body (bytes, or its UTF-8 text: all ASCII)
            entered.set()
            outcome["probe answered during the parse"] = probe_answered.wait(GUARD_S)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", blocking_loads)

    def send_large() -> None:
        outcome["post"] = post(client, "/v1/recommendations", body)

    def probe() -> None:
        outcome["probe"] = client.get("/healthz")
        probe_answered.set()

    sender = threading.Thread(target=send_large)
    sender.start()
    assert entered.wait(GUARD_S), "the large body was never parsed"
    prober = threading.Thread(target=probe)
    prober.start()
    sender.join(2 * GUARD_S)
    prober.join(2 * GUARD_S)
    assert outcome["probe"].status_code == 200
    assert outcome["probe answered during the parse"]
    # The large body is then answered as before: over max_history, a 422 naming the field.
    assert outcome["post"].status_code == 422, outcome["post"].text
    assert outcome["post"].json()["detail"][0]["loc"] == ["body", "history"]


def test_a_large_body_gets_the_same_errors_as_a_small_one(
    client: TestClient, rec: Recommender
) -> None:
    """Parsed in a worker thread, a large body answers exactly as FastAPI did: json_invalid for
    bad JSON, validation errors under "body", and a 200 for a valid one."""
    padding = " " * (INLINE_PARSE_BYTES + 1)
    for body in (b'{"history": [1,]}', b'{"history": [1], "k": "3"}', b'{"history": [1], "z": 1}'):
        small = post(client, "/v1/recommendations", body)
        large = post(client, "/v1/recommendations", body + padding.encode())
        assert small.status_code == large.status_code == 422, large.text
        assert large.json() == small.json()
    history = rec.user_history(rec.user_ids[0]).tolist()
    small = post(client, "/v1/recommendations", json.dumps({"history": history}).encode())
    large = post(
        client, "/v1/recommendations", (json.dumps({"history": history}) + padding).encode()
    )
    assert small.status_code == large.status_code == 200, large.text
    assert large.json() == small.json()
    reload_body = b'{"reason": "test"' + padding.encode() + b"}"
    assert post(client, "/v1/admin/reload", reload_body).status_code == 200


@pytest.mark.parametrize("size", ["small", "large"])
def test_the_routes_dependencies_answer_before_the_bodys_validation(
    client: TestClient, tiny_bundle: Path, size: str
) -> None:
    """As FastAPI orders them: authentication, readiness and unknown query parameters come
    before the body's validation errors (the body was validated before the dependencies ran,
    so a request without a token learned the admin body's schema)."""
    padding = b" " * (INLINE_PARSE_BYTES + 1) if size == "large" else b""
    bad_reload = b'{"bundle": 5}' + padding
    plain = {"content-type": "application/json"}
    no_token = client.post("/v1/admin/reload", content=bad_reload, headers=plain)
    assert no_token.status_code == 401, no_token.text
    wrong = {**plain, "Authorization": "Bearer wrong"}
    assert client.post("/v1/admin/reload", content=bad_reload, headers=wrong).status_code == 403
    # With the token, the body's own error.
    invalid = post(client, "/v1/admin/reload", bad_reload)
    assert invalid.status_code == 422
    assert [e["loc"] for e in invalid.json()["detail"]] == [["body", "bundle"]]
    # An unknown query parameter and the body's errors, in FastAPI's order (query first).
    both = post(client, "/v1/recommendations?exlude_seen=1", b'{"history": "x"}' + padding)
    assert both.status_code == 422
    assert [e["loc"][0] for e in both.json()["detail"]] == ["query"]
    # Not ready: the 503 comes before the body's errors.
    with TestClient(create_app(ServingSettings(admin_token=TOKEN))) as empty:
        not_ready = post(empty, "/v1/recommendations", b'{"history": "x"}' + padding)
        assert not_ready.status_code == 503, not_ready.text


def test_a_small_and_a_large_invalid_body_get_the_same_errors_with_a_bad_query(
    client: TestClient,
) -> None:
    padding = b" " * (INLINE_PARSE_BYTES + 1)
    body = b'{"history": "x", "k": 0}'
    small = post(client, "/v1/recommendations?k=3", body)
    large = post(client, "/v1/recommendations?k=3", body + padding)
    assert small.status_code == large.status_code == 422
    assert large.json() == small.json()
