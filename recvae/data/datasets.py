"""Registry of the built-in datasets and the evaluation protocol's first two steps.

``load_dataset(name)`` applies steps 1 and 2 of ``PROTOCOL.md``: explicit ratings become
positives when ``rating > 3.5`` (implicit data keeps every interaction), duplicate pairs
collapse, and users with fewer than 5 positives are dropped. No item filter is applied.

Only ml-latest-small ships with the package (its license allows redistribution). The other
datasets are read from a data directory: the ``data_dir`` argument (``--data-dir`` on the
command line) or the ``RECVAE_DATA_DIR`` environment variable. That directory may be the
dataset's own folder or a parent that holds it under its usual name (``ml-1m/``,
``gowalla-lightgcn/``, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import polars as pl

from recvae.data.interactions import DataError, Interactions, _check_count
from recvae.data.readers import (
    DataFileNotFound,
    interactions_from_frame,
    read_frame,
    read_ml1m,
    read_ml100k,
    read_movielens_csv,
)

__all__ = [
    "DATA_DIR_ENV",
    "DatasetSpec",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "load_dataset_frame",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data directory when ``data_dir`` is not given.
DATA_DIR_ENV = "RECVAE_DATA_DIR"

#: Threshold of PROTOCOL.md step 1: an explicit rating above it is a positive.
POSITIVE_THRESHOLD = 3.5


@dataclass(frozen=True)
class DatasetSpec:
    """Description of one built-in dataset.

    Attributes:
        name: Registry name, as accepted by :func:`load_dataset`.
        description: One line on what the data is.
        n_heldout: Validation users, and again test users, in the strong-generalization split
            (PROTOCOL.md table).
        implicit: True when every interaction is a positive (no rating threshold).
        default_path: Name of the dataset's folder under a data directory.
        bundled: True when the data ships with the package (no data directory needed).
        n_rows: Rows (ratings, check-ins) of the published files; a folder holding another
            count is read with a warning (another dataset under this name, or a damaged copy).
    """

    name: str
    description: str
    n_heldout: int
    implicit: bool
    default_path: str
    bundled: bool = False
    n_rows: int | None = None  # rows of the published files (a different count is warned about)


@dataclass(frozen=True)
class _Source:
    """How to find and read one dataset in a folder."""

    markers: tuple[str, ...]  # any of these files in a folder means the dataset is there
    aliases: tuple[str, ...]  # other folder names it is commonly found under
    reader: Callable[[Path], pl.DataFrame]
    why_not_bundled: str


_GROUPLENS_TERMS = (
    "GroupLens' license forbids redistributing {name}, so it cannot be bundled with recvae; "
    "download it from https://grouplens.org/datasets/movielens/ and pass its folder with "
    f"--data-dir (or set {DATA_DIR_ENV})"
)


def _read_lastfm(path: Path) -> pl.DataFrame:
    """Last.fm HetRec 2011 ``user_artists.dat``: tab separated, header userID artistID weight."""
    file = path / "user_artists.dat" if path.is_dir() else path
    frame = read_frame(
        file, user_col="userID", item_col="artistID", rating_col="weight", separator="\t"
    )
    # Every listened artist is a positive; the listening count is a weight, not a rating.
    return frame.rename({"rating": "weight"})


def _read_gowalla(path: Path) -> pl.DataFrame:
    """LightGCN adjacency lists ``user item item ...``; the union of train, valid and test."""
    files = (
        [path] if path.is_file() else [path / f"{part}.txt" for part in ("train", "valid", "test")]
    )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataFileNotFound(f"gowalla files not found: {', '.join(missing)}")
    frames = []
    for file in files:
        # One string per line (no field separator occurs in the file), split in polars.
        lines = pl.read_csv(
            file,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"line": pl.String},
        )
        tokens = lines.select(pl.col("line").str.strip_chars().str.split(" ").alias("tokens"))
        pairs = (
            tokens.filter(pl.col("tokens").list.len() > 1)
            .select(
                pl.col("tokens").list.first().alias("user_id"),
                pl.col("tokens").list.slice(1).alias("item_id"),
            )
            .explode("item_id")
            .filter(pl.col("item_id") != "")
        )
        try:
            frames.append(pairs.cast({"user_id": pl.Int64, "item_id": pl.Int64}))
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{file} has a non-integer id: {exc}") from exc
    return pl.concat(frames).unique(maintain_order=True)


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ml-latest-small",
            "MovieLens latest small (2018): 610 users, 9,724 movies, 100,836 ratings 0.5-5",
            n_heldout=100,
            implicit=False,
            default_path="ml-latest-small",
            n_rows=100_836,
            bundled=True,
        ),
        DatasetSpec(
            "ml-100k",
            "MovieLens 100K: 943 users, 1,682 movies, 100,000 ratings 1-5",
            n_heldout=100,
            implicit=False,
            default_path="ml-100k",
            n_rows=100_000,
        ),
        DatasetSpec(
            "ml-1m",
            "MovieLens 1M: 6,040 users, 3,706 movies, 1,000,209 ratings 1-5",
            n_heldout=1000,
            implicit=False,
            default_path="ml-1m",
            n_rows=1_000_209,
        ),
        DatasetSpec(
            "ml-20m",
            "MovieLens 20M (the paper's dataset): 138,493 users, 27,278 movies, "
            "20,000,263 ratings 0.5-5",
            n_heldout=10_000,
            implicit=False,
            default_path="ml-20m",
            n_rows=20_000_263,
        ),
        DatasetSpec(
            "ml-25m",
            "MovieLens 25M: 162,541 users, 59,047 movies, 25,000,095 ratings 0.5-5",
            n_heldout=10_000,
            implicit=False,
            default_path="ml-25m",
            n_rows=25_000_095,
        ),
        DatasetSpec(
            "lastfm",
            "Last.fm HetRec 2011: 1,892 users, 17,632 artists, 92,834 listened pairs (implicit)",
            n_heldout=200,
            implicit=True,
            default_path="lastfm-hetrec2011",
            n_rows=92_834,
        ),
        DatasetSpec(
            "gowalla",
            "Gowalla check-ins, LightGCN 10-core: 29,858 users, 40,981 places (implicit)",
            n_heldout=3000,
            implicit=True,
            default_path="gowalla-lightgcn",
            n_rows=1_027_370,
        ),
    )
}

_SOURCES: dict[str, _Source] = {
    "ml-latest-small": _Source(
        markers=("ml-latest-small.zip", "ratings.csv"),
        aliases=(),
        reader=read_movielens_csv,
        why_not_bundled="",
    ),
    "ml-100k": _Source(
        markers=("u.data", "ml-100k.zip"),
        aliases=(),
        reader=read_ml100k,
        why_not_bundled=_GROUPLENS_TERMS.format(name="ml-100k"),
    ),
    "ml-1m": _Source(
        markers=("ratings.dat", "ratings.csv.gz", "ratings.csv", "ml-1m.zip"),
        aliases=(),
        reader=read_ml1m,
        why_not_bundled=_GROUPLENS_TERMS.format(name="ml-1m"),
    ),
    "ml-20m": _Source(
        markers=("ratings.csv", "ml-20m.zip"),
        aliases=(),
        reader=read_movielens_csv,
        why_not_bundled=_GROUPLENS_TERMS.format(name="ml-20m"),
    ),
    "ml-25m": _Source(
        markers=("ratings.csv", "ml-25m.zip"),
        aliases=(),
        reader=read_movielens_csv,
        why_not_bundled=_GROUPLENS_TERMS.format(name="ml-25m"),
    ),
    "lastfm": _Source(
        markers=("user_artists.dat",),
        aliases=("hetrec2011-lastfm-2k", "lastfm"),
        reader=_read_lastfm,
        why_not_bundled=(
            "lastfm is not bundled (non-commercial terms); get hetrec2011-lastfm-2k from "
            f"https://grouplens.org/datasets/hetrec-2011/ and pass --data-dir (or {DATA_DIR_ENV})"
        ),
    ),
    "gowalla": _Source(
        markers=("train.txt",),
        aliases=("gowalla",),
        reader=_read_gowalla,
        why_not_bundled=(
            "gowalla is not bundled (size); get the LightGCN train/valid/test.txt files and "
            f"pass their folder with --data-dir (or {DATA_DIR_ENV})"
        ),
    ),
}

_BUNDLED_FILES = {"ml-latest-small": "ml-latest-small.zip"}


def list_datasets() -> list[DatasetSpec]:
    """All built-in datasets, in registry order.

    Returns:
        One spec per dataset.
    """
    return list(_SPECS.values())


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of a built-in dataset.

    Args:
        name: Registry name, e.g. ``"ml-1m"``.

    Returns:
        The dataset's spec.

    Raises:
        ValueError: ``name`` is not a built-in dataset (the message lists the valid names).
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_SPECS)}") from None


def load_dataset_frame(name: str, data_dir: str | Path | None = None) -> pl.DataFrame:
    """The raw rows of a built-in dataset as a standardized polars frame.

    Columns are ``user_id`` and ``item_id`` (Int64), plus ``rating`` (Float64) for explicit
    datasets, ``timestamp`` where the source has one, and ``weight`` (listening count) for
    lastfm. No filtering is applied.

    Args:
        name: Registry name (see :func:`list_datasets`).
        data_dir: The dataset's folder, or a folder holding it under its usual name. When None,
            ``RECVAE_DATA_DIR`` is used. Bundled datasets need neither: an explicit ``data_dir``
            holding the dataset takes precedence, otherwise the packaged copy is read.

    Returns:
        The raw frame.

    Raises:
        ValueError: ``name`` is not a built-in dataset.
        DataFileNotFound: The data cannot be found (the message lists the paths tried and how
            to get the data); also a ``FileNotFoundError``.
        DataError: The files are malformed.
    """
    spec = get_dataset_spec(name)
    source = _SOURCES[name]
    if spec.bundled:
        if data_dir is not None:
            found = _find_in(Path(data_dir), spec, source)
            if found is not None:
                return _check_rows(spec, source.reader(found), found)
        return _read_bundled(spec, source)
    path = _locate(spec, source, data_dir)
    logger.info("reading dataset %s from %s", name, path)
    return _check_rows(spec, source.reader(path), path)


def _check_rows(spec: DatasetSpec, frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    if spec.n_rows is not None and frame.height != spec.n_rows:
        logger.warning(
            "%s has %d rows, but %s has %d: is it %s, and complete?",
            path,
            frame.height,
            spec.name,
            spec.n_rows,
            spec.name,
        )
    return frame


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, min_user_count: int = 5
) -> Interactions:
    """A built-in dataset as binary interactions, after PROTOCOL.md steps 1 and 2.

    Explicit ratings are positives when ``rating > 3.5`` (strictly: 3.5 itself is not);
    implicit datasets keep every interaction. Duplicate pairs collapse into one positive (a
    pair is a positive when any of its rows is; the built-in files have no duplicates), then
    users with fewer than ``min_user_count`` distinct positives are dropped, once. Items are
    not filtered. Users and items are ordered by sorted id.

    Args:
        name: Registry name (see :func:`list_datasets`).
        data_dir: The dataset's folder or a parent of it; see :func:`load_dataset_frame`.
        min_user_count: Minimum positives per user (5 in the protocol; 0 or 1 keeps all).

    Returns:
        The interactions.

    Raises:
        ValueError: ``name`` is not a built-in dataset, or ``min_user_count`` is not an int
            >= 0.
        DataFileNotFound: The data cannot be found.
        DataError: The files are malformed or the filter leaves nothing.
    """
    _check_count(min_user_count, "min_user_count")
    spec = get_dataset_spec(name)
    frame = load_dataset_frame(name, data_dir)
    interactions = interactions_from_frame(
        frame,
        rating_col=None if spec.implicit else "rating",
        threshold=None if spec.implicit else POSITIVE_THRESHOLD,
        min_user_count=min_user_count,
    )
    logger.info("loaded %s: %r", name, interactions)
    return interactions


def _read_bundled(spec: DatasetSpec, source: _Source) -> pl.DataFrame:
    resource = resources.files("recvae.data").joinpath("bundled", _BUNDLED_FILES[spec.name])
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise DataFileNotFound(f"bundled data file missing from the package: {path}")
        return source.reader(path)


def _find_in(base: Path, spec: DatasetSpec, source: _Source) -> Path | None:
    """``base`` itself when it is the dataset, else its child folder holding it, else None."""
    if base.is_file():
        return base
    for folder in _candidate_folders(base, spec, source):
        if any((folder / marker).is_file() for marker in source.markers):
            return folder
    return None


def _candidate_folders(base: Path, spec: DatasetSpec, source: _Source) -> list[Path]:
    names = dict.fromkeys((spec.default_path, spec.name, *source.aliases))
    return [base, *(base / name for name in names)]


def _locate(spec: DatasetSpec, source: _Source, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            raise DataFileNotFound(
                f"dataset {spec.name!r} needs a data directory: pass data_dir (--data-dir) or "
                f"set {DATA_DIR_ENV}. {source.why_not_bundled}"
            )
        base = Path(env)
        origin = f"{DATA_DIR_ENV}={env}"
    else:
        base = Path(data_dir)
        origin = f"data_dir={data_dir}"
    found = _find_in(base, spec, source)
    if found is not None:
        return found
    tried = [
        str(folder / marker)
        for folder in _candidate_folders(base, spec, source)
        for marker in source.markers
    ]
    notes = ""
    if not base.is_absolute():
        notes += f" A relative data directory is read from the working directory ({Path.cwd()})."
    if data_dir is not None and os.environ.get(DATA_DIR_ENV):
        notes += (
            f" {DATA_DIR_ENV} is set but not read: a data directory was given (--data-dir, or "
            "data_dir in the config's [data])."
        )
    raise DataFileNotFound(
        f"dataset {spec.name!r} not found from {origin}; tried: {', '.join(tried)}.{notes} "
        f"{source.why_not_bundled}"
    )
