"""Datasets: the :class:`Interactions` object, file readers, built-in datasets, synthetic data.

Names are imported on first use (PEP 562), so that the training core, the evaluation code and
the serving layer can use :class:`Interactions` without importing polars, which only the
readers need (importing it costs about 0.4 s, and a GPU training image may not have it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DatasetSpec": "recvae.data.datasets",
    "get_dataset_spec": "recvae.data.datasets",
    "list_datasets": "recvae.data.datasets",
    "load_dataset": "recvae.data.datasets",
    "load_dataset_frame": "recvae.data.datasets",
    "DataError": "recvae.data.interactions",
    "Interactions": "recvae.data.interactions",
    "UnknownUserError": "recvae.data.interactions",
    "DataFileNotFound": "recvae.data.readers",
    "interactions_from_frame": "recvae.data.readers",
    "load_interactions": "recvae.data.readers",
    "read_frame": "recvae.data.readers",
    "read_ml1m": "recvae.data.readers",
    "read_ml100k": "recvae.data.readers",
    "read_movielens_csv": "recvae.data.readers",
    "SYNTHETIC_SHAPES": "recvae.data.synthetic",
    "planted_interactions": "recvae.data.synthetic",
    "synthetic_interactions": "recvae.data.synthetic",
}

if TYPE_CHECKING:
    from recvae.data.datasets import (
        DatasetSpec,
        get_dataset_spec,
        list_datasets,
        load_dataset,
        load_dataset_frame,
    )
    from recvae.data.interactions import DataError, Interactions, UnknownUserError
    from recvae.data.readers import (
        DataFileNotFound,
        interactions_from_frame,
        load_interactions,
        read_frame,
        read_ml1m,
        read_ml100k,
        read_movielens_csv,
    )
    from recvae.data.synthetic import (
        SYNTHETIC_SHAPES,
        planted_interactions,
        synthetic_interactions,
    )

__all__ = [
    "DataError",
    "DataFileNotFound",
    "DatasetSpec",
    "Interactions",
    "SYNTHETIC_SHAPES",
    "UnknownUserError",
    "get_dataset_spec",
    "interactions_from_frame",
    "list_datasets",
    "load_dataset",
    "load_dataset_frame",
    "load_interactions",
    "planted_interactions",
    "read_frame",
    "read_ml100k",
    "read_ml1m",
    "read_movielens_csv",
    "synthetic_interactions",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recvae.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
