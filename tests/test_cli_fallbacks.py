"""``recvae recommend`` answers a history with no known item as the HTTP API does: with the
most popular training items, flagged ``fallback: "popularity"`` (one rule, in the library)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recvae.recommender import Recommender
from serving.app import create_app
from serving.served import ServedModel
from serving.settings import ServingSettings
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def rec(tiny_bundle: Path) -> Recommender:
    return Recommender.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServingSettings(bundle=str(tiny_bundle)))) as c:
        yield c


def _cli_json(bundle: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run_cli(["recommend", str(bundle), *argv, "--json"], capsys)
    assert code == 0, err
    body: dict[str, Any] = json.loads(out)
    return body


def _popular(rec: Recommender, k: int) -> list[Any]:
    order = np.argsort(-rec.item_popularity(), kind="stable")
    ids: list[Any] = rec.item_ids[order[:k]].tolist()
    return ids


@pytest.mark.parametrize(
    ("history", "extra"),
    [
        (["12345", "99999"], []),
        (["12345"], ["--include-seen"]),
        # A token that is no int of this int-keyed model is unknown, as in the API (it used to
        # be refused with "item ids are str ... convert them with int(...)").
        (["abc"], []),
        (["abc", "12345"], ["--explore", "--seed", "3"]),  # a fallback takes no sample
    ],
)
def test_recommend_without_a_known_item_falls_back_to_popularity_like_the_api(
    tiny_bundle: Path,
    rec: Recommender,
    client: TestClient,
    capsys: pytest.CaptureFixture[str],
    history: list[str],
    extra: list[str],
) -> None:
    cli = _cli_json(tiny_bundle, [*history, "-k", "5", *extra], capsys)
    request: dict[str, Any] = {"history": [int(h) if h.isdigit() else h for h in history], "k": 5}
    if "--explore" in extra:
        request.update(explore=True, seed=3)
    if "--include-seen" in extra:
        request["exclude_seen"] = False
    api = client.post("/v1/recommendations", json=request).json()
    assert api["fallback"] == "popularity"
    assert cli["fallback"] == "popularity"
    assert cli["items"] == api["items"]
    assert [entry["item_id"] for entry in cli["items"]] == _popular(rec, 5)
    assert cli["unknown_items"] == api["unknown_items"]
    assert cli["confidence"] == pytest.approx(api["confidence"], rel=1e-5)
    assert cli["model_version"] == api["model_version"]


def test_recommend_text_output_names_the_popularity_fallback(
    tiny_bundle: Path, rec: Recommender, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["recommend", str(tiny_bundle), "12345", "-k", "3"], capsys)
    assert code == 0, err
    assert "ignored unknown item(s): 12345" in out
    assert "fallback: popularity" in out
    assert "model's prior" not in out
    ranked = [line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert ranked == [str(i) for i in _popular(rec, 3)]


def test_recommend_with_a_known_item_or_a_user_is_not_a_fallback(
    tiny_bundle: Path,
    rec: Recommender,
    client: TestClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    history = [str(i) for i in rec.user_history(rec.user_ids[1]).tolist()]
    cli = _cli_json(tiny_bundle, [*history, "12345", "-k", "4"], capsys)
    request = {"history": [int(h) for h in history] + [12345], "k": 4}
    api = client.post("/v1/recommendations", json=request).json()
    assert cli["fallback"] is None and api["fallback"] is None
    assert [e["item_id"] for e in cli["items"]] == [e["item_id"] for e in api["items"]]
    assert cli["unknown_items"] == [12345]
    user = _cli_json(tiny_bundle, ["--user", str(rec.user_ids[1]), "-k", "4"], capsys)
    assert user["fallback"] is None
    expected = rec.recommend([rec.user_ids[1]], 4).to_lists()[0]
    assert [e["item_id"] for e in user["items"]] == [i for i, _ in expected]


def test_serving_popular_is_the_library_fallback(rec: Recommender, tiny_bundle: Path) -> None:
    served = ServedModel.build(Recommender.load(tiny_bundle), source="tiny")
    assert served.popular(5) == rec.popular_items(5)
    some = rec.item_ids[[0, 3]].tolist()
    assert served.popular(5, exclude=some) == rec.popular_items(5, exclude_idx=[0, 3])


def test_recommend_names_the_id_type_when_an_id_cannot_be_one_of_the_models(
    tiny_bundle: Path, rec: Recommender, capsys: pytest.CaptureFixture[str]
) -> None:
    # A token that is no integer (a typo, "1.0") is ignored on an int-keyed model, as the API
    # does, and the CLI says what the ids look like (the old refusal did).
    assert rec.item_ids.dtype != object
    code, out, err = run_cli(["recommend", str(tiny_bundle), "1.0", "-k", "2"], capsys)
    assert code == 0, err
    assert f"(this model's item ids are integers, e.g. {rec.item_ids[0]})" in out
    code, out, err = run_cli(["recommend", str(tiny_bundle), "12345", "-k", "2"], capsys)
    assert code == 0, err
    assert "item ids are integers" not in out  # an integer that is just not in the catalog
