"""RecVAE (Shenbin, Alekseev, Tutubalina, Malykh and Nikolenko, WSDM 2020).

"RecVAE: a New Variational Autoencoder for Top-N Recommendations with Implicit Feedback",
https://doi.org/10.1145/3336191.3371831. RecVAE keeps Mult-VAE's multinomial likelihood and
strong-generalization setting and changes four things, all implemented here:

1. **A deeper encoder.** Five dense layers of ``hidden_dim`` units; layer ``l`` computes
   ``h_l = LayerNorm(swish(W_l h_{l-1} + b_l + sum_{j<l} h_j))`` (dense, DenseNet-style
   connections: every earlier output is added before the activation), with
   ``swish(a) = a * sigmoid(a)``. The input is the L2-normalized history with dropout; the last
   layer feeds two linear heads, the posterior mean and log-variance. The decoder is a single
   linear layer ``z -> logits`` over all items.
2. **A composite prior.** ``p(z | x) = a_1 N(z; 0, I) + a_2 q_old(z | x) + a_3 N(z; 0, e^{c} I)``:
   the standard normal, the posterior of the *previous epoch's* encoder (a frozen copy, run
   without dropout) and a broad normal (``c = 10``), with weights ``(0.15, 0.75, 0.10)``. It keeps
   the encoder from drifting far from where it was (a trust-region-like regularizer). Following
   the published experiments the mixture is taken per latent coordinate
   (``prior_mixture="per_dim"``); ``"joint"`` mixes the full-dimensional densities as the
   paper's formula writes it.
3. **A per-user KL weight.** ``beta_u = gamma * |X_u|``, proportional to the number of items in
   the user's history, instead of one annealed ``beta``.
4. **Alternating training.** Each epoch runs ``encoder_epochs`` passes that update only the
   encoder (with input dropout), then copies the encoder into the prior, then runs
   ``decoder_epochs`` passes that update only the decoder (encoder fixed, no input dropout).
   Each half has its own Adam optimizer. Before the first epoch the prior holds a copy of the
   freshly initialized encoder.

The loss minimized per batch is the negative ELBO with a single-sample Monte-Carlo KL
(the composite prior has no closed-form KL)::

    loss = 1/B sum_u [ -sum_i x_ui log softmax(W z_u + b)_i
                       + gamma |X_u| (log q(z_u | x_u) - log p(z_u | x_u)) ],
    z_u = mu_u + sigma_u * eps.

This module registers the model under the name ``"recvae"``: its config with
:func:`recvae.config.register_config`, the module in :data:`recvae.model.MODEL_TYPES` and the
trainer in :data:`recvae.training.TRAINER_TYPES`, so ``build_model``, ``train`` and
``Recommender.load`` work on RecVAE configs and bundles like on the others.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recvae.config import ModelConfig, register_config
from recvae.data.interactions import Interactions
from recvae.model import MODEL_TYPES, OutputLinear, l2_penalty
from recvae.training import (
    CheckpointMismatchError,
    EpochCallback,
    Trainer,
    register_trainer,
)

__all__ = [
    "RecVAEConfig",
    "RecVAE",
    "RecVAEEncoder",
    "ItemInput",
    "CompositePrior",
    "RecVAETrainer",
    "gaussian_log_density",
    "composite_log_prior",
    "per_user_beta",
    "multinomial_nll_per_user",
    "recvae_loss",
]

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field '{name}': {message}")


def _init_linear(layer: nn.Linear) -> None:
    # Glorot-uniform weights and small normal biases, as for Mult-VAE in recvae.model.
    nn.init.xavier_uniform_(layer.weight)
    nn.init.normal_(layer.bias, mean=0.0, std=0.001)


# ---------------------------------------------------------------------------- config
@register_config
@dataclass(frozen=True, slots=True)
class RecVAEConfig(ModelConfig):
    """RecVAE hyperparameters; the defaults are the paper's (ML-20M, Netflix, MSD).

    One ``epoch`` is ``encoder_epochs`` encoder passes plus ``decoder_epochs`` decoder passes over
    the training users (the paper trains 50 such epochs). ``dropout`` is the input dropout of the
    encoder passes; decoder passes use none. ``weight_decay`` adds ``lambda * sum ||W||^2`` over
    the weight matrices of the half being updated (0 in the paper).
    """

    model: ClassVar[str] = "recvae"

    epochs: int = 50  # alternation rounds (each = encoder_epochs + decoder_epochs passes)
    learning_rate: float = 5e-4  # Adam step size, both optimizers
    hidden_dim: int = 600  # width of every encoder layer
    latent_dim: int = 200  # size of z
    n_layers: int = 5  # dense encoder layers
    gamma: float = 0.005  # per-user KL weight: beta_u = gamma * |history_u|
    prior_weights: tuple[float, ...] = (0.15, 0.75, 0.10)  # N(0,I), old posterior, broad normal
    prior_broad_logvar: float = 10.0  # log-variance of the broad component
    prior_mixture: Literal["per_dim", "joint"] = "per_dim"  # mix per coordinate or jointly
    encoder_epochs: int = 3  # encoder passes per epoch
    decoder_epochs: int = 1  # decoder passes per epoch
    layer_norm_eps: float = 0.1  # LayerNorm epsilon (large, as in the published experiments)

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        _check(
            isinstance(self.hidden_dim, int) and self.hidden_dim >= 1, "hidden_dim", "must be >= 1"
        )
        _check(
            isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim", "must be >= 1"
        )
        _check(isinstance(self.n_layers, int) and self.n_layers >= 1, "n_layers", "must be >= 1")
        _check(math.isfinite(self.gamma) and self.gamma >= 0, "gamma", "must be finite and >= 0")
        _check(len(self.prior_weights) == 3, "prior_weights", "needs three weights")
        _check(
            all(math.isfinite(w) and w >= 0 for w in self.prior_weights)
            and math.isclose(sum(self.prior_weights), 1.0, abs_tol=1e-6),
            "prior_weights",
            "must be >= 0 and sum to 1",
        )
        _check(
            self.prior_weights[0] > 0 or self.prior_weights[2] > 0,
            "prior_weights",
            "the standard or broad normal needs a positive weight (else the prior can collapse)",
        )
        _check(
            math.isfinite(self.prior_broad_logvar) and -10.0 <= self.prior_broad_logvar <= 30.0,
            "prior_broad_logvar",
            "must be in [-10, 30]",
        )
        _check(
            self.prior_mixture in ("per_dim", "joint"),
            "prior_mixture",
            "must be 'per_dim' or 'joint'",
        )
        _check(
            isinstance(self.encoder_epochs, int) and self.encoder_epochs >= 1,
            "encoder_epochs",
            "must be an int >= 1",
        )
        _check(
            isinstance(self.decoder_epochs, int) and self.decoder_epochs >= 1,
            "decoder_epochs",
            "must be an int >= 1",
        )
        _check(0 < self.layer_norm_eps <= 1.0, "layer_norm_eps", "must be in (0, 1]")


# ---------------------------------------------------------------------------- densities
def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise log-density of a diagonal Gaussian.

    ``log N(z; mu, e^{logvar}) = -1/2 (log 2 pi + logvar + (z - mu)^2 / e^{logvar})``.

    Args:
        z: ``(batch, latent)`` points.
        mu: Means, broadcastable to ``z``.
        logvar: Log-variances, broadcastable to ``z``.

    Returns:
        ``(batch, latent)`` log-densities, one per coordinate (sum over the last axis for the
        density of the vector).
    """
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def composite_log_prior(
    z: Tensor,
    old_mu: Tensor,
    old_logvar: Tensor,
    *,
    weights: tuple[float, ...] = (0.15, 0.75, 0.10),
    broad_logvar: float = 10.0,
    mixture: Literal["per_dim", "joint"] = "per_dim",
) -> Tensor:
    """Log-density of RecVAE's composite prior at ``z``, one value per user.

    ``p(z | x) = w_1 N(z; 0, I) + w_2 N(z; old_mu, e^{old_logvar}) + w_3 N(z; 0, e^{c} I)``
    with ``c = broad_logvar``. With ``mixture="per_dim"`` the mixture is formed for every
    coordinate separately and the coordinates are independent:
    ``log p(z) = sum_d log sum_k w_k N_k(z_d)``. With ``"joint"`` the mixture is over the whole
    vector: ``log p(z) = log sum_k w_k prod_d N_k(z_d)``. Computed with ``logsumexp``; a zero
    weight drops its component.

    Args:
        z: ``(batch, latent)`` samples.
        old_mu: ``(batch, latent)`` means of the previous epoch's posterior for these users.
        old_logvar: ``(batch, latent)`` its log-variances.
        weights: Mixture weights ``(standard, old posterior, broad)``, summing to 1.
        broad_logvar: Log-variance ``c`` of the broad component.
        mixture: ``"per_dim"`` or ``"joint"``.

    Returns:
        ``(batch,)`` log-densities.

    Raises:
        ValueError: ``mixture`` is unknown or ``weights`` does not have three entries.
    """
    if len(weights) != 3:
        raise ValueError(f"weights must have three entries, got {len(weights)}")
    zeros = torch.zeros((), dtype=z.dtype, device=z.device)
    components = (
        gaussian_log_density(z, zeros, zeros),
        gaussian_log_density(z, old_mu, old_logvar),
        gaussian_log_density(
            z, zeros, torch.full((), broad_logvar, dtype=z.dtype, device=z.device)
        ),
    )  # each (batch, latent)
    kept = [(c, math.log(w)) for c, w in zip(components, weights, strict=True) if w > 0]
    if mixture == "per_dim":
        stacked = torch.stack([c + log_w for c, log_w in kept], dim=-1)  # (batch, latent, k)
        return torch.logsumexp(stacked, dim=-1).sum(dim=-1)
    if mixture == "joint":
        stacked = torch.stack([c.sum(dim=-1) + log_w for c, log_w in kept], dim=-1)  # (batch, k)
        return torch.logsumexp(stacked, dim=-1)
    raise ValueError(f"mixture must be 'per_dim' or 'joint', got {mixture!r}")


def _csr_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(row of each nonzero, column, value, nonzeros per row)`` of a torch sparse tensor."""
    csr = x.to_sparse_csr() if x.layout == torch.sparse_coo else x
    counts = csr.crow_indices().diff()
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    return rows, csr.col_indices(), csr.values(), counts


def per_user_beta(x: Tensor, gamma: float) -> Tensor:
    """RecVAE's KL weight per user: ``beta_u = gamma * |X_u|``.

    Args:
        x: ``(batch, n_items)`` histories, dense or torch sparse (COO/CSR); ``|X_u|`` counts the
            nonzero entries of row ``u`` (the stored entries of a sparse row).
        gamma: The scale.

    Returns:
        ``(batch,)`` weights (float32 for a sparse ``x``, else the dtype of ``x``).
    """
    if _is_sparse(x):
        return gamma * _csr_parts(x)[3].to(torch.float32)
    return gamma * (x != 0).sum(dim=1).to(x.dtype)


def multinomial_nll_per_user(logits: Tensor, x: Tensor) -> Tensor:
    """``-sum_i x_ui log softmax(logits_u)_i`` per user, ``(batch,)``; ``x`` dense or sparse.

    A sparse ``x`` reads the log-probabilities of its stored entries only, which saves the
    dense product on a large catalog.
    """
    log_probs = F.log_softmax(logits, dim=1)  # (batch, n_items)
    if not _is_sparse(x):
        return -(log_probs * x).sum(dim=1)
    rows, cols, values, _ = _csr_parts(x)
    picked = values.to(log_probs.dtype) * log_probs[rows, cols]  # (nnz,)
    total = torch.zeros(logits.shape[0], dtype=log_probs.dtype, device=logits.device)
    return -total.index_add(0, rows, picked)


def recvae_loss(
    logits: Tensor,
    x: Tensor,
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    log_prior: Tensor,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """RecVAE's negative ELBO with the per-user KL weight and a one-sample KL estimate.

    ``loss = 1/B sum_u [ -sum_i x_ui log softmax(logits_u)_i
    + gamma |X_u| (sum_d log N(z_ud; mu_ud, e^{logvar_ud}) - log p(z_u | x_u)) ]``

    Args:
        logits: ``(batch, n_items)`` decoder outputs for ``z``.
        x: ``(batch, n_items)`` histories (unnormalized), dense or torch sparse (COO/CSR).
        z: ``(batch, latent)`` the sample the logits were decoded from.
        mu: ``(batch, latent)`` posterior means.
        logvar: ``(batch, latent)`` posterior log-variances.
        log_prior: ``(batch,)`` ``log p(z_u | x_u)`` (see :func:`composite_log_prior`).
        gamma: Per-user KL scale.

    Returns:
        ``(loss, nll, kl)``: the scalar loss and the batch means of the reconstruction term and
        of the (unweighted) KL estimate.
    """
    nll = multinomial_nll_per_user(logits, x)  # (batch,)
    kl = gaussian_log_density(z, mu, logvar).sum(dim=1) - log_prior  # (batch,)
    loss = (nll + per_user_beta(x, gamma).to(nll.dtype) * kl).mean()
    return loss, nll.mean(), kl.mean()


# ---------------------------------------------------------------------------- model
def _is_sparse(x: Tensor) -> bool:
    return x.layout in (torch.sparse_coo, torch.sparse_csr)


class ItemInput(nn.Module):
    """The first layer, ``x @ W + b`` with ``W`` stored item-major (``(n_items, hidden)``).

    Item-major rows make the sparse path (a weighted sum of the rows of the history's items,
    ``embedding_bag``) read contiguous memory; the dense path is a plain matrix product.

    Args:
        n_items: Number of items (rows of ``W``).
        hidden_dim: Output width.
    """

    def __init__(self, n_items: int, hidden_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_items, hidden_dim))
        self.bias = nn.Parameter(torch.empty(hidden_dim))
        nn.init.xavier_uniform_(self.weight)
        nn.init.normal_(self.bias, mean=0.0, std=0.001)

    def forward(self, x: Tensor, *, dropout: float = 0.0) -> Tensor:
        """``dropout(x / ||x||_2) @ W + b`` for a dense or torch sparse (COO/CSR) ``x``.

        The norm is taken after dividing each row by its largest absolute value, so weights
        whose squares overflow float32 (above about 1.8e19) still give the right direction.

        Args:
            x: ``(batch, n_items)`` histories.
            dropout: Input dropout probability (0 for none).

        Returns:
            ``(batch, hidden_dim)``.
        """
        if not _is_sparse(x):
            # Dividing by the row's largest |x_ui| first changes nothing mathematically (and
            # nothing at all for a binary row) but keeps the squares of large weights finite:
            # F.normalize alone turns a row of 1e20 weights into an all-zero (empty) history.
            peak = x.abs().amax(dim=1, keepdim=True)  # (batch, 1)
            x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
            h = F.dropout(F.normalize(x, p=2.0, dim=1), p=dropout, training=dropout > 0)
            return torch.addmm(self.bias, h, self.weight)  # (batch, hidden)
        # Sparse path (training on large catalogs): only the nonzeros are touched.
        rows, cols, values, counts = _csr_parts(x)
        values = values.to(self.weight.dtype)  # (nnz,)
        peaks = torch.zeros(counts.numel(), dtype=values.dtype, device=x.device)
        peaks = peaks.scatter_reduce(0, rows, values.abs(), reduce="amax")  # (batch,)
        values = values / torch.where(peaks > 0, peaks, torch.ones_like(peaks))[rows]
        norms = torch.zeros(counts.numel(), dtype=values.dtype, device=x.device)
        norms = norms.index_add(0, rows, values.pow(2)).sqrt().clamp_min(1e-12)  # (batch,)
        values = F.dropout(values / norms[rows], p=dropout, training=dropout > 0)
        offsets = torch.cumsum(counts, 0) - counts  # start of each row
        h = F.embedding_bag(
            cols, self.weight, offsets, mode="sum", per_sample_weights=values
        )  # (batch, hidden)
        return h + self.bias


class RecVAEEncoder(nn.Module):
    """The deep encoder: normalized, dropped-out history -> ``(mu, logvar)``.

    Args:
        n_items: Input size.
        config: Sizes, depth, dropout and LayerNorm epsilon.
    """

    def __init__(self, n_items: int, config: RecVAEConfig) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.input = ItemInput(n_items, config.hidden_dim)
        self.layers = nn.ModuleList(
            [nn.Linear(config.hidden_dim, config.hidden_dim) for _ in range(config.n_layers - 1)]
        )
        self.norms = nn.ModuleList(
            [
                nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
                for _ in range(config.n_layers)
            ]
        )
        self.mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.logvar = nn.Linear(config.hidden_dim, config.latent_dim)
        for layer in [*self.layers, self.mu, self.logvar]:
            _init_linear(layer)

    def forward(self, x: Tensor, *, dropout: bool = True) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``(batch, latent_dim)``.

        Args:
            x: ``(batch, n_items)`` histories, dense or a torch sparse COO/CSR tensor.
            dropout: Apply the input dropout (only ever in training mode).
        """
        p = self.dropout if (dropout and self.training) else 0.0
        h = self.norms[0](F.silu(self.input(x, dropout=p)))  # (batch, hidden)
        running_sum = h
        for layer, norm in zip(self.layers, self.norms[1:], strict=True):
            # Dense connections: every earlier layer's output joins before the activation;
            # swish(a) = a * sigmoid(a).
            h = norm(F.silu(layer(h) + running_sum))  # (batch, hidden)
            running_sum = running_sum + h
        return self.mu(h), self.logvar(h)


class RecVAE(nn.Module):
    """RecVAE's encoder and decoder (the composite prior lives in the trainer).

    ``forward(x)`` returns ``(logits (batch, n_items), mu (batch, latent), logvar (batch,
    latent))``; in training mode ``z = mu + sigma * eps``, in eval mode ``z = mu``.

    Args:
        config: Hyperparameters.
        n_items: Size of the item vocabulary.

    Raises:
        ValueError: ``n_items < 1``.
    """

    variational = True

    def __init__(self, config: RecVAEConfig, n_items: int) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.config = config
        self.n_items = n_items
        self.encoder = RecVAEEncoder(n_items, config)
        self.decoder = OutputLinear(config.latent_dim, n_items)
        _init_linear(self.decoder)

    @property
    def latent_dim(self) -> int:
        return int(self.config.latent_dim)

    def encode(self, x: Tensor, *, dropout: bool = True) -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)`` of histories ``x`` (dense or torch sparse), each
        ``(batch, latent_dim)``; ``dropout=False`` skips the input dropout in training mode."""
        return cast(tuple[Tensor, Tensor], self.encoder(x, dropout=dropout))

    def decode(self, z: Tensor) -> Tensor:
        """Logits over all items (``(batch, latent)`` -> ``(batch, n_items)``)."""
        return cast(Tensor, self.decoder(z))  # (batch, n_items)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """``z = mu + exp(logvar / 2) * eps`` in training; ``mu`` in eval mode."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    def item_embeddings(self) -> Tensor:
        """The decoder's weights, one row per item (``(n_items, latent_dim)``)."""
        return self.decoder.weight


class CompositePrior(nn.Module):
    """The composite prior with its frozen copy of the encoder (the previous epoch's posterior).

    Args:
        encoder: The encoder to copy (now and at every :meth:`update`).
        config: Mixture weights, broad log-variance and mixture kind.
    """

    def __init__(self, encoder: RecVAEEncoder, config: RecVAEConfig) -> None:
        super().__init__()
        self.weights = tuple(float(w) for w in config.prior_weights)
        self.broad_logvar = float(config.prior_broad_logvar)
        self.mixture: Literal["per_dim", "joint"] = config.prior_mixture
        self.encoder = copy.deepcopy(encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> CompositePrior:
        # The old posterior is always evaluated without dropout.
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def update(self, encoder: RecVAEEncoder) -> None:
        """Copy ``encoder``'s current weights into the prior."""
        self.encoder.load_state_dict(encoder.state_dict())

    def log_prob(self, z: Tensor, x: Tensor) -> Tensor:
        """``log p(z | x)``, ``(batch,)``, for samples ``z`` of the users with histories ``x``."""
        with torch.no_grad():
            old_mu, old_logvar = self.encoder(x, dropout=False)
        return composite_log_prior(
            z,
            old_mu,
            old_logvar,
            weights=self.weights,
            broad_logvar=self.broad_logvar,
            mixture=self.mixture,
        )


# ---------------------------------------------------------------------------- training
def _sparse_batch(matrix: sp.csr_array, rows: np.ndarray, device: torch.device) -> Tensor:
    # A torch CSR view of the batch rows: the encoder's first layer touches only the nonzeros.
    sub = sp.csr_array(matrix[rows])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(sub.indptr.astype(np.int64)),
            torch.from_numpy(sub.indices.astype(np.int64)),
            torch.from_numpy(np.asarray(sub.data, dtype=np.float32)),
            size=sub.shape,
            device=device,
            check_invariants=False,  # scipy's CSR rows are already valid
        )


@register_trainer("recvae")
class RecVAETrainer(Trainer):
    """Trains RecVAE: alternating encoder and decoder passes under the composite prior.

    Same arguments, checkpointing, validation and early stopping as :class:`Trainer`; the
    checkpoint also holds the decoder's optimizer and the prior's encoder, so a resumed run
    continues exactly as an uninterrupted one. ``self.optimizer`` is the encoder's optimizer.

    Args:
        data: Training users.
        config: A :class:`RecVAEConfig`.
        validation: Held-out users for model selection.
        options: Device, threads, checkpoint directory.
        on_epoch: Telemetry hook.

    Raises:
        TypeError: ``config`` is not a :class:`RecVAEConfig`.
    """

    def __init__(
        self,
        data: Interactions,
        config: ModelConfig,
        *,
        validation: Any = None,
        options: Any = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        if not isinstance(config, RecVAEConfig):
            raise TypeError(f"RecVAETrainer needs a RecVAEConfig, got {type(config).__name__}")
        super().__init__(data, config, validation=validation, options=options, on_epoch=on_epoch)
        self.config: RecVAEConfig = config
        model = self.model
        assert isinstance(model, RecVAE)
        self.recvae: RecVAE = model
        lr = config.learning_rate
        # The fused kernel: one pass over each parameter per step instead of ~10 (the input
        # layer has n_items * hidden_dim parameters); the same Adam update.
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(model.encoder.parameters(), lr=lr, fused=fused)
        self.decoder_optimizer = torch.optim.Adam(model.decoder.parameters(), lr=lr, fused=fused)
        self.prior = CompositePrior(model.encoder, config).to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_payload(self) -> dict[str, Any]:
        payload = super()._checkpoint_payload()
        payload["decoder_optimizer"] = self.decoder_optimizer.state_dict()
        payload["prior_encoder"] = self.prior.encoder.state_dict()
        return payload

    def try_resume(self) -> bool:
        """Restore model, both optimizers, the prior and the loop state from the checkpoint.

        Raises:
            CheckpointMismatchError: another run's checkpoint, or one without RecVAE's parts.
        """
        if not super().try_resume():
            return False
        assert self.checkpoint_path is not None
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if "decoder_optimizer" not in ckpt or "prior_encoder" not in ckpt:
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoint_path} lacks RecVAE's decoder optimizer or prior; "
                "remove it or use another checkpoint directory"
            )
        self.decoder_optimizer.load_state_dict(ckpt["decoder_optimizer"])
        self.prior.encoder.load_state_dict(ckpt["prior_encoder"])
        return True

    # ------------------------------------------------------------------ loop
    def _pass(
        self, epoch: int, phase: Literal["encoder", "decoder"], index: int
    ) -> dict[str, float]:
        """One pass over the training users updating one half of the model."""
        cfg = self.config
        model = self.recvae
        model.train()
        encoder_phase = phase == "encoder"
        model.encoder.requires_grad_(encoder_phase)
        model.decoder.requires_grad_(not encoder_phase)
        optimizer = self.optimizer if encoder_phase else self.decoder_optimizer
        half = model.encoder if encoder_phase else model.decoder
        matrix = self.data.matrix
        perm = np.random.default_rng(
            [cfg.seed, epoch, 0 if encoder_phase else 1, index]
        ).permutation(self.data.n_users)
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "beta": 0.0}
        for b in range(self.steps_per_epoch):
            rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            # The batch stays sparse: the input layer, the likelihood and |X_u| read only the
            # history's items (a dense (batch, n_items) copy would cost more than they do).
            x = _sparse_batch(matrix, rows, self.device)  # (batch, n_items), CSR
            if encoder_phase:
                mu, logvar = model.encode(x, dropout=True)
                z = model.reparameterize(mu, logvar)
                log_prior = self.prior.log_prob(z, x)  # (batch,)
                loss, nll, kl = recvae_loss(model.decode(z), x, z, mu, logvar, log_prior, cfg.gamma)
            else:
                # The KL term does not depend on the decoder: only the likelihood is needed.
                with torch.no_grad():
                    mu, logvar = model.encode(x, dropout=False)
                    z = model.reparameterize(mu, logvar)
                nll = multinomial_nll_per_user(model.decode(z), x).mean()
                loss, kl = nll, torch.zeros((), device=self.device)
            if cfg.weight_decay > 0:
                loss = loss + cfg.weight_decay * l2_penalty(half)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            optimizer.step()
            self.state.step += 1
            n = len(rows)
            totals["loss"] += float(loss.detach()) * n
            totals["nll"] += float(nll.detach()) * n
            totals["kl"] += float(kl.detach()) * n
            totals["beta"] += float(per_user_beta(x, cfg.gamma).sum())
        model.encoder.requires_grad_(True)
        model.decoder.requires_grad_(True)
        return {k: v / self.data.n_users for k, v in totals.items()}

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        start = time.perf_counter()
        encoder_metrics: dict[str, float] = {}
        for i in range(cfg.encoder_epochs):
            encoder_metrics = self._pass(epoch, "encoder", i)
        # The prior's old posterior becomes this epoch's encoder (before the decoder passes,
        # which do not change the encoder).
        self.prior.update(self.recvae.encoder)
        decoder_nll = math.nan
        for i in range(cfg.decoder_epochs):
            decoder_nll = self._pass(epoch, "decoder", i)["nll"]
        seconds = time.perf_counter() - start
        passes = cfg.encoder_epochs + cfg.decoder_epochs
        return {
            "loss": encoder_metrics["loss"],
            "nll": encoder_metrics["nll"],
            "kl": encoder_metrics["kl"],
            "beta": encoder_metrics["beta"],  # mean per-user KL weight
            "decoder_nll": decoder_nll,
            "epoch_seconds": seconds,
            "users_per_second": passes * self.data.n_users / seconds,
        }


def _register_model(name: str, cls: type[nn.Module]) -> None:
    """Make ``recvae.model.build_model`` (and so ``Recommender.load``) build ``cls``."""
    MODEL_TYPES[name] = cls  # type: ignore[assignment]


_register_model(RecVAEConfig.model, RecVAE)
