"""Preemption: SIGTERM or SIGUSR1 stops every process at one step boundary, with a checkpoint of that step.

SLURM, Kubernetes and spot instances send SIGTERM some time before SIGKILL; SLURM's ``--signal`` sends SIGUSR1
(or what it names) earlier still. The handler only records the signal. The training loop asks
:meth:`PreemptionNotice.agreed` after every update and at every epoch end. In one process the answer is the
signal itself, so the run stops after the very next step. Under DDP a signal reaches the processes at different
moments and all of them must stop after the same step, where rank 0 writes the checkpoint of every rank's state,
so they compare their signals with an all-reduce (max). That all-reduce and the read of its result would make the
host wait for the device on every step, so the processes compare only at every :data:`AGREEMENT_INTERVAL`-th
check: every process makes the same number of checks, hence they all compare, and stop, at the same step. A
preempted DDP run therefore trains up to ``AGREEMENT_INTERVAL - 1`` more steps (or an evaluation) before it
saves than one process would; the checkpoint holds the step it stopped at, so the resume stays exact.

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
import torch.distributed as dist

from .distributed import all_reduce_max

__all__ = ['AGREEMENT_INTERVAL', 'PREEMPTION_SIGNALS', 'PreemptionNotice', 'preemption_notice']

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Under DDP the processes compare their signals at every 16th check (one check per training step and one per epoch
# end): one host-device sync per 16 steps instead of one per step, for at most 15 more steps trained after a
# signal than in one process: seconds even for ImageNet-sized steps, inside the grace a scheduler gives before
# SIGKILL (torchrun's agent: 30 s).
AGREEMENT_INTERVAL = 16


class PreemptionNotice:
    """The preemption signal this process received (0: none yet), and the checks made so far under DDP."""

    def __init__(self, interval: int = AGREEMENT_INTERVAL) -> None:
        self.signum = 0
        self.interval = interval
        self.checks = 0

    def handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal to stop on now, the same on every process; 0 to go on.

        One process: its own signal. DDP: at every ``interval``-th call, the signal any process received (an
        all-reduce, a collective every process must reach with the same call count); 0 at the other calls.
        """
        if not dist.is_initialized():
            return self.signum
        self.checks += 1
        if self.checks % self.interval:
            return 0
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
