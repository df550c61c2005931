"""CPU training runtime: heap reuse for large tensors, and the faster BLAS for the logits.

Two costs of a CPU training step that are not arithmetic, each measured on the project's
2-core AMD EPYC (Zen 3) machine with torch's bundled MKL (``benchmarks/train_speed.py``):

- **Page faults.** glibc serves a block larger than its mmap threshold (dynamic, at most
  32 MiB) with fresh pages from the kernel and unmaps it on ``free``. A step over a large
  catalog allocates several such blocks, each ``(batch, n_items)`` or ``(n_items, hidden)`` in
  float32 (82 MiB for 500 users of gowalla's 40,981 items): the logits, the likelihood's
  gradient, the weight gradients. Every page of each is faulted in and zeroed by the kernel
  again every step; filling a fresh 82 MiB tensor took 62 ms against 6 ms for a reused one.
  :func:`reuse_freed_memory` keeps freed blocks in the process heap while training runs
  (``mallopt``: no mmap, no trimming), so later steps reuse the same pages, and hands the memory
  back to the system (``malloc_trim``) when it ends. Exact: only where memory comes from
  changes.
- **The logits GEMM.** ``logits = h @ W.T + b`` over all items is the largest product of a
  step. MKL's single-precision kernel for this shape ran at 42 GFLOP/s on that CPU where the
  OpenBLAS that NumPy's wheels bundle ran at 72-88 (the two gradient products ran at about the
  same speed in both). :func:`linear` times both once per shape and thread count in the process
  and keeps the faster, preferring torch unless NumPy's BLAS is clearly faster; both compute
  the same float32 product (they differ in rounding only).

Neither applies off the CPU, and both fall back to plain torch where they cannot work (not
glibc; no threadpoolctl to hold NumPy's BLAS to torch's thread count).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reuse_freed_memory", "linear", "blas_choices"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the heap
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
# What glibc's dynamic thresholds settle at in a process that frees large blocks: the mmap
# threshold at its 32 MiB ceiling, trimming at twice that. Restored at the end (setting any
# threshold turns glibc's dynamic adjustment off for the rest of the process).
_MMAP_THRESHOLD_AFTER = 32 * 1024 * 1024
_TRIM_THRESHOLD_AFTER = 64 * 1024 * 1024
_TRIM_THRESHOLD_DURING = 1 << 62  # never trim while training

_heap_lock = threading.Lock()
_heap_depth = 0
_libc: Any = None


def _glibc() -> Any:
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else ``None``."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None)
            lib.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.mallopt.restype = ctypes.c_int
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _mallopt(lib: Any, param: int, value: int) -> bool:
    value = min(value, 2**31 - 1)  # mallopt takes an int
    return bool(lib.mallopt(param, value))


@contextmanager
def reuse_freed_memory(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Keep freed large blocks in the heap for the duration (glibc, CPU only); re-entrant.

    Yields whether the setting is active (``False`` for a non-CPU device or a C library other
    than glibc, where it does nothing). On exit the heap's free memory goes back to the system.
    """
    global _heap_depth
    if torch.device(device).type != "cpu" or (lib := _glibc()) is None:
        yield False
        return
    with _heap_lock:
        _heap_depth += 1
        if _heap_depth == 1:
            _mallopt(lib, _M_TRIM_THRESHOLD, _TRIM_THRESHOLD_DURING)
            _mallopt(lib, _M_MMAP_MAX, 0)
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                _mallopt(lib, _M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
                _mallopt(lib, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
                _mallopt(lib, _M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
                lib.malloc_trim(0)


# ---------------------------------------------------------------------------- the BLAS
_NUMPY_MARGIN = 0.85  # NumPy's BLAS is used only when it takes at most 85% of torch's time
_choices: dict[tuple[int, int, int], str] = {}  # (in, out, threads) -> "torch" | "numpy"
_openblas: Any = None


def _numpy_blas() -> Any:
    """threadpoolctl's handle on NumPy's OpenBLAS, or ``None`` (then torch does every GEMM)."""
    global _openblas
    if _openblas is None:
        try:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
            # NumPy's own copy (scipy-openblas); another package may load one more.
            _openblas = next((lib for lib in libs if "numpy" in lib.filepath), False)
        except Exception:  # threadpoolctl missing or unable to inspect this process
            _openblas = False
    return _openblas or None


def _numpy_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, threads: int, blas: Any
) -> Tensor:
    """``x @ weight.T + bias`` by NumPy's BLAS on ``threads`` threads, into a torch tensor."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)  # (batch, out)
    before = blas.num_threads
    if before != threads:
        blas.set_num_threads(threads)
    try:
        np.matmul(x.detach().numpy(), weight.detach().numpy().T, out=out.numpy())
    finally:
        if before != threads:
            blas.set_num_threads(before)
    if bias is not None:
        out.add_(bias)
    return out


def _choose(x: Tensor, weight: Tensor, bias: Tensor | None, threads: int, blas: Any) -> str:
    """Time both BLAS on this product (best of two each) and keep the faster for its shape."""

    def best(fn: Any) -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_torch = best(lambda: F.linear(x, weight, bias))
    t_numpy = best(lambda: _numpy_linear(x, weight, bias, threads, blas))
    choice = "numpy" if t_numpy <= _NUMPY_MARGIN * t_torch else "torch"
    logger.info(
        "CPU linear %d->%d on %d thread(s): torch %.1f ms, NumPy BLAS %.1f ms; using %s",
        weight.shape[1],
        weight.shape[0],
        threads,
        t_torch * 1e3,
        t_numpy * 1e3,
        choice,
    )
    return choice


class _NumpyLinear(torch.autograd.Function):
    """``F.linear`` whose forward product runs on NumPy's BLAS; torch's backward products."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, threads: int) -> Tensor:
        blas = _numpy_blas()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _numpy_linear(x, weight, bias, threads, blas)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (batch, in)
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None  # (out, in)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return grad_x, grad_w, grad_b, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on the CPU by whichever BLAS is faster for the shape.

    Off the CPU, for anything but contiguous float32 2-D input, under autocast, ``torch.compile``
    or tracing, and for small products (fewer than 64 rows or 1,024 outputs, where the
    choice does not matter), this is ``F.linear``.
    """
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.dim() != 2
        or x.shape[0] < 64
        or weight.shape[0] < 1024
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or (bias is not None and bias.dtype != torch.float32)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # torch.jit.trace and ONNX export record F.linear
        or (blas := _numpy_blas()) is None
    ):
        return F.linear(x, weight, bias)
    threads = torch.get_num_threads()
    key = (int(weight.shape[1]), int(weight.shape[0]), threads)
    choice = _choices.get(key)
    if choice is None:
        with torch.no_grad():
            choice = _choices[key] = _choose(x.detach(), weight.detach(), bias, threads, blas)
    if choice == "torch":
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _numpy_linear(x, weight, bias, threads, blas)
    return _NumpyLinear.apply(x, weight, bias, threads)  # type: ignore[no-untyped-call]


def blas_choices() -> dict[tuple[int, int, int], str]:
    """The choices made so far: ``(in_features, out_features, threads) -> "torch" | "numpy"``."""
    return dict(_choices)
