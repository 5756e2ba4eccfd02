"""The refiner's composed convolution: "same"-padded k x k, H -> H, over a stack of attention maps.

:func:`local_conv2d` equals ``F.conv2d(x, weight, padding=k // 2)`` and is differentiable. On the CPU in fp32 it
runs the native kernel of :mod:`refiner_vit.kernels` (forward and backward) through the operator
``torch.ops.refiner_vit.local_conv``, which ``torch.compile`` places in its graphs as it is. Torch's convolution runs
instead on GPUs, in other dtypes or under autocast, while ``torch.export`` or ``torch.jit.trace`` record the model
(so exported graphs hold a standard convolution), under dispatch modes such as the FLOP counter (which would not
see inside the operator), and where the kernel cannot be built.
"""
from typing import Optional, Tuple

import torch
from timm.layers import register_notrace_function
from torch import nn
from torch.nn import functional as F

from ..kernels import input_grad_weight, local_conv_kernels
from .native import native_applicable

__all__ = ['LocalConv2d', 'local_conv2d', 'uses_native_kernel']


@torch.library.custom_op('refiner_vit::local_conv', mutates_args=(), device_types='cpu')
def _local_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return local_conv_kernels(weight.shape[0], weight.shape[-1]).conv(x, weight)


@torch.library.custom_op('refiner_vit::local_conv_weight_grad', mutates_args=(), device_types='cpu')
def _local_conv_weight_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return local_conv_kernels(weight.shape[0], weight.shape[-1]).weight_grad(x, grad)


@_local_conv.register_fake
def _(x, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_local_conv_weight_grad.register_fake
def _(x, weight, grad):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight = ctx.needs_input_grad
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: differentiable gradients, through torch's convolution
        return _reference_grads(x, weight, grad, (needs_x, needs_weight))
    return (_local_conv(grad, input_grad_weight(weight)) if needs_x else None,
            _local_conv_weight_grad(x, weight, grad) if needs_weight else None)


_local_conv.register_autograd(_backward, setup_context=_setup_context)


def _reference_grads(x, weight, grad, needs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Differentiable gradients by autograd through torch's convolution."""
    with torch.enable_grad():
        inputs = [t if t.requires_grad else t.detach().requires_grad_(need) for t, need in zip((x, weight), needs)]
        out = F.conv2d(inputs[0], inputs[1], padding=weight.shape[-1] // 2)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _native_shape(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dim() != 4 or weight.dim() != 4:
        return False
    heads, in_heads, k, k_w = weight.shape
    return in_heads == heads == x.shape[1] and k == k_w and k % 2 == 1


def uses_native_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`local_conv2d` runs the native kernel for these arguments here and now."""
    return (_native_shape(x, weight) and native_applicable(x, weight)
            and local_conv_kernels.available(weight.shape[0], weight.shape[-1]))


@register_notrace_function  # a leaf in timm's FX graphs, so that they run the same kernel as eager mode
def local_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=k // 2)`` for maps ``(B, H, N, M)`` and a weight ``(H, H, k, k)``."""
    if uses_native_kernel(x, weight):
        return _local_conv(x, weight)
    return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


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
