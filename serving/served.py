"""One loaded model with everything a request needs precomputed.

A :class:`ServedModel` is immutable once built: the recommender plus caches derived from it (the
popularity ranking for the fallback, L2-normalized item embeddings for similar items, the anomaly
references of ``POST /v1/anomaly``, cached on the recommender) and where it came from. A reload
builds a new one and swaps the reference (``serving/state.py``), so a request that took a
reference keeps a consistent model, caches included, until it finishes.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from recvae.evaluation import topk_indices
from recvae.model import SparseBatch
from recvae.recommender import BundleError, Recommender, safe_row_weights
from recvae.vae_tools import (
    check_exploration,
    make_generator,
    posterior_confidence,
    sample_latent,
)

__all__ = ["ServedModel", "HistoryResult", "UnknownItemError", "IdKind"]

logger = logging.getLogger(__name__)

IdKind = Literal["int", "str"]
_CHUNK = 1024  # histories scored together: bounds the (chunk, n_items) score matrix
_INT_RE = re.compile(r"-?[0-9]{1,19}")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class UnknownItemError(KeyError):
    """An item id is not in the served model's vocabulary."""


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """The answer for one history.

    Attributes:
        items: ``(item_id, score)`` pairs, best first.
        unknown_items: History items the model does not know, as the client sent them.
        fallback: ``"popularity"`` when no history item was known and the most popular training
            items were returned instead of model scores; None otherwise.
        mu: Posterior mean of the history's latent code (only when asked for).
        sigma: Posterior standard deviation (only when asked for; zeros for Mult-DAE).
        confidence: Posterior confidence ``1 - mean_d min(sigma_d, 1)`` in [0, 1] (see
            ``recvae.vae_tools``); None for a model without a posterior (Mult-DAE). Under the
            popularity fallback, the confidence of the empty history.
    """

    items: list[tuple[Any, float]]
    unknown_items: list[Any]
    fallback: Literal["popularity"] | None = None
    mu: list[float] | None = None
    sigma: list[float] | None = None
    confidence: float | None = None


def _id_kind(ids: NDArray[Any]) -> IdKind:
    return "str" if ids.dtype == object else "int"


def coerce_id(value: Any, kind: IdKind) -> Any:
    """Turn a client's id into the vocabulary's type when that is unambiguous.

    Integer vocabularies accept decimal strings (``"42"`` -> ``42``); string vocabularies accept
    integers (``42`` -> ``"42"``). Anything else is returned unchanged (and will be unknown).

    Args:
        value: The id from the request (an int or a str).
        kind: The vocabulary's id type.

    Returns:
        The id to look up.
    """
    if kind == "int":
        if isinstance(value, str) and _INT_RE.fullmatch(value):
            number = int(value)
            if _INT64_MIN <= number <= _INT64_MAX:
                return number
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


@dataclass(frozen=True, eq=False)
class ServedModel:
    """A recommender with its serving caches and provenance.

    Build with :meth:`build`, which also verifies the model produces finite scores.

    Attributes:
        recommender: The loaded model.
        source: The bundle path or model URI it came from.
        registry_version: The MLflow registry version, when loaded from the registry.
        loaded_at: When this process loaded it (UTC).
        item_kind: Type of the item ids (``"int"`` or ``"str"``).
        user_kind: Type of the user ids.
        unit_item_embeddings: ``(n_items, d)`` L2-normalized decoder item embeddings.
        item_lookup: External item id -> position (a plain dict, for the hot path).
        sorted_item_ids: The item ids sorted (vectorized lookup of integer ids).
        sorted_item_positions: Their positions.
        empty_mu: Posterior mean of the empty history (returned with the fallback).
        empty_sigma: Its standard deviation.
        empty_confidence: Its posterior confidence (None without a posterior).
        variational: Whether the model has a posterior (Mult-VAE, RecVAE): confidence and
            exploration need one.
    """

    recommender: Recommender
    source: str
    registry_version: str | None
    loaded_at: datetime
    item_kind: IdKind
    user_kind: IdKind
    unit_item_embeddings: torch.Tensor
    item_lookup: dict[Any, int]
    sorted_item_ids: NDArray[Any]
    sorted_item_positions: NDArray[np.int64]
    empty_mu: list[float]
    empty_sigma: list[float]
    empty_confidence: float | None
    variational: bool

    @classmethod
    def build(
        cls, recommender: Recommender, *, source: str, registry_version: str | None = None
    ) -> ServedModel:
        """Precompute the caches and check the model.

        Args:
            recommender: A loaded recommender.
            source: Where it came from (shown by ``GET /v1/model``).
            registry_version: MLflow registry version, if any.

        Returns:
            The served model.

        Raises:
            BundleError: the model has non-finite parameters or produces non-finite scores.
        """
        # The model's type is only known as nn.Module: encode/decode/item_embeddings are the
        # contract of recvae's autoencoders.
        model: Any = recommender.model.eval()
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise BundleError(f"model from {source} has non-finite parameters: {', '.join(bad)}")
        n_items = recommender.n_items
        # The fallback's ranking is the library's (recvae recommend gives the same answer),
        # computed here once so that no request pays for it.
        recommender.popularity_ranking()
        with torch.inference_mode():
            embeddings = model.item_embeddings().detach().float()  # (n_items, d)
            unit = F.normalize(embeddings, p=2.0, dim=1).contiguous()
            # A smoke test: the empty history and the first training user must score finitely.
            probe = torch.zeros((2, n_items), dtype=torch.float32)
            if recommender.vocab.n_users:
                probe[1, recommender.vocab.history(0)] = 1.0
            scores = recommender.score(probe)  # (2, n_items)
        if not bool(torch.isfinite(scores).all()):
            raise BundleError(f"model from {source} produces non-finite scores")
        empty_mu, empty_sigma = recommender.encode(probe[:1])  # each (1, latent_dim)
        with torch.inference_mode():
            _, empty_logvar = model.encode(probe[:1])  # (1, latent_dim), None for Mult-DAE
        empty_confidence = (
            None if empty_logvar is None else float(posterior_confidence(empty_logvar)[0])
        )
        _warm_anomaly_references(recommender, source)
        id_order = np.argsort(recommender.item_ids, kind="stable").astype(np.int64)
        return cls(
            recommender=recommender,
            source=source,
            registry_version=registry_version,
            loaded_at=datetime.now(UTC),
            item_kind=_id_kind(recommender.item_ids),
            user_kind=_id_kind(recommender.user_ids),
            unit_item_embeddings=unit,
            item_lookup={v: i for i, v in enumerate(recommender.item_ids.tolist())},
            sorted_item_ids=recommender.item_ids[id_order],
            sorted_item_positions=id_order,
            empty_mu=empty_mu[0].tolist(),
            empty_sigma=empty_sigma[0].tolist(),
            empty_confidence=empty_confidence,
            variational=bool(getattr(model, "variational", False)),
        )

    # ------------------------------------------------------------------ properties
    @property
    def version(self) -> str:
        return self.recommender.version

    @property
    def n_items(self) -> int:
        return self.recommender.n_items

    @property
    def n_users(self) -> int:
        return self.recommender.vocab.n_users

    @property
    def meta(self) -> dict[str, Any]:
        return self.recommender.meta

    # ------------------------------------------------------------------ ids
    def item_id(self, value: Any) -> Any:
        """A client's item id in the vocabulary's type (see :func:`coerce_id`)."""
        return coerce_id(value, self.item_kind)

    def user_id(self, value: Any) -> Any:
        """A client's user id in the vocabulary's type (see :func:`coerce_id`)."""
        return coerce_id(value, self.user_kind)

    # ------------------------------------------------------------------ recommendation
    def _parse(
        self,
        histories: Sequence[Sequence[Any]],
        weights: Sequence[Sequence[float] | None] | None,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32], list[list[Any]]]:
        """Map histories to item positions.

        Returns:
            ``(row, col, value, unknown)``: for every known entry its history (row) and item
            position (col) and weight; per history the unknown ids as the client sent them.

        Raises:
            ValueError: a history's weights do not match its length.
        """
        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        flat_weights: NDArray[np.float64] | None = None
        if weights is not None and any(w is not None for w in weights):
            for r, (history, row_weights) in enumerate(zip(histories, weights, strict=True)):
                if row_weights is not None and len(row_weights) != len(history):
                    raise ValueError(
                        f"history {r}: {len(row_weights)} weights for {len(history)} items"
                    )
            # float64 until each history is rescaled: float32 would turn a tiny weight into 0.
            flat_weights = np.fromiter(
                itertools.chain.from_iterable(
                    (1.0,) * len(h) if w is None else w
                    for h, w in zip(histories, weights, strict=True)
                ),
                dtype=np.float64,
                count=int(lengths.sum()),
            )
        flat = list(itertools.chain.from_iterable(histories))
        row = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
        col = self._lookup_flat(flat)  # -1 where unknown
        found = col >= 0
        unknown: list[list[Any]] = [[] for _ in histories]
        if not found.all():
            for j in np.flatnonzero(~found).tolist():
                unknown[row[j]].append(flat[j])
        values = (
            np.ones(int(found.sum()), dtype=np.float32)
            if flat_weights is None
            else safe_row_weights(row[found], flat_weights[found], len(histories))
        )
        return row[found], col[found], values, unknown

    def _lookup_flat(self, flat: list[Any]) -> NDArray[np.int64]:
        """Positions of ids (``-1`` where unknown), vectorized for integer ids."""
        if self.item_kind == "int" and flat:
            ids = np.asarray(flat)
            if ids.dtype.kind in "iu" and ids.ndim == 1:
                ids = ids.astype(np.int64, copy=False)
                at = np.searchsorted(self.sorted_item_ids, ids).clip(max=self.n_items - 1)
                return np.where(
                    self.sorted_item_ids[at] == ids, self.sorted_item_positions[at], -1
                ).astype(np.int64)
        get = self.item_lookup.get
        out = np.empty(len(flat), dtype=np.int64)
        for j, value in enumerate(flat):
            position = get(value)
            if position is None:
                coerced = coerce_id(value, self.item_kind)
                position = get(coerced) if coerced is not value else None
            out[j] = -1 if position is None else position
        return out

    def _exclusions(self, items: Sequence[Any]) -> list[int]:
        """Positions of the known ids among ``items`` (unknown ones cannot be recommended)."""
        if not items:
            return []
        positions = self._lookup_flat(list(items))
        return positions[positions >= 0].tolist()  # type: ignore[no-any-return]

    def history_matrix(
        self, histories: Sequence[Sequence[Any]]
    ) -> tuple[sp.csr_array, list[list[Any]]]:
        """Binary ``(n_histories, n_items)`` matrix of histories given as client item ids.

        Ids are looked up as for recommendations (an integer-keyed model also accepts decimal
        strings, a string-keyed one integers); repeated ids count once.

        Args:
            histories: Item ids per history, as the client sent them.

        Returns:
            ``(matrix, unknown)``: the CSR matrix over the model's items, and per history the
            unknown ids as the client sent them.
        """
        rows, cols, values, unknown = self._parse(histories, None)
        rows, cols, values = _dedupe_max(rows, cols, values, self.n_items)
        matrix = sp.csr_array(
            (values, (rows, cols)), shape=(len(histories), self.n_items), dtype=np.float32
        )
        return matrix, unknown

    def check_explore(self) -> None:
        """Raise unless the model can explore (has a posterior to sample from).

        Raises:
            ValueError: the model has no posterior (Mult-DAE); the message says so.
        """
        if not self.variational:
            model = self.recommender.config.model
            raise ValueError(
                f"explore needs a model with a posterior (multvae or recvae); '{model}' has none"
            )

    def recommend_histories(
        self,
        histories: Sequence[Sequence[Any]],
        k: int,
        *,
        weights: Sequence[Sequence[float] | None] | None = None,
        exclude: Sequence[Sequence[Any]] | None = None,
        exclude_seen: bool = True,
        include_latent: bool = False,
        explore: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[HistoryResult]:
        """Top-``k`` for each history, folded into the model as one batch.

        The serving hot path: one pass over the ids (no per-catalog Python loop), the
        histories sent to the encoder as a sparse batch when the model accepts one (the first
        layer then reads only the history's weight rows), seen and excluded items set to
        ``-inf``, and ``recvae.evaluation.topk_indices`` (ties by lower position). It gives the
        ranking of ``Recommender.recommend_histories`` (``z = mu``); repeated ids keep their
        largest weight, as there. Each result carries the posterior confidence, from the same
        encoder pass.

        Unknown items are dropped and reported. A history with no known item gets the most
        popular training items instead (minus ``exclude``), flagged ``fallback="popularity"``;
        its scores are popularity shares, not model scores.

        With ``explore``, the histories the model scores are ranked from one tempered posterior
        sample each, ``z = mu + temperature * sigma * eps`` (``recvae.vae_tools.sample_latent``),
        ``eps`` drawn in batch order from one generator seeded by ``seed``: a single history
        with a seed gets the sample of ``Recommender.recommend_from_history`` with that seed.
        Scores are then the sampled logits. Fallback histories are not explored.

        Args:
            histories: Item ids per history, as the client sent them.
            k: Items per history (capped at the catalog size).
            weights: Optional positive weights per history (None: 1.0 each).
            exclude: Item ids per history never to return.
            exclude_seen: Leave out the history's own items.
            include_latent: Also return the posterior ``mu`` and ``sigma`` of each history.
            explore: Rank from a posterior sample (Thompson-style) instead of its mean.
            temperature: With ``explore``, the scale of the posterior's sigma (0 gives the
                deterministic ranking). Ignored otherwise.
            seed: With ``explore``, seeds the sample (None: a fresh draw). Ignored otherwise.

        Returns:
            One result per history, in order.

        Raises:
            ValueError: ``k < 1``, weights that do not match their history, a bad
                ``temperature`` or ``seed``, or ``explore`` with a model without a posterior.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_exploration(temperature, seed)
        generator = None
        if explore:
            self.check_explore()
            generator = make_generator(seed)
        n = len(histories)
        results: list[HistoryResult | None] = [None] * n
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            self._recommend_chunk(
                histories,
                range(start, stop),
                k,
                weights=weights,
                exclude=exclude,
                exclude_seen=exclude_seen,
                include_latent=include_latent,
                generator=generator,
                temperature=float(temperature),
                results=results,
            )
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _recommend_chunk(
        self,
        histories: Sequence[Sequence[Any]],
        rows: range,
        k: int,
        *,
        weights: Sequence[Sequence[float] | None] | None,
        exclude: Sequence[Sequence[Any]] | None,
        exclude_seen: bool,
        include_latent: bool,
        generator: torch.Generator | None,
        temperature: float,
        results: list[HistoryResult | None],
    ) -> None:
        chunk_histories = [histories[r] for r in rows]
        chunk_weights = None if weights is None else [weights[r] for r in rows]
        local_row, cols, vals, unknown = self._parse(chunk_histories, chunk_weights)
        count_arr = np.bincount(local_row, minlength=len(rows)).astype(np.int64)
        modelled = np.flatnonzero(count_arr > 0)  # chunk-local rows the model scores
        ranked: dict[int, list[tuple[Any, float]]] = {}
        mu = sigma = confidence = None
        if len(modelled):
            # Renumber so that fallback rows (no known item) take no place in the batch.
            batch_row = (np.cumsum(count_arr > 0) - 1)[local_row]
            batch_row, cols, vals = _dedupe_max(batch_row, cols, vals, self.n_items)
            indptr = np.zeros(len(modelled) + 1, dtype=np.int64)
            np.cumsum(np.bincount(batch_row, minlength=len(modelled)), out=indptr[1:])
            exclusions = None
            if exclude is not None:
                exclusions = [self._exclusions(exclude[rows[i]]) for i in modelled]
            idx, top, mu, sigma, confidence = self._score_topk(
                indptr,
                batch_row,
                cols,
                vals,
                k,
                exclude_seen,
                exclusions,
                generator=generator,
                temperature=temperature,
            )
            ids = self.recommender.item_ids[np.maximum(idx, 0)].tolist()
            scores = top.tolist()
            complete = np.asarray((idx >= 0).all(axis=1), dtype=bool)
            for b, i in enumerate(modelled.tolist()):
                pairs = zip(ids[b], scores[b], strict=True)
                if complete[b]:
                    ranked[i] = list(pairs)
                else:
                    keep = idx[b] >= 0
                    ranked[i] = [pair for pair, ok in zip(pairs, keep, strict=True) if ok]
        batch_of = {i: b for b, i in enumerate(modelled.tolist())}
        for i, r in enumerate(rows):
            position = batch_of.get(i)
            if position is None:
                excluded = [] if exclude is None else self._exclusions(exclude[r])
                results[r] = HistoryResult(
                    items=self._popular_positions(k, excluded),
                    unknown_items=unknown[i],
                    fallback="popularity",
                    mu=self.empty_mu if include_latent else None,
                    sigma=self.empty_sigma if include_latent else None,
                    confidence=self.empty_confidence,
                )
            else:
                results[r] = HistoryResult(
                    items=ranked[i],
                    unknown_items=unknown[i],
                    mu=None if mu is None or not include_latent else mu[position].tolist(),
                    sigma=None if sigma is None or not include_latent else sigma[position].tolist(),
                    confidence=None if confidence is None else float(confidence[position]),
                )

    def _score_topk(
        self,
        indptr: NDArray[np.int64],
        rows: NDArray[np.int64],
        cols: NDArray[np.int64],
        vals: NDArray[np.float32],
        k: int,
        exclude_seen: bool,
        exclusions: list[list[int]] | None,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> tuple[
        NDArray[np.int64],
        NDArray[np.float32],
        NDArray[np.float32],
        NDArray[np.float32],
        NDArray[np.float32] | None,
    ]:
        """Encode, decode (from ``mu``, or a tempered sample with a generator), mask and rank
        one batch given in CSR form; also the posterior's sigma and confidence."""
        n_rows = len(indptr) - 1
        model: Any = self.recommender.model
        rows_t = torch.from_numpy(rows)
        cols_t = torch.from_numpy(cols)
        with torch.inference_mode():
            if getattr(model, "supports_sparse_input", False):
                x: Any = SparseBatch.from_csr(
                    torch.from_numpy(indptr), cols_t, torch.from_numpy(vals), self.n_items
                )
            else:
                x = torch.zeros((n_rows, self.n_items), dtype=torch.float32)
                x[rows_t, cols_t] = torch.from_numpy(vals)
            mu, logvar = model.encode(x)  # (batch, latent) each; logvar None for Mult-DAE
            z = mu
            if generator is not None:
                assert logvar is not None  # checked by check_explore
                z = sample_latent(mu, logvar, temperature=temperature, generator=generator)
            scores = model.decode(z).float()  # (batch, n_items)
            if exclude_seen:
                scores[rows_t, cols_t] = -torch.inf
            if exclusions is not None and any(exclusions):
                ex_rows = np.repeat(np.arange(n_rows, dtype=np.int64), [len(e) for e in exclusions])
                ex_cols = np.fromiter(
                    (c for e in exclusions for c in e), dtype=np.int64, count=len(ex_rows)
                )
                scores[torch.from_numpy(ex_rows), torch.from_numpy(ex_cols)] = -torch.inf
            idx = topk_indices(scores, min(k, self.n_items))  # (batch, k); -1: not eligible
            top = scores.gather(1, idx.clamp(min=0))  # (batch, k)
            sigma = torch.zeros_like(mu) if logvar is None else torch.exp(0.5 * logvar)
            confidence = None if logvar is None else posterior_confidence(logvar).numpy()
        return idx.numpy(), top.numpy(), mu.float().numpy(), sigma.float().numpy(), confidence

    def popular(self, k: int, exclude: Sequence[Any] = ()) -> list[tuple[Any, float]]:
        """The ``k`` most popular training items, leaving out the item ids ``exclude``.

        Scores are the share of training users who interacted with the item.
        """
        return self._popular_positions(k, self._exclusions(exclude))

    def _popular_positions(self, k: int, exclude: Sequence[int]) -> list[tuple[Any, float]]:
        return self.recommender.popular_items(k, exclude_idx=exclude)

    def similar_items(self, item_id: Any, k: int) -> list[tuple[Any, float]]:
        """Items closest to ``item_id`` by cosine similarity of decoder item embeddings.

        The item itself is left out; ties break by lower item position.

        Args:
            item_id: A known item id (coerced).
            k: Number of neighbours (capped at ``n_items - 1``).

        Returns:
            ``(item_id, cosine)`` pairs, most similar first.

        Raises:
            UnknownItemError: the item is not in the vocabulary.
        """
        index = self.recommender.vocab.item_index(item_id)
        if index is None:
            raise UnknownItemError(item_id)
        with torch.inference_mode():
            unit = self.unit_item_embeddings
            cosine = (unit @ unit[index]).unsqueeze(0)  # (1, n_items)
            cosine[0, index] = -torch.inf
            top = topk_indices(cosine, min(k, self.n_items))[0]  # (k,), -1 past the catalog
            top = top[top >= 0]
            values = cosine[0, top]
        ids = self.recommender.item_ids[top.numpy()].tolist()
        return list(zip(ids, values.tolist(), strict=True))


def _warm_anomaly_references(recommender: Recommender, source: str) -> None:
    """Build the anomaly references now, so that no request pays for them.

    ``POST /v1/anomaly`` compares a score with a reference distribution: a calibrated bundle's
    held-out reference (parsed from ``meta.json``, cheap, so only checked here) and the
    training users' (scored once, up to 20,000 of them plus a sub-history each, and cached on
    the recommender, so the served model carries it through the atomic swap). A bundle without
    training histories has no training reference; requests that need one get a 422 with the
    library's reason.

    Raises:
        BundleError: the stored held-out reference is malformed, or the library cannot build
            the training reference (its ``ValueError``). Any other error while scoring the
            reference propagates as it is; either way the load fails and the model is not
            swapped in.
    """
    start = time.perf_counter()
    sources = ["training"] if recommender.train_matrix.nnz else []
    if recommender.anomaly_reference_source("auto") == "held-out":
        sources.insert(0, "held-out")
    try:
        for name in sources:
            recommender.anomaly_reference(name)
    except ValueError as exc:
        raise BundleError(f"model from {source}: anomaly reference unusable: {exc}") from exc
    if not sources:
        logger.warning(
            "model from %s has neither training histories nor a held-out anomaly calibration: "
            "POST /v1/anomaly cannot compute percentiles for it",
            source,
        )
        return
    logger.info(
        "anomaly reference(s) %s of %s ready in %.2fs",
        "+".join(sources),
        source,
        time.perf_counter() - start,
    )


def _dedupe_max(
    rows: NDArray[np.int64], cols: NDArray[np.int64], vals: NDArray[np.float32], n_items: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Sort entries by (row, col) and keep the largest value of repeated pairs."""
    key = rows * n_items + cols
    order = np.lexsort((-vals, key))
    key = key[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    keep = order[first]
    return rows[keep], cols[keep], vals[keep]
