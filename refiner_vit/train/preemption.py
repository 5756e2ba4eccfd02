"""Preemption: SIGTERM or SIGUSR1 stops the run at the next step boundary with a checkpoint of that step.

SLURM, Kubernetes and spot instances send SIGTERM some time before SIGKILL; SLURM's ``--signal`` sends SIGUSR1
(or what it names) earlier still. The handler only records the signal. The training loop asks
:meth:`PreemptionNotice.agreed` after every update; under DDP that is one all-reduce (max), because a signal
reaches the processes at different moments and all of them must stop after the same step, where rank 0 writes
the checkpoint of every rank's state.

The handlers exist only while a run trains (installed and restored by :func:`preemption_notice`) and only in
the main thread, where Python delivers signals. Loader workers ignore these signals
(:func:`refiner_vit.data.loader.ignore_preemption_signals`): when a scheduler signals the whole process group,
they keep serving batches until the main process has saved and stopped them.
"""
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Dict, Iterator, Optional

import torch

from .distributed import all_reduce_max

__all__ = ['PREEMPTION_SIGNALS', 'PreemptionNotice', 'preemption_notice']

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionNotice:
    """The preemption signal this process received (0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0

    def handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """A signal received by any process (the same answer on all of them); 0 if none. A collective under DDP."""
        return all_reduce_max(self.signum, device)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


@contextmanager
def preemption_notice() -> Iterator[PreemptionNotice]:
    """Record SIGTERM / SIGUSR1 instead of dying on them while the block runs (main thread only; elsewhere the
    notice never fires); the previous handlers come back after."""
    notice = PreemptionNotice()
    previous: Dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in PREEMPTION_SIGNALS:
            previous[signum] = signal.signal(signum, notice.handle)
    try:
        yield notice
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
