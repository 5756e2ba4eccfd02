"""The refiner's composed convolution: "same"-padded k x k, H -> H, over a stack of attention maps.

:func:`local_conv2d` equals ``F.conv2d(x, weight, padding=k // 2)`` and is differentiable. On the CPU in fp32 it
runs the native kernel of :mod:`refiner_vit.kernels` (forward and backward), elsewhere torch's convolution: on
GPUs, in other dtypes or under autocast, while ``torch.compile`` / ``torch.export`` / ``torch.jit.trace``
trace the model (so exported graphs hold a standard convolution), and where the kernel cannot be built.
"""
from typing import Optional, Tuple

import torch
from timm.layers import register_notrace_function
from torch import nn
from torch.nn import functional as F
from torch.utils import _python_dispatch

from ..kernels import LocalConvKernels, local_conv_kernels

__all__ = ['LocalConv2d', 'local_conv2d', 'native_applicable', 'native_kernels_for']


def _tracing() -> bool:
    """True while something records or reinterprets aten ops: compile / export / jit tracing, or a dispatch mode
    (FLOP counters, fake tensors), which would not see an opaque native call."""
    compiling = getattr(torch.compiler, 'is_compiling', None)
    return (torch.jit.is_tracing() or (compiling is not None and compiling())
            or _python_dispatch._get_current_dispatch_mode() is not None)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4 spells it differently
        return torch.is_autocast_cpu_enabled()


def native_applicable(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may stand in for torch's operators on these tensors here and now.

    Plain fp32 CPU tensors, in eager mode (no compile / export / jit tracing, no dispatch mode) and outside
    autocast, whose operators would compute in another dtype.
    """
    if any(type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != 'cpu' or t.dtype != torch.float32
           for t in tensors):
        return False
    return not (_tracing() or _autocast_cpu())


def native_kernels_for(x: torch.Tensor, weight: torch.Tensor) -> Optional[LocalConvKernels]:
    """The native kernels when they apply to ``conv2d(x, weight, padding=k // 2)`` here and now, else None."""
    if x.dim() != 4 or weight.dim() != 4 or not native_applicable(x, weight):
        return None
    heads, in_heads, k, k_w = weight.shape
    if in_heads != heads or x.shape[1] != heads or k != k_w or k % 2 == 0:
        return None
    return local_conv_kernels(heads, k)


class _NativeLocalConv(torch.autograd.Function):
    """The native forward and backward; a double backward goes through torch's (differentiable) convolution."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernels: LocalConvKernels) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kernels = kernels
        return kernels.conv(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            return (*_reference_grads(x, weight, grad, (needs_x, needs_weight)), None)
        return (ctx.kernels.input_grad(grad, weight) if needs_x else None,
                ctx.kernels.weight_grad(x, grad) if needs_weight else None, None)


def _reference_grads(x, weight, grad, needs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Differentiable gradients by autograd through torch's convolution."""
    with torch.enable_grad():
        inputs = [t if t.requires_grad else t.detach().requires_grad_(need) for t, need in zip((x, weight), needs)]
        out = F.conv2d(inputs[0], inputs[1], padding=weight.shape[-1] // 2)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


@register_notrace_function  # a leaf in timm's FX graphs, so that they run the same kernel as eager mode
def local_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=k // 2)`` for maps ``(B, H, N, M)`` and a weight ``(H, H, k, k)``."""
    kernels = native_kernels_for(x, weight)
    if kernels is None:
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _NativeLocalConv.apply(x, weight, kernels)
    return kernels.conv(x, weight)


class LocalConv2d(nn.Module):
    """A bias-free "same"-padded k x k convolution H -> H over attention maps, run by :func:`local_conv2d`.

    What :func:`refiner_vit.fuse_for_inference` turns a linear refiner into; its state dict (``weight``) is that
    of the ``nn.Conv2d`` it replaces.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 4 or weight.shape[0] != weight.shape[1] or weight.shape[2] != weight.shape[3] \
                or weight.shape[2] % 2 == 0:
            raise ValueError(f'expected a weight (H, H, k, k) with odd k, got {tuple(weight.shape)}')
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return local_conv2d(maps, self.weight)

    def extra_repr(self) -> str:
        heads, _, k, _ = self.weight.shape
        return f'heads={heads}, kernel_size={k}'
