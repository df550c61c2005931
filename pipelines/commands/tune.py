"""``recvae tune``: search hyperparameters on the validation users; score the choice once."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.commands._common import (
    add_config_argument,
    add_data_arguments,
    add_protocol_arguments,
    add_run_arguments,
    job_from_args,
    replace_given,
)
from pipelines.tracking_hooks import add_tracking_arguments

DEFAULT_PRESET = "ml-latest-small"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="random or TPE search (optuna) on validation NDCG@100, resumable",
        description=(
            "Search the [tune.space] of the config for the [tune] model: every trial trains on "
            "the training users and is scored on the validation users only (a child MLflow run "
            "each). The best trial is then scored once on the test users. The study lives in "
            "<output>/optuna.db: rerunning the command resumes it."
        ),
    )
    add_config_argument(
        parser,
        default=DEFAULT_PRESET,
        help=f"config with a [tune] section, or a preset name (default {DEFAULT_PRESET})",
    )
    parser.add_argument("--model", help="the model label or type to tune (overrides [tune] model)")
    budget = parser.add_argument_group("budget and search (override [tune])")
    budget.add_argument(
        "--n-trials", type=int, help="completed trials to reach, across resumptions"
    )
    budget.add_argument("--timeout-minutes", type=float, help="stop starting trials after this")
    budget.add_argument("--sampler", choices=["tpe", "random"])
    budget.add_argument("--sampler-seed", dest="tune_seed", type=int, help="sampler seed")
    add_data_arguments(parser)
    add_protocol_arguments(parser)
    add_run_arguments(
        parser,
        output_help="study directory (default runs/tune-<dataset>-<model>; the same one resumes)",
    )
    add_tracking_arguments(
        parser,
        default_experiment="<[mlflow] experiment of the config, else recvae-<dataset>>-tune, "
        "e.g. recvae-ml-1m-tune",
    )
    parser.add_argument("--registered-model", help="register the best bundle under this name")
    parser.add_argument("--alias", default="staging", help="registry alias (default staging)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError
    from pipelines.experiment import (
        check_alias,
        check_registered_model_name,
        mlflow_from_dict,
        output_dir_problem,
    )
    from pipelines.settings import read_toml
    from pipelines.tracking_hooks import make_tracker
    from pipelines.tune import result_summary, run_tune, trials_table, tune_from_dict

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.output is not None:
        problem = output_dir_problem(args.output)
        if problem:
            raise CLIError(f"--output {problem}")
    if args.registered_model is not None:
        check_registered_model_name(args.registered_model)
    check_alias(args.alias)
    raw = read_toml(args.config)
    if "tune" not in raw and not args.model:
        raise CLIError(f"{args.config} has no [tune] section: add one (see `recvae tune --help`)")
    job = job_from_args(args, run={"progress": False if args.no_progress else None})
    settings = tune_from_dict(raw, model=args.model)
    settings = replace_given(
        settings,
        n_trials=args.n_trials,
        timeout_minutes=args.timeout_minutes,
        sampler=args.sampler,
        seed=args.tune_seed,
    )
    if args.registered_model is not None and not settings.spec.is_autoencoder:
        raise CLIError(
            f"--registered-model {args.registered_model}: {settings.spec.label!r} is a "
            f"baseline ({settings.spec.model}), which has no bundle to register; tune an "
            "autoencoder (multvae, multdae, recvae) to register it"
        )
    mlflow_section = mlflow_from_dict(raw)
    tracker = make_tracker(
        track=args.track,
        tracking_uri=args.tracking_uri or mlflow_section.get("tracking_uri"),
        experiment=args.experiment_name
        or f"{mlflow_section.get('experiment') or f'recvae-{job.data.name}'}-tune",
    )
    if args.registered_model is not None and not tracker.enabled:
        raise CLIError(
            f"--registered-model {args.registered_model}: registering needs MLflow tracking, "
            "which is off (--no-track or $RECVAE_TRACKING): drop --no-track or pass --track"
        )
    result = run_tune(
        job,
        settings,
        tracker=tracker,
        output_dir=args.output,
        threads=args.threads,
        device=args.device,
        registered_model=args.registered_model,
        alias=args.alias,
        report=lambda message: print(message, flush=True),
    )
    print()
    print(trials_table(result.trials, limit=10))
    print()
    for line in result_summary(result):
        print(line)
    note = " (scored before; reused)" if result.test_reused else " (scored once)"
    print(f"test users{note}; {result.n_new_trials} new trial(s), {result.seconds:.0f}s")
    print(
        f"study        {result.output_dir / 'optuna.db'}; choice in {result.output_dir}/best.json"
    )
    if result.bundle_path is not None:
        print(f"bundle       {result.bundle_path}")
    if tracker.enabled:
        print(f"mlflow       {tracker.display_uri}, experiment {tracker.experiment!r}")
        if result.tracking_errors:
            print(f"warning: {len(result.tracking_errors)} MLflow call(s) failed", file=sys.stderr)
    return 0
