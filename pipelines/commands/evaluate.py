"""``recvae evaluate``: score a saved bundle on a dataset's held-out users."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.commands._common import (
    DATA_ARGS,
    GLOB_OR_URL,
    add_job_arguments,
    job_from_args,
)

if TYPE_CHECKING:
    from pipelines.settings import JobSettings

DEFAULT_KS = "20,50,100"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on the test (or validation) users of a dataset",
        description=(
            "Re-create the split the bundle was trained with (its dataset and protocol, recorded "
            "in meta.json) and score the bundle on its held-out users, so that the test metrics "
            "are those `recvae train` printed. Flags may change the split, but then the held-out "
            "users may include users the model was trained on. Held-out items the bundle does "
            "not know are dropped."
        ),
    )
    parser.add_argument("bundle", type=Path, help="model bundle directory")
    add_job_arguments(parser)
    parser.add_argument("--part", choices=["test", "validation"], default="test")
    parser.add_argument(
        "--ks",
        help="cut-offs, comma separated, each at most the bundle's number of items "
        "(default 20,50,100)",
    )
    parser.add_argument("--device", default="cpu")
    add_allow_other_dataset_argument(parser)
    parser.set_defaults(func=run_command)


def add_allow_other_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="accept data other than the dataset the bundle was trained on (it must use the same "
        "item ids; its other items are dropped)",
    )


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import check_bundle_dir
    from pipelines.eval_job import run_evaluate
    from recvae.recommender import Recommender

    try:
        ks = tuple(int(k) for k in str(args.ks or DEFAULT_KS).split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {args.ks!r}")
    check_bundle_dir(args.bundle)
    try:
        meta = Recommender.read_meta(args.bundle)
    except ValueError:  # not a bundle, or unreadable: run_evaluate's load says which
        meta = {}
    n_items = meta.get("n_items")
    # A cut-off past the catalog ranks nothing more, but costs memory in proportion to it (a
    # typo such as 1000000000000 runs out of memory after the data is loaded). The default
    # cut-offs stay valid on small catalogs.
    if args.ks is not None and isinstance(n_items, int) and max(ks) > n_items:
        raise ValueError(
            f"--ks {max(ks)}: the bundle {args.bundle} ranks only {n_items} items; give "
            f"cut-offs up to {n_items}"
        )
    job, changed = bundle_job(args, meta, verb="evaluate")
    if changed:
        print(
            f"warning: {', '.join(changed)}: the split differs from the one the bundle was "
            f"trained with, so the {args.part} users may include users the model was trained "
            "on (inflated metrics); omit these settings to re-create the training split",
            file=sys.stderr,
        )
    report = run_evaluate(
        args.bundle,
        job,
        part=args.part,
        ks=ks,
        device=args.device,
        warn=None if changed else _warn,
    )
    print(report)
    return 0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def bundle_job(
    args: argparse.Namespace, meta: dict[str, Any], *, verb: str
) -> tuple[JobSettings, list[str]]:
    """The job of the flags and ``--config``, on top of the data and protocol the bundle recorded.

    ``recvae train`` records its job in ``meta["job"]`` (older bundles: the split's settings
    in ``meta["split"]``). Each data or protocol field that neither a flag nor the config sets
    takes the recorded value, so that the split is the training split. A bundle without records
    gets the plain job.

    Args:
        args: The parsed command line (data and, optionally, protocol flags).
        meta: The bundle's ``meta.json``.
        verb: What the command does with the bundle, for messages (``"evaluate"``).

    Returns:
        The job, and ``"<field> <value> (trained with <recorded>)"`` for each recorded split
        setting that the flags or config changed (``data_dir`` aside: it moves the same data).

    Raises:
        CLIError: the bundle was trained on another dataset than the one asked for (unless
            ``args.allow_other_dataset``).
    """
    from pipelines.cli import CLIError
    from pipelines.settings import DataSettings, ProtocolSettings, option_flag, read_toml, table

    recorded_job = _table(meta, "job")
    recorded_data = _known_fields(recorded_job.get("data"), DataSettings)
    # A bundle trained on a file: --threshold and the other file flags apply to that file.
    recorded = (
        DataSettings(**recorded_data)
        if recorded_data and not getattr(args, "dataset", None)
        else None
    )
    job = job_from_args(args, recorded=recorded)
    raw = read_toml(args.config) if getattr(args, "config", None) else {}
    explicit_data = set(table(raw, "data")) | {
        name for name, arg in DATA_ARGS.items() if getattr(args, arg, None) is not None
    }
    explicit_protocol = set(table(raw, "protocol")) | {
        f.name
        for f in dataclasses.fields(ProtocolSettings)
        if getattr(args, f.name, None) is not None
    }
    recorded_protocol = _known_fields(recorded_job.get("protocol"), ProtocolSettings)
    split = _table(meta, "split")
    for name in ("seed", "holdout_fraction", "n_heldout"):
        # The split summary holds the n_heldout the dataset's default resolved to.
        if recorded_protocol.get(name) is None and split.get(name) is not None:
            recorded_protocol[name] = split[name]

    data = job.data
    if recorded_data:
        overrides = {name: getattr(job.data, name) for name in explicit_data}
        if "dataset" in explicit_data and "path" not in explicit_data:
            overrides["path"] = None  # a dataset asked for by name replaces a recorded file
        data = dataclasses.replace(DataSettings(**recorded_data), **overrides)
    recorded_path = recorded_data.get("path")
    if (
        "path" not in explicit_data
        and data.path
        and data.path == recorded_path
        and not GLOB_OR_URL.search(data.path)
        and not Path(data.path).exists()
    ):
        where = "" if Path(data.path).is_absolute() else f" from {Path.cwd()}"
        raise CLIError(
            f"the bundle {args.bundle} was trained on the file {data.path}, which is not "
            f"found{where} (a relative path is read from the working directory): pass the file "
            "with --data PATH"
        )
    recorded_name = meta.get("dataset")
    other = isinstance(recorded_name, str) and data.name != recorded_name
    if other and not getattr(args, "allow_other_dataset", False):
        raise CLIError(
            f"the bundle {args.bundle} was trained on {recorded_name}, not {data.name}: its item "
            f"ids are those of {recorded_name}, so on other data they may name other items and "
            f"the scores mean nothing; omit --dataset/--data to {verb} it on "
            f"{recorded_name}, or add --allow-other-dataset if {data.name} uses the same item ids"
        )
    protocol = dataclasses.replace(
        ProtocolSettings(**recorded_protocol),
        **{name: getattr(job.protocol, name) for name in explicit_protocol},
    )
    changed = [
        f"{option_flag(name)} {getattr(protocol, name)} (trained with {recorded_protocol[name]})"
        for name in sorted(explicit_protocol)
        if name in recorded_protocol and getattr(protocol, name) != recorded_protocol[name]
    ]
    changed += [
        f"{option_flag(name)} {getattr(data, name)} (trained with {recorded_data[name]})"
        for name in sorted(explicit_data - {"data_dir"})
        if name in recorded_data and getattr(data, name) != recorded_data[name]
    ]
    return dataclasses.replace(job, data=data, protocol=protocol), changed


def _table(meta: dict[str, Any], name: str) -> dict[str, Any]:
    value = meta.get(name)
    return value if isinstance(value, dict) else {}


def _known_fields(section: Any, cls: type) -> dict[str, Any]:
    """The entries of a recorded settings table that ``cls`` has (others are dropped)."""
    if not isinstance(section, dict):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in section.items() if key in names}
