"""Evaluate a saved bundle on a dataset's held-out users."""

from __future__ import annotations

from pathlib import Path

from pipelines.settings import JobSettings
from pipelines.train_job import prepare


def run_evaluate(
    bundle: Path,
    job: JobSettings,
    *,
    part: str = "test",
    ks: tuple[int, ...] = (20, 50, 100),
    device: str = "cpu",
) -> str:
    """Score ``bundle`` on the split that ``job`` describes; return a printable table.

    The bundle's item vocabulary decides the columns: held-out items it does not know are
    dropped from fold-in and targets (they could not be ranked anyway).
    """
    import numpy as np

    from recvae.evaluation import evaluate
    from recvae.recommender import Recommender

    rec = Recommender.load(bundle, device=device)
    split = prepare(job).split
    heldout = split.test if part == "test" else split.validation
    # Map the split's item vocabulary onto the bundle's.
    positions = np.asarray(
        [
            rec.vocab.item_index(i) if rec.vocab.item_index(i) is not None else -1
            for i in heldout.fold_in.item_ids.tolist()
        ],
        dtype=np.int64,
    )
    known = positions >= 0
    if not known.any():
        raise ValueError(f"bundle {bundle} shares no item with the dataset {job.data.name}")
    import scipy.sparse as sp

    def remap(matrix: sp.csr_array) -> sp.csr_array:
        coo = sp.coo_array(matrix[:, np.flatnonzero(known)])
        cols = positions[known][coo.col]
        return sp.csr_array(
            (coo.data, (coo.row, cols)), shape=(matrix.shape[0], rec.n_items), dtype=np.float32
        )

    fold_in, targets = remap(heldout.fold_in.matrix), remap(heldout.targets.matrix)
    result = evaluate(
        rec, fold_in, targets, ks=ks, device=device, item_popularity=rec.item_popularity()
    )
    lines = [
        f"bundle {bundle} (model {rec.config.model}, version {rec.version}) on "
        f"{job.data.name} {part} users: {result.n_users} scored, "
        f"{int((~known).sum())} dataset items unknown to the bundle",
        "",
        "| metric | mean | standard error |",
        "|---|---|---|",
    ]
    for name in sorted(result.per_user):
        lines.append(f"| {name} | {result.mean(name):.4f} | {result.stderr(name):.4f} |")
    for name, value in sorted(result.aggregate.items()):
        lines.append(f"| {name} | {value:.4f} | |")
    return "\n".join(lines)
