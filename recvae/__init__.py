"""recvae: variational autoencoders for collaborative filtering.

The public surface is listed in ``__all__``. Names are imported lazily (PEP 562) so that
``import recvae`` stays fast and a command-line tool pays for torch only when it uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # data
    "Interactions": "recvae.data",
    "DataError": "recvae.data",
    "UnknownUserError": "recvae.data",
    "load_dataset": "recvae.data",
    "load_interactions": "recvae.data",
    "list_datasets": "recvae.data",
    "synthetic_interactions": "recvae.data",
    # split
    "Split": "recvae.split",
    "HeldOut": "recvae.split",
    "split_users": "recvae.split",
    # config
    "MultVAEConfig": "recvae.config",
    "MultDAEConfig": "recvae.config",
    "RunOptions": "recvae.config",
    "config_from_dict": "recvae.config",
    # model
    "MultVAE": "recvae.model",
    "MultDAE": "recvae.model",
    "elbo_loss": "recvae.model",
    # RecVAE (Shenbin et al. 2020)
    "RecVAE": "recvae.recvae_model",
    "RecVAEConfig": "recvae.recvae_model",
    "RecVAETrainer": "recvae.recvae_model",
    # blends of two rankers
    "Blend": "recvae.blend",
    "select_blend_weight": "recvae.blend",
    # ensembles of several rankers (e.g. one VAE trained with several seeds)
    "Ensemble": "recvae.ensemble",
    # training
    "train": "recvae.training",
    "Trainer": "recvae.training",
    # recommender
    "Recommender": "recvae.recommender",
    "Recommendations": "recvae.recommender",
    "BundleError": "recvae.recommender",
    # VAE capabilities: anomaly scores, confidence, exploration
    "AnomalyScores": "recvae.vae_tools",
    "anomalous_users": "recvae.vae_tools",
    # baselines (implicit's models need the baselines extra)
    "Popularity": "recvae.baselines",
    "PopularityConfig": "recvae.baselines",
    "EASE": "recvae.baselines",
    "EASEConfig": "recvae.baselines",
    "ALSConfig": "recvae.baselines",
    "BPRConfig": "recvae.baselines",
    "ItemKNNConfig": "recvae.baselines",
    "select_ease_lambda": "recvae.baselines",
    "baseline_config_from_dict": "recvae.baselines",
    "ALS": "recvae.baselines_implicit",
    "BPR": "recvae.baselines_implicit",
    "ItemKNN": "recvae.baselines_implicit",
    # evaluation
    "evaluate": "recvae.evaluation",
    "EvaluationResult": "recvae.evaluation",
    "Ranker": "recvae.evaluation",
    "ndcg_at_k": "recvae.evaluation",
    "recall_at_k": "recvae.evaluation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recvae' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
