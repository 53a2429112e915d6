"""What one process sees of ``torch.distributed``: the model inside its data-parallel wrapper, the
number of processes, and this process's share of an importance pass.

Below the plugin, the distributed helpers (:mod:`avalanche_spg.distributed`) and checkpoints
(:mod:`avalanche_spg.checkpoint`), which all need it; it imports nothing from Avalanche. Outside a
process group every function here describes a single process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["unwrap_model", "world_size", "distributed_shard"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def world_size() -> int:
    """Processes in the torch.distributed process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed_shard(total: int) -> tuple[list[int], Callable[[list[Tensor]], None]] | None:
    """This rank's positions among ``total`` samples (every ``world``-th one, from its rank)
    and an in-place summing all-reduce of a list of tensors; ``None`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(tensors: list[Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    return list(range(rank, total, world)), all_reduce_sum
