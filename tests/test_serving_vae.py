"""The API's VAE capabilities: posterior ``confidence`` on recommendations, ``explore`` with
``temperature`` and ``seed``, ``POST /v1/anomaly``, and the anomaly reference warmed at load.

Apps run in-process through a TestClient on ``create_app``, built on ``tiny_bundle`` (a Mult-VAE on
the checkerboard), a Mult-DAE trained on the same data, and a held-out-calibrated copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recvae.config import MultDAEConfig, RunOptions
from recvae.recommender import Recommender
from recvae.training import train
from serving.app import create_app
from serving.settings import ServingSettings
from tests.conftest import make_checkerboard
from tests.test_serving import (
    AUTH,
    LIMITS,
    TOKEN,
    _sample,
    error_locs,
    items_of,
    names_field,
    perturbed_bundle,
)

EXPLORE_ONLY = "temperature and seed apply only with explore"
BOT = [0, 10, 20, 30]  # two even and two odd items: no checkerboard user mixes parities


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    settings = ServingSettings(bundle=str(tiny_bundle), admin_token=TOKEN, **LIMITS)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def dae_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mult-DAE (no posterior) trained briefly on the checkerboard."""
    data, _ = make_checkerboard()
    config = MultDAEConfig(latent_dim=8, epochs=10, batch_size=16, learning_rate=1e-2, seed=1)
    dae = train(data, config, options=RunOptions(device="cpu", progress=False))
    return dae.save(tmp_path_factory.mktemp("dae") / "bundle")


@pytest.fixture(scope="module")
def dae_client(dae_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServingSettings(bundle=str(dae_bundle), **LIMITS))) as c:
        yield c


@pytest.fixture(scope="module")
def calibrated_bundle(rec: Recommender, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a held-out anomaly reference (half the users stand in for it)."""
    copy = Recommender(
        rec.model, rec.config, rec.item_ids, user_ids=rec.user_ids, train_matrix=rec.train_matrix
    )
    copy.calibrate_anomalies(make_checkerboard()[0].matrix[::2])
    return copy.save(tmp_path_factory.mktemp("calibrated") / "bundle")


def scores_of(body: dict[str, Any]) -> list[float]:
    return [entry["score"] for entry in body["items"]]


def messages(response: Any) -> str:
    return " | ".join(error["msg"] for error in response.json()["detail"])


# ---------------------------------------------------------------------------- confidence
def test_confidence_on_every_recommendation_result(client: TestClient, rec: Recommender) -> None:
    histories = [rec.user_history(u).tolist() for u in (1, 4)]
    single = [
        client.post("/v1/recommendations", json={"history": h, "k": 3}).json() for h in histories
    ]
    batch = client.post(
        "/v1/recommendations/batch",
        json={"histories": [{"history": h} for h in [*histories, [999]]], "k": 3},
    ).json()["results"]
    expected = rec.recommend_histories(histories, k=3).confidence
    assert expected is not None
    got = [body["confidence"] for body in single]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose([r["confidence"] for r in batch[:2]], expected, rtol=1e-5)
    assert all(0.0 <= c <= 1.0 for c in got)
    # The popularity fallback reports the empty history's confidence, below a real history's.
    assert batch[2]["fallback"] == "popularity"
    np.testing.assert_allclose(batch[2]["confidence"], rec.confidence([[]])[0], rtol=1e-5)
    assert batch[2]["confidence"] < min(got)
    user = client.get("/v1/users/4/recommendations", params={"k": 3}).json()
    np.testing.assert_allclose(user["confidence"], rec.recommend([4], k=3).confidence, rtol=1e-6)


def test_mult_dae_has_null_confidence_and_cannot_explore(
    dae_client: TestClient, dae_bundle: Path
) -> None:
    dae = Recommender.load(dae_bundle)
    history = dae.user_history(3).tolist()
    single = dae_client.post("/v1/recommendations", json={"history": history})
    assert single.status_code == 200
    assert single.json()["confidence"] is None
    assert "confidence" in single.json()  # the field is there, null
    batch = dae_client.post(
        "/v1/recommendations/batch", json={"histories": [{"history": history}, {"history": []}]}
    ).json()
    assert [r["confidence"] for r in batch["results"]] == [None, None]
    assert dae_client.get("/v1/users/3/recommendations").json()["confidence"] is None
    for response, loc in (
        (
            dae_client.post("/v1/recommendations", json={"history": history, "explore": True}),
            ["body", "explore"],
        ),
        (
            dae_client.post(
                "/v1/recommendations/batch",
                json={"histories": [{"history": history}], "explore": True, "seed": 1},
            ),
            ["body", "explore"],
        ),
        (dae_client.get("/v1/users/3/recommendations?explore=true"), ["query", "explore"]),
    ):
        assert response.status_code == 422
        assert names_field(response, loc), response.json()
        assert "explore needs a model with a posterior" in messages(response)
        assert "'multdae' has none" in messages(response)


# ---------------------------------------------------------------------------- exploration
def test_explore_with_a_seed_is_reproducible_and_differs_from_the_mean(
    client: TestClient, rec: Recommender
) -> None:
    history = rec.user_history(4).tolist()
    plain = client.post("/v1/recommendations", json={"history": history, "k": 10}).json()

    def explore(**options: Any) -> dict[str, Any]:
        payload = {"history": history, "k": 10, "explore": True, **options}
        response = client.post("/v1/recommendations", json=payload)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    first, again = explore(seed=7), explore(seed=7)
    assert first["items"] == again["items"]
    # The library's sample for the same seed (the micro-batcher does not mix it with others).
    library = rec.recommend_from_history(history, 10, explore=True, temperature=1.0, seed=7)
    assert items_of(first) == library.item_ids[0].tolist()
    np.testing.assert_allclose(scores_of(first), library.scores[0], rtol=1e-5, atol=1e-5)
    assert items_of(first) != items_of(plain)  # checked: seed 7 reorders the top 10
    assert items_of(explore(seed=8)) != items_of(first)
    assert scores_of(explore()) != scores_of(explore())  # no seed: a fresh draw each time
    assert not set(items_of(first)) & set(history)  # still never a seen item
    assert first["confidence"] == pytest.approx(plain["confidence"], rel=1e-6)
    # Temperature 0 is exactly the deterministic ranking; a hotter sample strays further.
    zero = explore(temperature=0, seed=3)
    assert items_of(zero) == items_of(plain)
    np.testing.assert_allclose(scores_of(zero), scores_of(plain), rtol=1e-6)
    gaps = [
        np.abs(np.subtract(scores_of(explore(temperature=t, seed=3)), scores_of(plain))).mean()
        for t in (0.5, 4.0)
    ]
    assert 0 < gaps[0] < gaps[1]


def test_batch_and_user_exploration(client: TestClient, rec: Recommender) -> None:
    histories = [rec.user_history(u).tolist() for u in (1, 2, 5)]
    payload = {"histories": [{"history": h} for h in histories], "k": 5, "explore": True}
    first = client.post("/v1/recommendations/batch", json={**payload, "seed": 11}).json()
    again = client.post("/v1/recommendations/batch", json={**payload, "seed": 11}).json()
    assert first == again
    library = rec.recommend_histories(histories, 5, explore=True, seed=11)
    for row, result in enumerate(first["results"]):
        assert items_of(result) == library.item_ids[row].tolist()
        np.testing.assert_allclose(scores_of(result), library.scores[row], rtol=1e-5, atol=1e-5)
    # A fallback history takes no sample and keeps the popularity answer.
    mixed = client.post(
        "/v1/recommendations/batch",
        json={**payload, "histories": [{"history": [999]}, *payload["histories"]], "seed": 11},
    ).json()["results"]
    assert mixed[0]["fallback"] == "popularity"
    assert [items_of(r) for r in mixed[1:]] == [items_of(r) for r in first["results"]]

    params = {"k": 5, "explore": "true", "seed": 5, "temperature": 2.0}
    user = client.get("/v1/users/6/recommendations", params=params).json()
    expected = rec.recommend([6], 5, explore=True, temperature=2.0, seed=5)
    assert items_of(user) == expected.item_ids[0].tolist()
    np.testing.assert_allclose(scores_of(user), expected.scores[0], rtol=1e-6)
    zero = client.get("/v1/users/6/recommendations", params={**params, "temperature": 0}).json()
    assert zero["items"] == client.get("/v1/users/6/recommendations?k=5").json()["items"]


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0.5}, {"seed": 3}, {"explore": False, "temperature": 1.0, "seed": 3}],
)
def test_temperature_or_seed_without_explore_is_rejected(
    client: TestClient, options: dict[str, Any]
) -> None:
    single = client.post("/v1/recommendations", json={"history": [0, 20], **options})
    batch = client.post(
        "/v1/recommendations/batch", json={"histories": [{"history": [0, 20]}], **options}
    )
    for response in (single, batch):
        assert response.status_code == 422
        assert EXPLORE_ONLY in messages(response)
    query = {k: str(v).lower() for k, v in options.items()}
    user = client.get("/v1/users/4/recommendations", params=query)
    assert user.status_code == 422
    assert EXPLORE_ONLY in messages(user)
    assert error_locs(user)[0] in (["query", "temperature"], ["query", "seed"])


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 10.5}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": True}, "seed"),
        ({"explore": "true"}, "explore"),
    ],
)
def test_invalid_exploration_options_get_422(
    client: TestClient, payload: dict[str, Any], loc: str
) -> None:
    body = {"explore": True, **payload}
    single = client.post("/v1/recommendations", json={"history": [0], **body})
    assert single.status_code == 422
    assert names_field(single, ["body", loc]), single.json()
    batch = client.post("/v1/recommendations/batch", json={"histories": [{"history": [0]}], **body})
    assert names_field(batch, ["body", loc]), batch.json()


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("temperature=nan", "temperature"),
        ("temperature=inf", "temperature"),
        ("temperature=11", "temperature"),
        ("temperature=-1", "temperature"),
        ("seed=-1", "seed"),
        ("seed=1.5", "seed"),
        ("explore=maybe", "explore"),
    ],
)
def test_invalid_user_exploration_options_get_422(client: TestClient, query: str, loc: str) -> None:
    response = client.get(f"/v1/users/4/recommendations?explore=true&{query}")
    assert response.status_code == 422
    assert ["query", loc] in error_locs(response)


def test_explored_recommendations_are_counted(tiny_bundle: Path) -> None:
    with TestClient(create_app(ServingSettings(bundle=str(tiny_bundle)))) as c:
        c.post("/v1/recommendations", json={"history": [0, 20], "explore": True})
        c.post("/v1/recommendations", json={"history": [0, 20]})
        c.post(
            "/v1/recommendations/batch",
            json={"histories": [{"history": [0]}, {"history": [10]}], "explore": True},
        )
        c.get("/v1/users/3/recommendations?explore=true&seed=1")
        c.post("/v1/recommendations", json={"history": [0], "seed": 1})  # 422: not counted
        text = c.get("/metrics").text
    assert _sample(text, "recvae_recommendations_total", explore="true") == 4
    assert _sample(text, "recvae_recommendations_total", explore="false") == 1


# ---------------------------------------------------------------------------- anomaly
def test_anomaly_ranks_a_planted_history_above_typical_ones(
    client: TestClient, rec: Recommender
) -> None:
    """Checkerboard users like one parity; planted histories mix both (every user has 9 items)."""
    typical = [
        client.post("/v1/anomaly", json={"items": rec.user_history(u).tolist()}).json()
        for u in range(0, 60, 5)
    ]
    assert {t["history_length"] for t in typical} == {9}
    rng = np.random.default_rng(0)
    even, odd = rec.user_history(10).tolist(), rec.user_history(13).tolist()
    planted = [
        rng.choice(rec.item_ids, 9, replace=False).tolist(),  # random items
        [*even[:5], *odd[:4]],  # two users' histories mixed (a shared account)
    ]
    for items in planted:
        response = client.post("/v1/anomaly", json={"items": items})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["history_length"] == 9
        # Same length, so the scores compare directly: above every typical history's.
        assert body["score"] > max(t["score"] for t in typical), (items, body)
        assert body["percentile"] >= max(t["percentile"] for t in typical)
        assert body["percentile"] > 95
    # A bot: the same four items of both parities, compared with short sub-histories.
    bot = client.post("/v1/anomaly", json={"items": BOT}).json()
    assert bot["history_length"] == 4
    assert bot["percentile"] > 90
    assert np.median([t["percentile"] for t in typical]) < 75
    assert all(t["reference"] == "training" for t in typical)


def test_anomaly_answer_is_the_library_result(client: TestClient, rec: Recommender) -> None:
    history = rec.user_history(9).tolist()
    body = client.post("/v1/anomaly", json={"items": history}).json()
    expected = rec.anomaly_scores([history])
    assert body == {
        "score": pytest.approx(float(expected.scores[0]), rel=1e-5),
        "percentile": pytest.approx(float(expected.percentiles[0]), rel=1e-5, abs=1e-6),
        "history_length": len(history),
        "reconstruction": pytest.approx(float(expected.reconstruction[0]), rel=1e-5),
        "kl": pytest.approx(float(expected.kl[0]), rel=1e-5),
        "reference": "training",
        "unknown_items": [],
        "model_version": rec.version,
    }
    assert body["kl"] > 0
    assert body["score"] == pytest.approx((body["reconstruction"] + body["kl"]) / len(history))
    # Unknown ids are ignored and listed as sent; decimal strings and repeats are folded in.
    noisy = [*history, 999, "nope", str(history[0]), history[1]]
    again = client.post("/v1/anomaly", json={"items": noisy}).json()
    assert again["unknown_items"] == [999, "nope"]
    assert again["history_length"] == len(history)
    assert again["score"] == pytest.approx(body["score"], rel=1e-6)


@pytest.mark.parametrize(
    ("payload", "loc", "message"),
    [
        ({"items": []}, ["body", "items"], "at least 1"),
        ({}, ["body", "items"], "required"),
        ({"items": list(range(31))}, ["body", "items"], "max_history"),
        ({"items": [999, "nope"]}, ["body", "items"], "no item of the history is known"),
        ({"items": "0 10"}, ["body", "items"], "list"),
        ({"items": [1.5]}, ["body", "items", 0], ""),
        ({"items": [True]}, ["body", "items", 0], ""),
        ({"items": [None]}, ["body", "items", 0], ""),
        ({"items": [[0]]}, ["body", "items", 0], ""),
        ({"items": [2**63]}, ["body", "items", 0], ""),
        ({"items": [0], "reference": "everyone"}, ["body", "reference"], "held-out"),
        ({"items": [0], "reference": "held-out"}, ["body", "reference"], "calibrate_anomalies"),
        ({"items": [0], "k": 3}, ["body", "k"], "not permitted"),
        ({"history": [0]}, ["body", "history"], "not permitted"),
    ],
)
def test_bad_anomaly_requests_get_422_naming_the_field(
    client: TestClient, payload: dict[str, Any], loc: list[Any], message: str
) -> None:
    response = client.post("/v1/anomaly", json=payload)
    assert response.status_code == 422
    assert names_field(response, loc), response.json()
    assert message in messages(response)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"items": [0, 10', "application/json"),
        (b"[0, 10]", "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b'{"items": [0]}', "text/plain"),
    ],
)
def test_malformed_anomaly_bodies_get_a_4xx_json_error(
    client: TestClient, content: bytes, content_type: str
) -> None:
    response = client.post("/v1/anomaly", content=content, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert "detail" in response.json()


def test_anomaly_references_of_a_calibrated_bundle(
    calibrated_bundle: Path, rec: Recommender
) -> None:
    calibrated = Recommender.load(calibrated_bundle)
    history = rec.user_history(2).tolist()
    with TestClient(create_app(ServingSettings(bundle=str(calibrated_bundle)))) as c:
        auto = c.post("/v1/anomaly", json={"items": history}).json()
        held_out = c.post("/v1/anomaly", json={"items": history, "reference": "held-out"}).json()
        training = c.post("/v1/anomaly", json={"items": history, "reference": "training"}).json()
    assert auto == held_out
    assert auto["reference"] == "held-out" and training["reference"] == "training"
    assert training["score"] == pytest.approx(auto["score"])
    for body, reference in ((auto, "held-out"), (training, "training")):
        expected = calibrated.anomaly_scores([history], reference=reference).percentiles[0]
        assert body["percentile"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_anomaly_on_a_mult_dae_has_no_kl(dae_client: TestClient, dae_bundle: Path) -> None:
    dae = Recommender.load(dae_bundle)
    history = dae.user_history(5).tolist()
    body = dae_client.post("/v1/anomaly", json={"items": history}).json()
    assert body["kl"] == 0.0
    assert body["score"] == pytest.approx(body["reconstruction"] / len(history))
    expected = dae.anomaly_scores([history])
    assert body["percentile"] == pytest.approx(float(expected.percentiles[0]), abs=1e-6)


def test_anomaly_before_a_model_is_loaded_is_503() -> None:
    with TestClient(create_app(ServingSettings())) as c:
        response = c.post("/v1/anomaly", json={"items": [0]})
    assert response.status_code == 503
    assert "no model" in response.json()["detail"]


# ---------------------------------------------------------------------------- warm reference
def test_reference_is_warmed_at_start_up_and_on_reload(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    original = Recommender._build_anomaly_reference

    def spy(self: Recommender, *args: Any, **kwargs: Any) -> Any:
        built.append(self.version)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "_build_anomaly_reference", spy)
    other = perturbed_bundle(tiny_bundle, tmp_path / "other", seed=5)
    other_version = Recommender.read_meta(other)["model_version"]
    settings = ServingSettings(bundle=str(tiny_bundle), admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        first_version = c.get("/readyz").json()["model_version"]
        assert built == [first_version]  # at start-up, before any request
        reloaded = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(other)})
        assert reloaded.status_code == 200, reloaded.text
        assert built == [first_version, other_version]  # during the reload, before the swap
        body = c.post("/v1/anomaly", json={"items": [0, 20, 40]}).json()
        assert body["model_version"] == other_version
        assert built == [first_version, other_version]  # the request paid nothing


def test_failed_reference_keeps_the_old_model(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = perturbed_bundle(tiny_bundle, tmp_path / "other", seed=6)
    # A bundle whose stored calibration is broken (meta.json is not checksummed).
    broken = tmp_path / "broken"
    shutil.copytree(other, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["anomaly_reference"] = {"source": "held-out", "quantiles": "garbage"}
    (broken / "meta.json").write_text(json.dumps(meta))
    settings = ServingSettings(bundle=str(tiny_bundle), admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        version = c.get("/readyz").json()["model_version"]
        before = c.post("/v1/anomaly", json={"items": [0, 20, 40]}).json()
        response = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(broken)})
        assert response.status_code == 422
        assert "previous model keeps serving" in response.json()["detail"]
        assert "anomaly reference" in response.json()["detail"]
        assert response.json()["model_version"] == version

        def fail(self: Recommender, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("out of memory while scoring the reference")

        monkeypatch.setattr(Recommender, "_build_anomaly_reference", fail)
        response = c.post("/v1/admin/reload", headers=AUTH, json={"bundle": str(other)})
        assert response.status_code == 422
        assert "out of memory" in response.json()["detail"]
        assert c.get("/readyz").json()["model_version"] == version
        after = c.post("/v1/anomaly", json={"items": [0, 20, 40]}).json()
        assert after == before  # the old model, with its reference, still answers
    with pytest.raises(RuntimeError, match="anomaly reference"):
        with TestClient(create_app(ServingSettings(bundle=str(broken)))):
            pass
