"""The two CPU runtime effects of ``recvae.cpu_runtime``, each measured on its own.

Usage (from the repository root)::

    .venv/bin/python benchmarks/cpu_runtime.py --threads 1 --repeats 7

1. Heap reuse: one training step's worth of a large float32 tensor (``batch x n_items``) is
   allocated, filled and freed, as the logits and gradients are every step; the median time and
   minor page faults of that, with glibc's default heap settings and inside
   ``reuse_freed_memory()``.
2. The logits product ``h @ W.T + b`` (``batch x hidden`` times ``hidden x n_items``) by torch's
   ``F.linear`` (its bundled BLAS, MKL on x86) and by NumPy's BLAS (OpenBLAS in NumPy's wheels),
   as ``cpu_runtime.linear`` times them, plus the two gradient products for comparison.
3. The three products back to back, all on torch's BLAS or with the forward one on NumPy's: on
   more than one thread this shows the two libraries' thread pools slowing each other down,
   which is why ``cpu_runtime.linear`` uses NumPy's BLAS only on one thread.
4. Aligned rows: the three products over ``n_items`` and over ``n_items`` rounded up to a
   multiple of 64 (the padded logits of ``recvae.model.padded_output``, which training uses on
   more than one thread), with the time per 1,000 items to compare; on torch's BLAS, and on one
   thread also on NumPy's.
5. The padded layer, forward and backward together, three ways taken in turns: in place (what
   ``recvae.model.padded_output`` does on the CPU: the product written into the first
   ``n_items`` columns of the padded output, the gradients read from those columns), over a
   zero-padded copy of the weight (what it did before, and still does on a GPU), and unpadded.
6. The sparse first layer, forward and backward together, two ways taken in turns: with the
   backward pass a bag sum over the transposed batch (``recvae.model._ItemBag``, what training
   uses on the CPU) and with ``F.embedding_bag``'s own backward (what it did before, and still
   does on a GPU). The batches are the first 500 users of a shuffle of the split's training
   users (``--data-dir`` or ``--split-cache``, as train_speed), one per repeat.

7. bf16 (``--sections bf16``): the three products over all items in float32 and in bfloat16
   (GFLOP/s; native bf16 units double or triple the rate, emulation on other CPUs slows it
   down, ``recvae.cpu_runtime.bf16_support``), and the padded layer, forward and backward, in
   float32 and under CPU bf16 autocast (``precision = "bf16"``), taken in turns.

``--sections`` runs only some of them. Shapes: the paper's batch of 500 and hidden width 600, over
ml-1m's 3,485 and gowalla's 40,981 items (PROTOCOL.md splits). Prints Markdown tables;
``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recvae import cpu_runtime
from recvae.model import SparseBatch, _ItemBag, padded_output

SHAPES = {"ml-1m": 3485, "gowalla": 40981}
BATCH, HIDDEN = 500, 600


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds and median minor page faults of ``fn`` over ``repeats`` calls (one warm)."""
    fn()
    seconds, faults = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(seconds), statistics.median(faults)


def heap_rows(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, n_items in SHAPES.items():
        mib = BATCH * n_items * 4 / 2**20

        def step(n_items: int = n_items) -> None:
            torch.empty(BATCH, n_items).fill_(1.0)  # allocated, written, freed

        for setting in ("glibc default", "reuse_freed_memory"):
            if setting == "glibc default":
                sec, faults = _timed(step, repeats)
            else:
                with cpu_runtime.reuse_freed_memory("cpu") as active:
                    if not active:
                        continue
                    sec, faults = _timed(step, repeats)
            rows.append(
                {
                    "dataset": name,
                    "tensor": f"{BATCH} x {n_items} float32 ({mib:.0f} MiB)",
                    "setting": setting,
                    "ms": sec * 1e3,
                    "page_faults": faults,
                }
            )
    return rows


def _operands(gen: torch.Generator, n_items: int) -> tuple[torch.Tensor, ...]:
    """``h`` (batch, hidden), ``W`` (n_items, hidden) and ``b`` (n_items,), standard normal."""
    h = torch.randn(BATCH, HIDDEN, generator=gen)
    w = torch.randn(n_items, HIDDEN, generator=gen)
    b = torch.randn(n_items, generator=gen)
    return h, w, b


def blas_rows(repeats: int, threads: int) -> list[dict[str, Any]]:
    blas = cpu_runtime._numpy_blas()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, n_items in SHAPES.items():
        h, w, b = _operands(gen, n_items)
        g = torch.randn(BATCH, n_items, generator=gen)
        flops = 2 * BATCH * HIDDEN * n_items
        products: dict[str, Callable[[], Any]] = {
            "logits h @ W.T + b, torch F.linear": lambda h=h, w=w, b=b: F.linear(h, w, b),
            "grad W = G.T @ h, torch": lambda g=g, h=h: g.t().mm(h),
            "grad h = G @ W, torch": lambda g=g, w=w: g.mm(w),
        }
        if blas is not None:
            products["logits h @ W.T + b, NumPy BLAS"] = lambda h=h, w=w, b=b: (
                cpu_runtime._numpy_linear(h, w, b, threads, blas)
            )
            products["grad W = G.T @ h, NumPy BLAS"] = lambda g=g, h=h: cpu_runtime._numpy_matmul(
                g.t(), h, threads, blas
            )
            products["grad h = G @ W, NumPy BLAS"] = lambda g=g, w=w: cpu_runtime._numpy_matmul(
                g, w, threads, blas
            )
        with cpu_runtime.reuse_freed_memory("cpu"):  # as in training: no page faults counted
            for product, fn in products.items():
                sec, _ = _timed(fn, repeats)
                rows.append(
                    {
                        "dataset": name,
                        "product": product,
                        "ms": sec * 1e3,
                        "gflops": flops / sec / 1e9,
                    }
                )
    return rows


def mixed_rows(repeats: int, threads: int) -> list[dict[str, Any]]:
    """The three products back to back, all on torch's BLAS or the forward one on NumPy's.

    On one thread this is the sum of the single products; on more it also shows what the two
    libraries' thread pools cost each other when their calls alternate, as in a training step.
    """
    blas = cpu_runtime._numpy_blas()
    if blas is None:
        return []
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, n_items in SHAPES.items():
        h, w, b = _operands(gen, n_items)

        def step(numpy_forward: bool, h=h, w=w, b=b) -> None:  # type: ignore[no-untyped-def]
            if numpy_forward:
                logits = cpu_runtime._numpy_linear(h, w, b, threads, blas)
            else:
                logits = F.linear(h, w, b)
            logits.t().mm(h)  # the weight gradient's shape
            logits.mm(w)  # the input gradient's shape

        with cpu_runtime.reuse_freed_memory("cpu"):
            for label, numpy_forward in (("all torch", False), ("forward on NumPy BLAS", True)):
                sec, _ = _timed(lambda nf=numpy_forward: step(nf), repeats)
                rows.append({"dataset": name, "products": label, "ms": sec * 1e3})
    return rows


def aligned_rows(repeats: int, threads: int) -> list[dict[str, Any]]:
    """The three products over ``n_items`` and over ``n_items`` padded to a multiple of 64.

    On torch's BLAS, and on one thread (where ``cpu_runtime.linear`` may use it) on NumPy's too.
    """
    blas = cpu_runtime._numpy_blas() if threads == 1 else None
    rows = []
    gen = torch.Generator().manual_seed(2)
    for name, n_items in SHAPES.items():
        for width in (n_items, -(-n_items // 64) * 64):
            h, w, b = _operands(gen, width)
            g = torch.randn(BATCH, width, generator=gen)
            products: dict[str, Callable[[], Any]] = {
                "logits h @ W.T + b, torch": lambda h=h, w=w, b=b: F.linear(h, w, b),
                "grad W = G.T @ h, torch": lambda g=g, h=h: g.t().mm(h),
                "grad h = G @ W, torch": lambda g=g, w=w: g.mm(w),
            }
            if blas is not None:
                products |= {
                    "logits h @ W.T + b, NumPy BLAS": lambda h=h, w=w, b=b: (
                        cpu_runtime._numpy_linear(h, w, b, 1, blas)
                    ),
                    "grad W = G.T @ h, NumPy BLAS": lambda g=g, h=h: cpu_runtime._numpy_matmul(
                        g.t(), h, 1, blas
                    ),
                    "grad h = G @ W, NumPy BLAS": lambda g=g, w=w: cpu_runtime._numpy_matmul(
                        g, w, 1, blas
                    ),
                }
            with cpu_runtime.reuse_freed_memory("cpu"):
                for product, fn in products.items():
                    sec, _ = _timed(fn, repeats)
                    rows.append(
                        {
                            "dataset": name,
                            "columns": width,
                            "product": product,
                            "ms": sec * 1e3,
                            "ms_per_1000_items": sec * 1e3 / width * 1000,
                        }
                    )
    return rows


def _in_turns(
    variants: dict[str, Callable[[], Any]], clear: Callable[[], Any], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each variant over ``repeats`` rounds, the variants taken in turns within a
    round (so that a slow spell of the machine hits each), ``clear()`` before every call, the
    heap kept as training keeps it; a first round warms up and is dropped."""
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    with cpu_runtime.reuse_freed_memory("cpu"):
        for _ in range(repeats + 1):
            for label, fn in variants.items():
                clear()
                start = time.perf_counter()
                fn()
                seconds[label].append(time.perf_counter() - start)
    return {label: times[1:] for label, times in seconds.items()}


def _padded_layer_times(n_items: int, repeats: int, gen: torch.Generator) -> dict[str, list[float]]:
    """Seconds per forward+backward of one layer over ``n_items``, per way, taken in turns."""
    pad = -n_items % 64
    layer = torch.nn.Linear(HIDDEN, n_items)
    h = torch.randn(BATCH, HIDDEN, generator=gen).requires_grad_()
    upstream = torch.randn(BATCH, n_items + pad, generator=gen)
    upstream[:, n_items:] = 0.0  # a softmax's gradient at the -inf columns
    weight, bias = layer.weight, layer.bias

    def in_place() -> None:
        padded_output(layer, h, 64).backward(upstream)

    def weight_copy() -> None:
        padded_bias = torch.cat([bias, bias.new_full((pad,), -math.inf)])
        F.linear(h, F.pad(weight, (0, 0, 0, pad)), padded_bias).backward(upstream)

    def unpadded() -> None:
        F.linear(h, weight, bias).backward(upstream[:, :n_items])

    def clear() -> None:
        layer.zero_grad(set_to_none=True)
        h.grad = None

    variants = {
        "in place (padded_output on the CPU)": in_place,
        "zero-padded weight copy": weight_copy,
        "unpadded": unpadded,
    }
    return _in_turns(variants, clear, repeats)


def padded_layer_rows(repeats: int) -> list[dict[str, Any]]:
    """Forward and backward of the layer over all items: in place, over a padded weight copy,
    and unpadded; the three taken in turns, so that a slow spell of the machine hits each."""
    rows = []
    gen = torch.Generator().manual_seed(3)
    for name, n_items in SHAPES.items():
        padded_columns = -(-n_items // 64) * 64
        for label, times in _padded_layer_times(n_items, repeats, gen).items():
            rows.append(
                {
                    "dataset": name,
                    "layer": label,
                    "columns": n_items if label == "unpadded" else padded_columns,
                    "ms": statistics.median(times) * 1e3,
                }
            )
    return rows


def _bf16_times(n_items: int, repeats: int, gen: torch.Generator) -> dict[str, list[float]]:
    """Seconds of each bare product in float32 and bfloat16, and of the padded layer's forward
    and backward in float32 and under bf16 autocast, all taken in turns."""
    h32 = torch.randn(BATCH, HIDDEN, generator=gen)
    w32 = torch.randn(n_items, HIDDEN, generator=gen)
    g32 = torch.randn(BATCH, n_items, generator=gen)
    h16, w16, g16 = (t.to(torch.bfloat16) for t in (h32, w32, g32))
    pad = -n_items % 64
    layer = torch.nn.Linear(HIDDEN, n_items)
    x = torch.randn(BATCH, HIDDEN, generator=gen).requires_grad_()
    upstream = torch.randn(BATCH, n_items + pad, generator=gen)
    upstream[:, n_items:] = 0.0  # a softmax's gradient at the -inf columns

    def layer_step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = padded_output(layer, x, 64)
        out.backward(upstream.to(out.dtype))

    def clear() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None

    variants: dict[str, Callable[[], Any]] = {}
    for dtype, (h, w, g) in (("float32", (h32, w32, g32)), ("bfloat16", (h16, w16, g16))):
        variants[f"forward h @ W.T, {dtype}"] = lambda h=h, w=w: h @ w.t()
        variants[f"grad_input g @ W, {dtype}"] = lambda g=g, w=w: g @ w
        variants[f"grad_weight g.T @ h, {dtype}"] = lambda g=g, h=h: g.t() @ h
    variants["padded layer, forward + backward, fp32"] = lambda: layer_step(False)
    variants["padded layer, forward + backward, bf16 autocast"] = lambda: layer_step(True)
    return _in_turns(variants, clear, repeats)


def bf16_rows(repeats: int) -> list[dict[str, Any]]:
    """The products over all items and the padded layer, in float32 and in bf16."""
    rows = []
    gen = torch.Generator().manual_seed(4)
    for name, n_items in SHAPES.items():
        flop = 2.0 * BATCH * HIDDEN * n_items
        for label, times in _bf16_times(n_items, repeats, gen).items():
            ms = statistics.median(times) * 1e3
            layer = label.startswith("padded layer")
            rows.append(
                {
                    "dataset": name,
                    "product": label,
                    "ms": ms,
                    "gflops": (3 * flop if layer else flop) / (ms * 1e6),
                }
            )
    return rows


def _training_matrix(name: str, data_dir: str, cache: Path | None) -> sp.csr_array:
    """The dataset's training users (PROTOCOL.md split), as train_speed reads them."""
    import train_speed  # this folder's sibling; polars or a split cache

    return sp.csr_array(train_speed._load(name, data_dir, cache).train.matrix)


def _bag_layer_times(
    batch: SparseBatch, gen: torch.Generator, repeats: int
) -> dict[str, list[float]]:
    """Seconds per forward+backward of the sparse first layer on ``batch``, per way, in turns."""
    weight = torch.randn(batch.n_items, HIDDEN, generator=gen).requires_grad_()
    upstream = torch.randn(batch.n_rows, HIDDEN, generator=gen)
    args = (batch.indices, weight, batch.offsets)

    def transposed() -> None:
        _ItemBag.apply(*args, batch.weights, batch.row_of).backward(upstream)

    def torchs() -> None:
        h = F.embedding_bag(
            *args, mode="sum", per_sample_weights=batch.weights, include_last_offset=True
        )
        h.backward(upstream)

    def clear() -> None:
        weight.grad = None

    variants = {
        "transposed bag sum (_ItemBag, the CPU path now)": transposed,
        "F.embedding_bag's backward (before)": torchs,
    }
    return _in_turns(variants, clear, repeats)


def bag_layer_rows(repeats: int, data_dir: str, cache: Path | None) -> list[dict[str, Any]]:
    """Forward and backward of the sparse first layer: the transposed bag-sum backward
    (``_ItemBag``) and ``F.embedding_bag``'s, taken in turns, on real batches."""
    rows = []
    gen = torch.Generator().manual_seed(4)
    for name in SHAPES:
        matrix = _training_matrix(name, data_dir, cache)
        users = np.random.default_rng(4).permutation(matrix.shape[0])[:BATCH]
        batch = SparseBatch.from_scipy(matrix[np.sort(users)])
        for label, times in _bag_layer_times(batch, gen, repeats).items():
            rows.append(
                {
                    "dataset": name,
                    "layer": label,
                    "items": batch.n_items,
                    "entries": int(batch.indices.shape[0]),
                    "ms": statistics.median(times) * 1e3,
                }
            )
    return rows


def _print_table(header: str, rule: str, lines: Iterable[str]) -> None:
    """A Markdown table after a blank line: the header, its rule, then ``lines``."""
    print(f"\n{header}")
    print(rule)
    for line in lines:
        print(line)


SECTIONS = ("heap", "gemm", "mixed", "aligned", "padded", "bag", "bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    parser.add_argument("--data-dir", default="../shared/data", help="datasets (the bag section)")
    parser.add_argument(
        "--split-cache", type=Path, default=None, help="pickled splits, as train_speed (bag)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help=f"which tables to measure, of {', '.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    machine = {
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numpy_blas": getattr(cpu_runtime._numpy_blas(), "filepath", None),
        "glibc": cpu_runtime._glibc() is not None,
        "cpu_bf16": cpu_runtime.bf16_support(),
        "load_average_before": os.getloadavg(),
    }
    print(f"machine: {machine}")
    payload: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
    }
    threads = f"{args.threads} thread(s)"
    if "heap" in args.sections:
        heap = payload["heap"] = heap_rows(args.repeats)
        _print_table(
            "| dataset | tensor | heap | ms per allocate+fill+free (median) | page faults |",
            "|---|---|---|---:|---:|",
            (
                f"| {r['dataset']} | {r['tensor']} | {r['setting']} | {r['ms']:.1f} "
                f"| {r['page_faults']:,.0f} |"
                for r in heap
            ),
        )
    if "gemm" in args.sections:
        gemm = payload["gemm"] = blas_rows(args.repeats, args.threads)
        _print_table(
            f"| dataset | product ({BATCH} x {HIDDEN} x n_items) | ms (median) | GFLOP/s |",
            "|---|---|---:|---:|",
            (
                f"| {r['dataset']} | {r['product']} | {r['ms']:.1f} | {r['gflops']:.1f} |"
                for r in gemm
            ),
        )
    if "mixed" in args.sections:
        mixed = payload["mixed"] = mixed_rows(args.repeats, args.threads)
        _print_table(
            f"| dataset | three products in sequence, {threads} | ms (median) |",
            "|---|---|---:|",
            (f"| {r['dataset']} | {r['products']} | {r['ms']:.1f} |" for r in mixed),
        )
    if "aligned" in args.sections:
        aligned = payload["aligned"] = aligned_rows(args.repeats, args.threads)
        _print_table(
            f"| dataset | columns | product, {threads} | ms (median) | ms per 1,000 items |",
            "|---|---:|---|---:|---:|",
            (
                f"| {r['dataset']} | {r['columns']:,} | {r['product']} | {r['ms']:.1f} "
                f"| {r['ms_per_1000_items']:.2f} |"
                for r in aligned
            ),
        )
    if "padded" in args.sections:
        padded = payload["padded"] = padded_layer_rows(args.repeats)
        _print_table(
            f"| dataset | layer over all items, forward + backward, {threads} | columns "
            "| ms (median) |",
            "|---|---|---:|---:|",
            (
                f"| {r['dataset']} | {r['layer']} | {r['columns']:,} | {r['ms']:.1f} |"
                for r in padded
            ),
        )
    if "bag" in args.sections:
        bag = payload["bag"] = bag_layer_rows(args.repeats, args.data_dir, args.split_cache)
        _print_table(
            f"| dataset | sparse first layer, forward + backward, {threads} | items | entries "
            "| ms (median) |",
            "|---|---|---:|---:|---:|",
            (
                f"| {r['dataset']} | {r['layer']} | {r['items']:,} | {r['entries']:,} "
                f"| {r['ms']:.2f} |"
                for r in bag
            ),
        )
    if "bf16" in args.sections:
        bf16 = payload["bf16"] = bf16_rows(args.repeats)
        _print_table(
            f"| dataset | over all items ({BATCH} x {HIDDEN} x n_items), {threads} "
            "| ms (median) | GFLOP/s |",
            "|---|---|---:|---:|",
            (
                f"| {r['dataset']} | {r['product']} | {r['ms']:.2f} | {r['gflops']:.0f} |"
                for r in bf16
            ),
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
