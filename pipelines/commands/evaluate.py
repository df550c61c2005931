"""``recvae evaluate``: score a saved bundle on a dataset's held-out users."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.commands._common import add_job_arguments, job_from_args


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model bundle on the test (or validation) users of a dataset",
        description=(
            "Re-create the seeded split of the data and score the bundle on its held-out users. "
            "Held-out items the bundle does not know are dropped."
        ),
    )
    parser.add_argument("bundle", type=Path, help="model bundle directory")
    add_job_arguments(parser)
    parser.add_argument("--part", choices=["test", "validation"], default="test")
    parser.add_argument("--ks", default="20,50,100", help="cut-offs, comma separated")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.eval_job import run_evaluate

    try:
        ks = tuple(int(k) for k in str(args.ks).split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {args.ks!r}")
    job = job_from_args(args)
    report = run_evaluate(args.bundle, job, part=args.part, ks=ks, device=args.device)
    print(report)
    return 0
