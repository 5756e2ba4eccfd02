"""Distributed data parallel from torchrun's environment: gloo on CPU, NCCL on CUDA.

``torchrun --nproc_per_node N -m refiner_vit train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
without them everything runs in one process and the helpers here are no-ops.
"""
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import UsageError

__all__ = ['DistContext', 'all_reduce_sums', 'init_distributed', 'resolve_device', 'shutdown_distributed']


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``--device``: 'auto' (CUDA when available), 'cpu', 'cuda' (this process's local GPU) or 'cuda:N'."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise UsageError(f'--device {device}: CUDA is not available on this machine')
        return torch.device('cuda', local_rank) if device == 'cuda' else torch.device(device)
    if device != 'cpu':
        raise UsageError(f"--device {device}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device('cpu')


def init_distributed(device: str = 'auto') -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if resolved.type == 'cuda' else 'gloo'
        if resolved.type == 'cuda':
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, resolved)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list:
    """Sum each value over all processes (float64, so counts stay exact); identity without DDP."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
