"""Reading the interaction log as it lands in a data lake: daily ``date=YYYY-MM-DD/`` partitions.

Each partition directory holds parquet and/or CSV files with a user, an item, a timestamp and
optionally a rating (or weight) column. Partitions are chosen by their directory name before
any file is opened (partition pruning), and every file is read through a polars lazy scan that
keeps only the needed columns and pushes the row filters down, so a log larger than memory is
reduced to the (user, item) positives before it is collected.

A partition that holds a ``_QUARANTINE`` file is skipped entirely (an operator's way to set a
bad delivery aside); with ``require_success_marker`` a partition counts only once its writer
has left a ``_SUCCESS`` file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.nightly.settings import LakeSettings

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "DATA_SUFFIXES",
    "Partition",
    "QUARANTINE_MARKER",
    "SUCCESS_MARKER",
    "canonical_frame",
    "day_start_epoch",
    "list_partitions",
    "partition_rows",
    "window_partitions",
]

logger = logging.getLogger(__name__)

QUARANTINE_MARKER = "_QUARANTINE"
SUCCESS_MARKER = "_SUCCESS"
DATA_SUFFIXES = (".parquet", ".csv")
_PARTITION_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")

# Canonical columns of every scan: ids (raw and parsed), timestamp (raw and seconds), rating.
USER = "user_id"
ITEM = "item_id"
TS = "timestamp"
RATING = "rating"
RAW = "_raw_"  # prefix of the raw (unparsed) copies kept for the checks


@dataclass(frozen=True)
class Partition:
    """One daily partition directory.

    Attributes:
        day: The partition date.
        path: The ``date=YYYY-MM-DD`` directory.
        files: Its data files (parquet or CSV), sorted by name; hidden files and markers are
            not data.
    """

    day: date
    path: Path
    files: tuple[Path, ...]

    @property
    def name(self) -> str:
        return f"date={self.day.isoformat()}"

    def fingerprint(self) -> str:
        """A digest of the data files' names, sizes and modification times: it changes when
        a file is added, removed, rewritten or touched (a late delivery into an old day)."""
        digest = hashlib.sha256()
        for file in self.files:
            info = file.stat()
            digest.update(f"{file.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


def list_partitions(root: Path, lake: LakeSettings) -> list[Partition]:
    """Every usable partition under ``root``, oldest first.

    Directories whose name is not ``date=YYYY-MM-DD`` are ignored with a warning; quarantined
    partitions, and incomplete ones when ``require_success_marker`` is set, are skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"data lake directory not found: {root}")
    partitions: list[Partition] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith((".", "_")):
            continue
        match = _PARTITION_RE.match(child.name)
        if match is None:
            logger.warning("ignoring %s: not a date=YYYY-MM-DD partition", child)
            continue
        try:
            day = date.fromisoformat(match.group(1))
        except ValueError:
            logger.warning("ignoring %s: %s is not a calendar date", child, match.group(1))
            continue
        if (child / QUARANTINE_MARKER).exists():
            logger.warning("skipping quarantined partition %s", child)
            continue
        if lake.require_success_marker and not (child / SUCCESS_MARKER).exists():
            logger.warning("skipping %s: no %s marker yet", child, SUCCESS_MARKER)
            continue
        files = tuple(
            sorted(
                f
                for f in child.iterdir()
                if f.is_file() and not f.name.startswith((".", "_")) and f.suffix in DATA_SUFFIXES
            )
        )
        partitions.append(Partition(day=day, path=child, files=files))
    return partitions


def window_partitions(partitions: list[Partition], day: date, window_days: int) -> list[Partition]:
    """Partitions in ``(day - window_days, day]`` (every one up to ``day`` when 0)."""
    start = date.min if window_days == 0 else day - timedelta(days=window_days - 1)
    return [p for p in partitions if start <= p.day <= day]


def day_start_epoch(day: date) -> int:
    """Seconds since the epoch at 00:00 UTC of ``day``."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def _scan_file(file: Path) -> pl.LazyFrame:
    import polars as pl

    if file.suffix == ".parquet":
        return pl.scan_parquet(file)
    # Everything as text: the same parsing rules then apply to CSV and parquet strings.
    return pl.scan_csv(file, infer_schema=False)


def _id_expr(raw: pl.Expr, dtype: pl.DataType, id_type: str) -> pl.Expr:
    import polars as pl

    if id_type == "int":
        if dtype == pl.String:
            return raw.str.strip_chars().cast(pl.Int64, strict=False)
        if dtype.is_integer():
            return raw.cast(pl.Int64, strict=False)
        if dtype.is_float():
            # 12.0 is the id 12; 12.5, NaN and inf are not ids.
            ok = raw.is_finite() & (raw.round(0) == raw)
            return pl.when(ok).then(raw.cast(pl.Int64, strict=False)).otherwise(None)
        return pl.lit(None, dtype=pl.Int64)
    # String ids: integers are printed; empty or blank strings are not ids.
    if dtype == pl.String or dtype.is_integer():
        text = raw.cast(pl.String).str.strip_chars()
        return pl.when(text.str.len_chars() > 0).then(text).otherwise(None)
    return pl.lit(None, dtype=pl.String)


def _timestamp_expr(raw: pl.Expr, dtype: pl.DataType, divisor: int) -> pl.Expr:
    """Seconds since the epoch (Int64), null where the value does not parse."""
    import polars as pl

    if dtype.is_integer():
        return raw.cast(pl.Int64) // divisor
    if dtype.is_float():
        return pl.when(raw.is_finite()).then((raw / divisor).floor().cast(pl.Int64))
    if isinstance(dtype, pl.Datetime):
        return raw.dt.epoch("s")
    if dtype == pl.Date:
        return raw.cast(pl.Datetime("us")).dt.epoch("s")
    if dtype == pl.String:
        text = raw.str.strip_chars()
        as_int = text.cast(pl.Int64, strict=False) // divisor
        parsed = text.str.to_datetime(strict=False, time_zone="UTC").dt.epoch("s")
        return pl.coalesce(as_int, parsed)
    return pl.lit(None, dtype=pl.Int64)


def _rating_expr(raw: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    import polars as pl

    if dtype == pl.String:
        value = raw.str.strip_chars().cast(pl.Float64, strict=False)
    elif dtype.is_numeric():
        value = raw.cast(pl.Float64)
    else:
        return pl.lit(None, dtype=pl.Float64)
    return pl.when(value.is_finite()).then(value).otherwise(None)


def canonical_frame(file: Path, lake: LakeSettings, *, keep_raw: bool = False) -> pl.LazyFrame:
    """A lazy scan of one file with the canonical columns.

    Columns: ``user_id`` and ``item_id`` (Int64 or String per the id types), ``timestamp``
    (Int64 seconds since the epoch, UTC), ``rating`` (Float64, when a rating column is
    configured). A value that does not parse becomes null. With ``keep_raw`` the original
    columns are kept as ``_raw_<name>`` for the validation checks.

    Raises:
        ValueError: a configured column is missing from the file (the message names it).
    """
    import polars as pl

    scan = _scan_file(file)
    try:
        schema = scan.collect_schema()
    except Exception as exc:  # a truncated parquet footer, an unreadable CSV header, ...
        raise ValueError(f"{file}: cannot read the file ({exc})") from exc
    wanted = {USER: lake.user_col, ITEM: lake.item_col, TS: lake.timestamp_col}
    if lake.rating_col is not None:
        wanted[RATING] = lake.rating_col
    missing = [col for col in wanted.values() if col not in schema]
    if missing:
        raise ValueError(
            f"{file}: missing column(s) {', '.join(missing)} (has: {', '.join(schema.names())})"
        )
    exprs: list[pl.Expr] = [
        _id_expr(pl.col(lake.user_col), schema[lake.user_col], lake.user_id_type).alias(USER),
        _id_expr(pl.col(lake.item_col), schema[lake.item_col], lake.item_id_type).alias(ITEM),
        _timestamp_expr(
            pl.col(lake.timestamp_col), schema[lake.timestamp_col], lake.timestamp_divisor
        ).alias(TS),
    ]
    if lake.rating_col is not None:
        exprs.append(_rating_expr(pl.col(lake.rating_col), schema[lake.rating_col]).alias(RATING))
    if keep_raw:
        exprs += [pl.col(col).is_null().alias(f"{RAW}{name}_null") for name, col in wanted.items()]
    return scan.select(exprs)


def partition_rows(partition: Partition) -> int:
    """Number of rows in a partition (parquet row counts come from the file metadata)."""
    import polars as pl

    total = 0
    for file in partition.files:
        total += int(_scan_file(file).select(pl.len()).collect().item())
    return total
