"""``recvae anomalies``: the most unusual users of a dataset under a model bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipelines.commands._common import add_config_argument, add_data_arguments
from pipelines.commands.evaluate import add_allow_other_dataset_argument, bundle_job


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "anomalies",
        help="list the most unusual users of a dataset (negative ELBO per item, percentile)",
        description=(
            "Score every user of a dataset with the bundle's model: the negative ELBO of the "
            "history per history item (higher is more unusual) and its percentile among the "
            "bundle's training users. The data is the dataset the bundle was trained on unless "
            "flags say otherwise. Items the bundle does not know are dropped first."
        ),
    )
    parser.add_argument("bundle", type=Path, help="model bundle directory")
    add_config_argument(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--min-user-count",
        type=int,
        help="keep users with at least this many positives (default: as in training)",
    )
    parser.add_argument("--top", type=int, default=20, help="users to list (default 20)")
    parser.add_argument(
        "--above-percentile",
        type=float,
        help="list only users above this percentile of the training users (0-100)",
    )
    parser.add_argument(
        "--reference",
        choices=["auto", "training", "held-out"],
        default="auto",
        help="population the percentiles compare with: the bundle's training users, or the "
        "held-out users it was calibrated on (auto: held-out when the bundle has them)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_allow_other_dataset_argument(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli import CLIError

    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    if args.above_percentile is not None and not 0.0 <= args.above_percentile <= 100.0:
        raise CLIError(f"--above-percentile must be in [0, 100], got {args.above_percentile}")
    if args.min_user_count is not None and args.min_user_count < 1:
        raise CLIError(f"--min-user-count must be >= 1, got {args.min_user_count}")

    import numpy as np

    from pipelines.cli import check_bundle_dir
    from pipelines.settings import load_data
    from recvae.recommender import Recommender
    from recvae.vae_tools import align_to_vocabulary

    check_bundle_dir(args.bundle)
    rec = Recommender.load(args.bundle, device=args.device)
    try:
        rec.anomaly_reference_source(args.reference)
    except ValueError:
        raise CLIError(
            f"the bundle {args.bundle} has no held-out anomaly reference: no held-out users "
            "were scored into it (the Python API Recommender.calibrate_anomalies does that; no "
            "recvae command does); use --reference training or auto (here: training)"
        ) from None
    # The bundle's dataset and min_user_count unless flags say otherwise (no split is made).
    job, _ = bundle_job(args, rec.meta, verb="score users with")
    min_count = args.min_user_count or job.protocol.min_user_count
    data, _ = load_data(job.data, min_user_count=min_count)
    matrix = align_to_vocabulary(data, rec)
    if matrix.nnz == 0:
        raise CLIError(f"the bundle {args.bundle} knows none of the items of {job.data.name}")
    result = rec.anomaly_scores(matrix, reference=args.reference)
    order = result.most_unusual()
    order = order[~np.isnan(result.scores[order])]
    if args.above_percentile is not None:
        order = order[result.percentiles[order] > args.above_percentile]
    shown = order[: args.top]
    n_unknown = np.asarray(data.matrix.sum(axis=1)).ravel() - np.asarray(matrix.sum(axis=1)).ravel()
    rows = [
        {
            "user_id": _py(data.user_ids[u]),
            "score": float(result.scores[u]),
            "percentile": float(result.percentiles[u]),
            "history_length": int(result.history_lengths[u]),
            "unknown_items": int(round(n_unknown[u])),
        }
        for u in shown
    ]
    n_scored = int((~np.isnan(result.scores)).sum())
    reference = rec.anomaly_reference(result.reference)
    if args.json:
        print(
            json.dumps(
                {
                    "model_version": rec.version,
                    "dataset": job.data.name,
                    "n_users": data.n_users,
                    "n_scored": n_scored,
                    "n_above_percentile": None
                    if args.above_percentile is None
                    else int(len(order)),
                    "reference": result.reference,
                    "reference_median_score": reference.median_score,
                    "users": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"bundle {args.bundle} (model {rec.config.model}, version {rec.version}) on "
        f"{job.data.name}: {n_scored} of {data.n_users} users scored; percentiles against "
        f"{result.reference} users of similar history length "
        f"(median score {reference.median_score:.4f})"
    )
    if args.above_percentile is not None:
        print(f"{len(order)} user(s) above the {args.above_percentile:g}th percentile")
    print(
        "score = negative ELBO per history item (nats); ranked by percentile among reference "
        "histories of a similar length, then score"
    )
    print(f"{'rank':>4}  {'user_id':<16} {'score':>8} {'percentile':>10} {'length':>7}")
    for rank, row in enumerate(rows, 1):
        print(
            f"{rank:>4}  {row['user_id']!s:<16} {row['score']:>8.4f} "
            f"{row['percentile']:>10.2f} {row['history_length']:>7}"
        )
    return 0


def _py(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
