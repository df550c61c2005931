"""``recvae train``: train on a dataset with the paper protocol, save the bundle, print metrics."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.commands._common import add_job_arguments, job_from_args
from pipelines.tracking_hooks import add_tracking_arguments

if TYPE_CHECKING:
    from pipelines.settings import JobSettings
    from pipelines.tracking_hooks import Tracker

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train Mult-VAE, Mult-DAE or RecVAE, evaluate on test users, save a model bundle",
        description=(
            "Train a model with the strong-generalization protocol: validation users pick the "
            "best epoch, test users are scored once at the end. Rerunning with the same "
            "--output and settings resumes from the last checkpoint; an --output that holds "
            "another run (a bundle without its checkpoint, or the checkpoint of other settings "
            "or data) is refused unless --overwrite is given."
        ),
    )
    add_job_arguments(parser)
    model = parser.add_argument_group("model and training (override the config)")
    model.add_argument(
        "--model",
        choices=["multvae", "multdae", "recvae"],
        help="default multvae (or the config's); a config's [model] table written for another "
        "model is then not used: give its settings as flags",
    )
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
    model.add_argument(
        "--patience",
        type=int,
        help="early stopping: validations without a better score (one per epoch, or per "
        "[run] validate_every epochs)",
    )
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
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output that holds another run: its checkpoint is deleted "
        "before training and its bundle replaced at the end (default: refuse)",
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
    """The job that ``recvae train`` (or its torchrun twin, with ``distributed``) runs.

    ``--model`` naming another model than the config's ``[model]`` table replaces that table
    (its settings were chosen for the other model, and many are not fields of this one); the
    dropped settings are logged.

    Raises:
        ValueError: settings that would be ignored: ``--beta-max`` or ``anneal_steps`` with a
            beta search, ``[run] checkpoint_dir`` (``recvae train`` checkpoints into
            ``--output``), or ``--overwrite`` in distributed training.
    """
    overrides = model_overrides(args)
    given = {key: value for key, value in overrides.items() if value is not None}
    run = {
        "device": args.device,
        "num_threads": args.threads,
        "progress": False if args.no_progress else None,
        "precision": args.precision,
        "compile": args.compile,
    }
    if distributed:
        run["distributed"] = True
        if getattr(args, "overwrite", False):
            raise ValueError(
                "--overwrite is not supported in distributed training: delete the run's "
                "checkpoints folder (<--output>/checkpoints) instead"
            )
    # The config's own model first: with --model applied, a switch could not be seen.
    job = job_from_args(args, model={k: v for k, v in given.items() if k != "model"}, run=run)
    configured = job.model.get("model", "multvae")
    if args.model and configured != args.model:
        dropped = sorted(set(job.model) - set(given) - {"model"})
        if dropped:
            logger.warning(
                "--model %s: the config's [model] table is for %s; its settings %s are not used "
                "(give them as flags)",
                args.model,
                configured,
                ", ".join(dropped),
            )
        job = dataclasses.replace(job, model=dict(given))
    elif args.model:
        job = dataclasses.replace(job, model={**job.model, "model": args.model})
    _check_ignored_settings(args, job)
    return job


def _check_ignored_settings(args: argparse.Namespace, job: JobSettings) -> None:
    """Refuse settings of a train job that would have no effect (README: such a flag is an
    error, not silently ignored).

    Raises:
        ValueError: naming the setting and why it has no effect.
    """
    if job.model.get("beta_search"):
        if args.beta_max is not None:
            raise ValueError(
                "--beta-max has no effect with a beta search (--beta-search or [model] "
                "beta_search = true), which anneals beta to 1.0: drop one of them"
            )
        if job.model.get("anneal_steps") is not None:
            raise ValueError(
                "anneal_steps (--anneal-steps) has no effect with a beta search (--beta-search or "
                "[model] beta_search = true), which anneals over the whole run: drop one of them"
            )
    if job.run.get("checkpoint_dir") is not None:
        raise ValueError(
            "[run] checkpoint_dir is not used by `recvae train`: checkpoints go to "
            "<--output>/checkpoints; remove the key"
        )


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
    from pipelines.settings import job_from_dict, read_toml
    from pipelines.tracking_hooks import make_tracker

    raw = read_toml(args.config) if args.config else {}
    section = mlflow_from_dict(raw) if args.config else {}
    # The config's experiment and registered model name its own dataset: a run on other data
    # (--dataset, --data) must not log under them or move their alias (as `experiment`).
    config_data = job_from_dict(raw).data.name if args.config else job.data.name
    dropped = []
    if config_data != job.data.name:
        if section.get("experiment") and not args.experiment_name:
            dropped.append("experiment")
        if section.get("registered_model") and not args.registered_model:
            dropped.append("registered_model")
        section = {k: v for k, v in section.items() if k not in (*dropped, "alias")}
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
    if dropped and tracker.enabled:
        print(
            f"note: the config's [mlflow] {' and '.join(dropped)} name {config_data}'s runs, "
            f"not {job.data.name}'s: not used (--experiment-name, --registered-model choose "
            "others)",
            file=sys.stderr,
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
    from pipelines.experiment import tracked_train
    from pipelines.train_job import default_output_dir, metric_rows, prepare

    job = train_job_from_args(args)
    out = Path(args.output) if args.output is not None else None
    out = out or default_output_dir(job, str(job.model.get("model", "multvae")))
    where = "--output" if args.output is not None else "run directory (default; pass --output)"
    preflight(job, out, overwrite=args.overwrite, where=where)
    tracking = train_tracking(args, job)
    tracker = tracking.tracker
    prepared = prepare(job)
    if args.overwrite:
        _start_over(out)
    else:
        check_checkpoint(out, job, prepared.split.train.fingerprint())
    try:
        outcome = tracked_train(
            job,
            tracker=tracker,
            output_dir=out,
            registered_model=tracking.registered_model,
            alias=tracking.alias,
            prepared=prepared,
        )
    except OSError as exc:
        raise _run_failure(exc, out) from exc
    except ValueError as exc:
        from recvae.training import CheckpointMismatchError

        if isinstance(exc, CheckpointMismatchError):
            from pipelines.train_job import checkpoint_differences

            changed = checkpoint_differences(
                out / CHECKPOINT, job.model_config(), prepared.split.train.fingerprint()
            )
            raise ValueError(_mismatch_message(out, changed)) from exc
        raise
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
    print_resumed(rec)
    print("test metrics (mean ± standard error over test users):")
    for line in metric_rows(outcome.test):
        print(f"  {line}")
    print(f"bundle       {outcome.bundle_path}")
    print_tracking(tracking, outcome.registered)
    sys.stdout.flush()
    return 0


def print_resumed(rec: Any) -> None:
    """The summary's line for a run that resumed from its checkpoint (nothing otherwise)."""
    resumed_from = rec.meta.get("resumed_from_epoch")
    if resumed_from:
        print(
            f"resumed      from the checkpoint after epoch {resumed_from} (the seconds above "
            "are this run's)"
        )


def print_tracking(tracking: TrainTracking, registered: dict[str, str] | None) -> None:
    """The ``mlflow`` and ``registered`` lines of the summary."""
    tracker = tracking.tracker
    if tracker.enabled:
        print(f"mlflow       {tracker.display_uri}, experiment {tracker.experiment!r}")
        if tracker.errors:  # the run went on without them, as `recvae experiment` reports
            print(
                f"warning: {len(tracker.errors)} MLflow call(s) failed; first: {tracker.errors[0]}",
                file=sys.stderr,
            )
    if registered and registered.get("version"):
        print(
            f"registered   models:/{registered['registered_model']}@{tracking.alias} "
            f"(version {registered['version']})"
        )


CHECKPOINT = Path("checkpoints") / "checkpoint.pt"


def preflight(
    job: JobSettings, out: Path, *, overwrite: bool = False, where: str = "--output"
) -> None:
    """Check what can be checked before the data is loaded: the model config, the run options
    (the device included) and the run directory ``out``.

    A bundle in ``out`` is replaced at the end of a run only when the run resumes its own
    checkpoint there, or with ``overwrite``. Messages name ``out`` as ``where`` (the flag).

    Raises:
        ValueError: an invalid config or run option, a device that is not there, an ``out``
            that cannot be written, or one that holds another run's bundle.
    """
    from pipelines.experiment import output_dir_problem
    from recvae.recommender import resolve_device

    job.model_config()
    options = job.run_options(checkpoint_dir=str(out / "checkpoints"))
    if not options.distributed:
        device = resolve_device(options.device)
        _check_cuda_index(device.type, device.index)
    if problem := output_dir_problem(out):
        raise ValueError(f"{where} {problem}")
    bundle = out / "bundle"
    if bundle.exists() or bundle.is_symlink():
        if not (bundle.is_dir() and (bundle / "meta.json").is_file()):
            raise ValueError(
                f"{where} {out}: {bundle} exists and is not a recvae bundle, so the run's "
                "bundle could not be written there: pass another --output"
            )
        if not overwrite and not (out / CHECKPOINT).is_file():
            raise ValueError(
                f"{where} {out} already holds a bundle ({bundle}) and no checkpoint that this "
                "run would resume: pass another --output, or --overwrite to replace it"
            )


def _check_cuda_index(device_type: str, index: int | None) -> None:
    """Refuse ``cuda:N`` beyond the GPUs present (torch fails later, at the first tensor)."""
    import torch

    if device_type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(
            f"device 'cuda:{index}' was requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 to cuda:N-1)"
        )


def _start_over(out: Path) -> None:
    """``--overwrite``: delete the checkpoints of the run in ``out`` (the bundle is replaced
    atomically when the new one is saved)."""
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        logger.warning("--overwrite: deleting %s", checkpoints)
        shutil.rmtree(checkpoints)


def _run_failure(exc: OSError, out: Path) -> Exception:
    """The error to raise for an I/O error during a run (a full disk, a file system that went
    read-only): a one-line message, exit code 1; connection errors keep their own handling."""
    from pipelines.cli import CLIError

    if isinstance(exc, ConnectionError | FileNotFoundError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return CLIError(
        f"the run stopped on an I/O error: {reason}{where}; the last checkpoint in "
        f"{out / 'checkpoints'} is kept: free space or fix the folder, then rerun the same "
        "command to resume",
        exit_code=1,
    )


def check_checkpoint(
    out: Path, job: JobSettings, fingerprint: str, *, distributed: bool = False
) -> None:
    """Refuse a checkpoint in ``out`` written for other settings or data, naming what differs,
    before the run starts (no MLflow run is opened, ``out`` is left as it is).

    Args:
        out: The run directory.
        job: This run's job.
        fingerprint: That of this run's training users' matrix.
        distributed: Under torchrun, where ``--overwrite`` is not supported (the hint differs).

    Raises:
        ValueError: the checkpoint is another run's (an unreadable one is left to the trainer,
            whose message names it).
    """
    from pipelines.train_job import checkpoint_differences

    changed = checkpoint_differences(out / CHECKPOINT, job.model_config(), fingerprint)
    if changed:
        raise ValueError(_mismatch_message(out, changed, distributed=distributed))


def _mismatch_message(out: Path, changed: list[str] | None, *, distributed: bool = False) -> str:
    """Why the checkpoint in ``out`` is not this run's: ``changed``, the config fields that
    differ or the training data (:func:`pipelines.train_job.checkpoint_differences`)."""
    differences = f" (differs in {', '.join(changed)})" if changed else ""
    start_over = (
        f"delete {out / 'checkpoints'} to start over"
        if distributed
        else f"--overwrite to start over (deletes {out / 'checkpoints'})"
    )
    return (
        f"--output {out} holds the checkpoint of a run with other settings or data"
        f"{differences}: pass another --output, or {start_over}"
    )
