"""The strong-generalization split of Liang et al. (2018), as PROTOCOL.md states it."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from recvae.config import _check_seed
from recvae.data.interactions import DataError, Interactions

__all__ = ["HeldOut", "Split", "split_users", "split_fold_in"]

logger = logging.getLogger(__name__)

DEFAULT_SEED = 98765


@dataclass(frozen=True)
class HeldOut:
    """Held-out users: the fold-in history a model sees and the targets it must find.

    Both share the users (rows) and the training item vocabulary (columns) and are disjoint.
    Users with no target are kept (they are left out of metric means).
    """

    fold_in: Interactions
    targets: Interactions

    @property
    def n_users(self) -> int:
        return self.fold_in.n_users

    @property
    def n_users_with_targets(self) -> int:
        return int((self.targets.user_counts() > 0).sum())


@dataclass(frozen=True)
class Split:
    """Train / validation / test users; the item vocabulary comes from training users only."""

    train: Interactions
    validation: HeldOut
    test: HeldOut
    seed: int
    n_heldout: int
    holdout_fraction: float

    def summary(self) -> dict[str, Any]:
        """Counts that describe the split (for logs and tracking)."""
        return {
            "n_items": self.train.n_items,
            "n_train_users": self.train.n_users,
            "n_train_interactions": self.train.nnz,
            "n_validation_users": self.validation.n_users,
            "n_validation_users_with_targets": self.validation.n_users_with_targets,
            "n_test_users": self.test.n_users,
            "n_test_users_with_targets": self.test.n_users_with_targets,
            "seed": self.seed,
            "n_heldout": self.n_heldout,
            "holdout_fraction": self.holdout_fraction,
        }


def split_users(
    data: Interactions,
    *,
    n_heldout: int,
    holdout_fraction: float = 0.2,
    seed: int = DEFAULT_SEED,
    min_target_user_count: int = 5,
) -> Split:
    """Split users into train, validation and test (strong generalization).

    Steps (PROTOCOL.md): shuffle users with ``default_rng(seed).permutation``; the last
    ``n_heldout`` are test users, the ``n_heldout`` before them validation users, the rest
    training users. The item vocabulary keeps only items with a training positive (held-out
    interactions with other items are dropped). Each held-out user with at least
    ``min_target_user_count`` remaining positives gets ``int(holdout_fraction * n)`` random
    targets; the rest is fold-in. A pure function of its inputs and ``seed``. A warning is
    logged when the validation or test set has no user with targets (every metric on it would
    be NaN, and training cannot select an epoch on it).

    Args:
        data: Binarized, filtered interactions.
        n_heldout: Users in each of validation and test.
        holdout_fraction: Share of a held-out user's positives that become targets.
        seed: Seed of the user permutation and of the target draw.
        min_target_user_count: Held-out users with fewer positives get no target.

    Returns:
        The split.

    Raises:
        ValueError: bad arguments (``seed`` must be an int in ``[0, 2**63)``).
        TypeError: ``data`` is not an ``Interactions``, or ``holdout_fraction`` or
            ``min_target_user_count`` is not a number (e.g. a string).
        DataError: the split leaves no training users or no training items.
    """
    if not isinstance(data, Interactions):
        raise TypeError(f"data must be an Interactions, got {type(data).__name__}")
    if not isinstance(n_heldout, int | np.integer) or isinstance(n_heldout, bool) or n_heldout < 1:
        raise ValueError(f"n_heldout must be an int >= 1, got {n_heldout!r}")
    _check_fold_in_arguments(holdout_fraction, min_target_user_count, "min_target_user_count")
    seed = _check_seed(seed, "seed")
    n_train = data.n_users - 2 * n_heldout
    if n_train < 1:
        raise DataError(
            f"the split leaves no training users: {data.n_users} users cannot give "
            f"2 x n_heldout={n_heldout} held-out users and at least one training user; "
            "lower --n-heldout"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(data.n_users)
    train_rows = perm[:n_train]
    validation_rows = perm[n_train : n_train + n_heldout]
    test_rows = perm[n_train + n_heldout :]

    train_full = data.matrix[train_rows]
    item_mask = np.bincount(train_full.indices, minlength=data.n_items) > 0
    kept_items = np.flatnonzero(item_mask)
    if len(kept_items) == 0:
        raise DataError("the training users have no interactions: no item vocabulary")
    item_ids = data.item_ids[kept_items]
    train = Interactions(train_full[:, kept_items].tocsr(), data.user_ids[train_rows], item_ids)

    def held_out(rows: NDArray[np.int64]) -> HeldOut:
        matrix = data.matrix[rows][:, kept_items].tocsr()
        fold_in, targets = split_fold_in(
            matrix,
            holdout_fraction=holdout_fraction,
            rng=rng,
            min_user_count=min_target_user_count,
        )
        user_ids = data.user_ids[rows]
        return HeldOut(
            Interactions(fold_in, user_ids, item_ids), Interactions(targets, user_ids, item_ids)
        )

    validation, test = held_out(validation_rows), held_out(test_rows)
    for name, part in (("validation", validation), ("test", test)):
        if part.n_users_with_targets == 0:
            # Training and blend selection refuse such a validation set; metrics on it are NaN.
            logger.warning(
                "split_users: the %s set has no user with targets (%d users, none with at least "
                "min_target_user_count=%d interactions and a target at holdout_fraction=%g)",
                name,
                part.n_users,
                min_target_user_count,
                holdout_fraction,
            )
    return Split(
        train=train,
        validation=validation,
        test=test,
        seed=int(seed),
        n_heldout=int(n_heldout),
        holdout_fraction=float(holdout_fraction),
    )


def _check_fold_in_arguments(
    holdout_fraction: Any, min_user_count: Any, count_name: str = "min_user_count"
) -> None:
    """Raise unless ``holdout_fraction`` is a number in (0, 1) and the count an int >= 0."""
    if not isinstance(holdout_fraction, numbers.Real) or isinstance(holdout_fraction, bool):
        raise TypeError(f"holdout_fraction must be a number in (0, 1), got {holdout_fraction!r}")
    if not 0.0 < float(holdout_fraction) < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if not isinstance(min_user_count, numbers.Integral) or isinstance(min_user_count, bool):
        raise TypeError(f"{count_name} must be an int >= 0, got {min_user_count!r}")
    if min_user_count < 0:
        raise ValueError(f"{count_name} must be >= 0, got {min_user_count}")


def split_fold_in(
    matrix: sp.csr_array,
    *,
    holdout_fraction: float = 0.2,
    rng: np.random.Generator,
    min_user_count: int = 5,
) -> tuple[sp.csr_array, sp.csr_array]:
    """Split each row's positives into (fold-in, targets), vectorized.

    A row with ``n >= min_user_count`` positives gets ``int(holdout_fraction * n)`` targets drawn
    uniformly at random; other rows keep everything as fold-in. A positive is a distinct
    (row, column) pair with a nonzero value: duplicate entries count once (else one item could
    land in both parts) and explicit zeros not at all. Both parts are binary float32.

    Args:
        matrix: ``(n_users, n_items)`` sparse matrix of positives (not modified).
        holdout_fraction: Share of a row's positives that become targets, in (0, 1).
        rng: The generator of the target draw.
        min_user_count: Rows with fewer positives get no target.

    Returns:
        ``(fold_in, targets)``, disjoint, of the shape of ``matrix``.

    Raises:
        TypeError: ``matrix`` is not a scipy sparse matrix, ``rng`` not a NumPy
            ``Generator``, or an argument not a number.
        ValueError: ``holdout_fraction`` outside (0, 1), ``min_user_count`` negative, or a
            negative, NaN or infinite value in ``matrix``.
    """
    if not sp.issparse(matrix) or matrix.ndim != 2:
        raise TypeError(f"matrix must be a 2-D scipy sparse matrix, got {type(matrix).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
            f"{type(rng).__name__}"
        )
    _check_fold_in_arguments(holdout_fraction, min_user_count)
    matrix = sp.csr_array(matrix).astype(np.float64, copy=True)  # never touch the caller's
    n_bad = int(np.count_nonzero(~np.isfinite(matrix.data) | (matrix.data < 0)))
    if n_bad:
        raise ValueError(f"matrix has {n_bad} negative, NaN or infinite value(s)")
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    counts = np.diff(matrix.indptr)
    n_targets = np.where(counts >= min_user_count, (holdout_fraction * counts).astype(np.int64), 0)
    rows = np.repeat(np.arange(matrix.shape[0]), counts)
    keys = rng.random(matrix.nnz)
    order = np.lexsort((keys, rows))  # by row, then random key
    rank_in_row = np.empty(matrix.nnz, dtype=np.int64)
    rank_in_row[order] = np.arange(matrix.nnz) - matrix.indptr[rows[order]]
    is_target = rank_in_row < n_targets[rows]

    def part(mask: NDArray[np.bool_]) -> sp.csr_array:
        out = sp.csr_array(
            (matrix.data[mask], (rows[mask], matrix.indices[mask])),
            shape=matrix.shape,
            dtype=np.float32,
        )
        out.sort_indices()
        return out

    return part(~is_target), part(is_target)


def _check_held_out(value: Any, argument: str = "validation") -> None:
    """Raise a ``TypeError`` naming ``argument`` unless ``value`` is a :class:`HeldOut`."""
    if isinstance(value, Split):
        raise TypeError(f"{argument} must be a HeldOut, got a Split: pass split.{argument}")
    if not isinstance(value, HeldOut):
        raise TypeError(
            f"{argument} must be a HeldOut (fold-in and targets, e.g. split.validation), got "
            f"{type(value).__name__}"
        )
