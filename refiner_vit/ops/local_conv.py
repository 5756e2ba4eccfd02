"""The refiner's composed convolution: "same"-padded k x k, H -> H, over a stack of attention maps.

:func:`local_conv2d` equals ``F.conv2d(x, weight, padding=k // 2)`` and is differentiable. Where the native kernel
(``csrc/local_conv.c``) is chosen (:mod:`.dispatch`), it runs as the operator ``torch.ops.refiner_vit.local_conv``,
whose backward computes the input gradient with the same kernel (a convolution of the same shape) and the weight
gradient with the native weight-gradient kernel where that one is chosen, else with torch's.

oneDNN is tuned for many channels over small images; here there are a few heads over large maps, and the kernel
keeps a register block of output heads x columns while reading the taps from padded rows held in cache.
"""
import ctypes
import functools
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

from . import build, dispatch

__all__ = ['LocalConvKernels', 'input_grad_weight', 'local_conv2d', 'local_conv_kernels']

OP, WEIGHT_GRAD_OP = 'local_conv', 'local_conv_weight_grad'


class LocalConvKernels:
    """The compiled convolution for one (heads, kernel size): forward (the input gradient too, with
    :func:`input_grad_weight`) and weight gradient.

    Every method takes and returns fp32 CPU tensors: maps ``(B, heads, N, M)`` and weights ``(heads, heads, k, k)``
    laid out like ``nn.Conv2d``'s. Inputs are made contiguous as needed.
    """

    def __init__(self, library: build.Library, heads: int, kernel_size: int) -> None:
        self.path, self.heads, self.kernel_size = library.path, heads, kernel_size
        self._conv = library.cdll.local_conv
        self._conv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        self._conv.restype = ctypes.c_int
        self._weight_grad = library.cdll.local_conv_weight_grad
        self._weight_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self._weight_grad.restype = ctypes.c_int

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``conv2d(x, weight, padding=k // 2)``."""
        x = x.contiguous()
        taps = weight.detach().permute(1, 2, 3, 0).contiguous()  # (c, di, dj, o): the C loops' order
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
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


@functools.cache
def local_conv_kernels(heads: int, kernel_size: int) -> Optional[LocalConvKernels]:
    """The native convolution for (heads, kernel_size), built on first use; None where it cannot be built."""
    library = build.load('local_conv.c', HEADS=heads, KSIZE=kernel_size)
    return None if library is None else LocalConvKernels(library, heads, kernel_size)


def _library(weight: torch.Tensor) -> Optional[Path]:
    kernels = local_conv_kernels(weight.shape[0], weight.shape[-1])
    return None if kernels is None else kernels.path


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def _reference_weight_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    pad = weight.shape[-1] // 2
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, (1, 1), (pad, pad), (1, 1), False, (0, 0), 1, (False, True, False))[1]


def input_grad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The kernel whose "same" convolution of an output gradient is the input gradient of ``conv2d(x, weight)``:
    ``weight`` transposed over heads and flipped over taps."""
    return weight.detach().transpose(0, 1).flip(2, 3)


@torch.library.custom_op('refiner_vit::local_conv', mutates_args=(), device_types='cpu')
def _local_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    kernels = local_conv_kernels(weight.shape[0], weight.shape[-1])
    return _reference(x, weight).contiguous() if kernels is None else kernels.conv(x, weight)


@torch.library.custom_op('refiner_vit::local_conv_weight_grad', mutates_args=(), device_types='cpu')
def _local_conv_weight_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    kernels = local_conv_kernels(weight.shape[0], weight.shape[-1])
    if kernels is None:
        return _reference_weight_grad(x, weight, grad).contiguous()
    return kernels.weight_grad(x, grad)


@_local_conv.register_fake
def _(x, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_local_conv_weight_grad.register_fake
def _(x, weight, grad):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _native_weight_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> bool:
    def candidates():
        kernels = local_conv_kernels(weight.shape[0], weight.shape[-1])
        return lambda: kernels.weight_grad(x, grad), lambda: _reference_weight_grad(x, weight, grad)

    applicable = dispatch.native_applicable(x, weight, grad)
    return dispatch.choose(WEIGHT_GRAD_OP, applicable, lambda: _library(weight), (*x.shape, weight.shape[-1]),
                           candidates)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: differentiable gradients, through torch's convolution
        return _reference_grads(x, weight, grad, (needs_x, needs_weight))
    grad_x = grad_weight = None
    if needs_x:  # a convolution of x's shape: the forward's (native) choice holds
        grad_x = _local_conv(grad, input_grad_weight(weight))
    if needs_weight:
        native = _native_weight_grad(x, weight, grad)
        grad_weight = _local_conv_weight_grad(x, weight, grad) if native else _reference_weight_grad(x, weight, grad)
    return grad_x, grad_weight


_local_conv.register_autograd(_backward, setup_context=_setup_context)


def _reference_grads(x, weight, grad, needs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Differentiable gradients by autograd through torch's convolution."""
    with torch.enable_grad():
        inputs = [t if t.requires_grad else t.detach().requires_grad_(need) for t, need in zip((x, weight), needs)]
        out = _reference(inputs[0], inputs[1])
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _native_shape(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dim() != 4 or weight.dim() != 4:
        return False
    heads, in_heads, k, k_w = weight.shape
    return in_heads == heads == x.shape[1] and k == k_w and k % 2 == 1


def uses_native_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`local_conv2d` runs the native kernel for these arguments here and now (measuring on first use)."""
    def candidates():
        kernels = local_conv_kernels(weight.shape[0], weight.shape[-1])
        return lambda: kernels.conv(x, weight), lambda: _reference(x, weight)

    applicable = _native_shape(x, weight) and dispatch.native_applicable(x, weight)
    return dispatch.choose(OP, applicable, lambda: _library(weight), (*x.shape, weight.shape[-1]), candidates)


def local_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=k // 2)`` for maps ``(B, H, N, M)`` and a weight ``(H, H, k, k)``."""
    if uses_native_kernel(x, weight):
        return _local_conv(x, weight)
    return _reference(x, weight)
