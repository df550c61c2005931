"""Shared helpers of the serving benchmarks (``benchmarks/serve_*.py``).

Two model sizes are benchmarked:

- **ml-1m** (about 3,500 items): a real Mult-VAE trained on ml-1m, a bundle passed by path.
- **gowalla-sized** (40,981 items, the size of gowalla's item vocabulary): a Mult-VAE of the
  paper's shape ``[n_items, 600, 200, 600, n_items]`` with *random* (Glorot-initialized,
  untrained) weights and synthetic training histories; latency depends only on the shapes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

GOWALLA_ITEMS = 40_981
GOWALLA_USERS = 29_858
GOWALLA_MEAN_ITEMS = 34  # mean history length of gowalla users


def build_gowalla_sized_bundle(path: Path, *, seed: int = 0) -> Path:
    """A random-weight Mult-VAE bundle of gowalla's shape, with Zipf-like synthetic histories."""
    import torch

    from recvae.config import MultVAEConfig
    from recvae.model import build_model
    from recvae.recommender import Recommender

    if (path / "meta.json").is_file():
        return path
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    config = MultVAEConfig(hidden_dims=(600,), latent_dim=200, seed=seed)
    model = build_model(config, GOWALLA_ITEMS)
    popularity = 1.0 / np.arange(1, GOWALLA_ITEMS + 1) ** 0.8
    popularity /= popularity.sum()
    lengths = np.clip(rng.geometric(1 / GOWALLA_MEAN_ITEMS, GOWALLA_USERS), 5, 2000)
    rows, cols = [], []
    for user, length in enumerate(lengths):
        items = np.unique(rng.choice(GOWALLA_ITEMS, size=int(length), p=popularity))
        rows.append(np.full(len(items), user))
        cols.append(items)
    matrix = sp.csr_array(
        (
            np.ones(sum(map(len, cols)), dtype=np.float32),
            (np.concatenate(rows), np.concatenate(cols)),
        ),
        shape=(GOWALLA_USERS, GOWALLA_ITEMS),
    )
    rec = Recommender(
        model,
        config,
        np.arange(GOWALLA_ITEMS, dtype=np.int64),
        user_ids=np.arange(GOWALLA_USERS, dtype=np.int64),
        train_matrix=matrix,
        meta={"note": "random weights, synthetic histories: for serving benchmarks only"},
    )
    return rec.save(path)


def sample_histories(bundle: Path, n: int, length: int, *, seed: int = 0) -> list[list[Any]]:
    """``n`` histories of ``length`` known item ids each, drawn from the bundle's training users.

    Users with at least ``length`` items give a random subset of their own history (a realistic
    input); if there are none, items are drawn by popularity.
    """
    from recvae.recommender import Recommender

    rec = Recommender.load(bundle)
    rng = np.random.default_rng(seed)
    counts = rec.vocab.user_counts()
    eligible = np.flatnonzero(counts >= length)
    item_ids = rec.item_ids
    out: list[list[Any]] = []
    if len(eligible):
        for user in rng.choice(eligible, size=n, replace=True):
            history = rec.vocab.history(int(user))
            out.append(item_ids[rng.choice(history, size=length, replace=False)].tolist())
        return out
    popularity = rec.item_popularity().astype(np.float64) + 1.0
    popularity /= popularity.sum()
    for _ in range(n):
        idx = rng.choice(rec.n_items, size=length, replace=False, p=popularity)
        out.append(item_ids[idx].tolist())
    return out


def percentiles(seconds: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {}
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def machine() -> dict[str, Any]:
    """Cores and load average now (other engineers share the machine)."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(result: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
