"""A small validation-only grid search: every combination trained, scored on validation users.

``recvae tune`` (optuna + MLflow) was not available when these searches ran, so this script does
the same job on a small scale. Test users are never scored here: the chosen configuration's saved
bundle is scored once afterwards by ``quality_test.py``.

Usage::

    nohup .venv/bin/python benchmarks/quality_search.py --dataset ml-1m --model recvae \\
        --prefix recvae-s1 --set epochs=100 \\
        --grid '{"gamma": [0.002, 0.005], "batch_size": [100]}' \\
        > /tmp/quality/logs/search.out 2>&1 &

Each combination is written as ``<out>/<dataset>/<prefix>-<k=v,...>.json`` with its bundle under
``<out>/bundles``; a finished combination is skipped when the search is rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
from types import SimpleNamespace

from quality_common import common_arguments, logger, read_results, start
from quality_run import parse_sets, run


def _label(combo: dict[str, object]) -> str:
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in combo.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True, choices=["multvae", "multdae", "recvae"])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--grid", required=True, help="JSON object: field -> list of values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    common_arguments(parser)
    args = parser.parse_args()
    start(args, f"{args.dataset}-{args.prefix}")
    grid: dict[str, list[object]] = json.loads(args.grid)
    base = parse_sets(args.set)
    done = read_results(args.out, args.dataset)
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values, strict=True))
        name = f"{args.prefix}-{_label(combo)}".replace("/", "_")
        if name in done:
            logger.info("skip %s (done)", name)
            continue
        sets = {**base, **combo}
        run_args = SimpleNamespace(
            dataset=args.dataset,
            model=args.model,
            name=name,
            set=[f"{k}={json.dumps(v)}" for k, v in sets.items()],
            lambdas="",
            large=False,
            test=False,
            save_bundle=True,
            threads=args.threads,
            data_dir=args.data_dir,
            out=args.out,
            device=args.device,
            split_cache=args.split_cache,
        )
        record = run(run_args)  # type: ignore[arg-type]
        logger.info(
            "SEARCH %s %s: validation ndcg@100 %.4f best epoch %s",
            args.dataset,
            name,
            record["validation"]["ndcg@100"]["mean"],
            record.get("best_epoch"),
        )


if __name__ == "__main__":
    main()
