"""Distributed data parallel from torchrun's environment: gloo on CPU, NCCL on CUDA.

``torchrun --nproc_per_node N -m refiner_vit train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
without them everything runs in one process and the helpers here are no-ops.

Restarts (``torchrun --max-restarts``). torchrun's agent serves one TCPStore for the whole job
(``TORCHELASTIC_USE_AGENT_STORE=True``) and starts every round's workers on the same ``MASTER_ADDR:MASTER_PORT``.
torch's ``env://`` rendezvous connects to that store without a per-round key prefix, so a restarted round reads
the keys the killed round left there: gloo's full-mesh setup then connects to the dead workers' addresses
(``connectFullMesh ... Connection refused``) or waits for keys that are already consumed (a hang without CPU
use). :func:`init_distributed` therefore builds the group on a store of the round's own (:func:`_round_store`),
so every round starts from empty keys.

Timeouts (``--dist-timeout``). Joining the group and every collective are bounded: a peer that died ends the run
at once (its socket closes), one that stalls ends it after the timeout, and :func:`collective_faults` turns the
backend's error into a :class:`~refiner_vit.errors.DistributedFaultError` naming this rank and what it waited for.
"""
import os
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedFaultError

__all__ = ['DistContext', 'all_reduce_max', 'all_reduce_sums', 'collective_faults', 'init_distributed',
           'resolve_device', 'shutdown_distributed']


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
    """``--device``: 'auto' (CUDA when available), 'cpu', 'cuda' (this process's local GPU) or 'cuda:N'.

    Raises:
        ConfigError: CUDA asked for on a machine without it, or a device name that is none of these.
    """
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {device}: CUDA is not available on this machine')
        return torch.device('cuda', local_rank) if device == 'cuda' else torch.device(device)
    if device != 'cpu':
        raise ConfigError(f"--device {device}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device('cpu')


def _fault_detail(error: BaseException) -> str:
    """The backend's message, first line, without the source-file prefix gloo puts before it."""
    line = next((s.strip() for s in str(error).splitlines() if s.strip()), type(error).__name__)
    if line.startswith('[') and '] ' in line:
        line = line.split('] ', 1)[1]
    line = line.split('. This is typically', 1)[0]  # gloo's advice to read the other worker's log follows
    return line if len(line) <= 200 else line[:197] + '...'


def _is_collective_fault(error: BaseException) -> bool:
    """A failure of the communication itself (a peer died, stalled or never came), not a bug of the training."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ('/gloo/', 'Gloo', 'NCCL', 'Connection closed by peer', 'Connection reset by peer',
                                  'Timed out waiting'))


@contextmanager
def collective_faults(rank: int, what: object, timeout_minutes: float) -> Iterator[None]:
    """Turn a failed collective (or group setup) inside the block into one :class:`DistributedFaultError` line:
    this process's rank, what it waited for (``str(what)`` when it failed, so a caller can keep it current), the
    backend's reason and what to do."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DistributedFaultError) or not _is_collective_fault(e):
            raise
        detail = _fault_detail(e)
        stalled = 'timed out' in detail.lower() or 'timeout' in detail.lower()
        cause = f'no answer within --dist-timeout {timeout_minutes:g} min' if stalled else 'a peer process failed'
        raise DistributedFaultError(
            f'rank {rank}: {cause} while waiting for {what} ({detail}); the last checkpoint is intact: torchrun '
            '--max-restarts restarts the workers, or rerun with --resume auto') from e


def _reachable(host: str, port: int) -> bool:
    """Whether something listens at ``host:port`` (a plain socket: no retries and no log lines of c10d's)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _round_store(rank: int, timeout: timedelta, timeout_minutes: float) -> dist.Store:
    """A TCPStore of this restart round only, found through torchrun's agent store (see the module docstring).

    Rank 0 (on ``MASTER_ADDR``'s node) serves a new store on a free port and publishes ``port nonce`` under one
    key of the agent store; the others read that key until it names a store that answers with that nonce. A value
    left by an earlier round names a store whose process is gone (or, the port being reused, another nonce), so
    no round ever reads another round's keys, whatever each agent's restart count is (a node that restarts for a
    membership change does not count it).
    """
    host = os.environ['MASTER_ADDR']
    agent = dist.TCPStore(host, int(os.environ['MASTER_PORT']), is_master=False, timeout=timeout)
    key = f"refiner_vit/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/round_store"
    if rank == 0:
        nonce = secrets.token_hex(8)
        store = dist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
        store.set('nonce', nonce)
        agent.set(key, f'{store.port} {nonce}')
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        port, nonce = agent.get(key).decode().split()
        if _reachable(host, int(port)):
            store = dist.TCPStore(host, int(port), None, False, timeout)
            if store.get('nonce').decode() == nonce:
                return store
        time.sleep(0.2)
    raise DistributedFaultError(
        f'rank {rank}: no answer within --dist-timeout {timeout_minutes:g} min while waiting for rank 0 to start '
        f"this round's store (published through torchrun's store at {host}:{os.environ['MASTER_PORT']})")


def init_distributed(device: str, timeout_minutes: float) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Raises:
        DistributedFaultError: the other processes did not all join within ``timeout_minutes``.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if resolved.type == 'cuda' else 'gloo'
        if resolved.type == 'cuda':
            torch.cuda.set_device(resolved)
        timeout = timedelta(minutes=timeout_minutes)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        with collective_faults(rank, f'all {world_size} processes to join the group at {where}', timeout_minutes):
            if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == str(True):
                dist.init_process_group(backend, store=_round_store(rank, timeout, timeout_minutes), rank=rank,
                                        world_size=world_size, timeout=timeout)
            else:
                dist.init_process_group(backend, timeout=timeout)
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


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all processes; identity without DDP."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
