"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipelines.settings import (
    DataSettings,
    JobSettings,
    job_from_dict,
    option_flag,
    read_toml,
    with_overrides,
)

_T = TypeVar("_T")

_CONFIG_HELP = "job config file or preset name from pipelines/configs (flags override it)"


def convert_argument(text: str, convert: Callable[[str], _T], what: str) -> _T:
    """``convert(text)``, with a ``ValueError`` turned into argparse's usage error.

    Args:
        text: The flag's value.
        convert: ``int``, ``float``, ...
        what: The expected kind, for the message (``"an integer"``).

    Raises:
        argparse.ArgumentTypeError: ``convert`` rejected the text.
    """
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    value = convert_argument(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def replace_given(settings: _T, **overrides: Any) -> _T:
    """``dataclasses.replace`` with the overrides whose flag was given (those not None)."""
    return dataclasses.replace(  # type: ignore[type-var]
        settings, **{key: value for key, value in overrides.items() if value is not None}
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (a built-in dataset or any interaction file)")
    group.add_argument(
        "--dataset",
        help="built-in dataset name (see `recvae datasets`); default ml-latest-small (bundled)",
    )
    group.add_argument(
        "--data-dir",
        help="folder holding the dataset (or its parent), "
        "e.g. ../shared/data; default $RECVAE_DATA_DIR",
    )
    group.add_argument("--data", metavar="PATH", help="interaction file: CSV/TSV (.gz) or parquet")
    group.add_argument("--user-col", help="user id column of --data (default user_id)")
    group.add_argument("--item-col", help="item id column of --data (default item_id)")
    group.add_argument("--rating-col", help="rating column of --data (omit for implicit data)")
    group.add_argument(
        "--threshold", type=float, help="ratings above this are positives (default 3.5)"
    )
    group.add_argument("--separator", help="CSV separator of --data (default: from extension)")
    group.add_argument(
        "--no-header",
        dest="has_header",
        action="store_false",
        default=None,
        help="--data has no header line: give the columns as 0-based positions "
        "(--user-col 0 --item-col 1 [--rating-col 2])",
    )


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol (strong generalization, PROTOCOL.md)")
    group.add_argument(
        "--n-heldout", type=int, help="validation and test users each (default: the dataset's)"
    )
    group.add_argument("--holdout-fraction", type=float, help="share of targets (default 0.2)")
    group.add_argument("--seed", type=int, help="split seed (default 98765)")
    group.add_argument("--min-user-count", type=int, help="minimum positives per user (default 5)")


def add_config_argument(
    parser: argparse.ArgumentParser, *, default: str | None = None, help: str = _CONFIG_HELP
) -> None:
    """``--config TOML``: a job config file or preset name (``default`` when not given)."""
    parser.add_argument("--config", metavar="TOML", default=default, help=help)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and the data and protocol groups: what :func:`job_from_args` reads."""
    add_config_argument(parser)
    add_data_arguments(parser)
    add_protocol_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser, *, output_help: str) -> None:
    """The ``run`` group of the commands that train several models (experiment, tune)."""
    group = parser.add_argument_group("run")
    group.add_argument("--output", "-o", type=Path, help=output_help)
    group.add_argument("--threads", type=int, help="torch, BLAS and implicit threads")
    group.add_argument("--device", help="device of the autoencoders: auto, cpu, cuda, cuda:N")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


# [data] field -> the attribute of the parsed command line that sets it.
DATA_ARGS = {
    "dataset": "dataset",
    "data_dir": "data_dir",
    "path": "data",
    "user_col": "user_col",
    "item_col": "item_col",
    "rating_col": "rating_col",
    "threshold": "threshold",
    "separator": "separator",
    "has_header": "has_header",
}
# What makes a --data value a pattern or a URL rather than one path (checked by the reader).
GLOB_OR_URL = re.compile(r"[*?\[]|://")
# The fields that describe an interaction file (--data); a built-in dataset has its own.
_FILE_FIELDS = ("user_col", "item_col", "rating_col", "threshold", "separator", "has_header")


def _check_data_flags(
    args: argparse.Namespace, job: JobSettings, *, recorded: DataSettings | None = None
) -> None:
    """Refuse data flags that would be ignored silently (they change which data is read).

    Args:
        args: The parsed command line.
        job: The config's job (before the flags).
        recorded: Data recorded elsewhere (a bundle's) that the flags apply to.

    Raises:
        ValueError: both ``--dataset`` and ``--data``; a ``--data-dir`` that is not a folder;
            file flags without a file; ``--threshold`` without a rating column.
    """
    if getattr(args, "dataset", None) and getattr(args, "data", None):
        raise ValueError("give either --dataset (a built-in dataset) or --data (a file), not both")
    data_dir = getattr(args, "data_dir", None)
    if data_dir and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir}: no such folder")
    path = getattr(args, "data", None)
    # Before any other check of the data: a mistyped path must be named as such, not as data
    # other than a bundle's (its name is the file's stem). Glob patterns and URLs are left to
    # the reader.
    if path and not GLOB_OR_URL.search(str(path)) and not Path(path).exists():
        raise ValueError(f"--data {path}: no such file or folder")
    given = [option_flag(f) for f in _FILE_FIELDS if getattr(args, f, None) is not None]
    if not (getattr(args, "data", None) or job.data.path or (recorded and recorded.path)):
        if given:
            raise ValueError(
                f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to an "
                "interaction file (--data); built-in "
                "datasets are read with their own columns and rating threshold "
                "(see `recvae datasets`)"
            )
        return
    rating_col = (
        getattr(args, "rating_col", None)
        or job.data.rating_col
        or (recorded.rating_col if recorded else None)
    )
    if getattr(args, "threshold", None) is not None and rating_col is None:
        raise ValueError(
            "--threshold needs --rating-col: without a rating column every row of --data is a "
            "positive"
        )


def job_from_args(
    args: argparse.Namespace,
    *,
    model: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    recorded: DataSettings | None = None,
) -> JobSettings:
    """Merge the TOML config (if any) with the command-line flags.

    ``recorded``: data recorded elsewhere (a bundle's) that the flags apply to: with a file
    there, the file flags (``--threshold``, ...) need no ``--data``.
    """
    job = job_from_dict(read_toml(args.config)) if getattr(args, "config", None) else JobSettings()
    data = {field_name: getattr(args, arg, None) for field_name, arg in DATA_ARGS.items()}
    _check_data_flags(args, job, recorded=recorded)
    protocol = {
        "n_heldout": getattr(args, "n_heldout", None),
        "holdout_fraction": getattr(args, "holdout_fraction", None),
        "seed": getattr(args, "seed", None),
        "min_user_count": getattr(args, "min_user_count", None),
    }
    return with_overrides(job, data=data, protocol=protocol, model=model or {}, run=run or {})
