"""``recvae recommend``: top-K items from a bundle for a history of item ids or a known user."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="print top-K items for a history of item ids (new users too) or a training user",
        description="Fold a history into the model (no retraining) and rank every item.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle directory")
    parser.add_argument("items", nargs="*", help="item ids of the history")
    parser.add_argument("--user", help="a training user's id (uses the stored history)")
    parser.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="do not exclude history items")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_command)


def _parse_id(value: str, kind_is_int: bool) -> Any:
    if kind_is_int:
        try:
            return int(value)
        except ValueError:
            return value
    return value


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError
    from recvae.recommender import Recommender

    if args.k < 1:
        raise CLIError(f"-k must be >= 1, got {args.k}")
    if not args.items and args.user is None:
        raise CLIError("give item ids of a history, or --user ID")
    rec = Recommender.load(args.bundle)
    int_items = rec.item_ids.dtype != object
    if args.user is not None:
        int_users = rec.user_ids.dtype != object
        result = rec.recommend(
            [_parse_id(args.user, int_users)], args.k, exclude_seen=not args.include_seen
        )
        unknown: tuple[Any, ...] = ()
    else:
        history = [_parse_id(i, int_items) for i in args.items]
        result = rec.recommend_from_history(history, args.k, exclude_seen=not args.include_seen)
        unknown = result.unknown_items[0]
    ranked = result.to_lists()[0]
    if args.json:
        print(
            json.dumps(
                {
                    "items": [{"item_id": i, "score": s} for i, s in ranked],
                    "unknown_items": list(unknown),
                    "model_version": rec.version,
                },
                indent=2,
            )
        )
        return 0
    if unknown:
        print(f"ignored unknown item(s): {', '.join(map(str, unknown))}")
    if args.user is None and len(unknown) == len(args.items):
        print("no known item in the history: scores come from the model's prior (z = 0 input)")
    print(f"{'rank':>4}  {'item_id':<16} score")
    for rank, (item, score) in enumerate(ranked, 1):
        print(f"{rank:>4}  {item!s:<16} {score:.4f}")
    return 0
