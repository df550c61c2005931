"""``recvae retrain``: the nightly job, its rollback and its simulation.

::

    recvae retrain --config pipelines/configs/nightly.toml [--date YYYY-MM-DD] [--force]
    recvae retrain rollback --config pipelines/configs/nightly.toml [--to VERSION]
    recvae retrain simulate [--days 7] [--output DIR]
    recvae rollback --config pipelines/configs/nightly.toml          (same as retrain rollback)

Exit codes: 0 promoted, 3 champion kept, 4 data rejected, 5 another run holds the lock,
1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any

from pipelines.commands._common import convert_argument, positive_int
from pipelines.folders import writable_folder_problem

EXIT_CODES_HELP = (
    "exit codes: 0 challenger promoted, 3 champion kept (challenger did not pass the gate), "
    "4 data rejected by validation, 5 another run holds the lock, 1 failure, "
    "2 usage or configuration error"
)


def _date(text: str) -> date:
    return convert_argument(text, date.fromisoformat, "a date (YYYY-MM-DD)")


def _add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="TOML",
        default=argparse.SUPPRESS,
        help="nightly config file (or preset name, e.g. nightly)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="override [nightly] state_dir (its lock and rollbacks.jsonl: give the job's own)",
    )
    parser.add_argument(
        "--to",
        metavar="VERSION",
        help="registry version to point the alias at (default: the previous champion)",
    )
    parser.set_defaults(func=rollback_command)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retrain",
        help="nightly retraining: validate, train, compare with the champion, promote or keep",
        description=(
            "Run one night of the retraining job: validate the new partitions of the data lake, "
            "build the training matrix and a fresh split, train a challenger (resuming from its "
            "checkpoint after a crash), compare it with the champion on the same users, promote "
            "it only if its NDCG@100 is within the tolerance, and notify the serving layer. "
            "Rerunning a completed date does nothing unless --force."
        ),
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--config", metavar="TOML", help="nightly config file (or preset name)")
    parser.add_argument("--date", type=_date, help="the night to run (default: yesterday in UTC)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="run again even if the date completed, or is older than the last completed run",
    )
    parser.add_argument("--summary", type=Path, help="also write the JSON summary here")
    parser.add_argument("--lake", type=Path, help="override [nightly] lake")
    parser.add_argument("--state-dir", type=Path, help="override [nightly] state_dir")
    parser.set_defaults(func=retrain_command, action=None)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    rollback = actions.add_parser(
        "rollback",
        help="move the champion alias back to the previous champion",
        description="Point the champion alias at the previous champion (or --to VERSION) and "
        "notify the serving layer. Exit 5 while a run holds the lock.",
    )
    _add_rollback_arguments(rollback)

    simulate = actions.add_parser(
        "simulate",
        help="replay ml-latest-small as daily partitions and run the job night after night",
        description=(
            "Cut the bundled ml-latest-small log into consecutive daily partitions and run the "
            "real job every night, with a corrupted partition, a crippled challenger, a run "
            "killed mid-training and a concurrent run on chosen nights. Prints the timeline "
            "of decisions and plots it (timeline.png). Exits 1 if a safety expectation fails."
        ),
    )
    simulate.add_argument("--days", type=positive_int, default=7, help="nights to run (default 7)")
    simulate.add_argument(
        "--history-days", type=positive_int, default=21, help="backlog partitions (default 21)"
    )
    simulate.add_argument(
        "--output",
        "-o",
        type=Path,
        help="new directory for everything (default runs/nightly-sim-TIME)",
    )
    simulate.add_argument("--epochs", type=positive_int, default=10, help="epochs per night")
    simulate.add_argument(
        "--tolerance", type=float, default=0.01, help="gate tolerance (default 0.01)"
    )
    for name, night in (("corrupt", 3), ("cripple", 4), ("kill", 5), ("concurrent", 6)):
        simulate.add_argument(
            f"--{name}-night",
            type=int,
            default=night,
            metavar="N",
            help=f"night of the {name} scenario (default {night}; 0 turns it off)",
        )
    simulate.add_argument(
        "--in-process",
        action="store_true",
        help="simulate the kill and the concurrent run inside this process (faster, no kill -9)",
    )
    simulate.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    simulate.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    simulate.set_defaults(func=simulate_command)

    top = subparsers.add_parser(
        "rollback",
        help="move the nightly champion alias back (same as `retrain rollback`)",
        description="Point the champion alias at the previous champion (or --to VERSION).",
    )
    _add_rollback_arguments(top)


def _settings(args: argparse.Namespace) -> Any:
    from pipelines.nightly.settings import load_settings
    from pipelines.settings import CONFIG_DIR

    config = getattr(args, "config", None)
    if not config:
        raise ValueError("--config is required (e.g. --config pipelines/configs/nightly.toml)")
    path = Path(config)
    if not path.exists() and not path.suffix and (CONFIG_DIR / f"{config}.toml").exists():
        path = CONFIG_DIR / f"{config}.toml"
    return load_settings(
        path, lake=getattr(args, "lake", None), state_dir=getattr(args, "state_dir", None)
    )


def _check_writable_file(path: Path, flag: str) -> None:
    """Refuse a file path that cannot be written, before the night runs (a failure to write it
    afterwards would hide the night's outcome).

    Raises:
        ValueError: ``path`` is a folder, or its folder cannot take it (see
            :func:`_check_writable_folder`).
    """
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path")
    _check_writable_folder(path.parent, f"{flag} {path}")


def _check_writable_folder(folder: Path, what: str) -> None:
    """Raise ValueError unless ``folder`` is (or can be created as) a folder that takes files
    (:func:`pipelines.folders.writable_folder_problem` says why not)."""
    problem = writable_folder_problem(folder)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")


def _write_refusal(path: Path, day: date | None, exc: BaseException) -> None:
    """The scheduler's summary for a night that never ran (bad input, interruption), so that
    it never shows the previous night's outcome instead."""
    from pipelines.cli import Terminated
    from pipelines.nightly.job import _write_json, default_date

    interrupted = isinstance(exc, KeyboardInterrupt)
    usage = isinstance(exc, ValueError | FileNotFoundError | NotADirectoryError)
    code = 143 if isinstance(exc, Terminated) else 130 if interrupted else 2 if usage else 1
    record = {
        "date": (day or default_date()).isoformat(),
        "status": "interrupted" if interrupted else "error",
        "exit_code": code,
        "reason": str(exc) or type(exc).__name__,
    }
    try:
        _write_json(path, record)
    except OSError:
        pass  # the error itself is what the user sees; the probe above refused bad paths


def retrain_command(args: argparse.Namespace) -> int:
    from pipelines.nightly.job import run_retrain

    if args.summary is not None:
        _check_writable_file(args.summary, "--summary")
    try:
        settings = _settings(args)
        if not Path(settings.lake).is_dir():
            raise ValueError(
                f"the data lake {settings.lake} is not a folder ([nightly] lake, --lake)"
            )
        if Path(settings.state_dir).exists() and not Path(settings.state_dir).is_dir():
            raise ValueError(
                f"the state directory {settings.state_dir} is not a folder "
                "([nightly] state_dir, --state-dir)"
            )
        _check_writable_folder(
            Path(settings.state_dir), "the state directory ([nightly] state_dir, --state-dir)"
        )
        outcome = run_retrain(settings, args.date, force=args.force, summary_path=args.summary)
    except BaseException as exc:
        if args.summary is not None:
            _write_refusal(args.summary, args.date, exc)
        raise
    summary = outcome.summary
    stream = sys.stdout if outcome.exit_code in (0, 3) else sys.stderr
    label = f"{outcome.status} (already done)" if outcome.already_done else outcome.status
    print(f"recvae retrain {summary.get('date')}: {label}: {outcome.reason}", file=stream)
    registry = summary.get("registry") or {}
    if registry.get("new_version"):
        name = f"{registry['model']}@{registry['alias']}"
        if outcome.already_done:  # the alias may have moved since (later nights, rollbacks)
            print(
                f"that night made version {registry['new_version']} the champion "
                f"({name} may have moved since)"
            )
        else:
            print(f"champion: {name} -> version {registry['new_version']}")
    notify = summary.get("notify") or {}
    if notify.get("ok") is False:
        # An "already done" rerun reads the night's summary: its failure is history, not news.
        when = "that night, the " if outcome.already_done else ""
        print(
            f"warning: {when}serving layer was not notified: {notify.get('error')}",
            file=sys.stderr,
        )
    if outcome.status != "busy" and not outcome.already_done:
        day = str(summary.get("date"))
        print(f"summary: {settings.state_dir / 'runs' / day / 'summary.json'}")
    return outcome.exit_code


def rollback_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError
    from pipelines.nightly.job import ExitCode, run_rollback
    from pipelines.nightly.lock import LockBusyError
    from pipelines.tracking_hooks import tracking_available

    settings = _settings(args)
    if not tracking_available():
        raise CLIError(
            "recvae rollback needs mlflow (the registry holds the champion alias): "
            "pip install 'recvae[track]'"
        )
    from mlflow.exceptions import MlflowException

    try:
        record = run_rollback(settings, to_version=args.to)
    except LockBusyError as exc:
        print(f"recvae: error: {exc}", file=sys.stderr)
        return int(ExitCode.BUSY)
    except MlflowException as exc:  # the registry failed mid-way (went away, a server error)
        text = str(exc).strip().splitlines()
        print(
            "recvae: error: the MLflow registry failed during the rollback, which is not "
            "recorded in rollbacks.jsonl (check where the alias points before retrying): "
            f"{text[0] if text else type(exc).__name__}",
            file=sys.stderr,
        )
        return int(ExitCode.FAILED)
    print(
        f"rolled back {record['model']}@{record['alias']}: version {record['from_version']} -> "
        f"{record['to_version']}"
    )
    if record.get("tag_error"):
        print(
            f"warning: version {record['from_version']} not tagged nightly_rolled_back_at: "
            f"{record['tag_error']}",
            file=sys.stderr,
        )
    notify = record.get("notify") or {}
    if notify.get("ok") is False:
        print(f"warning: serving layer not notified: {notify.get('error')}", file=sys.stderr)
    return 0


def simulate_command(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pipelines.nightly.simulate import (
        SimulationOptions,
        expectations,
        format_timeline,
        run_simulation,
    )

    output = args.output or Path("runs") / (
        "nightly-sim-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    )
    scenarios = {
        name: night
        for name, night in (
            ("corrupt", args.corrupt_night),
            ("cripple", args.cripple_night),
            ("kill", args.kill_night),
            ("concurrent", args.concurrent_night),
        )
        if night
    }
    options = SimulationOptions(
        output=output,
        days=args.days,
        history_days=args.history_days,
        scenarios=scenarios,
        epochs=args.epochs,
        tolerance=args.tolerance,
        subprocess_scenarios=not args.in_process,
        threads=args.threads,
        plot=not args.no_plot,
    )
    result = run_simulation(options)
    print(format_timeline(result.rows))
    print()
    failed_must = 0
    for check in expectations(result.rows, options):
        mark = "ok  " if check["ok"] else ("FAIL" if check["must"] else "note")
        failed_must += int(check["must"] and not check["ok"])
        print(f"[{mark}] {check['message']}")
    print()
    print(f"timeline: {result.timeline_json}")
    if result.plot is not None:
        print(f"plot:     {result.plot}")
    print(f"config:   {result.config}")
    return 1 if failed_must else 0
