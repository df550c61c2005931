"""Score a chosen, saved model on the test users, once, and add the numbers to its result file.

Usage::

    .venv/bin/python benchmarks/quality_test.py --dataset ml-1m --name recvae-s1-gamma=0.005

The bundle was saved by ``quality_run.py --save-bundle`` or ``quality_search.py``; the choice
among them was made on validation users. The test metrics go into ``<name>.json`` under
``"test"`` (the file records that they were added afterwards).

``--bundle PATH`` imports a model trained elsewhere on the same split (e.g. by
``recvae train --config pipelines/configs/ml-1m.toml``, which selects its epoch on validation
users): a new ``<name>.json`` gets its validation and test metrics, config and training time.
``--checkpoint PATH`` finishes a run that had to be stopped for time: the best epoch of its
checkpoint (chosen on validation) becomes a bundle and is scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from quality_common import (
    common_arguments,
    load_split,
    score,
    start,
    summary,
    test_summary,
    write_result,
)

from recvae.recommender import Recommender


def _from_checkpoint(args: argparse.Namespace, split: Any) -> dict[str, Any]:
    """The best epoch so far of a run that had to be stopped early (cut for time)."""
    from recvae.config import config_from_dict
    from recvae.model import build_model

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    config = config_from_dict(json.loads(ckpt["config"]))
    if ckpt["fingerprint"] != split.train.fingerprint():
        raise SystemExit(f"{args.checkpoint} was written for other training data")
    model = build_model(config, split.train.n_items)
    model.load_state_dict(ckpt["best_state"] if ckpt["best_state"] is not None else ckpt["model"])
    history = list(ckpt["history"])
    meta = {
        "best_epoch": int(ckpt["best_epoch"]),
        "epochs_run": int(ckpt["epoch"]),
        "history": history,
    }
    rec = Recommender(
        model,
        config,
        split.train.item_ids,
        user_ids=split.train.user_ids,
        train_matrix=split.train.matrix,
        meta=meta,
    )
    bundle = rec.save(args.out / "bundles" / args.dataset / args.name, overwrite=True)
    return {
        "model": config.model,
        "config": config.to_dict(),
        "bundle": str(bundle),
        "best_epoch": meta["best_epoch"],
        "epochs_run": meta["epochs_run"],
        "cut_short": f"stopped after epoch {meta['epochs_run']} of {config.epochs} (time)",
        "history": history,
        "train_seconds": sum(float(h.get("epoch_seconds", 0.0)) for h in history),
        "validation": summary(score(rec, split.validation, split, args.device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--bundle", type=Path, help="import a bundle trained elsewhere")
    parser.add_argument(
        "--checkpoint", type=Path, help="finish a run stopped early: its best epoch so far"
    )
    common_arguments(parser)
    args = parser.parse_args()
    start(args, f"{args.dataset}-{args.name}-test")
    path = args.out / args.dataset / f"{args.name}.json"
    split = load_split(args.dataset, args.data_dir, args.split_cache)
    if args.checkpoint is not None:
        record = _from_checkpoint(args, split)
        rec = Recommender.load(record["bundle"], device=args.device)
    elif args.bundle is not None:
        if path.exists():
            raise SystemExit(f"{path} exists: choose another --name to import {args.bundle}")
        rec = Recommender.load(args.bundle, device=args.device)
        if rec.meta.get("split", {}).get("seed", 98765) != split.summary()["seed"]:
            raise SystemExit(f"{args.bundle} was trained on another split")
        record = {
            "model": rec.config.model,
            "config": rec.config.to_dict(),
            "bundle": str(args.bundle),
            "imported": True,
            "best_epoch": rec.meta.get("best_epoch"),
            "epochs_run": rec.meta.get("epochs_run"),
            "train_seconds": rec.meta.get("train_seconds"),
            "command": rec.meta.get("job"),
            "validation": summary(score(rec, split.validation, split, args.device)),
        }
    else:
        record = json.loads(path.read_text())
        if "test" in record:
            raise SystemExit(f"{path} already has test metrics: the test users are scored once")
        rec = Recommender.load(record["bundle"], device=args.device)
    record["test"] = test_summary(rec, split, args.dataset, args.name, args.device)
    record["test_scored"] = time.strftime("%F %T")
    record = {k: v for k, v in record.items() if k not in ("dataset", "name", "written")}
    write_result(args.out, args.dataset, args.name, record)


if __name__ == "__main__":
    main()
