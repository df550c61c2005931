"""Training speed: the original data path against the project's path, in one process, one table.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_speed.py --threads 1 --repeats 3 \\
        --quality-epochs 200 --json /tmp/train_speed.json

Rows (each measured as whole epochs, the median of ``--repeats`` after three warm-up steps; the
reference and the project's epochs alternate so that both see the same machine load):

- ``reference``: the original code's data path, kept here as the baseline: per batch a SciPy
  row slice, ``toarray()`` and a copy to the device, the dense model (plain first layer, dropout
  over the whole ``(batch, n_items)`` input), the dense target ``-(log_softmax(logits) * x)``,
  fp32, batch 500, ``torch.optim.Adam`` with its default implementation.
- ``reference+heap`` (CPU only): the same reference steps inside
  :func:`recvae.cpu_runtime.reuse_freed_memory`, which the project's trainer uses on the CPU: it
  shows how much of the project's speed-up the heap setting alone would give the original code.
  The speed-up column stays relative to the plain ``reference`` row.
- ``project``: :class:`recvae.training.Trainer` as ``recvae train`` runs it (device-resident CSR
  batches, sparse first layer and likelihood, fused Adam; on the CPU also the heap reuse and the
  faster BLAS for the logits product of :mod:`recvae.cpu_runtime`); with bf16 autocast on CUDA
  and on a CPU with bf16 units (AVX512_BF16 or AMX, :func:`recvae.cpu_runtime.bf16_support`;
  on other CPUs the row says it was skipped); on CUDA also at batch 4,096 and, where there
  are at least twice as many users, with the large batch of
  ``pipelines/configs/gpu-large-batch.toml``, eager and with ``RunOptions.compile``
  (``project+compile``).
- ``project-unpadded``, ``project+compile-unpadded``: the fp32 row and the compiled large-batch
  row without the logits padded to a multiple of 64 items (``RunOptions(item_multiple=1)``);
  the other project rows use the automatic setting, padded on CUDA and on more than one CPU
  thread (:func:`recvae.model.padded_output`).

``--rows`` keeps only some of these rows, named ``reference``, ``reference+heap``,
``project-fp32``, ``project-fp32-unpadded``, ``project-bf16``, ``project-bf16-4096`` (batch
4,096), ``project-large``, ``project-large-compile`` and ``project-large-compile-unpadded``; the
reference row is always measured.

Datasets: ml-1m and gowalla (PROTOCOL.md splits) on the CPU and, when CUDA is present, on the
GPU; the synthetic ML-20M-like matrix (``recvae.data.synthetic_interactions()``) on the GPU only
(on a CPU-only machine its rows print ``skipped: no CUDA``). Columns: seconds per epoch, users/s,
peak GPU memory (``torch.cuda.max_memory_allocated``), peak host memory (the process's peak
resident set size, ``VmHWM`` of ``/proc/self/status`` reset before each epoch through
``/proc/self/clear_refs``; where that is unavailable, ``ru_maxrss`` of ``resource.getrusage``,
the peak over the process's life so far, as labelled in the output) and the speed-up over the
reference row of the same dataset and device.

Quality: with ``--quality-epochs N`` (default 200, the paper's; 0 skips) both paths train
ml-1m from scratch for N epochs on the CPU with the paper's settings, pick the best epoch by
validation NDCG@100, and report test Recall@20, Recall@50 and NDCG@100 with standard errors,
so a speed-up never hides a quality loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recvae import cpu_runtime
from recvae.config import MultVAEConfig, RunOptions
from recvae.data import Interactions, synthetic_interactions
from recvae.evaluation import evaluate
from recvae.model import anneal_beta, build_model, gaussian_kl
from recvae.recommender import Recommender
from recvae.split import Split, split_users
from recvae.training import Trainer, beta_schedule, train

N_HELDOUT = {"ml-1m": 1000, "gowalla": 3000, "ml-20m-like": 10_000}
PAPER = MultVAEConfig()  # [I, 600, 200, 600, I], tanh, dropout 0.5, Adam 1e-3, batch 500
LARGE_BATCH: dict[str, Any] = {"batch_size": 24_576, "learning_rate": 4e-3}  # gpu-large-batch
# The rows measure() can time per dataset and device, by the names --rows takes.
VARIANTS = (
    "reference",
    "reference+heap",  # CPU only
    "project-fp32",
    "project-fp32-unpadded",  # the same with RunOptions(item_multiple=1)
    "project-bf16",  # CUDA, and CPUs with bf16 units (recvae.cpu_runtime.bf16_support)
    "project-bf16-4096",
    "project-large",  # the large ones: only with at least two large batches of users
    "project-large-compile",
    "project-large-compile-unpadded",  # the same with RunOptions(item_multiple=1)
)


# ------------------------------------------------------------------------------ memory
class HostMemory:
    """Peak resident set size over a stretch of code (Linux ``VmHWM`` reset, else getrusage)."""

    def __init__(self) -> None:
        self.resettable = self._reset()
        self.method = (
            "peak RSS per row (VmHWM, reset before each epoch)"
            if self.resettable
            else "peak RSS of the process so far (ru_maxrss)"
        )

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    def start(self) -> None:
        if self.resettable:
            self._reset()

    def peak_bytes(self) -> int:
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------ the paths
class ReferencePath:
    """The original code's training step, kept verbatim as the baseline.

    Per batch: SciPy row slice, densify, copy to the device, dense forward (the first layer a
    plain contiguous ``nn.Linear`` on the L2-normalized input after ``nn.Dropout``), dense target,
    default ``torch.optim.Adam``.
    """

    def __init__(self, data: Interactions, config: MultVAEConfig, device: torch.device) -> None:
        self.data = data
        self.config = config
        self.device = device
        torch.manual_seed(config.seed)
        model = build_model(config, data.n_items)
        first = model.encoder[0]
        plain = nn.Linear(first.in_features, first.out_features)  # the original layout
        with torch.no_grad():
            plain.weight.copy_(first.weight)
            plain.bias.copy_(first.bias)
        model.encoder[0] = plain
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.steps_per_epoch = math.ceil(data.n_users / config.batch_size)
        self.beta_max, self.anneal_steps = beta_schedule(
            config, self.steps_per_epoch * config.epochs
        )
        self.step = 0

    def run_epoch(self, epoch: int, max_steps: int | None = None) -> None:
        cfg = self.config
        self.model.train()
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(self.data.n_users)
        steps = self.steps_per_epoch
        for b in range(steps if max_steps is None else min(max_steps, steps)):
            rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            dense = np.asarray(self.data.matrix[rows].toarray(), dtype=np.float32)
            x = torch.from_numpy(dense).to(self.device)  # (batch, n_items)
            beta = anneal_beta(self.step, beta_max=self.beta_max, anneal_steps=self.anneal_steps)
            logits, mu, logvar = self.model(x)
            nll = -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
            loss = nll + beta * gaussian_kl(mu, logvar)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.step += 1


class ProjectPath:
    """:class:`recvae.training.Trainer`'s epoch, exactly as ``train`` runs it."""

    def __init__(
        self,
        data: Interactions,
        config: MultVAEConfig,
        device: torch.device,
        precision: str,
        compile: bool = False,
        item_multiple: int | None = None,
    ) -> None:
        self.trainer = Trainer(
            data,
            config,
            options=RunOptions(
                device=str(device),
                progress=False,
                precision=precision,
                compile=compile,
                item_multiple=item_multiple,
            ),
        )

    def run_epoch(self, epoch: int, max_steps: int | None = None) -> None:
        trainer = self.trainer
        full = trainer.steps_per_epoch
        trainer.steps_per_epoch = full if max_steps is None else min(max_steps, full)
        try:
            trainer._run_epoch(epoch)
        finally:
            trainer.steps_per_epoch = full


# ------------------------------------------------------------------------------ measuring
Runner = Callable[..., None]  # run_epoch(epoch, max_steps=None)
WARMUP_STEPS = 3


@dataclass
class Row:
    dataset: str
    device: str
    path: str
    batch_size: int
    precision: str
    n_users: int
    seconds: list[float] = field(default_factory=list)
    peak_gpu_bytes: int | None = None
    peak_host_bytes: int = 0
    skipped: str | None = None
    ratio: float | None = None
    variant: str = ""  # its name in VARIANTS

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_epoch(
    row: Row, run: Runner, epoch: int, device: torch.device, memory: HostMemory
) -> None:
    memory.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    run(epoch)
    _sync(device)
    row.seconds.append(time.perf_counter() - start)
    row.peak_host_bytes = max(row.peak_host_bytes, memory.peak_bytes())
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        row.peak_gpu_bytes = max(row.peak_gpu_bytes or 0, peak)


def _with_heap_reuse(run: Runner) -> Runner:
    def wrapped(epoch: int, max_steps: int | None = None) -> None:
        with cpu_runtime.reuse_freed_memory("cpu"):
            run(epoch, max_steps)

    return wrapped


def measure(
    name: str,
    data: Interactions,
    device: torch.device,
    repeats: int,
    memory: HostMemory,
    only: Collection[str] | None = None,
) -> list[Row]:
    """Time the reference and the project's paths on ``data``, alternating their epochs.

    With ``only`` (names of ``VARIANTS``), just those rows and the reference row.
    """
    variants: list[tuple[str, str, MultVAEConfig, str]] = [
        ("reference", "reference", PAPER, "fp32")
    ]
    if device.type == "cpu":
        variants.append(("reference+heap", "reference+heap", PAPER, "fp32"))
    variants.append(("project-fp32", "project", PAPER, "fp32"))
    variants.append(("project-fp32-unpadded", "project-unpadded", PAPER, "fp32"))
    skipped: list[Row] = []
    if device.type == "cpu":
        support = cpu_runtime.bf16_support()
        if support == "native":
            variants.append(("project-bf16", "project", PAPER, "bf16"))
        elif only is None or "project-bf16" in only:
            reason = f"skipped: bf16 {support} on this CPU (no AVX512_BF16 or AMX units)"
            skipped.append(
                Row(
                    name,
                    str(device),
                    "project",
                    PAPER.batch_size,
                    "bf16",
                    data.n_users,
                    skipped=reason,
                    variant="project-bf16",
                )
            )
    if device.type == "cuda":
        variants.append(("project-bf16", "project", PAPER, "bf16"))
        batch_4096 = PAPER.replace(batch_size=4096)
        variants.append(("project-bf16-4096", "project", batch_4096, "bf16"))  # type: ignore[arg-type]
        if data.n_users >= 2 * LARGE_BATCH["batch_size"]:  # else one step is the whole epoch
            large = PAPER.replace(**LARGE_BATCH)
            variants.append(("project-large", "project", large, "bf16"))  # type: ignore[arg-type]
            variants.append(("project-large-compile", "project+compile", large, "bf16"))  # type: ignore[arg-type]
            unpadded = ("project-large-compile-unpadded", "project+compile-unpadded")
            variants.append((*unpadded, large, "bf16"))  # type: ignore[arg-type]
    if only is not None:
        variants = [v for v in variants if v[0] == "reference" or v[0] in only]
    rows: list[Row] = []
    runners: list[Runner] = []
    for variant, path, config, precision in variants:
        row = Row(
            name, str(device), path, config.batch_size, precision, data.n_users, variant=variant
        )
        runner = (
            ReferencePath(data, config, device).run_epoch
            if path == "reference"
            else _with_heap_reuse(ReferencePath(data, config, device).run_epoch)
            if path == "reference+heap"
            else ProjectPath(
                data,
                config,
                device,
                precision,
                compile="+compile" in path,
                item_multiple=1 if path.endswith("-unpadded") else None,
            ).run_epoch
        )
        runner(1, WARMUP_STEPS)  # warm-up: optimizer state, allocator, kernels
        rows.append(row)
        runners.append(runner)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for repeat in range(repeats):
        for row, runner in zip(rows, runners, strict=True):
            _timed_epoch(row, runner, 2 + repeat, device, memory)
            print(
                f"  {name} {row.device} {row.path} b{row.batch_size} {row.precision}: "
                f"epoch {row.seconds[-1]:.3f}s",
                file=sys.stderr,
                flush=True,
            )
    reference = rows[0].median
    for row in rows:
        row.ratio = reference / row.median
    return rows + skipped


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def table(rows: list[Row], memory: HostMemory) -> str:
    header = (
        "| dataset | device | path | batch | precision | s/epoch (median) | users/s | "
        "peak GPU mem | peak host mem | speed-up vs reference |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.dataset} | {r.device} | {r.path} | | | {r.skipped} | | | | |")
            continue
        spread = f" ({min(r.seconds):.3f}-{max(r.seconds):.3f})" if len(r.seconds) > 1 else ""
        lines.append(
            f"| {r.dataset} | {r.device} | {r.path} | {r.batch_size} | {r.precision} | "
            f"{r.median:.3f}{spread} | {r.n_users / r.median:,.0f} | {_mib(r.peak_gpu_bytes)} | "
            f"{_mib(r.peak_host_bytes)} | {r.ratio:.2f}x |"
        )
    lines.append("")
    lines.append(f"Peak host memory: {memory.method}. Peak GPU memory: max_memory_allocated.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ quality
def _validate(model: nn.Module, config: MultVAEConfig, split: Split) -> float:
    ranker = Recommender(model, config, split.train.item_ids)
    result = evaluate(
        ranker,
        split.validation.fold_in.matrix,
        split.validation.targets.matrix,
        ks=(100,),
        metrics=["ndcg"],
        batch_size=2048,
    )
    return result.mean("ndcg@100")


def _test_metrics(model: nn.Module, config: MultVAEConfig, split: Split) -> dict[str, float]:
    ranker = Recommender(model, config, split.train.item_ids)
    result = evaluate(ranker, split.test.fold_in.matrix, split.test.targets.matrix)
    names = ("recall@20", "recall@50", "ndcg@100")
    out = {name: result.mean(name) for name in names}
    out.update({f"{name}_se": result.stderr(name) for name in names})
    return out


def quality(
    split: Split, epochs: int, device_name: str = "cpu", precisions: tuple[str, ...] = ("fp32",)
) -> list[dict[str, Any]]:
    """Train ml-1m with both paths (paper settings, ``epochs`` epochs) and score test users.

    The reference path runs in fp32 (the paper-setting run); the project's path once per entry
    of ``precisions`` (``bf16`` on CUDA), all on ``device_name``.
    """
    config = PAPER.replace(epochs=epochs)
    assert isinstance(config, MultVAEConfig)
    device = torch.device(device_name)
    results: list[dict[str, Any]] = []

    reference = ReferencePath(split.train, config, device)
    best_score, best_epoch, best_state = -math.inf, 0, None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        reference.run_epoch(epoch)
        score = _validate(reference.model, config, split)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
        if epoch % 20 == 0:
            print(f"  reference epoch {epoch}: val ndcg@100 {score:.4f}", file=sys.stderr)
    seconds = time.perf_counter() - start
    assert best_state is not None
    reference.model.load_state_dict(best_state)
    results.append(
        {
            "path": "reference",
            "device": device_name,
            "precision": "fp32",
            "epochs": epochs,
            "best_epoch": best_epoch,
            "val_ndcg@100": best_score,
            "train_seconds": seconds,
            **_test_metrics(reference.model, config, split),
        }
    )

    for precision in precisions:
        start = time.perf_counter()
        rec = train(
            split.train,
            config,
            validation=split.validation,
            options=RunOptions(device=device_name, progress=False, precision=precision),
        )
        seconds = time.perf_counter() - start
        results.append(
            {
                "path": "project",
                "device": device_name,
                "precision": precision,
                "epochs": epochs,
                "best_epoch": rec.meta["best_epoch"],
                "val_ndcg@100": rec.meta["val_ndcg@100"],
                "train_seconds": seconds,
                **_test_metrics(rec.model, config, split),
            }
        )
    return results


def quality_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| path | device | precision | epochs | best epoch | Recall@20 | Recall@50 | NDCG@100 | "
        "train time (incl. validation every epoch) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            f"{r[name]:.4f} ± {r[name + '_se']:.4f}"
            for name in ("recall@20", "recall@50", "ndcg@100")
        ]
        lines.append(
            f"| {r['path']} | {r['device']} | {r['precision']} | {r['epochs']} | "
            f"{r['best_epoch']} | {' | '.join(cells)} | "
            f"{r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def _load(name: str, data_dir: str, cache: Path | None = None) -> Split:
    """The dataset's split; with ``cache``, ``<cache>/<name>.pkl`` is read if present, else written.

    The cache lets the benchmark run where polars (the readers' dependency) is not installed,
    such as a GPU machine with only PyTorch: prepare it here, carry it there. The synthetic
    matrix is generated in place, never cached (about 80 MB pickled).
    """
    path = None if cache is None or name == "ml-20m-like" else cache / f"{name}.pkl"
    if path is not None and path.is_file():
        with path.open("rb") as fh:
            split: Split = pickle.load(fh)
        return split
    if name == "ml-20m-like":
        data = synthetic_interactions()
    else:
        from recvae.data import load_dataset  # polars, only when reading the files

        data = load_dataset(name, data_dir)
    split = split_users(data, n_heldout=N_HELDOUT[name], seed=98765)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            pickle.dump(split, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return split


def _cpu_model() -> str | None:
    """``model name`` with family and model numbers from ``/proc/cpuinfo`` (Linux), else None."""
    info = cpu_runtime._cpuinfo() or {}
    if not {"model name", "cpu family", "model"} & info.keys():
        return None
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
        f"model {info.get('model', '?')})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder of the datasets")
    parser.add_argument("--datasets", nargs="+", default=["ml-20m-like", "ml-1m", "gowalla"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cpu and/or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per row (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quality-epochs",
        type=int,
        default=200,
        help="train ml-1m this many epochs with both paths and compare test metrics (0: skip)",
    )
    parser.add_argument(
        "--quality-device", default="cpu", help="device of the quality runs (cpu or cuda)"
    )
    parser.add_argument(
        "--quality-precisions",
        nargs="+",
        default=["fp32"],
        help="precisions of the project's path in the quality runs (bf16: CUDA, or a CPU "
        "with bf16 units)",
    )
    parser.add_argument(
        "--split-cache", type=Path, help="folder of pickled splits (<dataset>.pkl), read or written"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=VARIANTS,
        metavar="NAME",
        help="measure only these rows of each dataset and device (default: all that apply): "
        f"{', '.join(VARIANTS)}; the reference row is always measured first, since the "
        "speed-ups are relative to it; reference+heap is CPU-only, project-bf16 needs CUDA or "
        "a CPU with bf16 units, project-bf16-4096 and the project-large rows CUDA",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    memory = HostMemory()
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_model": _cpu_model(),
        "cpu_bf16": cpu_runtime.bf16_support(),
        "load_average_before": load_before,
    }
    print(f"machine: {machine}", file=sys.stderr)
    rows: list[Row] = []
    splits: dict[str, Split] = {}
    for device_name in args.devices:
        for name in args.datasets:
            if device_name == "cuda" and not torch.cuda.is_available():
                rows.append(Row(name, "cuda", "all", 0, "", 0, skipped="skipped: no CUDA"))
                continue
            if name == "ml-20m-like" and device_name == "cpu":
                rows.append(Row(name, "cpu", "all", 0, "", 0, skipped="skipped: GPU-only shape"))
                continue
            if name not in splits:
                splits[name] = _load(name, args.data_dir, args.split_cache)
            data = splits[name].train
            print(f"{name}: {data.n_users} users x {data.n_items} items", file=sys.stderr)
            rows += measure(
                name, data, torch.device(device_name), args.repeats, memory, only=args.rows
            )
    speed = table(rows, memory)
    print(speed)
    results: list[dict[str, Any]] = []
    if args.quality_epochs > 0:
        split = splits.get("ml-1m") or _load("ml-1m", args.data_dir, args.split_cache)
        results = quality(
            split, args.quality_epochs, args.quality_device, tuple(args.quality_precisions)
        )
        print()
        print(quality_table(results))
    machine["load_average_after"] = os.getloadavg()
    print(
        f"\n{started:%Y-%m-%d}, {machine['cores']} cores "
        f"({machine['cpu_model'] or machine['cpu']}, bf16 {machine['cpu_bf16']}), torch "
        f"{machine['torch']} with {machine['torch_threads']} thread(s), GPU: {machine['cuda']}; "
        f"load average {load_before[0]:.1f} before, {machine['load_average_after'][0]:.1f} after"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": started.isoformat(),
                    "machine": machine,
                    "host_memory": memory.method,
                    "rows": [r.__dict__ | {"median": r.median} for r in rows],
                    "quality": results,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
