"""implicit's ALS, BPR and item-kNN behind the ``Ranker`` protocol (the ``baselines`` extra).

This is the only module of the library that imports implicit. It uses implicit's CPU classes
(``implicit.cpu.*`` and the item-item recommenders) directly, never the factories that switch to
the GPU when one is present, and runs each fit and score with BLAS limited to ``blas_threads``
(threadpoolctl) and implicit's own loops on ``num_threads`` threads (one by default, which also
makes BPR's SGD deterministic).

How each folds in a held-out user from the fold-in history alone (no retraining):

- **ALS**: the user's factors are recomputed exactly, by the same confidence-weighted ridge
  regression against the item factors that ALS training solves (implicit's
  ``recalculate_user``, a Cholesky solve per user).
- **BPR**: implicit cannot recalculate BPR users, so the user's vector is fitted by the BPR
  objective itself with the item factors and biases frozen: full-batch gradient ascent on
  ``mean ln sigmoid(w . (v_i - v_j) + b_i - b_j) - regularization * ||w||^2 / 2`` over
  ``fold_in_samples`` sampled (positive ``i``, negative ``j``) pairs per step, from ``w = 0``.
  The samples come from a counter-based hash of the seed, the user's own history and the step,
  so a user's scores do not depend on which other users share the batch.
- **item-kNN**: ``scores = history @ similarity``, the item-item similarity that implicit keeps
  (``K`` neighbours per item), which is exactly what its ``recommend`` sums.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Self

import implicit.cpu.als
import implicit.cpu.bpr
import implicit.nearest_neighbours
import implicit.utils
import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from recvae.baselines import (
    ALSConfig,
    BPRConfig,
    ItemKNNConfig,
    _check_config,
    _check_fitted,
    _check_histories,
    _check_nonempty,
)
from recvae.data.interactions import Interactions

__all__ = ["ALS", "BPR", "ItemKNN"]

logger = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _check_threads(num_threads: int, blas_threads: int) -> None:
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    if not isinstance(blas_threads, int) or isinstance(blas_threads, bool) or blas_threads < 1:
        raise ValueError(f"blas_threads must be an int >= 1, got {blas_threads!r}")


def _as_csr_matrix(matrix: sp.csr_array, n_items: int | None = None) -> sp.csr_matrix:
    """The float32 ``csr_matrix`` with sorted indices that implicit expects.

    ``n_items`` given: ``matrix`` is a batch of histories, checked and made canonical (duplicates
    summed, explicit zeros dropped) as every baseline does.
    """
    if n_items is not None:
        matrix = _check_histories(matrix, n_items)
    elif not sp.issparse(matrix):
        raise ValueError("histories must be a scipy sparse matrix (n_users, n_items)")
    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.sort_indices()
    return out


class _ImplicitRanker:
    """Shared plumbing: thread limits, the timed fit, the fitted check.

    A subclass builds and fits its implicit model in :meth:`_fit_matrix`.
    """

    def __init__(self, *, num_threads: int = 1, blas_threads: int = 1) -> None:
        _check_threads(num_threads, blas_threads)
        self.num_threads = num_threads
        self.blas_threads = blas_threads
        self.fit_seconds: float | None = None
        self._n_items: int | None = None

    @property
    def n_items(self) -> int:
        return _check_fitted(self._n_items, type(self).__name__)

    def _limits(self) -> threadpool_limits:
        return threadpool_limits(limits=self.blas_threads, user_api="blas")

    def fit(self, train: Interactions) -> Self:
        """Train on the training users.

        Args:
            train: The training users.

        Returns:
            ``self``.

        Raises:
            ValueError: The training matrix is empty.
            TypeError: ``train`` is not an ``Interactions`` (e.g. its matrix, or a split).
        """
        _check_nonempty(train, type(self).__name__)
        self._n_items = train.n_items
        matrix = _as_csr_matrix(train.matrix)
        start = time.perf_counter()
        with self._limits():
            self._fit_matrix(matrix)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _fit_matrix(self, matrix: sp.csr_matrix) -> None:  # pragma: no cover - abstract
        """Fit the model on the ``(n_users, n_items)`` training matrix (BLAS already limited)."""
        raise NotImplementedError


class ALS(_ImplicitRanker):
    """Alternating least squares (implicit's CPU model); held-out users' factors recomputed.

    Args:
        config: Factors, regularization, alpha, iterations, seed.
        num_threads: implicit's threads.
        blas_threads: BLAS threads during fit and score.

    Raises:
        TypeError: ``config`` is not an :class:`ALSConfig` (e.g. a dict).
        ValueError: ``num_threads`` or ``blas_threads`` is not an int >= 1.
    """

    def __init__(
        self, config: ALSConfig | None = None, *, num_threads: int = 1, blas_threads: int = 1
    ) -> None:
        _check_config(config, ALSConfig, "ALS")
        super().__init__(num_threads=num_threads, blas_threads=blas_threads)
        self.config = config or ALSConfig()
        self.model: implicit.cpu.als.AlternatingLeastSquares | None = None

    def _fit_matrix(self, matrix: sp.csr_matrix) -> None:
        cfg = self.config
        model = implicit.cpu.als.AlternatingLeastSquares(
            factors=cfg.factors,
            regularization=cfg.regularization,
            alpha=cfg.alpha,
            iterations=cfg.iterations,
            use_cg=cfg.use_cg,
            num_threads=self.num_threads,
            random_state=cfg.seed,
        )
        model.fit(matrix, show_progress=False)
        self.model = model

    def user_factors(self, histories: sp.csr_array) -> NDArray[np.float32]:
        """The ALS user factors of each history, ``(n_users, factors)``.

        Each row solves ``(Y^T C_u Y + regularization I) w = Y^T C_u p_u`` exactly with the
        trained item factors ``Y`` (the update ALS training makes for a user).

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        matrix = _as_csr_matrix(histories, self.n_items)
        assert self.model is not None
        n_factors = int(self.model.item_factors.shape[1])
        if matrix.shape[0] == 0:  # implicit's result cannot be reshaped then
            return np.zeros((0, n_factors), dtype=np.float32)
        with self._limits():
            factors = self.model.recalculate_user(np.arange(matrix.shape[0]), matrix)
        return np.asarray(factors, dtype=np.float32).reshape(matrix.shape[0], n_factors)

    def score(self, histories: sp.csr_array) -> NDArray[np.float32]:
        """``w_u . y_i`` for every item, with ``w_u`` folded in from the history.

        Args:
            histories: ``(n_users, n_items)`` fold-in histories.

        Returns:
            ``(n_users, n_items)`` float32 scores.

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        users = self.user_factors(histories)
        assert self.model is not None
        with self._limits():
            return np.asarray(users @ self.model.item_factors.T, dtype=np.float32)


def _splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """The splitmix64 finalizer: a well-mixed 64-bit hash, elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _row_keys(matrix: sp.csr_matrix, seed: int) -> NDArray[np.uint64]:
    """One 64-bit key per row from the seed and the row's item set (not its position)."""
    item_hash = _splitmix64(matrix.indices.astype(np.uint64))
    lengths = np.diff(matrix.indptr)
    sums = np.zeros(matrix.shape[0], dtype=np.uint64)
    nonempty = lengths > 0
    if nonempty.any():
        with np.errstate(over="ignore"):
            sums[nonempty] = np.add.reduceat(item_hash, matrix.indptr[:-1][nonempty])
    seed_key = _splitmix64(np.asarray([seed & int(_MASK64)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _splitmix64(sums ^ seed_key ^ _splitmix64(lengths.astype(np.uint64)))


def _uniform(keys: NDArray[np.uint64], step: int, n_samples: int, stream: int) -> NDArray[Any]:
    """``(n_rows, n_samples)`` uniforms in [0, 1), a pure function of (key, step, sample)."""
    counter = (
        np.uint64(step) * np.uint64(n_samples) + np.arange(n_samples, dtype=np.uint64)
    ) * np.uint64(2) + np.uint64(stream)
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys[:, None] ^ _splitmix64(counter)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class BPR(_ImplicitRanker):
    """Bayesian personalized ranking (implicit's CPU model); held-out users fitted by BPR.

    Args:
        config: Factors, SGD settings, fold-in settings, seed.
        num_threads: implicit's threads (1 keeps training deterministic).
        blas_threads: BLAS threads during fit and score.

    Raises:
        TypeError: ``config`` is not an :class:`BPRConfig` (e.g. a dict).
        ValueError: ``num_threads`` or ``blas_threads`` is not an int >= 1.
    """

    def __init__(
        self, config: BPRConfig | None = None, *, num_threads: int = 1, blas_threads: int = 1
    ) -> None:
        _check_config(config, BPRConfig, "BPR")
        super().__init__(num_threads=num_threads, blas_threads=blas_threads)
        self.config = config or BPRConfig()
        self.model: implicit.cpu.bpr.BayesianPersonalizedRanking | None = None

    def _fit_matrix(self, matrix: sp.csr_matrix) -> None:
        cfg = self.config
        model = implicit.cpu.bpr.BayesianPersonalizedRanking(
            factors=cfg.factors,
            learning_rate=cfg.learning_rate,
            regularization=cfg.regularization,
            iterations=cfg.iterations,
            num_threads=self.num_threads,
            verify_negative_samples=cfg.verify_negative_samples,
            random_state=cfg.seed,
        )
        model.fit(matrix, show_progress=False)
        self.model = model

    def _item_parts(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        assert self.model is not None
        factors = np.asarray(self.model.item_factors, dtype=np.float64)
        # implicit stores the item bias as the last factor (and a constant 1 for every user).
        return factors[:, :-1], factors[:, -1]

    def user_factors(self, histories: sp.csr_array) -> NDArray[np.float32]:
        """Fold-in user vectors (without the constant bias factor), ``(n_users, factors)``.

        Gradient ascent on the BPR objective with the item side frozen (see the module
        docstring). Users with an empty history keep ``w = 0`` (scores are the item biases).

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        matrix = _as_csr_matrix(histories, self.n_items)
        cfg = self.config
        items, bias = self._item_parts()
        n_users, n_items = matrix.shape
        users = np.zeros((n_users, items.shape[1]), dtype=np.float64)
        lengths = np.diff(matrix.indptr)
        active = np.flatnonzero((lengths > 0) & (lengths < n_items))
        if active.size == 0:
            return users.astype(np.float32)
        sub = matrix[active]
        keys = _row_keys(sub, cfg.seed)
        starts = sub.indptr[:-1].astype(np.int64)
        sub_lengths = np.diff(sub.indptr).astype(np.int64)
        # Sorted (row, item) codes answer "does the user have item j" by binary search.
        rows = np.repeat(np.arange(active.size, dtype=np.int64), sub_lengths)
        codes = rows * n_items + sub.indices.astype(np.int64)
        w = np.zeros((active.size, items.shape[1]), dtype=np.float64)
        row_index = np.arange(active.size, dtype=np.int64)[:, None]
        with self._limits():
            for step in range(cfg.fold_in_steps):
                pick = _uniform(keys, step, cfg.fold_in_samples, 0)
                positive = sub.indices[
                    starts[:, None] + (pick * sub_lengths[:, None]).astype(np.int64)
                ]  # (n_active, samples)
                negative = (_uniform(keys, step, cfg.fold_in_samples, 1) * n_items).astype(
                    np.int64
                )  # (n_active, samples)
                found = np.searchsorted(codes, row_index * n_items + negative)
                found = np.minimum(found, codes.size - 1)
                valid = codes[found] != row_index * n_items + negative  # j not in history
                diff = items[positive] - items[negative]  # (n_active, samples, factors)
                margin = np.einsum("uf,usf->us", w, diff) + bias[positive] - bias[negative]
                weight = valid / (1.0 + np.exp(np.clip(margin, -50.0, 50.0)))  # sigmoid(-x)
                n_valid = np.maximum(valid.sum(axis=1, keepdims=True), 1)
                gradient = np.einsum("us,usf->uf", weight, diff) / n_valid
                w += cfg.fold_in_learning_rate * (gradient - cfg.regularization * w)
        users[active] = w
        del row_index
        return users.astype(np.float32)

    def score(self, histories: sp.csr_array) -> NDArray[np.float32]:
        """``w_u . v_i + b_i`` for every item, with ``w_u`` folded in from the history.

        Args:
            histories: ``(n_users, n_items)`` fold-in histories.

        Returns:
            ``(n_users, n_items)`` float32 scores.

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        users = self.user_factors(histories)
        items, bias = self._item_parts()
        with self._limits():
            return np.asarray(users @ items.T.astype(np.float32) + bias[None, :], np.float32)


class ItemKNN(_ImplicitRanker):
    """Item-item nearest neighbours (cosine, BM25 or TF-IDF weighting, ``K`` neighbours).

    Args:
        config: Similarity, neighbours and BM25 parameters.
        num_threads: implicit's threads.
        blas_threads: BLAS threads during fit and score.

    Raises:
        TypeError: ``config`` is not an :class:`ItemKNNConfig` (e.g. a dict).
        ValueError: ``num_threads`` or ``blas_threads`` is not an int >= 1.
    """

    def __init__(
        self, config: ItemKNNConfig | None = None, *, num_threads: int = 1, blas_threads: int = 1
    ) -> None:
        _check_config(config, ItemKNNConfig, "ItemKNN")
        super().__init__(num_threads=num_threads, blas_threads=blas_threads)
        self.config = config or ItemKNNConfig()
        self.similarity: sp.csr_array | None = None

    def _fit_matrix(self, matrix: sp.csr_matrix) -> None:
        """Compute the item-item similarity from the training users."""
        cfg = self.config
        model: implicit.nearest_neighbours.ItemItemRecommender
        if cfg.similarity == "bm25":
            model = implicit.nearest_neighbours.BM25Recommender(
                K=cfg.neighbours, K1=cfg.bm25_k1, B=cfg.bm25_b, num_threads=self.num_threads
            )
        elif cfg.similarity == "tfidf":
            model = implicit.nearest_neighbours.TFIDFRecommender(
                K=cfg.neighbours, num_threads=self.num_threads
            )
        else:
            model = implicit.nearest_neighbours.CosineRecommender(
                K=cfg.neighbours, num_threads=self.num_threads
            )
        with warnings.catch_warnings():
            # implicit hands its own weighted COO matrix to its kNN and then warns about it.
            warnings.filterwarnings("ignore", category=implicit.utils.ParameterWarning)
            model.fit(matrix, show_progress=False)
        self.similarity = sp.csr_array(model.similarity, dtype=np.float32)

    def score(self, histories: sp.csr_array) -> NDArray[np.float32]:
        """``history @ similarity``: each item's summed similarity to the history items.

        Args:
            histories: ``(n_users, n_items)`` fold-in histories.

        Returns:
            ``(n_users, n_items)`` float32 scores.

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        matrix = sp.csr_array(_as_csr_matrix(histories, self.n_items))
        assert self.similarity is not None
        with self._limits():
            return np.asarray((matrix @ self.similarity).toarray(), dtype=np.float32)
