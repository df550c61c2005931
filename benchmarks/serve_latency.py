"""In-process serving latency: one recommendation, and batch scoring, through the serving path.

Measures ``ServedModel.recommend_histories`` (what ``POST /v1/recommendations`` calls: id
lookup, fold-in, scoring, exclusion, top-k, mapping back to ids) for a history of 50 items and
``k = 100``, one request at a time; then one batch of 10,000 such histories.

Usage::

    .venv/bin/python benchmarks/serve_latency.py --bundle runs/ml1m/bundle --name ml-1m
    .venv/bin/python benchmarks/serve_latency.py --gowalla-sized /tmp/gowalla-sized --name gowalla

Targets (issue 4): single p99 under 5 ms for the ml-1m-sized model; 10,000 histories in under 2 s.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch
from serve_common import (
    build_gowalla_sized_bundle,
    machine,
    percentiles,
    sample_histories,
    write_json,
)

from recvae.recommender import Recommender
from serving.served import ServedModel


def single_latency(
    served: ServedModel, histories: list[list[Any]], k: int, repeats: int
) -> dict[str, float]:
    for history in histories[:50]:  # warm-up
        served.recommend_histories([history], k)
    times, cpu = [], []
    for i in range(repeats):
        history = histories[i % len(histories)]
        start, start_cpu = time.perf_counter(), time.process_time()
        served.recommend_histories([history], k)
        cpu.append(time.process_time() - start_cpu)
        times.append(time.perf_counter() - start)
    return {**percentiles(times), "cpu": percentiles(cpu)}


def batch_latency(
    served: ServedModel, histories: list[list[Any]], k: int, repeats: int
) -> dict[str, Any]:
    served.recommend_histories(histories[:100], k)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        served.recommend_histories(histories, k)
        cpu.append(time.process_time() - start_cpu)
        times.append(time.perf_counter() - start)
    # Where the time goes: the decoder alone (its last layer is a dense (n, d) x (d, n_items)
    # product that no serving code can avoid), on the same number of histories.
    model = served.recommender.model
    latent = int(model.latent_dim)
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(histories), 1024):
            model.decode(torch.zeros(min(1024, len(histories) - begin), latent))
    decoder = time.perf_counter() - start
    return {
        "n_histories": len(histories),
        "seconds": [round(t, 3) for t in times],
        "best_seconds": round(min(times), 3),
        "cpu_seconds": [round(t, 3) for t in cpu],
        "decoder_only_seconds": round(decoder, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a trained bundle (e.g. ml-1m)")
    source.add_argument(
        "--gowalla-sized", type=Path, help="build (once) and use a random-weight 41k-item bundle"
    )
    parser.add_argument("--name", required=True, help="label in the output")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument("--history", type=int, default=50, help="items per history")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2000, help="single requests timed")
    parser.add_argument("--batch", type=int, default=10_000, help="histories in the batch")
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    bundle = args.bundle or build_gowalla_sized_bundle(args.gowalla_sized)
    served = ServedModel.build(Recommender.load(bundle), source=str(bundle))
    histories = sample_histories(bundle, args.batch, args.history, seed=0)
    result: dict[str, Any] = {
        "model": args.name,
        "bundle": str(bundle),
        "n_items": served.n_items,
        "history_length": args.history,
        "k": args.k,
        "machine_before": machine(),
        "runs": [],
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        result["runs"].append(
            {
                "torch_threads": threads,
                "single": single_latency(served, histories, args.k, args.repeats),
                "batch": batch_latency(served, histories, args.k, args.batch_repeats),
            }
        )
    result["machine_after"] = machine()
    write_json(result, args.out)


if __name__ == "__main__":
    main()
