"""Validation of new partitions: the first step of a nightly run, before anything is trained.

Each partition gets these checks, each a :class:`CheckResult` with a message that names the
partition, the problem and the limit:

``files``        the partition holds at least one data file (``.parquet`` or ``.csv``)
``schema``       every file is readable and has the configured columns
``rows``         at least ``min_rows`` rows (an empty partition is rejected)
``nulls``        share of rows with a null user, item, timestamp (or rating)
``unparsable``   share of rows whose id, timestamp (or rating) is present but does not parse
``duplicates``   share of exact repeats of (user, item, timestamp)
``repeats``      share of rows that repeat a (user, item, timestamp) of an earlier partition
                 whose time range overlaps (a day delivered twice under two dates)
``timestamps``   share of timestamps outside ``[date - late_days, date + 1 day)``
``volume``       row count within ``[median / ratio, median * ratio]`` of recent partitions

All statistics of a partition come from one lazy aggregation over its files.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from pipelines.nightly.lake import (
    ITEM,
    RATING,
    RAW,
    TS,
    USER,
    Partition,
    canonical_frame,
    day_start_epoch,
    partition_rows,
)
from pipelines.nightly.settings import LakeSettings, ValidationSettings

if TYPE_CHECKING:
    import polars as pl

__all__ = ["CheckResult", "failed_checks", "validate_partitions"]

logger = logging.getLogger(__name__)

_DAY = 86_400


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one partition.

    Attributes:
        check: Check name (``rows``, ``nulls``, ...).
        partition: The partition date (ISO).
        ok: Whether it passed (a skipped check passes).
        message: What was measured, against which limit.
        value: The measured value, when there is one.
        limit: The limit it was held to, when there is one.
        skipped: True when the check could not apply (e.g. too little history for volume).
    """

    check: str
    partition: str
    ok: bool
    message: str
    value: float | None = None
    limit: float | None = None
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failed_checks(results: list[CheckResult]) -> list[CheckResult]:
    """The results that did not pass."""
    return [r for r in results if not r.ok]


def _fraction_check(
    check: str,
    partition: Partition,
    count: int,
    n_rows: int,
    limit: float,
    what: str,
    detail: str = "",
) -> CheckResult:
    fraction = count / n_rows if n_rows else 0.0
    ok = fraction <= limit
    verdict = "ok" if ok else "too many"
    message = (
        f"partition {partition.name}: {count} of {n_rows} rows ({fraction:.2%}) {what}"
        f"{detail} (max {limit:.2%}): {verdict}"
    )
    return CheckResult(check, partition.day.isoformat(), ok, message, fraction, limit)


def _stats(
    partition: Partition, lake: LakeSettings, validation: ValidationSettings
) -> dict[str, int]:
    import polars as pl

    frames = [canonical_frame(f, lake, keep_raw=True) for f in partition.files]
    frame = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    columns = [USER, ITEM, TS] + ([RATING] if lake.rating_col is not None else [])
    start = day_start_epoch(partition.day)
    lowest = start - validation.late_days * _DAY
    exprs: list[pl.Expr] = [pl.len().alias("rows")]
    any_null = pl.lit(False)
    any_bad = pl.lit(False)
    for name in columns:
        raw_null = pl.col(f"{RAW}{name}_null")
        bad = ~raw_null & pl.col(name).is_null()
        any_null = any_null | raw_null
        any_bad = any_bad | bad
        exprs.append(raw_null.sum().alias(f"null_{name}"))
        exprs.append(bad.sum().alias(f"bad_{name}"))
    exprs += [
        any_null.sum().alias("any_null"),
        any_bad.sum().alias("any_bad"),
        pl.struct(USER, ITEM, TS).n_unique().alias("unique_events"),
        (pl.col(TS).is_not_null() & ((pl.col(TS) < lowest) | (pl.col(TS) >= start + _DAY)))
        .sum()
        .alias("out_of_range"),
    ]
    row = frame.select(exprs).collect().row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}


def _describe(stats: dict[str, int], prefix: str, lake: LakeSettings) -> str:
    names = {
        USER: lake.user_col,
        ITEM: lake.item_col,
        TS: lake.timestamp_col,
        RATING: lake.rating_col or RATING,
    }
    parts = [
        f"{column} {stats[f'{prefix}_{key}']}"
        for key, column in names.items()
        if stats.get(f"{prefix}_{key}", 0)
    ]
    return f" [{', '.join(parts)}]" if parts else ""


def _volume_check(
    partition: Partition,
    n_rows: int,
    earlier: list[Partition],
    validation: ValidationSettings,
    counts: dict[date, int],
) -> CheckResult:
    history = earlier[-validation.volume_lookback :]
    day = partition.day.isoformat()
    if len(history) < validation.volume_min_history:
        return CheckResult(
            "volume",
            day,
            True,
            f"partition {partition.name}: volume check skipped, {len(history)} earlier "
            f"partition(s) (needs {validation.volume_min_history})",
            float(n_rows),
            None,
            skipped=True,
        )
    for p in history:
        if p.day not in counts:
            try:
                counts[p.day] = partition_rows(p)
            except Exception as exc:  # a late, broken file in an old partition
                return CheckResult(
                    "volume",
                    day,
                    False,
                    f"partition {partition.name}: cannot count the rows of the earlier "
                    f"partition {p.name} for the volume reference: {exc}",
                )
    median = statistics.median(counts[p.day] for p in history)
    ratio = validation.volume_ratio
    low, high = median / ratio, median * ratio
    ok = low <= n_rows <= high
    if ok:
        verdict = "ok"
    elif n_rows < low:
        verdict = "volume drop"
    else:
        verdict = "volume spike"
    message = (
        f"partition {partition.name}: {n_rows} rows vs median {median:g} of the "
        f"{len(history)} previous partition(s), allowed [{low:.0f}, {high:.0f}] "
        f"(ratio {ratio:g}): {verdict}"
    )
    return CheckResult("volume", day, ok, message, float(n_rows), float(median))


def _events(partition: Partition, lake: LakeSettings) -> pl.LazyFrame:
    import polars as pl

    frames = [canonical_frame(f, lake).select(USER, ITEM, TS) for f in partition.files]
    return pl.concat(frames, how="vertical").drop_nulls()


def _repeats_check(
    partition: Partition,
    n_rows: int,
    earlier: list[Partition],
    lake: LakeSettings,
    validation: ValidationSettings,
) -> CheckResult:
    """Rows of ``partition`` that already occur in an earlier partition whose events can fall
    in the same time range (``2 * late_days + 1`` days back)."""
    import polars as pl

    first = partition.day - timedelta(days=2 * validation.late_days + 1)
    overlapping = [p for p in earlier if p.day >= first and p.files]
    rows = _events(partition, lake).with_row_index("row")
    found: list[pl.Series] = []
    for p in overlapping:  # one earlier partition in memory at a time (the join's hash table)
        try:
            join = rows.join(_events(p, lake), on=[USER, ITEM, TS], how="semi")
            found.append(join.select("row").collect()["row"])
        except Exception as exc:  # validated (or reported) on its own
            logger.warning("repeats check: skipping unreadable %s: %s", p.name, exc)
    repeats = pl.concat(found).n_unique() if found else 0
    names = ", ".join(p.name for p in overlapping) or "none"
    return _fraction_check(
        "repeats",
        partition,
        repeats,
        n_rows,
        validation.max_duplicate_fraction,
        f"repeat a (user, item, timestamp) row of an earlier partition ({names})",
    )


def validate_partitions(
    new: list[Partition],
    every: list[Partition],
    lake: LakeSettings,
    validation: ValidationSettings,
) -> list[CheckResult]:
    """Run every check on each partition of ``new``.

    Args:
        new: The partitions to validate (those that arrived since the last completed run).
        every: All usable partitions of the lake, oldest first (the volume reference).
        lake: Column names and types.
        validation: Thresholds.

    Returns:
        One result per check and partition, in order; a partition whose files cannot be read
        gets only the ``files``/``schema`` results.
    """
    results: list[CheckResult] = []
    counts: dict[date, int] = {}
    for partition in new:
        day = partition.day.isoformat()
        if not partition.files:
            results.append(
                CheckResult(
                    "files",
                    day,
                    False,
                    f"partition {partition.name} holds no data files (.parquet or .csv) in "
                    f"{partition.path}",
                )
            )
            continue
        results.append(
            CheckResult(
                "files", day, True, f"partition {partition.name}: {len(partition.files)} file(s)"
            )
        )
        try:
            stats = _stats(partition, lake, validation)
        except Exception as exc:  # missing column, unreadable file, incompatible types
            results.append(CheckResult("schema", day, False, f"partition {partition.name}: {exc}"))
            continue
        results.append(
            CheckResult("schema", day, True, f"partition {partition.name}: columns present")
        )
        n_rows = stats["rows"]
        counts[partition.day] = n_rows
        results.append(
            CheckResult(
                "rows",
                day,
                n_rows >= validation.min_rows,
                f"partition {partition.name}: {n_rows} rows (min {validation.min_rows})"
                + ("" if n_rows >= validation.min_rows else ": empty partition"),
                float(n_rows),
                float(validation.min_rows),
            )
        )
        if n_rows == 0:
            continue
        results.append(
            _fraction_check(
                "nulls",
                partition,
                stats["any_null"],
                n_rows,
                validation.max_null_fraction,
                "have a null value",
                _describe(stats, "null", lake),
            )
        )
        results.append(
            _fraction_check(
                "unparsable",
                partition,
                stats["any_bad"],
                n_rows,
                validation.max_unparsable_fraction,
                "have an id, timestamp or rating that does not parse",
                _describe(stats, "bad", lake),
            )
        )
        results.append(
            _fraction_check(
                "duplicates",
                partition,
                n_rows - stats["unique_events"],
                n_rows,
                validation.max_duplicate_fraction,
                "repeat an earlier (user, item, timestamp) row",
            )
        )
        results.append(
            _fraction_check(
                "timestamps",
                partition,
                stats["out_of_range"],
                n_rows,
                validation.max_out_of_range_fraction,
                f"have a timestamp outside [{validation.late_days} day(s) before, end of] the "
                "partition date",
            )
        )
        earlier = [p for p in every if p.day < partition.day]
        results.append(_repeats_check(partition, n_rows, earlier, lake, validation))
        results.append(_volume_check(partition, n_rows, earlier, validation, counts))
    for result in results:
        (logger.info if result.ok else logger.error)("check %s: %s", result.check, result.message)
    return results
