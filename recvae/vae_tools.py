"""What only a VAE gives: anomaly scores, posterior confidence and Thompson-style exploration.

Pure math on a model's ``encode``/``decode`` and on NumPy arrays; :class:`recvae.Recommender`
wraps these for external ids, batching and the reference distribution of its training users.

Definitions (one place, used by the library, the CLI and the API):

- **Anomaly score** of a history ``x`` (``x_i`` in {0, 1}, or non-negative weights) with
  ``n = sum_i x_i``::

      score(x) = ( -sum_i x_i log softmax(f(mu(x)))_i  +  KL(q(z|x) || N(0, I)) ) / n

  the negative ELBO with ``beta = 1`` (the true bound, not the annealed training loss), in nats
  per history item. The reconstruction term is evaluated at ``z = mu`` (the posterior mean) rather
  than averaged over posterior samples: it is deterministic, costs one decoder pass, is the
  same code the recommendations use, and the percentile compares it with training users scored
  by the same estimator, so its bias (``z = mu`` instead of ``E_q``) cancels in the ranking.
  Dividing by ``n`` makes long and short histories comparable: the multinomial term grows
  linearly with the number of items. For a model without a posterior (Mult-DAE) the KL term is 0
  and the score is the normalized reconstruction NLL. An empty history has no score (NaN).
- **Percentile** of a score: where it falls among reference histories *of similar length*
  (0 = below all of them, 100 = above all). Dividing by ``n`` does not make short histories
  comparable on its own: the KL term is a cost of 15 to 45 nats whatever the length, so per item
  it dominates a 1-item history, and the reconstruction of a short history is easier (its items
  are in the input). So the reference is stratified by length, in the bins of
  :data:`LENGTH_BIN_EDGES` (1, 2, 3-4, 5-8, ..., 257-512, 513+ items), and holds each reference
  user's full history plus one random sub-history (of a log-uniform length), so that short
  lengths are covered even though no training user has fewer than 5 items. A bin with fewer
  than :data:`MIN_BIN_HISTORIES` reference histories pools its neighbours. Each bin keeps
  :data:`N_QUANTILES` quantiles; the percentile interpolates linearly between them. The
  reference users are the training users (in-sample: the model was fitted to them, so new
  normal users score higher than them) or, after ``Recommender.calibrate_anomalies``,
  held-out users.
- **Confidence** of a posterior ``N(mu, diag(sigma^2))``: ``1 - mean_d min(sigma_d, 1)``. The
  prior has ``sigma_d = 1``: 0 means the posterior is as wide as the prior (the history told the
  model nothing), 1 a point mass. It is the posterior's own spread, in the units of the prior,
  and unlike the KL to the prior it does not grow when ``mu`` is merely far from 0.
- **Exploration**: rank from ``z = mu + temperature * sigma * eps``, ``eps ~ N(0, I)`` drawn from
  a CPU ``torch.Generator`` (the same seed gives the same draw on any device). Temperature 0 is
  exactly the deterministic ranking from ``z = mu``; 1 is a posterior sample (Thompson sampling).
- **Intra-list diversity** of a recommendation list: the mean pairwise cosine distance
  ``1 - cos(e_i, e_j)`` over pairs ``i < j`` of its items, in the decoder's item embedding space
  (the rows of the output layer's weight, ``model.item_embeddings()``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

if TYPE_CHECKING:
    from recvae.data.interactions import Interactions
    from recvae.recommender import Recommender

__all__ = [
    "AnomalyReference",
    "AnomalyScores",
    "LENGTH_BIN_EDGES",
    "MIN_BIN_HISTORIES",
    "N_QUANTILES",
    "length_bins",
    "reference_histories",
    "LatentModel",
    "as_latent_model",
    "align_to_vocabulary",
    "anomalous_users",
    "check_exploration",
    "intra_list_diversity",
    "make_generator",
    "negative_elbo_terms",
    "posterior_confidence",
    "sample_latent",
]

logger = logging.getLogger(__name__)

LENGTH_BIN_EDGES: tuple[int, ...] = (1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513)
"""Lower ends of the history-length bins of the anomaly reference (the last bin is open)."""
N_QUANTILES = 201
"""Quantiles kept per length bin (0%, 0.5%, ..., 100%)."""
MIN_BIN_HISTORIES = 50
"""A length bin with fewer reference histories than this pools its neighbouring bins."""


class LatentModel(Protocol):
    """What the functions here need of a model: Mult-VAE, Mult-DAE and RecVAE all fit."""

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mu (batch, latent), logvar (batch, latent) or None)`` for histories ``x``."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Logits ``(batch, n_items)`` for codes ``z``."""
        ...


def as_latent_model(model: nn.Module) -> LatentModel:
    """View a module as a :class:`LatentModel` (for the type checker; no conversion)."""
    return cast(LatentModel, model)


@dataclass(frozen=True)
class AnomalyScores:
    """Per-user anomaly scores of a batch of histories (see the module docstring).

    Attributes:
        scores: ``(n_users,)`` float64 negative ELBO per history item; NaN for an empty history.
        percentiles: ``(n_users,)`` float64 in [0, 100], where the score falls among the
            reference histories of a similar length (see :class:`AnomalyReference`); NaN for
            an empty history.
        history_lengths: ``(n_users,)`` int64 number of (known) items in each history.
        reconstruction: ``(n_users,)`` float64 reconstruction NLL at ``z = mu``, not normalized.
        kl: ``(n_users,)`` float64 KL of the posterior to ``N(0, I)``, not normalized (0 for a
            model without a posterior).
        unknown_items: For histories given as item ids, the ids the model did not know
            (dropped before scoring); empty for matrix input.
        reference: The population the percentiles compare with: ``"training"`` (the model's
            training users) or ``"held-out"`` (see ``Recommender.calibrate_anomalies``).
    """

    scores: NDArray[np.float64]
    percentiles: NDArray[np.float64]
    history_lengths: NDArray[np.int64]
    reconstruction: NDArray[np.float64]
    kl: NDArray[np.float64]
    unknown_items: tuple[tuple[Any, ...], ...] = field(default=())
    reference: str = "training"

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def most_unusual(self, n: int | None = None) -> NDArray[np.int64]:
        """Row positions, most unusual first: by percentile, then by score; NaN last.

        The percentile comes first because it compares each history with histories of its own
        length, which the raw score does not.

        Args:
            n: Return at most this many (all when None).

        Raises:
            ValueError: ``n`` is not an int >= 0.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0):
            raise ValueError(f"n must be an int >= 0 or None, got {n!r}")
        percentile = np.where(np.isnan(self.percentiles), -np.inf, self.percentiles)
        score = np.where(np.isnan(self.scores), -np.inf, self.scores)
        order = np.lexsort((-score, -percentile))  # last key is the primary one
        return order[: int(n)].astype(np.int64) if n is not None else order.astype(np.int64)


def _check_same_shape(scores: NDArray[Any], lengths: NDArray[np.integer[Any]]) -> None:
    if scores.shape != np.shape(lengths):
        raise ValueError(
            f"scores and lengths must have the same shape, got {scores.shape} and "
            f"{np.shape(lengths)}"
        )


def length_bins(lengths: NDArray[np.integer[Any]]) -> NDArray[np.int64]:
    """The :data:`LENGTH_BIN_EDGES` bin of each history length (-1 for an empty history)."""
    edges = np.asarray(LENGTH_BIN_EDGES)
    return (np.searchsorted(edges, np.asarray(lengths), side="right") - 1).astype(np.int64)


@dataclass(frozen=True)
class AnomalyReference:
    """Length-stratified quantiles of reference anomaly scores (see the module docstring).

    Attributes:
        source: ``"training"`` or ``"held-out"``.
        n_users: Reference users it was built from.
        quantiles: ``(n_bins, N_QUANTILES)`` non-decreasing score quantiles per length bin
            (after pooling sparse bins with their neighbours).
        counts: ``(n_bins,)`` reference histories that fell in each bin (before pooling).
        median_score: Median of all reference scores (for display).
    """

    source: str
    n_users: int
    quantiles: NDArray[np.float64]
    counts: NDArray[np.int64]
    median_score: float

    @classmethod
    def from_scores(
        cls,
        scores: NDArray[np.floating[Any]],
        lengths: NDArray[np.integer[Any]],
        *,
        source: str,
        n_users: int,
    ) -> AnomalyReference:
        """Build from reference histories' scores and lengths (NaN scores are ignored).

        Raises:
            ValueError: no finite score, or ``scores`` and ``lengths`` differ in shape.
        """
        scores = np.asarray(scores, dtype=np.float64)
        _check_same_shape(scores, lengths)
        bins = length_bins(lengths)
        keep = np.isfinite(scores) & (bins >= 0)
        scores, bins = scores[keep], bins[keep]
        if scores.size == 0:
            raise ValueError("the reference distribution is empty: no score to compare against")
        n_bins = len(LENGTH_BIN_EDGES)
        counts = np.bincount(bins, minlength=n_bins).astype(np.int64)
        levels = np.linspace(0.0, 1.0, N_QUANTILES)
        quantiles = np.empty((n_bins, N_QUANTILES), dtype=np.float64)
        for b in range(n_bins):
            lo = hi = b
            # Widen the window one bin each side until it holds enough histories.
            while counts[lo : hi + 1].sum() < min(MIN_BIN_HISTORIES, scores.size):
                lo, hi = max(lo - 1, 0), min(hi + 1, n_bins - 1)
            pooled = scores[(bins >= lo) & (bins <= hi)]
            quantiles[b] = np.quantile(pooled, levels)
        return cls(source, int(n_users), quantiles, counts, float(np.median(scores)))

    def percentiles(
        self, scores: NDArray[np.floating[Any]], lengths: NDArray[np.integer[Any]]
    ) -> NDArray[np.float64]:
        """Percentile (0-100) of each score among reference histories of its length bin.

        Linear between quantiles; 0 below the bin's minimum and 100 above its maximum.
        Non-decreasing in the score for a fixed length. NaN for a NaN score or length 0.

        Raises:
            ValueError: ``scores`` and ``lengths`` differ in shape.
        """
        scores = np.asarray(scores, dtype=np.float64)
        _check_same_shape(scores, lengths)
        bins = length_bins(lengths)
        out = np.full(scores.shape, np.nan)
        levels = np.linspace(0.0, 100.0, N_QUANTILES)
        for b in np.unique(bins[bins >= 0]):
            sel = (bins == b) & ~np.isnan(scores)
            out[sel] = np.interp(scores[sel], self.quantiles[b], levels)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for a bundle's ``meta.json``)."""
        return {
            "source": self.source,
            "n_users": self.n_users,
            "length_bin_edges": list(LENGTH_BIN_EDGES),
            "counts": [int(c) for c in self.counts],
            "median_score": self.median_score,
            "quantiles": [[float(f"{q:.6g}") for q in row] for row in self.quantiles],
        }

    @classmethod
    def from_dict(cls, data: Any) -> AnomalyReference:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: the dict is malformed (a missing key, an unknown ``source``, a negative
                ``n_users``, ``counts`` of the wrong shape or negative, a non-finite
                ``median_score``, or quantiles that are not a finite non-decreasing
                ``(n_bins, N_QUANTILES)`` array) or was made with other length bins.
        """
        try:
            if list(data["length_bin_edges"]) != list(LENGTH_BIN_EDGES):
                raise ValueError("its length bins differ from this version's")
            quantiles = np.asarray(data["quantiles"], dtype=np.float64)
            counts = np.asarray(data["counts"], dtype=np.int64)
            reference = cls(
                str(data["source"]),
                int(data["n_users"]),
                quantiles,
                counts,
                float(data["median_score"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the stored anomaly reference is malformed: {exc}") from exc
        problem = None
        if reference.source not in ("training", "held-out"):
            problem = f"source must be 'training' or 'held-out', got {reference.source!r}"
        elif reference.n_users < 0:
            problem = f"n_users must be >= 0, got {reference.n_users}"
        elif counts.shape != (len(LENGTH_BIN_EDGES),) or np.any(counts < 0):
            problem = (
                f"counts must be {len(LENGTH_BIN_EDGES)} non-negative ints, got shape "
                f"{counts.shape}"
            )
        elif not math.isfinite(reference.median_score):
            problem = f"median_score must be finite, got {reference.median_score}"
        if problem is not None:
            raise ValueError(f"the stored anomaly reference is malformed: {problem}")
        shape = (len(LENGTH_BIN_EDGES), N_QUANTILES)
        if (
            quantiles.shape != shape
            or not np.all(np.isfinite(quantiles))
            or np.any(np.diff(quantiles, axis=1) < 0)
        ):
            raise ValueError(
                f"the stored anomaly reference is malformed: quantiles must be a finite, "
                f"non-decreasing {shape} array"
            )
        return reference


def reference_histories(
    matrix: sp.csr_array, *, seed: int = 0, max_users: int = 20_000
) -> tuple[sp.csr_array, int]:
    """Reference histories: each user's full history plus one random sub-history.

    The sub-history of a user with ``L`` items has ``floor(exp(U(0, log(L + 1))))`` (clipped to
    ``[1, L]``) of them, drawn without replacement, so lengths are spread log-uniformly and short
    histories are represented. Users with an empty history are skipped; at most ``max_users``
    users are used (a seeded sample). Stored zeros are not history items and are dropped.

    Args:
        matrix: ``(n_users, n_items)`` histories (values are kept).
        seed: Seed of the sampling.
        max_users: Cap on the users used.

    Returns:
        ``(histories (2 * n_used, n_items), n_used)``: the full rows, then the sub-histories.
    """
    # Canonical rows (no explicit zeros, no duplicate entries): a stored zero is not a history
    # item, and would otherwise count towards the length and be drawn into the sub-history.
    matrix = sp.csr_array(matrix, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    rng = np.random.default_rng(seed)
    users = np.flatnonzero(np.diff(matrix.indptr) > 0)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    full = matrix[users]
    rows: list[NDArray[np.int64]] = []
    cols: list[NDArray[np.int32]] = []
    vals: list[NDArray[np.float32]] = []
    for r in range(full.shape[0]):
        start, end = full.indptr[r], full.indptr[r + 1]
        length = end - start
        n = int(np.clip(np.floor(np.exp(rng.uniform(0.0, np.log(length + 1)))), 1, length))
        pick = start + rng.choice(length, n, replace=False)
        rows.append(np.full(n, r, dtype=np.int64))
        cols.append(full.indices[pick])
        vals.append(full.data[pick].astype(np.float32))
    sub = sp.csr_array(
        (
            np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32),
            (
                np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
                np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64),
            ),
        ),
        shape=full.shape,
        dtype=np.float32,
    )
    return sp.csr_array(sp.vstack([full, sub]), dtype=np.float32), len(users)


def negative_elbo_terms(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-user parts of the negative ELBO (``beta = 1``) of histories ``x``.

    ``reconstruction_u = -sum_i x_ui log softmax(decode(mu_u))_i`` and
    ``kl_u = 1/2 sum_d (exp(logvar_ud) + mu_ud^2 - 1 - logvar_ud)`` (0 when the model has no
    posterior, i.e. ``encode`` returns ``logvar = None``). The caller sets eval mode and the
    grad context.

    Args:
        model: A model with ``encode(x) -> (mu, logvar | None)`` and ``decode(z) -> logits``.
        x: ``(batch, n_items)`` histories, unnormalized.

    Returns:
        ``(reconstruction, kl)``, each ``(batch,)`` float32.
    """
    latent_model = as_latent_model(model)
    mu, logvar = latent_model.encode(x)  # (batch, latent) each
    logits = latent_model.decode(mu).float()  # (batch, n_items)
    reconstruction = -(F.log_softmax(logits, dim=1) * x).sum(dim=1)  # (batch,)
    if logvar is None:
        kl = torch.zeros_like(reconstruction)
    else:
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (torch.exp(logvar) + mu.pow(2) - 1.0 - logvar).sum(dim=1)  # (batch,)
    return reconstruction, kl


def posterior_confidence(logvar: Tensor) -> Tensor:
    """Confidence ``1 - mean_d min(sigma_d, 1)`` of Gaussian posteriors, in [0, 1].

    Args:
        logvar: ``(batch, latent)`` posterior log-variances.

    Returns:
        ``(batch,)`` float32: 0 when the posterior is as wide as the ``N(0, I)`` prior (or wider),
        towards 1 as it narrows.
    """
    sigma = torch.exp(0.5 * logvar.float()).clamp(max=1.0)  # (batch, latent)
    return 1.0 - sigma.mean(dim=1)


def check_exploration(temperature: float, seed: int | None) -> None:
    """Validate exploration arguments.

    Raises:
        ValueError: ``temperature`` is not a finite number >= 0, or ``seed`` is not an int.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float | np.integer | np.floating)
        or not math.isfinite(float(temperature))
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if seed is not None:
        from recvae.config import _check_seed

        _check_seed(seed)  # an int in [0, 2**63): torch's generator takes no more


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed when None).

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**63)`` (a float or a bool is refused,
            not truncated).
    """
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        from recvae.config import _check_seed

        generator.manual_seed(_check_seed(seed))
    return generator


def sample_latent(
    mu: Tensor, logvar: Tensor, *, temperature: float, generator: torch.Generator
) -> Tensor:
    """A tempered posterior sample ``z = mu + temperature * exp(logvar / 2) * eps``.

    ``eps ~ N(0, I)`` is drawn on the CPU from ``generator`` and moved to ``mu``'s device, so a
    seed gives the same sample on every device. ``temperature == 0`` returns ``mu`` unchanged.

    Args:
        mu: ``(batch, latent)`` posterior means.
        logvar: ``(batch, latent)`` posterior log-variances.
        temperature: Scale of the posterior's standard deviation (>= 0).
        generator: CPU random generator (advanced by the draw).

    Returns:
        ``(batch, latent)`` latent codes.

    Raises:
        ValueError: ``temperature`` is not a finite number >= 0, or ``logvar`` does not have
            ``mu``'s shape.
    """
    check_exploration(temperature, None)
    if tuple(logvar.shape) != tuple(mu.shape):
        raise ValueError(
            f"mu and logvar must have the same shape, got {tuple(mu.shape)} and "
            f"{tuple(logvar.shape)}"
        )
    if temperature == 0:
        return mu
    eps = torch.randn(tuple(mu.shape), generator=generator, dtype=torch.float32)  # (batch, latent)
    eps = eps.to(device=mu.device, dtype=mu.dtype)
    return mu + float(temperature) * torch.exp(0.5 * logvar) * eps


def intra_list_diversity(
    topk_item_idx: NDArray[np.integer[Any]] | Tensor,
    item_embeddings: NDArray[np.floating[Any]] | Tensor,
) -> NDArray[np.float64]:
    """Per-list mean pairwise cosine distance of the recommended items' embeddings.

    ``ILD(L) = 2 / (|L| (|L| - 1)) * sum_{i < j in L} (1 - cos(e_i, e_j))``. Negative indices
    (padding) are ignored; a list with fewer than two items gives NaN. Items with a zero
    embedding count as orthogonal to every other item.

    Args:
        topk_item_idx: ``(n_users, k)`` item positions.
        item_embeddings: ``(n_items, dim)`` one embedding per item, e.g.
            ``model.item_embeddings()`` (the decoder's output weights).

    Returns:
        ``(n_users,)`` float64 values in [0, 2].

    Raises:
        ValueError: shapes are wrong or an index is out of range.
    """
    idx = (
        torch.as_tensor(
            np.asarray(topk_item_idx) if not isinstance(topk_item_idx, Tensor) else topk_item_idx
        )
        .long()
        .cpu()
    )
    emb = (
        torch.as_tensor(
            np.asarray(item_embeddings)
            if not isinstance(item_embeddings, Tensor)
            else item_embeddings
        )
        .detach()
        .double()
        .cpu()
    )
    if idx.dim() != 2 or emb.dim() != 2:
        raise ValueError(
            "topk_item_idx must be (n_users, k) and item_embeddings (n_items, dim), got "
            f"{tuple(idx.shape)} and {tuple(emb.shape)}"
        )
    if idx.numel() and int(idx.max()) >= emb.shape[0]:
        raise ValueError(f"item index {int(idx.max())} out of range for {emb.shape[0]} items")
    unit = F.normalize(emb, p=2.0, dim=1)  # (n_items, dim)
    valid = idx >= 0  # (n_users, k)
    vectors = unit[idx.clamp(min=0)] * valid.unsqueeze(-1)  # (n_users, k, dim)
    length = valid.sum(dim=1).double()  # (n_users,)
    # sum_{i != j} cos = ||sum_i e_i||^2 - sum_i ||e_i||^2 (unit rows; zero rows add nothing).
    total = vectors.sum(dim=1).pow(2).sum(dim=1)  # (n_users,)
    self_terms = vectors.pow(2).sum(dim=(1, 2))  # (n_users,)
    pairs = length * (length - 1)
    mean_cos = (total - self_terms) / pairs.clamp(min=1)
    out = torch.where(pairs > 0, 1.0 - mean_cos, torch.full_like(mean_cos, math.nan))
    return out.numpy().astype(np.float64)


def anomalous_users(
    recommender: Recommender,
    matrix: sp.csr_array | sp.csr_matrix | Interactions,
    percentile: float,
    *,
    reference: str = "training",
) -> NDArray[np.bool_]:
    """Which users are more unusual than ``percentile`` percent of the reference users.

    For the nightly job's ``exclude_anomalies_above_percentile``: score the training data with
    the current model and drop the flagged rows before training. The default reference is the
    model's training users, the right one when the rows are (mostly) users it was trained on;
    pass ``reference="held-out"`` (or ``"auto"``) for users it has not seen.

    Args:
        recommender: A trained model; its training users are the reference distribution.
        matrix: Histories to check: a CSR matrix over the recommender's item vocabulary, or an
            ``Interactions`` whose items are mapped onto that vocabulary by id (items the model
            does not know are dropped before scoring).
        percentile: Threshold in [0, 100]; a user is flagged when its percentile is strictly
            above it (100 flags no one).
        reference: ``"training"``, ``"held-out"`` or ``"auto"`` (see
            ``Recommender.anomaly_scores``).

    Returns:
        ``(n_users,)`` boolean mask, True for anomalous users. Users with an empty history (after
        dropping unknown items) cannot be scored and are never flagged.

    Raises:
        ValueError: ``percentile`` is outside [0, 100], the matrix does not fit the model, or
            the reference is unknown or missing.
    """
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, int | float | np.integer | np.floating)
        or not 0.0 <= float(percentile) <= 100.0
    ):
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    from recvae.data.interactions import Interactions

    if isinstance(matrix, Interactions):
        matrix = align_to_vocabulary(matrix, recommender)
    result = recommender.anomaly_scores(sp.csr_array(matrix), reference=reference)
    flagged = np.nan_to_num(result.percentiles, nan=-1.0) > float(percentile)
    logger.info(
        "%d of %d users above the %.4g-th anomaly percentile",
        int(flagged.sum()),
        len(flagged),
        float(percentile),
    )
    return flagged


def align_to_vocabulary(data: Interactions, recommender: Recommender) -> sp.csr_array:
    """``data``'s matrix with its columns re-indexed onto the recommender's items by item id.

    Items the model does not know are dropped (and counted in the log); rows stay in
    ``data``'s user order.

    Args:
        data: Interactions with any item vocabulary.
        recommender: The model whose item positions the columns take.

    Returns:
        ``(data.n_users, recommender.n_items)`` float32 CSR matrix.
    """
    positions = np.asarray(
        [
            -1 if (i := recommender.vocab.item_index(item)) is None else i
            for item in data.item_ids.tolist()
        ],
        dtype=np.int64,
    )
    known = np.flatnonzero(positions >= 0)
    if len(known) == 0 and data.n_items and recommender.n_items:
        given = "str" if data.item_ids.dtype == object else "int"
        expected = "str" if recommender.item_ids.dtype == object else "int"
        if given != expected:
            raise ValueError(
                f"the data's item ids are {given} but the model's are {expected}: no item is "
                f"known to the model (convert the ids with {expected}(...) first)"
            )
        logger.warning("none of the %d item(s) is known to the model", data.n_items)
    elif len(known) < data.n_items:
        logger.info("%d item(s) unknown to the model dropped", data.n_items - len(known))
    coo = sp.coo_array(data.matrix[:, known])
    return sp.csr_array(
        (coo.data.astype(np.float32), (coo.row, positions[known][coo.col])),
        shape=(data.n_users, recommender.n_items),
        dtype=np.float32,
    )
