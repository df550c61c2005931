"""A trained model plus its vocabularies: scoring, top-K recommendation and the saved bundle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import nn

from recvae.config import ModelConfig, config_from_dict
from recvae.data.interactions import Interactions, UnknownUserError
from recvae.evaluation import topk_indices
from recvae.model import build_model

__all__ = ["Recommender", "Recommendations", "BundleError", "BUNDLE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
_BUNDLE_FILES = ("config.json", "weights.pt", "user_ids.json", "item_ids.json", "train_matrix.npz")


class BundleError(ValueError):
    """A model bundle is missing, corrupted or incompatible with this version of recvae."""


@dataclass(frozen=True)
class Recommendations:
    """Top-K results for a batch of users, best first.

    Attributes:
        item_ids: ``(n_users, k)`` external item ids.
        scores: ``(n_users, k)`` float32 scores; ``-inf`` marks padding where fewer than ``k``
            items were eligible (those positions are not recommendations, and their
            ``item_ids`` entry is meaningless).
        item_idx: ``(n_users, k)`` item positions in the model's vocabulary, ``-1`` for padding.
        unknown_items: For history-based calls, the history items the model did not know.
    """

    item_ids: NDArray[Any]
    scores: NDArray[np.float32]
    item_idx: NDArray[np.int64]
    unknown_items: tuple[tuple[Any, ...], ...] = field(default=())

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_lists(self) -> list[list[tuple[Any, float]]]:
        """One ``[(item_id, score), ...]`` list per user, padding dropped."""
        out: list[list[tuple[Any, float]]] = []
        for ids, scores in zip(self.item_ids, self.scores, strict=True):
            out.append(
                [(_py(i), float(s)) for i, s in zip(ids, scores, strict=True) if np.isfinite(s)]
            )
        return out


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available")
    return dev


class Recommender:
    """A trained autoencoder with its item vocabulary, ready to score histories.

    Evaluation and serving use the posterior mean (``z = mu``). Also the ``Ranker`` of
    ``recvae.evaluation``: ``score(histories)`` returns scores for every item.

    Args:
        model: A trained ``MultVAE``/``MultDAE`` (put in eval mode here).
        config: Its config.
        item_ids: External item ids, one per model output.
        user_ids: Training user ids (for ``recommend``); optional.
        train_matrix: Training users' histories, rows aligned with ``user_ids``.
        meta: Free metadata (metrics, history, data fingerprint, ...), saved in ``meta.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        item_ids: NDArray[Any],
        *,
        user_ids: NDArray[Any] | None = None,
        train_matrix: sp.csr_array | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        n_users = 0 if user_ids is None else len(user_ids)
        if train_matrix is None:
            train_matrix = sp.csr_array((n_users, len(item_ids)), dtype=np.float32)
        self.vocab = Interactions(
            train_matrix, np.arange(0) if user_ids is None else user_ids, item_ids
        )
        self.meta: dict[str, Any] = dict(meta or {})
        if int(getattr(model, "n_items", len(item_ids))) != len(item_ids):
            raise ValueError(
                f"model has {model.n_items} outputs but {len(item_ids)} item ids were given"
            )

    # ------------------------------------------------------------------ basics
    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    @property
    def item_ids(self) -> NDArray[Any]:
        return self.vocab.item_ids

    @property
    def user_ids(self) -> NDArray[Any]:
        return self.vocab.user_ids

    @property
    def train_matrix(self) -> sp.csr_array:
        return self.vocab.matrix

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def version(self) -> str:
        """A short content id of the model (from the bundle checksum when loaded)."""
        return str(self.meta.get("model_version", "unsaved"))

    def to(self, device: str | torch.device) -> Recommender:
        self.model.to(resolve_device(device))
        return self

    def __repr__(self) -> str:
        return (
            f"Recommender(model={self.config.model}, n_items={self.n_items}, "
            f"n_users={self.vocab.n_users}, version={self.version})"
        )

    # ------------------------------------------------------------------ scoring core
    def _dense(self, histories: sp.csr_array | NDArray[Any] | torch.Tensor) -> torch.Tensor:
        if isinstance(histories, torch.Tensor):
            x = histories.to(self.device, dtype=torch.float32)
        elif sp.issparse(histories):
            x = torch.from_numpy(np.asarray(histories.toarray(), dtype=np.float32)).to(self.device)
        else:
            x = torch.as_tensor(np.asarray(histories, dtype=np.float32), device=self.device)
        if x.dim() != 2 or x.shape[1] != self.n_items:
            raise ValueError(f"histories must have shape (n, {self.n_items}), got {tuple(x.shape)}")
        return x

    def score(self, histories: sp.csr_array | NDArray[Any] | torch.Tensor) -> torch.Tensor:
        """Scores (logits) of every item for each history row, from ``z = mu``.

        Args:
            histories: ``(n_users, n_items)`` binary or weighted histories.

        Returns:
            ``(n_users, n_items)`` float32 tensor on the model's device; seen items are *not*
            masked here.
        """
        self.model.eval()
        with torch.inference_mode():
            x = self._dense(histories)
            mu, _ = self.model.encode(x)
            return self.model.decode(mu).float()

    def encode(
        self, histories: sp.csr_array | NDArray[Any] | torch.Tensor
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """The posterior ``(mu, sigma)`` of each history, each ``(n_users, latent_dim)``.

        For Mult-DAE ``sigma`` is all zeros (the code is deterministic).
        """
        self.model.eval()
        with torch.inference_mode():
            mu, logvar = self.model.encode(self._dense(histories))
            sigma = torch.zeros_like(mu) if logvar is None else torch.exp(0.5 * logvar)
        return mu.float().cpu().numpy(), sigma.float().cpu().numpy()

    # ------------------------------------------------------------------ histories
    def histories_matrix(
        self,
        histories: Sequence[Sequence[Any]],
        weights: Sequence[Sequence[float] | None] | None = None,
    ) -> tuple[sp.csr_array, list[tuple[Any, ...]]]:
        """Turn lists of external item ids into a CSR matrix; unknown ids are dropped.

        Args:
            histories: One sequence of item ids per user.
            weights: Optional per-item weights (same shapes); default 1.0 each.

        Returns:
            ``(matrix (n_users, n_items), unknown ids per user)``.

        Raises:
            ValueError: weights do not match the histories, or a weight is negative or not finite.
        """
        rows: list[NDArray[np.int64]] = []
        cols: list[NDArray[np.int64]] = []
        vals: list[NDArray[np.float32]] = []
        unknown_all: list[tuple[Any, ...]] = []
        for row, items in enumerate(histories):
            w = None if weights is None else weights[row]
            if w is not None and len(w) != len(items):
                raise ValueError(f"history {row}: {len(w)} weights for {len(items)} items")
            known_idx: list[int] = []
            known_w: list[float] = []
            unknown: list[Any] = []
            for j, item in enumerate(items):
                idx = self.vocab.item_index(item)
                if idx is None:
                    unknown.append(item)
                    continue
                known_idx.append(idx)
                known_w.append(1.0 if w is None else float(w[j]))
            if known_w and (not np.all(np.isfinite(known_w)) or min(known_w) < 0):
                raise ValueError(f"history {row}: weights must be finite and >= 0")
            if unknown:
                logger.debug("history %d: %d unknown item(s) dropped", row, len(unknown))
            rows.append(np.full(len(known_idx), row, dtype=np.int64))
            cols.append(np.asarray(known_idx, dtype=np.int64))
            vals.append(np.asarray(known_w, dtype=np.float32))
            unknown_all.append(tuple(unknown))
        n = len(histories)
        if n and sum(len(r) for r in rows):
            matrix = sp.csr_array(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=(n, self.n_items),
                dtype=np.float32,
            )
            # Repeated ids in one history: keep the largest weight rather than summing.
            matrix.sum_duplicates()
            matrix = _dedupe_max(
                matrix, np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
            )
        else:
            matrix = sp.csr_array((n, self.n_items), dtype=np.float32)
        return matrix, unknown_all

    # ------------------------------------------------------------------ recommendation
    def _topk(
        self,
        histories: sp.csr_array,
        k: int,
        *,
        exclude_seen: bool,
        exclude: Sequence[Sequence[int]] | None = None,
        batch_size: int = 4096,
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        k = min(int(k), self.n_items)
        all_idx: list[NDArray[np.int64]] = []
        all_scores: list[NDArray[np.float32]] = []
        for start in range(0, histories.shape[0], batch_size):
            chunk = histories[start : start + batch_size]
            scores = self.score(chunk)  # (batch, n_items)
            with torch.inference_mode():
                if exclude_seen and chunk.nnz:
                    coo = sp.coo_array(chunk)
                    rows = torch.as_tensor(coo.row, dtype=torch.long, device=scores.device)
                    cols = torch.as_tensor(coo.col, dtype=torch.long, device=scores.device)
                    scores[rows, cols] = -torch.inf
                if exclude is not None:
                    for r, items in enumerate(exclude[start : start + batch_size]):
                        if len(items):
                            scores[r, torch.as_tensor(list(items), dtype=torch.long)] = -torch.inf
                idx = topk_indices(scores, k)  # (batch, k); -1 where nothing is eligible
                top = torch.gather(scores, 1, idx.clamp(min=0))
                top = top.masked_fill(idx < 0, -torch.inf)
            all_idx.append(idx.cpu().numpy().astype(np.int64))
            all_scores.append(top.cpu().numpy().astype(np.float32))
        if not all_idx:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return np.concatenate(all_idx), np.concatenate(all_scores)

    def _package(
        self,
        idx: NDArray[np.int64],
        scores: NDArray[np.float32],
        unknown: Sequence[tuple[Any, ...]] = (),
    ) -> Recommendations:
        return Recommendations(
            item_ids=self.item_ids[np.maximum(idx, 0)]
            if idx.size
            else np.empty(idx.shape, dtype=self.item_ids.dtype),
            scores=scores,
            item_idx=idx,
            unknown_items=tuple(unknown),
        )

    def recommend(
        self, user_ids: Sequence[Any], k: int = 20, *, exclude_seen: bool = True
    ) -> Recommendations:
        """Top-K items for training users, from their stored histories.

        Args:
            user_ids: External ids of users seen in training.
            k: Items per user (capped at the catalog size).
            exclude_seen: Leave out items in the user's history.

        Raises:
            UnknownUserError: a user id is not a training user.
            ValueError: ``k < 1``.
        """
        rows = np.asarray([self.vocab.user_index(u) for u in user_ids], dtype=np.int64)
        histories = self.train_matrix[rows]
        idx, scores = self._topk(histories, k, exclude_seen=exclude_seen)
        return self._package(idx, scores)

    def recommend_from_history(
        self,
        item_ids: Sequence[Any],
        k: int = 20,
        *,
        exclude_seen: bool = True,
        exclude: Sequence[Any] = (),
        weights: Sequence[float] | None = None,
    ) -> Recommendations:
        """Top-K for one (possibly new) user's history, folded in without retraining.

        Unknown item ids are ignored and reported in ``unknown_items``.
        """
        return self.recommend_histories(
            [item_ids],
            k,
            exclude_seen=exclude_seen,
            exclude=[exclude],
            weights=None if weights is None else [weights],
        )

    def recommend_histories(
        self,
        histories: Sequence[Sequence[Any]],
        k: int = 20,
        *,
        exclude_seen: bool = True,
        exclude: Sequence[Sequence[Any]] | None = None,
        weights: Sequence[Sequence[float] | None] | None = None,
    ) -> Recommendations:
        """Top-K for a batch of histories (lists of external item ids), scored as one batch."""
        matrix, unknown = self.histories_matrix(histories, weights)
        exclude_idx = None
        if exclude is not None:
            exclude_idx = [
                [i for i in (self.vocab.item_index(x) for x in items) if i is not None]
                for items in exclude
            ]
        idx, scores = self._topk(matrix, k, exclude_seen=exclude_seen, exclude=exclude_idx)
        return self._package(idx, scores, unknown)

    def user_history(self, user_id: Any) -> NDArray[Any]:
        """External item ids of a training user's history.

        Raises:
            UnknownUserError: not a training user.
        """
        return self.item_ids[self.vocab.history(self.vocab.user_index(user_id))]

    def has_user(self, user_id: Any) -> bool:
        try:
            self.vocab.user_index(user_id)
        except UnknownUserError:
            return False
        return True

    def item_popularity(self) -> NDArray[np.int64]:
        """Training interaction count per item."""
        return self.vocab.item_counts()

    # ------------------------------------------------------------------ bundle
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the bundle directory atomically (temp dir, then rename).

        Layout: ``config.json``, ``weights.pt`` (a state_dict), ``user_ids.json``,
        ``item_ids.json``, ``train_matrix.npz``, ``meta.json`` (format version, package version,
        creation time, metrics, data fingerprint, sha256 of every other file).

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        from recvae import __version__

        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"bundle path already exists: {target} (pass overwrite=True)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (tmp / "config.json").write_text(self.config.to_json())
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save(state, tmp / "weights.pt")
            _write_ids(tmp / "user_ids.json", self.user_ids)
            _write_ids(tmp / "item_ids.json", self.item_ids)
            sp.save_npz(tmp / "train_matrix.npz", sp.csr_matrix(self.train_matrix))
            checksums = {name: _sha256(tmp / name) for name in _BUNDLE_FILES}
            version = hashlib.sha256(
                "".join(checksums[n] for n in _BUNDLE_FILES).encode()
            ).hexdigest()[:12]
            meta = {
                **_jsonable(self.meta),
                "format_version": BUNDLE_FORMAT_VERSION,
                "package_version": __version__,
                "model": self.config.model,
                "n_items": self.n_items,
                "n_users": self.vocab.n_users,
                "created_at": self.meta.get("created_at")
                or datetime.now(UTC).isoformat(timespec="seconds"),
                "checksums": checksums,
                "model_version": version,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta.update({"model_version": version, "created_at": meta["created_at"]})
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> Recommender:
        """Load and verify a bundle written by :meth:`save`.

        Raises:
            BundleError: the path is not a bundle, a file is missing or altered (checksum),
                the format version is unknown, or the weights do not fit the config.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"no model bundle at {root} (expected a directory)")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise BundleError(f"{root} is not a recvae bundle: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
        fmt = meta.get("format_version")
        if fmt != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle {root} has format_version {fmt!r}; this recvae reads version "
                f"{BUNDLE_FORMAT_VERSION}"
            )
        checksums = meta.get("checksums") or {}
        for name in _BUNDLE_FILES:
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle {root} is incomplete: {name} is missing")
            if checksums.get(name) != _sha256(file):
                raise BundleError(f"bundle {root} is corrupted: checksum of {name} does not match")
        try:
            config = config_from_dict(json.loads((root / "config.json").read_text()))
            item_ids = _read_ids(root / "item_ids.json")
            user_ids = _read_ids(root / "user_ids.json")
            train_matrix = sp.csr_array(sp.load_npz(root / "train_matrix.npz"))
            state = torch.load(root / "weights.pt", map_location="cpu", weights_only=True)
            model = build_model(config, len(item_ids))
            model.load_state_dict(state)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"bundle {root} could not be loaded: {exc}") from exc
        rec = cls(model, config, item_ids, user_ids=user_ids, train_matrix=train_matrix, meta=meta)
        return rec.to(device)

    @staticmethod
    def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The bundle's ``meta.json`` without loading the model."""
        try:
            return dict(json.loads((Path(path) / "meta.json").read_text()))
        except FileNotFoundError:
            raise BundleError(f"{path} is not a recvae bundle: meta.json is missing") from None


def _dedupe_max(
    matrix: sp.csr_array,
    rows: NDArray[np.int64],
    cols: NDArray[np.int64],
    vals: NDArray[np.float32],
) -> sp.csr_array:
    if matrix.nnz == len(rows):
        return matrix
    order = np.lexsort((-vals, cols, rows))
    r, c, v = rows[order], cols[order], vals[order]
    first = np.ones(len(r), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    out = sp.csr_array((v[first], (r[first], c[first])), shape=matrix.shape, dtype=np.float32)
    out.sort_indices()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_ids(path: Path, ids: NDArray[Any]) -> None:
    kind = "str" if ids.dtype == object else "int"
    values = [str(v) for v in ids.tolist()] if kind == "str" else [int(v) for v in ids.tolist()]
    path.write_text(json.dumps({"kind": kind, "ids": values}))


def _read_ids(path: Path) -> NDArray[Any]:
    data = json.loads(path.read_text())
    if data.get("kind") == "str":
        return np.asarray(data["ids"], dtype=object)
    return np.asarray(data["ids"], dtype=np.int64)


def _jsonable(value: Any) -> Any:
    """Make metadata JSON-safe (numpy scalars/arrays, tuples, NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
