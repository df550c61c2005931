"""Blend a saved VAE with EASE: weight and normalization chosen on validation, test scored once.

Usage::

    .venv/bin/python benchmarks/quality_blend.py --dataset ml-1m --vae recvae-s1-... --ease ease

``--vae`` names a result of ``quality_run.py``/``quality_search.py`` with a saved bundle;
``--ease`` a result of ``quality_run.py --model ease`` whose lambda was chosen on validation
(``--lambda`` gives one directly). The blend's weight (0, 0.05, ..., 1) and normalization
(z-score or min-max per user) are chosen by validation NDCG@100; then the test users are scored
once. The result goes to ``<out>/<dataset>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from quality_common import common_arguments, load_split, logger, score, start, summary, write_result

from recvae.baselines import EASE, EASEConfig
from recvae.blend import select_blend_weight
from recvae.recommender import Recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--vae", required=True, help="result name of the VAE (with a bundle)")
    parser.add_argument("--ease", help="result name of the EASE run (its chosen lambda)")
    parser.add_argument("--lambda", type=float, dest="lam", help="EASE lambda (else --ease)")
    parser.add_argument("--name", help="result name (default blend-<vae>)")
    common_arguments(parser)
    args = parser.parse_args()
    name = args.name or f"blend-{args.vae}"
    start(args, f"{args.dataset}-{name}")
    folder = args.out / args.dataset
    vae_record = json.loads((folder / f"{args.vae}.json").read_text())
    if args.lam is not None:
        lam = args.lam
    elif args.ease:
        lam = json.loads((folder / f"{args.ease}.json").read_text())["config"]["regularization"]
    else:
        raise SystemExit("give --ease (a result name) or --lambda")
    split = load_split(args.dataset, args.data_dir, args.split_cache)
    vae = Recommender.load(vae_record["bundle"], device=args.device)
    t0 = time.perf_counter()
    ease = EASE(EASEConfig(regularization=float(lam)), device=args.device).fit(split.train)
    ease_seconds = time.perf_counter() - t0
    selections: dict[str, Any] = {}
    best = None
    for normalization in ("zscore", "minmax"):
        selection = select_blend_weight(
            vae, ease, split.validation, normalization=normalization, batch_size=1000
        )
        selections[normalization] = {"best": selection.best, "scores": selection.scores}
        logger.info(
            "%s blend %s: weight %.2f validation ndcg@100 %.4f",
            args.dataset,
            normalization,
            selection.best,
            selection.scores[selection.best],
        )
        if best is None or selection.scores[selection.best] > best.scores[best.best]:
            best = selection
    assert best is not None
    blend = best.blend
    select_seconds = time.perf_counter() - t0 - ease_seconds
    validation = score(blend, split.validation, split, args.device)
    test = score(blend, split.test, split, args.device)
    logger.info(
        "%s %s (weight %.2f, %s) TEST ndcg@100 %.4f ± %.4f",
        args.dataset,
        name,
        blend.weight,
        blend.normalization,
        test.mean("ndcg@100"),
        test.stderr("ndcg@100"),
    )
    record = {
        "model": "blend",
        "config": {
            "vae": args.vae,
            "vae_config": vae_record.get("config"),
            "ease_lambda": lam,
            "weight_vae": blend.weight,
            "normalization": blend.normalization,
        },
        "selection": selections,
        "train_seconds": vae_record.get("train_seconds", 0.0) + ease_seconds,
        "ease_seconds": ease_seconds,
        "select_seconds": select_seconds,
        "validation": summary(validation),
        "test": summary(test),
    }
    write_result(args.out, args.dataset, name, record)


if __name__ == "__main__":
    main()
