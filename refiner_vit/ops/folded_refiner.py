"""The authors' released refiner with its BatchNorms folded, for inference:
``reduce(relu6(depthwise(relu6(expand(x))))) + scale * x``, all three convolutions with biases.

torch runs it as three oneDNN convolutions over channels-last maps (heads innermost, which oneDNN handles better than
NCHW for so few channels over such large maps) with two clamps, each a pass over the r-times-larger expanded maps.
The native kernel (``csrc/folded_refiner.c``, operator ``torch.ops.refiner_vit.folded_refiner``) computes the expanded
rows an output row needs into a small ring that stays in cache, so memory sees one read of x and one write of the
result. It has no autograd formula and runs where :mod:`.dispatch` chooses it.
"""
import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch
from torch.nn import functional as F

from . import build, dispatch

__all__ = ['FoldedRefinerKernel', 'folded_refiner', 'folded_refiner_kernel']

OP = 'folded_refiner'


class FoldedRefinerKernel:
    """The compiled folded released refiner for one (heads, expanded maps, kernel size), inference only."""

    def __init__(self, library: build.Library, heads: int, expanded: int, kernel_size: int) -> None:
        self.path, self.heads, self.expanded, self.kernel_size = library.path, heads, expanded, kernel_size
        self._refine = library.cdll.folded_refiner
        self._refine.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 3
        self._refine.restype = ctypes.c_int

    def __call__(self, x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                 conv_weight: torch.Tensor, conv_bias: torch.Tensor, reduce_weight: torch.Tensor,
                 reduce_bias: torch.Tensor, shortcut_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The refined maps for ``x (B, heads, N, M)``, fp32 on the CPU (see :func:`folded_refiner`)."""
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
        pointers = [None if w is None else w.data_ptr() for w in weights]
        out = torch.empty_like(x)
        if x.numel() and self._refine(x.data_ptr(), *pointers, out.data_ptr(), x.shape[0], *x.shape[2:]):
            raise MemoryError('folded_refiner could not allocate its ring of expanded rows')
        return out


@functools.cache
def folded_refiner_kernel(heads: int, expanded: int, kernel_size: int) -> Optional[FoldedRefinerKernel]:
    """The native folded refiner for this shape, built on first use; None where it cannot be built."""
    library = build.load('folded_refiner.c', HEADS=heads, EXPANDED=expanded, KSIZE=kernel_size)
    return None if library is None else FoldedRefinerKernel(library, heads, expanded, kernel_size)


def _kernel(x: torch.Tensor, conv_weight: torch.Tensor) -> Optional[FoldedRefinerKernel]:
    return folded_refiner_kernel(x.shape[1], conv_weight.shape[0], conv_weight.shape[-1])


def _library(x: torch.Tensor, conv_weight: torch.Tensor) -> Optional[Path]:
    kernel = _kernel(x, conv_weight)
    return None if kernel is None else kernel.path


def _reference(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor, conv_weight: torch.Tensor,
               conv_bias: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
               shortcut_scale: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.relu6(F.conv2d(x, expand_weight, expand_bias), inplace=True)  # in place: no new map stack
    y = F.relu6(F.conv2d(y, conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2, groups=y.shape[1]),
                inplace=True)
    y = F.conv2d(y, reduce_weight, reduce_bias)
    if shortcut_scale is not None:
        y = torch.addcmul(y, x, shortcut_scale.reshape(1, -1, 1, 1))
    return y.contiguous()


@torch.library.custom_op('refiner_vit::folded_refiner', mutates_args=(), device_types='cpu')
def _folded_refiner(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor, conv_weight: torch.Tensor,
                    conv_bias: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                    shortcut_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The native kernel as an operator (inference only: no autograd), which torch.compile keeps in its graphs."""
    args = (x, expand_weight, expand_bias, conv_weight, conv_bias, reduce_weight, reduce_bias, shortcut_scale)
    kernel = _kernel(x, conv_weight)
    return _reference(*args) if kernel is None else kernel(*args)


@_folded_refiner.register_fake
def _(x, *weights):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _applicable(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor],
                conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor], reduce_weight: torch.Tensor,
                reduce_bias: Optional[torch.Tensor], shortcut_scale: Optional[torch.Tensor]) -> bool:
    biases = (expand_bias, conv_bias, reduce_bias)
    if any(b is None for b in biases) or x.dim() != 4:
        return False
    k = conv_weight.shape[-1]
    tensors = [x, expand_weight, conv_weight, reduce_weight, *biases]
    tensors += [] if shortcut_scale is None else [shortcut_scale]
    return (expand_weight.shape[1] == reduce_weight.shape[0] == x.shape[1]
            and tuple(conv_weight.shape[1:]) == (1, k, k) and k % 2 == 1
            and tuple(expand_weight.shape[2:]) == tuple(reduce_weight.shape[2:]) == (1, 1)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and dispatch.native_applicable(*tensors))


def folded_refiner(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                   shortcut_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``reduce(relu6(depthwise(relu6(expand(x))))) + shortcut_scale * x`` for maps ``x (B, H, N, M)``.

    Args:
        x: The maps.
        expand_weight, expand_bias: ``(E, H, 1, 1)`` and ``(E,)``.
        conv_weight, conv_bias: The depthwise ``(E, 1, k, k)`` ("same" zero padding) and ``(E,)``.
        reduce_weight, reduce_bias: ``(H, E, 1, 1)`` and ``(H,)``.
        shortcut_scale: Per-head factor on the shortcut (any shape of H values), or None for no shortcut.
    """
    args = (x, expand_weight, expand_bias, conv_weight, conv_bias, reduce_weight, reduce_bias, shortcut_scale)

    def candidates():
        kernel = _kernel(x, conv_weight)
        return (lambda: kernel(*args)), (lambda: _reference(*args))

    applicable = _applicable(*args)
    shape = (*x.shape, conv_weight.shape[0], conv_weight.shape[-1])
    if dispatch.choose(OP, applicable, lambda: _library(x, conv_weight), shape, candidates):
        return _folded_refiner(*args)
    return _reference(*args)
