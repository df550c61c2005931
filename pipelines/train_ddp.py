"""Multi-GPU / multi-node training: ``recvae train`` under torchrun with DistributedDataParallel.

Usage (same options as ``recvae train``)::

    torchrun --nproc_per_node=4 -m pipelines.train_ddp --config gpu-large-batch --dataset ml-1m
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        -m pipelines.train_ddp --config gpu-large-batch --data ratings.parquet --output runs/big
    torchrun --nproc_per_node=2 $(which recvae) train --distributed ...   # the same thing

Every rank loads the data and makes the same seeded split. ``batch_size`` stays the global batch
(each rank trains on its shard of it, see :mod:`recvae.distributed`), so a run gives the same
model as a single-process one. Rank 0 writes the checkpoints, scores the test users, saves the
bundle and ``metrics.json`` and prints the summary; rerunning the command resumes from the last
checkpoint (the output directory must be on a filesystem every rank can read). On CPUs (gloo),
give each process its share of the cores with ``--threads``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``recvae train`` parser (this entry point takes the same options)."""
    from pipelines.cli import ArgumentParser
    from pipelines.commands import train as train_command

    # recvae's parser class: a negative number (--threshold -1e3) is a value here too.
    parser = ArgumentParser(prog="torchrun ... -m pipelines.train_ddp")
    subparsers = parser.add_subparsers(dest="command")
    train_command.register(subparsers)
    return parser


def run_distributed(args: argparse.Namespace) -> int:
    """Train with DDP across the torchrun processes; rank 0 evaluates, saves and reports.

    Args:
        args: Parsed ``recvae train`` arguments.

    Returns:
        The exit code (0).

    Raises:
        ValueError: not started by torchrun, bad settings, or a model without DDP support.
    """
    from pipelines.commands.train import (
        check_checkpoint,
        preflight,
        print_resumed,
        print_tracking,
        train_job_from_args,
        train_tracking,
    )
    from pipelines.experiment import tracked_train
    from pipelines.train_job import default_output_dir, metric_rows, prepare
    from recvae import distributed as dist_utils
    from recvae.training import train

    job = train_job_from_args(args, distributed=True)
    config = job.model_config()  # fail on bad settings before joining the group
    # Rank 0 logs to MLflow; it opens the store before the group forms, so that a store it
    # cannot open stops the launch instead of leaving the other ranks waiting.
    # Every rank must use rank 0's directory (a default name holds a timestamp).
    proposed = Path(args.output or default_output_dir(job, config.model))
    if os.environ.get("RANK", "0") == "0":
        # As `recvae train`: an output holding another run's bundle, or one that cannot be
        # written, stops the launch before any rank loads the data.
        where = "--output" if args.output is not None else "run directory (default; pass --output)"
        preflight(job, proposed, where=where)
    tracking = train_tracking(args, job) if os.environ.get("RANK", "0") == "0" else None
    context = dist_utils.init_from_env(device=str(job.run.get("device", "auto")))
    try:
        prepared = prepare(job)
        split = prepared.split
        out = Path(str(dist_utils.broadcast_object(str(proposed))))
        # Every rank reads the same checkpoint, so all refuse one of other settings or data
        # together, naming the differences, before rank 0 opens an MLflow run.
        check_checkpoint(out, job, split.train.fingerprint(), distributed=True)
        if context.is_main:
            assert tracking is not None
            # The same call as `recvae train`: the training below joins the other ranks'.
            outcome = tracked_train(
                job,
                tracker=tracking.tracker,
                output_dir=out,
                registered_model=tracking.registered_model,
                alias=tracking.alias,
                prepared=prepared,
            )
            rec = outcome.recommender
            counts = split.summary()
            print(
                f"dataset      {prepared.name}: {counts['n_train_users']} train users, "
                f"{counts['n_items']} items; {counts['n_test_users_with_targets']} test users"
            )
            print(
                f"model        {config.model}, best epoch {rec.meta.get('best_epoch')} "
                f"of {rec.meta.get('epochs_run')}, {outcome.train_seconds:.1f}s on "
                f"{context.world_size} x {rec.meta.get('device')} ({context.backend})"
            )
            print_resumed(rec)
            print("test metrics (mean ± standard error over test users):")
            for line in metric_rows(outcome.test):
                print(f"  {line}")
            print(f"bundle       {outcome.bundle_path}")
            print_tracking(tracking, outcome.registered)
            sys.stdout.flush()
        else:
            options = job.run_options(checkpoint_dir=str(out / "checkpoints"))
            train(split.train, config, validation=split.validation, options=options)
        dist_utils.barrier()
    finally:
        dist_utils.destroy()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``torchrun ... -m pipelines.train_ddp``; returns the exit code.

    ``-v``/``-vv`` anywhere in the arguments turn on info/debug logging.
    """
    raw = list(sys.argv[1:] if argv is None else argv)
    verbosity = {"-v": 1, "--verbose": 1, "-vv": 2}
    level = logging.WARNING - 10 * min(sum(verbosity.get(a, 0) for a in raw), 2)
    args = build_parser().parse_args(["train", *(a for a in raw if a not in verbosity)])
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.cli import Terminated, _on_sigterm, _raise_terminated

    # torchrun stops its workers with SIGTERM (when it is stopped itself, or a rank died): as
    # under `recvae`, it ends the run KILLED and keeps the checkpoint, where it killed the
    # process mid-run and left the MLflow run RUNNING.
    previous = _on_sigterm(_raise_terminated)
    try:
        return run_distributed(args)
    except Terminated:
        print("recvae train (distributed): terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("recvae train (distributed): interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"recvae train (distributed): error: {exc}", file=sys.stderr)
        return 2
    finally:
        _on_sigterm(previous)


if __name__ == "__main__":
    sys.exit(main())
