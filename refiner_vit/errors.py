"""Errors the command line reports as one line, each with its exit code (``refiner_vit.cli.main``).

Bad input is 2 and Ctrl-C 130. The faults of a cluster (docs/reliability.md) have codes a scheduler can act on:
a preempted run (SIGTERM / SIGUSR1) exits 143, as a process killed by SIGTERM reports itself (128 + 15), so
SLURM, Kubernetes and torchrun treat it as terminated, not as a crash of the program; a fault worth retrying
with ``--resume auto`` (a peer or a loader worker that died or stalled) exits 75 (``EX_TEMPFAIL`` of
sysexits.h); an output that cannot be written (full disk, read-only folder, I/O error) exits 74 (``EX_IOERR``).
"""

__all__ = ['DistributedFaultError', 'LoaderWorkerError', 'OutputWriteError', 'RunInterruptedError',
           'RunPreemptedError', 'UploadError', 'UsageError', 'WeightsError']


class UsageError(Exception):
    """Bad input (flag, file, key, shape, data folder). The message must name the offending thing."""


class RunInterruptedError(Exception):
    """Ctrl-C. The message says what was kept and how to continue."""


class UploadError(ValueError):
    """A file given to ``refiner app`` that it refuses: too many bytes or pixels, or not an image. The message is
    shown in the page and names the file."""


class RunPreemptedError(RuntimeError):
    """SIGTERM or SIGUSR1 (a scheduler's preemption notice): every process stopped at a step boundary and
    ``checkpoint-last.pth`` holds that step. The message names the checkpoint and how to continue."""


class DistributedFaultError(RuntimeError):
    """A process of a distributed run died, stalled past ``--dist-timeout``, or never joined. The message names
    this process's rank and what it waited for; the last checkpoint is intact."""


class LoaderWorkerError(RuntimeError):
    """A data-loader worker process died (killed, out of memory); the last checkpoint is intact."""


class OutputWriteError(OSError):
    """A file of the output could not be written (no space, I/O error, read-only folder). The message names the
    file and the error; the previous version of the file is unchanged."""


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, unreadable, unsafe, holding no weights, or not fitting the
    model. The message names the file and the keys (``refiner_vit.models.weights``)."""
