"""Step 2 of a nightly run: the training matrix and a fresh evaluation split from the window.

- **Positives.** Rows of the window's partitions with a parsed user, item and timestamp; with
  a rating column, ``rating > threshold``. Duplicate (user, item) pairs collapse. Users with
  fewer than ``min_user_count`` positives in the window are dropped.
- **Evaluation users.** A user is an evaluation user when ``sha256(salt, user_id)`` falls in
  the first ``eval_user_fraction`` of the hash space. The assignment is stable from night to
  night, so no model of this job ever trains on them and the champion and the challenger are
  both scored on users they have never seen (strong generalization).
- **Test users.** Up to ``n_heldout`` evaluation users, preferring the most recent: those
  active in the last ``recent_days`` days (sampled with the date's seed when there are more),
  topped up by the most recently active others. Users the champion trained on are left out.
  Their positives split into fold-in and targets (``holdout_fraction``) with the date's seed.
- **Validation users.** Other evaluation users (up to ``n_validation``) pick the best epoch.
- **Training users.** Everyone else (optionally a seeded sample); the item vocabulary is that
  of today's training users, so new items enter and items gone from the window leave.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.nightly.lake import ITEM, RATING, TS, USER, Partition, canonical_frame
from pipelines.nightly.lake import day_start_epoch as _day_start
from pipelines.nightly.settings import NightlySettings

if TYPE_CHECKING:
    import polars as pl
    from numpy.typing import NDArray

    from recvae.data import Interactions
    from recvae.recommender import Recommender
    from recvae.split import HeldOut

__all__ = [
    "DataRejectedError",
    "NightlyData",
    "build_nightly_data",
    "date_seed",
    "exclude_anomalous_users",
    "is_eval_user",
]

logger = logging.getLogger(__name__)


class DataRejectedError(ValueError):
    """The data cannot give a trustworthy run (e.g. too few evaluation users)."""


def date_seed(seed: int, day: date) -> list[int]:
    """Seed material of a night: the configured seed and the date (``YYYYMMDD``)."""
    return [int(seed), int(day.strftime("%Y%m%d"))]


def is_eval_user(user_id: Any, *, salt: str, fraction: float) -> bool:
    """Whether ``user_id`` belongs to the evaluation group (stable across runs and versions)."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class NightlyData:
    """What a night trains and evaluates on.

    Attributes:
        train: Training users over today's item vocabulary.
        test: The test users (fold-in and targets) that champion and challenger are scored on.
        validation: Users that pick the best epoch, or None.
        counts: Sizes for the summary and MLflow.
        window: Start, end and partitions of the data window.
    """

    train: Interactions
    test: HeldOut
    validation: HeldOut | None
    counts: dict[str, int] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)


def _positives(partitions: list[Partition], settings: NightlySettings) -> pl.DataFrame:
    """``(user_id, item_id, last_ts)`` of each positive pair in the window, collected."""
    import polars as pl

    lake = settings.lake_format
    frames = [canonical_frame(f, lake) for p in partitions for f in p.files]
    if not frames:
        raise DataRejectedError("the data window holds no data files")
    frame = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    valid = pl.col(USER).is_not_null() & pl.col(ITEM).is_not_null() & pl.col(TS).is_not_null()
    if lake.rating_col is not None and lake.threshold is not None:
        valid = valid & (pl.col(RATING) > lake.threshold)
    return (
        frame.filter(valid)
        .group_by(USER, ITEM)
        .agg(pl.col(TS).max().alias("last_ts"))
        .collect(engine="streaming")
    )


def _take(
    rng: np.random.Generator, rows: NDArray[np.int64], n: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``n`` rows drawn without replacement (sorted), and the rest."""
    if n >= len(rows):
        return np.sort(rows), np.zeros(0, dtype=np.int64)
    chosen = rng.choice(len(rows), size=n, replace=False)
    mask = np.zeros(len(rows), dtype=bool)
    mask[chosen] = True
    return np.sort(rows[mask]), rows[~mask]


def build_nightly_data(
    partitions: list[Partition],
    day: date,
    settings: NightlySettings,
    *,
    exclude_test_users: Any = None,
) -> NightlyData:
    """Build the night's training matrix and evaluation split.

    Args:
        partitions: The window's partitions (already validated).
        day: The run date (seeds the split; "recent" is counted back from it).
        settings: Job settings.
        exclude_test_users: Optional container of user ids that must not be test users (the
            champion's training users).

    Returns:
        The data.

    Raises:
        DataRejectedError: no positives, no training users, or fewer than ``min_eval_users``
            test users with targets.
    """
    import polars as pl

    from recvae.data import interactions_from_frame
    from recvae.split import HeldOut, split_fold_in

    split = settings.split
    positives = _positives(partitions, settings)
    n_pairs = positives.height
    users = (
        positives.group_by(USER)
        .agg(pl.len().alias("n"), pl.col("last_ts").max())
        .filter(pl.col("n") >= split.min_user_count)
        .sort(USER)
    )
    if users.height == 0:
        raise DataRejectedError(
            f"no user has {split.min_user_count} positives in the window "
            f"({n_pairs} positive pairs in {len(partitions)} partition(s))"
        )
    kept = positives.join(users.select(USER), on=USER, how="semi")
    data = interactions_from_frame(kept, threshold=None)
    user_ids = users[USER].to_list()
    assert len(user_ids) == data.n_users  # both sorted by id
    last_ts = users["last_ts"].to_numpy()
    eval_mask = np.fromiter(
        (
            is_eval_user(u, salt=split.eval_salt, fraction=split.eval_user_fraction)
            for u in user_ids
        ),
        dtype=bool,
        count=len(user_ids),
    )
    excluded = np.zeros(len(user_ids), dtype=bool)
    if exclude_test_users is not None:
        excluded = np.fromiter(
            (u in exclude_test_users for u in user_ids), dtype=bool, count=len(user_ids)
        )
    rng = np.random.default_rng(date_seed(split.seed, day))

    # Test users: recent evaluation users first, then the most recently active others.
    recent_cutoff = _day_start(day - timedelta(days=settings.recent_days - 1))
    candidates = np.flatnonzero(eval_mask & ~excluded)
    recent = candidates[last_ts[candidates] >= recent_cutoff]
    older = candidates[last_ts[candidates] < recent_cutoff]
    older = older[np.argsort(-last_ts[older], kind="stable")]
    test_rows, spare_recent = _take(rng, recent, split.n_heldout)
    n_topped_up = max(0, split.n_heldout - len(test_rows))
    test_rows = np.sort(np.concatenate([test_rows, older[:n_topped_up]]))
    others = np.concatenate([spare_recent, older[n_topped_up:]])
    validation_rows, _ = _take(rng, np.sort(others), split.n_validation)

    train_all = np.flatnonzero(~eval_mask)
    if len(train_all) == 0:
        raise DataRejectedError("every user in the window is an evaluation user: no training users")
    item_mask = np.bincount(data.matrix[train_all].indices, minlength=data.n_items) > 0
    items = np.flatnonzero(item_mask)
    train_rows = train_all
    if settings.training.train_user_fraction < 1.0:
        n_keep = max(1, round(settings.training.train_user_fraction * len(train_all)))
        train_rows, _ = _take(rng, train_all, n_keep)
    train = data.subset_users(train_rows).subset_items(items)

    def held_out(rows: NDArray[np.int64]) -> HeldOut:
        sub = data.subset_users(rows).subset_items(items)
        fold_in, targets = split_fold_in(
            sub.matrix,
            holdout_fraction=split.holdout_fraction,
            rng=rng,
            min_user_count=split.min_user_count,
        )
        cls = type(sub)
        return HeldOut(
            cls(fold_in, sub.user_ids, sub.item_ids), cls(targets, sub.user_ids, sub.item_ids)
        )

    test = held_out(test_rows)
    validation = held_out(validation_rows) if len(validation_rows) else None
    n_test = test.n_users_with_targets
    counts = {
        "positive_pairs": n_pairs,
        "users": int(data.n_users),
        "items_in_window": int(data.n_items),
        "items": int(len(items)),
        "eval_users": int(eval_mask.sum()),
        "train_users": int(train.n_users),
        "train_users_before_sample": int(len(train_all)),
        "train_interactions": int(train.nnz),
        "test_users": int(len(test_rows)),
        "test_users_with_targets": int(n_test),
        "test_users_recent": int(min(len(recent), split.n_heldout)),
        "test_users_topped_up": int(min(n_topped_up, len(older))),
        "eval_users_excluded_seen_by_champion": int((eval_mask & excluded).sum()),
        "validation_users": int(len(validation_rows)),
    }
    if n_test < split.min_eval_users:
        raise DataRejectedError(
            f"only {n_test} test user(s) with targets (min_eval_users={split.min_eval_users}): "
            f"{int(eval_mask.sum())} evaluation users in the window, {len(recent)} active in the "
            f"last {settings.recent_days} day(s); widen window_days or raise eval_user_fraction"
        )
    logger.info("nightly data for %s: %s", day, counts)
    return NightlyData(train=train, test=test, validation=validation, counts=counts)


def exclude_anomalous_users(
    train: Interactions, champion: Recommender, percentile: float
) -> tuple[Interactions, dict[str, Any]]:
    """Drop training users whose history the champion finds anomalous.

    Each training user's history (mapped to the champion's items by id; items it does not know
    are left out) gets ``champion.anomaly_scores`` with percentiles against the champion's own
    training users (``reference="training"``, the reference meant for training users). Users
    above ``percentile`` are dropped; users with no item the champion knows get no score and
    stay. The item vocabulary does not change.

    Args:
        train: Tonight's training users.
        champion: The current champion.
        percentile: Drop users strictly above this percentile, in (0, 100).

    Returns:
        The remaining training users, and counts for the summary.

    Raises:
        DataRejectedError: every training user would be dropped.
    """
    import scipy.sparse as sp

    from pipelines.nightly.warm_start import item_positions

    positions = item_positions(champion, train.item_ids)
    known = np.flatnonzero(positions >= 0)
    coo = sp.coo_array(train.matrix[:, known])
    mapped = sp.csr_array(
        (coo.data, (coo.row, positions[known][coo.col])),
        shape=(train.n_users, champion.n_items),
        dtype=np.float32,
    )
    result = champion.anomaly_scores(mapped, reference="training")
    scored = ~np.isnan(result.percentiles)
    drop = scored & (np.nan_to_num(result.percentiles, nan=0.0) > percentile)
    keep = np.flatnonzero(~drop)
    if keep.size == 0:
        raise DataRejectedError(
            f"exclude_anomalies_above_percentile={percentile:g} would drop all "
            f"{train.n_users} training users"
        )
    info = {
        "applied": True,
        "percentile": float(percentile),
        "reference": result.reference,
        "scored_users": int(scored.sum()),
        "excluded_users": int(drop.sum()),
    }
    logger.info(
        "excluded %d of %d training users above the %g-th anomaly percentile",
        int(drop.sum()),
        train.n_users,
        percentile,
    )
    return train.subset_users(keep), info
