"""Anomaly scores on ml-1m: are injected synthetic anomalies ranked above normal test users?

Normal users are the 1,000 test users of the protocol split with their whole known history
(fold-in plus targets; the model never trained on them). Each anomaly type adds synthetic users
whose history lengths are drawn from the normal users' lengths:

- ``random``: items drawn uniformly from the catalog.
- ``random-popular``: items drawn in proportion to their training popularity (harder: the
  items are plausible one by one, only their combination is not).
- ``bot``: bot farms; each of 10 farms has a pool of 10 uniformly drawn items, and each bot's
  history is 5 to 10 of its farm's items.
- ``bot-popular``: the same with pools drawn from the 50 most popular items (hard on purpose:
  such a history looks like a casual blockbuster viewer).
- ``mixed``: half of one test user's history and half of another's, the other being the least
  similar (cosine) of 50 random candidates.

For each type the ROC AUC of "anomaly vs. normal" is reported for the VAE anomaly score
(:meth:`recvae.Recommender.anomaly_scores`), for its length-aware percentile (held-out
reference), for its reconstruction term alone, and for a popularity baseline (mean
``-log p(item)`` of the history under item popularity), plus the share of each group flagged
above the 95th and 99th percentile, against two references: the training users (in-sample) and
the 1,000 validation users (held-out, via ``Recommender.calibrate_anomalies``).

A second table checks the length stratification: nested random sub-histories of 1 to 50 items
of normal test users (with at least 50 items) should not be flagged more often for being short.

Run: ``python benchmarks/vae_anomalies.py --bundle runs/ml1m-multvae/bundle``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata, spearmanr
from vae_common import add_arguments, load_setup, logger, rows_to_csr, write_json

from recvae.recommender import Recommender


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of an anomaly > score of a normal user), ties count half."""
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def popularity_score(matrix: sp.csr_array, counts: np.ndarray) -> np.ndarray:
    """Mean negative log item probability under the (add-one smoothed) popularity model."""
    neg_log_p = -np.log((counts + 1.0) / (counts.sum() + len(counts)))
    lengths = np.diff(matrix.indptr)
    return (matrix @ neg_log_p) / np.maximum(lengths, 1)


def _flag_rates(percentiles: np.ndarray, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_median": float(np.median(percentiles)),
        f"{prefix}_above_95": float((percentiles > 95).mean()),
        f"{prefix}_above_99": float((percentiles > 99).mean()),
    }


def _length_probe(
    rec: Recommender, full: sp.csr_array, rng: np.random.Generator
) -> list[dict[str, float]]:
    users = np.flatnonzero(np.diff(full.indptr) >= 50)
    orders = [rng.permutation(full[[u]].indices) for u in users]
    out = []
    for size in (1, 2, 3, 5, 10, 20, 50):
        matrix = rows_to_csr([o[:size] for o in orders], full.shape[1])
        training = rec.anomaly_scores(matrix, reference="training")
        held = rec.anomaly_scores(matrix, reference="held-out")
        out.append(
            {
                "size": size,
                "n": len(users),
                "median_score": float(np.median(training.scores)),
                **_flag_rates(training.percentiles, "training"),
                **_flag_rates(held.percentiles, "held_out"),
            }
        )
    return out


def make_anomalies(
    full: sp.csr_array, counts: np.ndarray, n: int, rng: np.random.Generator
) -> dict[str, sp.csr_array]:
    n_items = full.shape[1]
    lengths = np.minimum(rng.choice(np.diff(full.indptr), size=n), n_items)
    popularity = counts / counts.sum()
    out: dict[str, sp.csr_array] = {}
    out["random"] = rows_to_csr([rng.choice(n_items, m, replace=False) for m in lengths], n_items)
    out["random-popular"] = rows_to_csr(
        [rng.choice(n_items, m, replace=False, p=popularity) for m in lengths], n_items
    )
    top = np.argsort(-counts, kind="stable")[:50]
    for name, candidates in (("bot", np.arange(n_items)), ("bot-popular", top)):
        pools = [rng.choice(candidates, 10, replace=False) for _ in range(10)]
        out[name] = rows_to_csr(
            [rng.choice(pools[i % 10], rng.integers(5, 11), replace=False) for i in range(n)],
            n_items,
        )
    norms = np.sqrt(np.maximum(np.diff(full.indptr), 1)).astype(np.float32)
    unit = sp.csr_array(sp.diags_array(1.0 / norms) @ full)  # rows of unit L2 norm
    rows = []
    for _ in range(n):
        a = int(rng.integers(full.shape[0]))
        candidates = rng.choice(full.shape[0], 50, replace=False)
        candidates = candidates[candidates != a]
        similarity = (unit[candidates] @ unit[[a]].T).toarray().ravel()
        b = int(candidates[np.argmin(similarity)])
        ha, hb = full[[a]].indices, full[[b]].indices
        rows.append(
            np.concatenate(
                [
                    rng.choice(ha, max(1, len(ha) // 2), replace=False),
                    rng.choice(hb, max(1, len(hb) // 2), replace=False),
                ]
            )
        )
    out["mixed"] = rows_to_csr(rows, n_items)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, out_name="anomalies")
    parser.add_argument("--n-anomalies", type=int, default=500, help="users per anomaly type")
    args = parser.parse_args()
    setup = load_setup(args)
    rec = setup.recommender
    rng = np.random.default_rng(args.seed)
    counts = setup.split.train.item_counts().astype(np.float64)

    start = time.perf_counter()
    reference = rec.anomaly_reference()
    reference_seconds = time.perf_counter() - start
    validation = setup.split.validation
    rec.calibrate_anomalies(
        sp.csr_array((validation.fold_in.matrix + validation.targets.matrix) > 0, dtype=np.float32)
    )
    normal = rec.anomaly_scores(setup.full, reference="training")
    normal_held = rec.anomaly_scores(setup.full, reference="held-out")
    normal_pop = popularity_score(setup.full, counts)
    normal_rec = normal.reconstruction / normal.history_lengths
    rho_length = spearmanr(normal.scores, normal.history_lengths).statistic
    rho_raw = spearmanr(normal.reconstruction + normal.kl, normal.history_lengths).statistic
    probe = _length_probe(rec, setup.full, rng)
    rows = [
        {
            "type": "normal (test users)",
            "n": len(normal),
            **_flag_rates(normal.percentiles, "training"),
            **_flag_rates(normal_held.percentiles, "held_out"),
            "median_score": float(np.median(normal.scores)),
        }
    ]
    for name, matrix in make_anomalies(setup.full, counts, args.n_anomalies, rng).items():
        result = rec.anomaly_scores(matrix, reference="training")
        held = rec.anomaly_scores(matrix, reference="held-out")
        rows.append(
            {
                "type": name,
                "n": len(result),
                "auc_vae": roc_auc(result.scores, normal.scores),
                "auc_percentile": roc_auc(held.percentiles, normal_held.percentiles),
                "auc_reconstruction_only": roc_auc(
                    result.reconstruction / result.history_lengths, normal_rec
                ),
                "auc_popularity": roc_auc(popularity_score(matrix, counts), normal_pop),
                **_flag_rates(result.percentiles, "training"),
                **_flag_rates(held.percentiles, "held_out"),
                "median_score": float(np.median(result.scores)),
                "median_length": float(np.median(result.history_lengths)),
            }
        )
    payload = {
        "bundle": args.bundle,
        "model_version": rec.version,
        "best_epoch": rec.meta.get("best_epoch"),
        "n_training_users": reference.n_users,
        "reference_seconds": reference_seconds,
        "reference_median_score": reference.median_score,
        "held_out_reference_median_score": rec.anomaly_reference("held-out").median_score,
        "length_probe": probe,
        "spearman_score_vs_length_normal": float(rho_length),
        "spearman_unnormalized_vs_length_normal": float(rho_raw),
        "rows": rows,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), payload)
    lines = [
        "| users | n | ROC AUC (score) | AUC (percentile) | AUC (reconstruction only) "
        "| AUC (popularity) | median pct (train / held-out ref.) "
        "| > 95th pct (train / held-out) | > 99th pct (train / held-out) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        auc = [
            row.get(k)
            for k in ("auc_vae", "auc_percentile", "auc_reconstruction_only", "auc_popularity")
        ]
        cells = ["" if v is None else f"{v:.3f}" for v in auc]
        lines.append(
            f"| {row['type']} | {row['n']} | {' | '.join(cells)} | "
            f"{row['training_median']:.1f} / {row['held_out_median']:.1f} | "
            f"{100 * row['training_above_95']:.1f}% / {100 * row['held_out_above_95']:.1f}% | "
            f"{100 * row['training_above_99']:.1f}% / {100 * row['held_out_above_99']:.1f}% |"
        )
    lines += [
        "",
        "| sub-history items | users | median score | median pct (train / held-out ref.) "
        "| > 99th pct (train / held-out) |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['size']} | {r['n']} | {r['median_score']:.2f} | "
            f"{r['training_median']:.1f} / {r['held_out_median']:.1f} | "
            f"{100 * r['training_above_99']:.1f}% / {100 * r['held_out_above_99']:.1f}% |"
            for r in probe
        ],
    ]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(
        f"\nreference: {reference.n_users} training users (plus one sub-history each) scored in "
        f"{reference_seconds:.2f}s; "
        f"Spearman(score, history length) on normal users {rho_length:.3f} "
        f"(unnormalized negative ELBO: {rho_raw:.3f})"
    )
    logger.info("done")


if __name__ == "__main__":
    main()
