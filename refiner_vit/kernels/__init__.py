"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

* ``local_conv.c``: the refiner's composed k x k convolution H -> H over attention maps, with its input and weight
  gradients (:func:`local_conv_kernels`), about 2x faster forward and 2-3x faster forward + backward than oneDNN's
  convolution for so few channels;
* ``folded_refiner.c``: the authors' released refiner with its BatchNorms folded, for inference
  (:func:`folded_refiner_kernel`), in one pass instead of three convolutions over 3x as many maps (about 10x);
* ``attention_probs.c``: ``softmax(scale * q k^T) + alpha * prev`` for inference (:func:`attention_probs_kernel`),
  one write of the maps instead of a matmul, a softmax and an add over them.

See ``docs/performance.md``. They are plain C (no torch headers), so a build takes well under a second; each shape
(heads, kernel size, ...) is its own shared library, cached under ``$REFINER_KERNEL_CACHE`` (default
``~/.cache/refiner_vit/kernels``) by a digest of the sources, the compiler command and the CPU, and written atomically
so that concurrent processes can build it at once.

Where there is no compiler (or ``REFINER_NATIVE_KERNELS=0``), the functions return None and callers use torch's
operators: the results agree to float rounding either way.
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
from typing import Callable, Dict, List, Optional, TypeVar

import torch

__all__ = [
    'ENV_DISABLE', 'AttentionProbsKernel', 'FoldedRefinerKernel', 'LocalConvKernels', 'attention_probs_kernel',
    'folded_refiner_kernel', 'input_grad_weight', 'local_conv_kernels', 'native_kernels_enabled',
]

ENV_DISABLE = 'REFINER_NATIVE_KERNELS'
ENV_CACHE = 'REFINER_KERNEL_CACHE'
_HERE = Path(__file__).parent
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-shared', '-fPIC', '-std=gnu11']  # gnu: fused multiply-adds
_BUILD_TIMEOUT_S = 120


def native_kernels_enabled() -> bool:
    """False when the user switched the native kernels off (``REFINER_NATIVE_KERNELS=0``)."""
    return os.environ.get(ENV_DISABLE, '1') != '0'


def _cache_dir() -> Path:
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


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them, else the machine name."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(('flags', 'Features'))), platform.machine())
    except OSError:
        return platform.machine()


def _compile_command(compiler: List[str], source: Path, defines: Dict[str, int], output: str) -> List[str]:
    return [*compiler, *_FLAGS, *(f'-D{name}={value}' for name, value in defines.items()), str(source), '-o', output]


def _build(source_name: str, **defines: int) -> Path:
    """The shared library of ``source_name`` compiled with ``defines``, from the cache unless it is not there yet."""
    source = _HERE / source_name
    compiler = shlex.split(os.environ.get('CC', 'cc'))
    command = _compile_command(compiler, source, defines, '')
    digest = hashlib.sha256('\n'.join([
        source.read_text(), (_HERE / 'vec.h').read_text(), ' '.join(command), _cpu_signature(),
    ]).encode()).hexdigest()[:16]
    shape = '_'.join(f'{name.lower()}{value}' for name, value in defines.items())
    target = _cache_dir() / f'{source.stem}_{shape}_{digest}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix='.partial')
    os.close(fd)
    try:
        command = _compile_command(compiler, source, defines, partial)
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f'`{shlex.join(command)}` failed: {done.stderr.strip()[-2000:]}')
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


_build_failures: List[str] = []  # a compiler that failed once (no OpenMP, no compiler) is not asked again


def _load(what: str, source_name: str, **defines: int) -> Optional[ctypes.CDLL]:
    """The built library, or None where it is disabled or fails to build.

    The first failure warns, with the compiler's message; after it this process uses torch's operators for every
    shape without trying again, so a machine without a working compiler pays one attempt and sees one warning.
    """
    if not native_kernels_enabled() or _build_failures:
        return None
    try:
        return ctypes.CDLL(str(_build(source_name, **defines)))
    except (OSError, subprocess.SubprocessError) as error:
        shape = ', '.join(f'{name.lower()}={value}' for name, value in defines.items())
        _build_failures.append(f'{what} ({shape}): {error}')
        warnings.warn(
            f'refiner_vit: the native {what} kernel ({shape}) could not be built, so this process uses torch\'s '
            f'operators for the refiner ({error}). Set {ENV_DISABLE}=0 to skip the attempt.',
            RuntimeWarning, stacklevel=3)
        return None


Kernel = TypeVar('Kernel')


def _kernel_factory(build: Callable[..., Optional[Kernel]]) -> Callable[..., Optional[Kernel]]:
    """``build``, cached per shape, with ``.available(*shape)``: whether it gives a kernel for that shape (building
    it on first call). ``torch.compile`` takes that answer as a constant while it traces, so that the choice between
    the native operator and torch's is made once, not in the graph."""
    cached = functools.cache(build)

    @torch.compiler.assume_constant_result
    def available(*shape: int) -> bool:
        return cached(*shape) is not None

    cached.available = available
    return cached


def input_grad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The kernel whose "same" convolution of an output gradient is the input gradient of ``conv2d(x, weight)``:
    ``weight`` transposed over heads and flipped over taps."""
    return weight.detach().transpose(0, 1).flip(2, 3)


def _pointers(*tensors: Optional[torch.Tensor]) -> List[Optional[int]]:
    return [None if t is None else t.data_ptr() for t in tensors]


class LocalConvKernels:
    """The compiled convolution for one (heads, kernel size): forward (the input gradient too, with
    :func:`input_grad_weight`) and weight gradient.

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


@_kernel_factory
def local_conv_kernels(heads: int, kernel_size: int) -> Optional[LocalConvKernels]:
    """The native convolution for (heads, kernel_size), or None where it is disabled or cannot be built.

    A failed build warns once with the compiler's message, and this process does not try to build again.
    """
    library = _load('local-convolution', 'local_conv.c', HEADS=heads, KSIZE=kernel_size)
    return None if library is None else LocalConvKernels(library, heads, kernel_size)


class FoldedRefinerKernel:
    """The compiled folded released refiner for one (heads, expanded maps, kernel size), inference only.

    ``relu6(conv(relu6(expand(x)), depthwise)) -> reduce`` plus ``scale * x``, all with biases; the module whose
    weights it takes is :class:`refiner_vit.fuse.FoldedRefiner`.
    """

    def __init__(self, library: ctypes.CDLL, heads: int, expanded: int, kernel_size: int) -> None:
        self.heads, self.expanded, self.kernel_size = heads, expanded, kernel_size
        self._refine = library.folded_refiner
        self._refine.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 3
        self._refine.restype = ctypes.c_int

    def __call__(self, x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                 conv_weight: torch.Tensor, conv_bias: torch.Tensor, reduce_weight: torch.Tensor,
                 reduce_bias: torch.Tensor, shortcut_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The refined maps for ``x (B, heads, N, M)``, fp32 on the CPU; weights and biases as ``nn.Conv2d`` holds
        them (expand ``(E, H, 1, 1)``, depthwise ``(E, 1, k, k)``, reduce ``(H, E, 1, 1)``), the shortcut scale per
        head or None."""
        x = x.contiguous()
        weights = [  # in the order the C loops read them
            expand_weight.detach()[:, :, 0, 0].t().contiguous(),  # (c, e)
            expand_bias.detach().contiguous(),
            conv_weight.detach()[:, 0].permute(1, 2, 0).contiguous(),  # (di, dj, e)
            conv_bias.detach().contiguous(),
            reduce_weight.detach()[:, :, 0, 0].t().contiguous(),  # (e, o)
            reduce_bias.detach().contiguous(),
            None if shortcut_scale is None else shortcut_scale.detach().reshape(-1).contiguous(),
        ]
        out = torch.empty_like(x)
        if x.numel() and self._refine(x.data_ptr(), *_pointers(*weights), out.data_ptr(), x.shape[0], *x.shape[2:]):
            raise MemoryError('folded_refiner could not allocate its ring of expanded rows')
        return out


@_kernel_factory
def folded_refiner_kernel(heads: int, expanded: int, kernel_size: int) -> Optional[FoldedRefinerKernel]:
    """The native folded released refiner for this shape, or None where it is disabled or cannot be built."""
    library = _load('folded-refiner', 'folded_refiner.c', HEADS=heads, EXPANDED=expanded, KSIZE=kernel_size)
    return None if library is None else FoldedRefinerKernel(library, heads, expanded, kernel_size)


class AttentionProbsKernel:
    """The compiled ``softmax(scale * q k^T) + alpha * prev`` for one head dimension, inference only."""

    def __init__(self, library: ctypes.CDLL, head_dim: int) -> None:
        self.head_dim = head_dim
        self._probs = library.attention_probs
        self._probs.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 3) * 2 + [ctypes.c_void_p] \
            + [ctypes.c_float] * 2 + [ctypes.c_void_p] + [ctypes.c_long] * 3
        self._probs.restype = ctypes.c_int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float = 1., prev: Optional[torch.Tensor] = None,
                 alpha: float = 1.) -> torch.Tensor:
        """Maps ``(B, H, N, N)`` for fp32 CPU ``q`` and ``k`` ``(B, H, N, head_dim)``, read in place where their last
        dimension is contiguous; ``prev`` like the result, or None."""
        q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
        B, H, N, _ = q.shape
        out = q.new_empty(B, H, N, N)
        if prev is not None:
            prev = prev.contiguous()
        if out.numel() and self._probs(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3],
                                       *_pointers(prev), scale, alpha, out.data_ptr(),
                                       B, H, N):
            raise MemoryError('attention_probs could not allocate its key and logit buffers')
        return out


@_kernel_factory
def attention_probs_kernel(head_dim: int) -> Optional[AttentionProbsKernel]:
    """The native attention probabilities for this head dimension, or None where disabled or not buildable."""
    library = _load('attention-probabilities', 'attention_probs.c', HEAD_DIM=head_dim)
    return None if library is None else AttentionProbsKernel(library, head_dim)
