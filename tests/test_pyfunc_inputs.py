"""The logged pyfunc model behind MLflow's own scoring server (``mlflow models serve``), run
in-process: the JSON forms that reach ``predict``, histories of different lengths, and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from mlflow.pyfunc import scoring_server  # noqa: E402

from recvae import tracking  # noqa: E402
from recvae.recommender import Recommender  # noqa: E402


@pytest.fixture
def served(
    mlflow_uri: str, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, TestClient]]:
    """The tiny bundle logged with ``log_bundle_model``, loaded, and behind the scoring app."""
    tracking.configure_tracking(mlflow_uri)
    with tracking.start_run(experiment_id=tracking.get_or_create_experiment("serve")):
        info = tracking.log_bundle_model(tiny_bundle)
    model = mlflow.pyfunc.load_model(info.model_uri)
    # init() marks the process as a serving environment; monkeypatch undoes that afterwards.
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with TestClient(scoring_server.init(model)) as client:
        yield model, client


def _post(client: TestClient, body: dict[str, Any]) -> tuple[int, Any]:
    response = client.post(
        "/invocations", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    return response.status_code, response.json()


def _histories(tiny_bundle: Path) -> tuple[Recommender, list[int], list[int]]:
    recommender = Recommender.load(tiny_bundle)
    first = [int(i) for i in recommender.item_ids[:3]]
    second = [int(recommender.item_ids[5])]
    return recommender, first, second


def _ranked(recommender: Recommender, histories: list[list[int]], k: int) -> list[list[int]]:
    rows = recommender.recommend_histories(histories, k).to_lists()
    return [[item for item, _ in row] for row in rows]


def test_ragged_histories_sent_as_inputs_records_are_scored(
    served: tuple[Any, TestClient], tiny_bundle: Path
) -> None:
    model, client = served
    recommender, first, second = _histories(tiny_bundle)
    expected = _ranked(recommender, [first, second], 3)
    records = [{"history": first}, {"history": second}]
    status, answer = _post(client, {"inputs": records, "params": {"k": 3}})
    assert status == 200, answer
    assert [row["item_ids"] for row in answer["predictions"]] == expected
    # The same records in-process.
    out = model.predict(records, params={"k": 3})
    assert [row["item_ids"] for row in out] == expected


def test_the_documented_json_forms_still_reach_predict(
    served: tuple[Any, TestClient], tiny_bundle: Path
) -> None:
    _, client = served
    recommender, first, second = _histories(tiny_bundle)
    same_length = [first, first[::-1]]
    cases: list[tuple[dict[str, Any], list[list[int]]]] = [
        ({"inputs": same_length}, same_length),
        ({"inputs": first}, [first]),
        ({"inputs": {"histories": same_length}}, same_length),
        ({"dataframe_records": [{"history": first}, {"history": second}]}, [first, second]),
        (
            {"dataframe_split": {"columns": ["history"], "data": [[first], [second]]}},
            [first, second],
        ),
    ]
    for body, histories in cases:
        status, answer = _post(client, {**body, "params": {"k": 3}})
        assert status == 200, (body, answer)
        predicted = [row["item_ids"] for row in answer["predictions"]]
        assert predicted == _ranked(recommender, histories, 3), body


def test_ragged_lists_in_inputs_are_refused_by_mlflow_before_predict(
    served: tuple[Any, TestClient], tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the README and _pyfunc_signature say: without an input schema MLflow makes one numpy
    # array of the "inputs" lists, which lists of different lengths cannot be.
    _, client = served
    _, first, second = _histories(tiny_bundle)
    calls: list[object] = []
    original = tracking.RecvaePyfuncModel.predict

    def counted(self: Any, context: Any, model_input: Any, params: Any = None) -> Any:
        calls.append(model_input)
        return original(self, context, model_input, params)

    monkeypatch.setattr(tracking.RecvaePyfuncModel, "predict", counted)
    for body in ({"inputs": [first, second]}, {"inputs": {"histories": [first, second]}}):
        status, answer = _post(client, body)
        assert status == 400 and "inhomogeneous" in answer["message"], answer
    assert calls == []
    status, _ = _post(client, {"inputs": [first]})
    assert status == 200 and len(calls) == 1  # the patch is the predict the server calls


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [{"items": [1]}]}, "record without a 'history' key (keys: 'items')"),
        ({"inputs": {"items": [[1]]}}, "dict without a 'histories' key"),
        ({"inputs": [[[1]]]}, "3-D array"),
        ({"inputs": [[1]], "params": {"k": 0}}, "k"),
    ],
)
def test_a_bad_request_that_reaches_predict_is_a_400_naming_the_problem(
    served: tuple[Any, TestClient], body: dict[str, Any], message: str
) -> None:
    # Not MLflow's "unexpected error while evaluating the model" with the reason in a trace.
    _, client = served
    status, answer = _post(client, body)
    assert status == 400, answer
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert message in answer["message"] and "unexpected error" not in answer["message"], answer


def test_bad_records_in_process_are_value_errors(served: tuple[Any, TestClient]) -> None:
    model, _ = served
    for model_input, message in [
        ([{"items": [1]}], "without a 'history' key"),
        ([{"history": [1]}, [2]], "mixes"),
        ([{"history": [[1]]}], "flat list of item ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.predict(model_input)


def test_a_history_with_no_known_item_gets_the_popularity_fallback_as_from_the_api(
    served: tuple[Any, TestClient], tiny_bundle: Path
) -> None:
    # It got the model's prior ranking, while the HTTP API and `recvae recommend` answer it
    # with the most popular training items, flagged.
    model, client = served
    recommender, first, _ = _histories(tiny_bundle)
    popular = recommender.popular_items(3)
    records = [{"history": [987654321]}, {"history": first}]
    status, answer = _post(client, {"inputs": records, "params": {"k": 3}})
    assert status == 200, answer
    fallback, scored = answer["predictions"]
    assert fallback["fallback"] == "popularity" and scored["fallback"] is None
    assert fallback["item_ids"] == [item for item, _ in popular]
    assert fallback["scores"] == pytest.approx([share for _, share in popular])
    assert scored["item_ids"] == _ranked(recommender, [first], 3)[0]
    out = model.predict([[987654321]], params={"k": 3})
    assert out[0]["fallback"] == "popularity"
    assert out[0]["item_ids"] == [item for item, _ in popular]
