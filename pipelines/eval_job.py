"""Evaluate a saved bundle on a dataset's held-out users."""

from __future__ import annotations

from collections.abc import Callable
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
    warn: Callable[[str], None] | None = None,
) -> str:
    """Score ``bundle`` on the split that ``job`` describes; return a printable table.

    The bundle's item vocabulary decides the columns: held-out items it does not know are
    dropped from fold-in and targets (they could not be ranked anyway).

    Args:
        bundle: The model bundle directory.
        job: The data and protocol of the split.
        part: ``"test"`` or ``"validation"``.
        ks: The cut-offs.
        device: Where to score.
        warn: Called with a message when the data differs from the data the bundle recorded
            (its fingerprint): the split is then not the training split.

    Raises:
        ValueError: the bundle shares no item with the data, or bad data or settings.
    """
    import numpy as np

    from recvae.evaluation import evaluate
    from recvae.recommender import Recommender

    rec = Recommender.load(bundle, device=device)
    prepared = prepare(job)
    split = prepared.split
    # Only a bundle that recorded its job (recvae train, tune, experiment) holds the
    # fingerprint of the whole data; the library's Trainer records that of its training matrix.
    trained_on = rec.meta.get("data_fingerprint") if isinstance(rec.meta.get("job"), dict) else None
    if warn is not None and isinstance(trained_on, str) and trained_on != prepared.fingerprint:
        warn(
            f"the data of {job.data.name} differs from the data the bundle was trained on "
            f"(fingerprint {prepared.fingerprint[:12]}, trained with {trained_on[:12]}): the "
            "file changed since training, so the split is not the training split and the "
            f"{part} users may include users the model was trained on (inflated metrics)"
        )
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
