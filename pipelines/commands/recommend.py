"""``recvae recommend``: top-K items from a bundle for a history of item ids or a known user."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The seeds the library takes for a sample (as the HTTP API: a non-negative int64).
MAX_SEED = 2**63 - 1  # the library's and the HTTP API's limit


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="print top-K items for a history of item ids (new users too) or a training user",
        description=(
            "Fold a history into the model (no retraining) and rank every item. Unknown item ids "
            "are ignored and listed; a history with no known item gets the most popular "
            "training items instead, flagged (fallback: popularity), as in the HTTP API."
        ),
    )
    parser.add_argument("bundle", type=Path, help="model bundle directory")
    parser.add_argument("items", nargs="*", help="item ids of the history")
    parser.add_argument("--user", help="a training user's id (uses the stored history)")
    parser.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="do not exclude history items")
    parser.add_argument("--json", action="store_true", help="print JSON")
    explore = parser.add_argument_group("exploration (Mult-VAE only)")
    explore.add_argument(
        "--explore",
        action="store_true",
        help="rank from a sample of the user's posterior instead of its mean (Thompson-style)",
    )
    explore.add_argument(
        "--temperature",
        type=float,
        help="scale of the posterior's sigma when exploring (default 1.0; 0 = no exploration)",
    )
    explore.add_argument("--seed", type=int, help="seed of the sample (default: random)")
    parser.set_defaults(func=run_command)


def _parse_id(value: str, kind_is_int: bool) -> Any:
    if kind_is_int:
        try:
            return int(value)
        except ValueError:
            return value
    return value


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError, check_bundle_dir
    from recvae.data import UnknownUserError
    from recvae.recommender import Recommender

    if args.k < 1:
        raise CLIError(f"-k must be >= 1, got {args.k}")
    if not args.items and args.user is None:
        raise CLIError("give item ids of a history, or --user ID")
    if args.items and args.user is not None:
        raise CLIError(
            f"give either --user {args.user} (the stored history of a training user) or item ids "
            f"of a history ({' '.join(args.items)}), not both"
        )
    if not args.explore and (args.temperature is not None or args.seed is not None):
        raise CLIError("--temperature and --seed apply only with --explore")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise CLIError(f"--seed must be in [0, {MAX_SEED}] (2**63 - 1), got {args.seed}")
    explore = {
        "explore": args.explore,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "seed": args.seed,
    }
    check_bundle_dir(args.bundle)
    rec = Recommender.load(args.bundle)
    int_items = rec.item_ids.dtype != object
    fallback: str | None = None
    if args.user is not None:
        user = _parse_id(args.user, rec.user_ids.dtype != object)
        try:
            rec.vocab.user_index(user)
        except UnknownUserError:
            raise CLIError(
                f"user {args.user} is not a training user of the bundle {args.bundle} (--user "
                f"works only for the {rec.vocab.n_users} users it was trained on; held-out and "
                "new users are not stored): give that user's item ids as a history instead, "
                f"`recvae recommend {args.bundle} ITEM_ID ...`"
            ) from None
        result = rec.recommend([user], args.k, exclude_seen=not args.include_seen, **explore)
        unknown: list[Any] = []
    else:
        history = [_parse_id(i, int_items) for i in args.items]
        known, unknown = rec.vocab.item_indices(history)
        if not len(known):
            # As the HTTP API: no known item, so the most popular training items. The empty
            # history is still scored, for the checks of the explore flags and its confidence.
            fallback = "popularity"
            history = []
        result = rec.recommend_from_history(
            history, args.k, exclude_seen=not args.include_seen, **explore
        )
    ranked = result.to_lists()[0] if fallback is None else rec.popular_items(args.k)
    confidence = None if result.confidence is None else float(result.confidence[0])
    if args.json:
        print(
            json.dumps(
                {
                    "items": [{"item_id": i, "score": s} for i, s in ranked],
                    "unknown_items": unknown,
                    "fallback": fallback,
                    "confidence": confidence,
                    "model_version": rec.version,
                },
                indent=2,
            )
        )
        return 0
    if unknown:
        # An id that is not an integer cannot be one of an int-keyed model's (a typo, "1.0").
        hint = ""
        if int_items and any(isinstance(item, str) for item in unknown):
            hint = f" (this model's item ids are integers, e.g. {rec.item_ids[0]})"
        print(f"ignored unknown item(s): {', '.join(map(str, unknown))}{hint}")
    if fallback is not None:
        print(
            "no known item in the history: the most popular training items instead "
            "(fallback: popularity, as the HTTP API; scores are the share of training users "
            "who have the item)"
        )
    if confidence is not None:
        print(f"confidence {confidence:.3f} (0 = no more than the prior, 1 = certain)")
    print(f"{'rank':>4}  {'item_id':<16} score")
    for rank, (item, score) in enumerate(ranked, 1):
        print(f"{rank:>4}  {item!s:<16} {score:.4f}")
    return 0
