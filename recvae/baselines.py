"""Simple, strong baselines behind the ``Ranker`` protocol: popularity and EASE.

Every baseline is fitted on the training users' matrix and scores held-out users from their
fold-in histories alone (``score(histories) -> (n_users, n_items)``), so :func:`recvae.evaluate`
measures it exactly as it measures Mult-VAE. This module needs only the core dependencies; the
configs of implicit's models (ALS, BPR, item-kNN) live here too, so that a pipeline can read and
check them without implicit installed. Their models are in :mod:`recvae.baselines_implicit`.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019) is the closed form

    P = (X^T X + lambda I)^-1,    B = I - P diag(1 / diag(P)),

that is ``B_ij = -P_ij / P_jj`` off the diagonal and ``B_jj = 0``; a user's scores are ``x_u B``.

Memory: EASE holds one dense ``n_items x n_items`` matrix. The CPU path forms the Gram matrix in a
preallocated array and inverts it in place (LAPACK ``potrf``/``potri`` on the symmetric matrix),
so the peak is that one matrix plus the sparse Gram matrix ``X^T X`` it came from and a
``block x n_items`` temporary: with ``dtype="auto"`` a catalog up to 16,384 items uses float64
(2 GiB at the bound), a larger one float32 (gowalla's 40,981 items: about 6.3 GiB). The time is
``n_items^3`` floating point operations: on a busy 2-core machine ml-1m's 3,485 items take
about 10 s per lambda and lastfm's 15,187 items (float64) about 150 s; gowalla's 40,981 items,
about 20 times lastfm's work, were not run there. :func:`select_ease_lambda` keeps the best model
while it tries the next candidate when the matrix fits in 2 GiB (peak two matrices; the whole
lastfm experiment peaked at 4.8 GB resident), and refits the winner otherwise (one matrix). A CUDA
device (``EASE(config, device="cuda")``) runs the same algebra in torch (Cholesky, then
``cholesky_inverse``), which needs about twice the matrix in GPU memory. Before allocating the
dense matrix, ``fit`` (and :func:`select_ease_lambda`, :func:`ease_weights`) compares its size
with the memory available on the device and raises a ``ValueError`` giving both when it does not
fit, instead of a ``MemoryError`` or the kernel's OOM killer midway.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from scipy.linalg import lapack

from recvae.config import (
    SEED_LIMIT,
    _config_fields_from_dict,
    _config_to_dict,
    _parse_metric,
    _replace_config,
    check_field_types,
)
from recvae.data.interactions import Interactions
from recvae.evaluation import _check_same_items, evaluate
from recvae.recommender import resolve_device
from recvae.split import HeldOut, Split

__all__ = [
    "ALSConfig",
    "BASELINE_CONFIGS",
    "BPRConfig",
    "BaselineConfig",
    "EASE",
    "EASEConfig",
    "ItemKNNConfig",
    "LambdaSelection",
    "Popularity",
    "PopularityConfig",
    "baseline_config_from_dict",
    "ease_weights",
    "select_ease_lambda",
]

logger = logging.getLogger(__name__)

BASELINE_CONFIGS: dict[str, type[BaselineConfig]] = {}

_FLOAT64_MAX_BYTES = 2 * 1024**3  # dtype="auto" uses float64 while the matrix fits in this
_KEEP_BEST_MAX_BYTES = 2 * 1024**3  # lambda selection keeps the best model if it is this small
_SYMMETRIZE_BLOCK = 1024  # rows per block when mirroring a triangle in place


def _register(cls: type[BaselineConfig]) -> type[BaselineConfig]:
    BASELINE_CONFIGS[cls.model] = cls
    return cls


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field '{name}': {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A real number other than NaN and +-inf (an infinite rate or weight gives NaN factors)."""
    return _is_number(value) and math.isfinite(value)


# ------------------------------------------------------------------------------ configs
@dataclass(frozen=True, slots=True)
class BaselineConfig:
    """Base of the baselines' frozen configs: ``to_dict``/``from_dict`` like ``ModelConfig``."""

    model: ClassVar[str] = "baseline"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including the ``model`` name (used as MLflow params)."""
        return _config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineConfig:
        """Build from a dict (the ``model`` key is optional but must match).

        Args:
            data: Field values by name.

        Returns:
            The config.

        Raises:
            ValueError: Unknown keys, a wrong model name or an invalid value.
        """
        return cls(**_config_fields_from_dict(cls, data))

    def replace(self, **changes: Any) -> BaselineConfig:
        """A copy with some fields changed (validated).

        Raises:
            ValueError: An unknown field or an invalid value.
        """
        return _replace_config(self, changes)


@_register
@dataclass(frozen=True, slots=True)
class PopularityConfig(BaselineConfig):
    """Most-popular items: every user gets the items ranked by training-user counts."""

    model: ClassVar[str] = "popularity"


@_register
@dataclass(frozen=True, slots=True)
class EASEConfig(BaselineConfig):
    """EASE (Steck 2019): one ridge-regularized item-item weight matrix with a zero diagonal."""

    model: ClassVar[str] = "ease"

    regularization: float = 500.0  # lambda, added to the diagonal of X^T X
    dtype: Literal["auto", "float64", "float32"] = "auto"  # auto: float64 while it fits 2 GiB

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(
            _is_number(self.regularization)
            and math.isfinite(self.regularization)
            and self.regularization > 0,
            "regularization",
            "must be a finite number > 0",
        )
        _check(
            self.dtype in ("auto", "float64", "float32"),
            "dtype",
            "must be auto, float64 or float32",
        )


@_register
@dataclass(frozen=True, slots=True)
class ALSConfig(BaselineConfig):
    """implicit's alternating least squares (Hu, Koren and Volinsky 2008)."""

    model: ClassVar[str] = "als"

    factors: int = 100  # size of the user and item factors
    regularization: float = 0.01  # L2 weight on the factors
    alpha: float = 1.0  # confidence = 1 + alpha * x
    iterations: int = 15  # alternating sweeps
    use_cg: bool = True  # conjugate-gradient steps in training (fold-in is always exact)
    seed: int = 98765  # seeds the initial factors

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(_is_int(self.factors) and self.factors >= 1, "factors", "must be an int >= 1")
        # lambda = 0 leaves the fold-in's ridge system singular whenever the item factors do not
        # span the factor space (factors > n_items, or collinear factors): implicit then fails
        # in score(), after a whole training run.
        _check(
            _is_finite(self.regularization) and self.regularization > 0,
            "regularization",
            "must be a finite number > 0",
        )
        _check(_is_finite(self.alpha) and self.alpha > 0, "alpha", "must be a finite number > 0")
        _check(_is_int(self.iterations) and self.iterations >= 1, "iterations", "an int >= 1")
        _check(isinstance(self.use_cg, bool), "use_cg", "must be true or false")
        _check(
            _is_int(self.seed) and 0 <= self.seed < SEED_LIMIT,
            "seed",
            f"must be an int in [0, 2**63), got {self.seed!r}",
        )


@_register
@dataclass(frozen=True, slots=True)
class BPRConfig(BaselineConfig):
    """implicit's Bayesian personalized ranking (Rendle et al. 2009).

    Held-out users are folded in by the same objective with the item factors frozen (see
    :class:`recvae.baselines_implicit.BPR`).
    """

    model: ClassVar[str] = "bpr"

    factors: int = 100  # size of the factors (implicit adds one for the item bias)
    learning_rate: float = 0.01  # SGD step in training
    regularization: float = 0.01  # L2 weight on the factors
    iterations: int = 100  # epochs of SGD
    verify_negative_samples: bool = True  # resample a negative the user liked
    fold_in_steps: int = 100  # gradient steps when folding in held-out users
    fold_in_samples: int = 64  # (positive, negative) pairs per user and step
    fold_in_learning_rate: float = 0.5  # step size of the fold-in ascent
    seed: int = 98765  # seeds training and the fold-in sampling

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(_is_int(self.factors) and self.factors >= 1, "factors", "must be an int >= 1")
        _check(
            _is_finite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            "must be a finite number > 0",
        )
        _check(
            _is_finite(self.regularization) and self.regularization >= 0,
            "regularization",
            "must be a finite number >= 0",
        )
        _check(_is_int(self.iterations) and self.iterations >= 1, "iterations", "an int >= 1")
        _check(
            isinstance(self.verify_negative_samples, bool),
            "verify_negative_samples",
            "must be true or false",
        )
        _check(
            _is_int(self.fold_in_steps) and self.fold_in_steps >= 1, "fold_in_steps", "an int >= 1"
        )
        _check(
            _is_int(self.fold_in_samples) and self.fold_in_samples >= 1,
            "fold_in_samples",
            "an int >= 1",
        )
        _check(
            _is_finite(self.fold_in_learning_rate) and self.fold_in_learning_rate > 0,
            "fold_in_learning_rate",
            "must be a finite number > 0",
        )
        _check(
            _is_int(self.seed) and 0 <= self.seed < SEED_LIMIT,
            "seed",
            f"must be an int in [0, 2**63), got {self.seed!r}",
        )


@_register
@dataclass(frozen=True, slots=True)
class ItemKNNConfig(BaselineConfig):
    """implicit's item-item nearest neighbours; a user's scores are ``history @ similarity``."""

    model: ClassVar[str] = "itemknn"

    similarity: Literal["cosine", "bm25", "tfidf"] = "cosine"  # item-item weighting
    neighbours: int = 100  # K: neighbours kept per item
    bm25_k1: float = 1.2  # BM25 term saturation (similarity = "bm25")
    bm25_b: float = 0.75  # BM25 length normalization (similarity = "bm25")

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(
            self.similarity in ("cosine", "bm25", "tfidf"),
            "similarity",
            "must be cosine, bm25 or tfidf",
        )
        _check(_is_int(self.neighbours) and self.neighbours >= 1, "neighbours", "an int >= 1")
        _check(_is_finite(self.bm25_k1) and self.bm25_k1 >= 0, "bm25_k1", "must be a finite >= 0")
        _check(_is_finite(self.bm25_b) and 0.0 <= self.bm25_b <= 1.0, "bm25_b", "must be in [0, 1]")


def baseline_config_from_dict(data: dict[str, Any]) -> BaselineConfig:
    """Build the right baseline config from a dict with a ``model`` key.

    Args:
        data: ``{"model": "ease", "regularization": 200.0, ...}``.

    Returns:
        The config.

    Raises:
        ValueError: A missing or unknown model name, unknown fields or invalid values.
    """
    name = data.get("model")
    if name not in BASELINE_CONFIGS:
        raise ValueError(
            f"unknown baseline '{name}' (known: {', '.join(sorted(BASELINE_CONFIGS))})"
        )
    return BASELINE_CONFIGS[str(name)].from_dict(data)


def _check_fitted(n_items: int | None, name: str) -> int:
    if n_items is None:
        raise ValueError(f"{name} is not fitted: call fit(train) first")
    return n_items


def _check_train(train: Any, name: str) -> None:
    """``train`` must be the training users' ``Interactions`` (not their matrix, a split...)."""
    if isinstance(train, Split):
        raise TypeError(f"{name}.fit: train must be an Interactions, got a Split: pass split.train")
    if not isinstance(train, Interactions):
        hint = " (wrap it: Interactions(matrix, user_ids, item_ids))" if sp.issparse(train) else ""
        raise TypeError(
            f"{name}.fit: train must be an Interactions, got {type(train).__name__}{hint}"
        )


def _check_config(config: Any, expected: type[BaselineConfig], name: str) -> None:
    if config is not None and not isinstance(config, expected):
        hint = f" (use {expected.__name__}(**config))" if isinstance(config, dict) else ""
        raise TypeError(
            f"{name}: config must be {expected.__name__} or None, got {type(config).__name__}{hint}"
        )


def _check_nonempty(train: Interactions, name: str) -> None:
    _check_train(train, name)
    if train.nnz == 0:
        raise ValueError(f"cannot fit {name} on an empty matrix")


_HISTORY_VALUES = "history values must be finite and >= 0"  # as the VAE's score() says


def _check_histories(histories: sp.csr_array, n_items: int) -> sp.csr_array:
    """The fold-in histories as a canonical float32 CSR copy, checked.

    Every baseline reads them the way the VAE's ``score`` does (it densifies them): duplicate
    entries are summed, explicit zeros are no interaction (and :func:`recvae.evaluate` does not
    mask them), and the indices end up sorted. The caller's matrix is never modified.

    Raises:
        ValueError: ``histories`` is not a 2-D scipy sparse matrix with ``n_items`` columns, or
            holds a negative, NaN or infinite value (also after conversion to float32).
    """
    if isinstance(histories, Interactions):
        raise ValueError("histories is an Interactions: pass its matrix (data.matrix)")
    if not sp.issparse(histories):
        raise ValueError(
            "histories must be a scipy sparse matrix (n_users, n_items), got "
            f"{type(histories).__name__}"
        )
    if histories.ndim != 2 or histories.shape[1] != n_items:
        raise ValueError(f"histories must have shape (n, {n_items}), got {histories.shape}")
    matrix = sp.csr_array(histories)
    data = np.asarray(matrix.data)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"history values must be real numbers, got dtype {data.dtype}")
    n_negative = int(np.count_nonzero(data < 0))
    if n_negative:
        raise ValueError(f"{_HISTORY_VALUES}: {n_negative} entries are negative")
    matrix = matrix.astype(np.float32, copy=True)  # a copy: the caller's arrays stay untouched
    matrix.sum_duplicates()
    n_bad = int(np.count_nonzero(~np.isfinite(matrix.data)))
    if n_bad:
        raise ValueError(f"{_HISTORY_VALUES}: {n_bad} entries are NaN or infinite (as float32)")
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


# ------------------------------------------------------------------------------ popularity
class Popularity:
    """Ranks items by how many training users have them; the same list for every user.

    Args:
        config: The (empty) config, for a uniform interface.
    """

    def __init__(self, config: PopularityConfig | None = None) -> None:
        _check_config(config, PopularityConfig, "Popularity")
        self.config = config or PopularityConfig()
        self.counts: NDArray[np.float32] | None = None
        self.item_ids: NDArray[Any] | None = None  # the training items, set by fit

    @property
    def n_items(self) -> int:
        return _check_fitted(None if self.counts is None else len(self.counts), "Popularity")

    def fit(self, train: Interactions) -> Popularity:
        """Count each item's training users.

        Args:
            train: The training users.

        Returns:
            ``self``.

        Raises:
            ValueError: The training matrix is empty.
            TypeError: ``train`` is not an ``Interactions`` (e.g. its matrix, or a split).
        """
        _check_nonempty(train, "Popularity")
        self.counts = train.item_counts().astype(np.float32)
        self.item_ids = train.item_ids
        return self

    def score(self, histories: sp.csr_array) -> torch.Tensor:
        """The training counts for every user, as a read-only expanded view.

        Args:
            histories: ``(n_users, n_items)`` fold-in histories (only their number is used).

        Returns:
            ``(n_users, n_items)`` float32 tensor (a broadcast view: copy before writing).

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        histories = _check_histories(histories, self.n_items)
        assert self.counts is not None
        return torch.from_numpy(self.counts).expand(histories.shape[0], -1)


# ------------------------------------------------------------------------------ EASE
def _ease_dtype(config: EASEConfig, n_items: int) -> np.dtype[Any]:
    if config.dtype == "float64":
        return np.dtype(np.float64)
    if config.dtype == "float32":
        return np.dtype(np.float32)
    return np.dtype(np.float64 if n_items**2 * 8 <= _FLOAT64_MAX_BYTES else np.float32)


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer from a ``/proc`` or cgroup file (the value after ``key``, in kB for
    ``/proc/meminfo``), or None when the file is missing or says ``max``."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                if key is None:
                    text = line.strip()
                    return int(text) if text.isdigit() else None
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# cgroup v2, then v1: (folder, limit file, usage file, inactive page cache key in memory.stat).
_CGROUP_MEMORY_FILES: list[tuple[str, str, str, str]] = [
    ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
     "total_inactive_file"),
]  # fmt: skip


def _read_stat(path: str, key: str) -> int | None:
    """The value of ``key`` in a cgroup ``memory.stat`` file (bytes), or None."""
    try:
        with open(path, encoding="ascii") as file:
            for line in file:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _available_memory_bytes(device: torch.device) -> int | None:
    """Memory that a new allocation can use on ``device`` now, or None if unknown.

    CPU: the kernel's ``MemAvailable``, bounded by a cgroup (container) limit less its working
    set (usage less inactive page cache), or the physical memory where neither is readable.
    CUDA: the free memory torch reports.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    known: list[int] = []
    available = _read_int("/proc/meminfo", "MemAvailable:")
    if available is not None:
        known.append(available)
    for folder, limit_name, usage_name, inactive_key in _CGROUP_MEMORY_FILES:
        limit = _read_int(f"{folder}/{limit_name}")
        usage = _read_int(f"{folder}/{usage_name}")
        if limit is None or usage is None or limit >= 2**60:
            continue
        # The usage counts the page cache, which the kernel reclaims before it kills anyone:
        # less its inactive part it is the container's working set (as Kubernetes counts it).
        inactive = _read_stat(f"{folder}/memory.stat", inactive_key) or 0
        known.append(max(limit - max(usage - inactive, 0), 0))
    if not known:
        try:
            known.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):  # pragma: no cover - not a POSIX system
            return None
    return min(known)


def _check_ease_memory(
    n_items: int, dtype: np.dtype[Any], device: torch.device, n_matrices: int = 1
) -> None:
    """Refuse, before allocating it, a dense EASE matrix that does not fit in memory.

    ``n_items^2`` floats are allocated at once and then all touched by the factorization: with
    too little memory that is a ``MemoryError`` at best and the kernel's OOM killer at worst.

    Raises:
        ValueError: ``n_matrices`` dense ``n_items x n_items`` matrices of ``dtype`` exceed the
            memory available on ``device``; the message gives both sizes.
    """
    available = _available_memory_bytes(device)
    needed = n_matrices * n_items**2 * np.dtype(dtype).itemsize
    if available is None or needed <= available:
        return
    what = "a dense" if n_matrices == 1 else f"{n_matrices} dense"
    raise ValueError(
        f"EASE needs {what} {n_items:,} x {n_items:,} {np.dtype(dtype)} matrix "
        f"({_format_bytes(needed)}) but only {_format_bytes(available)} of memory is available "
        f"on {device}; use dtype='float32', fewer items (e.g. drop rare ones) or more memory"
    )


def _format_bytes(n_bytes: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} bytes"


def _sparse_gram(matrix: sp.csr_array, dtype: np.dtype[Any]) -> sp.csr_array:
    """``X^T X`` as a sparse matrix (item co-occurrence counts), ``(n_items, n_items)``."""
    x = sp.csr_array(matrix).astype(dtype)
    return sp.csr_array(x.T @ x)


def _mirror_lower_to_upper(matrix: NDArray[np.floating[Any]]) -> None:
    """Copy the lower triangle onto the upper one, in place, one row block at a time."""
    n = matrix.shape[0]
    for start in range(0, n, _SYMMETRIZE_BLOCK):
        stop = min(start + _SYMMETRIZE_BLOCK, n)
        block = matrix[start:stop, start:stop]
        upper = np.triu_indices(stop - start, 1)
        block[upper] = block.T[upper]
        if stop < n:
            matrix[start:stop, stop:] = matrix[stop:, start:stop].T


def ease_weights(
    gram: sp.csr_array | NDArray[np.floating[Any]],
    regularization: float,
    *,
    dtype: np.dtype[Any] | type[np.floating[Any]] = np.float64,
) -> NDArray[np.floating[Any]]:
    """EASE's item-item weights ``B`` from the Gram matrix ``X^T X``, on the CPU.

    ``P = (G + lambda I)^-1`` by a Cholesky factorization and inversion done in place
    (LAPACK ``potrf``/``potri``), then ``B_ij = -P_ij / P_jj`` and ``B_jj = 0``.

    Args:
        gram: ``(n_items, n_items)`` symmetric Gram matrix, sparse or dense (a dense input of
            ``dtype`` is overwritten and returned; anything else is copied first).
        regularization: ``lambda`` > 0.
        dtype: float64 or float32.

    Returns:
        ``B``, ``(n_items, n_items)`` of ``dtype``.

    Raises:
        ValueError: ``regularization`` is not a finite positive number, the matrix is not
            square, the dense copy it needs would not fit in the available memory (checked
            before allocating it), or it is not positive definite (which a Gram matrix plus
            ``lambda I`` always is, unless it holds NaN or infinite values).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if not (_is_number(regularization) and math.isfinite(regularization) and regularization > 0):
        raise ValueError(f"regularization must be a finite number > 0, got {regularization!r}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the Gram matrix must be square, got shape {gram.shape}")
    n = gram.shape[0]
    in_place = isinstance(gram, np.ndarray) and gram.dtype == dtype and gram.flags.c_contiguous
    if not in_place:
        _check_ease_memory(n, dtype, torch.device("cpu"))
    if sp.issparse(gram):
        weights = np.zeros((n, n), dtype=dtype)
        sp.csr_array(gram).astype(dtype).toarray(out=weights)
    elif in_place:
        weights = cast(NDArray[np.floating[Any]], gram)
    else:
        weights = np.ascontiguousarray(gram, dtype=dtype)
    weights[np.diag_indices(n)] += dtype.type(regularization)
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (weights,))
    # The matrix is symmetric, so its transpose is the same matrix in Fortran order: LAPACK then
    # works in place. Its upper triangle is the C-order lower triangle.
    fortran = weights.T
    factor, info = potrf(fortran, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise ValueError(
            f"X^T X + lambda I is not positive definite (LAPACK potrf info={info}); "
            "the data may contain NaN or infinite values"
        )
    inverse, info = potri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise ValueError(f"inverting X^T X + lambda I failed (LAPACK potri info={info})")
    if not np.shares_memory(inverse, weights):  # pragma: no cover - LAPACK copied the input
        logger.warning("EASE inversion was not done in place; peak memory doubled")
        weights = np.ascontiguousarray(inverse.T)
    _mirror_lower_to_upper(weights)  # weights = P, symmetric
    diagonal = np.diag(weights).copy()
    np.divide(weights, -diagonal[None, :], out=weights)  # B_ij = -P_ij / P_jj
    weights[np.diag_indices(n)] = 0.0
    return weights


def _ease_weights_torch(
    gram: sp.csr_array, regularization: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """EASE's ``B`` computed by torch on ``device`` (needs about twice the matrix there)."""
    n = gram.shape[0]
    _check_ease_memory(n, np.dtype(np.float64 if dtype == torch.float64 else np.float32), device, 2)
    coo = sp.coo_array(gram)
    dense = torch.zeros((n, n), dtype=dtype, device=device)  # (n_items, n_items)
    dense[
        torch.as_tensor(coo.row, dtype=torch.long, device=device),
        torch.as_tensor(coo.col, dtype=torch.long, device=device),
    ] = torch.as_tensor(coo.data, dtype=dtype, device=device)
    dense.diagonal().add_(regularization)
    factor, info = torch.linalg.cholesky_ex(dense)
    if int(info) != 0:
        raise ValueError(f"X^T X + lambda I is not positive definite (cholesky info={int(info)})")
    del dense
    weights = torch.cholesky_inverse(factor)  # P
    del factor
    weights.div_(-weights.diagonal().clone()[None, :])  # B_ij = -P_ij / P_jj
    weights.diagonal().zero_()
    return weights


class EASE:
    """EASE (Steck 2019): ``scores = history @ B`` with ``B`` in closed form.

    Args:
        config: ``regularization`` (lambda) and the float type.
        device: ``"cpu"`` (NumPy/LAPACK, in place) or a CUDA device, or ``"auto"`` (CUDA when
            available). Not a model setting: the weights are the same up to rounding.

    Raises:
        TypeError: ``config`` is not an :class:`EASEConfig` (e.g. a dict).
        ValueError: ``device`` names no available device.
    """

    def __init__(self, config: EASEConfig | None = None, *, device: str = "cpu") -> None:
        _check_config(config, EASEConfig, "EASE")
        self.config = config or EASEConfig()
        self.device = resolve_device(device)
        self.weights: NDArray[np.floating[Any]] | torch.Tensor | None = None
        self.fit_seconds: float | None = None
        self.item_ids: NDArray[Any] | None = None  # the training items, set by fit

    @property
    def n_items(self) -> int:
        return _check_fitted(None if self.weights is None else self.weights.shape[0], "EASE")

    def fit(self, train: Interactions) -> EASE:
        """Compute ``B`` from the training users.

        Args:
            train: The training users.

        Returns:
            ``self``.

        Raises:
            ValueError: The training matrix is empty, or the dense ``n_items x n_items`` matrix
                would not fit in the memory available on the device (checked before any work).
            TypeError: ``train`` is not an ``Interactions`` (e.g. its matrix, or a split).
        """
        _check_nonempty(train, "EASE")
        dtype = _ease_dtype(self.config, train.n_items)
        self.weights = None  # free the previous matrix before measuring the memory left
        _check_ease_memory(train.n_items, dtype, self.device, 1 if self.device.type == "cpu" else 2)
        self._fit_gram(_sparse_gram(train.matrix, dtype), dtype)
        self.item_ids = train.item_ids
        return self

    def _fit_gram(self, gram: sp.csr_array, dtype: np.dtype[Any]) -> EASE:
        start = time.perf_counter()
        self.weights = None  # free the previous matrix before building the next
        if self.device.type == "cpu":
            self.weights = ease_weights(gram, self.config.regularization, dtype=dtype)
        else:
            torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
            self.weights = _ease_weights_torch(
                gram, self.config.regularization, self.device, torch_dtype
            )
        self.fit_seconds = time.perf_counter() - start
        logger.info(
            "EASE lambda=%g: %d items, %s on %s, %.1fs",
            self.config.regularization,
            gram.shape[0],
            dtype,
            self.device,
            self.fit_seconds,
        )
        return self

    def score(self, histories: sp.csr_array) -> NDArray[np.floating[Any]] | torch.Tensor:
        """``history @ B`` for each fold-in history.

        Args:
            histories: ``(n_users, n_items)`` binary fold-in histories.

        Returns:
            ``(n_users, n_items)`` scores (NumPy on the CPU path, a tensor on a CUDA device).

        Raises:
            ValueError: Not fitted, the histories have the wrong width, or hold a negative,
                NaN or infinite value.
        """
        histories = _check_histories(histories, self.n_items)
        weights = self.weights
        if isinstance(weights, np.ndarray):
            # Sparse times dense: cost nnz(histories) * n_items, not n_users * n_items^2.
            return np.asarray(histories.astype(weights.dtype) @ weights)
        assert weights is not None
        dense = torch.from_numpy(np.asarray(histories.toarray(), dtype=np.float32)).to(
            weights.device, weights.dtype
        )  # (n_users, n_items)
        return dense @ weights


@dataclass(frozen=True)
class LambdaSelection:
    """The outcome of :func:`select_ease_lambda`.

    Attributes:
        best: The chosen ``lambda``.
        scores: ``lambda -> validation metric`` for every candidate, in the order tried.
        metric: The validation metric that chose (``"ndcg@100"``).
        model: EASE fitted with the best ``lambda`` on the training users.
    """

    best: float
    scores: dict[float, float]
    metric: str
    model: EASE


def select_ease_lambda(
    train: Interactions,
    validation: HeldOut,
    lambdas: Sequence[float],
    *,
    config: EASEConfig | None = None,
    device: str = "cpu",
    metric: str = "ndcg@100",
    batch_size: int = 1024,
) -> LambdaSelection:
    """Choose EASE's ``lambda`` by a validation metric; test users are never seen here.

    The Gram matrix is computed once; each candidate is fitted on ``train`` and scored on
    ``validation`` (fold-in -> targets). Ties go to the candidate tried first. The best model is
    kept while its matrix fits in 2 GiB; a larger one is fitted again at the end, so that only
    one dense matrix is ever held.

    Args:
        train: The training users.
        validation: Validation users (fold-in and targets).
        lambdas: Candidate values, each > 0, at least one.
        config: Other EASE settings (``dtype``); its ``regularization`` is ignored.
        device: As for :class:`EASE`.
        metric: A per-user metric that :func:`recvae.evaluate` computes, e.g. ``"ndcg@100"``.
        batch_size: Users scored at once.

    Returns:
        The :class:`LambdaSelection`.

    Raises:
        ValueError: No candidate, a candidate <= 0, a bad metric name (checked before any
            work), a validation set over other items (or the same in another order) or
            with no user with targets, or an EASE matrix that would not fit in memory.
        TypeError: ``lambdas`` is not a sequence of numbers, or ``validation`` is not a
            ``HeldOut``, or ``train`` not an ``Interactions``.
    """
    if isinstance(lambdas, str | bytes) or not isinstance(lambdas, Iterable):
        raise TypeError(f"lambdas must be a sequence of numbers such as [100.0], got {lambdas!r}")
    candidates_in = list(lambdas)
    wrong = [value for value in candidates_in if not _is_number(value)]
    if wrong:
        raise TypeError(f"every lambda must be a number, got {wrong}")
    candidates = [float(value) for value in candidates_in]
    if not candidates:
        raise ValueError("lambdas must hold at least one candidate")
    bad = [value for value in candidates if not (math.isfinite(value) and value > 0)]
    if bad:
        raise ValueError(f"every lambda must be a finite number > 0, got {bad}")
    name, k = _parse_metric(metric, "metric")
    _check_config(config, EASEConfig, "select_ease_lambda")
    if isinstance(validation, Split):
        raise TypeError("validation must be a HeldOut, got a Split: pass split.validation")
    if not isinstance(validation, HeldOut):
        raise TypeError(f"validation must be a HeldOut, got {type(validation).__name__}")
    _check_nonempty(train, "EASE")
    _check_same_items(validation, train, "validation", "the training data")
    if validation.n_users_with_targets == 0:
        raise ValueError(
            f"validation has no user with targets ({validation.n_users} users): it cannot "
            "choose lambda"
        )
    base = config or EASEConfig()
    dtype = _ease_dtype(base, train.n_items)
    run_device = resolve_device(device)
    per_fit = 1 if run_device.type == "cpu" else 2
    _check_ease_memory(train.n_items, dtype, run_device, per_fit)
    # Keeping the best model means a second matrix while the next candidate is fitted.
    available = _available_memory_bytes(run_device)
    keep_best = train.n_items**2 * dtype.itemsize <= _KEEP_BEST_MAX_BYTES and (
        available is None or (per_fit + 1) * train.n_items**2 * dtype.itemsize <= available
    )
    gram = _sparse_gram(train.matrix, dtype)
    scores: dict[float, float] = {}
    best_value, best_score = candidates[0], -math.inf
    best_model: EASE | None = None
    model: EASE | None = None
    for value in candidates:
        model = None  # drop the previous matrix (unless it is the kept best) before the next
        model = EASE(base.replace(regularization=value), device=device)  # type: ignore[arg-type]
        model._fit_gram(gram, dtype)
        model.item_ids = train.item_ids
        result = evaluate(
            model,
            validation.fold_in.matrix,
            validation.targets.matrix,
            ks=(k,),
            metrics=(name,),
            batch_size=batch_size,
            device=str(model.device),
        )
        score = result.mean(metric)
        scores[value] = score
        logger.info("EASE lambda=%g: validation %s %.4f", value, metric, score)
        if score > best_score:
            best_value, best_score = value, score
            best_model = model if keep_best else None
    if best_model is None:
        if model is not None and model.config.regularization == best_value:
            best_model = model  # the last candidate won: no refit needed
        else:
            model = None
            best_model = EASE(base.replace(regularization=best_value), device=device)  # type: ignore[arg-type]
            best_model._fit_gram(gram, dtype)
            best_model.item_ids = train.item_ids
    return LambdaSelection(best=best_value, scores=scores, metric=metric, model=best_model)
