"""Score a chosen, saved model on the test users, once, and add the numbers to its result file.

Usage::

    .venv/bin/python benchmarks/quality_test.py --dataset ml-1m --name recvae-s1-gamma=0.005

The bundle was saved by ``quality_run.py --save-bundle`` or ``quality_search.py``; the choice
among them was made on validation users. The test metrics go into ``<name>.json`` under
``"test"`` (the file records that they were added afterwards).

``--bundle PATH`` imports a model trained elsewhere on the same split (e.g. by
``recvae train --config pipelines/configs/ml-1m.toml``, which selects its epoch on validation
users): a new ``<name>.json`` gets its validation and test metrics, config and training time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality_common import load_split, logger, score, setup_logging, summary, write_result
from threadpoolctl import threadpool_limits

from recvae.recommender import Recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--bundle", type=Path, help="import a bundle trained elsewhere")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("/tmp/quality"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    setup_logging(args.out / "logs" / f"{args.dataset}-{args.name}-test.log")
    path = args.out / args.dataset / f"{args.name}.json"
    split = load_split(args.dataset, args.data_dir)
    if args.bundle is not None:
        if path.exists():
            raise SystemExit(f"{path} exists: choose another --name to import {args.bundle}")
        rec = Recommender.load(args.bundle)
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
            "validation": summary(score(rec, split.validation, split)),
        }
    else:
        record = json.loads(path.read_text())
        if "test" in record:
            raise SystemExit(f"{path} already has test metrics: the test users are scored once")
        rec = Recommender.load(record["bundle"])
    test = score(rec, split.test, split)
    record["test"] = summary(test)
    record["test_scored"] = time.strftime("%F %T")
    logger.info(
        "%s %s TEST ndcg@100 %.4f ± %.4f",
        args.dataset,
        args.name,
        test.mean("ndcg@100"),
        test.stderr("ndcg@100"),
    )
    record = {k: v for k, v in record.items() if k not in ("dataset", "name", "written")}
    write_result(args.out, args.dataset, args.name, record)


if __name__ == "__main__":
    main()
