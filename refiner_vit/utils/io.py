"""File I/O that loses nothing and executes nothing.

* Writes are atomic: a temporary file in the destination folder is written, flushed, fsynced and renamed
  over the destination, so a crash or a full disk leaves the previous file intact.
* Loads never unpickle arbitrary objects: ``.safetensors`` files are read with safetensors, anything else
  with ``torch.load(weights_only=True)`` where only tensors, containers and an explicit allow-list of
  harmless classes (``argparse.Namespace`` in the authors' training checkpoints) may appear.
"""
import argparse
import errno
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, List, Tuple, Union

import torch
from safetensors.torch import load_file as load_safetensors

from ..errors import OutputWriteError, WeightsError

__all__ = ['atomic_write', 'atomic_torch_save', 'remove_stale_temps', 'load_torch_file', 'load_state_dict_file',
           'SAFE_GLOBALS']

PathLike = Union[str, os.PathLike]

# Classes a checkpoint may contain besides tensors and plain containers.
SAFE_GLOBALS = (argparse.Namespace,)


def _create_temp(path: Path) -> Tuple[int, str]:
    """A new, empty temporary file beside ``path`` (``.NAME.<random>.tmp``), open for writing.

    Created with mode 0666 less the process umask, as ``open()`` creates files, so the renamed file gets the
    usual mode without anyone reading or changing the umask (``tempfile.mkstemp`` would make it 0600).
    """
    for _ in range(100):
        name = str(path.parent / f'.{path.name}.{secrets.token_hex(4)}.tmp')
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f'no free temporary name beside {path}')


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` atomically: all of the new content or the old file untouched.

    Raises:
        OutputWriteError: the folder, the temporary file, a write, the fsync or the rename failed (ENOSPC, EIO,
            EROFS, EACCES, ...); the temporary file is gone and ``path`` is as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = _create_temp(path)
    except OSError as e:
        raise OutputWriteError(f'cannot write {path}: {e.strerror or e}') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputWriteError(f'cannot write {path}: {e.strerror or e}; the previous file is unchanged') from e
        raise
    _fsync_dir(path.parent)


def remove_stale_temps(folder: PathLike) -> List[Path]:
    """Delete the temporary files that writes killed before their rename left in ``folder`` (call it only where
    no other process is writing there). Returns what was deleted."""
    stale = [p for p in Path(folder).glob('.*.tmp') if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f'{path}: no such file')
    return path


def load_torch_file(path: PathLike, extra_safe_globals: Iterable[type] = ()) -> Any:
    """Load a ``torch.save`` file without executing code (``weights_only=True``).

    Raises:
        WeightsError: the file is missing, is not a torch file, or holds pickled objects outside the
            allow-list (such a file is refused before any of its code runs).
    """
    path = _existing_file(path)
    allowed = list(SAFE_GLOBALS) + list(extra_safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for foreign files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        blocked = next((line for line in lines if 'GLOBAL' in line or 'Unsupported global' in line), None)
        if blocked is not None:
            raise WeightsError(
                f'{path}: refused: the file pickles Python objects that are not weights ({blocked}). Nothing '
                'from it was executed. Re-save it as a plain state dict or as safetensors with a trusted tool.'
            ) from e
        detail = next((line for line in lines if line.startswith('Unsupported operand')), lines[0] if lines else '')
        raise WeightsError(f'{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {detail})') from e


def load_state_dict_file(path: PathLike) -> Any:
    """Load weights from ``.safetensors`` or a torch file, safely (see :func:`load_torch_file`).

    Raises:
        WeightsError: the file is missing or unreadable, or a torch file that :func:`load_torch_file` refuses.
    """
    path = _existing_file(path)
    if path.suffix == '.safetensors':
        try:
            return load_safetensors(str(path))
        except Exception as e:
            raise WeightsError(f'{path}: not a readable safetensors file ({e})') from e
    return load_torch_file(path)
