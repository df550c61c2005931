"""Datasets: the :class:`Interactions` object, file readers, built-in datasets, synthetic data."""

from __future__ import annotations

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
from recvae.data.synthetic import SYNTHETIC_SHAPES, planted_interactions, synthetic_interactions

__all__ = [
    "SYNTHETIC_SHAPES",
    "DataError",
    "DataFileNotFound",
    "DatasetSpec",
    "Interactions",
    "UnknownUserError",
    "get_dataset_spec",
    "interactions_from_frame",
    "list_datasets",
    "load_dataset",
    "load_dataset_frame",
    "load_interactions",
    "planted_interactions",
    "read_frame",
    "read_ml1m",
    "read_ml100k",
    "read_movielens_csv",
    "synthetic_interactions",
]
