"""Running the same loop on several processes with PyTorch's own engines: DDP and FSDP2.

``torchrun --nproc_per_node N`` starts N copies of a script and tells each its ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` through environment variables. :func:`init_distributed` reads
them and joins the process group (NCCL between GPUs, gloo between CPU processes).

* **DDP** keeps a full copy of the model on every rank and averages gradients after backward.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) shards every parameter, gradient and optimizer
  state across ranks; each decoder layer gathers its full weights just before it runs and frees
  them after. Both average gradients over ranks, so the trainer scales each rank's loss by
  ``world_size`` to get the gradient of the *sum* over the global batch divided by its token count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "wrap_model", "all_reduce_sum", "is_main_process", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` (or the caller) set up; a single process needs nothing.

    ``device=None`` picks ``cuda:LOCAL_RANK`` if CUDA is available, else the CPU; ``backend=None``
    picks NCCL for CUDA and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, local_rank, world, device)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (``model.model.layers`` for Qwen and HF Qwen2)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def wrap_model(model: nn.Module, parallel: str, info: DistInfo) -> nn.Module:
    """``"none"`` -> the model; ``"ddp"`` -> ``DistributedDataParallel``; ``"fsdp"`` -> FSDP2 in place."""
    if parallel == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"parallel={parallel!r} needs torch.distributed; launch with torchrun "
                           "(or call init_distributed inside an initialised process group)")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # torch < 2.6 has it under _composable
            raise RuntimeError("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6") from exc
        mesh = None
        if info.device.type == "cpu":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (info.world_size,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embedding (tied head), final norm
        return model
    raise ValueError(f"parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")
