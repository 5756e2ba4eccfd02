"""The ``--output`` folder of a run: checked before anything is built, written only once there is a result.

A folder that already holds a run is continued with ``--resume`` or replaced with ``--overwrite``, never written
over by accident. Nothing is written before the first epoch has been trained and evaluated (or the first
``--checkpoint-steps`` checkpoint is due): a start that fails (bad image, bad flag, Ctrl-C) leaves the folder as
it was, byte for byte.
"""
import os
import shutil
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError
from ..utils.io import remove_stale_temps
from .checkpoint import CHECKPOINT_NAME

__all__ = ['RUN_FILES', 'check_output', 'clear_run', 'run_files']

# What a run writes (docs/training.md); `tensorboard/` alone does not make a run.
RUN_FILES = (CHECKPOINT_NAME, 'metrics.jsonl', 'summary.json', 'config.yaml', 'best', 'curves.png', 'tensorboard')


def run_files(output: Path) -> List[str]:
    """The run outputs present in ``output`` (ignoring ``tensorboard/``, which other tools write too)."""
    return [name for name in RUN_FILES[:-1] if (output / name).exists()]


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(output: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse an output that cannot be written, or that holds a run and is neither resumed nor overwritten.

    Raises:
        ConfigError: naming ``--output`` and why, before anything is written.
    """
    if output.exists() and not output.is_dir():
        raise ConfigError(f'--output {output}: is a file, not a folder')
    existing = _nearest_existing(output)
    if not existing.is_dir():
        raise ConfigError(f'--output {output}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f'--output {output}: {existing} is not writable')
    found = run_files(output) if output.is_dir() else []
    if found and not (resume or overwrite):
        raise ConfigError(f'--output {output}: holds a run ({", ".join(found)}); continue it with --resume auto, '
                         'replace it with --overwrite, or give another --output')


def clear_run(output: Path) -> None:
    """Delete a previous run's outputs (``--overwrite``; only the files a run writes) and leftover temporaries."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    remove_stale_temps(output)
