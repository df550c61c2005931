"""Multi-process training with DistributedDataParallel: process group set-up and small helpers.

Start one process per GPU (or per CPU worker) with ``torchrun``, which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; call :func:`init_from_env`
once, then train with ``RunOptions(distributed=True)``. The trainer then

- splits every global batch (``config.batch_size`` users, the same batches as a single-process
  run) into one contiguous shard per rank (:func:`shard_range`),
- scales each rank's loss so that DDP's gradient average equals the gradient of the global
  batch's mean loss,
- draws the training noise (input dropout, reparameterization) for the whole global batch from
  the same seeded stream on every rank and keeps its own shard's part, so every user gets the
  noise it would get in a single-process run and the result does not depend on the number of
  ranks,
- validates a shard of the validation users per rank and all-reduces the metric sums,
- writes checkpoints and calls ``on_epoch`` on rank 0 only.

Only torch is needed; the NCCL backend is used on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "init_from_env",
    "destroy",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "local_rank",
    "local_device",
    "shard_range",
    "wrap_ddp",
    "all_reduce_sum",
    "broadcast_object",
    "barrier",
]

logger = logging.getLogger(__name__)

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the process group.

    Attributes:
        rank: Global rank, 0 to ``world_size - 1``.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        backend: ``"nccl"`` or ``"gloo"``.
        device: The device this rank trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(
    backend: str | None = None,
    *,
    device: str = "auto",
    timeout_s: float = 1800.0,
) -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"nccl"``, ``"gloo"``, or None for NCCL when CUDA is used and gloo otherwise.
        device: ``"auto"`` (this rank's GPU when CUDA is available, else the CPU), ``"cpu"``
            or ``"cuda"`` (GPU ``LOCAL_RANK``).
        timeout_s: Collective timeout in seconds.

    Returns:
        This process's :class:`DistributedContext` (also when the group already existed).

    Raises:
        ValueError: a torchrun variable is missing or malformed, or CUDA was asked for but is
            not available.
    """
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed training needs {', '.join(missing)} in the environment: start it "
            "with torchrun, e.g. `torchrun --nproc_per_node=2 -m pipelines.train_ddp ...`"
        )
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world_size}")
    dev = local_device(device)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        logger.info("rank %d/%d joined (%s on %s)", rank, world_size, backend, dev)
    return DistributedContext(rank, world_size, local_rank(), dist.get_backend(), dev)


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a single-process run."""
    return get_rank() == 0


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset)."""
    return _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0


def local_device(device: str = "auto") -> torch.device:
    """This rank's device: GPU ``LOCAL_RANK`` for ``"auto"``/``"cuda"`` with CUDA, else the CPU.

    An explicit ``"cuda:N"`` is returned as given.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available")
    if device.startswith("cuda:"):
        return torch.device(device)
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return torch.device("cuda", local_rank())


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``n`` items.

    Shares differ in size by at most one; with ``n < world_size`` some are empty.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """Wrap ``model`` (already on ``device``) in DDP; rank 0's weights are broadcast to all.

    Raises:
        ValueError: no process group (call :func:`init_from_env` first).
    """
    if not is_initialized():
        raise ValueError("no torch.distributed process group: call init_from_env() first")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op in a single process); returns it."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank ``src``'s ``value`` on every rank (pickled; for small things such as a path)."""
    if not is_initialized() or get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized() and get_world_size() > 1:
        dist.barrier()
