"""The training loop: Adam over shuffled user batches, KL annealing, validation, checkpoints.

The loop validates on held-out users after every epoch (or every ``validate_every``), keeps the
best epoch's weights, stops early on a patience, and writes a checkpoint every epoch from which an
interrupted run resumes exactly.

The data path is lean and never builds a ``(batch, n_items)`` input or target: the training
matrix lives on the training device as CSR tensors, is shuffled there once per epoch, and each
batch is a slice of it (a :class:`~recvae.model.SparseBatch`; no per-batch host work, so the same
code is the GPU path). The model's first layer reads the batch as an embedding bag over the
nonzeros, input dropout touches only the nonzeros, and the multinomial likelihood gathers the
logits at the users' items (:func:`~recvae.model.sparse_multinomial_nll`). The noise (input
dropout, reparameterization) is drawn for each global batch from the seeded torch generator, so a
run is reproducible, resumes exactly, and gives the same result under DDP
(``RunOptions(distributed=True)``, see :mod:`recvae.distributed`) as in one process. Adam is
torch's fused implementation where the device has one. ``RunOptions.precision="bf16"`` runs the
forward pass under bf16 autocast (the likelihood stays float32) and ``RunOptions.compile``
compiles it. Models without sparse input (``supports_sparse_input``) get dense batches.
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from recvae import _durable, cpu_runtime
from recvae import distributed as dist_utils
from recvae.config import ModelConfig, MultVAEConfig, RunOptions
from recvae.data.interactions import Interactions
from recvae.evaluation import NaNScoresError, _check_same_items, evaluate
from recvae.model import (
    SparseBatch,
    anneal_beta,
    build_model,
    gaussian_kl,
    l2_penalty,
    multinomial_nll,
    sparse_multinomial_nll,
)
from recvae.recommender import Recommender, resolve_device
from recvae.split import HeldOut, Split, _check_held_out

__all__ = [
    "train",
    "Trainer",
    "EpochCallback",
    "CheckpointMismatchError",
    "beta_schedule",
    "TRAINER_TYPES",
    "check_run_options",
    "register_trainer",
]

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_NAME = "checkpoint.pt"
# 2: Adam's moments of an item-major first layer are stored item-major (1: as nn.Linear's).
CHECKPOINT_FORMAT = 2
_VALIDATION_METRICS = ("ndcg@100", "recall@20", "recall@50")
_BAR_EVERY = 20  # steps between progress-bar loss updates
ITEM_MULTIPLE = 64  # what training pads the logits to where padding pays (RunOptions.item_multiple)


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was written for another config or dataset."""


def beta_schedule(config: ModelConfig, total_steps: int) -> tuple[float, float]:
    """``(beta_max, anneal_steps)`` for a run of ``total_steps`` updates.

    Absolute (``config.anneal_steps``) or relative (the cap at ``anneal_cap_fraction`` of
    training); ``beta_search`` anneals to 1.0 across the whole run.
    """
    if not isinstance(config, MultVAEConfig):
        return 0.0, math.inf
    if config.beta_search:
        return 1.0, float(max(1, total_steps))
    if config.anneal_steps is not None:
        return config.beta_max, float(config.anneal_steps)
    if config.beta_max == 0:
        return 0.0, math.inf
    return config.beta_max, config.anneal_cap_fraction * total_steps / config.beta_max


def _check_train_arguments(
    data: Any,
    config: Any,
    validation: Any,
    options: Any,
    on_epoch: Any,
) -> None:
    """Type and vocabulary checks of :func:`train`'s and :class:`Trainer`'s arguments, done
    before any work (a wrong object would otherwise fail deep inside, after an epoch).

    Raises:
        TypeError: An argument is not of the expected type; the message names it.
        ValueError: ``validation`` has other items than ``data``, or no user with targets;
            or ``config.patience`` is set without ``validation`` (it would be ignored).
    """
    if isinstance(data, Split):
        raise TypeError("data must be an Interactions, got a Split: pass split.train")
    if isinstance(data, HeldOut):
        raise TypeError("data must be an Interactions, got a HeldOut (held-out users)")
    if not isinstance(data, Interactions):
        raise TypeError(f"data must be an Interactions, got {type(data).__name__}")
    if not isinstance(config, ModelConfig):
        hint = " (build one with recvae.config_from_dict)" if isinstance(config, Mapping) else ""
        raise TypeError(
            f"config must be a model config such as MultVAEConfig, got {type(config).__name__}"
            + hint
        )
    if validation is not None:
        _check_held_out(validation)
    if options is not None and not isinstance(options, RunOptions):
        hint = " (use RunOptions(**options))" if isinstance(options, Mapping) else ""
        raise TypeError(f"options must be a RunOptions, got {type(options).__name__}{hint}")
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(
            f"on_epoch must be callable as on_epoch(epoch, metrics), got {type(on_epoch).__name__}"
        )
    if validation is None and config.patience is not None:
        raise ValueError(
            f"patience={config.patience} (early stopping) needs validation users to watch: "
            "pass validation=split.validation, or patience=None"
        )
    if validation is not None:
        _check_same_items(validation.fold_in, data, "validation", "the training data")
        _check_same_items(validation.targets, data, "validation targets", "the training data")
        if validation.n_users_with_targets == 0:
            raise ValueError(
                f"validation has no user with targets ({validation.n_users} users, none with a "
                "target): it cannot choose an epoch; give held-out users enough interactions "
                "(split_users' min_target_user_count, holdout_fraction) or pass no validation"
            )


def _batch_tensor(matrix: sp.csr_array, rows: np.ndarray, device: torch.device) -> Tensor:
    # Densify only this batch's rows: (batch, n_items).
    dense = np.asarray(matrix[rows].toarray(), dtype=np.float32)
    return torch.from_numpy(dense).to(device, non_blocking=True)


class _EpochMatrix:
    """One epoch's shuffled training matrix: CSR tensors on the device, host row pointer.

    Row ``r`` is user ``perm[r]``; a batch of consecutive rows is a set of views (the host copy
    of the row pointer gives the slice bounds without a device synchronization).
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: Tensor,
        values: Tensor,
        weights: Tensor,
        row_of: Tensor,
        n_items: int,
    ) -> None:
        self.indptr = indptr  # (n_rows + 1,) host int64
        self.indptr_t = torch.from_numpy(indptr).to(indices.device)
        self.indices = indices  # (nnz,)
        self.values = values  # (nnz,)
        self.weights = weights  # (nnz,) normalized history
        self.row_of = row_of  # (nnz,)
        self.n_items = n_items

    def nnz_range(self, start: int, stop: int) -> tuple[int, int]:
        return int(self.indptr[start]), int(self.indptr[stop])

    def batch(self, start: int, stop: int) -> SparseBatch:
        lo, hi = self.nnz_range(start, stop)
        return SparseBatch(
            indices=self.indices[lo:hi],
            offsets=self.indptr_t[start : stop + 1] - lo,
            values=self.values[lo:hi],
            weights=self.weights[lo:hi],
            row_of=self.row_of[lo:hi] - start,
            n_items=self.n_items,
        )


class _DeviceMatrix:
    """The training matrix as CSR tensors on the training device (copied there once)."""

    def __init__(self, matrix: sp.csr_array, device: torch.device) -> None:
        csr = sp.csr_array(matrix)
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        self.n_rows, self.n_items = (int(d) for d in csr.shape)
        self.nnz = int(csr.nnz)
        self.device = device
        indptr = np.asarray(csr.indptr, dtype=np.int64)
        self.counts = np.diff(indptr)  # (n_rows,) host
        self.starts = torch.from_numpy(indptr[:-1].copy()).to(device)
        base = SparseBatch.from_csr(
            torch.from_numpy(indptr).to(device),
            torch.from_numpy(np.asarray(csr.indices, dtype=np.int64)).to(device),
            torch.from_numpy(np.asarray(csr.data, dtype=np.float32)).to(device),
            self.n_items,
        )
        self.indices, self.values, self.weights = base.indices, base.values, base.weights

    def shuffled(self, perm: np.ndarray) -> _EpochMatrix:
        """The rows in the order ``perm`` (all on the device: O(nnz) gathers, once per epoch)."""
        counts = self.counts[perm]
        indptr = np.zeros(self.n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        perm_t = torch.from_numpy(np.asarray(perm, dtype=np.int64)).to(self.device)
        new_starts = torch.from_numpy(indptr[:-1].copy()).to(self.device)
        row_of = torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.device),
            torch.from_numpy(counts).to(self.device),
            output_size=self.nnz,
        )  # (nnz,) new row of every entry
        # Entry k of new row r comes from position starts[perm[r]] + (k - new_starts[r]).
        shift = self.starts[perm_t] - new_starts  # (n_rows,)
        source = shift[row_of] + torch.arange(self.nnz, device=self.device)  # (nnz,)
        return _EpochMatrix(
            indptr,
            self.indices[source],
            self.values[source],
            self.weights[source],
            row_of,
            self.n_items,
        )


def _transpose_item_major_moments(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # A format-1 checkpoint kept the first layer's Adam moments in nn.Linear's (out, n_items)
    # layout; the parameter is now item-major, (n_items, out).
    item_major = {
        id(module.item_weight) for module in model.modules() if hasattr(module, "item_weight")
    }
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in item_major:
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() == 2:
                    state[key] = value.t().contiguous()


class _SparseRanker:
    """Validation scorer: histories go to the device as a sparse batch, never densified."""

    def __init__(self, model: nn.Module, n_items: int, device: torch.device) -> None:
        self.model: Any = model  # a model with encode/decode (supports_sparse_input)
        self.n_items = n_items
        self.device = device

    def score(self, histories: sp.csr_array) -> Tensor:
        self.model.eval()
        with torch.inference_mode():
            batch = SparseBatch.from_scipy(histories, self.device)
            mu, _ = self.model.encode(batch)  # (batch, latent)
            logits: Tensor = self.model.decode(mu)  # (batch, n_items)
            return logits.float()


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    step: int = 0  # gradient updates done
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None


class Trainer:
    """Trains a model on the training users' matrix.

    Args:
        data: Training users (rows) over the item vocabulary.
        config: Model hyperparameters.
        validation: Held-out users scored after each epoch (best epoch by
            ``config.select_metric``); without it the last epoch is kept.
        options: Device, threads, checkpoint directory, progress bar, precision, compile,
            distributed.
        on_epoch: Called as ``on_epoch(epoch, metrics)`` after every epoch (1-based); on rank 0
            only in distributed training.

    Raises:
        ValueError: empty data, a vocabulary mismatch with ``validation`` (other item ids, or
            the same in another order), a ``validation`` with no user with targets, or
            ``distributed=True`` without a process group or for a model or trainer that does
            not support it.
        TypeError: an argument of the wrong type (e.g. a ``Split`` for ``data``, a dict for
            ``config`` or ``options``).
    """

    #: Weights loaded into the fresh model when training starts from scratch (a warm start);
    #: ignored when a checkpoint is resumed. :func:`train` sets it from ``initial_state``.
    initial_state: Mapping[str, Tensor] | None = None

    def __init__(
        self,
        data: Interactions,
        config: ModelConfig,
        *,
        validation: HeldOut | None = None,
        options: RunOptions | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        _check_train_arguments(data, config, validation, options, on_epoch)
        if data.n_users == 0 or data.nnz == 0:
            raise ValueError("cannot train on an empty matrix (no training users)")
        self.data = data
        self.config = config
        self.validation = validation
        self.options = options or RunOptions()
        self.on_epoch = on_epoch
        _check_loop_options(type(self), config, self.options)
        if self.options.distributed:
            if not dist_utils.is_initialized():
                raise ValueError(
                    "RunOptions(distributed=True) needs a torch.distributed process group: run "
                    "under torchrun and call recvae.distributed.init_from_env() first"
                )
            self.device = dist_utils.local_device(self.options.device)
        else:
            self.device = resolve_device(self.options.device)
        self.rank = dist_utils.get_rank() if self.options.distributed else 0
        self.world_size = dist_utils.get_world_size() if self.options.distributed else 1
        self.is_main = self.rank == 0
        if self.options.num_threads is not None:
            torch.set_num_threads(self.options.num_threads)
        if self.device.type == "cpu":
            cpu_runtime.pinned_blas()  # a bad $RECVAE_CPU_BLAS is named before training starts
            if (
                self.options.precision == "bf16"
                and (support := cpu_runtime.bf16_support()) != "native"
            ):
                logger.warning(
                    "precision bf16 on a CPU without bf16 units (AVX512_BF16 or AMX): torch's "
                    "bf16 products run %s here, slower than fp32; use precision fp32",
                    "emulated" if support == "emulated" else "on fallback kernels",
                )
        self.steps_per_epoch = math.ceil(data.n_users / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.beta_max, self.anneal_steps = beta_schedule(config, self.total_steps)
        torch.manual_seed(config.seed)
        self.model: nn.Module = build_model(config, data.n_items).to(self.device)
        # Weight decay is the paper's explicit L2 term in the loss, not Adam's coupled decay.
        # The fused kernel is the same update in one pass over each tensor (several times
        # faster than the per-tensor loop on large item matrices).
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=config.learning_rate,
            fused=True if self.device.type in ("cpu", "cuda") else None,
        )
        self.sparse_input = bool(getattr(self.model, "supports_sparse_input", False))
        if self.options.distributed and not self.sparse_input:
            raise ValueError(f"distributed training does not support model '{config.model}'")
        self._device_matrix: _DeviceMatrix | None = None
        module: Any = self.model
        if self.options.distributed:
            module = dist_utils.wrap_ddp(self.model, self.device)
        if self.options.compile:
            module = torch.compile(module, dynamic=True)
        self._train_module = module  # what the training step calls (DDP and/or compiled)
        self.item_multiple = self._item_multiple()
        self.state = _State()
        self.checkpoint_path = (
            Path(self.options.checkpoint_dir) / CHECKPOINT_NAME
            if self.options.checkpoint_dir
            else None
        )
        self._fingerprint = data.fingerprint()

    def _item_multiple(self) -> int:
        """What the sparse training path pads the logits to (``RunOptions.item_multiple``).

        Automatic: 64 items on CUDA and on the CPU with more than one thread, where the
        products over all items ran faster on aligned rows; 1 on one CPU thread, where the
        product that was sensitive to it runs on NumPy's BLAS, which was not.
        """
        if not self.sparse_input or not getattr(self.model, "supports_item_padding", False):
            return 1  # the dense likelihood, or a model whose forward takes no item_multiple
        if self.options.item_multiple is not None:
            return self.options.item_multiple
        if self.device.type == "cuda" or (
            self.device.type == "cpu" and torch.get_num_threads() > 1
        ):
            return ITEM_MULTIPLE
        return 1

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_payload(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_json(),
            "fingerprint": self._fingerprint,
            "epoch": s.epoch,
            "step": s.step,
            "best_score": s.best_score,
            "best_epoch": s.best_epoch,
            "bad_epochs": s.bad_epochs,
            "stopped_early": s.stopped_early,
            "history": s.history,
            "model": self.model.state_dict(),
            "best_state": s.best_state,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically and durably (flushed temp file + rename); only rank 0
        writes."""
        if self.checkpoint_path is None or not self.is_main:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self._checkpoint_payload(), tmp)
        _durable.replace(tmp, self.checkpoint_path)

    def try_resume(self) -> bool:
        """Restore from the checkpoint when one exists; return whether it did.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to another config or dataset.
        """
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        try:
            ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except Exception as exc:
            # torch's message for a file its safe loader refuses is a page of advice (including
            # loading with weights_only=False, which a checkpoint must never need).
            if isinstance(exc, pickle.UnpicklingError):
                reason = "not a recvae checkpoint: torch's safe loader refused it"
            else:
                reason = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoint_path} is unreadable ({reason}); remove it to start "
                "over"
            ) from exc
        if ckpt.get("config") != self.config.to_json() or ckpt.get("fingerprint") != (
            self._fingerprint
        ):
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoint_path} was written for another config or dataset; "
                "remove it or use another checkpoint directory"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if int(ckpt.get("format", 1)) < 2:
            _transpose_item_major_moments(self.model, self.optimizer)
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if self.device.type == "cuda" and ckpt["cuda_rng"]:
            torch.cuda.set_rng_state_all([t.cpu() for t in ckpt["cuda_rng"]])
        best_state = ckpt["best_state"]
        self.state = _State(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            best_score=float(ckpt["best_score"]),
            best_epoch=int(ckpt["best_epoch"]),
            bad_epochs=int(ckpt["bad_epochs"]),
            stopped_early=bool(ckpt["stopped_early"]),
            history=list(ckpt["history"]),
            best_state=None if best_state is None else {k: v.cpu() for k, v in best_state.items()},
        )
        logger.info("resumed from %s after epoch %d", self.checkpoint_path, self.state.epoch)
        return True

    # ------------------------------------------------------------------ loop
    def _autocast(self) -> Any:
        return torch.autocast(
            device_type=self.device.type,
            dtype=torch.bfloat16,
            enabled=self.options.precision == "bf16",
        )

    def _loss(
        self, x: Tensor | SparseBatch, beta: float, *, denominator: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, nll, kl)`` of one batch, ``loss = nll + beta * kl (+ L2 penalty)``.

        ``nll`` and ``kl`` are means over the batch's users, or their sums divided by
        ``denominator`` when given (a distributed shard of a larger global batch).

        Args:
            x: Dense ``(batch, n_items)`` histories or a :class:`SparseBatch`.
            beta: KL weight.
            denominator: Divides the per-user sums instead of the batch size.
        """
        padding = {"item_multiple": self.item_multiple} if self.item_multiple > 1 else {}
        with self._autocast():
            # logits: (batch, n_items), or padded with -inf columns for the sparse likelihood
            logits, mu, logvar = self._train_module(x, **padding)
        if isinstance(x, SparseBatch):
            n_rows = x.n_rows
            nll_sum = sparse_multinomial_nll(logits, x, reduction="sum")
        else:
            n_rows = int(x.shape[0])
            nll_sum = multinomial_nll(logits.float(), x, reduction="sum")
        if logvar is not None:
            kl_sum = gaussian_kl(mu.float(), logvar.float(), reduction="sum")
        else:
            kl_sum = torch.zeros((), device=logits.device)
        denom = float(n_rows) if denominator is None else float(denominator)
        nll = nll_sum / denom
        kl = kl_sum / denom
        loss = nll + beta * kl
        if self.config.weight_decay > 0:
            loss = loss + self.config.weight_decay * l2_penalty(self.model)
        return loss, nll, kl

    def _permutation(self, epoch: int) -> np.ndarray:
        """The order of the training users in ``epoch`` (the same on every rank)."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(self.data.n_users)

    def _training_matrix(self) -> _DeviceMatrix:
        if self._device_matrix is None:
            self._device_matrix = _DeviceMatrix(self.data.matrix, self.device)
        return self._device_matrix

    def _sparse_batch(
        self, matrix: _EpochMatrix, start: int, stop: int, lo: int, hi: int
    ) -> SparseBatch:
        """Rows ``[lo, hi)`` of the global batch ``[start, stop)``, with its training noise.

        The noise is drawn for the whole global batch and sliced, so a user's noise does not
        depend on how the batch is sharded across ranks.
        """
        batch = matrix.batch(lo, hi)
        p = float(self.config.dropout)
        mask = None
        if p > 0:
            g_lo, g_hi = matrix.nnz_range(start, stop)
            l_lo, l_hi = matrix.nnz_range(lo, hi)
            uniform = torch.rand(g_hi - g_lo, device=self.device)  # (global nnz,)
            keep = uniform[l_lo - g_lo : l_hi - g_lo] >= p  # (nnz,)
            mask = keep.to(torch.float32) * (1.0 / (1.0 - p))
        eps = None
        if getattr(self.model, "variational", False):
            latent = int(self.model.latent_dim)  # type: ignore[arg-type]
            noise = torch.randn(stop - start, latent, device=self.device)  # (global batch, latent)
            eps = noise[lo - start : hi - start]
        return batch.with_noise(dropout_mask=mask, eps=eps)

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        with cpu_runtime.reuse_freed_memory(self.device):
            return self._run_epoch_steps(epoch)

    def _run_epoch_steps(self, epoch: int) -> dict[str, float]:
        self.model.train()
        cfg = self.config
        n_users = self.data.n_users
        perm = self._permutation(epoch)
        shuffled = self._training_matrix().shuffled(perm) if self.sparse_input else None
        # Summed on the device: no host synchronization per step.
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, nll, kl
        beta = 0.0
        start_time = time.perf_counter()
        bar = _progress(self.options.progress and self.is_main, n_users, f"epoch {epoch}")
        for b in range(self.steps_per_epoch):
            start, stop = b * cfg.batch_size, min((b + 1) * cfg.batch_size, n_users)
            offset_lo, offset_hi = dist_utils.shard_range(stop - start, self.rank, self.world_size)
            lo, hi = start + offset_lo, start + offset_hi
            x: Tensor | SparseBatch
            if shuffled is not None:
                x = self._sparse_batch(shuffled, start, stop, lo, hi)
            else:
                x = _batch_tensor(self.data.matrix, perm[lo:hi], self.device)
            beta = anneal_beta(
                self.state.step, beta_max=self.beta_max, anneal_steps=self.anneal_steps
            )
            if self.world_size > 1:
                # DDP averages gradients over ranks: dividing each shard's sums by
                # batch / world_size makes that average the gradient of the global batch mean.
                weight = (stop - start) / self.world_size
                loss, nll, kl = self._loss(x, beta, denominator=weight)
            else:
                weight = float(stop - start)
                loss, nll, kl = self._loss(x, beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            self.optimizer.step()
            self.state.step += 1
            totals += torch.stack([loss.detach(), nll.detach(), kl.detach()]).double() * weight
            if bar is not None:
                bar.update(stop - start)
                if b % _BAR_EVERY == 0 or b == self.steps_per_epoch - 1:
                    # Reading the loss waits for the device: only every few steps.
                    elapsed = max(time.perf_counter() - start_time, 1e-9)
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.2f}",
                        beta=f"{beta:.3f}",
                        users_s=f"{bar.n / elapsed:,.0f}",
                    )
        if bar is not None:
            bar.close()
        if self.world_size > 1:
            dist_utils.all_reduce_sum(totals)
        loss_sum, nll_sum, kl_sum = totals.tolist()  # waits for the device
        seconds = time.perf_counter() - start_time
        return {
            "loss": loss_sum / n_users,
            "nll": nll_sum / n_users,
            "kl": kl_sum / n_users,
            "beta": beta,
            "epoch_seconds": seconds,
            "users_per_second": n_users / seconds,
        }

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights (mean over users with targets).

        Computes only the metrics that are reported and selected on. Under DDP each rank
        scores a shard of the validation users and the per-metric sums are all-reduced, so every
        rank gets the same values.
        """
        if self.validation is None:
            return {}
        names = list(dict.fromkeys((*_VALIDATION_METRICS, self.config.select_metric)))
        bases, ks = [], []
        for name in names:
            base, _, k = name.partition("@")
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"validation metric {name!r} must look like 'ndcg@100'")
            bases.append(base)
            ks.append(int(k))
        fold_in = self.validation.fold_in.matrix
        targets = self.validation.targets.matrix
        if self.world_size > 1:
            lo, hi = dist_utils.shard_range(fold_in.shape[0], self.rank, self.world_size)
            fold_in, targets = fold_in[lo:hi], targets[lo:hi]
        ranker: Any
        if self.sparse_input:
            ranker = _SparseRanker(self.model, self.data.n_items, self.device)
        else:
            ranker = Recommender(self.model, self.config, self.data.item_ids)
        result = evaluate(
            ranker,
            fold_in,
            targets,
            ks=sorted(set(ks)),
            batch_size=self.options.eval_batch_size,
            device=str(self.device),
            metrics=list(dict.fromkeys(bases)),
        )
        if self.world_size == 1:
            return {f"val_{name}": result.mean(name) for name in names}
        sums = torch.zeros((len(names), 2), dtype=torch.float64, device=self.device)
        for i, name in enumerate(names):
            values = result.per_user[name][result.user_has_targets]
            sums[i, 0], sums[i, 1] = float(values.sum()), float(values.size)
        dist_utils.all_reduce_sum(sums)
        return {
            f"val_{name}": float(sums[i, 0] / sums[i, 1]) if sums[i, 1] > 0 else math.nan
            for i, name in enumerate(names)
        }

    def fit(self) -> Recommender:
        """Train (resuming from a checkpoint when one exists) and return the best model."""
        resumed = self.try_resume()
        self._resumed_from = self.state.epoch if resumed else 0
        if not resumed and self.initial_state is not None:
            self.model.load_state_dict(self.initial_state)
        with cpu_runtime.reuse_freed_memory(self.device):
            self._fit_loop()
        return self._finish()

    def _fit_loop(self) -> None:
        cfg = self.config
        s = self.state
        while s.epoch < cfg.epochs and not s.stopped_early:
            epoch = s.epoch + 1
            metrics = self._run_epoch(epoch)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"training diverged at epoch {epoch} (loss={metrics['loss']}); "
                    "lower learning_rate"
                )
            # The loss is that of the weights before the epoch's last step: that step can
            # still have made them non-finite (e.g. a huge learning rate).
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()])
            if not bool(finite.all()):  # one device synchronization
                raise FloatingPointError(
                    f"training diverged at epoch {epoch} (weights are no longer finite); "
                    "lower learning_rate"
                )
            if self.validation is not None and (
                epoch % self.options.validate_every == 0 or epoch == cfg.epochs
            ):
                try:
                    metrics.update(self.validate())
                except NaNScoresError:
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch} (the model's scores are NaN); "
                        "lower learning_rate"
                    ) from None
                score = metrics[f"val_{cfg.select_metric}"]
                if score > s.best_score:
                    s.best_score, s.best_epoch, s.bad_epochs = score, epoch, 0
                    s.best_state = {
                        k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                    }
                else:
                    s.bad_epochs += 1
                    if cfg.patience is not None and s.bad_epochs >= cfg.patience:
                        s.stopped_early = True
            elif self.validation is None:
                s.best_epoch = epoch
            s.epoch = epoch
            s.history.append({"epoch": float(epoch), **metrics})
            # A checkpoint of a large catalog is hundreds of MB (weights, best weights, Adam
            # moments): on a GPU writing it every epoch can cost more than the epoch itself.
            last = s.epoch >= cfg.epochs or s.stopped_early
            if epoch % self.options.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if not self.is_main:
                continue
            logger.info(
                "epoch %d/%d loss %.3f beta %.3f %s(%.1fs)",
                epoch,
                cfg.epochs,
                metrics["loss"],
                metrics["beta"],
                "".join(f"{k} {v:.4f} " for k, v in metrics.items() if k.startswith("val_")),
                metrics["epoch_seconds"],
            )
            if self.on_epoch is not None:
                self.on_epoch(epoch, dict(metrics))

    def _finish(self) -> Recommender:
        s = self.state
        if s.best_state is not None:
            self.model.load_state_dict(s.best_state)
        self.model.eval()
        meta: dict[str, Any] = {
            "best_epoch": s.best_epoch,
            "epochs_run": s.epoch,
            "stopped_early": s.stopped_early,
            "data_fingerprint": self._fingerprint,
            "history": s.history,
            "device": str(self.device),
        }
        if getattr(self, "_resumed_from", 0):
            meta["resumed_from_epoch"] = self._resumed_from  # the epochs before were not run now
        if self.validation is not None:
            meta[f"val_{self.config.select_metric}"] = s.best_score
            best = next((h for h in s.history if int(h["epoch"]) == s.best_epoch), None)
            if best is not None:
                meta["validation"] = {k[4:]: v for k, v in best.items() if k.startswith("val_")}
                if isinstance(self.config, MultVAEConfig) and self.config.beta_search:
                    meta["best_beta"] = best["beta"]
        return Recommender(
            self.model,
            self.config,
            self.data.item_ids,
            user_ids=self.data.user_ids,
            train_matrix=self.data.matrix,
            meta=meta,
        )


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional on lean GPU images
        return None
    # disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="user", leave=False, disable=None)


#: Trainer class per model name; models not listed here use :class:`Trainer`. A model module
#: that needs its own loop (e.g. ``recvae.recvae_model``) registers with :func:`register_trainer`.
TRAINER_TYPES: dict[str, type[Trainer]] = {}


def _check_loop_options(cls: type[Trainer], config: ModelConfig, options: RunOptions) -> None:
    """Refuse the run options that a trainer with its own epoch loop (RecVAE's) would ignore:
    that loop runs eagerly in float32, in one process."""
    if cls._run_epoch is Trainer._run_epoch:
        return
    if options.distributed:
        raise ValueError(
            f"{cls.__name__} has its own epoch loop and does not support distributed training"
        )
    if options.precision != "fp32":
        raise ValueError(
            f"{cls.__name__} (model {config.model!r}) has its own epoch loop, which runs in "
            f"float32: precision {options.precision!r} is not supported (use fp32)"
        )
    if options.compile:
        raise ValueError(
            f"{cls.__name__} (model {config.model!r}) has its own epoch loop, which "
            "torch.compile does not apply to: compile is not supported"
        )


def check_run_options(config: ModelConfig, options: RunOptions) -> None:
    """Fail before training when ``options`` cannot apply to ``config``'s trainer.

    Raises:
        ValueError: ``precision = "bf16"``, ``compile`` or ``distributed`` for a model whose
            trainer has its own epoch loop (RecVAE), which would ignore them.
    """
    _check_loop_options(TRAINER_TYPES.get(config.model, Trainer), config, options)


def register_trainer(model: str) -> Callable[[type[Trainer]], type[Trainer]]:
    """Class decorator: make :func:`train` use this trainer for configs named ``model``."""

    def decorator(cls: type[Trainer]) -> type[Trainer]:
        TRAINER_TYPES[model] = cls
        return cls

    return decorator


def train(
    data: Interactions,
    config: ModelConfig,
    *,
    validation: HeldOut | None = None,
    options: RunOptions | None = None,
    on_epoch: EpochCallback | None = None,
    initial_state: Mapping[str, Tensor] | None = None,
) -> Recommender:
    """Train a model and return it as a :class:`Recommender` (best validation epoch).

    Args:
        data: Training users' interactions.
        config: A ``MultVAEConfig`` or ``MultDAEConfig``.
        validation: Held-out users for model selection and early stopping.
        options: Device, threads, checkpointing (resume is automatic), progress bar,
            precision (bf16 autocast), compile, distributed (see :mod:`recvae.distributed`).
        on_epoch: Telemetry hook ``on_epoch(epoch, metrics)``.
        initial_state: A full state dict to start from (a warm start); used only when no
            checkpoint is resumed.

    Raises:
        ValueError: empty data, a vocabulary mismatch with ``validation`` (other item ids, or
            the same in another order), a ``validation`` with no user with targets, or
            distributed training without a process group.
        TypeError: an argument of the wrong type (e.g. a ``Split`` for ``data``: pass
            ``split.train``; a dict for ``config`` or ``options``).
        CheckpointMismatchError: the checkpoint directory holds another run's checkpoint.
        FloatingPointError: the loss became NaN or infinite.
    """
    _check_train_arguments(data, config, validation, options, on_epoch)
    trainer_cls = TRAINER_TYPES.get(config.model, Trainer)
    trainer = trainer_cls(data, config, validation=validation, options=options, on_epoch=on_epoch)
    trainer.initial_state = initial_state
    return trainer.fit()
