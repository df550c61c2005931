"""The training loop: Adam over shuffled user batches, KL annealing, validation, checkpoints.

The loop densifies one batch of CSR rows at a time (never the whole matrix), validates on
held-out users after every epoch, keeps the best epoch's weights, stops early on a patience,
and writes a checkpoint every epoch from which an interrupted run resumes exactly.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from recvae.config import ModelConfig, MultVAEConfig, RunOptions
from recvae.data.interactions import Interactions
from recvae.evaluation import evaluate
from recvae.model import anneal_beta, build_model, gaussian_kl, l2_penalty, multinomial_nll
from recvae.recommender import Recommender, resolve_device
from recvae.split import HeldOut

__all__ = ["train", "Trainer", "EpochCallback", "CheckpointMismatchError", "beta_schedule"]

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_NAME = "checkpoint.pt"
_VALIDATION_METRICS = ("ndcg@100", "recall@20", "recall@50")


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


def _batch_tensor(matrix: sp.csr_array, rows: np.ndarray, device: torch.device) -> Tensor:
    # Densify only this batch's rows: (batch, n_items).
    dense = np.asarray(matrix[rows].toarray(), dtype=np.float32)
    return torch.from_numpy(dense).to(device, non_blocking=True)


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
        options: Device, threads, checkpoint directory, progress bar.
        on_epoch: Called as ``on_epoch(epoch, metrics)`` after every epoch (1-based).
    """

    def __init__(
        self,
        data: Interactions,
        config: ModelConfig,
        *,
        validation: HeldOut | None = None,
        options: RunOptions | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        if data.n_users == 0 or data.nnz == 0:
            raise ValueError("cannot train on an empty matrix (no training users)")
        if validation is not None and validation.fold_in.n_items != data.n_items:
            raise ValueError(
                f"validation has {validation.fold_in.n_items} items but training data has "
                f"{data.n_items}: both must share the training item vocabulary"
            )
        self.data = data
        self.config = config
        self.validation = validation
        self.options = options or RunOptions()
        self.on_epoch = on_epoch
        self.device = resolve_device(self.options.device)
        if self.options.num_threads is not None:
            torch.set_num_threads(self.options.num_threads)
        self.steps_per_epoch = math.ceil(data.n_users / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.beta_max, self.anneal_steps = beta_schedule(config, self.total_steps)
        torch.manual_seed(config.seed)
        self.model: nn.Module = build_model(config, data.n_items).to(self.device)
        # Weight decay is the paper's explicit L2 term in the loss, not Adam's coupled decay.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.state = _State()
        self.checkpoint_path = (
            Path(self.options.checkpoint_dir) / CHECKPOINT_NAME
            if self.options.checkpoint_dir
            else None
        )
        self._fingerprint = data.fingerprint()

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_payload(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": 1,
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
        """Write the checkpoint atomically (temp file + rename)."""
        if self.checkpoint_path is None:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self._checkpoint_payload(), tmp)
        os.replace(tmp, self.checkpoint_path)

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
            raise CheckpointMismatchError(
                f"checkpoint {self.checkpoint_path} is unreadable ({exc}); remove it to start over"
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
    def _loss(self, x: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        logits, mu, logvar = self.model(x)
        nll = multinomial_nll(logits, x)
        kl = gaussian_kl(mu, logvar) if logvar is not None else torch.zeros((), device=x.device)
        loss = nll + beta * kl
        if self.config.weight_decay > 0:
            loss = loss + self.config.weight_decay * l2_penalty(self.model)
        return loss, nll, kl

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        cfg = self.config
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(self.data.n_users)
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
        beta = 0.0
        start = time.perf_counter()
        bar = _progress(self.options.progress, self.data.n_users, f"epoch {epoch}")
        for b in range(self.steps_per_epoch):
            rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = _batch_tensor(self.data.matrix, rows, self.device)
            beta = anneal_beta(
                self.state.step, beta_max=self.beta_max, anneal_steps=self.anneal_steps
            )
            loss, nll, kl = self._loss(x, beta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state.step += 1
            n = len(rows)
            totals["loss"] += float(loss.detach()) * n
            totals["nll"] += float(nll.detach()) * n
            totals["kl"] += float(kl.detach()) * n
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(n)
                bar.set_postfix(
                    loss=f"{float(loss):.2f}",
                    beta=f"{beta:.3f}",
                    users_s=f"{bar.n / elapsed:,.0f}",
                )
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        metrics = {k: v / self.data.n_users for k, v in totals.items()}
        metrics.update(
            {
                "beta": beta,
                "epoch_seconds": seconds,
                "users_per_second": self.data.n_users / seconds,
            }
        )
        return metrics

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current weights (mean over users with targets)."""
        if self.validation is None:
            return {}
        ranker = Recommender(self.model, self.config, self.data.item_ids)
        result = evaluate(
            ranker,
            self.validation.fold_in.matrix,
            self.validation.targets.matrix,
            ks=(20, 50, 100),
            batch_size=self.options.eval_batch_size,
            device=str(self.device),
        )
        names = dict.fromkeys((*_VALIDATION_METRICS, self.config.select_metric))
        return {f"val_{name}": result.mean(name) for name in names}

    def fit(self) -> Recommender:
        """Train (resuming from a checkpoint when one exists) and return the best model."""
        self.try_resume()
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
            if self.validation is not None and (
                epoch % self.options.validate_every == 0 or epoch == cfg.epochs
            ):
                metrics.update(self.validate())
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
            self.save_checkpoint()
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
        return self._finish()

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


def train(
    data: Interactions,
    config: ModelConfig,
    *,
    validation: HeldOut | None = None,
    options: RunOptions | None = None,
    on_epoch: EpochCallback | None = None,
) -> Recommender:
    """Train a model and return it as a :class:`Recommender` (best validation epoch).

    Args:
        data: Training users' interactions.
        config: A ``MultVAEConfig`` or ``MultDAEConfig``.
        validation: Held-out users for model selection and early stopping.
        options: Device, threads, checkpointing (resume is automatic), progress bar.
        on_epoch: Telemetry hook ``on_epoch(epoch, metrics)``.

    Raises:
        ValueError: empty data or a vocabulary mismatch with ``validation``.
        CheckpointMismatchError: the checkpoint directory holds another run's checkpoint.
        FloatingPointError: the loss became NaN or infinite.
    """
    return Trainer(data, config, validation=validation, options=options, on_epoch=on_epoch).fit()
