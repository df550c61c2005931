"""Readers: files and polars frames in, :class:`Interactions` or standardized frames out.

This is where polars stops. Every reader returns either a polars frame with the standardized
columns ``user_id``, ``item_id`` and, where the source has them, ``rating`` and ``timestamp``,
or an :class:`~recvae.data.interactions.Interactions`. Past this module the code uses NumPy,
SciPy and torch only.
"""

from __future__ import annotations

import bz2
import glob as _glob
import gzip
import io
import logging
import lzma
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import scipy.sparse as sp

from recvae.data.interactions import DataError, Interactions, check_filter_arguments

__all__ = [
    "DataFileNotFound",
    "interactions_from_frame",
    "load_interactions",
    "read_frame",
    "read_ml100k",
    "read_ml1m",
    "read_movielens_csv",
]

logger = logging.getLogger(__name__)

_PARQUET_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = frozenset("*?[")
# Bytes that may stand in for a multi-character separator such as MovieLens' "::" (polars
# reads single-byte separators only): ASCII control characters that text does not use, the unit
# separator first. The first one that the file does not hold is taken.
_SUBSTITUTE_SEPARATORS = ("\x1f", "\x1e", "\x1d", "\x1c", "\x01", "\x02", "\x03", "\x04")
# A double-quoted field from its opening quote: "" is an escaped quote; an unterminated field
# runs to the end of the text (polars then reads it the same way, or refuses the file).
_QUOTED_FIELD = re.compile(rb'"[^"]*(?:""[^"]*)*(?:"|\Z)')
_UTF8_BOM = b"\xef\xbb\xbf"


class DataFileNotFound(DataError, FileNotFoundError):
    """Raised when a data file or dataset folder does not exist (names the paths tried)."""


# ====================================================================== frame -> Interactions
def interactions_from_frame(
    df: pl.DataFrame | pl.LazyFrame,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str | None = None,
    threshold: float | None = 3.5,
    min_user_count: int = 0,
    min_item_count: int = 0,
) -> Interactions:
    """Build binary interactions from a polars frame of (user, item[, rating]) rows.

    Steps, in order: validate the columns; keep rows with ``rating > threshold`` when
    ``rating_col`` is given and ``threshold`` is not None (otherwise every row is a positive);
    collapse duplicate (user, item) pairs; drop items with fewer than ``min_item_count``
    positives; then drop users with fewer than ``min_user_count`` positives (each filter runs
    once, items first). Integer ids stay int64 and string ids stay str; rows and columns are
    ordered by sorted id.

    Args:
        df: The rows. A ``LazyFrame`` is collected first.
        user_col: Column holding the external user ids (integers or strings).
        item_col: Column holding the external item ids (integers or strings).
        rating_col: Optional column of numeric ratings (strings are parsed as numbers).
        threshold: Ratings strictly above it are positives; None keeps every row.
        min_user_count: Minimum positives a user needs to be kept.
        min_item_count: Minimum positives an item needs to be kept.

    Returns:
        The binary interactions.

    Raises:
        DataError: A column is missing, an id column has nulls or an unsupported type, a rating
            is null, NaN or not a number, or no rows are left (the message says which step
            emptied the data).
        ValueError: ``min_user_count`` or ``min_item_count`` is not an int >= 0, or
            ``threshold`` is neither None nor a finite number.
    """
    check_filter_arguments(threshold, min_user_count, min_item_count)
    if isinstance(df, pl.LazyFrame):
        df = df.collect()
    if not isinstance(df, pl.DataFrame):
        raise DataError(f"expected a polars DataFrame, got {type(df).__name__}")

    wanted = [user_col, item_col] + ([rating_col] if rating_col is not None else [])
    _require_columns(df.columns, wanted, source="frame")
    if df.height == 0:
        raise DataError("the frame has no rows")

    frame = df.select(
        _id_expr(df, user_col).alias("user_id"),
        _id_expr(df, item_col).alias("item_id"),
    )
    n_rows = frame.height
    if rating_col is not None and threshold is not None:
        ratings = _numeric_ratings(df[rating_col], rating_col)
        frame = frame.filter(ratings > threshold)
        if frame.height == 0:
            raise DataError(
                f"no rows have {rating_col} > {threshold} (all {n_rows} ratings are at or below "
                "the threshold); lower the threshold or pass threshold=None for implicit data"
            )
    frame = frame.unique(subset=["user_id", "item_id"], maintain_order=False)

    if min_item_count > 0:
        counts = pl.len().over("item_id")
        before = frame.height
        frame = frame.filter(counts >= min_item_count)
        if frame.height == 0:
            raise DataError(
                f"min_item_count={min_item_count} removed every item "
                f"({before} positives before the item filter)"
            )
    if min_user_count > 0:
        counts = pl.len().over("user_id")
        before = frame.height
        frame = frame.filter(counts >= min_user_count)
        if frame.height == 0:
            raise DataError(
                f"min_user_count={min_user_count} removed every user "
                f"({before} positives before the user filter)"
            )
    return _frame_to_interactions(frame)


def _frame_to_interactions(frame: pl.DataFrame) -> Interactions:
    """CSR from a duplicate-free (user_id, item_id) frame, vocabularies sorted by id."""
    # A dense rank of the id is its position in the sorted vocabulary.
    indexed = frame.select(
        (pl.col("user_id").rank("dense") - 1).cast(pl.Int64).alias("user_idx"),
        (pl.col("item_id").rank("dense") - 1).cast(pl.Int64).alias("item_idx"),
    ).sort("user_idx", "item_idx")
    user_ids = _ids_to_numpy(frame["user_id"].unique().sort())
    item_ids = _ids_to_numpy(frame["item_id"].unique().sort())
    rows = indexed["user_idx"].to_numpy()
    cols = indexed["item_idx"].to_numpy().astype(np.int32)
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(user_ids)), out=indptr[1:])
    data = np.ones(len(cols), dtype=np.float32)
    matrix = sp.csr_array((data, cols, indptr), shape=(len(user_ids), len(item_ids)))
    matrix.has_sorted_indices = True
    matrix.has_canonical_format = True
    interactions = Interactions(matrix, user_ids, item_ids)
    logger.debug("built %r", interactions)
    return interactions


def _ids_to_numpy(ids: pl.Series) -> np.ndarray[Any, Any]:
    if ids.dtype == pl.String:
        return np.asarray(ids.to_list(), dtype=object)
    return ids.to_numpy().astype(np.int64)


def _id_expr(df: pl.DataFrame, column: str) -> pl.Expr:
    """Validated id column as Int64 or String (nulls and other types are errors)."""
    series = df[column]
    n_null = series.null_count()
    if n_null:
        raise DataError(f"id column {column!r} has {n_null} null value(s) out of {df.height}")
    dtype = series.dtype
    if dtype.is_integer():
        if dtype == pl.UInt64 and int(cast(int, series.max() or 0)) > _INT64_MAX:
            # As a file's ids: beyond int64 they are kept exactly, as text.
            return pl.col(column).cast(pl.String)
        return pl.col(column).cast(pl.Int64)
    if dtype in (pl.String, pl.Categorical, pl.Enum):
        return pl.col(column).cast(pl.String)
    if dtype.is_float():
        integral = series.is_finite().all() and (series == series.floor()).all()
        if integral and float(cast(float, series.abs().max() or 0.0)) > 2.0**53:
            raise DataError(
                f"id column {column!r} holds float ids above 2**53, which floats cannot hold "
                "exactly (distinct ids would merge); store the ids as integers or strings"
            )
        if integral:
            return pl.col(column).cast(pl.Int64)
        raise DataError(
            f"id column {column!r} holds non-integer floats; ids must be ints or strings"
        )
    raise DataError(f"id column {column!r} has type {dtype}; ids must be integers or strings")


def _numeric_ratings(series: pl.Series, column: str | int) -> pl.Series:
    """Ratings as Float64; strings are parsed. Nulls, NaN and unparsable values are errors."""
    n_null = series.null_count()
    if n_null:
        raise DataError(f"rating column {column!r} has {n_null} null value(s)")
    if series.dtype == pl.String or series.dtype == pl.Categorical:
        text = series.cast(pl.String).str.strip_chars()
        parsed = text.cast(pl.Float64, strict=False)
        bad = text.filter(parsed.is_null() | ~parsed.is_finite())
        if len(bad):
            raise DataError(
                f"rating column {column!r} has {len(bad)} value(s) that are not numbers "
                f"(or not finite), e.g. {bad[0]!r}"
            )
        return parsed
    if not series.dtype.is_numeric():
        raise DataError(
            f"rating column {column!r} has type {series.dtype}; ratings must be numeric"
        )
    ratings = series.cast(pl.Float64)
    n_nan = int(ratings.is_nan().sum())
    if n_nan:
        raise DataError(f"rating column {column!r} has {n_nan} NaN value(s)")
    n_inf = int(ratings.is_infinite().sum())
    if n_inf:
        raise DataError(f"rating column {column!r} has {n_inf} infinite value(s)")
    return ratings


def _require_columns(available: Sequence[str], wanted: Sequence[str], *, source: str) -> None:
    for column in wanted:
        if column not in available:
            raise DataError(
                f"column {column!r} not found in {source}; available columns: {list(available)}"
            )


# ====================================================================== files -> frames
def read_frame(
    path: str | Path,
    *,
    user_col: str | int = "user_id",
    item_col: str | int = "item_id",
    rating_col: str | int | None = None,
    timestamp_col: str | int | None = None,
    separator: str | None = None,
    has_header: bool = True,
    format: str | None = None,
) -> pl.DataFrame:
    """Read a ratings file into a frame with standardized column names.

    Supported: delimited text (``.csv``, ``.tsv``, ``.dat``, ``.txt``, optionally gzipped as
    ``.gz``) and parquet (``.parquet``/``.pq`` files, a directory of them, or a glob pattern).
    The separator is ``,`` for ``.csv`` and a tab for ``.tsv``; otherwise it is sniffed from the
    first line (tab, ``::``, ``,``, ``;``, ``|`` or space). Multi-character separators such as
    MovieLens' ``::`` are supported, also inside double-quoted fields (``"a::b"``, with ``""``
    for a quote), which keep them.

    Args:
        path: File, directory of parquet files, or glob pattern.
        user_col: Source column of user ids: a name, or a 0-based position (useful without a
            header).
        item_col: Source column of item ids (name or position).
        rating_col: Optional source column of ratings (name or position).
        timestamp_col: Optional source column of timestamps (name or position).
        separator: Field separator for delimited text; sniffed when None.
        has_header: Whether delimited text starts with a header line.
        format: ``"csv"`` (any delimited text) or ``"parquet"``; inferred from the name when None.

    Returns:
        A frame with columns ``user_id``, ``item_id`` and, when asked for, ``rating`` (Float64
        when numeric) and ``timestamp``. Ids keep their type (Int64 or String).

    Raises:
        DataFileNotFound: The path does not exist (also a ``FileNotFoundError``).
        DataError: A column is missing (the message lists the available ones) or the file
            cannot be parsed.
        ValueError: ``format`` is not one of the supported values, or a multi-character
            ``separator`` holds a double quote or a line break.
    """
    path_str = str(path)
    fmt = _infer_format(path_str, format)
    if fmt == "parquet":
        raw = _read_parquet(path_str, [user_col, item_col, rating_col, timestamp_col])
    else:
        file = Path(path_str)
        if not file.exists():
            raise DataFileNotFound(f"data file not found: {path_str}")
        if file.is_dir():
            raise DataError(f"{path_str} is a folder of delimited files; give one file")
        if file.is_file() and _magic(file) == b"PAR1":  # parquet under another name
            raw = _read_parquet(path_str, [user_col, item_col, rating_col, timestamp_col])
        else:  # a regular file, or a pipe (--data <(zcat log.csv.gz))
            content = _read_bytes(file)
            raw = _read_delimited(
                content, separator=separator, has_header=has_header, source=path_str
            )
    return _standardize(
        raw,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        timestamp_col=timestamp_col,
        source=path_str,
    )


def load_interactions(
    path: str | Path,
    *,
    user_col: str | int = "user_id",
    item_col: str | int = "item_id",
    rating_col: str | int | None = None,
    threshold: float | None = 3.5,
    min_user_count: int = 0,
    min_item_count: int = 0,
    separator: str | None = None,
    has_header: bool = True,
    format: str | None = None,
) -> Interactions:
    """Read a ratings file and turn it into binary interactions.

    Equivalent to :func:`read_frame` followed by :func:`interactions_from_frame`.

    Args:
        path: File, directory of parquet files, or glob pattern.
        user_col: Source column of user ids (name or 0-based position).
        item_col: Source column of item ids (name or 0-based position).
        rating_col: Optional source column of ratings; without it every row is a positive.
        threshold: Ratings strictly above it are positives; None keeps every row.
        min_user_count: Minimum positives a user needs to be kept.
        min_item_count: Minimum positives an item needs to be kept (applied before users).
        separator: Field separator for delimited text; sniffed when None.
        has_header: Whether delimited text starts with a header line.
        format: ``"csv"`` or ``"parquet"``; inferred from the name when None.

    Returns:
        The binary interactions.

    Raises:
        DataFileNotFound: The path does not exist.
        DataError: A column is missing, the data is malformed, or the filters leave nothing.
        ValueError: A bad ``format`` or a negative minimum count.
    """
    frame = read_frame(
        path,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        separator=separator,
        has_header=has_header,
        format=format,
    )
    return interactions_from_frame(
        frame,
        rating_col="rating" if rating_col is not None else None,
        threshold=threshold,
        min_user_count=min_user_count,
        min_item_count=min_item_count,
    )


def _infer_format(path: str, format: str | None) -> str:
    if format is not None:
        fmt = format.lower()
        if fmt in ("csv", "tsv", "text", "delimited"):
            return "csv"
        if fmt in ("parquet", "pq"):
            return "parquet"
        raise ValueError(f"format must be 'csv' or 'parquet', got {format!r}")
    lower = path.lower()
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if Path(path).is_dir():
        return "parquet"
    return "csv"


def _read_parquet(path: str, columns: Sequence[str | int | None]) -> pl.DataFrame:
    files = _parquet_files(path)
    try:
        lazy = pl.scan_parquet(
            files,
            glob=False,  # patterns were expanded above
            # Files of one dataset may differ in columns nobody reads, or in integer widths.
            extra_columns="ignore",
            cast_options=pl.ScanCastOptions(integer_cast="upcast"),
        )
        available = lazy.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:  # not parquet, truncated, unreadable
        raise DataError(f"could not read parquet data {path}: {_error_message(exc)}") from exc
    names = [_column_name(c, available, source=path) for c in columns if c is not None]
    try:
        return lazy.select(names).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"could not read parquet data {path}: {_error_message(exc)}") from exc


def _error_message(exc: BaseException) -> str:
    """An exception's message up to its first line break (polars appends long hints)."""
    return str(exc).strip().split("\n", 1)[0]


def _parquet_files(path: str) -> list[str]:
    if _GLOB_CHARS & set(path) and not Path(path).exists():  # an existing name is not a pattern
        files = sorted(_glob.glob(path, recursive=True))
        if not files:
            raise DataFileNotFound(f"no parquet files match the pattern {path}")
        return files
    target = Path(path)
    if target.is_dir():
        files = sorted(
            str(p)
            for p in target.rglob("*")
            if p.is_file() and p.suffix.lower() in _PARQUET_SUFFIXES
        )
        if not files:
            raise DataFileNotFound(f"no .parquet or .pq files in the directory {path}")
        return files
    if not target.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    return [path]


def _magic(file: Path) -> bytes:
    with open(file, "rb") as handle:
        return handle.read(4)


# Compressed text this reader opens itself, by its first bytes (not by the file name).
_DECOMPRESSORS = {b"\x1f\x8b": gzip, b"BZh": bz2, b"\xfd7zXZ": lzma}


def _read_bytes(file: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip, bzip2 or xz (a pipe is read once)."""
    content = file.read_bytes()
    for magic, module in _DECOMPRESSORS.items():
        if content.startswith(magic):
            try:
                return bytes(module.decompress(content))
            except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
                raise DataError(f"could not decompress {file}: {exc}") from exc
    if content.startswith(b"PK\x03\x04"):
        raise DataError(
            f"{file} is a zip archive: extract the ratings file and pass it (the built-in "
            "MovieLens datasets read their GroupLens zips with --dataset NAME --data-dir DIR)"
        )
    return content


def _sniff_separator(content: bytes, source: str) -> str:
    lower = source.lower().removesuffix(".gz")
    if lower.endswith(".tsv"):
        return "\t"
    if lower.endswith(".csv"):
        return ","
    first_line = content.split(b"\n", 1)[0]
    for candidate in ("\t", "::", ",", ";", "|", " "):
        if candidate.encode() in first_line:
            return candidate
    return ","


def _read_delimited(
    content: bytes, *, separator: str | None, has_header: bool, source: str
) -> pl.DataFrame:
    """Parse delimited text into String columns; ``separator`` may be several characters long.

    Every field is read as text and typed later, by one rule for ids (see :func:`_id_column`)
    and by parsing for ratings: type inference would make ``007`` the id 7 in one file and
    ``"007"`` in another, and a column with one stray value would change type. Rows whose fields
    are all empty (blank lines) are dropped. A multi-character separator is replaced by a byte
    the text lacks, outside double-quoted fields, for polars to parse (see
    :func:`_replace_unquoted`).
    """
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            f"{source} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
        )
    given = separator
    sep = separator if separator is not None else _sniff_separator(content, source)
    if sep in ("\\t", "tab"):  # the shell spelling of a tab
        sep = "\t"
    if not sep:
        raise ValueError("separator must not be empty")
    parse_sep = sep
    if len(sep.encode()) > 1:
        parse_sep = _substitute_separator(content, sep, source)
        content = _replace_unquoted(content, sep.encode(), parse_sep.encode())
    if not content.strip():
        raise DataError(f"{source} is empty")
    options: dict[str, Any] = {
        "separator": parse_sep,
        "has_header": has_header,
        "infer_schema": False,
    }
    try:
        raw = pl.read_csv(io.BytesIO(content), **options)
    except pl.exceptions.PolarsError as exc:
        hint = ""
        if "utf-8" in str(exc).lower():
            hint = (
                "; the file is not UTF-8 (Latin-1 or Windows-1252?): convert it, e.g. "
                "iconv -f LATIN1 -t UTF-8"
            )
        shown = given if given is not None else sep
        raise DataError(
            f"could not parse {source} (separator {shown!r}): {_error_message(exc)}{hint}"
        ) from exc
    blank = pl.all_horizontal(pl.all().is_null() | (pl.all().str.strip_chars() == ""))
    return raw.filter(~blank) if raw.width else raw


def _substitute_separator(content: bytes, separator: str, source: str) -> str:
    """The one-byte separator that stands in for ``separator``: a byte ``content`` lacks.

    Raises:
        ValueError: ``separator`` holds a double quote or a line break (quoting could not be
            told from separating).
        DataError: ``content`` holds every candidate byte, so none can stand in safely.
    """
    if any(char in separator for char in '"\n\r'):
        raise ValueError(f"separator {separator!r} must not contain a double quote or a line break")
    for candidate in _SUBSTITUTE_SEPARATORS:
        if candidate.encode() not in content:
            return candidate
    raise DataError(
        f"{source} holds every control byte ({', '.join(map(repr, _SUBSTITUTE_SEPARATORS))}) "
        f"that the reader could stand in for the separator {separator!r} (polars reads "
        "one-byte separators only); remove those bytes or convert the file to a one-byte "
        "separator such as a tab"
    )


def _replace_unquoted(content: bytes, separator: bytes, substitute: bytes) -> bytes:
    """``content`` with ``separator`` replaced by ``substitute`` outside double-quoted fields.

    Quoting as polars reads it with a one-byte separator: a field is quoted when its first
    character is ``"`` (at the start of a line or right after a separator), ``""`` inside it is
    an escaped quote, and it may span lines; a quote anywhere else is a plain character. Text
    without quotes (MovieLens' ``ratings.dat``) takes one ``bytes.replace``.
    """
    if b'"' not in content:
        return content.replace(separator, substitute)
    width = len(separator)
    pieces: list[bytes] = []
    copied = 0  # content[:copied] is in pieces
    position = 0
    while (match := _QUOTED_FIELD.search(content, position)) is not None:
        quote = match.start()
        # The bytes before the quote cannot straddle an earlier quoted field: that ends in a
        # quote, which a separator never holds.
        at_field_start = (
            quote == 0
            or content[quote - 1] == ord("\n")
            or (quote == len(_UTF8_BOM) and content.startswith(_UTF8_BOM))  # polars skips it
            or (quote >= width and content.startswith(separator, quote - width))
        )
        if not at_field_start:
            position = quote + 1
            continue
        pieces.append(content[copied:quote].replace(separator, substitute))
        pieces.append(match.group())
        copied = position = match.end()
    pieces.append(content[copied:].replace(separator, substitute))
    return b"".join(pieces)


def _column_name(column: str | int, available: Sequence[str], *, source: str) -> str:
    if isinstance(column, int):
        if not 0 <= column < len(available):
            raise DataError(
                f"column position {column} out of range in {source}: it has {len(available)} "
                f"columns {list(available)}"
            )
        return available[column]
    _require_columns(available, [column], source=source)
    return column


def _standardize(
    raw: pl.DataFrame,
    *,
    user_col: str | int,
    item_col: str | int,
    rating_col: str | int | None,
    timestamp_col: str | int | None,
    source: str,
) -> pl.DataFrame:
    available = raw.columns
    roles = {"user": user_col, "item": item_col, "rating": rating_col, "timestamp": timestamp_col}
    names = {
        role: _column_name(column, available, source=source)
        for role, column in roles.items()
        if column is not None
    }
    _check_columns(raw, names, source)
    _check_repeated_header(raw, names, source)
    columns = [
        _id_column(raw[names["user"]], _label(user_col, names["user"]), source).alias("user_id"),
        _id_column(raw[names["item"]], _label(item_col, names["item"]), source).alias("item_id"),
    ]
    if rating_col is not None:
        # Parsed here, while the user's column name is still known for the error message.
        series = raw[names["rating"]]
        ratings = _numeric_ratings(series, _label(rating_col, names["rating"]))
        columns.append(ratings.alias("rating"))
    if timestamp_col is not None:
        stamps = raw[names["timestamp"]]
        if stamps.dtype == pl.String:
            as_int = stamps.str.strip_chars().cast(pl.Int64, strict=False)
            if as_int.null_count() == stamps.null_count():
                stamps = as_int
        columns.append(stamps.alias("timestamp"))
    return pl.DataFrame(columns)


def _label(column: str | int, name: str) -> str | int:
    """How an error names a column: its position when it was given by position."""
    return column if isinstance(column, int) else name


def _check_columns(raw: pl.DataFrame, names: dict[str, str], source: str) -> None:
    """The roles must use distinct columns, and a header must not name a used column twice."""
    used: dict[str, str] = {}
    for role, name in names.items():
        if name in used:
            raise DataError(
                f"{source}: column {name!r} is given as both the {used[name]} and the {role} "
                "column; each needs its own column"
            )
        used[name] = role
    for column in raw.columns:
        base, marker, _ = column.rpartition("_duplicated_")
        if marker and base in used:
            raise DataError(
                f"{source}: the header names the column {base!r} more than once; rename the "
                f"duplicate so that it is clear which one holds the {used[base]} "
                + ("ids" if used[base] in ("user", "item") else "values")
            )


def _check_repeated_header(raw: pl.DataFrame, names: dict[str, str], source: str) -> None:
    """A header line in the middle of the data (files concatenated with their headers)."""
    user, item = names["user"], names["item"]
    if raw[user].dtype != pl.String or raw[item].dtype != pl.String:
        return
    repeats = raw.with_row_index("row").filter(
        (pl.col(user).str.strip_chars() == user) & (pl.col(item).str.strip_chars() == item)
    )
    if repeats.height:
        first = int(repeats["row"][0]) + 2  # 1-based, after the header line
        raise DataError(
            f"{source}: {repeats.height} data row(s) repeat the header ({user!r}, {item!r}), "
            f"the first at line {first}: files concatenated with their headers? Remove those "
            "lines"
        )


# Text that means "no value" in exported logs (pandas, R, SQL dumps, MySQL's \N).
_NULL_TOKENS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "\\N")
# An id written as an integer: no sign but "-", no leading zeros, optionally ".0" (pandas
# writes integer ids of a column with gaps as floats).
_INT_ID = r"^-?(0|[1-9][0-9]*)(\.0+)?$"
_INT64_MAX = 2**63 - 1


def _id_column(series: pl.Series, column: str | int, source: str) -> pl.Series:
    """An id column of a file as Int64 or String, by one rule.

    Text is stripped of surrounding blanks, and empty text or a null marker (``NA``,
    ``null``, ``\\N``, ...) is a missing id (an error). The column is Int64 when every id is
    written as an integer in canonical form and fits in int64; otherwise every id stays the
    text it is (``"007"`` and ``"7"`` are then two ids). Unsigned ids above int64's range are
    kept as text; float ids must be integral and exact (below 2**53).

    Raises:
        DataError: missing ids, or float ids that are not exact integers.
    """
    if series.dtype == pl.String or series.dtype == pl.Categorical:
        text = series.cast(pl.String).str.strip_chars()
        text = text.set(text.is_in(list(_NULL_TOKENS)), None)
        _no_missing_ids(text, column, source, markers=True)
        as_int = text.cast(pl.Int64, strict=False)
        if as_int.null_count() == 0 and (as_int.cast(pl.String) == text).all():
            return as_int  # the common case, without a regex pass
        if text.str.contains(_INT_ID).all():
            digits = text.str.replace(r"\.0+$", "")
            as_int = digits.cast(pl.Int64, strict=False)
            if as_int.null_count() == 0:  # all fit in int64
                return as_int
        return text
    _no_missing_ids(series, column, source, markers=False)
    if series.dtype.is_integer():
        if series.dtype == pl.UInt64 and bool((series > _INT64_MAX).any()):
            return series.cast(pl.String)
        return series.cast(pl.Int64)
    if series.dtype.is_float():
        finite = series.is_finite().all()
        integral = finite and (series == series.floor()).all()
        if not integral:
            raise DataError(
                f"{source}: id column {column!r} holds non-integer or non-finite floats; ids "
                "must be integers or strings"
            )
        if bool((series.abs() > 2.0**53).any()):
            raise DataError(
                f"{source}: id column {column!r} holds float ids above 2**53, which floats "
                "cannot hold exactly (distinct ids would merge); store the ids as integers or "
                "strings"
            )
        return series.cast(pl.Int64)
    return series  # other types: interactions_from_frame names the problem


def _no_missing_ids(series: pl.Series, column: str | int, source: str, *, markers: bool) -> None:
    missing = series.null_count()
    if missing:
        what = " (empty or a null marker such as NA, null, \\N)" if markers else ""
        raise DataError(
            f"{source}: id column {column!r} has {missing} missing value(s){what} out of "
            f"{series.len()} rows"
        )


# ====================================================================== MovieLens
def read_ml100k(path: str | Path) -> pl.DataFrame:
    """Read MovieLens 100K ratings (``u.data``: tab separated, no header).

    Args:
        path: ``u.data`` itself, a folder holding it (or holding ``ml-100k/``), or the GroupLens
            ``ml-100k.zip`` (read in memory, not extracted).

    Returns:
        A frame with Int64 ``user_id``, ``item_id``, ``timestamp`` and Float64 ``rating``.

    Raises:
        DataFileNotFound: No ``u.data`` could be found at ``path``.
        DataError: The file is malformed.
    """
    content, source = _locate_member(
        Path(path), file_names=("u.data",), zip_names=("ml-100k.zip",), subfolders=("ml-100k",)
    )
    raw = _read_delimited(content, separator="\t", has_header=False, source=source)
    return _movielens_columns(raw, source)


def read_ml1m(path: str | Path) -> pl.DataFrame:
    """Read MovieLens 1M ratings.

    Two layouts are understood: the GroupLens ``ratings.dat`` (``UserID::MovieID::Rating::
    Timestamp``, no header) and a ``ratings.csv.gz``/``ratings.csv`` with a
    ``user_id,item_id,rating[,timestamp]`` header (the layout of the shared data folder, which
    has no timestamps).

    Args:
        path: One of those files, a folder holding one (or holding ``ml-1m/``), or the GroupLens
            ``ml-1m.zip`` (read in memory, not extracted).

    Returns:
        A frame with Int64 ``user_id`` and ``item_id``, Float64 ``rating`` and, when the source
        has it, Int64 ``timestamp``.

    Raises:
        DataFileNotFound: No ratings file could be found at ``path``.
        DataError: The file is malformed.
    """
    content, source = _locate_member(
        Path(path),
        file_names=("ratings.dat", "ratings.csv.gz", "ratings.csv"),
        zip_names=("ml-1m.zip",),
        subfolders=("ml-1m",),
    )
    if _first_line(content).count(b"::") >= 2:
        raw = _read_delimited(content, separator="::", has_header=False, source=source)
        return _movielens_columns(raw, source)
    raw = _read_delimited(content, separator=",", has_header=True, source=source)
    has_timestamp = "timestamp" in raw.columns
    frame = _standardize(
        raw,
        user_col="user_id",
        item_col="item_id",
        rating_col="rating",
        timestamp_col="timestamp" if has_timestamp else None,
        source=source,
    )
    return frame


def read_movielens_csv(path: str | Path) -> pl.DataFrame:
    """Read a newer MovieLens ``ratings.csv`` (ml-latest, ml-latest-small, ml-20m, ml-25m, ...).

    Args:
        path: The ``ratings.csv``, a folder holding it, or the GroupLens zip (its
            ``*/ratings.csv`` member is read in memory, not extracted).

    Returns:
        A frame with Int64 ``user_id``, ``item_id``, ``timestamp`` and Float64 ``rating``
        (from the ``userId,movieId,rating,timestamp`` header).

    Raises:
        DataFileNotFound: No ``ratings.csv`` could be found at ``path``.
        DataError: The file is malformed or lacks one of the expected columns.
    """
    target = Path(path)
    # An extracted GroupLens zip leaves ratings.csv one folder down (ml-latest-small/...).
    subfolders = (
        tuple(sorted(p.name for p in target.iterdir() if p.is_dir())) if target.is_dir() else ()
    )
    content, source = _locate_member(
        target,
        file_names=("ratings.csv", "ratings.csv.gz"),
        zip_names=("*.zip",),
        subfolders=subfolders,
    )
    raw = _read_delimited(content, separator=",", has_header=True, source=source)
    return _standardize(
        raw,
        user_col="userId",
        item_col="movieId",
        rating_col="rating",
        timestamp_col="timestamp",
        source=source,
    )


def _movielens_columns(raw: pl.DataFrame, source: str) -> pl.DataFrame:
    """Standardize a header-less user, item, rating, timestamp file."""
    if raw.width != 4:
        raise DataError(
            f"{source} should have 4 fields per line (user, item, rating, timestamp), "
            f"found {raw.width}"
        )
    return _standardize(
        raw, user_col=0, item_col=1, rating_col=2, timestamp_col=3, source=source
    ).with_columns(pl.col("timestamp").cast(pl.Int64))


def _first_line(content: bytes) -> bytes:
    return content.split(b"\n", 1)[0]


def _locate_member(
    path: Path,
    *,
    file_names: Sequence[str],
    zip_names: Sequence[str],
    subfolders: Sequence[str],
) -> tuple[bytes, str]:
    """Find a ratings file under ``path`` and return its (decompressed) bytes and a label.

    ``path`` may be the file, a zip holding a member whose base name is in ``file_names``, a
    folder holding the file or one of ``zip_names``, or a folder holding one of ``subfolders``.
    """
    tried: list[str] = []
    if path.is_file():
        if zipfile.is_zipfile(path):
            return _read_zip_member(path, file_names)
        return _read_bytes(path), str(path)
    if path.is_dir():
        for folder in (path, *(path / sub for sub in subfolders)):
            for name in file_names:
                candidate = folder / name
                tried.append(str(candidate))
                if candidate.is_file():
                    return _read_bytes(candidate), str(candidate)
            for pattern in zip_names:
                tried.append(str(folder / pattern))
                for archive in sorted(folder.glob(pattern)):
                    if zipfile.is_zipfile(archive):
                        try:
                            return _read_zip_member(archive, file_names)
                        except DataFileNotFound:
                            continue
        raise DataFileNotFound(
            f"no {' or '.join(file_names)} found under {path}; tried: {', '.join(tried)}"
        )
    raise DataFileNotFound(f"data path not found: {path}")


def _read_zip_member(archive: Path, file_names: Sequence[str]) -> tuple[bytes, str]:
    with zipfile.ZipFile(archive) as zf:
        members = [
            info.filename
            for info in zf.infolist()
            if not info.is_dir() and info.filename.rsplit("/", 1)[-1] in file_names
        ]
        if not members:
            raise DataFileNotFound(f"no {' or '.join(file_names)} inside the zip {archive}")
        # The shallowest match is the dataset's own file, not a copy in a nested folder.
        member = min(members, key=lambda name: (name.count("/"), name))
        content = zf.read(member)
    if content[:2] == b"\x1f\x8b":
        content = gzip.decompress(content)
    return content, f"{archive}!{member}"
