"""Shared helpers of the quality benchmarks (``benchmarks/quality_*.py``).

The split is made by :func:`pipelines.train_job.prepare`, the same function ``recvae train`` and
``recvae experiment`` use, so every number here is on the split of PROTOCOL.md (seed 98765, the
dataset's ``n_heldout``). Results are JSON files ``<out>/<dataset>/<name>.json``; validation
metrics pick everything, test metrics are computed once per final configuration.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.settings import DataSettings, JobSettings, ProtocolSettings
from pipelines.train_job import prepare
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


def load_split(dataset: str, data_dir: str) -> Split:
    """The protocol's split of a built-in dataset (same code path as ``recvae train``)."""
    job = JobSettings(
        data=DataSettings(dataset=dataset, data_dir=data_dir), protocol=ProtocolSettings()
    )
    return prepare(job).split


def score(ranker: Ranker, held_out: HeldOut, split: Split) -> EvaluationResult:
    return evaluate(
        ranker,
        held_out.fold_in.matrix,
        held_out.targets.matrix,
        item_popularity=split.train.item_counts(),
        batch_size=1000,
    )


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
