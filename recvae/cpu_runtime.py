"""CPU training runtime: heap reuse for large tensors, and the faster BLAS for the logits.

Two costs of a CPU training step that are not arithmetic, each measured on the project's
2-core AMD EPYC machine with torch's bundled MKL (``benchmarks/cpu_runtime.py``):

- **Page faults.** glibc serves a block larger than its mmap threshold (dynamic, at most
  32 MiB) with fresh pages from the kernel and unmaps it on ``free``. A step over a large
  catalog allocates several such blocks, each ``(batch, n_items)`` or ``(n_items, hidden)`` in
  float32 (78 MiB for 500 users of gowalla's 40,981 items): the logits, the likelihood's
  gradient, the weight gradients. Every page of each is faulted in and zeroed by the kernel
  again every step: a fresh 78 MiB tensor took 61 ms to allocate, fill and free, a reused one
  6-7 ms. :func:`reuse_freed_memory` keeps freed blocks in the process heap while training runs
  (``mallopt``: no mmap, no trimming), so later steps reuse the same pages, and hands the memory
  back to the system (``malloc_trim``) when it ends. Exact: only where memory comes from
  changes.
- **The products over all items.** ``logits = h @ W.T + b`` and its two gradient products are
  the largest of a step. MKL's single-precision kernel for the forward shape ran at 36-55
  GFLOP/s on that CPU where the OpenBLAS that NumPy's wheels bundle ran at 63-87; for the
  gradient products either was faster, depending on the run. When torch runs on one thread,
  :func:`linear` times both BLAS for each product once per shape in the process and keeps the
  faster, preferring torch unless NumPy's BLAS is clearly faster; both compute the same float32
  product (they differ in rounding only, so ``$RECVAE_CPU_BLAS`` = ``torch`` or ``numpy`` pins
  the choice for runs that must repeat bit for bit). On more threads it leaves every product
  to torch: the two libraries' thread pools then contend for the cores.

Neither applies off the CPU, and both fall back to plain torch where they cannot work (not
glibc; no threadpoolctl to hold NumPy's BLAS to torch's thread count).

:func:`bf16_support` tells whether the CPU has bf16 dot-product units (AVX512_BF16 or AMX),
which decides whether ``precision = "bf16"`` pays on it: with them the products over all items
run about three times faster than in float32, without them slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reuse_freed_memory",
    "linear",
    "blas_choices",
    "pinned_blas",
    "BLAS_VARIABLE",
    "bf16_support",
]

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
_NUMPY_MARGIN = 0.9  # NumPy's BLAS is used only when it takes at most 90% of torch's time
#: ``(product, in_features, out_features) -> "torch" | "numpy"``, on one thread; the products
#: are ``"forward"`` (``x @ W.T + b``), ``"grad_input"`` (``G @ W``), ``"grad_weight"``
#: (``G.T @ x``).
_choices: dict[tuple[str, int, int], str] = {}
_openblas: Any = None
_blas_lock = threading.Lock()


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


def _numpy_matmul(a: Tensor, b: Tensor, threads: int, blas: Any) -> Tensor:
    """``a @ b`` (2-D float32, any strides) by NumPy's BLAS on ``threads`` threads."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)  # (rows of a, columns of b)
    # One product at a time: the thread count is process-wide state of the library (and each
    # product already uses all of its threads).
    with _blas_lock:
        before = blas.num_threads
        if before != threads:
            blas.set_num_threads(threads)
        try:
            np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.numpy())
        finally:
            if before != threads:
                blas.set_num_threads(before)
    return out


def _numpy_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, threads: int, blas: Any
) -> Tensor:
    """``x @ weight.T + bias`` by NumPy's BLAS on ``threads`` threads, into a torch tensor."""
    out = _numpy_matmul(x, weight.t(), threads, blas)  # (batch, out)
    if bias is not None:
        out.add_(bias)
    return out


BLAS_VARIABLE = "RECVAE_CPU_BLAS"


def pinned_blas() -> str | None:
    """The BLAS ``$RECVAE_CPU_BLAS`` pins the one-thread products to (``"torch"`` or
    ``"numpy"``), or None to time them (unset, empty or ``auto``).

    Timing picks per process, so two runs of one seed on one thread can take different BLAS for
    a product and differ in rounding; pinning makes such runs repeatable bit for bit.

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(BLAS_VARIABLE, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "numpy"):
        raise ValueError(
            f"{BLAS_VARIABLE} must be auto, torch or numpy, got {os.environ[BLAS_VARIABLE]!r}"
        )
    return value


def _choose(
    key: tuple[str, int, int], by_torch: Callable[[], Tensor], by_numpy: Callable[[], Tensor]
) -> str:
    """Time both BLAS on one product (best of two runs each); the faster, kept for ``key``."""
    choice = _choices.get(key)
    if choice is not None:
        return choice

    def best(fn: Callable[[], Tensor]) -> float:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    pinned = pinned_blas()
    if pinned is not None:
        choice = _choices[key] = pinned
        logger.info("CPU %s %d->%d on one thread: %s (%s)", *key, choice, BLAS_VARIABLE)
        return choice
    with torch.no_grad():
        t_torch, t_numpy = best(by_torch), best(by_numpy)
    choice = _choices[key] = "numpy" if t_numpy <= _NUMPY_MARGIN * t_torch else "torch"
    logger.info(
        "CPU %s %d->%d on one thread: torch %.1f ms, NumPy BLAS %.1f ms; using %s",
        *key,
        t_torch * 1e3,
        t_numpy * 1e3,
        choice,
    )
    return choice


def _product(
    name: str, weight: Tensor, by_torch: Callable[[], Tensor], by_numpy: Callable[[], Tensor]
) -> Tensor:
    """One of the layer's products, by the BLAS chosen for it (timed on first use)."""
    key = (name, int(weight.shape[1]), int(weight.shape[0]))
    return (by_numpy if _choose(key, by_torch, by_numpy) == "numpy" else by_torch)()


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, blas: Any) -> Tensor:
    return _product(
        "forward",
        weight,
        lambda: F.linear(x, weight, bias),
        lambda: _numpy_linear(x, weight, bias, 1, blas),
    )


class _CpuLinear(torch.autograd.Function):
    """``F.linear`` whose three products each run on the BLAS chosen for them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, blas: Any) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.blas = blas
        return _forward(x.detach(), weight.detach(), bias, blas)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        blas = ctx.blas
        grad = grad.contiguous()  # (batch, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (batch, in)
            grad_x = _product(
                "grad_input",
                weight,
                lambda: grad.mm(weight),
                lambda: _numpy_matmul(grad, weight, 1, blas),
            )
        if ctx.needs_input_grad[1]:  # (out, in)
            grad_w = _product(
                "grad_weight",
                weight,
                lambda: grad.t().mm(x),
                lambda: _numpy_matmul(grad.t(), x, 1, blas),
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)  # (out,)
        return grad_x, grad_w, grad_b, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on the CPU by whichever BLAS is faster for each product.

    The forward product and, in training, the two gradient products are each timed once per
    shape in the process (:func:`blas_choices`). This applies when torch runs on one thread
    (``RunOptions.num_threads = 1``, ``--threads 1``): with more, the two libraries' thread pools
    slow each other down, and torch's BLAS does everything. Off the CPU, for anything but
    contiguous float32 2-D input, under autocast, ``torch.compile`` or tracing, and for small
    products (fewer than 64 rows or 1,024 outputs, where the choice does not matter), this is
    ``F.linear``.
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
        # torch.jit.trace and ONNX export record F.linear (is_tracing is unannotated in torch)
        or torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        # With more threads, OpenBLAS's and torch's OpenMP thread pools contend for the cores
        # (each spins after its work): on 2 threads ml-1m's three products in sequence took
        # 148 ms with NumPy's BLAS for one of them, 65 ms on torch's alone
        # (benchmarks/cpu_runtime.py).
        or torch.get_num_threads() != 1
        or (blas := _numpy_blas()) is None
    ):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return cast(Tensor, _CpuLinear.apply(x, weight, bias, blas))  # type: ignore[no-untyped-call]
    return _forward(x, weight, bias, blas)


def blas_choices() -> dict[tuple[str, int, int], str]:
    """The choices made so far: ``(product, in_features, out_features) -> "torch" | "numpy"``."""
    return dict(_choices)


# ---------------------------------------------------------------------------- bf16 on the CPU
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux cpuinfo flags of bf16 dot-product units


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (Linux), or None where
    the file cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    if fields:
                        break  # the end of the first processor's block
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


def _cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    info = _cpuinfo(path)
    if info is None or "flags" not in info:
        return None
    return set(info["flags"].split())


def bf16_support(flags: set[str] | None = None) -> str:
    """How this CPU runs torch's bf16 matrix products: ``"native"``, ``"emulated"`` or ``"none"``.

    - ``native``: bf16 dot-product instructions (AVX512_BF16 or AMX): oneDNN's bf16 GEMMs run
      at about twice float32's rate or more (three times on the project's 2-core machine,
      ``benchmarks/cpu_runtime.py --sections bf16``).
    - ``emulated``: oneDNN takes bf16 on AVX-512 without such units, converting to float32.
    - ``none``: neither (AVX2 CPUs, other architectures): torch's fallback kernels, many times
      slower than float32.

    ``flags`` defaults to ``/proc/cpuinfo``'s; where they cannot be read (not Linux), a CPU
    that oneDNN takes bf16 on counts as emulated.
    """
    if flags is None:
        flags = _cpu_flags()
    if flags is not None and not flags.isdisjoint(BF16_FLAGS):
        return "native"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if flags is not None:
        return "emulated" if onednn and "avx512bw" in flags else "none"
    return "emulated" if onednn else "none"
