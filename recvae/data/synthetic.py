"""Synthetic interaction matrices: the ML-20M-like speed shape and a planted-cluster toy.

Everything is vectorized NumPy driven by one ``numpy.random.Generator`` seeded by ``seed``, so a
seed gives the same matrix on every run and platform with the same NumPy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from recvae.data.interactions import Interactions

__all__ = ["SYNTHETIC_SHAPES", "planted_interactions", "synthetic_interactions"]

logger = logging.getLogger(__name__)

#: Named shapes for :func:`synthetic_interactions` (keyword arguments).
SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    # PROTOCOL.md "Speed shape": ML-20M's size after the paper's preprocessing.
    "ml-20m-like": {"n_users": 136_677, "n_items": 20_108, "n_interactions": 10_000_000},
    "small": {"n_users": 10_000, "n_items": 2_000, "n_interactions": 500_000},
    "tiny": {"n_users": 500, "n_items": 200, "n_interactions": 10_000},
}

# A user asking for more than this share of the catalogue is sampled by Gumbel-top-k over all
# items; below it, rejection rounds are cheaper. Both give the same distribution.
_DENSE_FRACTION = 8
# Rows of the dense Gumbel-top-k done at once (bounds its memory to about this many floats).
_DENSE_CHUNK_ELEMENTS = 4_000_000


def synthetic_interactions(
    n_users: int = 136_677,
    n_items: int = 20_108,
    n_interactions: int = 10_000_000,
    *,
    activity_mu: float = 3.6,
    activity_sigma: float = 1.0,
    min_per_user: int = 5,
    popularity_exponent: float = 0.9,
    seed: int = 0,
) -> Interactions:
    """A random binary matrix with heavy-tailed user activity and Zipf-like item popularity.

    User ``u`` gets ``n_u`` distinct items: ``n_u`` is drawn log-normal (``activity_mu`` and
    ``activity_sigma`` in log space), scaled by one common factor chosen so that the total is
    about ``n_interactions`` after clipping every ``n_u`` to ``[min_per_user, n_items]``. The
    items are drawn without replacement (successive sampling) from
    ``p(i) = (i + 1) ** -popularity_exponent / Z``, so item 0 is the most popular. The defaults
    are PROTOCOL.md's ML-20M-like speed shape.

    Args:
        n_users: Rows.
        n_items: Columns.
        n_interactions: Target number of positives (met to within rounding and clipping).
        activity_mu: Mean of log user activity before scaling.
        activity_sigma: Standard deviation of log user activity.
        min_per_user: Fewest positives a user gets.
        popularity_exponent: Zipf exponent of item popularity (0 gives uniform popularity).
        seed: Seed of the random generator.

    Returns:
        Interactions with ids equal to positions (``user_ids = arange(n_users)``).

    Raises:
        ValueError: A size is not positive, ``min_per_user > n_items``, ``n_interactions`` is
            outside ``[n_users * min_per_user, n_users * n_items]``, ``activity_sigma`` or
            ``popularity_exponent`` is negative.
    """
    if n_users <= 0:
        raise ValueError(f"n_users must be positive, got {n_users}")
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if not 0 < min_per_user <= n_items:
        raise ValueError(f"min_per_user must be in [1, n_items={n_items}], got {min_per_user}")
    if not n_users * min_per_user <= n_interactions <= n_users * n_items:
        raise ValueError(
            f"n_interactions must be in [n_users * min_per_user, n_users * n_items] = "
            f"[{n_users * min_per_user}, {n_users * n_items}], got {n_interactions}"
        )
    if activity_sigma < 0:
        raise ValueError(f"activity_sigma must be >= 0, got {activity_sigma}")
    if popularity_exponent < 0:
        raise ValueError(f"popularity_exponent must be >= 0, got {popularity_exponent}")

    rng = np.random.default_rng(seed)
    activity = rng.lognormal(activity_mu, activity_sigma, size=n_users)
    counts = _scale_counts(activity, n_interactions, min_per_user, n_items)
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -popularity_exponent
    popularity /= popularity.sum()

    dense = counts > n_items // _DENSE_FRACTION
    user_parts: list[NDArray[np.int64]] = []
    item_parts: list[NDArray[np.int64]] = []
    sparse_users = np.flatnonzero(~dense)
    if len(sparse_users):
        users, items = _sample_by_rejection(rng, sparse_users, counts[sparse_users], popularity)
        user_parts.append(users)
        item_parts.append(items)
    dense_users = np.flatnonzero(dense)
    if len(dense_users):
        users, items = _sample_by_gumbel(rng, dense_users, counts[dense_users], popularity)
        user_parts.append(users)
        item_parts.append(items)

    codes = np.concatenate(user_parts) * n_items + np.concatenate(item_parts)
    codes.sort()
    assert len(codes) == int(counts.sum())
    rows = codes // n_items
    cols = (codes % n_items).astype(np.int32)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    data = np.ones(len(cols), dtype=np.float32)
    matrix = sp.csr_array((data, cols, indptr), shape=(n_users, n_items))
    matrix.has_sorted_indices = True
    matrix.has_canonical_format = True
    result = Interactions(matrix, np.arange(n_users), np.arange(n_items))
    logger.debug("synthetic %r (seed %d)", result, seed)
    return result


def _scale_counts(
    activity: NDArray[np.float64], n_interactions: int, low: int, high: int
) -> NDArray[np.int64]:
    """Per-user counts ``clip(round(scale * activity), low, high)`` summing to about the target.

    The total is monotone in ``scale``, so a bisection on it finds the scale.
    """

    def total(scale: float) -> int:
        return int(np.clip(np.rint(activity * scale), low, high).sum())

    lo, hi = 0.0, 1.0
    while total(hi) < n_interactions and hi < 1e300:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < n_interactions:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    best = min((lo, hi), key=lambda s: abs(total(s) - n_interactions))
    return np.clip(np.rint(activity * best), low, high).astype(np.int64)


def _sample_by_rejection(
    rng: np.random.Generator,
    users: NDArray[np.int64],
    counts: NDArray[np.int64],
    popularity: NDArray[np.float64],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Distinct items per user: the first ``counts[u]`` distinct items of an i.i.d. stream.

    Draws come in rounds; each round extends every unfinished user's stream by a multiple of
    their remaining deficit (the multiple doubles for users still unfinished, so the number of
    rounds stays logarithmic). Keeping the first new distinct items in stream order makes the
    result exactly successive sampling without replacement.
    """
    n_items = len(popularity)
    cdf = np.cumsum(popularity)
    cdf /= cdf[-1]
    deficit = counts.copy()
    multiplier = np.full(len(users), 1.1)
    active = np.arange(len(users))
    kept_users: list[NDArray[np.int64]] = []
    kept_items: list[NDArray[np.int64]] = []
    chosen = np.empty(0, dtype=np.int64)  # sorted codes already taken by active users

    for _ in range(10_000):
        if not len(active):
            break
        n_draws = np.ceil(deficit[active] * multiplier[active]).astype(np.int64) + 1
        owner = np.repeat(active, n_draws)  # stream order within each owner is preserved
        items = np.searchsorted(cdf, rng.random(len(owner)), side="right")
        np.minimum(items, n_items - 1, out=items)
        codes = owner * n_items + items
        # First occurrence of each new (user, item) pair, not taken in an earlier round.
        _, first = np.unique(codes, return_index=True)
        first.sort()
        if len(chosen):
            pos = np.searchsorted(chosen, codes[first])
            pos = np.minimum(pos, len(chosen) - 1)
            first = first[chosen[pos] != codes[first]]
        new_owner = owner[first]
        # Rank of each new item within its owner's stream; keep up to the deficit.
        starts = np.flatnonzero(np.r_[True, new_owner[1:] != new_owner[:-1]])
        group_sizes = np.diff(np.r_[starts, len(new_owner)])
        rank = np.arange(len(new_owner)) - np.repeat(starts, group_sizes)
        keep = rank < deficit[new_owner]
        take = first[keep]
        kept_users.append(users[owner[take]])
        kept_items.append(items[take])
        deficit -= np.bincount(owner[take], minlength=len(users))
        unfinished = deficit[active] > 0
        multiplier[active[unfinished]] *= 2.0
        still = active[unfinished]
        if len(still):
            # Only the pairs of users still drawing matter for the next duplicate check.
            taken = np.concatenate([chosen, codes[take]])
            chosen = np.sort(taken[np.isin(taken // n_items, still)])
        active = still
    else:  # pragma: no cover - the multiplier doubles each round, so this cannot happen
        raise AssertionError("rejection sampling did not converge")
    return np.concatenate(kept_users), np.concatenate(kept_items)


def _sample_by_gumbel(
    rng: np.random.Generator,
    users: NDArray[np.int64],
    counts: NDArray[np.int64],
    popularity: NDArray[np.float64],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Distinct items per user by Gumbel-top-k, which equals successive sampling."""
    n_items = len(popularity)
    log_p = np.log(popularity)
    chunk = max(1, _DENSE_CHUNK_ELEMENTS // n_items)
    user_parts: list[NDArray[np.int64]] = []
    item_parts: list[NDArray[np.int64]] = []
    for start in range(0, len(users), chunk):
        stop = min(start + chunk, len(users))
        keys = log_p + rng.gumbel(size=(stop - start, n_items))  # (chunk, n_items)
        order = np.argsort(-keys, axis=1, kind="stable")
        mask = np.arange(n_items) < counts[start:stop, None]
        user_parts.append(np.repeat(users[start:stop], counts[start:stop]))
        item_parts.append(order[mask].astype(np.int64))
    return np.concatenate(user_parts), np.concatenate(item_parts)


def planted_interactions(
    n_users: int = 200,
    n_items: int = 60,
    n_clusters: int = 3,
    p_in: float = 0.5,
    p_out: float = 0.02,
    seed: int = 0,
) -> Interactions:
    """A matrix with known block structure, for checking that a model learns it.

    User ``u`` belongs to cluster ``u % n_clusters`` and item ``i`` to cluster
    ``i % n_clusters``. Each (user, item) pair is a positive with probability ``p_in`` when
    both share a cluster and ``p_out`` otherwise. A user left with no in-cluster positive gets
    one at random, so every row has at least one positive.

    Args:
        n_users: Rows.
        n_items: Columns.
        n_clusters: Number of clusters (at most ``n_users`` and ``n_items``).
        p_in: Probability of a positive inside a user's cluster.
        p_out: Probability of a positive outside it.
        seed: Seed of the random generator.

    Returns:
        Interactions with ids equal to positions.

    Raises:
        ValueError: A size is not positive, ``n_clusters`` exceeds ``n_users`` or ``n_items``,
            or a probability is outside [0, 1].
    """
    if n_users <= 0 or n_items <= 0:
        raise ValueError(f"n_users and n_items must be positive, got {n_users} and {n_items}")
    if not 1 <= n_clusters <= min(n_users, n_items):
        raise ValueError(
            f"n_clusters must be in [1, min(n_users, n_items)={min(n_users, n_items)}], "
            f"got {n_clusters}"
        )
    for name, value in (("p_in", p_in), ("p_out", p_out)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")

    rng = np.random.default_rng(seed)
    user_cluster = np.arange(n_users) % n_clusters
    item_cluster = np.arange(n_items) % n_clusters
    same = user_cluster[:, None] == item_cluster[None, :]  # (n_users, n_items)
    dense = rng.random((n_users, n_items)) < np.where(same, p_in, p_out)
    empty = ~(dense & same).any(axis=1)
    if empty.any():
        # Pick a random in-cluster item for each such user: cluster c holds items c, c + k, ...
        users = np.flatnonzero(empty)
        clusters = user_cluster[users]
        sizes = (n_items - clusters + n_clusters - 1) // n_clusters
        picks = clusters + n_clusters * (rng.random(len(users)) * sizes).astype(np.int64)
        dense[users, picks] = True
    matrix = sp.csr_array(dense.astype(np.float32))
    return Interactions(matrix, np.arange(n_users), np.arange(n_items))
