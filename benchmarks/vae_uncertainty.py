"""Posterior confidence on ml-1m: does it grow as the history grows?

``confidence = 1 - mean_d min(sigma_d, 1)`` of the posterior ``q(z | x)`` (see
``recvae.vae_tools``), the value every recommendation carries. Two views on the test users:

1. *Controlled*: for each test user with at least 100 known items (fold-in plus targets), random
   nested sub-histories of 1, 2, 5, 10, 20, 50 and 100 of them: the same users, only the amount
   of evidence changes.
2. *Natural*: each test user's real fold-in history, binned by its length.

It also checks that confidence means something for the recommendations: NDCG@100 of the test
users (fold-in -> targets, the protocol) by confidence quartile, and within length bins (so the
effect is not just "longer histories are easier").

Writes ``<out>.png`` (both views), ``<out>.json`` and ``<out>.md``.
Run: ``python benchmarks/vae_uncertainty.py --bundle runs/ml1m-multvae/bundle``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from vae_common import add_arguments, load_setup, logger, rows_to_csr, write_json

from recvae.evaluation import mask_history, ndcg_at_k

SIZES = (1, 2, 5, 10, 20, 50, 100)
BINS = ((1, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 10_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, out_name="uncertainty")
    args = parser.parse_args()
    setup = load_setup(args)
    rec = setup.recommender
    rng = np.random.default_rng(args.seed)

    # 1. Controlled: nested random sub-histories of the same users.
    lengths_full = np.diff(setup.full.indptr)
    users = np.flatnonzero(lengths_full >= max(SIZES))
    orders = [rng.permutation(setup.full[[u]].indices) for u in users]
    controlled = []
    for size in SIZES:
        conf = rec.confidence(rows_to_csr([o[:size] for o in orders], rec.n_items))
        controlled.append(
            {
                "size": size,
                "mean": float(conf.mean()),
                "p25": float(np.percentile(conf, 25)),
                "median": float(np.median(conf)),
                "p75": float(np.percentile(conf, 75)),
            }
        )
    _, sigma = rec.encode(rows_to_csr([o[:1] for o in orders], rec.n_items))
    _, sigma_100 = rec.encode(rows_to_csr([o[:100] for o in orders], rec.n_items))

    # 2. Natural: the real fold-in histories, and whether confidence tracks accuracy.
    fold_lengths = np.diff(setup.fold_in.indptr)
    confidence = rec.confidence(setup.fold_in)
    scores = mask_history(rec.score(setup.fold_in).clone(), setup.fold_in)
    ndcg = ndcg_at_k(scores, setup.targets, 100)
    has_target = ~np.isnan(ndcg)
    natural = []
    for lo, hi in BINS:
        in_bin = (fold_lengths >= lo) & (fold_lengths < hi)
        if not in_bin.any():
            continue
        conf_bin = confidence[in_bin]
        row = {
            "lengths": f"{lo}-{hi - 1}" if hi < 10_000 else f">={lo}",
            "n": int(in_bin.sum()),
            "mean": float(conf_bin.mean()),
            "p25": float(np.percentile(conf_bin, 25)),
            "p75": float(np.percentile(conf_bin, 75)),
            "center": float(np.median(fold_lengths[in_bin])),
        }
        # Within a length bin: NDCG@100 of the more vs. less confident half.
        sel = in_bin & has_target
        if sel.sum() >= 20:
            split_at = np.median(confidence[sel])
            high = sel & (confidence > split_at)
            low = sel & (confidence <= split_at)
            row["ndcg_low_confidence_half"] = float(ndcg[low].mean())
            row["ndcg_high_confidence_half"] = float(ndcg[high].mean())
        natural.append(row)
    quartiles = np.quantile(confidence[has_target], [0.25, 0.5, 0.75])
    bucket = np.digitize(confidence, quartiles)
    by_quartile = [
        {
            "quartile": q + 1,
            "confidence_range": [
                float(confidence[has_target & (bucket == q)].min()),
                float(confidence[has_target & (bucket == q)].max()),
            ],
            "ndcg@100": float(ndcg[has_target & (bucket == q)].mean()),
            "n": int((has_target & (bucket == q)).sum()),
        }
        for q in range(4)
    ]
    rho = spearmanr(confidence, fold_lengths).statistic
    rho_ndcg = spearmanr(confidence[has_target], ndcg[has_target]).statistic

    payload = {
        "bundle": args.bundle,
        "model_version": rec.version,
        "n_controlled_users": len(users),
        "controlled": controlled,
        "mean_sigma_1_item": float(sigma.mean()),
        "mean_sigma_100_items": float(sigma_100.mean()),
        "natural": natural,
        "spearman_confidence_vs_length": float(rho),
        "spearman_confidence_vs_ndcg": float(rho_ndcg),
        "ndcg_by_confidence_quartile": by_quartile,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), payload)
    _plot(out.with_suffix(".png"), controlled, natural, fold_lengths, confidence, len(users))

    lines = [
        f"Controlled ({len(users)} test users with >= {max(SIZES)} items, nested random "
        "sub-histories):",
        "",
        "| history items | mean confidence | 25th-75th percentile |",
        "|---:|---:|---:|",
        *[f"| {r['size']} | {r['mean']:.3f} | {r['p25']:.3f}-{r['p75']:.3f} |" for r in controlled],
        "",
        "Natural (1,000 test users' fold-in histories):",
        "",
        "| fold-in length | users | mean confidence | 25th-75th | NDCG@100, less / more "
        "confident half |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in natural:
        ndcg_cell = (
            f"{r['ndcg_low_confidence_half']:.3f} / {r['ndcg_high_confidence_half']:.3f}"
            if "ndcg_low_confidence_half" in r
            else "(too few users)"
        )
        lines.append(
            f"| {r['lengths']} | {r['n']} | {r['mean']:.3f} | {r['p25']:.3f}-{r['p75']:.3f} "
            f"| {ndcg_cell} |"
        )
    lines += [
        "",
        "| confidence quartile | range | users | NDCG@100 |",
        "|---:|---|---:|---:|",
        *[
            f"| {q['quartile']} | {q['confidence_range'][0]:.3f}-{q['confidence_range'][1]:.3f} "
            f"| {q['n']} | {q['ndcg@100']:.3f} |"
            for q in by_quartile
        ],
        "",
        f"Spearman(confidence, fold-in length) = {rho:.3f}; "
        f"Spearman(confidence, NDCG@100) = {rho_ndcg:.3f}; mean sigma "
        f"{sigma.mean():.3f} with 1 item, {sigma_100.mean():.3f} with 100.",
    ]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    logger.info("done")


def _plot(
    path: Path,
    controlled: list[dict[str, float]],
    natural: list[dict[str, float]],
    lengths: np.ndarray,
    confidence: np.ndarray,
    n_users: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sizes = [r["size"] for r in controlled]
    axes[0].plot(sizes, [r["mean"] for r in controlled], "o-", label="mean")
    axes[0].fill_between(
        sizes,
        [r["p25"] for r in controlled],
        [r["p75"] for r in controlled],
        alpha=0.3,
        label="25th-75th percentile",
    )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("history items (nested random subsets)")
    axes[0].set_ylabel("confidence = 1 - mean sigma")
    axes[0].set_title(f"same {n_users} test users, growing history")
    axes[0].legend()
    axes[1].scatter(lengths, confidence, s=6, alpha=0.35, label="test user")
    axes[1].plot(
        [r["center"] for r in natural], [r["mean"] for r in natural], "o-", c="C1", label="bin mean"
    )
    axes[1].set_xscale("log")
    axes[1].set_xlabel("fold-in history length")
    axes[1].set_title("1,000 test users, real fold-in histories")
    axes[1].legend()
    fig.suptitle("Mult-VAE posterior confidence on ml-1m")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
