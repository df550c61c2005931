"""The main job: load data, split (strong generalization), train, score test users, save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings import JobSettings, default_n_heldout, load_data

if TYPE_CHECKING:
    from recvae.config import ModelConfig
    from recvae.evaluation import EvaluationResult
    from recvae.recommender import Recommender
    from recvae.split import Split
    from recvae.training import EpochCallback

logger = logging.getLogger(__name__)

PAPER_METRICS = ("recall@20", "recall@50", "ndcg@100")


@dataclass
class PreparedData:
    split: Split
    name: str
    fingerprint: str


@dataclass
class TrainOutcome:
    recommender: Recommender
    split: Split
    test: EvaluationResult
    validation: EvaluationResult
    bundle_path: Path | None
    train_seconds: float
    dataset: str
    registered: dict[str, str] | None = None  # registry name and version, when registered


def prepare(job: JobSettings) -> PreparedData:
    """Load the data and make the seeded split."""
    from recvae.split import split_users

    data, dataset_n_heldout = load_data(job.data, min_user_count=job.protocol.min_user_count)
    n_heldout = job.protocol.n_heldout or dataset_n_heldout or default_n_heldout(data.n_users)
    split = split_users(
        data,
        n_heldout=n_heldout,
        holdout_fraction=job.protocol.holdout_fraction,
        seed=job.protocol.seed,
        min_target_user_count=job.protocol.min_user_count,
    )
    logger.info("data %s: %s; split %s", job.data.name, data, split.summary())
    return PreparedData(split=split, name=job.data.name, fingerprint=data.fingerprint())


def default_output_dir(job: JobSettings, model: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{job.data.name}-{model}-{stamp}"


def checkpoint_differences(path: Path, config: ModelConfig, fingerprint: str) -> list[str] | None:
    """What differs between the training checkpoint at ``path`` and a run of ``config`` on the
    training matrix of ``fingerprint``: ``"<field> <then> -> <now>"`` for each config field,
    and ``"the training data"``. None when there is no checkpoint there or it cannot be read
    (the trainer reports an unreadable one itself).
    """
    if not path.is_file():
        return None
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        before = json.loads(saved["config"])
    except Exception:  # the trainer names an unreadable checkpoint when it resumes
        logger.debug("could not read the config of %s", path, exc_info=True)
        return None
    now = json.loads(config.to_json())
    changed = [
        f"{key} {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]
    if saved.get("fingerprint") != fingerprint:
        changed.append("the training data")
    return changed


def run_train(
    job: JobSettings,
    *,
    output_dir: Path | None = None,
    prepared: PreparedData | None = None,
    on_epoch: EpochCallback | None = None,
    save: bool = True,
    ks: tuple[int, ...] = (20, 50, 100),
) -> TrainOutcome:
    """Train the configured model, evaluate it on the test users, save the bundle.

    The checkpoint directory is ``output_dir/checkpoints``: rerunning the same command after an
    interruption resumes there. ``ks`` are the cut-offs of the final evaluations.
    """
    from recvae.training import train

    config = job.model_config()
    prepared = prepared or prepare(job)
    split = prepared.split
    out = output_dir or default_output_dir(job, config.model)
    options = job.run_options(checkpoint_dir=str(out / "checkpoints") if save else None)
    start = time.perf_counter()
    recommender = train(
        split.train, config, validation=split.validation, options=options, on_epoch=on_epoch
    )
    seconds = time.perf_counter() - start
    results = evaluate_held_out(recommender, split, ks=ks)
    bundle_path = record_run(
        recommender,
        job,
        prepared,
        results,
        train_seconds=seconds,
        output_dir=out if save else None,
    )
    return TrainOutcome(
        recommender,
        split,
        results["test"],
        results["validation"],
        bundle_path,
        seconds,
        prepared.name,
    )


def evaluate_held_out(
    recommender: Recommender, split: Split, *, ks: tuple[int, ...] = (20, 50, 100)
) -> dict[str, EvaluationResult]:
    """``{"validation": ..., "test": ...}``: the held-out users scored at the cut-offs ``ks``.

    The popularity metrics rank items by their training-user counts.
    """
    from recvae.evaluation import evaluate

    popularity = split.train.item_counts()
    return {
        part: evaluate(
            recommender,
            held_out.fold_in.matrix,
            held_out.targets.matrix,
            ks=ks,
            item_popularity=popularity,
            device=str(recommender.device),
        )
        for part, held_out in (("validation", split.validation), ("test", split.test))
    }


def _world_size() -> dict[str, int]:
    """``{"world_size": N}`` while a DDP process group is up (a ``torchrun`` run), else {}."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"world_size": dist.get_world_size()}
    return {}


def record_run(
    recommender: Recommender,
    job: JobSettings,
    prepared: PreparedData,
    results: dict[str, EvaluationResult],
    *,
    train_seconds: float,
    output_dir: Path | None,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Write the run's facts into the bundle meta; with ``output_dir``, save bundle and metrics.

    ``output_dir/bundle`` is overwritten and ``output_dir/metrics.json`` holds a summary
    (non-finite numbers as ``null``). ``extra`` fields (e.g. the world size) go into both.

    Returns:
        The saved bundle's path, or None without ``output_dir``.
    """
    extra = {**_world_size(), **(extra or {})}
    recommender.meta.update(
        {
            "dataset": prepared.name,
            "data_fingerprint": prepared.fingerprint,
            "split": prepared.split.summary(),
            "job": job.to_dict(),
            "train_seconds": train_seconds,
            **extra,
            "metrics": {part: result.summary() for part, result in results.items()},
        }
    )
    if output_dir is None:
        return None
    bundle_path = recommender.save(output_dir / "bundle", overwrite=True)
    summary = {
        "dataset": prepared.name,
        "model": recommender.config.model,
        "bundle": str(bundle_path),
        "train_seconds": train_seconds,
        **extra,
        "best_epoch": recommender.meta.get("best_epoch"),
        **{part: result.summary() for part, result in results.items()},
    }
    (output_dir / "metrics.json").write_text(json.dumps(_finite(summary), indent=2))
    return bundle_path


def metric_rows(result: EvaluationResult, names: tuple[str, ...] = PAPER_METRICS) -> list[str]:
    return [f"{name:<12} {result.mean(name):.4f} ± {result.stderr(name):.4f}" for name in names]


def results_table(
    rows: list[tuple[str, EvaluationResult, dict[str, Any]]], names: tuple[str, ...] = PAPER_METRICS
) -> str:
    """A markdown table: one row per model, mean ± standard error per metric."""
    extra_cols = sorted({k for _, _, extra in rows for k in extra})
    header = [
        "model",
        *[n.replace("recall", "Recall").replace("ndcg", "NDCG") for n in names],
        *extra_cols,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result, extra in rows:
        cells = [label] + [f"{result.mean(n):.4f} ± {result.stderr(n):.4f}" for n in names]
        cells += [_fmt(extra.get(c, "")) for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value: Any) -> Any:
    import math

    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
