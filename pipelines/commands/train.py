"""``recvae train``: train on a dataset with the paper protocol, save the bundle, print metrics."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.commands._common import add_job_arguments, job_from_args
from pipelines.tracking_hooks import add_tracking_arguments

if TYPE_CHECKING:
    from pipelines.settings import JobSettings
    from pipelines.tracking_hooks import Tracker


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train Mult-VAE/Mult-DAE, evaluate on test users, save a model bundle",
        description=(
            "Train a model with the strong-generalization protocol: validation users pick the "
            "best epoch, test users are scored once at the end. Rerunning with the same "
            "--output resumes from the last checkpoint."
        ),
    )
    add_job_arguments(parser)
    model = parser.add_argument_group("model and training (override the config)")
    model.add_argument("--model", choices=["multvae", "multdae", "recvae"], help="default multvae")
    model.add_argument("--epochs", type=int)
    model.add_argument("--batch-size", type=int)
    model.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate")
    model.add_argument("--beta-max", type=float, help="KL anneal cap (default 0.2)")
    model.add_argument("--anneal-steps", type=int, help="absolute anneal steps (paper: 200000)")
    model.add_argument(
        "--beta-search",
        action="store_true",
        default=None,
        help="anneal to 1.0 and report the best beta on validation",
    )
    model.add_argument("--dropout", type=float)
    model.add_argument("--latent-dim", type=int)
    model.add_argument("--patience", type=int, help="early stopping patience in epochs")
    model.add_argument(
        "--model-seed", type=int, dest="model_seed", help="seed of weights, shuffling and sampling"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--threads", type=int, help="CPU threads for torch")
    run.add_argument(
        "--output",
        "-o",
        type=Path,
        help="run directory (bundle, checkpoints, metrics.json); "
        "default runs/<dataset>-<model>-<time>",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast (GPU speed)")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    run.add_argument(
        "--distributed",
        action="store_true",
        help="DDP over the processes torchrun started (torchrun ... -m pipelines.train_ddp)",
    )
    add_tracking_arguments(parser)
    parser.add_argument(
        "--registered-model",
        help="register the bundle in the MLflow model registry under this name "
        "(default: [mlflow] registered_model of the config; none)",
    )
    parser.add_argument(
        "--alias",
        help="registry alias moved to the new version (default: [mlflow] alias, else staging)",
    )
    parser.set_defaults(func=run_command)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "beta_max": args.beta_max,
        "anneal_steps": args.anneal_steps,
        "beta_search": args.beta_search,
        "dropout": args.dropout,
        "latent_dim": args.latent_dim,
        "patience": args.patience,
        "seed": args.model_seed,
    }


def train_job_from_args(args: argparse.Namespace, *, distributed: bool = False) -> JobSettings:
    """The job that ``recvae train`` (or its torchrun twin, with ``distributed``) runs."""
    overrides = model_overrides(args)
    run = {
        "device": args.device,
        "num_threads": args.threads,
        "progress": False if args.no_progress else None,
        "precision": args.precision,
        "compile": args.compile,
    }
    if distributed:
        run["distributed"] = True
    job = job_from_args(args, model=overrides, run=run)
    if args.model and job.model.get("model") != args.model:
        # Switching model type drops fields that belong to the other config.
        job.model.clear()
        job.model.update({k: v for k, v in overrides.items() if v is not None})
    return job


@dataclass(frozen=True)
class TrainTracking:
    """Where ``recvae train`` logs and registers: the flags first, then the config's
    ``[mlflow]`` table (``tracking_uri``, ``experiment``, ``artifact_location``,
    ``registered_model``, ``alias``)."""

    tracker: Tracker
    registered_model: str | None
    alias: str | None


def train_tracking(args: argparse.Namespace, job: JobSettings) -> TrainTracking:
    """The tracking of a ``recvae train`` run (opens the store when tracking is on).

    Raises:
        ValueError: a bad name or alias, an alias without a registered model, registering
            asked for on the command line with tracking off, or a store that cannot be opened.
    """
    from pipelines.experiment import check_alias, check_registered_model_name, mlflow_from_dict
    from pipelines.settings import read_toml
    from pipelines.tracking_hooks import make_tracker

    section = mlflow_from_dict(read_toml(args.config)) if args.config else {}
    registered = args.registered_model or section.get("registered_model")
    alias = args.alias or section.get("alias")
    if alias is not None and registered is None:
        raise ValueError("--alias needs a registered model: pass --registered-model NAME")
    if registered is not None:
        check_registered_model_name(registered)
        alias = alias or "staging"
        check_alias(alias)
    tracker = make_tracker(
        track=args.track,
        tracking_uri=args.tracking_uri or section.get("tracking_uri"),
        experiment=args.experiment_name or section.get("experiment") or f"recvae-{job.data.name}",
        artifact_location=section.get("artifact_location"),
    )
    if not tracker.enabled:
        if args.registered_model is not None:
            raise ValueError(
                f"--registered-model {args.registered_model}: registering needs MLflow "
                "tracking, which is off (--no-track or $RECVAE_TRACKING): drop --no-track"
            )
        registered = alias = None  # a name from the config sits unused, as in `experiment`
    return TrainTracking(tracker, registered, alias)


def run_command(args: argparse.Namespace) -> int:
    if args.distributed:
        from pipelines.train_ddp import run_distributed

        return run_distributed(args)
    from pipelines.experiment import output_dir_problem, tracked_train
    from pipelines.train_job import metric_rows

    job = train_job_from_args(args)
    if args.output is not None and (problem := output_dir_problem(Path(args.output))):
        raise ValueError(f"--output {problem}")
    tracking = train_tracking(args, job)
    tracker = tracking.tracker
    outcome = tracked_train(
        job,
        tracker=tracker,
        output_dir=args.output,
        registered_model=tracking.registered_model,
        alias=tracking.alias,
    )
    rec = outcome.recommender
    split = outcome.split.summary()
    print(
        f"dataset      {outcome.dataset}: {split['n_train_users']} train users, "
        f"{split['n_items']} items; {split['n_test_users_with_targets']} test users scored"
    )
    print(
        f"model        {rec.config.model}, best epoch {rec.meta.get('best_epoch')} of "
        f"{rec.meta.get('epochs_run')}, {outcome.train_seconds:.1f}s on {rec.meta.get('device')}"
    )
    print("test metrics (mean ± standard error over test users):")
    for line in metric_rows(outcome.test):
        print(f"  {line}")
    print(f"bundle       {outcome.bundle_path}")
    print_tracking(tracking, outcome.registered)
    sys.stdout.flush()
    return 0


def print_tracking(tracking: TrainTracking, registered: dict[str, str] | None) -> None:
    """The ``mlflow`` and ``registered`` lines of the summary."""
    tracker = tracking.tracker
    if tracker.enabled:
        print(f"mlflow       {tracker.tracking_uri}, experiment {tracker.experiment!r}")
    if registered and registered.get("version"):
        print(
            f"registered   models:/{registered['registered_model']}@{tracking.alias} "
            f"(version {registered['version']})"
        )
