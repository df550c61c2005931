"""Mult-VAE and Mult-DAE (Liang, Krishnan, Hoffman and Jebara, WWW 2018). Pure math, no I/O.

Both models read a user's binary history ``x`` (``(batch, n_items)``), L2-normalize it, apply
dropout (the denoising), and decode a code to logits over all items; the multinomial
likelihood is ``softmax(logits)``. Mult-VAE's encoder outputs a Gaussian ``(mu, logvar)`` and
samples ``z = mu + sigma * eps`` in training (the reparameterization trick), ``z = mu`` in eval.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recvae.config import ModelConfig, MultDAEConfig, MultVAEConfig

__all__ = [
    "MultVAE",
    "MultDAE",
    "build_model",
    "elbo_loss",
    "elbo_terms",
    "multinomial_nll",
    "gaussian_kl",
    "l2_penalty",
    "MODEL_TYPES",
]

_ACTIVATIONS: dict[str, Any] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}


def _init_linear(layer: nn.Linear) -> None:
    # The paper's initialization: Glorot-uniform weights, biases ~ N(0, 0.001^2).
    nn.init.xavier_uniform_(layer.weight)
    nn.init.normal_(layer.bias, mean=0.0, std=0.001)


def _normalize(x: Tensor) -> Tensor:
    # Per-user L2 normalization of the history; an empty history stays all zeros.
    return F.normalize(x, p=2.0, dim=1)


class _Autoencoder(nn.Module):
    """Shared structure: normalized, dropped-out input -> code -> logits over items."""

    config: ModelConfig
    n_items: int
    variational: bool = False

    def decode(self, z: Tensor) -> Tensor:
        """Logits over all items for codes ``z`` (``(batch, latent)`` -> ``(batch, n_items)``)."""
        h = z
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = self._act(h)
        return h

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_embeddings(self) -> Tensor:
        """The decoder's output weights, one row per item (``(n_items, last_hidden)``)."""
        return self.decoder[-1].weight

    @property
    def latent_dim(self) -> int:
        return int(self.config.latent_dim)  # type: ignore[attr-defined]


class MultVAE(_Autoencoder):
    """The variational autoencoder of Liang et al. (2018).

    Architecture ``[n_items, *hidden_dims, latent_dim, *reversed(hidden_dims), n_items]``; the
    encoder's last layer outputs ``2 * latent_dim`` values, the mean and log-variance.

    Args:
        config: Hyperparameters.
        n_items: Size of the item vocabulary.
    """

    variational = True

    def __init__(self, config: MultVAEConfig, n_items: int) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.config = config
        self.n_items = n_items
        self._act = _ACTIVATIONS[config.activation]
        enc_dims = [n_items, *config.hidden_dims]
        self.encoder = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(enc_dims[:-1], enc_dims[1:], strict=True)]
        )
        self.encoder.append(nn.Linear(enc_dims[-1], 2 * config.latent_dim))
        dec_dims = [config.latent_dim, *reversed(config.hidden_dims), n_items]
        self.decoder = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(dec_dims[:-1], dec_dims[1:], strict=True)]
        )
        self.drop = nn.Dropout(config.dropout)
        for layer in [*self.encoder, *self.decoder]:
            _init_linear(layer)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters for histories ``x`` (``(batch, n_items)``).

        Returns:
            ``(mu, logvar)``, each ``(batch, latent_dim)``.
        """
        h = self.drop(_normalize(x))
        for layer in self.encoder[:-1]:
            h = self._act(layer(h))
        out = self.encoder[-1](h)  # (batch, 2 * latent)
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """``z = mu + exp(logvar / 2) * eps`` in training; ``mu`` in eval mode."""
        if not self.training:
            return mu
        eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (batch, n_items), mu (batch, latent), logvar (batch, latent))``."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class MultDAE(_Autoencoder):
    """The denoising autoencoder of Liang et al. (2018): ``[n_items, *hidden, latent, n_items]``.

    ``forward`` returns ``(logits, code, None)``: there is no posterior variance.
    """

    variational = False

    def __init__(self, config: MultDAEConfig, n_items: int) -> None:
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.config = config
        self.n_items = n_items
        self._act = _ACTIVATIONS[config.activation]
        enc_dims = [n_items, *config.hidden_dims, config.latent_dim]
        self.encoder = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(enc_dims[:-1], enc_dims[1:], strict=True)]
        )
        dec_dims = list(reversed(enc_dims))
        self.decoder = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(dec_dims[:-1], dec_dims[1:], strict=True)]
        )
        self.drop = nn.Dropout(config.dropout)
        for layer in [*self.encoder, *self.decoder]:
            _init_linear(layer)

    def encode(self, x: Tensor) -> tuple[Tensor, None]:
        """The code for histories ``x``: ``((batch, latent_dim), None)``."""
        h = self.drop(_normalize(x))
        for layer in self.encoder:
            h = self._act(layer(h))
        return h, None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, None]:
        code, _ = self.encode(x)
        return self.decode(code), code, None


MODEL_TYPES: dict[str, type[_Autoencoder]] = {"multvae": MultVAE, "multdae": MultDAE}


def build_model(config: ModelConfig, n_items: int) -> nn.Module:
    """Instantiate the model that ``config`` describes.

    Raises:
        ValueError: no model is registered for the config.
    """
    try:
        cls = MODEL_TYPES[config.model]
    except KeyError:
        raise ValueError(f"no model registered for config '{config.model}'") from None
    return cls(config, n_items)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- losses
def multinomial_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Mean negative multinomial log-likelihood ``-1/B sum_u sum_i x_ui log softmax(f_u)_i``."""
    return -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Mean KL to the standard normal: ``1/B sum_u 1/2 sum_d (exp(lv) + mu^2 - 1 - lv)``."""
    return 0.5 * (torch.exp(logvar) + mu.pow(2) - 1.0 - logvar).sum(dim=1).mean()


def elbo_terms(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """The two parts of the negative ELBO: ``(reconstruction NLL, KL)``, batch means."""
    return multinomial_nll(logits, x), gaussian_kl(mu, logvar)


def elbo_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """The beta-weighted negative ELBO that Mult-VAE minimizes.

    ``loss = 1/B sum_u [ -sum_i x_ui log softmax(f(z_u))_i
    + beta * KL(N(mu_u, diag(exp(logvar_u))) || N(0, I)) ]``

    Args:
        logits: ``(batch, n_items)`` decoder outputs.
        x: ``(batch, n_items)`` binary (or weighted) histories, unnormalized.
        mu: ``(batch, latent)`` posterior means.
        logvar: ``(batch, latent)`` posterior log-variances.
        beta: KL weight (annealed).

    Returns:
        A scalar tensor.
    """
    nll, kl = elbo_terms(logits, x, mu, logvar)
    return nll + beta * kl


def l2_penalty(model: nn.Module) -> Tensor:
    """``sum ||W||^2`` over the weight matrices (not biases), the paper's regularizer."""
    total: Tensor | None = None
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() == 2:
            term = param.pow(2).sum()
            total = term if total is None else total + term
    assert total is not None
    return total


def anneal_beta(step: int, *, beta_max: float, anneal_steps: float) -> float:
    """The paper's KL schedule ``min(beta_max, step / anneal_steps)``."""
    if anneal_steps <= 0 or math.isinf(anneal_steps):
        return beta_max
    return min(beta_max, step / anneal_steps)
