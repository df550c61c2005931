"""EASE for catalogs too large for SciPy's 32-bit-index LAPACK (gowalla: 41k items).

``recvae.baselines.ease_weights`` factorizes in place with SciPy's LAPACK, whose OpenBLAS uses
32-bit indices; on gowalla's 40,981 x 40,981 float32 matrix (6.7 GB) it crashed
(segmentation fault inside ``libscipy_openblas``). NumPy's wheel ships a 64-bit-index (ILP64)
OpenBLAS; this module calls its ``spotrf``/``spotri`` through ctypes, in place, with the same
algebra: ``P = (X^T X + lambda I)^-1``, ``B_ij = -P_ij / P_jj``, ``B_jj = 0``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from recvae.data import Interactions


def _library() -> ctypes.CDLL:
    folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    paths = sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*.so")))
    if not paths:
        raise RuntimeError("NumPy's ILP64 OpenBLAS (libscipy_openblas64_*.so) was not found")
    return ctypes.CDLL(paths[0])


def ease_weights_ilp64(train: Interactions, regularization: float) -> NDArray[np.float32]:
    """EASE's ``B`` (float32, ``(n_items, n_items)``), factorized in place with ILP64 LAPACK."""
    lib = _library()
    x = sp.csr_array(train.matrix).astype(np.float32)
    gram = sp.csr_array(x.T @ x)
    n = gram.shape[0]
    weights = np.zeros((n, n), dtype=np.float32)
    gram.toarray(out=weights)
    del gram
    weights[np.diag_indices(n)] += np.float32(regularization)
    # Symmetric: the C-order array is its own transpose in Fortran order; LAPACK's upper
    # triangle is the C-order lower triangle.
    uplo = ctypes.c_char(b"U")
    size = ctypes.c_int64(n)
    info = ctypes.c_int64(0)
    pointer = weights.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    args: list[Any] = [ctypes.byref(uplo), ctypes.byref(size), pointer, ctypes.byref(size)]
    lib.scipy_spotrf_64_(*args, ctypes.byref(info), ctypes.c_size_t(1))
    if info.value != 0:
        raise ValueError(f"spotrf failed (info={info.value})")
    lib.scipy_spotri_64_(*args, ctypes.byref(info), ctypes.c_size_t(1))
    if info.value != 0:
        raise ValueError(f"spotri failed (info={info.value})")
    # Fill the C-order upper triangle from the lower one, a block of rows at a time.
    block = 1024
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = weights[start:stop]
        upper = np.triu_indices(stop - start, k=1, m=n - start)
        rows[:, start:][upper] = weights[start:, start:stop].T[upper]
    diagonal = np.diag(weights).copy()
    np.divide(weights, -diagonal[None, :], out=weights)
    weights[np.diag_indices(n)] = 0.0
    return weights


class LargeEASE:
    """A :class:`~recvae.evaluation.Ranker` over weights from :func:`ease_weights_ilp64`."""

    def __init__(self, regularization: float) -> None:
        self.regularization = regularization
        self.weights: NDArray[np.float32] | None = None
        self.fit_seconds: float | None = None

    @property
    def n_items(self) -> int:
        assert self.weights is not None
        return int(self.weights.shape[0])

    def fit(self, train: Interactions) -> LargeEASE:
        start = time.perf_counter()
        self.weights = ease_weights_ilp64(train, self.regularization)
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, histories: sp.csr_array) -> NDArray[np.float32]:
        assert self.weights is not None
        return np.asarray(sp.csr_array(histories).astype(np.float32) @ self.weights)
