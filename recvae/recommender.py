"""A trained model plus its vocabularies: scoring, top-K recommendation and the saved bundle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import nn

from recvae import _durable
from recvae.config import ModelConfig, config_from_dict
from recvae.data.interactions import Interactions, UnknownUserError, _id_kind
from recvae.evaluation import topk_indices
from recvae.model import build_model
from recvae.vae_tools import (
    AnomalyReference,
    AnomalyScores,
    as_latent_model,
    check_exploration,
    make_generator,
    negative_elbo_terms,
    posterior_confidence,
    reference_histories,
    sample_latent,
)

__all__ = [
    "Recommender",
    "Recommendations",
    "AnomalyScores",
    "BundleError",
    "BUNDLE_FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
_BUNDLE_FILES = ("config.json", "weights.pt", "user_ids.json", "item_ids.json", "train_matrix.npz")
_HISTORY_VALUES = "history values must be finite and >= 0"
# A weighted history whose L2 norm lies outside this range is divided by its largest weight
# (in float64) before it becomes float32: the models' input normalization squares the values,
# which overflows (or underflows to an empty history) in float32 far inside float64's range.
_SAFE_NORM = (1e-6, 1e15)


class BundleError(ValueError):
    """A model bundle is missing, corrupted or incompatible with this version of recvae."""


@dataclass(frozen=True)
class Recommendations:
    """Top-K results for a batch of users, best first.

    Attributes:
        item_ids: ``(n_users, k)`` external item ids.
        scores: ``(n_users, k)`` float32 scores; ``-inf`` marks padding where fewer than ``k``
            items were eligible (those positions are not recommendations, and their
            ``item_ids`` entry is meaningless).
        item_idx: ``(n_users, k)`` item positions in the model's vocabulary, ``-1`` for padding.
        unknown_items: For history-based calls, the history items the model did not know.
        confidence: ``(n_users,)`` float32 confidence of each user's posterior,
            ``1 - mean_d min(sigma_d, 1)`` in [0, 1] (see ``recvae.vae_tools``); higher means
            the history pins the user's latent code down more. None for a model without a
            posterior (Mult-DAE).
    """

    item_ids: NDArray[Any]
    scores: NDArray[np.float32]
    item_idx: NDArray[np.int64]
    unknown_items: tuple[tuple[Any, ...], ...] = field(default=())
    confidence: NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_lists(self) -> list[list[tuple[Any, float]]]:
        """One ``[(item_id, score), ...]`` list per user, padding dropped."""
        out: list[list[tuple[Any, float]]] = []
        for ids, scores in zip(self.item_ids, self.scores, strict=True):
            out.append(
                [(_py(i), float(s)) for i, s in zip(ids, scores, strict=True) if np.isfinite(s)]
            )
        return out


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        ValueError: ``device`` names no device, or CUDA was asked for but is not available.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available")
    return dev


class Recommender:
    """A trained autoencoder with its item vocabulary, ready to score histories.

    Evaluation and serving use the posterior mean (``z = mu``). Also the ``Ranker`` of
    ``recvae.evaluation``: ``score(histories)`` returns scores for every item.

    Args:
        model: A trained ``MultVAE``/``MultDAE`` (put in eval mode here).
        config: Its config.
        item_ids: External item ids, one per model output.
        user_ids: Training user ids (for ``recommend``); optional.
        train_matrix: Training users' histories, rows aligned with ``user_ids``.
        meta: Free metadata (metrics, history, data fingerprint, ...), saved in ``meta.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        item_ids: NDArray[Any],
        *,
        user_ids: NDArray[Any] | None = None,
        train_matrix: sp.csr_array | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        n_users = 0 if user_ids is None else len(user_ids)
        if train_matrix is None:
            train_matrix = sp.csr_array((n_users, len(item_ids)), dtype=np.float32)
        self.vocab = Interactions(
            train_matrix, np.arange(0) if user_ids is None else user_ids, item_ids
        )
        self.meta: dict[str, Any] = dict(meta or {})
        # Anomaly reference of the training users, computed on first use.
        self._anomaly_reference: AnomalyReference | None = None
        self._anomaly_lock = threading.Lock()
        # (order, share) of the popularity fallback, computed on first use (the training
        # matrix never changes, and two threads computing it at once get equal arrays).
        self._popularity: tuple[NDArray[np.int64], NDArray[np.float32]] | None = None
        if int(getattr(model, "n_items", len(item_ids))) != len(item_ids):
            raise ValueError(
                f"model has {model.n_items} outputs but {len(item_ids)} item ids were given"
            )

    # ------------------------------------------------------------------ basics
    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    @property
    def item_ids(self) -> NDArray[Any]:
        return self.vocab.item_ids

    @property
    def user_ids(self) -> NDArray[Any]:
        return self.vocab.user_ids

    @property
    def train_matrix(self) -> sp.csr_array:
        return self.vocab.matrix

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def version(self) -> str:
        """A short content id of the model (from the bundle checksum when loaded)."""
        return str(self.meta.get("model_version", "unsaved"))

    def to(self, device: str | torch.device) -> Recommender:
        self.model.to(resolve_device(device))
        return self

    def __repr__(self) -> str:
        return (
            f"Recommender(model={self.config.model}, n_items={self.n_items}, "
            f"n_users={self.vocab.n_users}, version={self.version})"
        )

    # ------------------------------------------------------------------ scoring core
    def _dense(self, histories: sp.csr_array | NDArray[Any] | torch.Tensor) -> torch.Tensor:
        if isinstance(histories, Interactions):
            raise TypeError("histories is an Interactions: pass its matrix (data.matrix)")
        if sp.issparse(histories):
            # Checked, canonical, and rescaled where float32 would misbehave (as lists of ids).
            matrix, _ = self._as_history_matrix(histories)
            return torch.from_numpy(matrix.toarray()).to(self.device)
        if not isinstance(histories, torch.Tensor):
            histories = torch.as_tensor(np.asarray(histories, dtype=np.float64))
        x = histories.to(self.device)
        if x.dim() != 2 or x.shape[1] != self.n_items:
            raise ValueError(f"histories must have shape (n, {self.n_items}), got {tuple(x.shape)}")
        if x.numel() and bool((~torch.isfinite(x) | (x < 0)).any()):
            raise ValueError(_HISTORY_VALUES)
        return _safe_rows_tensor(x)

    def score(self, histories: sp.csr_array | NDArray[Any] | torch.Tensor) -> torch.Tensor:
        """Scores (logits) of every item for each history row, from ``z = mu``.

        Args:
            histories: ``(n_users, n_items)`` binary or weighted histories.

        Returns:
            ``(n_users, n_items)`` float32 tensor on the model's device; seen items are *not*
            masked here.

        Raises:
            ValueError: the histories do not have ``n_items`` columns, or hold a negative,
                NaN or infinite value.
            TypeError: ``histories`` is an ``Interactions`` (pass its ``matrix``).
        """
        self.model.eval()
        with torch.inference_mode():
            model = as_latent_model(self.model)
            mu, _ = model.encode(self._dense(histories))
            return model.decode(mu).float()

    def encode(
        self, histories: sp.csr_array | NDArray[Any] | torch.Tensor
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """The posterior ``(mu, sigma)`` of each history, each ``(n_users, latent_dim)``.

        For Mult-DAE ``sigma`` is all zeros (the code is deterministic).

        Raises:
            ValueError: malformed histories, as for :meth:`score`.
        """
        self.model.eval()
        with torch.inference_mode():
            mu, logvar = as_latent_model(self.model).encode(self._dense(histories))
            sigma = torch.zeros_like(mu) if logvar is None else torch.exp(0.5 * logvar)
        return mu.float().cpu().numpy(), sigma.float().cpu().numpy()

    # ------------------------------------------------------------------ histories
    def histories_matrix(
        self,
        histories: Sequence[Sequence[Any]],
        weights: Sequence[Sequence[float] | None] | None = None,
    ) -> tuple[sp.csr_array, list[tuple[Any, ...]]]:
        """Turn lists of external item ids into a CSR matrix; unknown ids are dropped.

        Item ids may be Python or NumPy scalars, or 0-d tensors/arrays (read as their value).
        An id of the vocabulary's type that the model does not know is dropped and reported.
        A weighted history whose L2 norm is below 1e-6 or above 1e15 is divided by its largest
        weight (the ranking depends only on relative weights; float32 would otherwise overflow
        or underflow).

        Args:
            histories: One sequence of item ids per user.
            weights: Optional per-item weights (same shapes); default 1.0 each.

        Returns:
            ``(matrix (n_users, n_items), unknown ids per user)``.

        Raises:
            ValueError: weights do not match the histories (in rows or in length), a weight is
                negative or not finite, or no given id is known and they are all of the other
                type than the vocabulary's (str ids for an int vocabulary, or the reverse).
            TypeError: ``histories`` or one of its rows is a str/bytes, a scalar or not
                iterable, or an item id is not hashable.
        """
        history_rows = _rows("histories", histories)
        n = len(history_rows)
        weight_rows = None if weights is None else _rows("weights", weights)
        if weight_rows is not None and len(weight_rows) != n:
            raise ValueError(f"weights has {len(weight_rows)} rows for {n} histories")
        rows: list[NDArray[np.int64]] = []
        cols: list[NDArray[np.int64]] = []
        vals: list[NDArray[np.float32]] = []
        unknown_all: list[tuple[Any, ...]] = []
        n_known = 0
        unknown_seen: list[Any] = []
        for row, raw_items in enumerate(history_rows):
            items = _id_list(f"history {row}", raw_items)
            w = None if weight_rows is None else _weight_list(f"weights[{row}]", weight_rows[row])
            if w is not None and len(w) != len(items):
                raise ValueError(f"history {row}: {len(w)} weights for {len(items)} items")
            known_idx: list[int] = []
            known_w: list[float] = []
            unknown: list[Any] = []
            index = self.vocab.item_index
            for j, item in enumerate(items):
                try:
                    idx = index(item)
                except TypeError:  # unhashable (a list in place of an id)
                    idx = self._item_position(f"history {row}", item)  # raises, naming it
                if idx is None:
                    unknown.append(item)
                    continue
                known_idx.append(idx)
                known_w.append(1.0 if w is None else float(w[j]))
            if known_w and (not np.all(np.isfinite(known_w)) or min(known_w) < 0):
                raise ValueError(f"history {row}: weights must be finite and >= 0")
            n_known += len(known_idx)
            unknown_seen.extend(unknown)
            if unknown:
                logger.debug("history %d: %d unknown item(s) dropped", row, len(unknown))
            rows.append(np.full(len(known_idx), row, dtype=np.int64))
            cols.append(np.asarray(known_idx, dtype=np.int64))
            row_w = np.asarray(known_w, dtype=np.float64)
            vals.append(safe_row_weights(np.zeros(len(row_w), dtype=np.int64), row_w, 1))
            unknown_all.append(tuple(unknown))
        self._check_id_types("", unknown_seen, n_known=n_known)
        if n and sum(len(r) for r in rows):
            matrix = sp.csr_array(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=(n, self.n_items),
                dtype=np.float32,
            )
            # Repeated ids in one history: keep the largest weight rather than summing.
            matrix.sum_duplicates()
            matrix = _dedupe_max(
                matrix, np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
            )
        else:
            matrix = sp.csr_array((n, self.n_items), dtype=np.float32)
        return matrix, unknown_all

    def _item_position(self, where: str, item: Any) -> int | None:
        try:
            return self.vocab.item_index(item)
        except TypeError:
            raise TypeError(
                f"{where}: item id {item!r} is a {type(item).__name__}, not an int or str"
            ) from None

    def _check_id_types(self, prefix: str, unknown: Sequence[Any], *, n_known: int) -> None:
        """Refuse ids that are all unknown because of their type (str vs int), not their value.

        Applies to a whole call: when some id is known, the caller's ids have the right type
        and the others are merely unknown (dropped and reported).
        """
        if n_known or not unknown or not self.n_items:
            return
        expected = "str" if self.item_ids.dtype == object else "int"
        kinds = {_id_kind(item) for item in unknown}
        if len(kinds) == 1 and None not in kinds and expected not in kinds:
            (given,) = kinds
            raise ValueError(
                f"{prefix}item ids are {given} but this model's ids are {expected} "
                f"(e.g. {_py(self.item_ids[0])!r}), so none of the given ids is known: "
                f"convert them with {expected}(...)"
            )

    # ------------------------------------------------------------------ recommendation
    def _topk(
        self,
        histories: sp.csr_array,
        k: int,
        *,
        exclude_seen: bool,
        exclude: Sequence[Sequence[int]] | None = None,
        batch_size: int = 4096,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.float32] | None]:
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        generator = self._exploration_generator(explore, temperature, seed)
        k = min(int(k), self.n_items)
        all_idx: list[NDArray[np.int64]] = []
        all_scores: list[NDArray[np.float32]] = []
        all_confidence: list[NDArray[np.float32]] = []
        for start in range(0, histories.shape[0], batch_size):
            chunk = histories[start : start + batch_size]
            scores, confidence = self._score_with_confidence(
                chunk, temperature=temperature, generator=generator
            )  # (batch, n_items), (batch,) or None
            with torch.inference_mode():
                if exclude_seen and chunk.nnz:
                    coo = sp.coo_array(chunk)
                    rows = torch.as_tensor(coo.row, dtype=torch.long, device=scores.device)
                    cols = torch.as_tensor(coo.col, dtype=torch.long, device=scores.device)
                    scores[rows, cols] = -torch.inf
                if exclude is not None:
                    for r, items in enumerate(exclude[start : start + batch_size]):
                        if len(items):
                            scores[r, torch.as_tensor(list(items), dtype=torch.long)] = -torch.inf
                idx = topk_indices(scores, k)  # (batch, k); -1 where nothing is eligible
                top = torch.gather(scores, 1, idx.clamp(min=0))
                top = top.masked_fill(idx < 0, -torch.inf)
            all_idx.append(idx.cpu().numpy().astype(np.int64))
            all_scores.append(top.cpu().numpy().astype(np.float32))
            if confidence is not None:
                all_confidence.append(confidence)
        if not all_idx:
            empty_confidence = np.zeros(0, dtype=np.float32) if self._variational() else None
            return (
                np.zeros((0, k), dtype=np.int64),
                np.zeros((0, k), dtype=np.float32),
                empty_confidence,
            )
        conf = np.concatenate(all_confidence) if all_confidence else None
        return np.concatenate(all_idx), np.concatenate(all_scores), conf

    def _package(
        self,
        idx: NDArray[np.int64],
        scores: NDArray[np.float32],
        unknown: Sequence[tuple[Any, ...]] = (),
        confidence: NDArray[np.float32] | None = None,
    ) -> Recommendations:
        return Recommendations(
            item_ids=self.item_ids[np.maximum(idx, 0)]
            if idx.size
            else np.empty(idx.shape, dtype=self.item_ids.dtype),
            scores=scores,
            item_idx=idx,
            unknown_items=tuple(unknown),
            confidence=confidence,
        )

    def recommend(
        self,
        user_ids: Sequence[Any],
        k: int = 20,
        *,
        exclude_seen: bool = True,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> Recommendations:
        """Top-K items for training users, from their stored histories.

        Args:
            user_ids: External ids of users seen in training, one result row per id; a single
                id (an int or a str) is one user, giving one row.
            k: Items per user (capped at the catalog size).
            exclude_seen: Leave out items in the user's history.
            explore: Rank from a posterior sample of z instead of its mean (Thompson-style);
                the scores are then the sampled logits.
            temperature: With ``explore``, the posterior's sigma is scaled by this (0 gives the
                deterministic ranking). Ignored otherwise.
            seed: With ``explore``, seeds the sample: the same call gives the same result.
                None draws a fresh seed. Ignored otherwise.

        Returns:
            The top-K lists, with ``confidence`` filled for a variational model.

        Raises:
            UnknownUserError: a user id is not a training user (the message says so when its
                type differs from the vocabulary's: ``"494"`` for int ids).
            TypeError: ``user_ids`` is neither an id nor a sequence of ids.
            ValueError: ``k < 1``, a bad ``temperature`` or ``seed``, or ``explore`` with a
                model that has no posterior.
        """
        users = _user_list(user_ids)
        rows = np.asarray([self.vocab.user_index(u) for u in users], dtype=np.int64)
        histories = self.train_matrix[rows]
        idx, scores, confidence = self._topk(
            histories,
            k,
            exclude_seen=exclude_seen,
            explore=explore,
            temperature=temperature,
            seed=seed,
        )
        return self._package(idx, scores, confidence=confidence)

    def recommend_from_history(
        self,
        item_ids: Sequence[Any],
        k: int = 20,
        *,
        exclude_seen: bool = True,
        exclude: Sequence[Any] = (),
        weights: Sequence[float] | None = None,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> Recommendations:
        """Top-K for one (possibly new) user's history, folded in without retraining.

        Unknown item ids are ignored and reported in ``unknown_items``. ``explore``,
        ``temperature`` and ``seed`` work as in :meth:`recommend`.

        Args:
            item_ids: The history, a sequence of external item ids (a list, array or 1-d
                tensor; not a single id).
            k: Items to return.
            exclude_seen: Leave out the history's own items.
            exclude: Item ids never to return.
            weights: One non-negative weight per history item (default 1.0 each).
            explore: See :meth:`recommend`.
            temperature: See :meth:`recommend`.
            seed: See :meth:`recommend`.

        Raises:
            TypeError: ``item_ids``, ``exclude`` or ``weights`` is a str/bytes, a scalar or not
                a sequence.
            ValueError: as for :meth:`recommend_histories`, including ids that are all unknown
                because they are of the other type (str for an int vocabulary, or the reverse).
        """
        items = _id_list("item_ids", item_ids)
        excluded = _id_list("exclude", exclude)
        item_weights = None if weights is None else _weight_list("weights", weights)
        return self.recommend_histories(
            [items],
            k,
            exclude_seen=exclude_seen,
            exclude=[excluded],
            weights=None if item_weights is None else [item_weights],
            explore=explore,
            temperature=temperature,
            seed=seed,
        )

    def recommend_histories(
        self,
        histories: Sequence[Sequence[Any]],
        k: int = 20,
        *,
        exclude_seen: bool = True,
        exclude: Sequence[Sequence[Any]] | None = None,
        weights: Sequence[Sequence[float] | None] | None = None,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> Recommendations:
        """Top-K for a batch of histories (lists of external item ids), scored as one batch.

        ``explore``, ``temperature`` and ``seed`` work as in :meth:`recommend`; with a seed the
        whole batch's draw is reproducible (a user's sample depends on its row in the batch).
        ``exclude`` and ``weights`` hold one row per history.

        Raises:
            ValueError: ``exclude`` or ``weights`` has another number of rows than
                ``histories``, or as for :meth:`histories_matrix` and :meth:`recommend`.
            TypeError: as for :meth:`histories_matrix`.
        """
        check_exploration(temperature, seed)
        matrix, unknown = self.histories_matrix(histories, weights)
        exclude_idx = None
        if exclude is not None:
            exclude_rows = _rows("exclude", exclude)
            if len(exclude_rows) != matrix.shape[0]:
                raise ValueError(
                    f"exclude has {len(exclude_rows)} rows for {matrix.shape[0]} histories"
                )
            exclude_idx = []
            not_known: list[Any] = []
            for row, raw in enumerate(exclude_rows):
                where = f"exclude[{row}]"
                known: list[int] = []
                for item in _id_list(where, raw):
                    position = self._item_position(where, item)
                    if position is None:
                        not_known.append(item)
                    else:
                        known.append(position)
                exclude_idx.append(known)
            self._check_id_types("exclude: ", not_known, n_known=sum(map(len, exclude_idx)))
        idx, scores, confidence = self._topk(
            matrix,
            k,
            exclude_seen=exclude_seen,
            exclude=exclude_idx,
            explore=explore,
            temperature=temperature,
            seed=seed,
        )
        return self._package(idx, scores, unknown, confidence)

    def user_history(self, user_id: Any) -> NDArray[Any]:
        """External item ids of a training user's history.

        Raises:
            UnknownUserError: not a training user.
        """
        return self.item_ids[self.vocab.history(self.vocab.user_index(user_id))]

    def has_user(self, user_id: Any) -> bool:
        try:
            self.vocab.user_index(user_id)
        except UnknownUserError:
            return False
        return True

    def item_popularity(self) -> NDArray[np.int64]:
        """Training interaction count per item."""
        return self.vocab.item_counts()

    def popularity_ranking(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """The ranking of the popularity fallback (see :meth:`popular_items`), computed once.

        Returns:
            ``(order, share)``: ``(n_items,)`` item positions, most popular first (ties by
            lower position), and ``(n_items,)`` float32 per item the share of training users
            who interacted with it. Treat both as read-only.
        """
        cached = self._popularity
        if cached is None:
            counts = self.item_popularity()
            # Stable sort of negated counts: most popular first, ties by lower item position.
            order = np.argsort(-counts, kind="stable").astype(np.int64)
            share = (counts / max(1, self.vocab.n_users)).astype(np.float32)
            cached = self._popularity = (order, share)
        return cached

    def popular_items(
        self, k: int, *, exclude_idx: Sequence[int] | NDArray[np.integer[Any]] = ()
    ) -> list[tuple[Any, float]]:
        """The popularity fallback: the ``k`` most popular training items, best first.

        What a history with no known item gets instead of model scores, so that the HTTP API
        (``fallback: "popularity"``) and ``recvae recommend`` give it the same answer: the
        items by training interaction count, ties by lower item position, each scored by the
        share of training users who interacted with it (in [0, 1], not a model score).

        Args:
            k: Items to return (fewer when fewer items are eligible).
            exclude_idx: Item positions never to return.

        Returns:
            ``(item_id, share)`` pairs, most popular first.

        Raises:
            ValueError: ``k`` is not an int >= 1.
        """
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        order, share = self.popularity_ranking()
        if len(exclude_idx):
            keep = np.ones(self.n_items, dtype=bool)
            keep[np.asarray(exclude_idx, dtype=np.int64)] = False
            order = order[keep[order]]
        top = order[: int(k)]
        ids = self.item_ids[top].tolist()
        return list(zip(ids, share[top].tolist(), strict=True))

    # ------------------------------------------------------------------ VAE capabilities
    def _variational(self) -> bool:
        return bool(getattr(self.model, "variational", False))

    def _as_history_matrix(
        self, histories: sp.csr_array | sp.csr_matrix | NDArray[Any] | Sequence[Sequence[Any]]
    ) -> tuple[sp.csr_array, tuple[tuple[Any, ...], ...]]:
        """A CSR matrix (checked) from a matrix or from lists of external item ids."""
        if sp.issparse(histories) or isinstance(histories, np.ndarray):
            # float64 first: float32 would overflow (or flush to 0) weights that, rescaled
            # below, are fine; a copy, so that the caller's matrix is never changed.
            matrix = sp.csr_array(histories, dtype=np.float64, copy=True)
            if matrix.ndim != 2 or matrix.shape[1] != self.n_items:
                raise ValueError(
                    f"histories must have shape (n, {self.n_items}), got {matrix.shape}"
                )
            if matrix.nnz and (not np.all(np.isfinite(matrix.data)) or matrix.data.min() < 0):
                raise ValueError(_HISTORY_VALUES)
            # Canonical rows: a duplicate entry is one item (the dense view sums it), a stored
            # zero none (it must not count towards a history's length).
            matrix.sum_duplicates()
            matrix.eliminate_zeros()
            rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
            data = safe_row_weights(rows, np.asarray(matrix.data), matrix.shape[0])
            return sp.csr_array((data, matrix.indices, matrix.indptr), shape=matrix.shape), ()
        if isinstance(histories, str | bytes):
            raise ValueError("histories must be a matrix or a sequence of item-id sequences")
        for row, items in enumerate(histories):
            if isinstance(items, str | bytes) or not isinstance(items, Sequence | np.ndarray):
                raise ValueError(
                    f"history {row} must be a sequence of item ids, got {type(items).__name__}"
                )
        matrix, unknown = self.histories_matrix(histories)
        return matrix, tuple(unknown)

    def _exploration_generator(
        self, explore: bool, temperature: float, seed: int | None
    ) -> torch.Generator | None:
        check_exploration(temperature, seed)
        if not explore:
            return None
        if not self._variational():
            raise ValueError(
                "explore needs a model with a posterior (multvae or recvae); "
                f"'{self.config.model}' has none"
            )
        return make_generator(seed)

    def _score_with_confidence(
        self,
        histories: sp.csr_array | NDArray[Any] | torch.Tensor,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, NDArray[np.float32] | None]:
        """Logits from ``z = mu`` (or a tempered sample with a generator), and the confidence."""
        self.model.eval()
        with torch.inference_mode():
            x = self._dense(histories)  # (batch, n_items)
            model = as_latent_model(self.model)
            mu, logvar = model.encode(x)  # (batch, latent) each
            z = mu
            if generator is not None:
                assert logvar is not None  # checked by _exploration_generator
                z = sample_latent(mu, logvar, temperature=temperature, generator=generator)
            logits = model.decode(z).float()  # (batch, n_items)
            confidence = None if logvar is None else posterior_confidence(logvar).cpu().numpy()
        return logits, None if confidence is None else confidence.astype(np.float32)

    def score_sampled(
        self,
        histories: sp.csr_array | NDArray[Any] | torch.Tensor,
        *,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Scores of every item from a tempered posterior sample of z (the ``explore`` ranking).

        ``z = mu + temperature * sigma * eps``; temperature 0 equals :meth:`score`.

        Args:
            histories: ``(n_users, n_items)`` histories.
            temperature: Scale of the posterior's sigma (>= 0).
            seed: Seeds ``eps``; None draws a fresh seed.

        Returns:
            ``(n_users, n_items)`` float32 logits on the model's device (seen items not masked).

        Raises:
            ValueError: bad ``temperature``/``seed``, a model without a posterior, or malformed
                histories (as for :meth:`score`).
        """
        generator = self._exploration_generator(True, temperature, seed)
        scores, _ = self._score_with_confidence(
            histories, temperature=temperature, generator=generator
        )
        return scores

    def confidence(
        self, histories: sp.csr_array | sp.csr_matrix | NDArray[Any] | Sequence[Sequence[Any]]
    ) -> NDArray[np.float32]:
        """Posterior confidence ``1 - mean_d min(sigma_d, 1)`` of each history, in [0, 1].

        The same value ``Recommendations.confidence`` carries.

        Args:
            histories: A ``(n_users, n_items)`` matrix, or lists of external item ids (unknown
                ids are dropped).

        Returns:
            ``(n_users,)`` float32.

        Raises:
            ValueError: the model has no posterior (Mult-DAE), or the histories are malformed.
        """
        if not self._variational():
            raise ValueError(
                f"confidence needs a model with a posterior (multvae or recvae); "
                f"'{self.config.model}' has none"
            )
        matrix, _ = self._as_history_matrix(histories)
        out: list[NDArray[np.float32]] = [np.zeros(0, dtype=np.float32)]
        for start in range(0, matrix.shape[0], 4096):
            _, conf = self._score_with_confidence(matrix[start : start + 4096])
            assert conf is not None
            out.append(conf)
        return np.concatenate(out)

    def _elbo_terms(
        self, matrix: sp.csr_array, batch_size: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        reconstruction: list[NDArray[np.float64]] = [np.zeros(0)]
        kl: list[NDArray[np.float64]] = [np.zeros(0)]
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, matrix.shape[0], batch_size):
                x = self._dense(matrix[start : start + batch_size])  # (batch, n_items)
                rec_term, kl_term = negative_elbo_terms(self.model, x)  # (batch,) each
                reconstruction.append(rec_term.double().cpu().numpy())
                kl.append(kl_term.double().cpu().numpy())
        return np.concatenate(reconstruction), np.concatenate(kl)

    def _raw_anomaly_scores(
        self, matrix: sp.csr_array, batch_size: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
        reconstruction, kl = self._elbo_terms(matrix, batch_size)
        total = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        lengths = np.diff(sp.csr_array(matrix).indptr).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = np.where(total > 0, (reconstruction + kl) / total, np.nan)
        return scores, reconstruction, kl, lengths

    def anomaly_reference(self, source: str = "auto") -> AnomalyReference:
        """The length-stratified reference that anomaly percentiles compare with (cached).

        Two reference populations exist (each as full histories plus one random sub-history per
        user, see :func:`recvae.vae_tools.reference_histories`):

        - ``"training"``: the training users (at most 20,000, a seeded sample), scored from the
          stored training matrix on first use; call this once after loading (e.g. in a server's
          start-up) so that the first request does not pay for it. The model was fitted to these
          users, so they score lower than new users of the same population: against them, a new
          normal user's median percentile is well above 50. It is the right reference for
          training users themselves (the nightly job's exclusion).
        - ``"held-out"``: held-out users, set by :meth:`calibrate_anomalies` and kept in
          ``meta["anomaly_reference"]`` (so saved with the bundle). Calibrated for new users.

        ``"auto"`` picks ``"held-out"`` when the recommender has it, else ``"training"``.

        Args:
            source: ``"auto"``, ``"training"`` or ``"held-out"``.

        Raises:
            ValueError: an unknown source, no held-out calibration when ``"held-out"`` is asked
                for, a malformed ``meta["anomaly_reference"]``, or no training users.
        """
        resolved = self.anomaly_reference_source(source)
        if resolved == "held-out":
            return AnomalyReference.from_dict(self.meta["anomaly_reference"])
        with self._anomaly_lock:
            if self._anomaly_reference is None:
                if self.train_matrix.nnz == 0:
                    raise ValueError(
                        "anomaly percentiles need the training users' histories, "
                        "but this recommender has none"
                    )
                self._anomaly_reference = self._build_anomaly_reference(
                    self.train_matrix, source="training", seed=0
                )
            return self._anomaly_reference

    def _build_anomaly_reference(
        self, matrix: sp.csr_array, *, source: str, seed: int
    ) -> AnomalyReference:
        histories, n_users = reference_histories(matrix, seed=seed)
        scores, _, _, lengths = self._raw_anomaly_scores(histories, 1024)
        reference = AnomalyReference.from_scores(scores, lengths, source=source, n_users=n_users)
        logger.info(
            "anomaly reference (%s): %d users, %d histories, median score %.4f",
            source,
            n_users,
            histories.shape[0],
            reference.median_score,
        )
        return reference

    def anomaly_reference_source(self, source: str = "auto") -> str:
        """Which reference ``source`` resolves to: ``"training"`` or ``"held-out"``.

        Raises:
            ValueError: an unknown source, or ``"held-out"`` without a calibration.
        """
        if source not in ("auto", "training", "held-out"):
            raise ValueError(f"reference must be auto, training or held-out, got {source!r}")
        calibrated = "anomaly_reference" in self.meta
        if source == "held-out" and not calibrated:
            raise ValueError(
                "no held-out anomaly reference: call calibrate_anomalies(held-out histories) "
                "before saving the bundle"
            )
        if source == "auto":
            return "held-out" if calibrated else "training"
        return source

    def calibrate_anomalies(
        self,
        histories: sp.csr_array | sp.csr_matrix | NDArray[Any] | Sequence[Sequence[Any]],
        *,
        seed: int = 0,
    ) -> None:
        """Make held-out users the anomaly reference: percentiles then suit new users.

        Scores ``histories`` (users the model was not trained on, e.g. the validation users'
        fold-in plus targets) with one random sub-history each, and stores the length-binned
        quantiles in ``meta["anomaly_reference"]`` (about 20 KB), which :meth:`save` writes to
        ``meta.json``: no format change, an old bundle simply has no such key. Call it after the
        final weights are set; it describes these weights only.

        Args:
            histories: Held-out users' histories (matrix or lists of external item ids).
            seed: Seed of the sub-history sampling.

        Raises:
            ValueError: malformed histories, or fewer than 20 non-empty histories.
        """
        matrix, _ = self._as_history_matrix(histories)
        n_users = int((np.diff(matrix.indptr) > 0).sum())
        if n_users < 20:
            raise ValueError(
                f"calibrating anomaly percentiles needs at least 20 non-empty histories, "
                f"got {n_users}"
            )
        from recvae.config import _check_seed

        reference = self._build_anomaly_reference(matrix, source="held-out", seed=_check_seed(seed))
        self.meta["anomaly_reference"] = reference.to_dict()

    def anomaly_scores(
        self,
        histories: sp.csr_array | sp.csr_matrix | NDArray[Any] | Sequence[Sequence[Any]],
        *,
        reference: str = "auto",
        batch_size: int = 1024,
    ) -> AnomalyScores:
        """How unusual each history is under the model: negative ELBO per item and percentile.

        ``score = (reconstruction NLL at z = mu + KL(q(z|x) || N(0, I))) / sum_i x_i`` (nats per
        history item; for Mult-DAE the KL term is 0), and its percentile among reference
        histories of a similar length (:meth:`anomaly_reference`). Higher is more unusual. Rank
        by percentile to compare users of different lengths: the score itself runs higher for
        short histories (the KL term is a near-fixed cost spread over few items). An empty
        history (after dropping unknown items) gets NaN.

        Args:
            histories: A ``(n_users, n_items)`` matrix over the model's items (binary, or
                non-negative weights), or lists of external item ids (unknown ids dropped and
                reported).
            reference: Percentiles against ``"training"`` users, ``"held-out"`` users (see
                :meth:`calibrate_anomalies`) or ``"auto"`` (held-out when available).
            batch_size: Users scored per forward pass.

        Returns:
            The scores, percentiles, history lengths, the two ELBO terms and the reference used.

        Raises:
            ValueError: malformed histories, a bad ``batch_size`` or ``reference``, or no
                reference to compute percentiles against.
        """
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        source = self.anomaly_reference_source(reference)
        matrix, unknown = self._as_history_matrix(histories)
        reference_model = self.anomaly_reference(source)
        scores, reconstruction, kl, lengths = self._raw_anomaly_scores(matrix, int(batch_size))
        return AnomalyScores(
            scores=scores,
            percentiles=reference_model.percentiles(scores, lengths),
            history_lengths=lengths,
            reconstruction=reconstruction,
            kl=kl,
            unknown_items=unknown,
            reference=source,
        )

    # ------------------------------------------------------------------ bundle
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the bundle directory atomically (temp dir, then rename).

        Layout: ``config.json``, ``weights.pt`` (a state_dict), ``user_ids.json``,
        ``item_ids.json``, ``train_matrix.npz``, ``meta.json`` (format version, package version,
        creation time, metrics, data fingerprint, sha256 of every other file).

        ``~`` in ``path`` is expanded. The directory gets the mode a plain ``mkdir`` gets under
        the current umask (readable by other users with the usual 022), so that a server
        running under another account can load it.

        Args:
            path: The bundle directory to create.
            overwrite: Replace an existing bundle at ``path``. Only a directory that holds a
                recvae bundle (its ``meta.json``) is replaced; anything else is left alone.

        Returns:
            The bundle path.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False, or ``path`` exists and
                is not a recvae bundle (a file, or a directory without a bundle's
                ``meta.json``); nothing is written then.
        """
        from recvae import __version__

        target = Path(path).expanduser()
        if target.name in ("", ".", ".."):
            target = target.resolve()
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"bundle path already exists: {target} (pass overwrite=True)")
            if not target.is_dir():
                raise FileExistsError(
                    f"{target} exists and is not a recvae bundle (it is a file, not a bundle "
                    "directory); overwrite=True replaces only a bundle, so nothing was changed"
                )
            if not _is_bundle(target):
                raise FileExistsError(
                    f"{target} exists and is not a recvae bundle (no bundle meta.json in it); "
                    "overwrite=True replaces only a bundle, so nothing was changed"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(target.parent, prefix=f".{target.name}.")
        try:
            (tmp / "config.json").write_text(self.config.to_json())
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save(state, tmp / "weights.pt")
            _write_ids(tmp / "user_ids.json", self.user_ids)
            _write_ids(tmp / "item_ids.json", self.item_ids)
            sp.save_npz(tmp / "train_matrix.npz", sp.csr_matrix(self.train_matrix))
            checksums = {name: _sha256(tmp / name) for name in _BUNDLE_FILES}
            version = _content_version(checksums)
            meta = {
                **_jsonable(self.meta),
                "format_version": BUNDLE_FORMAT_VERSION,
                "package_version": __version__,
                "model": self.config.model,
                "n_items": self.n_items,
                "n_users": self.vocab.n_users,
                "created_at": self.meta.get("created_at")
                or datetime.now(UTC).isoformat(timespec="seconds"),
                "checksums": checksums,
                "model_version": version,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            # On the disk before the name: a power loss must not leave a bundle of empty files.
            _durable.fsync_tree(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
            _durable.fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta.update({"model_version": version, "created_at": meta["created_at"]})
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> Recommender:
        """Load and verify a bundle written by :meth:`save`.

        ``version`` is the content id recomputed from the verified checksums; a ``meta.json``
        whose ``model_version``, ``model``, ``n_items`` or ``n_users`` disagrees with the
        files is refused. ``~`` in ``path`` is expanded.

        Raises:
            BundleError: the path is not a bundle, a file is missing or altered (checksum),
                ``meta.json`` disagrees with the files, the format version is unknown, or the
                weights do not fit the config.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            previous = root.with_name(f".{root.name}.old")
            if not root.exists() and (previous / "meta.json").is_file():
                # save() moves the old bundle aside, then renames the new one in: a crash
                # between the two renames leaves only the old one, under this name.
                raise BundleError(
                    f"no model bundle at {root}: a save that was replacing it was interrupted; "
                    f"the previous bundle is intact at {previous} (rename it back to use it)"
                )
            raise BundleError(f"no model bundle at {root} (expected a directory)")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise BundleError(f"{root} is not a recvae bundle: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} is not a bundle's metadata (a JSON object)")
        fmt = meta.get("format_version")
        if fmt != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle {root} has format_version {fmt!r}; this recvae reads version "
                f"{BUNDLE_FORMAT_VERSION}"
            )
        checksums = meta.get("checksums") or {}
        if not isinstance(checksums, dict):
            raise BundleError(f"bundle {root} is corrupted: checksums in meta.json is not a map")
        for name in _BUNDLE_FILES:
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle {root} is incomplete: {name} is missing")
            if checksums.get(name) != _sha256(file):
                raise BundleError(f"bundle {root} is corrupted: checksum of {name} does not match")
        # meta.json itself has no checksum: its fixed fields are checked against the
        # checksummed files, so that ``version`` always names this content.
        version = _content_version(checksums)
        stated = meta.setdefault("model_version", version)
        if stated != version:
            raise BundleError(
                f"bundle {root} is corrupted: meta.json says model_version {stated!r}, but the "
                f"files' content id is {version!r}"
            )
        try:
            config = config_from_dict(json.loads((root / "config.json").read_text()))
            item_ids = _read_ids(root / "item_ids.json")
            user_ids = _read_ids(root / "user_ids.json")
            train_matrix = sp.csr_array(sp.load_npz(root / "train_matrix.npz"))
            state = torch.load(root / "weights.pt", map_location="cpu", weights_only=True)
            model = build_model(config, len(item_ids))
            model.load_state_dict(state)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"bundle {root} could not be loaded: {exc}") from exc
        actual = {"model": config.model, "n_items": len(item_ids), "n_users": len(user_ids)}
        for key, value in actual.items():
            if key in meta and meta[key] != value:
                raise BundleError(
                    f"bundle {root} is corrupted: meta.json says {key}={meta[key]!r}, but the "
                    f"bundle's files give {value!r}"
                )
        rec = cls(model, config, item_ids, user_ids=user_ids, train_matrix=train_matrix, meta=meta)
        return rec.to(device)

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The bundle's ``meta.json`` without loading the model (not verified: see :meth:`load`).

        Raises:
            BundleError: ``path`` is not a bundle directory, or its ``meta.json`` is missing or
                not a JSON object.
        """
        meta_path = Path(path).expanduser() / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(f"{path} is not a recvae bundle: meta.json is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path} is not a bundle's metadata (a JSON object)")
        return meta


def _dedupe_max(
    matrix: sp.csr_array,
    rows: NDArray[np.int64],
    cols: NDArray[np.int64],
    vals: NDArray[np.float32],
) -> sp.csr_array:
    if matrix.nnz == len(rows):
        return matrix
    order = np.lexsort((-vals, cols, rows))
    r, c, v = rows[order], cols[order], vals[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    out = sp.csr_array((v[first], (r[first], c[first])), shape=matrix.shape, dtype=np.float32)
    out.sort_indices()
    return out


def _content_version(checksums: dict[str, Any]) -> str:
    """The bundle's content id: a short sha256 over the checksums of its files, in order."""
    joined = "".join(str(checksums[name]) for name in _BUNDLE_FILES)
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def _is_bundle(path: Path) -> bool:
    """Whether ``path`` is a directory whose ``meta.json`` reads as a recvae bundle's."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and "checksums" in meta


def _make_temp_dir(parent: Path, *, prefix: str) -> Path:
    """A new, empty directory in ``parent``, made by ``mkdir`` so that it gets the umask's mode.

    (``tempfile.mkdtemp`` makes it 0700, which a server under another account cannot read.)
    """
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary directory in {parent}")


def _rows(name: str, value: Any) -> list[Any]:
    """One entry per history from a batch argument (a sequence of rows).

    Raises:
        TypeError: ``value`` is a str/bytes, a sparse matrix, a mapping or not iterable.
    """
    if isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a sequence of item-id sequences, not a str/bytes")
    if sp.issparse(value):
        raise TypeError(
            f"{name} must be a sequence of item-id sequences, got a sparse matrix "
            "(score a matrix with score(), or pass lists of item ids)"
        )
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        raise TypeError(f"{name} must be a sequence of item-id sequences, got a scalar")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a sequence of item-id sequences, got {type(value).__name__}"
        )
    return list(value)


def _id_list(name: str, value: Any) -> list[Any]:
    """A sequence of item ids as a list; tensors, arrays and their 0-d items become scalars.

    Raises:
        TypeError: ``value`` is a str/bytes (which would be read character by character), a
            scalar, a sparse matrix, a mapping, or not iterable.
    """
    if isinstance(value, str | bytes):
        raise TypeError(
            f"{name} must be a sequence of item ids, not a {type(value).__name__} (it would be "
            f"read character by character): wrap one id in a list, e.g. [{value!r}]"
        )
    if isinstance(value, torch.Tensor | np.ndarray):
        return _array_list(name, value, "item ids")
    if type(value) is list and set(map(type, value)) <= {int, str}:
        return value  # the common case (JSON ids), without a conversion per id
    if sp.issparse(value) or isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a sequence of item ids, got {type(value).__name__}"
            + ("" if sp.issparse(value) or isinstance(value, Mapping) else f" {value!r}")
        )
    return [_scalar(item) for item in value]


def _array_list(name: str, value: torch.Tensor | np.ndarray, what: str) -> list[Any]:
    """A one-dimensional tensor or array as a list of Python scalars."""
    if value.ndim != 1:
        raise TypeError(
            f"{name} must be a one-dimensional sequence of {what}, got an array of shape "
            f"{tuple(value.shape)}"
        )
    return list(value.tolist())


def _weight_list(name: str, value: Any) -> list[Any] | None:
    """One history's weights as a list (None stays None: weight 1.0 each).

    Raises:
        TypeError: ``value`` is a str/bytes, a scalar or not a sequence.
    """
    if value is None:
        return None
    if isinstance(value, str | bytes) or sp.issparse(value) or isinstance(value, Mapping):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(value).__name__}")
    if isinstance(value, torch.Tensor | np.ndarray):
        return _array_list(name, value, "numbers")
    if not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a sequence of numbers (one per item), got "
            f"{type(value).__name__} {value!r}"
        )
    return [_scalar(w) for w in value]


def _user_list(value: Any) -> list[Any]:
    """``recommend``'s users: a single id is one user; a sequence gives one row per id.

    Raises:
        TypeError: ``value`` is None, a sparse matrix, a mapping, a multi-dimensional array or
            not iterable.
    """
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.ndim == 0:
            return [value.item()]
        if value.ndim != 1:
            raise TypeError(
                f"user_ids must be a user id or a one-dimensional sequence of them, got shape "
                f"{tuple(value.shape)}"
            )
        return list(value.tolist())
    if _id_kind(value) is not None:
        return [_scalar(value)]
    if sp.issparse(value) or isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(
            f"user_ids must be a user id (int or str) or a sequence of them, got "
            f"{type(value).__name__}"
        )
    return [_scalar(u) for u in value]


def _scalar(value: Any) -> Any:
    """A 0-d tensor or array, or a NumPy scalar, as a Python scalar; anything else unchanged."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        return value.item()
    return _py(value)


def safe_row_weights(
    rows: NDArray[np.int64], weights: NDArray[np.float64], n_rows: int
) -> NDArray[np.float32]:
    """Entry weights as float32, each row divided by its largest weight when its L2 norm lies
    outside ``_SAFE_NORM``.

    The models L2-normalize a history, so only relative weights matter; but float32 squares
    overflow above about 1.8e19 and vanish below about 1e-23, and such a history would be
    scored as if it were empty. Rows inside the range keep their weights exactly.

    Args:
        rows: Row of each entry, non-decreasing.
        weights: Non-negative float64 weight of each entry.
        n_rows: Number of rows.

    Returns:
        The float32 weights, entry for entry.
    """
    counts = np.bincount(rows, minlength=n_rows)
    peak = np.ones(n_rows, dtype=np.float64)
    present = np.flatnonzero(counts)
    if len(present):
        starts = (np.cumsum(counts) - counts)[present]
        peak[present] = np.maximum.reduceat(weights, starts)
    peak[peak <= 0] = 1.0  # an all-zero row: nothing to rescale, never divide by zero
    scaled = weights / peak[rows]
    norm = peak * np.sqrt(np.bincount(rows, weights=np.square(scaled), minlength=n_rows))
    rescale = (norm < _SAFE_NORM[0]) | (norm > _SAFE_NORM[1])
    return np.where(rescale[rows], scaled, weights).astype(np.float32)


def _safe_rows_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, each row whose L2 norm lies outside ``_SAFE_NORM`` divided by its
    largest value first (in float64): the rule of :func:`safe_row_weights` for a dense tensor.
    """
    if not x.numel():
        return x.to(torch.float32)
    x64 = x.to(torch.float64)  # (batch, n_items)
    peak = x64.amax(dim=1, keepdim=True)  # (batch, 1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = peak * torch.linalg.vector_norm(x64 / peak, dim=1, keepdim=True)  # (batch, 1)
    rescale = (norm < _SAFE_NORM[0]) | (norm > _SAFE_NORM[1])
    if not bool(rescale.any()):
        return x.to(torch.float32)
    return torch.where(rescale, x64 / peak, x64).to(torch.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_ids(path: Path, ids: NDArray[Any]) -> None:
    kind = "str" if ids.dtype == object else "int"
    values = [str(v) for v in ids.tolist()] if kind == "str" else [int(v) for v in ids.tolist()]
    path.write_text(json.dumps({"kind": kind, "ids": values}))


def _read_ids(path: Path) -> NDArray[Any]:
    data = json.loads(path.read_text())
    if data.get("kind") == "str":
        return np.asarray(data["ids"], dtype=object)
    return np.asarray(data["ids"], dtype=np.int64)


def _jsonable(value: Any) -> Any:
    """Make metadata JSON-safe (numpy scalars/arrays, tuples, NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
