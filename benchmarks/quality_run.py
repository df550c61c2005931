"""Train or fit one model on a dataset of PROTOCOL.md and record its validation (and test) metrics.

Usage (from the repository root; 2 shared cores: one thread, in the background)::

    nohup .venv/bin/python benchmarks/quality_run.py --dataset ml-1m --model recvae \\
        --name recvae-paper --set epochs=50 --test --threads 1 > /tmp/quality/log 2>&1 &

Models: ``popularity``, ``ease`` (``--lambdas`` tried on validation), ``als`` (``--set`` its
config fields), ``multvae``, ``multdae``, ``recvae`` (``--set`` any config field, e.g.
``gamma=0.004`` or ``prior_weights=[0.15,0.75,0.1]``; values are parsed as JSON when they can
be). The best epoch and every choice use validation users only; ``--test`` scores the test users
once at the end (leave it off while searching). ``--save-bundle`` keeps the trained VAE for
``quality_blend.py``. The result goes to ``<out>/<dataset>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from quality_common import (
    common_arguments,
    load_split,
    logger,
    score,
    start,
    summary,
    test_summary,
    write_result,
)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    split = load_split(args.dataset, args.data_dir, args.split_cache)
    sets = parse_sets(args.set)
    record: dict[str, Any] = {
        "model": args.model,
        "settings": sets,
        "split": split.summary(),
        "device": args.device,
    }
    started = time.perf_counter()
    ranker: Any
    if args.model in ("multvae", "multdae", "recvae"):
        from recvae.config import RunOptions, config_from_dict
        from recvae.training import train

        config = config_from_dict({"model": args.model, **sets})
        options = RunOptions(
            device=args.device,
            num_threads=args.threads,
            progress=False,
            checkpoint_dir=str(args.out / "checkpoints" / args.dataset / args.name),
            checkpoint_every=25,  # gowalla: ~0.8 GB a checkpoint, slower to write than an epoch
        )

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            logger.info(
                "%s %s epoch %d: %s",
                args.dataset,
                args.name,
                epoch,
                " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            )

        ranker = train(
            split.train, config, validation=split.validation, options=options, on_epoch=on_epoch
        )
        record["config"] = config.to_dict()
        record["best_epoch"] = ranker.meta.get("best_epoch")
        record["epochs_run"] = ranker.meta.get("epochs_run")
        record["history"] = ranker.meta.get("history")
        if args.save_bundle:
            path = ranker.save(args.out / "bundles" / args.dataset / args.name, overwrite=True)
            record["bundle"] = str(path)
    elif args.model == "ease" and args.large:
        # A catalog whose EASE matrix cannot be kept twice (gowalla: 41k items, 6.7 GB each):
        # fit the candidates one at a time, with the ILP64 LAPACK of quality_ease_ilp64.py.
        # The test metrics of the best-so-far candidate are computed at once and held unseen
        # (the same information as keeping its matrix); only the chosen candidate's are
        # written, and the choice uses validation only.
        from quality_ease_ilp64 import LargeEASE

        scores: dict[float, float] = {}
        held_test = None
        best_lam, best_val, best_fit = math.nan, -math.inf, math.nan
        for lam in [float(x) for x in args.lambdas.split(",")]:
            model = LargeEASE(lam).fit(split.train)
            val = score(model, split.validation, split, args.device)
            scores[lam] = val.mean("ndcg@100")
            logger.info(
                "%s EASE lambda=%g: validation ndcg@100 %.4f", args.dataset, lam, scores[lam]
            )
            if scores[lam] > best_val:
                best_lam, best_val, best_fit = lam, scores[lam], model.fit_seconds
                held_validation = val
                held_test = score(model, split.test, split, args.device) if args.test else None
            del model
        record["config"] = {"model": "ease", "regularization": best_lam}
        record["lambda_scores"] = scores
        record["fit_seconds"] = best_fit
        record["train_seconds"] = time.perf_counter() - started
        record["selection_seconds"] = record["train_seconds"]
        record["train_seconds"] = record.pop("fit_seconds")
        record["validation"] = summary(held_validation)
        if held_test is not None:
            record["test"] = summary(held_test)
            logger.info(
                "%s %s TEST ndcg@100 %.4f ± %.4f",
                args.dataset,
                args.name,
                held_test.mean("ndcg@100"),
                held_test.stderr("ndcg@100"),
            )
        record["command"] = " ".join(sys.argv)
        write_result(args.out, args.dataset, args.name, record)
        return record
    elif args.model == "ease":
        from recvae.baselines import select_ease_lambda

        lambdas = [float(x) for x in args.lambdas.split(",")]
        selection = select_ease_lambda(split.train, split.validation, lambdas, device=args.device)
        ranker = selection.model
        record["config"] = {"model": "ease", "regularization": selection.best}
        record["lambda_scores"] = selection.scores
        # The fit of the chosen lambda; the whole validation search is timed separately.
        record["fit_seconds"] = selection.model.fit_seconds
    elif args.model == "als":
        from recvae.baselines import ALSConfig
        from recvae.baselines_implicit import ALS

        config_als = ALSConfig(**sets)
        ranker = ALS(config_als).fit(split.train)
        record["config"] = config_als.to_dict()
    elif args.model == "popularity":
        from recvae.baselines import Popularity

        ranker = Popularity().fit(split.train)
        record["config"] = {"model": "popularity"}
    else:
        raise SystemExit(f"unknown model {args.model!r}")
    record["train_seconds"] = time.perf_counter() - started
    if "fit_seconds" in record:
        record["selection_seconds"] = record["train_seconds"]
        record["train_seconds"] = record.pop("fit_seconds")
    validation = score(ranker, split.validation, split, args.device)
    record["validation"] = summary(validation)
    logger.info(
        "%s %s validation ndcg@100 %.4f (train %.0fs)",
        args.dataset,
        args.name,
        validation.mean("ndcg@100"),
        record["train_seconds"],
    )
    if args.test:
        record["test"] = test_summary(ranker, split, args.dataset, args.name, args.device)
    record["command"] = " ".join(sys.argv)
    write_result(args.out, args.dataset, args.name, record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", help="result name (default: the model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lambdas", default="50,100,200,500,1000,2000", help="EASE candidates")
    parser.add_argument(
        "--large", action="store_true", help="EASE: one candidate matrix in memory at a time"
    )
    parser.add_argument("--test", action="store_true", help="score the test users at the end")
    parser.add_argument("--save-bundle", action="store_true")
    common_arguments(parser)
    args = parser.parse_args()
    args.name = args.name or args.model
    start(args, f"{args.dataset}-{args.name}")
    run(args)


if __name__ == "__main__":
    main()
