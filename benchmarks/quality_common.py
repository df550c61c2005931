"""Shared helpers of the quality benchmarks (``benchmarks/quality_*.py``).

The split is made by :func:`pipelines.train_job.prepare`, the same function ``recvae train`` and
``recvae experiment`` use, so every number here is on the split of PROTOCOL.md (seed 98765, the
dataset's ``n_heldout``). Results are JSON files ``<out>/<dataset>/<name>.json``; validation
metrics pick everything, test metrics are computed once per final configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from recvae.evaluation import EvaluationResult, Ranker, evaluate
from recvae.split import HeldOut, Split

PAPER = ("recall@20", "recall@50", "ndcg@100")
DATASETS = ("ml-1m", "lastfm", "gowalla")

logger = logging.getLogger("quality")


def setup_logging(path: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers
    )


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every quality script takes (threads, data, output, device, split cache)."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/quality"))
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (training, EASE and scoring)"
    )
    parser.add_argument(
        "--split-cache",
        type=Path,
        help="folder of pickled splits (<dataset>.pkl): read when present, else written; lets "
        "the scripts run where polars is not installed (a GPU machine)",
    )


def start(args: argparse.Namespace, log_name: str) -> None:
    """Thread limits (torch and the BLAS of NumPy/SciPy) and logging to ``<out>/logs``."""
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    setup_logging(args.out / "logs" / f"{log_name}.log")


def load_split(dataset: str, data_dir: str, cache: Path | None = None) -> Split:
    """The protocol's split of a built-in dataset (same code path as ``recvae train``).

    With ``cache``, ``<cache>/<dataset>.pkl`` is read when it exists (written by an earlier
    call of this function with the same cache, from the same code path), else written.
    """
    path = None if cache is None else Path(cache) / f"{dataset}.pkl"
    if path is not None and path.is_file():
        with path.open("rb") as fh:
            split = pickle.load(fh)
        logger.info("split of %s read from %s: %s", dataset, path, split.summary())
        return split
    from pipelines.settings import DataSettings, JobSettings, ProtocolSettings
    from pipelines.train_job import prepare

    job = JobSettings(
        data=DataSettings(dataset=dataset, data_dir=data_dir), protocol=ProtocolSettings()
    )
    split = prepare(job).split
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            pickle.dump(split, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return split


def score(ranker: Ranker, held_out: HeldOut, split: Split, device: str = "cpu") -> EvaluationResult:
    return evaluate(
        ranker,
        held_out.fold_in.matrix,
        held_out.targets.matrix,
        item_popularity=split.train.item_counts(),
        batch_size=1000,
        device=_device(device),
    )


def test_summary(
    ranker: Ranker, split: Split, dataset: str, name: str, device: str = "cpu"
) -> dict[str, Any]:
    """Score the test users (once per final configuration), log NDCG@100 and return the summary."""
    test = score(ranker, split.test, split, device)
    logger.info(
        "%s %s TEST ndcg@100 %.4f ± %.4f",
        dataset,
        name,
        test.mean("ndcg@100"),
        test.stderr("ndcg@100"),
    )
    return summary(test)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def summary(result: EvaluationResult, names: tuple[str, ...] = PAPER) -> dict[str, Any]:
    """Mean and standard error of each metric (plus standard recall, labelled as such)."""
    out: dict[str, Any] = {}
    for name in (*names, "recall_plain@20", "recall_plain@50"):
        out[name] = {"mean": result.mean(name), "stderr": result.stderr(name)}
    out["n_users"] = result.n_users
    # Per-user NDCG@100 (users with targets, row order) for paired comparisons between models.
    values = result.per_user["ndcg@100"][result.user_has_targets]
    out["ndcg@100_per_user"] = [round(float(v), 6) for v in values]
    return out


def write_result(out_dir: Path, dataset: str, name: str, record: dict[str, Any]) -> Path:
    path = out_dir / dataset / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dataset": dataset, "name": name, "written": time.strftime("%F %T"), **record}
    path.write_text(json.dumps(_finite(record), indent=2))
    logger.info("wrote %s", path)
    return path


def read_results(out_dir: Path, dataset: str) -> dict[str, dict[str, Any]]:
    folder = out_dir / dataset
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
