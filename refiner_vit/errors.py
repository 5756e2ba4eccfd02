"""The library's errors, and the exit code each has when the command line reports it as one line.

The library raises standard exception types (``ValueError``, ``OSError``, ``RuntimeError``) through the
subclasses below, so a caller can catch either; each message names the offending thing (file, folder, key,
shape, setting). :class:`UsageError` alone belongs to the command line (``refiner_vit.cli`` and
``refiner_vit.commands``): a flag or an argument that makes no sense. :func:`refiner_vit.cli.main` turns exactly
the classes of :data:`EXIT_CODES` into one line on stderr and their exit code (the traceback only with
``--debug``); any other exception is a bug and keeps its traceback.

Bad input (a flag, a setting, a data folder, a weights file) is 2 and Ctrl-C 130. A run whose loss became NaN or
infinite exits 3: retrying it as it is would diverge again, so it is neither bad input nor a fault to retry. The
faults of a cluster (docs/reliability.md) have codes a scheduler can act on: a preempted run (SIGTERM / SIGUSR1)
exits 143, as a process killed by SIGTERM reports itself (128 + 15), so SLURM, Kubernetes and torchrun treat it
as terminated, not as a crash of the program; a fault worth retrying with ``--resume auto`` (a peer or a loader
worker that died or stalled) exits 75 (``EX_TEMPFAIL`` of sysexits.h); an output that cannot be written (full
disk, read-only folder, I/O error) exits 74 (``EX_IOERR``).
"""
from typing import Dict, Optional, Type

__all__ = ['EXIT_CODES', 'ConfigError', 'DataError', 'DistributedFaultError', 'LoaderWorkerError',
           'OutputWriteError', 'RunInterruptedError', 'RunPreemptedError', 'TrainingDivergedError', 'UploadError',
           'UsageError', 'WeightsError', 'exit_code']


class UsageError(Exception):
    """A command-line flag or argument that makes no sense (raised only by ``refiner_vit.cli`` and
    ``refiner_vit.commands``). The message names the flag."""


class RunInterruptedError(Exception):
    """Ctrl-C. The message says what was kept and how to continue."""


class UploadError(ValueError):
    """A file given to ``refiner app`` that it refuses: too many bytes or pixels, or not an image. The message is
    shown in the page and names the file."""


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, unreadable, unsafe (pickled objects that are not tensors),
    holding no weights, not a training checkpoint where one is needed, or not fitting the model. Raised by
    :mod:`refiner_vit.utils.io`'s loaders (any torch file: weights, checkpoints, relabel maps) and
    :mod:`refiner_vit.models.weights`; the message names the file and the keys."""


class DataError(ValueError):
    """A dataset that cannot be used: a data folder that is missing or malformed (no train/ and val/, no class
    folders, classes that differ between the splits), an unreadable image, a missing or foreign relabel map, a
    timm dataset that cannot be opened, a named dataset whose package is not installed, or a set too small for a
    batch. Raised by :mod:`refiner_vit.data` and
    the trainer; the message names the folder, the file or the dataset spec."""


class ConfigError(ValueError):
    """Settings that cannot run: an unknown benchmark mode, a device or precision this machine lacks, model
    arguments the model refuses, an output folder that holds another run or cannot be written to, a checkpoint
    that another model or process count wrote, a regulariser the model has no layers for, or an optional package
    that is not installed. The message names the setting (by its flag, as the command line spells it)."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite. Nothing was written for that step, so the last checkpoint is the
    last good state; the message names the epoch and the step and how to resume (a lower ``--lr``,
    ``--clip-grad``)."""


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


# The errors the command line reports as one line, and their exit codes (the module docstring says why).
EXIT_CODES: Dict[Type[Exception], int] = {
    UsageError: 2,
    ConfigError: 2,
    DataError: 2,
    WeightsError: 2,
    TrainingDivergedError: 3,
    OutputWriteError: 74,
    DistributedFaultError: 75,
    LoaderWorkerError: 75,
    RunInterruptedError: 130,
    RunPreemptedError: 143,
}


def exit_code(error: BaseException) -> Optional[int]:
    """The exit code of an error the command line reports as one line; None for any other exception (a bug,
    which keeps its traceback)."""
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), None)
