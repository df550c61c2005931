"""Shared set-up of the VAE-capability benchmarks (``benchmarks/vae_*.py``).

Each script loads a Mult-VAE bundle trained on ml-1m with the paper protocol, for example::

    recvae train --config ml-1m --threads 1 --device cpu -o runs/ml1m-multvae

and re-creates the same seeded split (PROTOCOL.md: seed 98765, 1,000 test users) with
:func:`pipelines.train_job.prepare`, the code path of ``recvae train``. Only test users are used.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pipelines.settings import job_from_dict, read_toml, with_overrides
from pipelines.train_job import prepare
from recvae.recommender import Recommender
from recvae.split import Split

logger = logging.getLogger("vae_bench")

DEFAULT_BUNDLE = "runs/ml1m-multvae/bundle"


@dataclass
class Setup:
    recommender: Recommender
    split: Split
    fold_in: sp.csr_array  # test users' fold-in histories, (n_test, n_items)
    targets: sp.csr_array  # their held-out targets
    full: sp.csr_array  # fold-in + targets: the whole known history


def add_arguments(parser: argparse.ArgumentParser, *, out_name: str) -> None:
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help="Mult-VAE bundle (ml-1m)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding ml-1m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic parts")
    parser.add_argument(
        "--out", default=f"runs/vae-bench/{out_name}", help="output prefix (.json, .png, .md)"
    )


def load_setup(args: argparse.Namespace) -> Setup:
    """Load the bundle and the ml-1m split; check that they share the item vocabulary.

    Raises:
        SystemExit: the bundle is missing or was trained on other items.
    """
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = Path(args.bundle)
    if not (bundle / "meta.json").is_file():
        raise SystemExit(
            f"no bundle at {bundle}: train one first, e.g. "
            "`recvae train --config ml-1m --threads 1 -o runs/ml1m-multvae`"
        )
    rec = Recommender.load(bundle)
    job = with_overrides(job_from_dict(read_toml("ml-1m")), data={"data_dir": args.data_dir})
    split = prepare(job).split
    if not np.array_equal(np.asarray(split.train.item_ids), np.asarray(rec.item_ids)):
        raise SystemExit(f"bundle {bundle} was not trained on the ml-1m protocol split")
    test = split.test
    fold_in = sp.csr_array(test.fold_in.matrix, dtype=np.float32)
    targets = sp.csr_array(test.targets.matrix, dtype=np.float32)
    full = sp.csr_array((fold_in + targets) > 0, dtype=np.float32)
    logger.info(
        "bundle %s (%s, version %s, best epoch %s); %d test users, %d items",
        bundle,
        rec.config.model,
        rec.version,
        rec.meta.get("best_epoch"),
        fold_in.shape[0],
        rec.n_items,
    )
    return Setup(rec, split, fold_in, targets, full)


def rows_to_csr(rows: list[np.ndarray], n_items: int) -> sp.csr_array:
    """Binary CSR matrix from one array of item positions per row."""
    lengths = [len(r) for r in rows]
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
    matrix = sp.csr_array(
        (
            np.ones(len(indices), dtype=np.float32),
            (np.repeat(np.arange(len(rows)), lengths), indices),
        ),
        shape=(len(rows), n_items),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    logger.info("wrote %s", path)
