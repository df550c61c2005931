"""A replay of ml-latest-small as a data lake, run night after night through the real job.

The bundled ml-latest-small log (100,836 ratings, 1996-2018) is sorted by timestamp and cut into
``history_days + days`` chunks of equal size, one per consecutive simulated day; each chunk's
timestamps are compressed into its day, keeping their order. The first ``history_days``
partitions are the lake's backlog; then each simulated day lands one partition and runs
:func:`pipelines.nightly.job.run_retrain` on it, with these scenarios on chosen days:

``corrupt``     the partition arrives as a CSV with null ids, unparsable timestamps and
                duplicated rows: the run is rejected and the champion stays; the clean
                partition is then re-delivered (the next night validates it again).
``cripple``     the challenger is trained without warm start on 2% of the training users:
                the gate must keep the champion.
``kill``        the run is killed mid-training (``kill -9`` of a real ``recvae retrain``
                process once its first checkpoint exists) and run again: it resumes from the
                checkpoint and finishes.
``concurrent``  while a run holds the lock (a real second process), another run of the same
                night is refused with exit code 5; the first one proceeds.

Without ``subprocess_scenarios`` (the fast test mode) the kill is an exception raised inside
the training loop after the second epoch (the lock, checkpoint and state behave as after a
kill), and the concurrent holder is a lock taken in this process.

The timeline (date, data volume, challenger and champion NDCG@100, decision) is printed as a
table, written as JSON and plotted to a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pipelines.nightly.job import RetrainOutcome, StateDir, run_retrain
from pipelines.nightly.lake import day_start_epoch
from pipelines.nightly.lock import LockInfo, RunLock
from pipelines.nightly.registry import current_champion, open_tracking
from pipelines.nightly.settings import NightlySettings, TrainingSettings, settings_from_dict
from pipelines.settings import to_toml

__all__ = [
    "SimulationOptions",
    "SimulationResult",
    "TimelineRow",
    "expectations",
    "format_timeline",
    "land_partition",
    "plot_timeline",
    "replay_days",
    "run_simulation",
    "simulation_config",
]

logger = logging.getLogger(__name__)

SCENARIOS = ("corrupt", "cripple", "kill", "concurrent")


class SimulatedCrash(BaseException):
    """Raised inside the training loop to stand in for ``kill -9`` (fast test mode).

    A ``BaseException``, like ``KeyboardInterrupt``: the job does not catch it, so it leaves
    the state exactly as a killed process would (a checkpoint, no summary).
    """


@dataclass(frozen=True)
class SimulationOptions:
    """What to simulate.

    Attributes:
        output: Directory for the lake, the state, the MLflow store, the timeline and plot.
        days: Simulated nights (at least 6 when all scenarios are on).
        history_days: Partitions already in the lake before the first night.
        start: Date of the first history partition.
        scenarios: Night (1-based) of each scenario; a scenario left out does not happen.
        epochs: Training epochs of each challenger.
        hidden_dims: Encoder hidden sizes of the simulated model.
        latent_dim: Latent size of the simulated model.
        tolerance: The gate's NDCG@100 tolerance.
        subprocess_scenarios: Use real processes for ``kill`` and ``concurrent``.
        threads: torch threads.
        plot: Write ``timeline.png``.
        extra_config: Sections merged into the generated config (e.g.
            ``{"nightly": {"deploy": {"url": ...}}}``).
    """

    output: Path
    days: int = 7
    history_days: int = 21
    start: date = date(2024, 1, 1)
    scenarios: dict[str, int] = field(
        default_factory=lambda: {"corrupt": 3, "cripple": 4, "kill": 5, "concurrent": 6}
    )
    epochs: int = 10
    hidden_dims: tuple[int, ...] = (200,)
    latent_dim: int = 64
    tolerance: float = 0.01
    subprocess_scenarios: bool = True
    threads: int = 1
    plot: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.history_days < 1:
            raise ValueError(f"history_days must be >= 1, got {self.history_days}")
        if self.epochs < 3 and "kill" in self.scenarios:
            raise ValueError("the kill scenario needs epochs >= 3 (it stops after epoch 2)")
        unknown = sorted(set(self.scenarios) - set(SCENARIOS))
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown}; valid: {', '.join(SCENARIOS)}")
        nights = list(self.scenarios.values())
        if len(set(nights)) != len(nights):
            raise ValueError(f"two scenarios on the same night: {self.scenarios}")
        for name, night in self.scenarios.items():
            if not 2 <= night <= self.days:
                raise ValueError(
                    f"scenario {name} on night {night}: must be in [2, {self.days}] "
                    "(night 1 makes the first champion)"
                )


@dataclass(frozen=True)
class TimelineRow:
    """One run of the simulation."""

    night: int
    date: str
    scenario: str
    status: str
    exit_code: int
    partition_rows: int | None
    positive_pairs: int | None
    challenger_ndcg: float | None
    champion_ndcg: float | None
    champion_version: str | None
    resumed_from_epoch: int | None
    reason: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SimulationResult:
    """The timeline and where its files are."""

    rows: list[TimelineRow]
    timeline_json: Path
    plot: Path | None
    config: Path


# ---------------------------------------------------------------------------------- the lake
def replay_days(*, start: date, n_days: int) -> list[tuple[date, Any]]:
    """Cut ml-latest-small into ``n_days`` consecutive daily chunks: ``[(day, frame), ...]``.

    The log is sorted by timestamp and cut into chunks of equal size; each chunk's timestamps
    are compressed into its day, in order. Nothing is written here: :func:`land_partition`
    writes a chunk when its day comes.

    Raises:
        ValueError: more days than rows.
    """
    import polars as pl

    from recvae.data import load_dataset_frame

    frame = load_dataset_frame("ml-latest-small").sort("timestamp", "user_id", "item_id")
    n = frame.height
    if n_days > n:
        raise ValueError(f"cannot cut {n} rows into {n_days} days")
    days: list[tuple[date, Any]] = []
    for i in range(n_days):
        lo, hi = i * n // n_days, (i + 1) * n // n_days
        chunk = frame.slice(lo, hi - lo)
        first, last = chunk["timestamp"].min(), chunk["timestamp"].max()
        span = max(1, int(last) - int(first) + 1)  # type: ignore[arg-type]
        day = start + timedelta(days=i)
        offset = (pl.col("timestamp") - first) * 86_399 // span
        chunk = chunk.with_columns((day_start_epoch(day) + offset).alias("timestamp"))
        days.append((day, chunk))
    return days


def _partition_dir(lake: Path, day: date) -> Path:
    return lake / f"date={day.isoformat()}"


def land_partition(lake: Path, day: date, frame: Any, *, corrupt: bool = False) -> Path:
    """Write one day's partition (atomically: a hidden temp file, then a rename).

    With ``corrupt`` the partition is a CSV in which a tenth of the user ids are missing, a
    tenth of the timestamps are not dates, and a tenth of the rows are repeated.
    """
    import polars as pl

    folder = _partition_dir(lake, day)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    if not corrupt:
        tmp = folder / ".part-0.parquet.tmp"
        frame.write_parquet(tmp)
        tmp.rename(folder / "part-0.parquet")
        return folder
    n = frame.height
    bad = frame.with_row_index("_i").with_columns(
        pl.when(pl.col("_i") % 10 == 1)
        .then(None)
        .otherwise(pl.col("user_id").cast(pl.String))
        .alias("user_id"),
        pl.when(pl.col("_i") % 10 == 2)
        .then(pl.lit("31/02/2024 25:61"))
        .otherwise(pl.col("timestamp").cast(pl.String))
        .alias("timestamp"),
    )
    repeated = bad.filter(pl.col("_i") % 10 == 3)
    bad = pl.concat([bad, repeated]).drop("_i")
    tmp = folder / ".part-0.csv.tmp"
    bad.write_csv(tmp)
    tmp.rename(folder / "part-0.csv")
    logger.info(
        "landed a corrupted partition for %s (%d rows + %d repeats)", day, n, repeated.height
    )
    return folder


# ---------------------------------------------------------------------------------- settings
def simulation_config(options: SimulationOptions) -> dict[str, Any]:
    """The nightly config document of the simulation (also written as ``nightly-sim.toml``)."""
    out = options.output.resolve()
    document: dict[str, Any] = {
        "nightly": {
            "lake": str(out / "lake"),
            "state_dir": str(out / "state"),
            "window_days": 0,
            "recent_days": 7,
            "keep_challenger_bundles": 2,
            "columns": {
                "user_col": "user_id",
                "item_col": "item_id",
                "timestamp_col": "timestamp",
                "rating_col": "rating",
                "threshold": 3.5,
            },
            "validation": {"volume_ratio": 3.0, "volume_lookback": 7, "volume_min_history": 3},
            "split": {
                "eval_user_fraction": 0.25,
                "n_heldout": 100,
                "n_validation": 40,
                "min_eval_users": 20,
            },
            "training": {"warm_start": True},
            "gate": {"tolerance": options.tolerance, "min_coverage_ratio": 0.5},
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "artifact_location": (out / "mlartifacts").as_uri(),
            "experiment": "recvae-nightly-simulation",
            "registered_model": "recvae-sim",
            "alias": "champion",
        },
        "model": {
            "model": "multvae",
            "hidden_dims": list(options.hidden_dims),
            "latent_dim": options.latent_dim,
            "epochs": options.epochs,
            "batch_size": 128,
            "learning_rate": 0.001,
            "seed": 98765,
        },
        "run": {"device": "cpu", "num_threads": options.threads, "progress": False},
    }
    return _merge(document, options.extra_config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------- scenarios
def _subprocess_env(options: SimulationOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env["OMP_NUM_THREADS"] = str(options.threads)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_retrain_process(config: Path, day: date, options: SimulationOptions) -> Any:
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "retrain",
        "--config",
        str(config),
        "--date",
        day.isoformat(),
    ]
    return subprocess.Popen(
        command,
        env=_subprocess_env(options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate: Any, process: Any, timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")


def _kill_night(
    settings: NightlySettings, config: Path, day: date, options: SimulationOptions
) -> tuple[str, RetrainOutcome]:
    state = StateDir(settings.state_dir)
    checkpoint = state.checkpoint_dir(day) / "checkpoint.pt"
    if options.subprocess_scenarios:
        process = _start_retrain_process(config, day, options)
        appeared = _wait_for(checkpoint.exists, process, 600, f"{checkpoint}")
        if appeared and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            note = f"killed pid {process.pid} with SIGKILL after its first checkpoint"
        else:
            process.wait()
            note = f"the run ended (exit {process.returncode}) before it could be killed"
    else:

        def crash(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 2:
                raise SimulatedCrash(f"simulated kill after epoch {epoch}")

        try:
            run_retrain(settings, day, on_epoch=crash)
            note = "the run finished before the simulated kill"
        except SimulatedCrash as exc:
            note = str(exc)
    logger.info("kill scenario: %s; running the night again", note)
    return note, run_retrain(settings, day)


def _concurrent_night(
    settings: NightlySettings, config: Path, day: date, options: SimulationOptions
) -> tuple[RetrainOutcome, RetrainOutcome]:
    """Returns ``(the refused run, the run that held the lock)``."""
    state = StateDir(settings.state_dir)
    if options.subprocess_scenarios:
        process = _start_retrain_process(config, day, options)

        def holds() -> bool:
            info = LockInfo.read(state.lock_path)
            return info is not None and info.pid == process.pid

        if not _wait_for(holds, process, 300, "the first run to take the lock"):
            raise RuntimeError(
                f"the first run exited ({process.returncode}) before taking the lock: "
                f"{process.stderr.read() if process.stderr else ''}"
            )
        refused = run_retrain(settings, day)
        _, stderr = process.communicate()
        summary = state.summary(day) or {}
        holder = RetrainOutcome(
            str(summary.get("status", "failed")),
            str(summary.get("reason", stderr.strip()[-500:])),
            summary,
        )
        return refused, holder
    with RunLock(state.lock_path, purpose="simulated concurrent run"):
        refused = run_retrain(settings, day)
    return refused, run_retrain(settings, day)


# ---------------------------------------------------------------------------------- timeline
def _row(
    night: int, day: date, scenario: str, outcome: RetrainOutcome, note: str = ""
) -> TimelineRow:
    summary = outcome.summary
    gate = summary.get("gate") or {}
    registry = summary.get("registry") or {}
    counts = summary.get("counts") or {}
    training = summary.get("training") or {}
    challenger = gate.get("challenger") or {}
    champion = gate.get("champion") or {}
    version = registry.get("new_version") or registry.get("champion_version")
    return TimelineRow(
        night=night,
        date=day.isoformat(),
        scenario=scenario,
        status=outcome.status,
        exit_code=outcome.exit_code,
        partition_rows=summary.get("partition_rows"),
        positive_pairs=counts.get("positive_pairs"),
        challenger_ndcg=challenger.get("ndcg@100"),
        champion_ndcg=champion.get("ndcg@100"),
        champion_version=None if version is None else str(version),
        resumed_from_epoch=training.get("resumed_from_epoch"),
        reason=outcome.reason,
        note=note,
    )


def format_timeline(rows: list[TimelineRow]) -> str:
    """The timeline as a fixed-width table."""

    def num(v: float | int | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = (
        f"{'night':>5}  {'date':<10}  {'scenario':<10}  {'rows':>6}  {'positives':>9}  "
        f"{'challenger':>10}  {'champion':>8}  {'decision':<8}  {'exit':>4}  {'version':>7}  "
        f"{'resumed':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.night:>5}  {r.date:<10}  {r.scenario:<10}  {num(r.partition_rows, 'd'):>6}  "
            f"{num(r.positive_pairs, 'd'):>9}  {num(r.challenger_ndcg, '.4f'):>10}  "
            f"{num(r.champion_ndcg, '.4f'):>8}  {r.status:<8}  {r.exit_code:>4}  "
            f"{r.champion_version or '-':>7}  {num(r.resumed_from_epoch, 'd'):>7}"
        )
    return "\n".join(lines)


def plot_timeline(rows: list[TimelineRow], path: Path) -> Path:
    """Plot NDCG@100 of challenger and champion per night, decisions marked, volume as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in rows if r.status != "busy"]
    x = list(range(len(final)))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(final) + 2), 4.5))
    volume = ax.twinx()
    volume.bar(x, [r.partition_rows or 0 for r in final], color="0.85", width=0.6, zorder=0)
    volume.set_ylabel("rows in the night's partition")
    ax.set_zorder(volume.get_zorder() + 1)
    ax.patch.set_visible(False)

    def series(attr: str) -> list[float]:
        return [float("nan") if getattr(r, attr) is None else getattr(r, attr) for r in final]

    ax.plot(x, series("champion_ndcg"), "s--", color="tab:blue", label="champion NDCG@100")
    ax.plot(x, series("challenger_ndcg"), "o-", color="tab:purple", label="challenger NDCG@100")
    styles = {
        "promoted": ("^", "tab:green"),
        "kept": ("v", "tab:orange"),
        "rejected": ("X", "tab:red"),
        "failed": ("X", "black"),
    }
    known = [v for r in final for v in (r.challenger_ndcg, r.champion_ndcg) if v is not None]
    floor = min(known) * 0.9 if known else 0.0
    for i, r in enumerate(final):
        marker, color = styles.get(r.status, ("o", "gray"))
        y = r.challenger_ndcg if r.challenger_ndcg is not None else floor
        ax.scatter([i], [y], marker=marker, s=140, color=color, zorder=5)
        ax.annotate(
            r.status, (i, y), textcoords="offset points", xytext=(0, 10), ha="center", fontsize=8
        )
    if known:
        ax.set_ylim(floor * 0.9, max(known) * 1.15)  # room for the labels above the markers
    ax.set_xticks(x, [f"{r.date[5:]}\n{r.scenario}" for r in final], fontsize=8)
    ax.set_ylabel("NDCG@100 on the night's test users")
    ax.set_title("Nightly retraining on replayed ml-latest-small: decisions")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- the run
def run_simulation(options: SimulationOptions) -> SimulationResult:
    """Replay the log and run every night; return the timeline.

    Raises:
        ValueError: bad options, or ``options.output`` already holds a simulation state.
    """
    out = options.output
    if (out / "state").exists() or (out / "lake").exists():
        raise ValueError(
            f"{out} already holds a simulation (lake/ or state/): choose a new --output"
        )
    document = simulation_config(options)
    settings = settings_from_dict(document)  # bad options fail here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "nightly-sim.toml"
    config_path.write_text(to_toml(document))
    open_tracking(settings.mlflow)
    lake = settings.lake
    chunks = replay_days(start=options.start, n_days=options.history_days + options.days)
    for day, frame in chunks[: options.history_days]:
        land_partition(lake, day, frame)
    by_night = {night: name for name, night in options.scenarios.items()}
    rows: list[TimelineRow] = []
    for night in range(1, options.days + 1):
        day, frame = chunks[options.history_days + night - 1]
        scenario = by_night.get(night, "normal")
        first_row = len(rows)
        land_partition(lake, day, frame, corrupt=scenario == "corrupt")
        logger.info("night %d (%s): %s", night, day, scenario)
        if scenario == "cripple":
            crippled = settings.replace(
                training=TrainingSettings(warm_start=False, train_user_fraction=0.02)
            )
            rows.append(_row(night, day, scenario, run_retrain(crippled, day)))
        elif scenario == "kill":
            note, outcome = _kill_night(settings, config_path, day, options)
            rows.append(_row(night, day, scenario, outcome, note))
        elif scenario == "concurrent":
            refused, holder = _concurrent_night(settings, config_path, day, options)
            rows.append(_row(night, day, "2nd run", refused))
            rows.append(_row(night, day, scenario, holder))
        else:
            rows.append(_row(night, day, scenario, run_retrain(settings, day)))
        if scenario == "corrupt":
            land_partition(lake, day, frame)  # the upstream fix: the clean data is re-delivered
        ref = current_champion(settings.mlflow)
        version = None if ref is None else ref.version
        for i in range(first_row, len(rows)):
            rows[i] = dataclasses.replace(rows[i], champion_version=version)
    timeline = out / "timeline.json"
    timeline.write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    plot = plot_timeline(rows, out / "timeline.png") if options.plot else None
    return SimulationResult(rows=rows, timeline_json=timeline, plot=plot, config=config_path)


def expectations(rows: list[TimelineRow], options: SimulationOptions) -> list[dict[str, Any]]:
    """What each night should show, checked against the timeline.

    ``must`` expectations are the job's guarantees (a corrupted partition or a crippled
    challenger never changes the champion, a killed run resumes and finishes, two runs never
    both proceed); the others (``must`` False) are what normal nights usually show (the
    champion advances) and can fail honestly when a challenger is within noise but below the
    tolerance.
    """
    checks: list[dict[str, Any]] = []

    def add(ok: bool, must: bool, message: str) -> None:
        checks.append({"ok": bool(ok), "must": must, "message": message})

    previous_version: str | None = None
    for row in rows:
        if row.scenario == "2nd run":
            add(
                row.status == "busy" and row.exit_code == 5,
                True,
                f"{row.date} concurrent: the second run was refused (status {row.status}, "
                f"exit {row.exit_code})",
            )
            continue
        changed = row.champion_version is not None and row.champion_version != previous_version
        same = "unchanged" if row.champion_version == previous_version else "CHANGED"
        if row.scenario == "corrupt":
            add(
                row.status == "rejected" and row.champion_version == previous_version,
                True,
                f"{row.date} corrupt partition: {row.status} (exit {row.exit_code}), "
                f"champion {same}",
            )
        elif row.scenario == "cripple":
            add(
                row.status == "kept" and row.champion_version == previous_version,
                True,
                f"{row.date} crippled challenger: {row.status} (exit {row.exit_code}), "
                f"champion {same}",
            )
        elif row.scenario == "kill":
            resumed = row.resumed_from_epoch or 0
            add(
                row.status in ("promoted", "kept") and 0 < resumed < options.epochs,
                True,
                f"{row.date} killed mid-training: resumed after epoch {resumed} of "
                f"{options.epochs} and finished ({row.status})",
            )
        elif row.scenario == "concurrent":
            add(
                row.status in ("promoted", "kept"),
                True,
                f"{row.date} concurrent: the run holding the lock finished ({row.status})",
            )
        else:
            add(
                row.status == "promoted" and changed,
                False,
                f"{row.date} normal night: {row.status}, champion version "
                f"{previous_version or '-'} -> {row.champion_version or '-'}",
            )
        previous_version = row.champion_version
    return checks
