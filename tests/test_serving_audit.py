"""Regressions found by an audit of the HTTP serving layer: weights that float32 cannot hold,
the OpenAPI document against the status codes the routes really answer, and 400s that name
why a body could not be parsed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from recvae.recommender import Recommender
from serving.app import create_app
from serving.settings import ServingSettings

TOKEN = "audit-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_TYPE = {"content-type": "application/json"}
MAX_BODY_BYTES = 16_384


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    settings = ServingSettings(
        bundle=str(tiny_bundle), admin_token=TOKEN, max_body_bytes=MAX_BODY_BYTES
    )
    with TestClient(create_app(settings)) as c:
        yield c


def items_of(body: dict[str, Any]) -> list[Any]:
    return [entry["item_id"] for entry in body["items"]]


# ---------------------------------------------------------------------------- weights
@pytest.mark.parametrize("scale", [1e-50, 1e-13])
def test_tiny_weights_rank_as_the_library_and_as_unit_weights(
    client: TestClient, rec: Recommender, scale: float
) -> None:
    """Only relative weights matter (the encoder L2-normalizes a history). Weights below what
    float32 holds (or whose norm is below the encoder's 1e-12 clamp) were scored as an empty
    history by the server, while ``Recommender.recommend_from_history`` rescales them."""
    history = rec.user_history(rec.user_ids[0]).tolist()[:3]
    k = 5
    weights = [scale] * len(history)
    expected = [i for i, _ in rec.recommend_from_history(history, k, weights=weights).to_lists()[0]]
    unweighted = client.post("/v1/recommendations", json={"history": history, "k": k})
    assert unweighted.status_code == 200, unweighted.text
    assert items_of(unweighted.json()) == expected

    single = client.post(
        "/v1/recommendations", json={"history": history, "weights": weights, "k": k}
    )
    assert single.status_code == 200, single.text
    assert single.json()["fallback"] is None
    assert items_of(single.json()) == expected

    batch = client.post(
        "/v1/recommendations/batch",
        json={"histories": [{"history": history, "weights": weights}, {"history": history}]},
    )
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert items_of(first)[:k] == expected
    assert items_of(first) == items_of(second)


# ---------------------------------------------------------------------------- OpenAPI
def _operations(client: TestClient) -> list[tuple[str, str, set[str]]]:
    """``(method, path with ids filled in, documented status codes)`` of every operation."""
    schema = client.get("/openapi.json").json()
    operations = []
    for path, methods in schema["paths"].items():
        concrete = path.replace("{user_id}", "1").replace("{item_id}", "1")
        for method, operation in methods.items():
            operations.append((method.upper(), concrete, set(operation["responses"])))
    return operations


def test_an_unknown_query_parameter_is_a_documented_422_on_every_route(
    client: TestClient,
) -> None:
    """Every route rejects an unknown query parameter with a 422; the routes without
    parameters (probes, /metrics, /v1/model) did not document it."""
    operations = _operations(client)
    assert len(operations) == 10
    for method, path, documented in operations:
        response = client.request(method, path, params={"zz_unknown": "1"}, headers=AUTH)
        assert response.status_code == 422, (method, path, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "zz_unknown"]
        assert "422" in documented, (method, path, sorted(documented))


def test_body_routes_document_their_413_and_415(client: TestClient) -> None:
    """The request guard answers 415 (not JSON) and 413 (over max_body_bytes) on every route
    that takes a body; the OpenAPI document did not list either."""
    body_routes = [
        (path, documented) for method, path, documented in _operations(client) if method == "POST"
    ]
    assert len(body_routes) == 4
    for path, documented in body_routes:
        not_json = client.post(path, content=b"{}", headers={"content-type": "text/plain", **AUTH})
        assert not_json.status_code == 415, (path, not_json.text)
        too_large = client.post(path, content=b" " * (MAX_BODY_BYTES + 1), headers=JSON_TYPE)
        assert too_large.status_code == 413, (path, too_large.text)
        assert {"413", "415"} <= documented, (path, sorted(documented))


# ---------------------------------------------------------------------------- unparsable bodies
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"history": [1], "k": 3, "x": "\xff"}', "not UTF-8"),
        (b'{"history": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested too deeply"),
        (b'{"history": [1], "k": ' + b"7" * 5000 + b"}", "digits"),
    ],
    ids=["not-utf8", "deep-nesting", "long-number"],
)
def test_an_unparsable_body_gets_a_400_naming_the_reason(
    client: TestClient, body: bytes, reason: str
) -> None:
    """FastAPI answered all three with "There was an error parsing the body"."""
    for path in ("/v1/recommendations", "/v1/anomaly"):
        response = client.post(path, content=body, headers=JSON_TYPE)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert reason in response.json()["detail"], response.json()


def test_other_http_errors_keep_their_detail_and_headers(client: TestClient) -> None:
    """The 400 rewording leaves every other HTTP error as FastAPI answers it."""
    unknown = client.get("/v1/users/no-such-user/recommendations")
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "unknown user 'no-such-user': not a training user"}
    no_token = client.post("/v1/admin/reload")
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert client.get("/nowhere").json() == {"detail": "Not Found"}


# ---------------------------------------------------------------------------- reload logs
def test_a_reload_path_from_a_request_cannot_forge_log_lines(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "/nowhere\nERROR serving model 123 from /evil"
    with caplog.at_level("ERROR", logger="serving.state"):
        response = client.post("/v1/admin/reload", json={"bundle": forged}, headers=AUTH)
    assert response.status_code == 422, response.text
    [record] = [r for r in caplog.records if "loading model from" in r.getMessage()]
    first_line = record.getMessage().split("\n", 1)[0]
    assert "/nowhere\\nERROR serving model" in first_line
    assert client.get("/readyz").status_code == 200  # still serving the old model
