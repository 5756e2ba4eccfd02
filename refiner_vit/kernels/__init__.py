"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

One kernel so far: the refiner's composed k x k convolution H -> H over attention maps (``local_conv.c``), which
runs 2-10x faster than oneDNN's convolution for so few channels (``docs/performance.md``). It is plain C (no torch
headers), so building it takes well under a second; each (heads, kernel size) pair is its own shared library,
cached under ``$REFINER_KERNEL_CACHE`` (default ``~/.cache/refiner_vit/kernels``) by a digest of the source, the
compiler command and the CPU, and written atomically so concurrent processes can build it at once.

Where there is no compiler (or ``REFINER_NATIVE_KERNELS=0``), :func:`local_conv_kernels` returns None and callers use
torch's ``conv2d``: the results agree to float rounding either way.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ['ENV_DISABLE', 'LocalConvKernels', 'local_conv_kernels', 'native_kernels_enabled']

ENV_DISABLE = 'REFINER_NATIVE_KERNELS'
ENV_CACHE = 'REFINER_KERNEL_CACHE'
_SOURCE = Path(__file__).with_name('local_conv.c')
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-shared', '-fPIC', '-std=gnu11']  # gnu: fused multiply-adds
_BUILD_TIMEOUT_S = 120


def native_kernels_enabled() -> bool:
    """False when the user switched the native kernels off (``REFINER_NATIVE_KERNELS=0``)."""
    return os.environ.get(ENV_DISABLE, '1') != '0'


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'refiner_vit' / 'kernels'


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them, else the machine name."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(('flags', 'Features'))), platform.machine())
    except OSError:
        return platform.machine()


def _compile_command(compiler: List[str], heads: int, kernel_size: int, output: str) -> List[str]:
    return [*compiler, *_FLAGS, f'-DHEADS={heads}', f'-DKSIZE={kernel_size}', str(_SOURCE), '-o', output]


def _build(heads: int, kernel_size: int) -> Path:
    """The shared library for (heads, kernel_size), compiled into the cache unless it is there already."""
    compiler = shlex.split(os.environ.get('CC', 'cc'))
    digest = hashlib.sha256('\n'.join([
        _SOURCE.read_text(), ' '.join(_compile_command(compiler, heads, kernel_size, '')), _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    target = _cache_dir() / f'local_conv_h{heads}_k{kernel_size}_{digest}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix='.partial')
    os.close(fd)
    try:
        command = _compile_command(compiler, heads, kernel_size, partial)
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f'`{shlex.join(command)}` failed: {done.stderr.strip()[-2000:]}')
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


class LocalConvKernels:
    """The compiled convolution for one (heads, kernel size): forward, input gradient and weight gradient.

    Every method takes and returns fp32 CPU tensors: maps ``(B, heads, N, M)`` and weights
    ``(heads, heads, k, k)`` laid out like ``nn.Conv2d``'s; the convolution is ``conv2d(x, weight,
    padding=k // 2)``. Inputs are made contiguous as needed.
    """

    def __init__(self, library: ctypes.CDLL, heads: int, kernel_size: int) -> None:
        self.heads, self.kernel_size = heads, kernel_size
        self._conv = library.local_conv
        self._conv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        self._conv.restype = ctypes.c_int
        self._weight_grad = library.local_conv_weight_grad
        self._weight_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._weight_grad.restype = ctypes.c_int

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``conv2d(x, weight, padding=k // 2)``."""
        x = x.contiguous()
        taps = weight.detach().permute(1, 2, 3, 0).contiguous()  # (c, di, dj, o): the C loops' order
        out = torch.empty_like(x)
        if x.numel() and self._conv(x.data_ptr(), taps.data_ptr(), out.data_ptr(), *x.shape[:1], *x.shape[2:]):
            raise MemoryError('local_conv could not allocate its padded input rows')
        return out

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the input: the convolution with the kernel transposed over heads and flipped over taps."""
        return self.conv(grad, weight.detach().transpose(0, 1).flip(2, 3))

    def weight_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the weight, ``(heads, heads, k, k)``."""
        x, grad = x.contiguous(), grad.contiguous()
        slots = max(1, torch.get_num_threads())
        k = self.kernel_size
        partial = torch.zeros(slots, self.heads, k, k, self.heads)
        if x.numel() and self._weight_grad(
                x.data_ptr(), grad.data_ptr(), partial.data_ptr(), *x.shape[:1], *x.shape[2:], slots):
            raise MemoryError('local_conv_weight_grad could not allocate its padded input rows and accumulators')
        return partial.sum(0).permute(3, 0, 1, 2).contiguous()


@functools.cache
def local_conv_kernels(heads: int, kernel_size: int) -> Optional[LocalConvKernels]:
    """The native convolution for (heads, kernel_size), or None where it is disabled or cannot be built.

    A failed build warns once (per pair) with the compiler's message and is not retried in this process.
    """
    if not native_kernels_enabled():
        return None
    try:
        return LocalConvKernels(ctypes.CDLL(str(_build(heads, kernel_size))), heads, kernel_size)
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f'refiner_vit: the native local-convolution kernel (heads={heads}, kernel_size={kernel_size}) is '
            f'unavailable, using torch.nn.functional.conv2d instead ({error}). '
            f'Set {ENV_DISABLE}=0 to skip the attempt.',
            RuntimeWarning, stacklevel=2)
        return None
