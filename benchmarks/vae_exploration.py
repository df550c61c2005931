"""Exploration on ml-1m: accuracy against diversity as the sampling temperature grows.

Rankings come from ``z = mu + T * sigma * eps`` (``Recommender.score_sampled``; T = 0 is the
deterministic ranking from ``z = mu``), scored on the protocol's 1,000 test users (fold-in ->
targets). For each temperature and each of ``--seeds`` seeds:

- NDCG@100 and Recall@20 (the protocol's metrics, on the sampled ranking);
- catalog coverage@20: share of the catalog in at least one test user's top-20;
- intra-list diversity@20: mean pairwise cosine distance of a top-20 list's items in the
  decoder's item-embedding space (``recvae.vae_tools.intra_list_diversity``), averaged over users;
- overlap@20 with the deterministic top-20 (share of items in common);
- distinct items in 10 draws: the size of the union of a user's top-20 lists over 10 seeds
  (what a returning user would see over 10 visits; 20 means always the same list).

Writes ``<out>.png``, ``<out>.json`` and ``<out>.md``.
Run: ``python benchmarks/vae_exploration.py --bundle runs/ml1m-multvae/bundle``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from vae_common import add_arguments, load_setup, logger, write_json

from recvae.evaluation import (
    catalog_coverage_at_k,
    mask_history,
    ndcg_at_k,
    recall_at_k,
    topk_indices,
)
from recvae.vae_tools import intra_list_diversity

TEMPERATURES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
K_LIST = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, out_name="exploration")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per temperature")
    parser.add_argument("--draws", type=int, default=10, help="draws for 'distinct items'")
    args = parser.parse_args()
    setup = load_setup(args)
    rec = setup.recommender
    fold_in, targets = setup.fold_in, setup.targets
    embeddings = rec.model.item_embeddings().detach().cpu().numpy()
    has_target = np.diff(targets.indptr) > 0

    def ranked(temperature: float, seed: int) -> torch.Tensor:
        scores = rec.score_sampled(fold_in, temperature=temperature, seed=seed)
        return mask_history(scores.clone(), fold_in)  # score tensors are inference-mode

    base_top = topk_indices(mask_history(rec.score(fold_in).clone(), fold_in), K_LIST).numpy()
    rows = []
    for temperature in TEMPERATURES:
        per_seed: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            scores = ranked(temperature, 1000 * seed + 1)
            top = topk_indices(scores, K_LIST).numpy()
            overlap = np.mean(
                [len(set(a) & set(b)) / K_LIST for a, b in zip(top, base_top, strict=True)]
            )
            values = {
                "ndcg@100": float(np.nanmean(ndcg_at_k(scores, targets, 100)[has_target])),
                "recall@20": float(np.nanmean(recall_at_k(scores, targets, 20)[has_target])),
                "coverage@20": catalog_coverage_at_k(top, rec.n_items),
                "ild@20": float(np.nanmean(intra_list_diversity(top, embeddings))),
                "overlap@20": float(overlap),
            }
            for name, value in values.items():
                per_seed.setdefault(name, []).append(value)
        # Distinct items a user sees over repeated draws.
        union = [set() for _ in range(fold_in.shape[0])]
        for draw in range(args.draws):
            top = topk_indices(ranked(temperature, 7919 * draw + 3), K_LIST).numpy()
            for user, items in enumerate(top):
                union[user].update(items.tolist())
        row = {"temperature": temperature}
        for name, values_ in per_seed.items():
            row[name] = float(np.mean(values_))
            row[f"{name}_std"] = float(np.std(values_))
        row["distinct_in_draws"] = float(np.mean([len(u) for u in union]))
        rows.append(row)
        logger.info("T=%.2f %s", temperature, {k: round(v, 4) for k, v in row.items()})

    payload = {
        "bundle": args.bundle,
        "model_version": rec.version,
        "seeds": args.seeds,
        "draws": args.draws,
        "item_embedding_dim": int(embeddings.shape[1]),
        "rows": rows,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), payload)
    _plot(out.with_suffix(".png"), rows)
    lines = [
        f"| temperature | NDCG@100 | Recall@20 | coverage@20 | ILD@20 | overlap@20 with T=0 "
        f"| distinct items in {args.draws} draws |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['temperature']:g} | {r['ndcg@100']:.4f} | {r['recall@20']:.4f} | "
            f"{r['coverage@20']:.3f} | {r['ild@20']:.3f} | {r['overlap@20']:.3f} | "
            f"{r['distinct_in_draws']:.1f} |"
        )
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(
        f"\nmeans over {args.seeds} seeds; largest std across seeds: NDCG@100 "
        f"{max(r['ndcg@100_std'] for r in rows):.4f}, coverage "
        f"{max(r['coverage@20_std'] for r in rows):.4f}, "
        f"ILD {max(r['ild@20_std'] for r in rows):.4f}"
    )
    logger.info("done")


def _plot(path: Path, rows: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = [r["temperature"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("ndcg@100", "NDCG@100 (accuracy)"),
        ("coverage@20", "catalog coverage@20"),
        ("ild@20", "intra-list diversity@20"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.errorbar(temps, [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows], fmt="o-")
        ax.set_xlabel("temperature (sigma scale)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("Mult-VAE exploration on ml-1m test users (posterior sampling)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
