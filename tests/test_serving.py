"""The serving API in-process: every route and error case through a TestClient on ``create_app``
built on ``tiny_bundle``, reloads, the alias poll, settings, and schema fuzzing."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from recvae.recommender import Recommender
from serving.app import create_app
from serving.served import ServedModel, coerce_id
from serving.settings import ServingSettings
from serving.state import ModelSource, ModelState, ReloadError, is_alias_uri, uri_registry_version

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_k": 50, "max_history": 30, "max_batch": 5, "default_k": 5}
JSON_TYPE = {"content-type": "application/json"}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture(scope="module")
def settings(tiny_bundle: Path) -> ServingSettings:
    return ServingSettings(bundle=str(tiny_bundle), admin_token=TOKEN, **LIMITS)


@pytest.fixture(scope="module")
def client(settings: ServingSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def fresh_client(settings: ServingSettings) -> Iterator[TestClient]:
    """A client of its own, for tests that reload or count metrics."""
    with TestClient(create_app(settings)) as c:
        yield c


def perturbed_bundle(source: Path, target: Path, seed: int) -> Path:
    """A copy of ``source`` with slightly different decoder weights (so another version)."""
    rec = Recommender.load(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = rec.model.decoder[-1].bias
        bias.add_(0.01 * torch.randn(bias.shape, generator=generator))
    rec.meta.pop("model_version", None)
    return rec.save(target)


@pytest.fixture(scope="module")
def other_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_bundle(tiny_bundle, tmp_path_factory.mktemp("other") / "bundle", seed=7)


@pytest.fixture(scope="module")
def corrupted_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corrupted") / "bundle"
    shutil.copytree(tiny_bundle, path)
    weights = path / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def str_bundle(rec: Recommender, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with string ids ("i0", "i10", ...; users "u0", ...)."""
    copy = Recommender(
        rec.model,
        rec.config,
        np.asarray([f"i{v}" for v in rec.item_ids.tolist()], dtype=object),
        user_ids=np.asarray([f"u{v}" for v in rec.user_ids.tolist()], dtype=object),
        train_matrix=rec.train_matrix,
        meta={"metrics": {"test": {"ndcg@100": 0.5}}},
    )
    return copy.save(tmp_path_factory.mktemp("strids") / "bundle")


def items_of(body: dict[str, Any]) -> list[Any]:
    return [entry["item_id"] for entry in body["items"]]


def error_locs(response: Any) -> list[list[Any]]:
    assert response.headers["content-type"].startswith("application/json")
    return [e["loc"] for e in response.json()["detail"]]


def names_field(response: Any, loc: list[Any]) -> bool:
    """Whether a 422 has an error at ``loc`` (or inside it, e.g. a union member)."""
    return any(found[: len(loc)] == loc for found in error_locs(response))


# ---------------------------------------------------------------------------- probes and model
def test_probes(client: TestClient, rec: Recommender) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": rec.version}


def test_model_info(client: TestClient, rec: Recommender, settings: ServingSettings) -> None:
    body = client.get("/v1/model").json()
    assert body["model_version"] == rec.version
    assert body["n_items"] == rec.n_items == 20
    assert body["n_users"] == 60
    assert body["model_type"] == "multvae"
    assert body["latent_dim"] == 8
    assert body["item_id_type"] == "int"
    assert body["created_at"] == rec.meta["created_at"]
    assert body["source"] == settings.bundle
    assert body["limits"] == LIMITS
    assert isinstance(body["metrics"], dict)


def test_model_info_reports_bundle_metrics(str_bundle: Path) -> None:
    with TestClient(create_app(ServingSettings(bundle=str(str_bundle)))) as c:
        body = c.get("/v1/model").json()
    assert body["metrics"] == {"test": {"ndcg@100": 0.5}}
    assert body["item_id_type"] == "str"
    assert body["user_id_type"] == "str"


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/recommendations",
        "/v1/recommendations/batch",
        "/v1/users/{user_id}/recommendations",
        "/v1/items/{item_id}/similar",
        "/v1/model",
        "/v1/admin/reload",
        "/v1/anomaly",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path


# ---------------------------------------------------------------------------- recommendations
def test_recommendation_matches_the_recommender(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(4).tolist()
    body = client.post("/v1/recommendations", json={"history": history, "k": 6}).json()
    expected = rec.recommend_from_history(history, k=6).to_lists()[0]
    assert items_of(body) == [item for item, _ in expected]
    # float32 scores from two code paths: equal up to float32 rounding, not bit for bit.
    np.testing.assert_allclose(
        [e["score"] for e in body["items"]], [s for _, s in expected], rtol=1e-6
    )
    assert body["model_version"] == rec.version
    assert body["unknown_items"] == []
    assert body["fallback"] is None
    assert body["latent"] is None
    assert not set(items_of(body)) & set(history)


def test_default_k_and_exclusions(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(2).tolist()
    first = client.post("/v1/recommendations", json={"history": history}).json()
    assert len(first["items"]) == LIMITS["default_k"]
    banned = items_of(first)[:2]
    second = client.post("/v1/recommendations", json={"history": history, "exclude": banned})
    assert not set(items_of(second.json())) & set(banned)
    with_seen = client.post(
        "/v1/recommendations", json={"history": history, "k": 20, "exclude_seen": False}
    ).json()
    assert len(with_seen["items"]) == 20  # the whole catalog, history included
    assert set(history) <= set(items_of(with_seen))


def test_unknown_items_are_ignored_and_listed(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(6).tolist()
    noisy = [*history[:3], 999, "nope", *history[3:], 999]
    body = client.post("/v1/recommendations", json={"history": noisy, "k": 5}).json()
    clean = client.post("/v1/recommendations", json={"history": history, "k": 5}).json()
    assert body["unknown_items"] == [999, "nope", 999]
    assert body["items"] == clean["items"]
    assert body["fallback"] is None


def test_string_ids_are_accepted_for_an_int_model(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(8).tolist()
    as_str = client.post(
        "/v1/recommendations", json={"history": [str(i) for i in history], "k": 4}
    ).json()
    as_int = client.post("/v1/recommendations", json={"history": history, "k": 4}).json()
    assert as_str["items"] == as_int["items"]
    assert as_str["unknown_items"] == []


def test_weights_are_folded_in(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(10).tolist()
    weights = [float(1 + i) for i in range(len(history))]
    body = client.post(
        "/v1/recommendations", json={"history": history, "weights": weights, "k": 5}
    ).json()
    expected = rec.recommend_histories([history], 5, weights=[weights]).to_lists()[0]
    assert items_of(body) == [item for item, _ in expected]
    np.testing.assert_allclose(
        [e["score"] for e in body["items"]], [s for _, s in expected], rtol=1e-5
    )


def test_include_latent_returns_the_posterior(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(3).tolist()
    body = client.post(
        "/v1/recommendations", json={"history": history, "include_latent": True}
    ).json()
    matrix, _ = rec.histories_matrix([history])
    mu, sigma = rec.encode(matrix)
    np.testing.assert_allclose(body["latent"]["mu"], mu[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(body["latent"]["sigma"], sigma[0], rtol=1e-5, atol=1e-6)
    assert len(body["latent"]["mu"]) == 8
    assert min(body["latent"]["sigma"]) > 0


@pytest.mark.parametrize("history", [[], [12345, "unknown"]])
def test_popularity_fallback(client: TestClient, rec: Recommender, history: list[Any]) -> None:
    body = client.post("/v1/recommendations", json={"history": history, "k": 4}).json()
    counts = rec.item_popularity()
    order = np.argsort(-counts, kind="stable")
    assert body["fallback"] == "popularity"
    assert items_of(body) == rec.item_ids[order[:4]].tolist()
    assert body["unknown_items"] == history
    shares = [e["score"] for e in body["items"]]
    np.testing.assert_allclose(shares, counts[order[:4]] / rec.vocab.n_users, rtol=1e-6)
    excluded = client.post(
        "/v1/recommendations", json={"history": history, "k": 4, "exclude": items_of(body)[:2]}
    ).json()
    assert items_of(excluded) == rec.item_ids[order[2:6]].tolist()
    assert excluded["fallback"] == "popularity"


def test_k_larger_than_the_catalog_returns_every_eligible_item(
    client: TestClient, rec: Recommender
) -> None:
    history = rec.user_history(0).tolist()
    body = client.post("/v1/recommendations", json={"history": history, "k": 50}).json()
    assert len(body["items"]) == rec.n_items - len(set(history))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"history": [0], "k": 0}, ["body", "k"]),
        ({"history": [0], "k": 51}, ["body", "k"]),
        ({"history": [0], "k": -3}, ["body", "k"]),
        ({"history": [0], "k": "5"}, ["body", "k"]),
        ({"history": [0], "k": 2.5}, ["body", "k"]),
        ({"history": list(range(31))}, ["body", "history"]),
        ({"history": [0], "exclude": list(range(31))}, ["body", "exclude"]),
        ({"history": "0,10"}, ["body", "history"]),
        ({"history": [1.5]}, ["body", "history", 0]),
        ({"history": [True]}, ["body", "history", 0]),
        ({"history": [None]}, ["body", "history", 0]),
        ({"history": [""]}, ["body", "history", 0]),
        ({"history": [2**63]}, ["body", "history", 0]),
        ({"history": ["x" * 257]}, ["body", "history", 0]),
        ({"history": [0], "weights": [-1.0]}, ["body", "weights", 0]),
        ({"history": [0], "weights": [0]}, ["body", "weights", 0]),
        ({"history": [0], "weights": [1e9]}, ["body", "weights", 0]),
        ({"history": [0], "exclude_seen": 0}, ["body", "exclude_seen"]),
        ({"history": [0], "include_latent": "yes"}, ["body", "include_latent"]),
        ({"history": [0], "exlude_seen": False}, ["body", "exlude_seen"]),
        ({"history": [0], "explore": 1}, ["body", "explore"]),
        ({"history": [0], "explore": True, "temperature": -0.5}, ["body", "temperature"]),
        ({"history": [0], "explore": True, "seed": 1.5}, ["body", "seed"]),
    ],
)
def test_invalid_requests_get_422_naming_the_field(
    client: TestClient, payload: dict[str, Any], loc: list[Any]
) -> None:
    response = client.post("/v1/recommendations", json=payload)
    assert response.status_code == 422
    assert names_field(response, loc), response.json()


def test_weights_must_match_the_history(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json={"history": [0, 10], "weights": [1.0]})
    assert response.status_code == 422
    assert "weights" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"history": [0, 10', "application/json"),
        (b"not json at all", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"history=1", "application/x-www-form-urlencoded"),
        (b"\xff\xfe\x00", "application/json"),
        (b'{"history": [0]}', "text/plain"),
    ],
)
def test_malformed_bodies_get_a_4xx_json_error(
    client: TestClient, content: bytes, content_type: str
) -> None:
    for path in ("/v1/recommendations", "/v1/recommendations/batch"):
        response = client.post(path, content=content, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (path, content, response.text)
        assert "detail" in response.json()


def test_unknown_route_and_method_are_json_4xx(client: TestClient) -> None:
    assert client.get("/v1/nope").status_code == 404
    assert client.get("/v1/nope").json() == {"detail": "Not Found"}
    assert client.get("/v1/recommendations").status_code == 405


@pytest.mark.parametrize(
    ("path", "content", "loc"),
    [
        ("/v1/recommendations", '{"history": [1], "weights": [NaN]}', ["body", "weights", 0]),
        ("/v1/recommendations", '{"history": [1], "k": Infinity}', ["body", "k"]),
        ("/v1/recommendations", '{"history": [1], "k": 1e400}', ["body", "k"]),
        ("/v1/recommendations", '{"history": [1], "seed": -Infinity}', ["body", "seed"]),
        ("/v1/recommendations", '{"history": [NaN]}', ["body", "history", 0]),
        ("/v1/recommendations", '{"history": ["\\ud800"]}', ["body", "history", 0]),
        ("/v1/recommendations", '{"history": [1], "typo": NaN}', ["body", "typo"]),
        ("/v1/recommendations/batch", '{"histories": [{"history": [1]}], "k": NaN}', ["body", "k"]),
        ("/v1/anomaly", '{"items": [NaN]}', ["body", "items", 0]),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_get_422_not_500(
    client: TestClient, path: str, content: str, loc: list[Any]
) -> None:
    # Python's json.dumps writes NaN by default; strict JSON cannot echo it (or a lone
    # surrogate) back, which made FastAPI's own 422 handler fail with a 500.
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert names_field(response, loc), response.json()


def test_long_invalid_inputs_are_echoed_truncated(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json={"history": [1], "k": "x" * 100_000})
    assert response.status_code == 422
    echoed = response.json()["detail"][0]["input"]
    assert echoed.endswith("... (truncated)") and len(echoed) < 1100


@pytest.mark.parametrize(
    ("content_type", "detail"),
    [
        ("text/plain", "Content-Type must be application/json, got 'text/plain'"),
        ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),
        (None, "needs Content-Type: application/json (none given)"),
    ],
)
def test_a_body_that_is_not_json_gets_415(
    client: TestClient, content_type: str | None, detail: str
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/recommendations", "/v1/recommendations/batch", "/v1/anomaly"):
        response = client.post(path, content=b'{"history": [0]}', headers=headers)
        assert response.status_code == 415, (path, response.text)
        assert detail in response.json()["detail"]


def test_a_compressed_body_gets_415_naming_the_encoding(client: TestClient) -> None:
    import gzip

    response = client.post(
        "/v1/recommendations",
        content=gzip.compress(b'{"history": [0]}'),
        headers={**JSON_TYPE, "content-encoding": "gzip"},
    )
    assert response.status_code == 415
    assert response.json()["detail"].startswith("Content-Encoding 'gzip' is not supported")


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/x+json"]
)
def test_json_content_types_are_accepted(client: TestClient, content_type: str) -> None:
    response = client.post(
        "/v1/recommendations", content=b'{"history": [0]}', headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(tiny_bundle: Path) -> None:
    settings = ServingSettings(bundle=str(tiny_bundle), max_body_bytes=64)
    body = b'{"history": [' + b", ".join(b"0" for _ in range(40)) + b"]}"  # 124 bytes
    assert len(body) > 64

    def chunks() -> Iterator[bytes]:
        yield body[:50]
        yield body[50:]

    with TestClient(create_app(settings)) as c:
        declared = c.post("/v1/recommendations", content=body, headers=JSON_TYPE)
        streamed = c.post("/v1/recommendations", content=chunks(), headers=JSON_TYPE)
        for response in (declared, streamed):
            assert response.status_code == 413, response.text
            assert "exceeds 64 bytes" in response.json()["detail"]
            assert "RECVAE_MAX_BODY_BYTES" in response.json()["detail"]
        small = c.post("/v1/recommendations", json={"history": [0]})
        assert small.status_code == 200
        text = c.get("/metrics").text
    # The declared size is refused before routing (route label "unmatched"), the streamed one
    # once the route reads its body.
    from prometheus_client.parser import text_string_to_metric_families

    refused = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "recvae_http_requests_total" and sample.labels["status"] == "413"
    ]
    assert sum(sample.value for sample in refused) == 2


def test_unknown_query_parameters_get_422_naming_them(client: TestClient) -> None:
    typo = client.get("/v1/users/1/recommendations", params={"exlude_seen": "false", "k": 2})
    assert typo.status_code == 422
    assert names_field(typo, ["query", "exlude_seen"]), typo.json()
    assert "exclude_seen" in typo.json()["detail"][0]["msg"]  # lists what the route takes
    assert client.get("/v1/items/0/similar", params={"explore": "true"}).status_code == 422
    on_body_route = client.post("/v1/recommendations", params={"k": 3}, json={"history": [0]})
    assert on_body_route.status_code == 422
    assert names_field(on_body_route, ["query", "k"])
    assert client.get("/healthz", params={"x": "1"}).status_code == 422
    assert client.get("/v1/users/1/recommendations", params={"k": 2}).status_code == 200


def test_probes_answer_head(client: TestClient, tiny_bundle: Path) -> None:
    for path in ("/healthz", "/readyz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b""
    with TestClient(create_app(ServingSettings())) as c:
        assert c.head("/readyz").status_code == 503
        assert c.head("/healthz").status_code == 200


def test_a_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient) -> None:
    response = client.post("/v1/recommendations/", json={"history": [0]}, follow_redirects=False)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_invented_methods_share_one_metrics_label(fresh_client: TestClient) -> None:
    for method in ("QABCDEFGHIJ", "QZZZ", "BREW"):
        assert fresh_client.request(method, "/x").status_code in (404, 405)
    text = fresh_client.get("/metrics").text
    assert _sample(text, "recvae_http_requests_total", method="other") == 3
    assert "QABCDEFGHIJ" not in text and "BREW" not in text


# ---------------------------------------------------------------------------- batch
def test_batch_equals_single_calls(client: TestClient, rec: Recommender) -> None:
    histories = [
        {"history": rec.user_history(1).tolist()},
        {"history": []},
        {"history": [*rec.user_history(5).tolist(), 777], "exclude": [10, 30]},
        {"history": rec.user_history(6).tolist(), "weights": [2.0] * len(rec.user_history(6))},
    ]
    batch = client.post(
        "/v1/recommendations/batch", json={"histories": histories, "k": 4, "include_latent": True}
    ).json()
    assert batch["model_version"] == rec.version
    assert len(batch["results"]) == len(histories)
    for entry, result in zip(histories, batch["results"], strict=True):
        single = client.post(
            "/v1/recommendations", json={**entry, "k": 4, "include_latent": True}
        ).json()
        assert items_of(result) == items_of(single)
        np.testing.assert_allclose(
            [e["score"] for e in result["items"]], [e["score"] for e in single["items"]], rtol=1e-5
        )
        assert result["unknown_items"] == single["unknown_items"]
        assert result["fallback"] == single["fallback"]
        np.testing.assert_allclose(result["latent"]["mu"], single["latent"]["mu"], atol=1e-5)
    assert [r["fallback"] for r in batch["results"]] == [None, "popularity", None, None]
    assert batch["results"][2]["unknown_items"] == [777]


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"histories": []}, ["body", "histories"]),
        ({"histories": [{"history": [0]}] * 6}, ["body", "histories"]),
        ({"histories": [{"history": [0]}, {"history": list(range(31))}]}, None),
        ({"histories": [{"history": [0]}], "k": 51}, ["body", "k"]),
        ({"histories": [{"history": [0], "k": 3}]}, ["body", "histories", 0, "k"]),
        ({"history": [0]}, ["body", "histories"]),
        ({"histories": [[0, 10]]}, ["body", "histories", 0]),
    ],
)
def test_invalid_batches_get_422(
    client: TestClient, payload: dict[str, Any], loc: list[Any] | None
) -> None:
    response = client.post("/v1/recommendations/batch", json=payload)
    assert response.status_code == 422
    if loc is None:
        loc = ["body", "histories", 1, "history"]
    assert names_field(response, loc), response.json()


# ---------------------------------------------------------------------------- users and items
def test_user_recommendations(client: TestClient, rec: Recommender) -> None:
    body = client.get("/v1/users/7/recommendations", params={"k": 3}).json()
    expected = rec.recommend([7], k=3).to_lists()[0]
    assert body["user_id"] == 7
    assert body["model_version"] == rec.version
    assert items_of(body) == [item for item, _ in expected]
    default = client.get("/v1/users/7/recommendations").json()
    assert len(default["items"]) == LIMITS["default_k"]
    with_seen = client.get(
        "/v1/users/7/recommendations", params={"k": 20, "exclude_seen": "false"}
    ).json()
    assert set(rec.user_history(7).tolist()) <= set(items_of(with_seen))


def test_user_errors(client: TestClient) -> None:
    for user in ("12345", "abc", "-1", "7.0"):
        response = client.get(f"/v1/users/{user}/recommendations")
        assert response.status_code == 404, user
        assert "unknown user" in response.json()["detail"]
    assert error_locs(client.get("/v1/users/7/recommendations?k=0")) == [["query", "k"]]
    assert error_locs(client.get("/v1/users/7/recommendations?k=51")) == [["query", "k"]]
    assert error_locs(client.get("/v1/users/7/recommendations?k=x")) == [["query", "k"]]


def test_string_id_model(str_bundle: Path) -> None:
    with TestClient(create_app(ServingSettings(bundle=str(str_bundle)))) as c:
        user = c.get("/v1/users/u3/recommendations", params={"k": 2}).json()
        assert user["user_id"] == "u3"
        assert all(item.startswith("i") for item in items_of(user))
        assert c.get("/v1/users/3/recommendations").status_code == 404
        body = c.post("/v1/recommendations", json={"history": ["i0", "i20", 5], "k": 3}).json()
        assert body["unknown_items"] == [5]
        assert all(isinstance(item, str) for item in items_of(body))
        assert c.get("/v1/items/i20/similar").status_code == 200
        assert c.get("/v1/items/20/similar").status_code == 404


def test_similar_items_are_cosine_neighbours(client: TestClient, rec: Recommender) -> None:
    body = client.get("/v1/items/40/similar", params={"k": 5}).json()
    embeddings = rec.model.item_embeddings().detach().numpy().astype(np.float64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = rec.vocab.item_index(40)
    cosine = unit @ unit[index]
    cosine[index] = -np.inf
    expected = np.argsort(-cosine, kind="stable")[:5]
    assert body["item_id"] == 40
    assert items_of(body) == rec.item_ids[expected].tolist()
    np.testing.assert_allclose([e["score"] for e in body["items"]], cosine[expected], atol=1e-5)
    everything = client.get("/v1/items/40/similar", params={"k": 50}).json()
    assert len(everything["items"]) == rec.n_items - 1
    assert 40 not in items_of(everything)


def test_similar_item_errors(client: TestClient) -> None:
    assert client.get("/v1/items/41/similar").status_code == 404
    assert "unknown item" in client.get("/v1/items/zzz/similar").json()["detail"]
    assert error_locs(client.get("/v1/items/40/similar?k=0")) == [["query", "k"]]
    long_id = "x" * 300
    assert error_locs(client.get(f"/v1/items/{long_id}/similar")) == [["path", "item_id"]]


# ---------------------------------------------------------------------------- metrics
def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_prometheus_metrics(fresh_client: TestClient, rec: Recommender) -> None:
    c = fresh_client
    c.post("/v1/recommendations", json={"history": [0, 20]})
    c.post("/v1/recommendations", json={"history": [0, 20], "k": 0})
    c.post("/v1/recommendations", json={"history": [555]})
    c.get("/v1/users/1/recommendations")
    c.get("/v1/users/nobody/recommendations")
    response = c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = "/v1/recommendations"
    assert _sample(text, "recvae_http_requests_total", route=route, status="200") == 2
    assert _sample(text, "recvae_http_requests_total", route=route, status="422") == 1
    user_route = "/v1/users/{user_id}/recommendations"
    assert _sample(text, "recvae_http_requests_total", route=user_route, status="404") == 1
    assert (
        _sample(text, "recvae_http_request_duration_seconds_count", route=route, status="200") == 2
    )
    assert _sample(text, "recvae_model_info", version=rec.version) == 1
    assert _sample(text, "recvae_model_reloads_total", result="success") == 1
    assert _sample(text, "recvae_recommendation_fallbacks_total", reason="popularity") == 1
    assert _sample(text, "recvae_unknown_items_total") == 1
    assert "nobody" not in text  # path parameters never become label values


# ---------------------------------------------------------------------------- reload
def test_reload_requires_the_admin_token(fresh_client: TestClient) -> None:
    missing = fresh_client.post("/v1/admin/reload")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = fresh_client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    basic = fresh_client.post("/v1/admin/reload", headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401


def test_reload_is_disabled_without_a_token(tiny_bundle: Path) -> None:
    with TestClient(create_app(ServingSettings(bundle=str(tiny_bundle)))) as c:
        response = c.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "disabled" in response.json()["detail"]


def test_reload_swaps_to_another_bundle(
    fresh_client: TestClient, rec: Recommender, other_bundle: Path, tiny_bundle: Path
) -> None:
    c = fresh_client
    other = Recommender.read_meta(other_bundle)["model_version"]
    assert other != rec.version
    response = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(other_bundle)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == other
    assert body["previous_version"] == rec.version
    assert body["changed"] is True
    assert body["source"] == str(other_bundle)
    assert c.get("/readyz").json()["model_version"] == other
    assert c.post("/v1/recommendations", json={"history": [0]}).json()["model_version"] == other
    # No body: re-read the current source (now the other bundle).
    again = c.post("/v1/admin/reload", headers=AUTH).json()
    assert again["model_version"] == other
    assert again["changed"] is False
    back = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(tiny_bundle)}).json()
    assert back["model_version"] == rec.version


@pytest.mark.parametrize("which", ["corrupted", "missing", "not_a_bundle"])
def test_failed_reload_keeps_the_old_model(
    fresh_client: TestClient,
    rec: Recommender,
    corrupted_bundle: Path,
    tmp_path: Path,
    which: str,
) -> None:
    target = {
        "corrupted": corrupted_bundle,
        "missing": tmp_path / "missing",
        "not_a_bundle": tmp_path,
    }[which]
    c = fresh_client
    response = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(target)})
    assert response.status_code == 422
    body = response.json()
    assert body["model_version"] == rec.version
    assert "previous model keeps serving" in body["detail"]
    if which == "corrupted":
        assert "checksum" in body["detail"]
    assert c.get("/readyz").json()["model_version"] == rec.version
    ok = c.post("/v1/recommendations", json={"history": [0, 20]})
    assert ok.status_code == 200
    assert ok.json()["model_version"] == rec.version
    text = c.get("/metrics").text
    assert _sample(text, "recvae_model_reloads_total", result="failure") == 1
    assert _sample(text, "recvae_model_info", version=rec.version) == 1


def test_reload_body_errors(fresh_client: TestClient) -> None:
    both = fresh_client.post(
        "/v1/admin/reload", headers=AUTH, json={"bundle": "a", "model_uri": "models:/m@x"}
    )
    assert both.status_code == 422
    assert "not both" in both.json()["detail"][0]["msg"]
    extra = fresh_client.post("/v1/admin/reload", headers=AUTH, json={"path": "a"})
    assert ["body", "path"] in error_locs(extra)


def test_in_flight_request_finishes_on_the_old_model(
    fresh_client: TestClient, rec: Recommender, other_bundle: Path
) -> None:
    """A handler reads the model reference once: a swap mid-request does not affect it."""
    state: ModelState = fresh_client.app.state.model_state  # type: ignore[attr-defined]
    old = state.current
    assert old is not None
    entered, release = threading.Event(), threading.Event()
    original = old.recommend_histories

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    object.__setattr__(old, "recommend_histories", slow)
    result: dict[str, Any] = {}

    def call() -> None:
        response = fresh_client.post("/v1/recommendations", json={"history": [0, 20]})
        result["status"], result["body"] = response.status_code, response.json()

    thread = threading.Thread(target=call)
    thread.start()
    assert entered.wait(30)
    outcome = state.reload(ModelSource("bundle", str(other_bundle)))
    assert state.current is not old
    release.set()
    thread.join(30)
    assert result["status"] == 200
    assert result["body"]["model_version"] == rec.version != outcome.model_version
    after = fresh_client.post("/v1/recommendations", json={"history": [0, 20]}).json()
    assert after["model_version"] == outcome.model_version


def test_app_without_a_model_is_not_ready(tiny_bundle: Path) -> None:
    with TestClient(create_app(ServingSettings(admin_token=TOKEN))) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert "no model" in ready.json()["detail"]
        for response in (
            c.post("/v1/recommendations", json={"history": [0]}),
            c.get("/v1/users/1/recommendations"),
            c.get("/v1/items/0/similar"),
            c.get("/v1/model"),
        ):
            assert response.status_code == 503
            assert "no model" in response.json()["detail"]
        nothing = c.post("/v1/admin/reload", headers=AUTH)
        assert nothing.status_code == 422
        assert nothing.json()["model_version"] is None
        assert nothing.json()["detail"].startswith("reload failed, no model is loaded: ")
        loaded = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(tiny_bundle)})
        assert loaded.status_code == 200
        assert loaded.json()["previous_version"] is None
        assert c.get("/readyz").status_code == 200


def test_start_up_fails_on_a_corrupted_bundle(corrupted_bundle: Path) -> None:
    app = create_app(ServingSettings(bundle=str(corrupted_bundle)))
    with pytest.raises(RuntimeError, match="checksum"), TestClient(app):
        pass


def test_unexpected_errors_become_json_500(fresh_client: TestClient) -> None:
    state: ModelState = fresh_client.app.state.model_state  # type: ignore[attr-defined]
    served = state.current

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    object.__setattr__(served, "recommend_histories", broken)
    client = TestClient(fresh_client.app, raise_server_exceptions=False)
    response = client.post("/v1/recommendations", json={"history": [0]})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    text = client.get("/metrics").text
    assert _sample(text, "recvae_http_requests_total", status="500") == 1


# ---------------------------------------------------------------------------- micro-batching
def test_micro_batcher_matches_direct_scoring(rec: Recommender, tiny_bundle: Path) -> None:
    """Concurrent requests queued behind a busy scoring thread are scored together, and each
    gets the answer it would get alone (its own k, exclusions, latent or not)."""
    from serving.batching import MicroBatcher
    from serving.metrics import ServingMetrics

    served = ServedModel.build(Recommender.load(tiny_bundle), source="tiny")
    metrics = ServingMetrics()
    batcher = MicroBatcher(max_batch=8, metrics=metrics)
    gate, first_call = threading.Event(), threading.Event()
    original = served.recommend_histories

    def gated(*args: Any, **kwargs: Any) -> Any:
        if not first_call.is_set():
            first_call.set()
            assert gate.wait(30)
        return original(*args, **kwargs)

    object.__setattr__(served, "recommend_histories", gated)
    requests = [
        {
            "history": rec.user_history(u).tolist() if u % 4 else [999],
            "k": 2 + u % 5,
            "exclude": [10 * (u % 3)],
            "include_latent": u % 2 == 0,
        }
        for u in range(13)
    ]
    answers: dict[int, Any] = {}
    batcher.start()
    try:

        def call(i: int) -> None:
            r = requests[i]
            answers[i] = batcher.recommend(
                served,
                r["history"],
                r["k"],
                exclude=r["exclude"],
                include_latent=r["include_latent"],
            )

        threads = [threading.Thread(target=call, args=(0,))]
        threads[0].start()
        assert first_call.wait(30)  # the scoring thread is now busy with request 0
        threads += [threading.Thread(target=call, args=(i,)) for i in range(1, len(requests))]
        for thread in threads[1:]:
            thread.start()
        for _ in range(3000):  # until the other requests are queued (at most 30 s)
            if batcher._queue.qsize() >= len(requests) - 1:
                break
            time.sleep(0.01)
        gate.set()
        for thread in threads:
            thread.join(30)
    finally:
        batcher.stop()
    assert not batcher.running
    for i, r in enumerate(requests):
        [alone] = original(
            [r["history"]],
            r["k"],
            exclude=[r["exclude"]],
            include_latent=r["include_latent"],
        )
        got = answers[i]
        assert [item for item, _ in got.items] == [item for item, _ in alone.items]
        np.testing.assert_allclose(
            [s for _, s in got.items], [s for _, s in alone.items], rtol=1e-5, atol=1e-6
        )
        assert got.fallback == alone.fallback
        assert got.unknown_items == alone.unknown_items
        assert (got.mu is None) == (not r["include_latent"])
    text = metrics.render().decode()
    n_batches = _sample(text, "recvae_micro_batch_size_count")
    assert _sample(text, "recvae_micro_batch_size_sum") == len(requests)
    assert n_batches < len(requests)  # queued requests were scored together
    assert n_batches >= 3  # request 0 alone, then at most 8 per batch


def test_micro_batcher_errors_reach_each_request(tiny_bundle: Path) -> None:
    from serving.batching import MicroBatcher

    served = ServedModel.build(Recommender.load(tiny_bundle), source="tiny")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("scoring failed")

    object.__setattr__(served, "recommend_histories", broken)
    batcher = MicroBatcher(max_batch=4)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="scoring failed"):
            batcher.recommend(served, [0], 3)
        assert batcher.running  # the scoring thread survives
    finally:
        batcher.stop()
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(max_batch=0)


def test_micro_batcher_shutdown_never_strands_a_request(tiny_bundle: Path) -> None:
    """A request queued when the scoring thread stops is taken back and scored by its caller."""
    from serving.batching import MicroBatcher

    served = ServedModel.build(Recommender.load(tiny_bundle), source="tiny")
    gate, busy = threading.Event(), threading.Event()
    original = served.recommend_histories

    def gated(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "recvae-micro-batcher":
            busy.set()
            assert gate.wait(30)
        return original(*args, **kwargs)

    object.__setattr__(served, "recommend_histories", gated)
    batcher = MicroBatcher(max_batch=4)
    batcher.start()
    answers: dict[str, Any] = {}
    first = threading.Thread(target=lambda: answers.update(a=batcher.recommend(served, [0], 3)))
    first.start()
    assert busy.wait(30)  # the scoring thread is stuck on the first request
    second = threading.Thread(target=lambda: answers.update(b=batcher.recommend(served, [0], 3)))
    second.start()
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": 30})
    stopper.start()
    second.join(30)  # taken back and scored in its own thread while the batcher is stuck
    assert "b" in answers
    gate.set()
    for thread in (first, stopper):
        thread.join(30)
    assert answers["a"].items == answers["b"].items
    assert not batcher.running


# ---------------------------------------------------------------------------- alias polling
class FakeRegistry:
    """Stands in for MLflow: alias -> version, and version -> bundle path."""

    def __init__(self, bundles: dict[str, Path]) -> None:
        self.bundles = bundles
        self.version: str | None = None
        self.fail_resolve = False
        self.loads: list[str] = []

    def resolve(self, uri: str) -> str | None:
        if self.fail_resolve:
            raise ValueError("registry unreachable")
        return self.version

    def load(self, source: ModelSource) -> ServedModel:
        version = self.resolve(source.location)
        assert version is not None
        self.loads.append(version)
        rec = Recommender.load(self.bundles[version])
        return ServedModel.build(rec, source=source.location, registry_version=version)


def test_alias_poll_reloads_when_the_alias_moves(
    tiny_bundle: Path, other_bundle: Path, corrupted_bundle: Path
) -> None:
    registry = FakeRegistry({"1": tiny_bundle, "2": other_bundle, "3": corrupted_bundle})
    registry.version = "1"
    settings = ServingSettings(model_uri="models:/recvae@champion")
    app = create_app(settings, loader=registry.load, alias_resolver=registry.resolve)
    with TestClient(app) as c:
        state: ModelState = app.state.model_state
        assert c.get("/v1/model").json()["registry_version"] == "1"
        assert state.poll_once() is False  # unchanged
        registry.version = "2"
        assert state.poll_once() is True
        info = c.get("/v1/model").json()
        assert info["registry_version"] == "2"
        assert info["model_version"] == Recommender.read_meta(other_bundle)["model_version"]
        registry.fail_resolve = True
        assert state.poll_once() is False
        registry.fail_resolve = False
        registry.version = "3"  # a broken version: tried once, the old model stays
        assert state.poll_once() is False
        assert state.poll_once() is False
        assert registry.loads == ["1", "2", "3"]
        assert c.get("/v1/model").json()["registry_version"] == "2"
        text = c.get("/metrics").text
        assert _sample(text, "recvae_model_poll_errors_total") == 1
        assert _sample(text, "recvae_model_reloads_total", result="failure") == 1
        assert _sample(text, "recvae_model_info", registry_version="2") == 1


def test_background_poll_thread(tiny_bundle: Path, other_bundle: Path) -> None:
    registry = FakeRegistry({"1": tiny_bundle, "2": other_bundle})
    registry.version = "1"
    settings = ServingSettings(model_uri="models:/recvae@champion", poll_interval=1)
    app = create_app(settings, loader=registry.load, alias_resolver=registry.resolve)
    with TestClient(app) as c:
        registry.version = "2"
        for _ in range(100):
            if c.get("/v1/model").json()["registry_version"] == "2":
                break
            time.sleep(0.1)
        assert c.get("/v1/model").json()["registry_version"] == "2"
    assert app.state.model_state._poller is None  # stopped at shutdown


@pytest.mark.slow  # about 5 s of MLflow logging; the resolver and loader logic runs by default
def test_serving_a_registry_alias(
    mlflow_uri: str, tiny_bundle: Path, other_bundle: Path, tmp_path: Path
) -> None:
    """The real MLflow path: serve models:/NAME@ALIAS from a sqlite registry, follow the alias
    when it moves, keep serving when a reload names a model that does not exist."""
    from recvae import tracking

    tracking.configure_tracking(mlflow_uri)
    experiment = tracking.get_or_create_experiment(
        "serving", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    versions = []
    for bundle in (tiny_bundle, other_bundle):
        with tracking.start_run(experiment_id=experiment):
            info = tracking.log_bundle_model(bundle, registered_model_name="recvae-serving")
        versions.append(str(info.registered_model_version))
    tracking.set_alias("recvae-serving", "champion", versions[0])
    uri = "models:/recvae-serving@champion"
    app = create_app(ServingSettings(model_uri=uri, tracking_uri=mlflow_uri, admin_token=TOKEN))
    with TestClient(app) as c:
        info = c.get("/v1/model").json()
        assert info["source"] == uri
        assert info["registry_version"] == versions[0]
        assert info["model_version"] == Recommender.read_meta(tiny_bundle)["model_version"]
        state: ModelState = app.state.model_state
        assert state.poll_once() is False
        tracking.set_alias("recvae-serving", "champion", versions[1])
        assert state.poll_once() is True
        info = c.get("/v1/model").json()
        assert info["registry_version"] == versions[1]
        assert info["model_version"] == Recommender.read_meta(other_bundle)["model_version"]
        missing = c.post(
            "/v1/admin/reload", headers=AUTH, json={"model_uri": "models:/no-such-model@x"}
        )
        assert missing.status_code == 422
        assert missing.json()["model_version"] == info["model_version"]
        # A pinned version's URI names its version too (it was reported as null).
        pinned = f"models:/recvae-serving/{versions[0]}"
        reloaded = c.post("/v1/admin/reload", headers=AUTH, json={"model_uri": pinned})
        assert reloaded.status_code == 200 and reloaded.json()["registry_version"] == versions[0]
        info = c.get("/v1/model").json()
        assert info["source"] == pinned and info["registry_version"] == versions[0]
        assert info["model_version"] == Recommender.read_meta(tiny_bundle)["model_version"]


def test_poll_ignores_bundle_sources(tiny_bundle: Path) -> None:
    calls: list[str] = []
    app = create_app(
        ServingSettings(bundle=str(tiny_bundle)), alias_resolver=lambda uri: calls.append(uri)
    )
    with TestClient(app):
        assert app.state.model_state.poll_once() is False
    assert calls == []


def test_reload_error_without_source() -> None:
    from serving.metrics import ServingMetrics

    state = ModelState(ServingSettings(), ServingMetrics())
    with pytest.raises(ReloadError, match="no model source"):
        state.reload()


def test_reload_from_a_registry_that_went_away_fails_at_once() -> None:
    # MLflow retries a call to a tracking server that is gone for about four minutes: an admin
    # reload (or alias poll) used to hang that long, holding the reload lock, before its 422.
    pytest.importorskip("mlflow")
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from serving.metrics import ServingMetrics

    class NoRegistry(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NoRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    settings = ServingSettings(model_uri="models:/recvae@champion", tracking_uri=uri)
    state = ModelState(settings, ServingMetrics())
    try:
        with pytest.raises(ReloadError):  # the store answers, but holds no such model
            state.reload()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    errors: list[BaseException] = []

    def reload() -> None:
        try:
            state.reload()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=reload, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the reload waited for MLflow's retries"
    (error,) = errors
    assert isinstance(error, ReloadError) and "cannot reach the MLflow tracking server" in str(
        error
    )
    assert state.poll_once() is False
    assert state.metrics.registry.get_sample_value("recvae_model_poll_errors_total") == 1


def test_alias_uri_parsing() -> None:
    assert is_alias_uri("models:/recvae@champion")
    assert is_alias_uri("models:/team/recvae@prod")
    assert not is_alias_uri("models:/recvae/3")
    assert not is_alias_uri("models:/@champion")
    assert uri_registry_version("models:/recvae/3") == "3"
    assert uri_registry_version("models:/team/recvae/12/") == "12"
    assert uri_registry_version("models:/recvae/007") == "7"
    for other in (
        "models:/recvae@champion",
        "models:/recvae/latest",
        "models:/recvae/Production",
        "models:/3",
        "runs:/abc/model",
        "models:/recvae/٣",
    ):
        assert uri_registry_version(other) is None, other
    assert not is_alias_uri("runs:/abc/model")
    assert not is_alias_uri("/path/to@bundle")


# ---------------------------------------------------------------------------- ids and settings
def test_id_coercion() -> None:
    assert coerce_id("42", "int") == 42
    assert coerce_id("-7", "int") == -7
    assert coerce_id(" 42", "int") == " 42"
    assert coerce_id("4_2", "int") == "4_2"
    assert coerce_id("99999999999999999999", "int") == "99999999999999999999"
    assert coerce_id(42, "str") == "42"
    assert coerce_id("abc", "str") == "abc"


def test_settings_from_env() -> None:
    env = {
        "RECVAE_MODEL_URI": "models:/recvae@champion",
        "RECVAE_MAX_K": "200",
        "RECVAE_DEFAULT_K": "10",
        "RECVAE_POLL_INTERVAL": "30",
        "RECVAE_ADMIN_TOKEN": "t",
        "RECVAE_PORT": "9000",
        "RECVAE_WORKERS": "",
        "RECVAE_MAX_BODY_BYTES": "1048576",
    }
    settings = ServingSettings.from_env(env)
    assert settings.model_uri == "models:/recvae@champion" and settings.bundle is None
    assert settings.max_body_bytes == 1_048_576
    assert (settings.max_k, settings.default_k, settings.port) == (200, 10, 9000)
    assert settings.poll_interval == 30.0
    assert settings.workers == 1
    assert ServingSettings.from_env(settings.to_env()) == settings
    assert ServingSettings.from_env(env, max_k=300).max_k == 300


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RECVAE_MAX_K": "many"}, "RECVAE_MAX_K"),
        ({"RECVAE_MAX_K": "0"}, "max_k"),
        ({"RECVAE_DEFAULT_K": "50", "RECVAE_MAX_K": "10"}, "default_k"),
        ({"RECVAE_PORT": "70000"}, "port"),
        ({"RECVAE_MAX_BODY_BYTES": "0"}, "max_body_bytes"),
        ({"RECVAE_MAX_BODY_BYTES": "16MB"}, "RECVAE_MAX_BODY_BYTES"),
        ({"RECVAE_POLL_INTERVAL": "0.1"}, "poll_interval"),
        ({"RECVAE_POLL_INTERVAL": "nan"}, "poll_interval"),
        ({"RECVAE_BUNDLE": "/a", "RECVAE_MODEL_URI": "models:/m@x"}, "not both"),
        # Polling follows an alias: with a bundle it was silently ignored.
        ({"RECVAE_BUNDLE": "/a", "RECVAE_POLL_INTERVAL": "5"}, "a bundle path has none"),
    ],
)
def test_invalid_settings_name_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSettings.from_env(env)


def test_app_from_env_reads_the_environment(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.app import app_from_env

    monkeypatch.setenv("RECVAE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("RECVAE_MAX_K", "7")
    monkeypatch.setenv("RECVAE_DEFAULT_K", "3")
    with TestClient(app_from_env()) as c:
        assert c.get("/v1/model").json()["limits"]["max_k"] == 7
        assert c.get("/v1/users/1/recommendations?k=8").status_code == 422


# ---------------------------------------------------------------------------- fuzzing
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def fuzz_api(bundle: Path, max_examples: int) -> None:
    """Valid and invalid requests for every operation, generated from the OpenAPI schema: no 5xx,
    responses match their documented schemas and status codes, and schema-invalid input is
    rejected with a 4xx."""
    app = create_app(ServingSettings(bundle=str(bundle), admin_token=TOKEN, **LIMITS))
    app.state.model_state.reload()  # load now: schemathesis calls the app without a lifespan
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10
    for operation in operations:
        has_input = bool(list(operation.iter_parameters()) or list(operation.body))
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][: 2 if has_input else 1]
        for mode in modes:

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            def fuzz(case: Any) -> None:
                case.call_and_validate(checks=FUZZ_CHECKS)

            fuzz()


def test_openapi_fuzzing_finds_no_server_error(tiny_bundle: Path) -> None:
    fuzz_api(tiny_bundle, max_examples=10)


@pytest.mark.slow
@pytest.mark.parametrize("ids", ["int", "str"])
def test_openapi_fuzzing_long(ids: str, tiny_bundle: Path, str_bundle: Path) -> None:
    fuzz_api(tiny_bundle if ids == "int" else str_bundle, max_examples=150)


@pytest.mark.parametrize("reason", ["promoted", "rollback"])
def test_the_nightly_jobs_reload_request_is_accepted(
    tiny_bundle: Path, other_bundle: Path, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The body `recvae retrain` and `rollback` send (model URI, version, reason, date) was
    refused with a 422 (extra fields), so the server never reloaded on a promotion."""
    from pipelines.nightly.notify import reload_payload

    registry = FakeRegistry({"1": tiny_bundle, "2": other_bundle})
    registry.version = "1"
    uri = "models:/recvae@champion"
    app = create_app(
        ServingSettings(model_uri=uri, admin_token=TOKEN),
        loader=registry.load,
        alias_resolver=registry.resolve,
    )
    with TestClient(app) as c, caplog.at_level("INFO", logger="serving.routes"):
        registry.version = "2"
        date = "2024-05-24" if reason == "promoted" else None
        response = c.post(
            "/v1/admin/reload", headers=AUTH, json=reload_payload(uri, 2, reason, date)
        )
        assert response.status_code == 200, response.text
        assert response.json()["registry_version"] == "2"
        assert f"reason '{reason}'" in caplog.text
