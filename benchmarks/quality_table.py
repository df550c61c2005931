"""Markdown tables of the quality results (test users, mean ± standard error).

Usage::

    .venv/bin/python benchmarks/quality_table.py --rows rows.json

``rows.json`` maps a dataset to ``[[label, result name], ...]`` (results of ``quality_run.py``,
``quality_search.py`` + ``quality_test.py``, or ``quality_blend.py``). Besides the paper's three
metrics the table gives the paired difference in NDCG@100 to the row named ``EASE`` (mean of the
per-user differences ± its standard error, same test users), the validation NDCG@100 that chose
the configuration, the chosen hyperparameters and the training time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from quality_common import PAPER, read_results

_SHOWN: dict[str, tuple[str, ...]] = {
    "multvae": (
        "hidden_dims",
        "latent_dim",
        "beta_max",
        "dropout",
        "weight_decay",
        "learning_rate",
        "batch_size",
        "epochs",
    ),
    "recvae": (
        "hidden_dim",
        "latent_dim",
        "n_layers",
        "gamma",
        "dropout",
        "weight_decay",
        "learning_rate",
        "batch_size",
        "epochs",
        "prior_mixture",
    ),
    "ease": ("regularization",),
    "als": ("factors", "regularization", "alpha", "iterations"),
    "popularity": (),
}


def _params(record: dict[str, Any]) -> str:
    config = record.get("config") or {}
    model = record.get("model", config.get("model"))
    if model == "blend":
        weight = config["weight_vae"]
        return (
            f"VAE `{config['vae']}` x {weight:g} + EASE(lambda {config['ease_lambda']:g})"
            f" x {1 - weight:g}, {config['normalization']}"
        )
    if model == "ensemble":
        members = config["members"]
        inner = {"config": config.get("member_config") or {}}
        return (
            f"{len(members)} seeds of ({_params(inner)}), mean of "
            f"{'log-probabilities' if config['combine'] == 'log_softmax' else 'probabilities'}"
        )
    keys = _SHOWN.get(str(model), tuple(k for k in config if k != "model"))
    parts = [f"{k}={_fmt(config[k])}" for k in keys if k in config]
    if record.get("best_epoch") is not None:
        parts.append(f"best epoch {record['best_epoch']}/{record.get('epochs_run')}")
    return ", ".join(parts) if parts else "-"


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _paired(a: list[float], b: list[float]) -> str:
    diff = np.asarray(a) - np.asarray(b)
    se = float(np.std(diff, ddof=1) / math.sqrt(diff.size))
    return f"{diff.mean():+.4f} ± {se:.4f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def table(dataset: str, rows: list[list[str]], out_dir: Path) -> str:
    results = read_results(out_dir, dataset)
    ease = next((results[name] for label, name in rows if label == "EASE"), None)
    header = [
        "model",
        "Recall@20",
        "Recall@50",
        "NDCG@100",
        "ΔNDCG@100 vs EASE (paired)",
        "val NDCG@100",
        "chosen hyperparameters",
        "train time",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for label, name in rows:
        record = results.get(name)
        if record is None or "test" not in record:
            lines.append(f"| {label} | not run | | | | | `{name}` | |")
            continue
        test = record["test"]
        cells = [f"{test[m]['mean']:.4f} ± {test[m]['stderr']:.4f}" for m in PAPER]
        delta = "-"
        if ease is not None and record is not ease:
            delta = _paired(test["ndcg@100_per_user"], ease["test"]["ndcg@100_per_user"])
        val = record["validation"]["ndcg@100"]["mean"]
        seconds = _seconds(record.get("train_seconds"))
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {delta} | {val:.4f} | {_params(record)} | {seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/quality"))
    args = parser.parse_args()
    spec: dict[str, list[list[str]]] = json.loads(args.rows.read_text())
    for dataset, rows in spec.items():
        print(f"### {dataset}\n")  # noqa: T201
        print(table(dataset, rows, args.out) + "\n")  # noqa: T201


if __name__ == "__main__":
    main()
