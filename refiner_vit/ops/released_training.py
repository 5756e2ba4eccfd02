"""The released refiner's training passes as one native CPU kernel library (``csrc/released_training.c``).

In training the released refiner's BatchNorms normalise with batch statistics; once those are known, each BatchNorm
is a per-channel factor and shift, and the expanded stages (expansion, ReLU6, depthwise convolution, ReLU6, reduction)
are the folded refiner's. The kernels run those stages, and their backward, a query row at a time with the expanded
rows recomputed in cache, so that no stack of the r-times-larger expanded maps is written in the forward or the
backward. Each pass returns the batch-wide sums (in float64) that the next one needs; :mod:`refiner_vit.layers.released`
turns them into the BatchNorms' statistics and gradients and chooses, by the measured rule of :mod:`.dispatch`,
between these kernels and its torch forms.

Notation (per position of the maps, ``E`` expanded channels, ``H`` heads): ``f = relu6(W1 x + b1)``,
``z = depthwise(f)``, ``s = relu6(a2 z + c2)``, ``r = R s``; from ``u = dL/dr``: ``g2 = (R^T u) [0 < a2 z + c2 < 6]``,
``gz = a2 g2 + slope z + offset``, ``g1 = depthwise^T(gz) [0 < f < 6]``, ``gx = W1^T g1``.
"""
import ctypes
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import build, dispatch

__all__ = ['ExpandedWeights', 'ReleasedTrainingKernel', 'released_training_kernel', 'training_applicable']


@dataclass(frozen=True)
class ExpandedWeights:
    """The expanded stages with both BatchNorms folded: ``W1 (E, H)``, ``b1 (E,)``, the depthwise kernel
    ``(E, k, k)``, ``a2``, ``c2 (E,)`` and the reduction ``R (H, E)``, fp32 on the CPU."""

    expand: torch.Tensor
    expand_bias: torch.Tensor
    kernel: torch.Tensor
    scale2: torch.Tensor
    shift2: torch.Tensor
    reduce: torch.Tensor


def _pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class ReleasedTrainingKernel:
    """The compiled training passes for one (heads, expanded maps, kernel size); inputs ``(B, heads, N, M)``."""

    def __init__(self, library: build.Library, heads: int, expanded: int, kernel_size: int) -> None:
        self.path, self.heads, self.expanded, self.kernel_size = library.path, heads, expanded, kernel_size
        cdll = library.cdll
        self._input_moments, self._conv_stats, self._backward_stats, self._backward_input = (
            cdll.input_moments, cdll.conv_stats, cdll.backward_stats, cdll.backward_input)
        longs = [ctypes.c_long] * 3
        self._input_moments.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p] + longs
        self._conv_stats.argtypes = [ctypes.c_void_p] * 5 + longs
        self._backward_stats.argtypes = [ctypes.c_void_p] * 9 + longs
        self._backward_input.argtypes = [ctypes.c_void_p] * 12 + longs
        for function in (self._input_moments, self._conv_stats, self._backward_stats, self._backward_input):
            function.restype = ctypes.c_int

    def _weights(self, weights: ExpandedWeights) -> Tuple[torch.Tensor, ...]:
        """In the order and layout the C loops read them: ``expand_w[c][e]``, ``b1``, ``dw_w[di][dj][e]``, ``a2``,
        ``c2``, ``reduce_w[e][o]``."""
        return (weights.expand.t().contiguous(), weights.expand_bias.contiguous(),
                weights.kernel.permute(1, 2, 0).contiguous(), weights.scale2.contiguous(),
                weights.shift2.contiguous(), weights.reduce.t().contiguous())

    @staticmethod
    def _check(failed: int, name: str) -> None:
        if failed:
            raise MemoryError(f'released_training.{name}: a thread could not allocate its row buffers')

    def input_moments(self, x: torch.Tensor, shift: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per head, the sum of ``x - shift`` ``(H,)`` and the sums of its products ``(H, H)`` over the batch and all
        positions (float64): the input maps' mean and centred second moments, which give the first BatchNorm's
        statistics. A ``shift`` near the mean keeps the float partial sums small."""
        x = x.contiguous()
        out = torch.zeros(self.heads + self.heads ** 2, dtype=torch.float64)
        self._check(self._input_moments(x.data_ptr(), shift, out.data_ptr(), x.shape[0], *x.shape[2:]),
                    'input_moments')
        return out[:self.heads], out[self.heads:].view(self.heads, self.heads)

    def conv_stats(self, x: torch.Tensor, expand: torch.Tensor, expand_bias: torch.Tensor, kernel: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per expanded channel, the sums of ``z`` and of ``z ** 2`` over the batch and all positions (float64), for
        ``W1 = expand (E, H)``, ``b1 = expand_bias`` and the depthwise ``kernel (E, k, k)``."""
        x = x.contiguous()
        expand, expand_bias, kernel = expand.t().contiguous(), expand_bias.contiguous(), kernel.permute(1, 2, 0)
        kernel = kernel.contiguous()
        out = torch.zeros(2, self.expanded, dtype=torch.float64)
        self._check(self._conv_stats(x.data_ptr(), expand.data_ptr(), expand_bias.data_ptr(), kernel.data_ptr(),
                                     out.data_ptr(), x.shape[0], *x.shape[2:]), 'conv_stats')
        return out[0], out[1]

    def backward_stats(self, x: torch.Tensor, grad: torch.Tensor, weights: ExpandedWeights
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum g2``, ``sum g2 z`` per expanded channel and the reduction's gradient ``sum u s^T (H, E)`` (float64),
        for the reduced maps' gradient ``grad``."""
        x, grad = x.contiguous(), grad.contiguous()
        folded = self._weights(weights)  # held until the call returns
        out = torch.zeros(2 * self.expanded + self.heads * self.expanded, dtype=torch.float64)
        self._check(self._backward_stats(x.data_ptr(), grad.data_ptr(), *map(_pointer, folded),
                                         out.data_ptr(), x.shape[0], *x.shape[2:]), 'backward_stats')
        sums = out[:2 * self.expanded].view(2, self.expanded)
        return sums[0], sums[1], out[2 * self.expanded:].view(self.heads, self.expanded)

    def backward_input(self, x: torch.Tensor, grad: torch.Tensor, weights: ExpandedWeights, slope: torch.Tensor,
                       offset: torch.Tensor, need_input: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The depthwise kernel's gradient ``(E, 1, k, k)``, ``sum g1 (E,)``, ``sum g1 x^T (E, H)`` (float64) and
        ``gx = W1^T g1`` shaped as ``x`` (None without ``need_input``)."""
        x, grad = x.contiguous(), grad.contiguous()
        gx = torch.empty_like(x) if need_input else None
        taps = self.kernel_size ** 2
        out = torch.zeros(self.expanded * (taps + 1 + self.heads), dtype=torch.float64)
        slope, offset, folded = slope.contiguous(), offset.contiguous(), self._weights(weights)
        self._check(self._backward_input(x.data_ptr(), grad.data_ptr(), *map(_pointer, folded),
                                         slope.data_ptr(), offset.data_ptr(), _pointer(gx), out.data_ptr(),
                                         x.shape[0], *x.shape[2:]), 'backward_input')
        grad_kernel, sum1, products = out.split([self.expanded * taps, self.expanded, self.expanded * self.heads])
        k = self.kernel_size
        return (grad_kernel.view(self.expanded, 1, k, k), sum1, products.view(self.expanded, self.heads), gx)


@functools.cache
def released_training_kernel(heads: int, expanded: int, kernel_size: int) -> Optional[ReleasedTrainingKernel]:
    """The native training passes for this shape, built on first use; None where they cannot be built."""
    library = build.load('released_training.c', HEADS=heads, EXPANDED=expanded, KSIZE=kernel_size)
    return None if library is None else ReleasedTrainingKernel(library, heads, expanded, kernel_size)


def training_applicable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the kernels can stand in for the torch forms here: fp32 CPU maps of 4 dimensions, outside autocast, in
    eager mode (:func:`dispatch.native_applicable`)."""
    return x.dim() == 4 and dispatch.native_applicable(x, *params)
