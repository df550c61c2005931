"""``recvae experiment``: Mult-VAE and baselines side by side on one split, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from pipelines.commands._common import (
    add_config_argument,
    add_data_arguments,
    add_protocol_arguments,
    add_run_arguments,
    job_from_args,
    replace_given,
)
from pipelines.tracking_hooks import add_tracking_arguments

if TYPE_CHECKING:
    from pipelines.experiment import ExperimentSettings
    from pipelines.settings import JobSettings

DEFAULT_PRESET = "ml-latest-small"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="compare Mult-VAE, Mult-DAE and baselines on one split (table + MLflow)",
        description=(
            "Run every model of the config on the same strong-generalization split: each is "
            "chosen on the validation users (best epoch, EASE's lambda) and scored once on the "
            "test users. Prints and writes a comparison table (markdown and CSV) with standard "
            "errors, train time, popularity bias and NDCG@100 by user activity, and logs a "
            "parent MLflow run with a child run per model."
        ),
    )
    add_config_argument(
        parser,
        default=DEFAULT_PRESET,
        help=f"experiment config or preset name (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--models",
        help="comma-separated model labels to run, in order (default: the config's list)",
    )
    parser.add_argument("--epochs", type=int, help="epochs of every autoencoder (override)")
    add_data_arguments(parser)
    add_protocol_arguments(parser)
    add_run_arguments(parser, output_help="run directory (default runs/experiment-...)")
    add_tracking_arguments(parser)
    parser.add_argument("--registered-model", help="register the Mult-VAE bundle under this name")
    parser.add_argument("--alias", help="registry alias to move to it (default staging)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError
    from pipelines.experiment import (
        experiment_from_dict,
        output_dir_problem,
        registration_problem,
        run_experiment,
    )
    from pipelines.settings import job_from_dict, read_toml
    from pipelines.tracking_hooks import make_tracker

    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.output is not None:
        problem = output_dir_problem(args.output)
        if problem:
            raise CLIError(f"--output {problem}")
    raw = read_toml(args.config)
    job = job_from_args(args, run={"progress": False if args.no_progress else None})
    settings = experiment_from_dict(raw)
    if args.models is not None:
        labels = [label.strip() for label in args.models.split(",") if label.strip()]
        if not labels:
            raise CLIError("--models needs at least one model label")
        settings = settings.with_models(labels)
    if args.epochs is not None:
        settings = settings.with_epochs(args.epochs)
    settings = replace_given(
        settings,
        threads=args.threads,
        device=args.device,
        registered_model=args.registered_model,
        alias=args.alias,
    )
    settings, names_note = _names_for_data(
        settings, args, config_data=job_from_dict(raw).data.name, job=job
    )
    if args.alias is not None and settings.registered_model is None:
        raise CLIError("--alias needs a registered model: pass --registered-model NAME")
    # A name from the config may sit unused (tracking off, a subset of models); one asked for
    # on the command line must be registered, so refuse now rather than after training.
    asked = [
        f"{flag} {value}"
        for flag, value in (("--registered-model", args.registered_model), ("--alias", args.alias))
        if value is not None
    ]
    if asked:
        problem = registration_problem(settings)
        if problem:
            raise CLIError(f"{' '.join(asked)}: {problem}")
    tracker = make_tracker(
        track=args.track,
        tracking_uri=args.tracking_uri or settings.tracking_uri,
        experiment=args.experiment_name or settings.experiment_name or f"recvae-{job.data.name}",
        artifact_location=settings.artifact_location,
    )
    if names_note and tracker.enabled:
        print(f"note: {names_note}", file=sys.stderr)
    if asked and not tracker.enabled:
        raise CLIError(
            f"{' '.join(asked)}: registering needs MLflow tracking, which is off (--no-track "
            "or $RECVAE_TRACKING): drop --no-track or pass --track"
        )
    outcome = run_experiment(job, settings, tracker=tracker, output_dir=args.output, report=_report)
    print()
    print(f"{outcome.dataset}: test users, mean ± standard error ({outcome.seconds:.0f}s in all)")
    print(outcome.table)
    print()
    print(f"table        {outcome.output_dir / 'comparison.md'} (and comparison.csv)")
    if tracker.enabled:
        print(
            f"mlflow       {tracker.display_uri}, experiment {tracker.experiment!r}, "
            f"run {outcome.run_id}"
        )
        if outcome.registered:
            print(
                f"registered   models:/{outcome.registered['registered_model']}@"
                f"{outcome.registered.get('alias', '')} "
                f"(version {outcome.registered['version']})"
            )
        if outcome.tracking_errors:
            print(
                f"warning: {len(outcome.tracking_errors)} MLflow call(s) failed; first: "
                f"{outcome.tracking_errors[0]}",
                file=sys.stderr,
            )
    if outcome.failures:
        print(f"failed: {', '.join(outcome.failures)}", file=sys.stderr)
        return 1
    return 0


def _names_for_data(
    settings: ExperimentSettings, args: argparse.Namespace, *, config_data: str, job: JobSettings
) -> tuple[ExperimentSettings, str | None]:
    """The settings without the config's ``[mlflow]`` experiment and registered model names
    when the flags run it on other data than the config's (``--dataset``/``--data``).

    Those names belong to the config's dataset (``recvae-ml-latest-small`` in the default
    preset): logging another dataset's runs under them, and moving their registry alias to a
    bundle with other item ids, would mix models that cannot replace each other. A name given
    on the command line is kept.

    Returns:
        The settings, and a note on the names dropped (None when none was).
    """
    import dataclasses

    if job.data.name == config_data:
        return settings, None
    drop_experiment = settings.experiment_name is not None and args.experiment_name is None
    drop_registered = settings.registered_model is not None and args.registered_model is None
    if not (drop_experiment or drop_registered):
        return settings, None
    note = (
        f"the config's [mlflow] names are for {config_data}, not {job.data.name}: "
        f"logging to the experiment {args.experiment_name or f'recvae-{job.data.name}'}"
        + ("" if args.registered_model else " and registering no model")
        + " (--experiment-name, --registered-model choose others)"
    )
    kept = dataclasses.replace(
        settings,
        experiment_name=None if drop_experiment else settings.experiment_name,
        registered_model=None if drop_registered else settings.registered_model,
    )
    return kept, note


def _report(message: str) -> None:
    print(message, flush=True)
