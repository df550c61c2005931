"""A blend of two rankers: a weighted sum of their per-user normalized scores.

Models that are right about different users or items (a VAE's non-linear, sampled-code view and
EASE's linear item-item view) often add up: ``score = w * n(s_1) + (1 - w) * n(s_2)``, where
``n`` puts each user's scores on a common scale. The weight ``w`` is chosen on validation users
by :func:`select_blend_weight`; test users are never seen there.

Normalization is per user and ignores the history items (which the caller excludes anyway and
whose scores are often extreme): ``"zscore"`` subtracts the mean and divides by the standard
deviation over the user's other items; ``"minmax"`` maps their range onto [0, 1]. An item a
ranker scores ``-inf`` (excluded) stays ``-inf`` in the blend.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

from recvae.config import _parse_metric
from recvae.evaluation import (
    Ranker,
    _check_ranker,
    _check_same_items,
    _number_list,
    hit_rate_at_k,
    mask_history,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)
from recvae.recommender import resolve_device
from recvae.split import HeldOut, _check_held_out

__all__ = [
    "Blend",
    "BlendSelection",
    "normalize_scores",
    "select_blend_weight",
    "DEFAULT_BLEND_WEIGHTS",
]

logger = logging.getLogger(__name__)

Normalization = Literal["zscore", "minmax"]

#: Candidate weights of the first ranker tried by :func:`select_blend_weight`: 0, 0.05, ..., 1.
DEFAULT_BLEND_WEIGHTS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))

_METRICS: dict[str, Callable[..., NDArray[np.float64]]] = {
    "ndcg": ndcg_at_k,
    "recall": recall_at_k,
    "hit_rate": hit_rate_at_k,
    "mrr": mrr_at_k,
    "precision": precision_at_k,
}


def _history_mask(histories: sp.csr_array, device: torch.device) -> torch.Tensor:
    """Boolean ``(n_users, n_items)``: True at every stored nonzero of ``histories``."""
    mask = torch.zeros(histories.shape, dtype=torch.bool, device=device)
    coo = sp.coo_array(histories)
    keep = np.asarray(coo.data) != 0
    if keep.any():
        mask[
            torch.as_tensor(coo.row[keep].astype(np.int64), device=device),
            torch.as_tensor(coo.col[keep].astype(np.int64), device=device),
        ] = True
    return mask


def normalize_scores(
    scores: torch.Tensor | NDArray[np.floating[Any]],
    histories: sp.csr_array,
    method: Normalization = "zscore",
) -> torch.Tensor:
    """Per-user normalized scores, with statistics over the non-history, finite items.

    ``"zscore"``: ``(s - mean) / std``; ``"minmax"``: ``(s - min) / (max - min)``. A user whose
    eligible scores are all equal gets 0 for every finite item. Non-finite scores become
    ``-inf``.

    Args:
        scores: ``(n_users, n_items)`` raw scores of one ranker.
        histories: ``(n_users, n_items)`` the histories they were computed from.
        method: ``"zscore"`` or ``"minmax"``.

    Returns:
        A float32 tensor of the same shape, on the device of a tensor input (else the CPU).

    Raises:
        ValueError: The shapes differ, the method is unknown or the scores contain NaN.
    """
    s = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    s = s.detach()
    if not s.is_floating_point():
        s = s.to(torch.float64)
    if s.ndim != 2 or tuple(s.shape) != tuple(histories.shape):
        raise ValueError(
            f"scores shape {tuple(s.shape)} does not match histories shape {tuple(histories.shape)}"
        )
    if method not in ("zscore", "minmax"):
        raise ValueError(f"normalization must be 'zscore' or 'minmax', got {method!r}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    finite = torch.isfinite(s)
    eligible = finite & ~_history_mask(histories, s.device)  # (n_users, n_items)
    # A user whose every item is in the history falls back to all finite items.
    eligible = torch.where(eligible.any(dim=1, keepdim=True), eligible, finite)
    # Both normalizations ignore a positive per-user factor: dividing by the largest eligible
    # |score| (in the input's precision) keeps the float32 sums and squares below from
    # overflowing (scores near 1e19 and up would all become 0) or underflowing.
    peak = torch.where(eligible, s.abs(), torch.zeros((), dtype=s.dtype, device=s.device))
    peak = peak.amax(dim=1, keepdim=True)  # (n_users, 1)
    s = (s / torch.where(peak > 0, peak, torch.ones_like(peak))).to(torch.float32)
    # Scaling can push an ineligible (history) score past float32's range: it stays excluded.
    finite = torch.isfinite(s)
    eligible = eligible & finite
    count = eligible.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)  # (n_users, 1)
    clean = torch.where(eligible, s, torch.zeros((), device=s.device))
    if method == "zscore":
        mean = clean.sum(dim=1, keepdim=True) / count
        var = (torch.where(eligible, s - mean, torch.zeros((), device=s.device)) ** 2).sum(
            dim=1, keepdim=True
        ) / count
        scale = var.sqrt()
        offset = mean
    else:
        high = torch.where(eligible, s, torch.full((), -math.inf, device=s.device)).amax(
            dim=1, keepdim=True
        )
        low = torch.where(eligible, s, torch.full((), math.inf, device=s.device)).amin(
            dim=1, keepdim=True
        )
        high = torch.where(torch.isfinite(high), high, torch.zeros((), device=s.device))
        low = torch.where(torch.isfinite(low), low, torch.zeros((), device=s.device))
        scale = high - low
        offset = low
    scale = torch.where(scale > 0, scale, torch.ones((), device=s.device))
    out = (torch.where(finite, s, offset) - offset) / scale
    return torch.where(finite, out, torch.full((), -math.inf, device=s.device))


def _combine(first: torch.Tensor, second: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * first + (1 - weight) * second``; ``-inf`` in either stays ``-inf``."""
    finite = torch.isfinite(first) & torch.isfinite(second)
    zero = torch.zeros((), device=first.device)
    mixed = weight * torch.where(finite, first, zero) + (1.0 - weight) * torch.where(
        finite, second, zero
    )
    return torch.where(finite, mixed, torch.full((), -math.inf, device=first.device))


class Blend:
    """A :class:`~recvae.evaluation.Ranker` that mixes two rankers' normalized scores.

    ``score(x) = weight * n(first.score(x)) + (1 - weight) * n(second.score(x))`` with ``n`` the
    per-user normalization of :func:`normalize_scores`.

    Args:
        first: A ranker (e.g. a trained :class:`~recvae.Recommender`).
        second: Another ranker over the same items (e.g. :class:`~recvae.baselines.EASE`).
        weight: Weight of ``first``, in [0, 1].
        normalization: ``"zscore"`` or ``"minmax"``.
        device: Where the scores are combined.

    Raises:
        ValueError: The rankers score different items (by ``item_ids`` where both record them,
            e.g. the same items in another order; else by count), the weight is not a number
            in [0, 1], the normalization is unknown, or ``device`` names no available device.
        TypeError: ``first`` or ``second`` is not a ranker.
    """

    def __init__(
        self,
        first: Ranker,
        second: Ranker,
        weight: float,
        *,
        normalization: Normalization = "zscore",
        device: str | torch.device = "cpu",
    ) -> None:
        _check_ranker(first, "first")
        _check_ranker(second, "second")
        _check_same_items(first, second, "the first ranker", "the second ranker")
        if not (
            isinstance(weight, numbers.Real)
            and not isinstance(weight, bool)
            and 0.0 <= float(weight) <= 1.0
        ):
            raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
        if normalization not in ("zscore", "minmax"):
            raise ValueError(f"normalization must be 'zscore' or 'minmax', got {normalization!r}")
        self.first: Ranker = first
        self.second: Ranker = second
        self.weight: float = float(weight)
        self.normalization: Normalization = normalization
        self.device: torch.device = resolve_device(device)

    @property
    def n_items(self) -> int:
        return int(self.first.n_items)

    def __repr__(self) -> str:
        return (
            f"Blend({type(self.first).__name__} x {self.weight:g} + "
            f"{type(self.second).__name__} x {1 - self.weight:g}, {self.normalization})"
        )

    def normalized_scores(self, histories: sp.csr_array) -> tuple[torch.Tensor, torch.Tensor]:
        """Both rankers' normalized scores for ``histories``, each ``(n_users, n_items)``."""
        histories = sp.csr_array(histories)
        if histories.ndim != 2 or histories.shape[1] != self.n_items:
            raise ValueError(
                f"histories must have shape (n, {self.n_items}), got {tuple(histories.shape)}"
            )
        parts = []
        for ranker in (self.first, self.second):
            raw = ranker.score(histories)
            raw_t = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(raw))
            parts.append(normalize_scores(raw_t.to(self.device), histories, self.normalization))
        return parts[0], parts[1]

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        """The blended scores, ``(n_users, n_items)`` float32 (history items not masked)."""
        first, second = self.normalized_scores(histories)
        return _combine(first, second, self.weight)


@dataclass(frozen=True)
class BlendSelection:
    """The outcome of :func:`select_blend_weight`.

    Attributes:
        best: The chosen weight of the first ranker.
        scores: ``weight -> mean validation metric`` for every candidate, in the order tried.
        metric: The metric that chose, e.g. ``"ndcg@100"``.
        blend: The :class:`Blend` with the chosen weight.
    """

    best: float
    scores: dict[float, float]
    metric: str
    blend: Blend


def select_blend_weight(
    first: Ranker,
    second: Ranker,
    validation: HeldOut,
    *,
    weights: Sequence[float] = DEFAULT_BLEND_WEIGHTS,
    metric: str = "ndcg@100",
    normalization: Normalization = "zscore",
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> BlendSelection:
    """Choose the blend weight by a validation metric (mean over users with targets).

    Each ranker scores each validation batch once; every candidate weight is measured on the
    same scores. Ties go to the candidate tried first.

    Args:
        first: The ranker whose weight is chosen.
        second: The other ranker.
        validation: Validation users (fold-in histories and targets).
        weights: Candidate weights in [0, 1], at least one.
        metric: ``"<name>@<k>"`` with name one of ndcg, recall, hit_rate, mrr, precision.
        normalization: As for :class:`Blend`.
        batch_size: Users scored at once.
        device: Where scores are combined and measured.

    Returns:
        The :class:`BlendSelection`.

    Raises:
        ValueError: No candidate or one outside [0, 1], a bad metric, rankers or a validation
            set over other items (or the same items in another order), or a validation set
            with no user with targets.
        TypeError: ``weights`` is not a sequence of numbers, ``batch_size`` is not an int,
            ``validation`` is not a ``HeldOut``, or a ranker is not a ranker.
    """
    candidates = _number_list(weights, "weights")
    if not candidates:
        raise ValueError("weights must hold at least one candidate")
    bad = [w for w in candidates if not (0.0 <= w <= 1.0)]
    if bad:
        raise ValueError(f"every weight must be in [0, 1], got {bad}")
    name, k = _parse_metric(metric, "metric", tuple(_METRICS))
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    _check_held_out(validation)
    scorer = Blend(first, second, candidates[0], normalization=normalization, device=device)
    _check_same_items(validation, first, "validation", "the first ranker")
    if validation.n_users_with_targets == 0:
        raise ValueError(
            f"validation has no user with targets ({validation.n_users} users): it cannot "
            "choose a blend weight"
        )
    fold_in = validation.fold_in.matrix
    targets = validation.targets.matrix
    per_weight: list[list[NDArray[np.float64]]] = [[] for _ in candidates]
    for start in range(0, fold_in.shape[0], batch_size):
        histories = fold_in[start : start + batch_size]
        batch_targets = targets[start : start + batch_size]
        first_n, second_n = scorer.normalized_scores(histories)
        for i, w in enumerate(candidates):
            blended = mask_history(_combine(first_n, second_n, w), histories)
            per_weight[i].append(_METRICS[name](blended, batch_targets, k))
    scores: dict[float, float] = {}
    best, best_score = candidates[0], -math.inf
    for w, parts in zip(candidates, per_weight, strict=True):
        values = np.concatenate(parts)
        valid = values[~np.isnan(values)]
        score = float(valid.mean()) if valid.size else math.nan
        scores[w] = score
        if score > best_score:
            best, best_score = w, score
    logger.info("blend weight %.2f: validation %s %.4f", best, metric, best_score)
    blend = Blend(first, second, best, normalization=normalization, device=device)
    return BlendSelection(best=best, scores=scores, metric=metric, blend=blend)
