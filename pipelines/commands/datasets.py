"""``recvae datasets``: list the built-in dataset loaders."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "datasets",
        help="list the built-in datasets",
        description="List the built-in dataset loaders and defaults.",
    )
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from recvae.data import list_datasets

    print(f"{'name':<18} {'n_heldout':>9}  {'feedback':<8}  description")
    for spec in list_datasets():
        kind = "implicit" if spec.implicit else "ratings"
        print(f"{spec.name:<18} {spec.n_heldout:>9}  {kind:<8}  {spec.description}")
    print("\nml-latest-small is bundled; the others need --data-dir (e.g. ../shared/data).")
    return 0
