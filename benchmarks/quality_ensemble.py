"""Average saved VAEs (e.g. one configuration trained with several seeds): chosen on validation.

Usage::

    .venv/bin/python benchmarks/quality_ensemble.py --dataset lastfm \\
        --members recvae-seed1,recvae-seed2,recvae-seed3 --name recvae-ensemble --test

``--members`` names results of ``quality_run.py --save-bundle`` (or ``quality_search.py``), in
the order they join: the ensembles of the first 1, 2, ..., n members, each with the mean
log-probability and the probability mixture (:class:`recvae.Ensemble`), are scored on the
validation users, and the best by validation NDCG@100 is kept (ties go to fewer members). Then,
with ``--test``, its test users are scored once. The training time is the sum of the members'.
The result goes to ``<out>/<dataset>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
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

from recvae.ensemble import Ensemble
from recvae.recommender import Recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--members", required=True, help="comma-separated result names")
    parser.add_argument("--name", required=True, help="result name")
    parser.add_argument(
        "--test", action="store_true", help="score the chosen ensemble's test users"
    )
    common_arguments(parser)
    args = parser.parse_args()
    start(args, f"{args.dataset}-{args.name}")
    names = [n for n in args.members.split(",") if n]
    if len(names) < 2 or len(set(names)) != len(names):
        raise SystemExit(f"--members needs at least two distinct result names, got {names}")
    folder = args.out / args.dataset
    records: list[dict[str, Any]] = []
    for name in names:
        path = folder / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: train the member first")
        record = json.loads(path.read_text())
        if "bundle" not in record:
            raise SystemExit(f"{path} has no saved bundle (rerun with --save-bundle)")
        records.append(record)
    split = load_split(args.dataset, args.data_dir, args.split_cache)
    members = [Recommender.load(r["bundle"], device=args.device) for r in records]
    started = time.perf_counter()
    selection: dict[str, float] = {}
    best: tuple[float, int, str] | None = None
    for size in range(1, len(members) + 1):
        for combine in ("log_softmax", "softmax"):
            ensemble = Ensemble(members[:size], combine=combine, device=args.device)
            value = score(ensemble, split.validation, split, args.device).mean("ndcg@100")
            selection[f"{size}/{combine}"] = value
            logger.info(
                "%s %d member(s), %s: validation ndcg@100 %.4f", args.dataset, size, combine, value
            )
            if best is None or value > best[0]:
                best = (value, size, combine)
    assert best is not None
    _, size, combine = best
    chosen = Ensemble(members[:size], combine=combine, device=args.device)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "model": "ensemble",
        "config": {
            "model": "ensemble",
            "members": names[:size],
            "combine": combine,
            "member_config": records[0].get("config"),
        },
        "selection": selection,
        "selection_seconds": time.perf_counter() - started,
        "train_seconds": sum(float(r.get("train_seconds") or 0.0) for r in records[:size]),
        "validation": summary(score(chosen, split.validation, split, args.device)),
    }
    logger.info(
        "%s chose %d member(s), %s: validation ndcg@100 %.4f",
        args.dataset,
        size,
        combine,
        out["validation"]["ndcg@100"]["mean"],
    )
    if args.test:
        out["test"] = test_summary(chosen, split, args.dataset, args.name, args.device)
    write_result(args.out, args.dataset, args.name, out)


if __name__ == "__main__":
    main()
