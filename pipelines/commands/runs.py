"""``recvae runs``: recent MLflow runs and their key metrics, for a terminal.

The MLflow UI reads the same store: ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Each metric column: its title and the keys that fill it, the first one a run has. `recvae
# train`, `experiment` and `tune` log the validation and test users' metrics under the first
# names; a nightly retrain (pipelines/nightly/job.py) logs its challenger's scores on the night's
# test users as `challenger.*` and the validation score of the epoch it keeps as
# `train.best_val_*`. No run logs both.
_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("val NDCG@100", ("validation_ndcg_at_100", "train.best_val_ndcg_at_100")),
    ("R@20", ("test_recall_at_20", "challenger.recall_at_20")),
    ("R@50", ("test_recall_at_50", "challenger.recall_at_50")),
    ("NDCG@100", ("test_ndcg_at_100", "challenger.ndcg_at_100")),
    ("± se", ("test_ndcg_at_100_se", "challenger.ndcg_at_100_se")),
)
# The model column, the first of these a run has: an experiment's label, the model type of
# `train`/`experiment`/`tune`, a run's `model` tag, the nightly retrain's `model.model` param.
_MODEL_KEYS: tuple[tuple[str, str], ...] = (
    ("params", "label"),
    ("params", "model"),
    ("tags", "model"),
    ("params", "model.model"),
)
# MLflow's largest page of search_runs (mlflow.store.tracking.SEARCH_MAX_RESULTS_THRESHOLD).
MAX_LIMIT = 50_000
# The tables every MLflow sqlite store has; a file without them is not a tracking store.
_MLFLOW_TABLES = {"alembic_version", "experiments", "runs"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "runs",
        help="list recent MLflow runs with their test metrics",
        description=(
            "List the most recent runs of the tracking store, newest first, with validation "
            "NDCG@100 and the test metrics (for a nightly retrain, its challenger's: the "
            "validation score of the epoch it keeps and its scores on the night's test users). "
            "Child runs (one per model of an experiment, one per tuning trial) are indented "
            "under their parent. The MLflow UI shows the same store: "
            "mlflow ui --backend-store-uri sqlite:///mlflow.db"
        ),
    )
    parser.add_argument(
        "--experiment",
        action="append",
        help="only this MLflow experiment (repeatable; default all)",
    )
    parser.add_argument(
        "--limit", type=int, default=20, help=f"at most this many runs (20; 1 to {MAX_LIMIT})"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.set_defaults(func=run_command)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _duration(start: int, end: int | None) -> str:
    if end is None:
        return "running"
    seconds = max(0, end - start) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_runs(runs: list[Any]) -> str:
    """A plain-text table of :class:`recvae.tracking.RunSummary` rows (children indented)."""
    ids = {run.run_id for run in runs}
    ordered: list[tuple[Any, int]] = []
    children: dict[str, list[Any]] = {}
    for run in runs:
        if run.parent_run_id in ids:
            children.setdefault(run.parent_run_id, []).append(run)

    def add(run: Any, depth: int) -> None:
        ordered.append((run, depth))
        for child in sorted(children.get(run.run_id, []), key=lambda r: r.start_time):
            add(child, depth + 1)

    for run in runs:
        if run.parent_run_id not in ids:
            add(run, 0)
    header = ["started (UTC)", "experiment", "run", "model", "status", "time"]
    header += [title for title, _ in _COLUMNS]
    rows = [header]
    for run, depth in ordered:
        model = _first(run, _MODEL_KEYS)
        name = ("  " * depth + ("└ " if depth else "")) + (run.name or run.run_id[:8])
        if depth == 0 and run.parent_run_id:  # its parent is beyond --limit
            name += f" (child of {run.parent_run_id[:8]})"
        cells = [
            _time(run.start_time),
            run.experiment,
            name,
            model,
            run.status.lower(),
            _duration(run.start_time, run.end_time),
        ]
        for _, keys in _COLUMNS:
            value = next((run.metrics[key] for key in keys if key in run.metrics), None)
            cells.append("" if value is None else f"{value:.4f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _first(run: Any, keys: tuple[tuple[str, str], ...]) -> str:
    """The first non-empty ``(params or tags, key)`` value of ``run``, else ``""``."""
    for where, key in keys:
        value = getattr(run, where).get(key)
        if value:
            return str(value)
    return ""


def check_store(uri: str) -> None:
    """Refuse a tracking URI that is not an existing store, before MLflow opens (and so creates
    or migrates) it: a listing must leave the store as it found it.

    A sqlite URI must name an existing MLflow database (opened read-only here); a bare path or
    ``file:`` URI must be an existing folder (MLflow's file store); other URIs (a server, a
    database server) are left to MLflow.

    Raises:
        CLIError: The store does not exist, is not an MLflow store, or the URI is not one.
    """
    from urllib.parse import urlparse

    from pipelines.cli import CLIError

    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        _check_sqlite_store(uri)
        return
    if scheme in ("", "file") or (len(scheme) == 1 and scheme.isalpha()):  # C:\... too
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        if path.is_file():
            raise CLIError(
                f"--tracking-uri {uri}: {path} is a file, not a tracking URI; "
                f"for a sqlite store pass sqlite:///{path}"
            )
        if not path.is_dir():
            raise CLIError(
                f"no MLflow store at {path}: pass --tracking-uri sqlite:///<file> "
                "(e.g. sqlite:///mlflow.db)"
            )


def _check_sqlite_store(uri: str) -> None:
    import sqlite3
    from contextlib import closing

    from pipelines.cli import CLIError

    location = uri[len("sqlite://") :].split("?", 1)[0]
    if location in ("", "/", "/:memory:"):
        raise CLIError(f"--tracking-uri {uri}: an in-memory sqlite store holds no runs")
    if not location.startswith("/"):
        raise CLIError(
            f"--tracking-uri {uri}: a sqlite URI needs three slashes and a file, "
            "e.g. sqlite:///mlflow.db (relative) or sqlite:////abs/path/mlflow.db"
        )
    database = Path(location[1:])
    if not database.is_file():
        raise CLIError(
            f"no MLflow store at {database}: run `recvae train` or `recvae experiment` "
            "first, or pass --tracking-uri"
        )
    # mode=ro: reading the table names must not create, lock for writing or change the file.
    read_only = f"{database.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(read_only, uri=True)) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            tables = {str(row[0]) for row in rows}
    except sqlite3.Error as exc:
        raise CLIError(
            f"{database} is not an MLflow store: not a sqlite database ({exc})"
        ) from None
    missing = _MLFLOW_TABLES - tables
    if missing:
        raise CLIError(
            f"{database} is not an MLflow store (no {', '.join(sorted(missing))} table); "
            "pass the database that `recvae train` or `recvae experiment` wrote"
        )


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError
    from pipelines.tracking_hooks import tracking_available

    if not 1 <= args.limit <= MAX_LIMIT:
        raise CLIError(f"--limit must be between 1 and {MAX_LIMIT}, got {args.limit}")
    if not tracking_available():
        raise CLIError("recvae runs needs mlflow: pip install 'recvae[track]'")
    from mlflow.exceptions import MlflowException

    from recvae.tracking import configure_tracking, recent_runs, redact_uri

    uri = configure_tracking(args.tracking_uri)
    check_store(uri)
    shown = redact_uri(uri)
    try:
        runs = recent_runs(experiment_names=args.experiment, limit=args.limit)
    except MlflowException as exc:
        raise CLIError(f"cannot read the MLflow store {shown}: {_first_line(exc)}") from None
    if not runs:
        print(f"no runs in {shown}")
        return 0
    print(format_runs(runs))
    print(f"\n{len(runs)} run(s) from {shown}; details: {details_hint(shown)}")
    return 0


def details_hint(uri: str) -> str:
    """Where to see the runs: a tracking server shows its own UI; a local store needs
    ``mlflow ui`` started on it (which refuses a server URI)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
