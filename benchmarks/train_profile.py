"""Where a training step of the project's path spends its time: torch.profiler over a few steps.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_profile.py --dataset ml-20m-like --device cuda --large \\
        --precision bf16 --compile --out /tmp/profile-large-compile

It builds train_speed's ``ProjectPath`` (:class:`recvae.training.Trainer`'s epoch as ``recvae
train`` runs it), runs ``--warmup`` steps (with ``--compile`` these include the compilation),
times ``--steps`` steps without the profiler, then profiles as many steps again. Each stretch
starts at the beginning of an epoch and runs into the next epochs when one is too short.

Written to ``--out``: ``profile.txt`` (ops by self CUDA time on CUDA, self CPU time on the CPU,
then the same grouped by input shape), ``profile.json`` (the unprofiled ms/step, the top 40 ops
per step, the settings) and, with ``--trace``, ``trace.json`` (Chrome trace, for Perfetto).

Datasets: train_speed's (``--split-cache`` as there) plus ``tiny``, a 600 x 300 synthetic
matrix for tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import train_speed
from torch.profiler import ProfilerActivity, profile

from recvae.config import MultVAEConfig
from recvae.data import Interactions, synthetic_interactions

DATASETS = [*train_speed.N_HELDOUT, "tiny"]
TOP_OPS = 40


def _load_train(name: str, data_dir: str, cache: Path | None) -> Interactions:
    if name == "tiny":
        return synthetic_interactions(n_users=600, n_items=300, n_interactions=12_000, seed=0)
    return train_speed._load(name, data_dir, cache).train


def _run_steps(project: train_speed.ProjectPath, steps: int, epoch: int) -> tuple[int, int]:
    """Run ``steps`` steps from the start of ``epoch`` on; returns (next epoch, users seen)."""
    per_epoch = project.trainer.steps_per_epoch
    batch, n_users = project.trainer.config.batch_size, project.trainer.data.n_users
    users = 0
    while steps > 0:
        chunk = min(steps, per_epoch)
        project.run_epoch(epoch, max_steps=chunk)
        users += min(chunk * batch, n_users)
        steps -= chunk
        epoch += 1
    return epoch, users


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="ml-20m-like")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch-size", type=int, help="default: the paper's, or --large's")
    parser.add_argument("--learning-rate", type=float, help="default: the paper's, or --large's")
    parser.add_argument(
        "--large", action="store_true", help=f"the large-batch settings {train_speed.LARGE_BATCH}"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="RunOptions.compile")
    parser.add_argument(
        "--item-multiple", type=int, help="RunOptions.item_multiple (default: automatic)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed and profiled steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before (and compiling)")
    parser.add_argument("--split-cache", type=Path, help="folder of pickled splits, as train_speed")
    parser.add_argument("--data-dir", default="../shared/data", help="folder of the datasets")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--trace", action="store_true", help="also write trace.json")
    parser.add_argument("--out", type=Path, required=True, help="folder of the results")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "item_multiple"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error("--learning-rate must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    defaults = train_speed.LARGE_BATCH if args.large else {}
    if args.batch_size is None:
        args.batch_size = defaults.get("batch_size", train_speed.PAPER.batch_size)
    if args.learning_rate is None:
        args.learning_rate = defaults.get("learning_rate", train_speed.PAPER.learning_rate)
    return args


def _ops(events: Any, sort_key: str, steps: int, clock: str) -> list[dict[str, Any]]:
    """The top ops of ``events`` (key averages) by ``sort_key``, times in ms per step.

    ``clock`` names the clock of the self and total times (``cuda``: device time); ``kind`` is
    ``CPU`` for an operator or ``CUDA`` for a kernel, whose time also counts in its operator's.
    """
    total_key = sort_key.removeprefix("self_")
    ranked = sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:TOP_OPS]
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms_per_step": round(getattr(e, sort_key) / 1000 / steps, 4),
            "total_ms_per_step": round(getattr(e, total_key) / 1000 / steps, 4),
            "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 4),
            "clock": clock,
            "kind": e.device_type.name,
        }
        for e in ranked
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    data = _load_train(args.dataset, args.data_dir, args.split_cache)
    config = train_speed.PAPER.replace(batch_size=args.batch_size, learning_rate=args.learning_rate)
    assert isinstance(config, MultVAEConfig)
    project = train_speed.ProjectPath(
        data,
        config,
        device,
        args.precision,
        compile=args.compile,
        item_multiple=args.item_multiple,
    )
    print(
        f"{args.dataset}: {data.n_users} users x {data.n_items} items, batch {config.batch_size}, "
        f"{project.trainer.steps_per_epoch} steps/epoch; warm-up {args.warmup} steps",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    epoch, _ = _run_steps(project, args.warmup, 1)
    train_speed._sync(device)
    warmup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    epoch, users = _run_steps(project, args.steps, epoch)
    train_speed._sync(device)
    seconds = time.perf_counter() - start
    ms_per_step = 1000 * seconds / args.steps
    print(f"unprofiled: {ms_per_step:.2f} ms/step, {users / seconds:,.0f} users/s")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        _run_steps(project, args.steps, epoch)
        train_speed._sync(device)
    profiled_ms = 1000 * (time.perf_counter() - start) / args.steps

    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    main_table = averages.table(sort_by=sort_key, row_limit=TOP_OPS)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=25)
    print(main_table)
    print(f"profiled: {profiled_ms:.2f} ms/step (unprofiled {ms_per_step:.2f})")

    args.out.mkdir(parents=True, exist_ok=True)
    heading = f"{args.steps} steps, sorted by {sort_key} (totals over all steps)"
    (args.out / "profile.txt").write_text(
        f"{heading}\n{main_table}\n\nGrouped by input shape:\n{by_shape}\n"
    )
    settings = {
        "dataset": args.dataset,
        "n_users": data.n_users,
        "n_items": data.n_items,
        "nnz": data.nnz,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "large": args.large,
        "precision": args.precision,
        "compile": args.compile,
        "item_multiple": project.trainer.item_multiple,
        "steps": args.steps,
        "warmup": args.warmup,
        "steps_per_epoch": project.trainer.steps_per_epoch,
    }
    record = {
        "settings": settings,
        "warmup_seconds": warmup_seconds,
        "ms_per_step": ms_per_step,
        "users_per_second": users / seconds,
        "profiled_ms_per_step": profiled_ms,
        "sort_by": sort_key,
        "ops": _ops(averages, sort_key, args.steps, "cuda" if cuda else "cpu"),
    }
    (args.out / "profile.json").write_text(json.dumps(record, indent=2))
    if args.trace:
        prof.export_chrome_trace(str(args.out / "trace.json"))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
