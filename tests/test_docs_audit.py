"""The docs and benchmark scripts against today's code (from a docs audit).

- ``docs/serving-vae-api.md`` quotes what the API answers: the request and response fields of
  ``POST /v1/anomaly`` and the 422/503 messages, taken from a live ``TestClient``.
- The quality and serving benchmark scripts that ``test_benchmark_scripts.py`` does not run still
  run end to end with the library's API, on the bundled ml-latest-small and ``tiny_bundle``.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from serving.app import create_app  # noqa: E402
from serving.schemas import AnomalyRequest, AnomalyResponse  # noqa: E402
from serving.settings import ServingSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DOC = ROOT / "docs" / "serving-vae-api.md"


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    settings = ServingSettings(bundle=str(tiny_bundle), max_k=50, max_history=30, max_batch=5)
    with TestClient(create_app(settings)) as c:
        yield c


def _doc_fields(text: str, class_name: str) -> set[str]:
    """Field names of a ``class <class_name>(BaseModel):`` sketch in the doc's code blocks."""
    block = text.split(f"class {class_name}(BaseModel):", 1)[1].split("```", 1)[0]
    return set(re.findall(r"^    (\w+):", block, flags=re.MULTILINE))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_serving_doc_lists_the_anomaly_fields() -> None:
    text = DOC.read_text()
    assert _doc_fields(text, "AnomalyRequest") == set(AnomalyRequest.model_fields)
    assert _doc_fields(text, "AnomalyResponse") == set(AnomalyResponse.model_fields)


def test_serving_doc_quotes_the_messages_the_api_answers(client: TestClient) -> None:
    doc = _flat(DOC.read_text())

    def message(response: Any, status: int) -> str:
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        return detail if isinstance(detail, str) else detail[0]["msg"]

    no_known = client.post("/v1/anomaly", json={"items": [123456789]})
    held_out = client.post("/v1/anomaly", json={"items": [0], "reference": "held-out"})
    body_seed = client.post("/v1/recommendations", json={"history": [0], "seed": 1})
    query_seed = client.get("/v1/users/0/recommendations", params={"seed": 1})
    too_long = client.post("/v1/anomaly", json={"items": list(range(31))})
    for quoted in (
        message(no_known, 422),
        message(held_out, 422),
        message(body_seed, 422),  # with pydantic's "Value error, " prefix
        message(query_seed, 422),
    ):
        assert _flat(quoted) in doc, quoted
    assert message(too_long, 422) == (
        "List should have at most 30 items (the server's max_history), not 31"
    )
    assert "the server's max_history), not M" in doc
    assert no_known.json()["detail"][0]["loc"] == ["body", "items"]
    assert held_out.json()["detail"][0]["loc"] == ["body", "reference"]
    assert body_seed.json()["detail"][0]["loc"] == ["body"]
    assert query_seed.json()["detail"][0]["loc"] == ["query", "seed"]


def test_serving_doc_quotes_the_not_ready_message() -> None:
    from serving.deps import NOT_READY

    assert NOT_READY in DOC.read_text()


# ---------------------------------------------------------------------------- benchmark scripts
def _run_script(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``benchmarks/<name>.py`` as ``__main__`` with ``argv``, its folder first on the path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="__main__")


def test_quality_scripts_run_on_the_bundled_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import quality_common

    # start() limits the BLAS threads of the whole process and adds a log file: not in a test.
    monkeypatch.setattr(quality_common, "start", lambda args, log_name: None)
    out = tmp_path / "quality"
    common = ["--dataset", "ml-latest-small", "--out", str(out)]
    small = ["--set", "epochs=1", "--set", "hidden_dims=[16]", "--set", "latent_dim=8"]
    _run_script("quality_run", [*common, "--model", "popularity", "--test"], monkeypatch)
    for name, seed in (("vae", "1"), ("vae2", "2")):
        argv = [*common, "--model", "multvae", "--name", name, *small, "--set", f"seed={seed}"]
        _run_script("quality_run", [*argv, "--save-bundle"], monkeypatch)
    _run_script("quality_test", [*common, "--name", "vae"], monkeypatch)
    _run_script(
        "quality_ensemble",
        [*common, "--members", "vae,vae2", "--name", "ens", "--test"],
        monkeypatch,
    )
    results = out / "ml-latest-small"
    vae = json.loads((results / "vae.json").read_text())
    assert vae["best_epoch"] == 1 and Path(vae["bundle"]).is_dir()
    assert {"validation", "test"} <= vae.keys()
    assert "test" in json.loads((results / "ens.json").read_text())

    rows = tmp_path / "rows.json"
    rows.write_text(
        json.dumps({"ml-latest-small": [["Popularity", "popularity"], ["Mult-VAE", "vae"]]})
    )
    capsys.readouterr()
    _run_script("quality_table", ["--rows", str(rows), "--out", str(out)], monkeypatch)
    table = capsys.readouterr().out
    assert "| Popularity |" in table and "| Mult-VAE |" in table


def test_serve_latency_runs_on_a_small_bundle(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "latency.json"
    argv = ["--bundle", str(tiny_bundle), "--name", "tiny", "--threads", "1", "--history", "3"]
    argv += ["-k", "5", "--repeats", "3", "--batch", "4", "--batch-repeats", "1", "--out", str(out)]
    _run_script("serve_latency", argv, monkeypatch)
    record = json.loads(out.read_text())
    assert record["model"] == "tiny" and record["k"] == 5
    (run,) = record["runs"]
    assert run["torch_threads"] == 1 and run["batch"]["n_histories"] == 4
