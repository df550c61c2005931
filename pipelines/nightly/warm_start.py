"""Warm start: the challenger's first weights from the champion, for the items both know.

Only two parameters of a Mult-VAE / Mult-DAE are indexed by item: the columns of the first
encoder layer (``encoder.0.weight``, ``(hidden, n_items)``) and the rows of the last decoder
layer (``decoder.L.weight``, ``(n_items, hidden)``, and ``decoder.L.bias``). Those are copied
item by item, matched by external id; items new today keep their fresh initialization. Every
other parameter is copied as a whole. Warm start needs the same model type and the same
layer sizes; otherwise it is skipped and the reason recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from torch import Tensor

    from recvae.config import ModelConfig
    from recvae.recommender import Recommender

__all__ = ["WarmStart", "item_positions", "warm_start_state"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStart:
    """The warm-start state (None when skipped) and what happened."""

    state: dict[str, Tensor] | None
    reason: str
    shared_items: int = 0
    new_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "used": self.state is not None,
            "reason": self.reason,
            "shared_items": self.shared_items,
            "new_items": self.new_items,
        }


def item_positions(source: Recommender, item_ids: NDArray[Any]) -> NDArray[np.int64]:
    """Position in ``source``'s vocabulary of each id in ``item_ids`` (-1 when unknown)."""
    out = np.full(len(item_ids), -1, dtype=np.int64)
    for j, item in enumerate(item_ids.tolist()):
        idx = source.vocab.item_index(item)
        if idx is not None:
            out[j] = idx
    return out


def _item_axes(state: dict[str, Tensor]) -> dict[str, int]:
    """Item-indexed parameters and the axis that is indexed by item."""
    decoder = sorted(
        {int(k.split(".")[1]) for k in state if k.startswith("decoder.")},
    )
    if "encoder.0.weight" not in state or not decoder:
        return {}
    last = decoder[-1]
    return {
        "encoder.0.weight": 1,
        f"decoder.{last}.weight": 0,
        f"decoder.{last}.bias": 0,
    }


def warm_start_state(
    champion: Recommender, config: ModelConfig, item_ids: NDArray[Any]
) -> WarmStart:
    """The challenger's initial state dict built from ``champion``.

    Args:
        champion: The current champion.
        config: The challenger's config.
        item_ids: The challenger's item vocabulary.

    Returns:
        The state (a full state dict of a freshly initialized challenger with the champion's
        weights copied in), or a skipped :class:`WarmStart` with the reason.
    """
    import torch

    from recvae.model import build_model

    if champion.config.model != config.model:
        return WarmStart(
            None, f"champion is a {champion.config.model}, challenger a {config.model}"
        )
    torch.manual_seed(config.seed)
    fresh = build_model(config, len(item_ids)).state_dict()
    old = {k: v.detach().cpu() for k, v in champion.model.state_dict().items()}
    if set(fresh) != set(old):
        return WarmStart(None, "champion and challenger have different layers")
    axes = _item_axes(fresh)
    if not axes:
        return WarmStart(None, "unrecognized model layout (no item-indexed layers)")
    positions = item_positions(champion, item_ids)
    known = np.flatnonzero(positions >= 0)
    if len(known) == 0:
        return WarmStart(None, "champion and challenger share no item", 0, len(item_ids))
    new_idx = torch.as_tensor(known, dtype=torch.long)
    old_idx = torch.as_tensor(positions[known], dtype=torch.long)
    state: dict[str, Tensor] = {}
    for key, value in fresh.items():
        source = old[key]
        if key in axes:
            axis = axes[key]
            expected = list(value.shape)
            expected[axis] = champion.n_items
            if list(source.shape) != expected:
                return WarmStart(
                    None, f"layer {key} has shape {tuple(source.shape)}, not {expected}"
                )
            merged = value.clone()
            merged.index_copy_(axis, new_idx, source.index_select(axis, old_idx).to(value.dtype))
            state[key] = merged
        elif source.shape == value.shape:
            state[key] = source.to(value.dtype).clone()
        else:
            return WarmStart(
                None,
                f"layer {key} differs: champion {tuple(source.shape)}, challenger "
                f"{tuple(value.shape)} (architecture changed)",
            )
    n_new = len(item_ids) - len(known)
    logger.info("warm start from the champion: %d shared items, %d new", len(known), n_new)
    return WarmStart(state, "warm-started from the champion", len(known), n_new)
