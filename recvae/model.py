"""Mult-VAE and Mult-DAE (Liang, Krishnan, Hoffman and Jebara, WWW 2018). Pure math, no I/O.

Both models read a user's binary history ``x`` (``(batch, n_items)``), L2-normalize it, apply
dropout (the denoising), and decode a code to logits over all items; the multinomial
likelihood is ``softmax(logits)``. Mult-VAE's encoder outputs a Gaussian ``(mu, logvar)`` and
samples ``z = mu + sigma * eps`` in training (the reparameterization trick), ``z = mu`` in eval.

Both also accept a :class:`SparseBatch` (the histories in CSR form) wherever they accept a dense
``x``. The first layer of a normalized history is then a weighted sum of weight columns (an
embedding bag over the nonzeros), and :func:`sparse_multinomial_nll` needs only the logits at the
user's items, so no ``(batch, n_items)`` input or target is ever built. The first layer's weight
is stored item-major for that path (``item_weight``, ``(n_items, hidden)``); its ``weight``,
``state_dict`` keys and values are those of a plain ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recvae import cpu_runtime
from recvae.config import ModelConfig, MultDAEConfig, MultVAEConfig

__all__ = [
    "MultVAE",
    "MultDAE",
    "SparseBatch",
    "sparse_multinomial_nll",
    "padded_output",
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
    # The paper's initialization: Glorot-uniform weights, biases ~ N(0, 0.001^2) (the authors'
    # notebook truncates that normal at 2 std; drawing untruncated changes ~5% of the biases
    # by under 0.002, and keeps every trained result of a seed as published).
    nn.init.xavier_uniform_(layer.weight)
    nn.init.normal_(layer.bias, mean=0.0, std=0.001)


class _ItemMajorLinear(nn.Module):
    """``nn.Linear(n_items, out_features)`` with its weight stored item-major.

    ``weight`` (``(out_features, n_items)``), ``bias``, the ``state_dict`` keys and ``forward`` are
    those of ``nn.Linear``; the parameter itself is ``item_weight = weight.T``, contiguous, so the
    sparse input path gathers item rows, its gradient is a row scatter, and a fused optimizer
    updates it in place (a fused kernel copies non-contiguous tensors). State dicts of a plain
    ``nn.Linear`` load into it and its state dicts load into one.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.item_weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.register_state_dict_post_hook(self._to_linear_keys)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(self._from_linear_keys)  # type: ignore[no-untyped-call]

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> _ItemMajorLinear:
        """The same layer (same values) in item-major storage."""
        out = cls(layer.in_features, layer.out_features)
        with torch.no_grad():
            out.item_weight.copy_(layer.weight.t())
            out.bias.copy_(layer.bias)
        return out

    @property
    def weight(self) -> Tensor:
        """``(out_features, n_items)``: a transposed view of ``item_weight``."""
        return self.item_weight.t()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, item-major"

    @staticmethod
    def _to_linear_keys(
        module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        # Rename item_weight to nn.Linear's weight (transposed view), keeping weight, bias order.
        item_weight = state_dict.pop(prefix + "item_weight")
        bias = state_dict.pop(prefix + "bias")
        state_dict[prefix + "weight"] = item_weight.t()
        state_dict[prefix + "bias"] = bias

    @staticmethod
    def _from_linear_keys(
        module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        if prefix + "weight" in state_dict:
            state_dict[prefix + "item_weight"] = state_dict.pop(prefix + "weight").t()


def _normalize(x: Tensor) -> Tensor:
    # Per-user L2 normalization of the history; an empty history stays all zeros.
    return F.normalize(x, p=2.0, dim=1)


Reduction = Literal["mean", "sum", "none"]


def _reduce(per_user: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return per_user.mean()
    if reduction == "sum":
        return per_user.sum()
    if reduction == "none":
        return per_user
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@dataclass(frozen=True, eq=False)
class SparseBatch:
    """A batch of user histories in CSR form: the lean input of :class:`MultVAE`/:class:`MultDAE`.

    Build one with :meth:`from_scipy` or :meth:`from_csr`; the trainer builds them directly from
    the device-resident training matrix. All tensors live on one device.

    Attributes:
        indices: ``(nnz,)`` int64 item positions, row after row.
        offsets: ``(batch + 1,)`` int64 row pointer (``offsets[0] == 0``).
        values: ``(nnz,)`` float32 history weights ``x_ui`` (1.0 for a binary history).
        weights: ``(nnz,)`` float32 L2-normalized history ``x_ui / max(||x_u||_2, 1e-12)``,
            the first layer's input (what ``F.normalize`` gives the dense path).
        row_of: ``(nnz,)`` int64 row of each entry.
        n_items: Number of columns.
        dropout_mask: Optional ``(nnz,)`` pre-drawn input dropout multipliers (0 or
            ``1 / (1 - p)``), used in training mode instead of drawing new ones.
        eps: Optional ``(batch, latent_dim)`` pre-drawn reparameterization noise, used in
            training mode instead of drawing new noise.
    """

    indices: Tensor
    offsets: Tensor
    values: Tensor
    weights: Tensor
    row_of: Tensor
    n_items: int
    dropout_mask: Tensor | None = None
    eps: Tensor | None = None

    @property
    def n_rows(self) -> int:
        """Number of users in the batch."""
        return int(self.offsets.shape[0]) - 1

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @classmethod
    def from_csr(
        cls,
        indptr: Tensor,
        indices: Tensor,
        values: Tensor,
        n_items: int,
    ) -> SparseBatch:
        """A batch from CSR arrays (tensors on one device; ``indptr`` starts at 0).

        Args:
            indptr: ``(batch + 1,)`` row pointer.
            indices: ``(nnz,)`` column positions, without duplicates within a row.
            values: ``(nnz,)`` history weights.
            n_items: Number of columns.

        Returns:
            The batch, with ``row_of`` and the normalized ``weights`` computed.
        """
        indptr = indptr.to(torch.int64)
        indices = indices.to(torch.int64)
        values = values.to(torch.float32)
        n_rows = int(indptr.shape[0]) - 1
        counts = indptr[1:] - indptr[:-1]  # (batch,)
        row_of = torch.repeat_interleave(
            torch.arange(n_rows, device=indices.device), counts, output_size=int(indices.shape[0])
        )  # (nnz,)
        sq = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
        norms = sq.index_add_(0, row_of, values * values).sqrt_().clamp_min_(1e-12)  # (batch,)
        return cls(indices, indptr, values, values / norms[row_of], row_of, int(n_items))

    @classmethod
    def from_scipy(
        cls, matrix: sp.csr_array | sp.csr_matrix, device: str | torch.device = "cpu"
    ) -> SparseBatch:
        """A batch holding the rows of a SciPy CSR matrix (duplicates are summed first).

        Args:
            matrix: ``(batch, n_items)`` histories.
            device: Where the tensors go.

        Returns:
            The batch on ``device``.
        """
        csr = sp.csr_array(matrix)
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        device = torch.device(device)
        return cls.from_csr(
            torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64)).to(device),
            torch.from_numpy(np.asarray(csr.indices, dtype=np.int64)).to(device),
            torch.from_numpy(np.asarray(csr.data, dtype=np.float32)).to(device),
            int(csr.shape[1]),
        )

    def to_dense(self) -> Tensor:
        """The histories as a dense ``(batch, n_items)`` float32 tensor of ``values``."""
        dense = torch.zeros(
            (self.n_rows, self.n_items), dtype=self.values.dtype, device=self.values.device
        )
        dense[self.row_of, self.indices] = self.values
        return dense

    def row_sums(self) -> Tensor:
        """``sum_i x_ui`` per user, ``(batch,)``."""
        out = torch.zeros(self.n_rows, dtype=self.values.dtype, device=self.values.device)
        return out.index_add_(0, self.row_of, self.values)

    def with_noise(
        self, *, dropout_mask: Tensor | None = None, eps: Tensor | None = None
    ) -> SparseBatch:
        """A copy carrying pre-drawn training noise (see the class attributes)."""
        return dataclasses.replace(self, dropout_mask=dropout_mask, eps=eps)


class OutputLinear(nn.Linear):
    """``nn.Linear`` for a layer over all items: on the CPU its product runs on whichever BLAS
    is faster for the shape (:func:`recvae.cpu_runtime.linear`); elsewhere plain ``F.linear``.
    Same parameters, ``state_dict`` and initialization as ``nn.Linear``."""

    def forward(self, x: Tensor, item_multiple: int = 1) -> Tensor:
        """``(batch, in) -> (batch, out)``; padded with ``-inf`` columns to a multiple of
        ``item_multiple`` (:func:`padded_output`)."""
        if item_multiple > 1:
            return padded_output(self, x, item_multiple)
        return cpu_runtime.linear(x, self.weight, self.bias)


def padded_output(layer: nn.Linear, h: Tensor, multiple: int) -> Tensor:
    """``layer(h)`` with its outputs padded to a multiple of ``multiple`` columns of ``-inf``.

    ``(batch, in) -> (batch, ceil(out / multiple) * multiple)``. The logits come out of a GEMM
    whose output rows are a multiple of ``multiple`` elements long: BLAS and GPU kernels run
    their aligned, faster code for such rows (torch's CPU BLAS took 233 ms instead of 292 ms for
    gowalla's ``500 x 600 x 40,981`` forward product on two threads, BENCHMARKS.md). A softmax
    gives the padding probability 0, so the likelihood, its gradient and the layer's gradients
    are those of ``layer(h)``, up to rounding.

    On the CPU (float32 or float64, or float32 parameters under bf16 autocast; not compiling or
    tracing) the product writes straight into the first ``out`` columns of the padded output,
    and the backward pass reads only those columns of the incoming gradient
    (:class:`_PaddedLinear`): no padded copy of the weight, and no padded weight gradient to
    slice and copy back. Under bf16 autocast the three products run in bfloat16, as autocast's
    own ``addmm`` and its backward would, and the gradients come back in the parameters' dtype.
    Elsewhere the product runs over a weight with zero rows appended and a bias of ``-inf``
    there (one extra weight copy, which is cheap on a GPU, and which autocast and
    ``torch.compile`` handle as any other op).

    Args:
        layer: The layer over all items (``out_features`` items).
        h: ``(batch, in_features)`` inputs.
        multiple: Row length to round up to (1: no padding).
    """
    pad = -layer.out_features % multiple
    if pad == 0:
        return cpu_runtime.linear(h, layer.weight, layer.bias)
    weight: Tensor = layer.weight
    bias: Tensor | None = layer.bias
    if (
        h.device.type == "cpu"
        and h.dim() == 2
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    ):
        compute = _cpu_compute_dtype(h, weight, bias)
        if compute is not None:
            # torch leaves Function.apply unannotated.
            return cast(Tensor, _PaddedLinear.apply(h, weight, bias, pad, compute))  # type: ignore[no-untyped-call]
    weight = F.pad(weight, (0, 0, 0, pad))  # (out + pad, in): zero rows
    if bias is None:
        bias = weight.new_zeros((layer.out_features,))
    bias = torch.cat([bias, bias.new_full((pad,), -math.inf)])  # (out + pad,)
    return cpu_runtime.linear(h, weight, bias)  # (batch, out + pad)


def _cpu_compute_dtype(h: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype | None:
    """The dtype :class:`_PaddedLinear` computes in on the CPU, or None where it does not apply.

    Without autocast: the inputs' own float32 or float64, when weight and bias share it. Under
    CPU bf16 autocast: bfloat16, for float32 parameters (what autocast's ``addmm`` would do).
    """
    floats = (torch.float32, torch.float64)
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        if h.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.float32:
            return None
        if bias is not None and bias.dtype != torch.float32:
            return None
        return torch.bfloat16
    if h.dtype in floats and weight.dtype == h.dtype and (bias is None or bias.dtype == h.dtype):
        return h.dtype
    return None


class _PaddedLinear(torch.autograd.Function):
    """``F.linear(h, weight, bias)`` written into the first ``out`` columns of a ``(batch,
    out + pad)`` output whose other columns are ``-inf`` (:func:`padded_output`, CPU).

    The bias is copied into the output's view and the GEMM accumulates onto it in place (the
    view's row stride is the padded length, which is what BLAS's aligned code needs). The
    backward pass takes the first ``out`` columns of the gradient as a strided view: ``grad_h =
    g @ W``, ``grad_W = g.T @ h``, ``grad_b = g.sum(0)``, each of the layer's own shape. On
    gowalla's layer (two threads) this saves a zero-fill and a copy of the padded weight in the
    forward pass and a copy of its gradient in the backward pass, about 40 ms of a 750 ms step
    (BENCHMARKS.md).
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, pad: int, dtype: torch.dtype
    ) -> Tensor:
        n_out = weight.shape[0]
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.autocast("cpu", enabled=False):
            h = h.detach().to(dtype)  # (batch, in)
            weight = weight.detach().to(dtype)  # (out, in)
            out = h.new_empty((h.shape[0], n_out + pad))
            out[:, n_out:] = -math.inf
            logits = out[:, :n_out]  # (batch, out), row stride out + pad
            if bias is None:
                logits.zero_()
            else:
                logits.copy_(bias.detach().expand_as(logits))
            logits.addmm_(h, weight.t())
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight = ctx.saved_tensors  # in the compute dtype
        h_dtype, weight_dtype, bias_dtype = ctx.dtypes
        g = grad[:, : weight.shape[0]].to(h.dtype)  # (batch, out): not the padding's columns
        grad_h = g.mm(weight).to(h_dtype) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(h).to(weight_dtype) if ctx.needs_input_grad[1] else None
        # Summed in g's dtype, as autocast's backward does: a bf16 sum into float32 took 8.6 ms
        # instead of 3.1 ms on gowalla's (500, 40,981) gradient (two threads).
        grad_b = (
            g.sum(0).to(bias_dtype) if bias_dtype is not None and ctx.needs_input_grad[2] else None
        )
        return grad_h, grad_w, grad_b, None, None


class _ItemBag(torch.autograd.Function):
    """``h_u = sum_{i in u} w_ui W[i]``, the sparse first layer (``F.embedding_bag`` sums), with a
    CPU backward pass that is itself a bag sum: the weight gradient ``grad_W[i] = sum_{u ni i}
    w_ui g_u`` is an embedding bag over the rows of ``g``, one bag per item, built by a stable
    sort of the batch's item positions (the transposed CSR).

    Every gradient row is written once, so there is no ``(n_items, hidden)`` zero fill and no
    scatter. The gradient is torch's own up to rounding (each item's sum runs over its users in
    batch order; torch's kernel rounds differently), and the forward pass is ``F.embedding_bag``.
    The layer's forward and backward pass on an ml-1m batch of 500 users (49,226 entries, two
    threads) took 5.8 ms against 8.3 ms with torch's backward (BENCHMARKS.md).
    """

    @staticmethod
    def applies(weight: Tensor, per_sample_weights: Tensor) -> bool:
        """Whether this path runs: a CPU float weight that is trained, constant entry weights,
        no autocast but bf16's, not compiling or tracing (those keep ``F.embedding_bag``).

        CPU bf16 autocast leaves ``embedding_bag`` in the weight's dtype, so the bag sums and
        their gradient are the same with it as without."""
        return (
            weight.device.type == "cpu"
            and weight.requires_grad
            and torch.is_grad_enabled()
            and weight.dtype in (torch.float32, torch.float64)
            and not per_sample_weights.requires_grad
            and (
                not torch.is_autocast_enabled("cpu")
                or torch.get_autocast_dtype("cpu") == torch.bfloat16
            )
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        )

    @staticmethod
    def forward(
        ctx: Any,
        indices: Tensor,
        weight: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor,
        row_of: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(indices, per_sample_weights, row_of)
        ctx.n_items = weight.shape[0]
        return F.embedding_bag(
            indices,
            weight,
            offsets,
            mode="sum",
            per_sample_weights=per_sample_weights,
            include_last_offset=True,
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        indices, per_sample_weights, row_of = ctx.saved_tensors
        n_items = ctx.n_items
        order = torch.argsort(indices, stable=True)  # (nnz,): entries item by item
        item_offsets = indices.new_zeros(n_items + 1)  # (n_items + 1,)
        torch.cumsum(torch.bincount(indices, minlength=n_items), 0, out=item_offsets[1:])
        grad_weight = F.embedding_bag(
            row_of[order],
            grad.contiguous(),  # (batch, hidden)
            item_offsets,
            mode="sum",
            per_sample_weights=per_sample_weights[order],
            include_last_offset=True,
        )  # (n_items, hidden)
        return None, grad_weight, None, None, None


def _linear_layers(dims: Sequence[int], *, output: bool = False) -> nn.ModuleList:
    """``nn.Linear(dims[i], dims[i + 1])`` for each consecutive pair, in order; with ``output``
    the last is an :class:`OutputLinear`."""
    pairs = list(zip(dims[:-1], dims[1:], strict=True))
    return nn.ModuleList(
        [
            OutputLinear(a, b) if output and i == len(pairs) - 1 else nn.Linear(a, b)
            for i, (a, b) in enumerate(pairs)
        ]
    )


class _Autoencoder(nn.Module):
    """Shared structure: normalized, dropped-out input -> code -> logits over items."""

    config: ModelConfig
    n_items: int
    encoder: nn.ModuleList
    decoder: nn.ModuleList
    drop: nn.Dropout
    _act: Callable[[Tensor], Tensor]
    variational: bool = False
    #: ``forward``/``encode`` accept a :class:`SparseBatch` as well as a dense tensor.
    supports_sparse_input: bool = True
    #: ``forward``/``decode`` take ``item_multiple`` (logits padded with ``-inf`` columns).
    supports_item_padding: bool = True

    def _build(
        self,
        config: MultVAEConfig | MultDAEConfig,
        n_items: int,
        *,
        encoder_dims: Sequence[int],
        decoder_dims: Sequence[int],
    ) -> None:
        """Create the layers (a subclass's ``__init__`` calls this first).

        ``encoder_dims`` ``[n_items, ..., out]`` and ``decoder_dims`` ``[latent, ..., n_items]``
        give one linear layer per consecutive pair, in the paper's initialization; the first
        encoder layer is stored item-major (:class:`_ItemMajorLinear`).

        Raises:
            ValueError: ``n_items < 1``.
        """
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.config = config
        self.n_items = n_items
        self._act = _ACTIVATIONS[config.activation]
        self.encoder = _linear_layers(encoder_dims)
        self.decoder = _linear_layers(decoder_dims, output=True)
        self.drop = nn.Dropout(config.dropout)
        for layer in [*self.encoder, *self.decoder]:
            _init_linear(layer)
        self.encoder[0] = _ItemMajorLinear.from_linear(cast(nn.Linear, self.encoder[0]))

    def decode(self, z: Tensor, *, item_multiple: int = 1) -> Tensor:
        """Logits over all items for codes ``z`` (``(batch, latent)`` -> ``(batch, n_items)``).

        With ``item_multiple > 1`` the logits have ``n_items`` rounded up to a multiple of it
        (:func:`padded_output`): the extra columns are ``-inf``, so a softmax over them, its
        ``logsumexp`` and every gradient are those of the ``n_items`` columns. Training uses this
        to give the products over all items aligned rows.
        """
        h = z
        for layer in self.decoder[:-1]:
            h = self._act(layer(h))
        # (batch, n_items), or padded; through the module, so that its hooks see the logits
        return cast(Tensor, self.decoder[-1](h, item_multiple=item_multiple))

    def encode(  # pragma: no cover - abstract
        self, x: Tensor | SparseBatch
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _input_layer(self, x: Tensor | SparseBatch) -> Tensor:
        """The first encoder layer on the normalized, dropped-out history.

        ``(batch, n_items)`` (or a :class:`SparseBatch`) -> ``(batch, hidden)``, before the
        activation. For a sparse batch ``h_u = b + sum_{i in u} w_ui W[:, i]`` with ``w_u`` the
        normalized history after dropout: dropping a zero changes nothing, so dropout on the
        nonzeros alone (kept values scaled by ``1 / (1 - p)``) is the dense dropout exactly.
        """
        layer = self.encoder[0]
        if not isinstance(x, SparseBatch):
            return cast(Tensor, layer(self.drop(_normalize(x))))
        assert isinstance(layer, _ItemMajorLinear)
        if x.n_items != self.n_items:
            raise ValueError(f"batch has {x.n_items} items but the model has {self.n_items}")
        weights = x.weights
        if self.training and self.drop.p > 0:
            weights = self.drop(weights) if x.dropout_mask is None else weights * x.dropout_mask
        item_weight = layer.item_weight  # (n_items, hidden): one row per item
        weights = weights.to(item_weight.dtype)
        h = (
            # torch leaves Function.apply unannotated.
            cast(Tensor, _ItemBag.apply(x.indices, item_weight, x.offsets, weights, x.row_of))  # type: ignore[no-untyped-call]
            if _ItemBag.applies(item_weight, weights)
            else F.embedding_bag(
                x.indices,
                item_weight,
                x.offsets,
                mode="sum",
                per_sample_weights=weights,
                include_last_offset=True,
            )
        )  # (batch, hidden)
        return h + cast(Tensor, layer.bias)

    def item_embeddings(self) -> Tensor:
        """The decoder's output weights, one row per item (``(n_items, last_hidden)``)."""
        return cast(Tensor, self.decoder[-1].weight)

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
        self._build(
            config,
            n_items,
            # The last encoder layer outputs mu and logvar side by side.
            encoder_dims=[n_items, *config.hidden_dims, 2 * config.latent_dim],
            decoder_dims=[config.latent_dim, *reversed(config.hidden_dims), n_items],
        )

    def encode(self, x: Tensor | SparseBatch) -> tuple[Tensor, Tensor]:
        """Posterior parameters for histories ``x`` (``(batch, n_items)`` or a sparse batch).

        Returns:
            ``(mu, logvar)``, each ``(batch, latent_dim)``.
        """
        h = self._input_layer(x)  # (batch, first hidden or 2 * latent)
        for layer in self.encoder[1:]:
            h = layer(self._act(h))
        mu, logvar = h.chunk(2, dim=1)  # h: (batch, 2 * latent)
        return mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        """``z = mu + exp(logvar / 2) * eps`` in training (new ``eps`` if None), ``mu`` in eval."""
        if not self.training:
            return mu
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, x: Tensor | SparseBatch, *, item_multiple: int = 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (batch, n_items), mu (batch, latent), logvar (batch, latent))``.

        A :class:`SparseBatch` may carry pre-drawn noise (``dropout_mask``, ``eps``).
        ``item_multiple`` pads the logits with ``-inf`` columns (:meth:`decode`).
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, x.eps if isinstance(x, SparseBatch) else None)
        return self.decode(z, item_multiple=item_multiple), mu, logvar


class MultDAE(_Autoencoder):
    """The denoising autoencoder of Liang et al. (2018): ``[n_items, *hidden, latent, n_items]``.

    ``forward`` returns ``(logits, code, None)``: there is no posterior variance.
    """

    variational = False

    def __init__(self, config: MultDAEConfig, n_items: int) -> None:
        super().__init__()
        encoder_dims = [n_items, *config.hidden_dims, config.latent_dim]
        self._build(
            config,
            n_items,
            encoder_dims=encoder_dims,
            decoder_dims=encoder_dims[::-1],
        )

    def encode(self, x: Tensor | SparseBatch) -> tuple[Tensor, None]:
        """The code for histories ``x`` (dense or sparse): ``((batch, latent_dim), None)``."""
        h = self._act(self._input_layer(x))
        for layer in self.encoder[1:]:
            h = self._act(layer(h))
        return h, None

    def forward(
        self, x: Tensor | SparseBatch, *, item_multiple: int = 1
    ) -> tuple[Tensor, Tensor, None]:
        """``(logits, code, None)``; ``item_multiple`` as in :meth:`MultVAE.forward`."""
        code, _ = self.encode(x)
        return self.decode(code, item_multiple=item_multiple), code, None


MODEL_TYPES: dict[str, type[_Autoencoder]] = {"multvae": MultVAE, "multdae": MultDAE}
# Models defined in other modules, imported on first use (they add themselves to MODEL_TYPES).
_MODEL_MODULES: dict[str, str] = {"recvae": "recvae.recvae_model"}


def build_model(config: ModelConfig, n_items: int) -> nn.Module:
    """Instantiate the model that ``config`` describes.

    Raises:
        ValueError: no model is registered for the config.
    """
    if config.model not in MODEL_TYPES and config.model in _MODEL_MODULES:
        importlib.import_module(_MODEL_MODULES[config.model])  # registers the model on import
    try:
        cls = MODEL_TYPES[config.model]
    except KeyError:
        raise ValueError(f"no model registered for config '{config.model}'") from None
    return cls(config, n_items)


# ---------------------------------------------------------------------------- losses
def multinomial_nll(logits: Tensor, x: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Mean negative multinomial log-likelihood ``-1/B sum_u sum_i x_ui log softmax(f_u)_i``.

    ``reduction="sum"`` gives the sum over users, ``"none"`` the ``(batch,)`` per-user values.
    """
    per_user = -(F.log_softmax(logits, dim=1) * x).sum(dim=1)  # (batch,)
    return _reduce(per_user, reduction)


def sparse_multinomial_nll(
    logits: Tensor, batch: SparseBatch, *, reduction: Reduction = "mean"
) -> Tensor:
    """:func:`multinomial_nll` with the target given as a :class:`SparseBatch`.

    ``nll_u = -sum_{i in u} x_ui log softmax(f_u)_i = sum_{i in u} x_ui (logsumexp_j f_uj - f_ui)``,
    for a binary history ``n_u * logsumexp(f_u) - sum_{i in u} f_ui``: only the logits at the
    user's items are gathered, no dense target is built. Computed in float32 whatever the
    logits' dtype (bf16 under autocast).

    Args:
        logits: ``(batch, n_items)`` decoder outputs; extra columns of ``-inf`` after the
            ``n_items`` (:func:`padded_output`) change neither the value nor the gradient.
        batch: The same users' histories (``values`` are the ``x_ui``).
        reduction: ``"mean"`` over users, ``"sum"``, or ``"none"`` for ``(batch,)`` values.

    Returns:
        A scalar tensor, or ``(batch,)`` with ``reduction="none"``.
    """
    # torch leaves Function.apply unannotated.
    per_user = _SparseNLL.apply(  # type: ignore[no-untyped-call]
        logits, batch.row_of, batch.indices, batch.values
    )  # (batch,)
    return _reduce(cast(Tensor, per_user), reduction)


def _nll_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _logsumexp_rows(logits: Tensor) -> Tensor:
    """``logsumexp`` of each row in float32 (float64 for float64 logits): ``(batch,)``."""
    return torch.logsumexp(logits.to(_nll_dtype(logits)), dim=1)


def _scaled_softmax(logits: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    """``scale_u * softmax(f_u)`` from the logits and their row ``logsumexp``, in their dtype."""
    out = logits.to(_nll_dtype(logits)) - lse.unsqueeze(1)  # a new tensor: logits untouched
    out.exp_().mul_(scale.unsqueeze(1))
    return out.to(logits.dtype)


def _softmax_rows(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(softmax(f_u), logsumexp(f_u))`` per row, in float32 (float64 for float64 logits).

    The CPU form of the likelihood's dense passes: torch's vectorized row softmax (threaded over
    rows), then the ``logsumexp`` from two row maxima instead of another pass of ``exp``: the
    largest probability is ``exp(0) / sum_i exp(f_ui - max_i f_ui)``, so
    ``logsumexp(f_u) = max_i f_ui - log max_i softmax(f_u)_i``; that largest probability is at
    least ``1 / n_items``, so its log never underflows. The backward pass then scales the saved
    probabilities instead of computing ``exp`` again.
    """
    dtype = _nll_dtype(logits)
    probs = torch.softmax(logits, dim=1, dtype=dtype)  # (batch, n_items)
    lse = logits.amax(dim=1).to(dtype) - probs.amax(dim=1).log()  # (batch,)
    return probs, lse


_FUSED: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}  # eager -> compiled


def _fused(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(*args)``, through ``torch.compile`` for CUDA tensors (one kernel per pass).

    Eager, each dense pass over ``(batch, n_items)`` is several kernels with float32
    temporaries; compiled, the dtype conversion, the subtraction, ``exp`` and the scaling read
    the logits once and write the result once, which is what bounds a large-batch GPU step.
    When compiling is not possible here (no Triton, an unsupported GPU), it falls back to the
    eager function once and for all, with a warning.
    """
    if not args[0].is_cuda:
        return fn(*args)
    compiled = _FUSED.get(fn)
    if compiled is None:
        compiled = _FUSED[fn] = torch.compile(fn, dynamic=True)
    try:
        return compiled(*args)
    except Exception as exc:  # any compiler failure: the eager function computes the same
        if compiled is fn:
            raise
        logging.getLogger(__name__).warning(
            "torch.compile of %s failed (%s: %s); using eager kernels",
            fn.__name__,
            type(exc).__name__,
            exc,
        )
        _FUSED[fn] = fn
        return fn(*args)


class _SparseNLL(torch.autograd.Function):
    """Per-user NLL from the nonzeros; the gradient ``g_u (n_u softmax(f_u) - x_u)``.

    ``nll_u = n_u lse(f_u) - sum_{i in u} x_ui f_ui`` with ``n_u = sum_i x_ui``. Saves the logits
    (in their own dtype: bf16 under autocast) and one ``logsumexp`` per row, not a dense float32
    ``log_softmax``: half the memory at bf16, and no dense write in the forward pass. The dense
    passes run fused on CUDA (:func:`_fused`). On the CPU, where nothing fuses them, the
    forward pass saves the probabilities instead (:func:`_softmax_rows`, the same
    memory as float32 logits), so the backward pass is one scaling, not a second ``exp``.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, row_of: Tensor, indices: Tensor, values: Tensor
    ) -> Tensor:
        dtype = _nll_dtype(logits)
        ctx.saved_probs = logits.device.type == "cpu"
        if ctx.saved_probs:
            dense, lse = _softmax_rows(logits)  # (batch, n_items) probabilities
        else:
            dense, lse = logits, _fused(_logsumexp_rows, logits)  # (batch,)
        values = values.to(dtype)
        picked = (logits[row_of, indices].to(dtype) - lse[row_of]) * values  # (nnz,) x log p
        per_user = torch.zeros(logits.shape[0], dtype=dtype, device=logits.device)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(dense, lse, row_of, indices, values)
        return -per_user.index_add_(0, row_of, picked)  # (batch,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        dense, lse, row_of, indices, values = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        n_per_user = torch.zeros_like(grad).index_add_(0, row_of, values)  # (batch,)
        scale = (grad * n_per_user).unsqueeze(1)  # (batch, 1)
        if ctx.saved_probs:  # a new tensor: the saved probabilities stay intact
            out = torch.mul(dense, scale).to(ctx.logits_dtype)
        else:
            out = _fused(_scaled_softmax, dense, lse, scale.squeeze(1))
        out.index_put_((row_of, indices), (-(values * grad[row_of])).to(out.dtype), accumulate=True)
        return out, None, None, None


def gaussian_kl(mu: Tensor, logvar: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Mean KL to the standard normal: ``1/B sum_u 1/2 sum_d (exp(lv) + mu^2 - 1 - lv)``.

    ``reduction="sum"`` gives the sum over users, ``"none"`` the ``(batch,)`` per-user values.
    """
    per_user = 0.5 * (torch.exp(logvar) + mu.pow(2) - 1.0 - logvar).sum(dim=1)  # (batch,)
    return _reduce(per_user, reduction)


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
