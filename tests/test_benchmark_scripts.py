"""The training benchmark scripts run on the CPU: train_profile end to end, train_speed's --rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as the scripts import their siblings (their folder first)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


def test_train_profile_writes_the_ops_of_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_profile = _script("train_profile", monkeypatch)
    out = tmp_path / "profile"
    argv = ["--dataset", "tiny", "--device", "cpu", "--batch-size", "200"]
    assert train_profile.main([*argv, "--warmup", "1", "--steps", "1", "--out", str(out)]) == 0

    record = json.loads((out / "profile.json").read_text())
    assert record["ms_per_step"] > 0
    assert record["settings"]["steps"] == 1
    assert record["settings"]["batch_size"] == 200
    assert record["settings"]["torch"] == torch.__version__
    ops = record["ops"]
    assert 0 < len(ops) <= 40
    assert {"name", "calls", "self_ms_per_step", "total_ms_per_step", "clock"} <= set(ops[0])
    assert any(op["name"] in ("aten::mm", "aten::addmm", "aten::matmul") for op in ops)
    assert "Grouped by input shape" in (out / "profile.txt").read_text()
    assert not (out / "trace.json").exists()


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--warmup", "-1"], ["--batch-size", "0"]])
def test_train_profile_rejects_bad_arguments(
    bad: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_profile = _script("train_profile", monkeypatch)
    with pytest.raises(SystemExit) as exc:
        train_profile.main(["--dataset", "tiny", "--device", "cpu", "--out", str(tmp_path), *bad])
    assert exc.value.code == 2


def test_train_speed_rejects_an_unknown_row(monkeypatch: pytest.MonkeyPatch) -> None:
    train_speed = _script("train_speed", monkeypatch)
    with pytest.raises(SystemExit) as exc:
        train_speed.main(["--rows", "project-fast", "--quality-epochs", "0"])
    assert exc.value.code == 2


def test_train_speed_rows_keep_the_reference_first(monkeypatch: pytest.MonkeyPatch) -> None:
    train_speed = _script("train_speed", monkeypatch)
    from recvae.data import synthetic_interactions

    data = synthetic_interactions(n_users=300, n_items=100, n_interactions=3000, seed=0)
    memory = train_speed.HostMemory()
    rows = train_speed.measure("tiny", data, torch.device("cpu"), 1, memory, only=["project-fp32"])
    assert [row.variant for row in rows] == ["reference", "project-fp32"]
    assert rows[0].ratio == pytest.approx(1.0)


@pytest.mark.parametrize("support", ["native", "emulated", "none"])
def test_train_speed_has_a_cpu_bf16_row_where_the_cpu_has_bf16_units(
    support: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_speed = _script("train_speed", monkeypatch)
    from recvae.data import synthetic_interactions

    monkeypatch.setattr(train_speed.cpu_runtime, "bf16_support", lambda: support)
    data = synthetic_interactions(n_users=300, n_items=100, n_interactions=3000, seed=0)
    memory = train_speed.HostMemory()
    rows = train_speed.measure("tiny", data, torch.device("cpu"), 1, memory, only=["project-bf16"])
    assert [row.variant for row in rows] == ["reference", "project-bf16"]
    bf16 = rows[1]
    assert bf16.precision == "bf16"
    if support == "native":
        assert bf16.skipped is None and len(bf16.seconds) == 1 and bf16.ratio is not None
    else:
        assert bf16.skipped == f"skipped: bf16 {support} on this CPU (no AVX512_BF16 or AMX units)"
        assert not bf16.seconds
        assert bf16.skipped in train_speed.table(rows, memory)
    others = train_speed.measure(
        "tiny", data, torch.device("cpu"), 1, memory, only=["project-fp32"]
    )
    assert [row.variant for row in others] == ["reference", "project-fp32"]


def _cpu_runtime_record(
    section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """``cpu_runtime.py --sections <section>`` over one small catalog; its JSON record."""
    cpu_runtime = _script("cpu_runtime", monkeypatch)
    monkeypatch.setattr(cpu_runtime, "SHAPES", {"small": 1_000})
    out = tmp_path / f"{section}.json"
    argv = ["--threads", "1", "--repeats", "1", "--sections", section, "--json", str(out)]
    assert cpu_runtime.main(argv) == 0
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def test_cpu_runtime_times_the_products_in_fp32_and_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _cpu_runtime_record("bf16", tmp_path, monkeypatch)
    assert record["machine"]["cpu_bf16"] in ("native", "emulated", "none")
    labels = [row["product"] for row in record["bf16"]]
    assert len(labels) == 8 and all(row["dataset"] == "small" for row in record["bf16"])
    for dtype in ("float32", "bfloat16"):
        assert f"forward h @ W.T, {dtype}" in labels
        assert f"grad_weight g.T @ h, {dtype}" in labels
    assert labels[-2:] == [
        "padded layer, forward + backward, fp32",
        "padded layer, forward + backward, bf16 autocast",
    ]
    assert all(row["ms"] > 0 and row["gflops"] > 0 for row in record["bf16"])


def test_cpu_runtime_measures_only_the_sections_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _cpu_runtime_record("padded", tmp_path, monkeypatch)
    cpu_runtime = _script("cpu_runtime", monkeypatch)
    assert "heap" not in record and "gemm" not in record
    rows = {row["layer"]: row for row in record["padded"]}
    assert rows.keys() == {
        "in place (padded_output on the CPU)",
        "zero-padded weight copy",
        "unpadded",
    }
    assert rows["unpadded"]["columns"] == 1_000
    assert rows["zero-padded weight copy"]["columns"] == 1_024
    assert all(row["ms"] > 0 for row in rows.values())
    with pytest.raises(SystemExit) as exc:
        cpu_runtime.main(["--sections", "everything"])
    assert exc.value.code == 2


def test_cpu_runtime_times_the_first_layer_on_batches_of_the_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import scipy.sparse as sp

    cpu_runtime = _script("cpu_runtime", monkeypatch)
    monkeypatch.setattr(cpu_runtime, "SHAPES", {"small": 300})
    asked = []
    rng = np.random.default_rng(0)
    matrix = sp.csr_array((rng.random((700, 300)) < 0.05).astype(np.float32))

    def training_matrix(name: str, data_dir: str, cache: Path | None) -> sp.csr_array:
        asked.append((name, data_dir, cache))
        return matrix

    monkeypatch.setattr(cpu_runtime, "_training_matrix", training_matrix)
    out = tmp_path / "bag.json"
    argv = ["--repeats", "2", "--sections", "bag", "--split-cache", str(tmp_path), "--json"]
    assert cpu_runtime.main([*argv, str(out)]) == 0
    assert asked == [("small", "../shared/data", tmp_path)]
    rows = json.loads(out.read_text())["bag"]
    assert [row["layer"] for row in rows] == [
        "transposed bag sum (_ItemBag, the CPU path now)",
        "F.embedding_bag's backward (before)",
    ]
    users = np.sort(np.random.default_rng(4).permutation(700)[:500])
    assert all(row["entries"] == matrix[users].nnz and row["items"] == 300 for row in rows)
    assert all(row["ms"] > 0 for row in rows)


def test_serve_probe_delay_probes_during_small_posts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_probe_delay = _script("serve_probe_delay", monkeypatch)
    body, n = serve_probe_delay.batch_body(64)
    assert (n, len(body)) == (1, 49) and json.loads(body)["histories"][0]["history"] == list(
        range(10)
    )
    out = tmp_path / "probe.json"
    argv = ["--max-bytes", "65536", "--repeats", "1", "--idle", "5", "--json", str(out)]
    assert serve_probe_delay.main(argv) == 0

    record = json.loads(out.read_text())
    assert record["server"]["json_body_route"] is True
    assert record["idle_healthz"]["n"] == 5
    shapes = {shape["shape"]: shape for shape in record["shapes"]}
    assert shapes["batch"]["histories"] > 1000 and shapes["single"]["ids"] > 10_000
    for shape in shapes.values():
        assert shape["bytes"] <= 65536
        (run,) = shape["runs"]
        assert run["post_status"] == 422  # over max_batch / max_history, after the parse
        assert run["healthz_errors"] == 0
