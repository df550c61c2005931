"""An ensemble of multinomial autoencoders: the mean of their item log-probabilities.

Two VAEs trained on the same data with different seeds (initial weights, batch order, dropout
masks and posterior samples) rank differently, and on small catalogs the difference is of the
order of the gap between models. Averaging the members' per-user log-probabilities,
``score(x) = sum_m w_m * log_softmax(f_m(x))`` (a weighted geometric mean of their multinomials),
keeps what the members agree on and damps what one seed learned by chance; it is the usual
variance reduction of deep ensembles (Lakshminarayanan et al., NeurIPS 2017). The members must
score the same items in the same order (e.g. :class:`~recvae.Recommender` bundles trained on one
split); whether an ensemble pays is measured on validation users, like any other choice.

Since ``log_softmax`` only subtracts a per-user constant from each member, this ranking equals
that of the (weighted) mean of the members' logits; the log-probabilities make the scores
comparable across users and members. ``combine="softmax"`` averages the probabilities instead
(an arithmetic mixture of the multinomials), which favors items one member is sure of over
items every member ranks moderately high.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from recvae.evaluation import Ranker, _check_ranker, _check_same_items, _number_list
from recvae.recommender import resolve_device

__all__ = ["Ensemble"]

Combine = Literal["log_softmax", "softmax"]


class Ensemble:
    """A :class:`~recvae.evaluation.Ranker` that averages several rankers over the same items.

    Args:
        members: At least one ranker; all score the same number of items.
        weights: One non-negative weight per member (normalized to sum to 1); equal by default.
        combine: ``"log_softmax"`` (mean log-probability) or ``"softmax"`` (log of the mean
            probability). The members' scores are taken as logits, as a VAE's decoder gives.
        device: Where the members' scores are combined.

    Raises:
        ValueError: No member, members over different items (by ``item_ids`` where members
            record them, e.g. the same items in another order; else by count), a weight count
            that does not match, a negative or non-finite weight, all-zero weights, an unknown
            ``combine``, or a ``device`` that names no available device.
        TypeError: A member is not a ranker, or a weight is not a number.
    """

    def __init__(
        self,
        members: Sequence[Ranker],
        *,
        weights: Sequence[float] | None = None,
        combine: Combine = "log_softmax",
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(members, str | bytes) or not isinstance(members, Iterable):
            raise TypeError(f"members must be a sequence of rankers, got {type(members).__name__}")
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        for i, member in enumerate(members):
            _check_ranker(member, f"members[{i}]")
        for i, member in enumerate(members[1:], start=1):
            _check_same_items(member, members[0], f"members[{i}]", "members[0]")
        if combine not in ("log_softmax", "softmax"):
            raise ValueError(f"combine must be 'log_softmax' or 'softmax', got {combine!r}")
        if weights is None:
            weights = [1.0] * len(members)
        weights = _number_list(weights, "weights", "[1.0, 1.0]")
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights given for {len(members)} members")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all 0, got {weights}")
        # Scale by the largest weight first: the sum of huge weights would overflow to inf
        # and turn every normalized weight into 0.
        peak = max(weights)
        scaled = [w / peak for w in weights]
        total = sum(scaled)
        self.members = members
        self.weights = [w / total for w in scaled]
        self.combine: Combine = combine
        self.device = resolve_device(device)

    @property
    def n_items(self) -> int:
        return int(self.members[0].n_items)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        kinds = ", ".join(type(m).__name__ for m in self.members)
        return f"Ensemble([{kinds}], combine={self.combine!r})"

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        """Combined log-probabilities, ``(n_users, n_items)`` float32 (history items not masked).

        Members of weight 0 are not asked to score. With ``"log_softmax"`` an item any other
        member scores ``-inf`` stays ``-inf``; with ``"softmax"`` such a member gives the item
        probability 0 and the mixture keeps it if another member allows it. A member that scores
        a whole row ``-inf`` gives that row probability 0 everywhere (not NaN).

        Raises:
            ValueError: a member returned scores of another shape than
                ``(n_histories, n_items)``.
        """
        n_users = int(histories.shape[0])
        total: torch.Tensor | None = None
        for member, weight in zip(self.members, self.weights, strict=True):
            if weight == 0:
                continue
            raw: Any = member.score(histories)
            s = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(raw))
            s = s.to(self.device, dtype=torch.float32)
            if s.dim() != 2 or s.shape[0] != n_users or s.shape[1] != self.n_items:
                raise ValueError(
                    f"{type(member).__name__} returned scores of shape {tuple(s.shape)}, "
                    f"expected ({n_users}, {self.n_items})"
                )
            excluded = s == -math.inf  # (n_users, n_items)
            s = torch.log_softmax(s, dim=-1)  # (n_users, n_items)
            # A row the member scores -inf everywhere has no distribution (log_softmax gives
            # NaN there); all its items are excluded.
            s = s.masked_fill(excluded.all(dim=1, keepdim=True), -math.inf)
            if self.combine == "softmax":
                # log sum_m w_m p_m accumulated in log space: exp(log p) underflows to 0 (and its
                # log to -inf) for items below about e^-104 in float32.
                s = s + math.log(weight)
                total = s if total is None else torch.logaddexp(total, s)
            else:
                total = weight * s if total is None else total + weight * s
        assert total is not None
        return total
