"""Ranking metrics and the evaluation loop of the strong-generalisation protocol.

Every metric is a pure function that returns one value per user; averaging is a separate step
(:class:`EvaluationResult`). The conventions shared by all of them:

- ``scores`` has shape ``(n_users, n_items)``; a higher score ranks higher. ``-inf`` marks an
  excluded item: it is never recommended, even when fewer than ``k`` items have a finite score.
  Scores must not contain NaN.
- Ties break by item index: of two items with equal scores the lower index ranks first. This holds
  at the ``k``-th boundary too, so the top-``k`` list is a deterministic function of the scores.
- ``targets`` marks the relevant items of each user (a binary ``scipy.sparse.csr_array`` or a
  dense boolean array of the same shape). A user with no target gets NaN and is left out of means.

The metric functions run on CPU or CUDA, on the device of the ``scores`` tensor (NumPy input runs
on CPU), and compute in float64.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

from recvae.config import PER_USER_METRICS

__all__ = [
    "EvaluationResult",
    "NaNScoresError",
    "Ranker",
    "catalog_coverage_at_k",
    "evaluate",
    "gini_index",
    "hit_rate_at_k",
    "mask_history",
    "mean_popularity_rank",
    "mrr_at_k",
    "ndcg_at_k",
    "paper_metrics",
    "precision_at_k",
    "recall_at_k",
    "topk_indices",
]

ScoresLike: TypeAlias = "NDArray[np.floating[Any]] | torch.Tensor"
TargetsLike: TypeAlias = "sp.csr_array | sp.csr_matrix | NDArray[np.bool_] | torch.Tensor"
IndicesLike: TypeAlias = "NDArray[np.integer[Any]] | torch.Tensor"

paper_metrics: tuple[str, ...] = ("recall@20", "recall@50", "ndcg@100")
"""The three numbers Liang et al. (2018) report: Recall@20, Recall@50 and NDCG@100."""

_PER_USER_METRICS: tuple[str, ...] = PER_USER_METRICS
_AGGREGATE_METRICS: tuple[str, ...] = ("coverage", "gini", "popularity_rank")


@runtime_checkable
class Ranker(Protocol):
    """Anything that scores every item for a batch of users from their histories alone.

    Models and baselines implement this so that :func:`evaluate` scores them all the same way.

    ``n_items`` may be a plain attribute or a read-only property.
    """

    @property
    def n_items(self) -> int:
        """Number of items (columns) the ranker scores."""
        ...

    def score(self, histories: sp.csr_array) -> torch.Tensor | NDArray[np.floating[Any]]:
        """Scores all items for each user from the given fold-in histories.

        Args:
            histories: Binary matrix of shape ``(n_users, n_items)``, one row per user.

        Returns:
            Scores of shape ``(n_users, n_items)``; higher is better. They may include the
            history items themselves: the caller masks them.
        """
        ...


# --------------------------------------------------------------------------------------------
# Conversions and checks


def _as_scores_tensor(scores: ScoresLike) -> torch.Tensor:
    """Returns ``scores`` as a floating 2-D tensor (shares memory when it can)."""
    tensor = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    if tensor.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_users, n_items), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        # float64 keeps integer scores (e.g. counts) exact up to 2**53; float32 would merge
        # distinct values above 2**24 into ties.
        tensor = tensor.to(torch.float64)
    return tensor.detach()


class NaNScoresError(ValueError):
    """Scores to rank contain NaN (from a model: usually one whose training diverged)."""


def _check_no_nan(scores: torch.Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise NaNScoresError("scores contain NaN; use -inf to exclude an item")


def _item_ids_of(source: Any) -> NDArray[Any] | None:
    """The item ids of an ``Interactions``, ``HeldOut``, ``Recommender`` or fitted baseline, or
    None for an object that does not record them (then only item counts can be compared)."""
    fold_in = getattr(source, "fold_in", None)
    if fold_in is not None:
        source = fold_in
    ids = getattr(source, "item_ids", None)
    return None if ids is None else np.asarray(ids)


def _check_ranker(ranker: Any, argument: str) -> None:
    """Raise a ``TypeError`` naming ``argument`` unless ``ranker`` looks like a :class:`Ranker`."""
    if not callable(getattr(ranker, "score", None)) or not hasattr(ranker, "n_items"):
        raise TypeError(
            f"{argument} must be a Ranker (with n_items and score(histories)), got "
            f"{type(ranker).__name__}"
        )


def _number_list(value: Any, argument: str, example: str = "[0.5]") -> list[float]:
    """``value`` as a list of floats; a ``TypeError`` naming ``argument`` for anything but a
    sequence of real numbers (a str, a scalar, a bool among them)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"{argument} must be a sequence of numbers such as {example}, got {value!r}"
        )
    values = list(value)
    wrong = [v for v in values if not isinstance(v, numbers.Real) or isinstance(v, bool)]
    if wrong:
        raise TypeError(f"every entry of {argument} must be a number, got {wrong}")
    return [float(v) for v in values]


def _check_same_items(first: Any, second: Any, first_name: str, second_name: str) -> None:
    """Raise unless ``first`` and ``second`` score or hold the same items in the same order.

    Both are compared by ``item_ids`` where both record them, else by item count: a model and a
    data set over the same items in another order would otherwise give meaningless scores.

    Raises:
        ValueError: The item counts or the item ids differ; the message names both sides.
    """
    first_ids, second_ids = _item_ids_of(first), _item_ids_of(second)
    first_n = len(first_ids) if first_ids is not None else int(first.n_items)
    second_n = len(second_ids) if second_ids is not None else int(second.n_items)
    if first_n != second_n:
        raise ValueError(
            f"{first_name} and {second_name} have different item sets: {first_n} vs "
            f"{second_n} items; both must share one item vocabulary"
        )
    if first_ids is None or second_ids is None or np.array_equal(first_ids, second_ids):
        return
    try:
        differs = np.flatnonzero(first_ids != second_ids)
    except (TypeError, ValueError):  # pragma: no cover - ids that NumPy cannot compare
        differs = np.arange(first_n)
    position = int(differs[0]) if differs.size else 0
    same_set = set(first_ids.tolist()) == set(second_ids.tolist())
    raise ValueError(
        f"{first_name} and {second_name} have different item ids"
        + (" (the same items in another order)" if same_set else "")
        + f": at column {position}, {first_ids[position]!r} vs {second_ids[position]!r}; "
        "both must share one item vocabulary (e.g. both built from the same split's training "
        "users)"
    )


def _csr_to_dense_bool(
    matrix: sp.csr_array | sp.csr_matrix, device: torch.device | str
) -> torch.Tensor:
    """Densifies a sparse matrix into a boolean tensor; stored zeros count as absent."""
    matrix = sp.csr_array(matrix)
    n_rows, n_cols = matrix.shape
    dense = torch.zeros((n_rows, n_cols), dtype=torch.bool, device=device)  # (n_users, n_items)
    row_lengths = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), row_lengths)
    keep = np.asarray(matrix.data) != 0
    if keep.any():
        dense[
            torch.as_tensor(rows[keep], device=device),
            torch.as_tensor(matrix.indices[keep].astype(np.int64), device=device),
        ] = True
    return dense


def _as_targets_tensor(
    targets: TargetsLike, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Returns ``targets`` as a dense boolean tensor on ``device``, checking its shape."""
    if sp.issparse(targets):
        if tuple(targets.shape) != shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match scores shape {shape}"
            )
        return _csr_to_dense_bool(targets, device)
    tensor = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    if tuple(tensor.shape) != shape:
        raise ValueError(f"targets shape {tuple(tensor.shape)} does not match scores shape {shape}")
    return tensor.to(device) != 0


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


# --------------------------------------------------------------------------------------------
# Top-k with a deterministic tie rule


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` item indices per row, ties by lower index, ``-1`` where the score is ``-inf``.

    ``torch.topk`` does not promise which of several tied items it keeps, nor their order. Asking
    it for ``k + 1`` items shows cheaply which rows have a tie straddling the ``k``-th value (the
    ``(k+1)``-th value equals the ``k``-th); only those rows are re-selected, keeping every item
    above the boundary value and then the lowest-indexed items equal to it. Rows with equal
    values inside the list are then reordered by (score descending, index ascending).
    """
    n_users, n_items = scores.shape
    device = scores.device
    k_eff = min(k, n_items)
    if n_users == 0 or k_eff == 0:
        return torch.full((n_users, k), -1, dtype=torch.long, device=device)
    n_probe = min(k_eff + 1, n_items)
    values, indices = torch.topk(scores, n_probe, dim=1)  # (n_users, n_probe)
    boundary = values[:, k_eff - 1 : k_eff]  # (n_users, 1), the k-th value
    if n_probe > k_eff:
        # A tie of -inf items needs no fix: they all become -1 below. A tie of +inf items does:
        # the rule holds for them too.
        ambiguous = (values[:, k_eff] == boundary[:, 0]) & (boundary[:, 0] > -math.inf)
        values, indices = values[:, :k_eff], indices[:, :k_eff]  # (n_users, k_eff)
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(1)
            sub_boundary = boundary[rows]  # (n_ambiguous, 1)
            # Every item above the boundary is kept and they come first in the topk order.
            n_above = (values[rows] > sub_boundary).sum(dim=1, keepdim=True)  # (n_ambiguous, 1)
            max_needed = int((k_eff - n_above).max())
            item_index = torch.arange(n_items, device=device)
            key = torch.where(scores[rows] == sub_boundary, -item_index, -n_items - 1)
            tied = torch.topk(key, max_needed, dim=1).indices  # lowest-index tied items first
            position = torch.arange(k_eff, device=device)
            from_tied = tied.gather(1, (position - n_above).clamp(min=0, max=max_needed - 1))
            indices = indices.clone()
            indices[rows] = torch.where(position < n_above, indices[rows], from_tied)
    # The kept values are sorted descending; rows with equal neighbours get their tied items
    # ordered by index: sort by index, then a stable sort by score.
    has_ties = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if bool(has_ties.any()):
        rows = has_ties.nonzero().squeeze(1)
        sub_indices = torch.sort(indices[rows], dim=1).values
        sub_values = scores[rows].gather(1, sub_indices)
        order = torch.sort(sub_values, dim=1, descending=True, stable=True).indices
        indices = indices.clone()
        indices[rows] = sub_indices.gather(1, order)
    indices = indices.masked_fill(values == -math.inf, -1)
    if k_eff < k:
        padding = torch.full((n_users, k - k_eff), -1, dtype=torch.long, device=device)
        indices = torch.cat([indices, padding], dim=1)  # (n_users, k)
    return indices


def topk_indices(scores: ScoresLike, k: int) -> torch.Tensor:
    """Returns the top-``k`` item indices of each user, best first.

    Items are ordered by score, higher first; ties break by lower item index, including at the
    ``k``-th position and among ``+inf`` scores. Positions that would hold an item scored
    ``-inf`` (an excluded item), or that lie past ``n_items`` when ``k > n_items``, hold ``-1``.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. The result lives on the same device as a tensor input.
        k: Length of each list, at least 1.

    Returns:
        A ``torch.long`` tensor of shape ``(n_users, k)``.

    Raises:
        ValueError: If ``scores`` is not 2-D or contains NaN, or ``k`` is not a positive integer.
    """
    _check_k(k)
    scores_t = _as_scores_tensor(scores)
    _check_no_nan(scores_t)
    with torch.no_grad():
        return _topk(scores_t, int(k))


def mask_history(scores: ScoresLike, history: sp.csr_array) -> ScoresLike:
    """Sets the score of every history item to ``-inf``, in place.

    Args:
        scores: Floating array or tensor of shape ``(n_users, n_items)``. It is modified in place
            (on its own device) and returned.
        history: Sparse matrix of the same shape; every stored nonzero entry is masked.

    Returns:
        ``scores`` itself, with the history entries set to ``-inf``.

    Raises:
        ValueError: If the shapes differ.
    """
    if tuple(scores.shape) != tuple(history.shape):
        raise ValueError(
            f"history shape {tuple(history.shape)} does not match scores shape "
            f"{tuple(scores.shape)}"
        )
    history = sp.csr_array(history)
    rows = np.repeat(np.arange(history.shape[0], dtype=np.int64), np.diff(history.indptr))
    keep = np.asarray(history.data) != 0
    rows = rows[keep]
    cols = history.indices[keep].astype(np.int64)
    if isinstance(scores, torch.Tensor):
        device = scores.device
        scores[
            torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
        ] = -math.inf
    else:
        scores[rows, cols] = -np.inf
    return scores


# --------------------------------------------------------------------------------------------
# Per-user metrics


def _hits(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(n_users, k)``: whether the item at each rank of the top-``k`` list is a target."""
    indices = _topk(scores, k)  # (n_users, k)
    return _hits_from_indices(indices, targets)


def _hits_from_indices(indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    hits = targets.gather(1, indices.clamp(min=0))  # (n_users, k)
    return hits & (indices >= 0)


def _metric_from_hits(name: str, hits: torch.Tensor, n_targets: torch.Tensor) -> torch.Tensor:
    """Computes one per-user metric from the hit matrix of a top-``k`` list.

    Args:
        name: A base metric name from ``_PER_USER_METRICS``.
        hits: Boolean tensor of shape ``(n_users, k)``.
        n_targets: Integer tensor of shape ``(n_users,)``.

    Returns:
        A float64 tensor of shape ``(n_users,)``, NaN where ``n_targets`` is 0.
    """
    k = hits.shape[1]
    device = hits.device
    n_hits = hits.sum(dim=1).to(torch.float64)  # (n_users,)
    n_targets_f = n_targets.to(torch.float64)
    if name == "recall":
        value = n_hits / n_targets_f.clamp(max=k)
    elif name == "recall_plain":
        value = n_hits / n_targets_f
    elif name == "precision":
        value = n_hits / k
    elif name == "hit_rate":
        value = (n_hits > 0).to(torch.float64)
    elif name == "mrr":
        first = hits.to(torch.int8).argmax(dim=1)  # index of the first hit, 0 if none
        value = torch.where(n_hits > 0, 1.0 / (first + 1).to(torch.float64), 0.0)
    elif name == "ndcg":
        discounts = 1.0 / torch.log2(
            torch.arange(2, k + 2, dtype=torch.float64, device=device)
        )  # (k,)
        dcg = (hits.to(torch.float64) * discounts).sum(dim=1)
        ideal = torch.cumsum(discounts, dim=0)  # ideal[j] = IDCG with j + 1 hits
        n_ideal = n_targets.clamp(min=1, max=k) - 1
        value = dcg / ideal[n_ideal]
    else:  # pragma: no cover - callers pass known names only
        raise AssertionError(name)
    return torch.where(n_targets > 0, value, torch.nan)


def _per_user(name: str, scores: ScoresLike, targets: TargetsLike, k: int) -> NDArray[np.float64]:
    _check_k(k)
    scores_t = _as_scores_tensor(scores)
    _check_no_nan(scores_t)
    shape = (int(scores_t.shape[0]), int(scores_t.shape[1]))
    with torch.no_grad():
        targets_t = _as_targets_tensor(targets, shape, scores_t.device)
        hits = _hits(scores_t, targets_t, int(k))
        value = _metric_from_hits(name, hits, targets_t.sum(dim=1))
    return value.cpu().numpy()


def ndcg_at_k(scores: ScoresLike, targets: TargetsLike, k: int) -> NDArray[np.float64]:
    """Normalized discounted cumulative gain at ``k`` for each user.

    ``DCG@k = sum_{r=1..k} rel_r / log2(r + 1)``, where ``rel_r`` is 1 if the item at rank ``r``
    is a target, and ``NDCG@k = DCG@k / IDCG@k`` with ``IDCG@k`` the DCG of
    ``min(k, n_targets)`` hits at the top, so a perfect ranking gives 1. Ties break by item index;
    ``-inf`` items are never ranked; a user with no target gives NaN.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. Computed on the device of a tensor input, else on CPU.
        targets: Binary ``scipy.sparse.csr_array`` or dense boolean array or tensor, same shape.
        k: Length of the recommendation list, at least 1.

    Returns:
        Float64 array of shape ``(n_users,)`` with values in [0, 1] or NaN.

    Raises:
        ValueError: If the shapes differ, ``scores`` contains NaN or ``k`` is not positive.
    """
    return _per_user("ndcg", scores, targets, k)


def recall_at_k(
    scores: ScoresLike, targets: TargetsLike, k: int, *, normalized: bool = True
) -> NDArray[np.float64]:
    """Recall at ``k`` for each user.

    With ``normalized=True`` (the Mult-VAE paper's definition),
    ``Recall@k = hits@k / min(k, n_targets)``, which reaches 1 for a perfect ranking. With
    ``normalized=False`` it is the standard recall ``hits@k / n_targets``. ``hits@k`` counts the
    targets among the top ``k`` items (ties by item index, ``-inf`` items never count). A user with
    no target gives NaN.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. Computed on the device of a tensor input, else on CPU.
        targets: Binary ``scipy.sparse.csr_array`` or dense boolean array or tensor, same shape.
        k: Length of the recommendation list, at least 1.
        normalized: Divide by ``min(k, n_targets)`` rather than ``n_targets``.

    Returns:
        Float64 array of shape ``(n_users,)`` with values in [0, 1] or NaN.

    Raises:
        ValueError: If the shapes differ, ``scores`` contains NaN or ``k`` is not positive.
    """
    return _per_user("recall" if normalized else "recall_plain", scores, targets, k)


def hit_rate_at_k(scores: ScoresLike, targets: TargetsLike, k: int) -> NDArray[np.float64]:
    """Hit rate at ``k`` for each user: 1 if any target is among the top ``k`` items, else 0.

    ``HR@k = 1[hits@k > 0]``. Ties break by item index, ``-inf`` items never count, and a user with
    no target gives NaN.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. Computed on the device of a tensor input, else on CPU.
        targets: Binary ``scipy.sparse.csr_array`` or dense boolean array or tensor, same shape.
        k: Length of the recommendation list, at least 1.

    Returns:
        Float64 array of shape ``(n_users,)`` with values in {0, 1} or NaN.

    Raises:
        ValueError: If the shapes differ, ``scores`` contains NaN or ``k`` is not positive.
    """
    return _per_user("hit_rate", scores, targets, k)


def mrr_at_k(scores: ScoresLike, targets: TargetsLike, k: int) -> NDArray[np.float64]:
    """Reciprocal rank of the first hit within the top ``k``, for each user.

    ``MRR@k = 1 / r`` where ``r`` (1-based) is the rank of the highest-ranked target among the
    top ``k`` items, and 0 if there is none. Ties break by item index, ``-inf`` items never count,
    and a user with no target gives NaN.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. Computed on the device of a tensor input, else on CPU.
        targets: Binary ``scipy.sparse.csr_array`` or dense boolean array or tensor, same shape.
        k: Length of the recommendation list, at least 1.

    Returns:
        Float64 array of shape ``(n_users,)`` with values in [0, 1] or NaN.

    Raises:
        ValueError: If the shapes differ, ``scores`` contains NaN or ``k`` is not positive.
    """
    return _per_user("mrr", scores, targets, k)


def precision_at_k(scores: ScoresLike, targets: TargetsLike, k: int) -> NDArray[np.float64]:
    """Precision at ``k`` for each user.

    ``Precision@k = hits@k / k``. The denominator stays ``k`` even when fewer than ``k`` items have
    a finite score (the empty positions count as misses). Ties break by item index, ``-inf`` items
    never count, and a user with no target gives NaN.

    Args:
        scores: Array or tensor of shape ``(n_users, n_items)``; higher is better, ``-inf``
            excludes an item. Computed on the device of a tensor input, else on CPU.
        targets: Binary ``scipy.sparse.csr_array`` or dense boolean array or tensor, same shape.
        k: Length of the recommendation list, at least 1.

    Returns:
        Float64 array of shape ``(n_users,)`` with values in [0, 1] or NaN.

    Raises:
        ValueError: If the shapes differ, ``scores`` contains NaN or ``k`` is not positive.
    """
    return _per_user("precision", scores, targets, k)


# --------------------------------------------------------------------------------------------
# Aggregate metrics over all top-k lists


def _recommendation_counts(topk_item_idx: IndicesLike, n_items: int) -> NDArray[np.int64]:
    """How often each item appears in the top-k lists; negative indices are skipped."""
    if isinstance(topk_item_idx, torch.Tensor):
        flat = topk_item_idx.detach().cpu().numpy().ravel()
    else:
        flat = np.asarray(topk_item_idx).ravel()
    flat = flat[flat >= 0].astype(np.int64)
    if flat.size and int(flat.max()) >= n_items:
        raise ValueError(f"item index {int(flat.max())} out of range for n_items={n_items}")
    return np.bincount(flat, minlength=n_items)


def _coverage_from_counts(counts: NDArray[np.int64]) -> float:
    return float(np.count_nonzero(counts) / counts.size)


def _gini_from_counts(counts: NDArray[np.int64]) -> float:
    total = counts.sum()
    if total == 0:
        return math.nan
    n_items = counts.size
    ascending = np.sort(counts).astype(np.float64)
    weights = 2.0 * np.arange(1, n_items + 1) - n_items - 1.0
    return float(weights @ ascending / (n_items * total))


def _popularity_ranks(item_popularity: NDArray[Any]) -> NDArray[np.float64]:
    """Rank 1 for the most popular item; equally popular items share their average rank."""
    popularity = np.asarray(item_popularity, dtype=np.float64)
    order = np.argsort(-popularity, kind="stable")
    sorted_popularity = popularity[order]
    ordinal = np.arange(1, popularity.size + 1, dtype=np.float64)
    # Average the ordinal ranks within each run of equal popularity.
    run_starts = np.flatnonzero(np.r_[True, sorted_popularity[1:] != sorted_popularity[:-1]])
    run_ends = np.r_[run_starts[1:], popularity.size]
    run_means = (ordinal[run_starts] + ordinal[run_ends - 1]) / 2.0
    sorted_ranks = np.repeat(run_means, run_ends - run_starts)
    ranks = np.empty_like(sorted_ranks)
    ranks[order] = sorted_ranks
    return ranks


def _popularity_rank_from_counts(counts: NDArray[np.int64], ranks: NDArray[np.float64]) -> float:
    total = counts.sum()
    if total == 0:
        return math.nan
    return float(counts.astype(np.float64) @ ranks / total)


def _check_n_items(n_items: int) -> None:
    if isinstance(n_items, bool) or not isinstance(n_items, int | np.integer) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")


def catalog_coverage_at_k(topk_item_idx: IndicesLike, n_items: int) -> float:
    """Fraction of the catalog that appears in at least one top-``k`` list.

    ``coverage = |union of top-k lists| / n_items``. Negative indices (the ``-1`` padding of
    :func:`topk_indices`) are ignored.

    Args:
        topk_item_idx: Integer array or tensor of shape ``(n_users, k)``.
        n_items: Size of the catalog.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: If ``n_items`` is not positive or an index is ``>= n_items``.
    """
    _check_n_items(n_items)
    return _coverage_from_counts(_recommendation_counts(topk_item_idx, int(n_items)))


def gini_index(topk_item_idx: IndicesLike, n_items: int) -> float:
    """Gini index of how often each catalog item is recommended.

    With ``c_(1) <= ... <= c_(n)`` the recommendation counts of all ``n = n_items`` items (items
    never recommended count 0), ``G = sum_i (2i - n - 1) c_(i) / (n * sum_i c_i)``. It is 0 when
    every item is recommended equally often and ``(n - 1) / n`` (close to 1) when all
    recommendations go to one item. Negative indices are ignored; with no recommendation at all
    the result is NaN.

    Args:
        topk_item_idx: Integer array or tensor of shape ``(n_users, k)``.
        n_items: Size of the catalog.

    Returns:
        A float in [0, 1), or NaN.

    Raises:
        ValueError: If ``n_items`` is not positive or an index is ``>= n_items``.
    """
    _check_n_items(n_items)
    return _gini_from_counts(_recommendation_counts(topk_item_idx, int(n_items)))


def mean_popularity_rank(
    topk_item_idx: IndicesLike, item_popularity: NDArray[np.number[Any]]
) -> float:
    """Mean popularity rank of the recommended items.

    Items are ranked by ``item_popularity`` (e.g. training interaction counts), descending: the
    most popular item has rank 1 and the least popular rank ``n_items``; equally popular items
    share the average of their ranks. The result is the mean rank over every recommended
    (user, item) pair, so an item recommended to many users weighs more. A low value means the
    recommender favours popular items. Negative indices are ignored; with no recommendation at all
    the result is NaN.

    Args:
        topk_item_idx: Integer array or tensor of shape ``(n_users, k)``.
        item_popularity: Array of shape ``(n_items,)``, higher is more popular.

    Returns:
        A float in ``[1, n_items]``, or NaN.

    Raises:
        ValueError: If ``item_popularity`` is not 1-D and non-empty, or an index is out of range.
    """
    popularity = np.asarray(item_popularity)
    if popularity.ndim != 1 or popularity.size == 0:
        raise ValueError(
            f"item_popularity must be a non-empty 1-D array, got shape {popularity.shape}"
        )
    counts = _recommendation_counts(topk_item_idx, popularity.size)
    return _popularity_rank_from_counts(counts, _popularity_ranks(popularity))


# --------------------------------------------------------------------------------------------
# Evaluation loop and result


def _se(values: NDArray[np.float64]) -> float:
    if values.size < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(values.size))


@dataclass(frozen=True)
class EvaluationResult:
    """Per-user and aggregate metrics of one evaluation.

    Attributes:
        per_user: Metric name (e.g. ``"ndcg@100"``) to a float64 array with one value per
            evaluated user, in row order; NaN for users without targets.
        aggregate: Metric name (e.g. ``"coverage@20"``) to one value over all top-k lists.
        n_users: Number of users with at least one target (those the means average over).
        user_has_targets: Boolean array with one entry per evaluated user.
    """

    per_user: dict[str, NDArray[np.float64]]
    aggregate: dict[str, float]
    n_users: int
    user_has_targets: NDArray[np.bool_]

    def _values(self, name: str) -> NDArray[np.float64]:
        if name not in self.per_user:
            raise ValueError(
                f"unknown per-user metric {name!r}; available: {sorted(self.per_user)}"
            )
        return self.per_user[name][self.user_has_targets]

    def mean(self, name: str) -> float:
        """Mean of a per-user metric over users with targets, or an aggregate's value.

        Args:
            name: A key of ``per_user`` or ``aggregate``.

        Returns:
            The mean (NaN if no user has targets) or the aggregate value.

        Raises:
            ValueError: If ``name`` is unknown.
        """
        if name in self.aggregate:
            return self.aggregate[name]
        values = self._values(name)
        return float(values.mean()) if values.size else math.nan

    def stderr(self, name: str) -> float:
        """Standard error of the mean of a per-user metric.

        ``se = std(values, ddof=1) / sqrt(n)`` over the ``n`` users with targets (the sample
        standard deviation, with Bessel's correction). NaN when ``n < 2``.

        Args:
            name: A key of ``per_user``.

        Returns:
            The standard error.

        Raises:
            ValueError: If ``name`` is not a per-user metric (aggregates have no standard error).
        """
        return _se(self._values(name))

    def summary(self) -> dict[str, float]:
        """Flat dict of every metric, suitable for logging.

        Returns:
            ``name -> mean`` and ``name + "_se" -> stderr`` for each per-user metric, then
            ``name -> value`` for each aggregate.
        """
        result: dict[str, float] = {}
        for name in self.per_user:
            result[name] = self.mean(name)
            result[f"{name}_se"] = self.stderr(name)
        result.update(self.aggregate)
        return result

    def by_segment(
        self, name: str, history_lengths: NDArray[np.number[Any]], n_segments: int = 4
    ) -> list[dict[str, float]]:
        """Mean of a per-user metric by quantile segment of fold-in history length.

        The bounds are the ``0, 1/n_segments, ..., 1`` quantiles of the history lengths of the
        users with targets. Segment ``i`` holds lengths in ``[lower, upper)``, the last one
        ``[lower, upper]``; with many equal lengths a segment can be empty (mean and se NaN).

        Args:
            name: A key of ``per_user``.
            history_lengths: Array with one fold-in length per evaluated user, in row order
                (e.g. ``np.diff(fold_in.indptr)``).
            n_segments: Number of segments (4 gives quartiles).

        Returns:
            One dict per segment with keys ``segment``, ``lower``, ``upper``, ``n_users``,
            ``mean`` and ``se``.

        Raises:
            ValueError: If ``name`` is unknown, ``history_lengths`` has the wrong shape or
                ``n_segments < 1``.
        """
        if n_segments < 1:
            raise ValueError(f"n_segments must be at least 1, got {n_segments}")
        lengths_all = np.asarray(history_lengths, dtype=np.float64)
        if lengths_all.shape != self.user_has_targets.shape:
            raise ValueError(
                f"history_lengths shape {lengths_all.shape} does not match the "
                f"{self.user_has_targets.shape[0]} evaluated users"
            )
        values = self._values(name)
        lengths = lengths_all[self.user_has_targets]
        if lengths.size == 0:
            return []
        bounds = np.quantile(lengths, np.linspace(0.0, 1.0, n_segments + 1))
        segment_of = np.searchsorted(bounds[1:-1], lengths, side="right")
        segments: list[dict[str, float]] = []
        for segment in range(n_segments):
            in_segment = values[segment_of == segment]
            segments.append(
                {
                    "segment": float(segment),
                    "lower": float(bounds[segment]),
                    "upper": float(bounds[segment + 1]),
                    "n_users": float(in_segment.size),
                    "mean": float(in_segment.mean()) if in_segment.size else math.nan,
                    "se": _se(in_segment),
                }
            )
        return segments

    def _rows(self, names: Sequence[str] | None) -> list[tuple[str, str, str]]:
        if names is None:
            names = [*self.per_user, *self.aggregate]
        rows: list[tuple[str, str, str]] = []
        for name in names:
            se = "" if name in self.aggregate else f"{self.stderr(name):.4f}"
            rows.append((name, f"{self.mean(name):.4f}", se))
        return rows

    def to_markdown(self, names: Sequence[str] | None = None) -> str:
        """Formats metrics as a Markdown table with columns ``metric | mean | se``.

        Args:
            names: Metrics to include, in order; all per-user metrics then all aggregates if
                None. Aggregates leave the ``se`` cell empty.

        Returns:
            The table, one row per line, without a trailing newline.

        Raises:
            ValueError: If a name is unknown.
        """
        lines = ["| metric | mean | se |", "|---|---:|---:|"]
        lines += [f"| {name} | {mean} | {se} |" for name, mean, se in self._rows(names)]
        return "\n".join(lines)

    def format_table(self, names: Sequence[str] | None = None) -> str:
        """Formats metrics as an aligned plain-text table with columns ``metric  mean  se``.

        Args:
            names: Metrics to include, as in :meth:`to_markdown`.

        Returns:
            The table, one row per line, without a trailing newline.

        Raises:
            ValueError: If a name is unknown.
        """
        rows = [("metric", "mean", "se"), *self._rows(names)]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        return "\n".join(
            f"{name:<{widths[0]}}  {mean:>{widths[1]}}  {se:>{widths[2]}}".rstrip()
            for name, mean, se in rows
        )


def _resolve_metrics(
    metrics: Iterable[str] | None, has_popularity: bool
) -> tuple[list[str], list[str]]:
    """Splits the requested base metric names into per-user and aggregate lists."""
    if metrics is None:
        aggregate = ["coverage", "gini"] + (["popularity_rank"] if has_popularity else [])
        return list(_PER_USER_METRICS), aggregate
    requested = list(dict.fromkeys(metrics))
    unknown = [name for name in requested if name not in _PER_USER_METRICS + _AGGREGATE_METRICS]
    if unknown:
        raise ValueError(
            f"unknown metrics {unknown}; choose from {list(_PER_USER_METRICS + _AGGREGATE_METRICS)}"
        )
    if "popularity_rank" in requested and not has_popularity:
        raise ValueError("metric 'popularity_rank' needs item_popularity")
    per_user = [name for name in requested if name in _PER_USER_METRICS]
    aggregate = [name for name in requested if name in _AGGREGATE_METRICS]
    return per_user, aggregate


def evaluate(
    ranker: Ranker,
    fold_in: sp.csr_array,
    targets: sp.csr_array,
    *,
    ks: Sequence[int] = (20, 50, 100),
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    item_popularity: NDArray[np.number[Any]] | None = None,
    metrics: Iterable[str] | None = None,
) -> EvaluationResult:
    """Scores held-out users from their fold-in histories and measures the rankings.

    Users are processed in batches of ``batch_size`` rows: the ranker scores the batch's fold-in
    rows, the scores move to ``device``, fold-in items are set to ``-inf`` and the metrics are
    computed against the batch's targets. Only one batch is ever dense. For each ``K`` in ``ks``
    the per-user metrics are ``recall@K`` (``hits / min(K, n_targets)``), ``recall_plain@K``
    (``hits / n_targets``), ``ndcg@K``, ``hit_rate@K``, ``mrr@K`` and ``precision@K``; the
    aggregates are ``coverage@K``, ``gini@K`` and, with ``item_popularity``, ``popularity_rank@K``
    (see :func:`catalog_coverage_at_k`, :func:`gini_index` and :func:`mean_popularity_rank`).
    Aggregates are computed over the top-K lists of the users with targets.

    Args:
        ranker: The model or baseline to evaluate.
        fold_in: Binary matrix ``(n_users, n_items)`` of the histories the ranker sees.
        targets: Binary matrix of the same shape with the held-out items to find.
        ks: List lengths to evaluate, each at least 1.
        batch_size: Number of users scored at once.
        device: Device on which masking and metrics run ("auto", "cpu", "cuda" or "cuda:N", or a
            ``torch.device``).
        item_popularity: Optional array ``(n_items,)`` of training counts per item; enables
            ``popularity_rank@K``.
        metrics: Optional base names to compute (``"recall"``, ``"recall_plain"``, ``"ndcg"``,
            ``"hit_rate"``, ``"mrr"``, ``"precision"``, ``"coverage"``, ``"gini"``,
            ``"popularity_rank"``); all that apply if None.

    Returns:
        An :class:`EvaluationResult` with one row per user of ``fold_in``.

    Raises:
        ValueError: If shapes disagree (``fold_in``, ``targets``, ``ranker.n_items``,
            ``item_popularity`` or the ranker's output), ``fold_in`` and ``targets`` share a
            (user, item) pair, ``ks`` or ``batch_size`` is invalid, a metric name is unknown,
            ``device`` names no available device, or the ranker returns NaN.
        TypeError: ``ranker`` is not a ranker, ``batch_size`` is not an int, or ``ks`` or
            ``metrics`` is a string or a scalar rather than a sequence.
    """
    from recvae.recommender import resolve_device  # recommender imports this module

    _check_ranker(ranker, "ranker")
    for name, matrix in (("fold_in", fold_in), ("targets", targets)):
        if not sp.issparse(matrix):
            hint = " (pass its .matrix)" if hasattr(matrix, "matrix") else ""
            raise ValueError(
                f"fold_in and targets must be scipy sparse matrices: {name} is a "
                f"{type(matrix).__name__}{hint}"
            )
    fold_in = sp.csr_array(fold_in)
    targets = sp.csr_array(targets)
    if fold_in.shape != targets.shape:
        raise ValueError(
            f"fold_in shape {fold_in.shape} does not match targets shape {targets.shape}"
        )
    n_users, n_items = fold_in.shape
    if ranker.n_items != n_items:
        raise ValueError(
            f"ranker.n_items={ranker.n_items} does not match fold_in shape {fold_in.shape}"
        )
    if isinstance(ks, str | bytes) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be a sequence of ints such as (20, 50, 100), got {ks!r}")
    ks = list(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        _check_k(k)  # before int(): 2.7, "20" or True must not pass as 2, 20 or 1
    ks = [int(k) for k in ks]
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    if isinstance(metrics, str | bytes):
        raise TypeError(f"metrics must be a sequence of names such as [{metrics!r}], got a string")
    # A target that is also in the fold-in is masked to -inf and can never be hit: the metrics
    # would be silently low (or 0 when both are the same matrix, or swapped arguments).
    overlap = int(np.count_nonzero(fold_in.multiply(targets).data))
    if overlap:
        raise ValueError(
            f"fold_in and targets overlap in {overlap} (user, item) pairs: they must be "
            "disjoint (a target in the fold-in is masked and can never be hit); pass a "
            "HeldOut's fold_in and targets matrices, in that order"
        )
    popularity_ranks: NDArray[np.float64] | None = None
    if item_popularity is not None:
        popularity = np.asarray(item_popularity)
        if popularity.shape != (n_items,):
            raise ValueError(
                f"item_popularity shape {popularity.shape} does not match n_items={n_items}"
            )
        popularity_ranks = _popularity_ranks(popularity)
    per_user_names, aggregate_names = _resolve_metrics(metrics, popularity_ranks is not None)

    device = resolve_device(device)
    k_max = max(ks)
    per_user = {
        f"{name}@{k}": np.full(n_users, np.nan, dtype=np.float64)
        for k in ks
        for name in per_user_names
    }
    counts = {k: np.zeros(n_items, dtype=np.int64) for k in ks}
    user_has_targets = np.zeros(n_users, dtype=np.bool_)

    for start in range(0, n_users, batch_size):
        stop = min(start + batch_size, n_users)
        histories = fold_in[start:stop]
        raw = ranker.score(histories)
        raw_t = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
        if tuple(raw_t.shape) != (stop - start, n_items):
            raise ValueError(
                f"ranker.score returned shape {tuple(raw_t.shape)} for histories of shape "
                f"{histories.shape}"
            )
        # Integer scores go to float64 (exact up to 2**53), other floats at least to float32.
        dtype = (
            raw_t.dtype
            if raw_t.dtype in (torch.float32, torch.float64)
            else torch.float32
            if raw_t.is_floating_point()
            else torch.float64
        )
        with torch.no_grad():
            # Always copy: the ranker may hand back a cached or expanded tensor we must not mask.
            scores = raw_t.detach().to(device=device, dtype=dtype, copy=True).contiguous()
            _check_no_nan(scores)
            mask_history(scores, histories)  # (batch, n_items), fold-in items at -inf
            batch_targets = _csr_to_dense_bool(targets[start:stop], device)  # (batch, n_items)
            n_targets = batch_targets.sum(dim=1)  # (batch,)
            indices = _topk(scores, k_max)  # (batch, k_max)
            hits_max = _hits_from_indices(indices, batch_targets)  # (batch, k_max)
            has_targets = (n_targets > 0).cpu().numpy()
            user_has_targets[start:stop] = has_targets
            for k in ks:
                # The tie rule is a total order, so the top-k list is a prefix of the top-k_max.
                hits = hits_max[:, :k]
                for name in per_user_names:
                    value = _metric_from_hits(name, hits, n_targets)
                    per_user[f"{name}@{k}"][start:stop] = value.cpu().numpy()
                if aggregate_names:
                    kept = indices[:, :k][torch.as_tensor(has_targets, device=device)]
                    counts[k] += _recommendation_counts(kept, n_items)

    aggregate: dict[str, float] = {}
    for k in ks:
        for name in aggregate_names:
            if name == "coverage":
                aggregate[f"coverage@{k}"] = _coverage_from_counts(counts[k])
            elif name == "gini":
                aggregate[f"gini@{k}"] = _gini_from_counts(counts[k])
            elif popularity_ranks is not None:
                aggregate[f"popularity_rank@{k}"] = _popularity_rank_from_counts(
                    counts[k], popularity_ranks
                )
    return EvaluationResult(
        per_user=per_user,
        aggregate=aggregate,
        n_users=int(user_has_targets.sum()),
        user_has_targets=user_has_targets,
    )
