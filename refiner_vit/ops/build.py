"""Compile the native kernels of :mod:`refiner_vit.ops` on first use, cache the shared libraries, load them.

The kernels are plain C (no torch headers, so a build takes well under a second), compiled for this CPU
(``-march=native``, ``-mcpu=native`` on ARM) with OpenMP by the system compiler (``$CC``, default ``cc``; its
words are split, so ``CC='gcc -mno-avx512f'`` builds for AVX2 on an AVX-512 machine). A compiler without an OpenMP
runtime (clang without libomp) builds them for one thread, and the ops' rule measures them as they are. Each
shape (heads, kernel size, ...) is its own library, cached under ``$REFINER_KERNEL_CACHE`` (default
``~/.cache/refiner_vit/kernels``) by a digest of the sources, the compiler command and the CPU's feature flags, and
written atomically so that processes can build it at once.

A kernel that fails to build (no compiler, no OpenMP, a compiler error) is disabled on its own for the rest of
the process; the first failure warns once, and the ops run torch's operators instead.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

__all__ = ['ENV_CACHE', 'Library', 'cache_dir', 'cpu_flags', 'load']

ENV_CACHE = 'REFINER_KERNEL_CACHE'
CSRC = Path(__file__).parent / 'csrc'
_BUILD_TIMEOUT_S = 120


@dataclass(frozen=True)
class Library:
    """A loaded kernel library and the cache path it was loaded from (its name identifies source, shape and build)."""

    cdll: ctypes.CDLL
    path: Path


def cache_dir() -> Path:
    """``$REFINER_KERNEL_CACHE``, else the user's cache folder, else (read-only home) a per-user temporary folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    preferred = Path(base) / 'refiner_vit' / 'kernels'
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return _private_temp_dir()


def _private_temp_dir() -> Path:
    """A per-user folder under the (shared) temporary directory that only this user can write.

    Libraries loaded from it run as this user, so a folder someone else created or can write (a predictable name
    in /tmp) is not used; a fresh ``mkdtemp`` folder is, then.
    """
    folder = Path(tempfile.gettempdir()) / f'refiner_vit-kernels-{os.getuid() if hasattr(os, "getuid") else "user"}'
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
        if (not hasattr(os, 'getuid') or info.st_uid == os.getuid()) and not info.st_mode & 0o022:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix='refiner_vit-kernels-'))


def cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them (what ``-march=native`` depends on), else the machine name."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith(('flags', 'Features'))), None)
    except OSError:
        line = None
    return line.split(':', 1)[1].strip() if line else platform.machine()


def _command(source: Path, defines: Dict[str, int], output: str, openmp: bool) -> List[str]:
    compiler = shlex.split(os.environ.get('CC') or 'cc')
    native = '-mcpu=native' if platform.machine().lower() in ('arm64', 'aarch64') else '-march=native'
    flags = ['-O3', native, *(['-fopenmp'] if openmp else []), '-shared', '-fPIC', '-std=gnu11']  # gnu: FMAs
    return [*compiler, *flags, *(f'-D{name}={value}' for name, value in defines.items()), str(source), '-o', output]


def library_path(source_name: str, openmp: bool = True, **defines: int) -> Path:
    """Where the library of ``source_name`` built with ``defines`` is cached (built or not)."""
    source = CSRC / source_name
    digest = hashlib.sha256('\n'.join([
        source.read_text(), *(header.read_text() for header in sorted(CSRC.glob('*.h'))),
        ' '.join(_command(source, defines, '', openmp)), cpu_flags(),
    ]).encode()).hexdigest()[:16]
    shape = '_'.join(f'{name.lower()}{value}' for name, value in defines.items())
    return cache_dir() / f'{source.stem}_{shape}{"" if openmp else "_serial"}_{digest}.so'


def _compile(source_name: str, target: Path, defines: Dict[str, int], openmp: bool) -> None:
    """Compile into ``target`` through a temporary file renamed into place: readers see a whole library or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix='.partial')
    os.close(fd)
    try:
        command = _command(CSRC / source_name, defines, partial, openmp)
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f'`{shlex.join(command)}` failed: {done.stderr.strip()[-2000:]}')
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _build(source_name: str, **defines: int) -> Path:
    """The shared library of ``source_name`` compiled with ``defines``: from the cache, else compiled with OpenMP,
    else (the compiler has no OpenMP) for one thread. A cached one-thread build means OpenMP failed here before."""
    threaded, serial = library_path(source_name, True, **defines), library_path(source_name, False, **defines)
    for target in (threaded, serial):
        if target.exists():
            return target
    try:
        _compile(source_name, threaded, defines, openmp=True)
        return threaded
    except (OSError, subprocess.SubprocessError) as error:
        try:
            _compile(source_name, serial, defines, openmp=False)
        except (OSError, subprocess.SubprocessError):
            raise error from None  # the compiler's message about the full build says more
        return serial


_failed_sources: Set[str] = set()  # kernels whose build failed in this process: not tried again
_warned: List[str] = []  # the one warning this process gives


def load(source_name: str, **defines: int) -> Optional[Library]:
    """The built library, or None where this kernel cannot be built here.

    A kernel whose build fails once (for any shape) is not built again in this process; the other kernels are
    unaffected. Only the first failure of the process warns, with the compiler's message.
    """
    if source_name in _failed_sources:
        return None
    try:
        path = _build(source_name, **defines)
        return Library(ctypes.CDLL(str(path)), path)
    except (OSError, subprocess.SubprocessError) as error:
        _failed_sources.add(source_name)
        if not _warned:
            _warned.append(source_name)
            warnings.warn(
                f'refiner_vit: the native kernel {source_name} could not be built ({error}); its op runs torch\'s '
                f'operators, as every kernel does that cannot be built. Set REFINER_NATIVE_KERNELS=0 to skip '
                'the attempt.', RuntimeWarning, stacklevel=4)
        return None
