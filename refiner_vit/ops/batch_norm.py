"""BatchNorm in training computed by the package's ops: the running statistics they update, and
``relu(batch_norm(x))`` as one op, the conv stem's three normalisations.

torch runs the BatchNorm and the ReLU as separate operators; over the stem's large channels-last maps (Refiner-ViT-S:
32-128 channels of 112 x 112 per image) their passes run at about 40 % of a copy's bandwidth, and forward and backward
take seven of them. The native kernel (``csrc/batch_norm_relu.c``) takes four, each reading what it must once
(statistics, output, the backward's sums, the input gradient), and sums in float64: at 32 x 64 x 112 x 112 its input
gradient is within 5e-7 of float64 autograd, torch's fp32 one (channels-last) off by 1-2, of values up to 4
(docs/performance.md). It applies to fp32 channels-last CPU maps of a ``BatchNorm2d`` in training mode, outside
autocast and compilation, and runs where :mod:`.dispatch` measured it faster (forward and backward timed together);
torch's operators run everywhere else. The running statistics are updated as the module's own forward would.
"""
import ctypes
import functools
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import build, dispatch

__all__ = ['BatchNormReLUKernel', 'batch_norm_relu', 'batch_norm_relu_kernel', 'update_running_statistics']

OP = 'batch_norm_relu'


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1]


class BatchNormReLUKernel:
    """The compiled passes for one channel count, over channels-last fp32 maps ``(B, C, H, W)``."""

    def __init__(self, library: build.Library, channels: int) -> None:
        self.path, self.channels = library.path, channels
        cdll = library.cdll
        self._stats, self._forward = cdll.batch_norm_stats, cdll.batch_norm_relu_forward
        self._backward_sums = cdll.batch_norm_relu_backward_sums
        self._backward_input = cdll.batch_norm_relu_backward_input
        self._stats.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long]
        self._backward_sums.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long]
        self._forward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long]
        self._backward_input.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long]
        self._stats.restype = self._backward_sums.restype = ctypes.c_int
        self._forward.restype = self._backward_input.restype = None

    @staticmethod
    def _check(failed: int, name: str) -> None:
        if failed:
            raise MemoryError(f'batch_norm_relu: {name} could not allocate its per-thread sums')

    def statistics(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and biased variance of ``x`` (float64), from sums shifted by its first pixel."""
        shift = x[0, :, 0, 0].contiguous()
        sums = torch.empty(2, self.channels, dtype=torch.float64)
        rows = _rows(x)
        self._check(self._stats(x.data_ptr(), shift.data_ptr(), sums.data_ptr(), rows), 'statistics')
        centred = sums[0] / rows
        return shift.double() + centred, (sums[1] / rows - centred * centred).clamp_(min=0)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``max(scale x + shift, 0)`` per channel, channels-last like ``x``."""
        y = torch.empty_like(x, memory_format=torch.channels_last)
        self._forward(x.data_ptr(), scale.contiguous().data_ptr(), shift.contiguous().data_ptr(), y.data_ptr(),
                      _rows(x))
        return y

    def backward_sums(self, grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``(2, C)`` float64: per channel, the sums of ``gy = grad [y > 0]`` and of ``gy (x - mean)`` (``mean``
        fp32)."""
        sums = torch.empty(2, self.channels, dtype=torch.float64)
        centre = mean.contiguous()
        failed = self._backward_sums(grad.data_ptr(), y.data_ptr(), x.data_ptr(), centre.data_ptr(), sums.data_ptr(),
                                     _rows(x))
        self._check(failed, 'backward sums')
        return sums

    def backward_input(self, grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                       factors: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``k grad [y > 0] + s x + t`` per channel for ``factors = (k, s, t)``."""
        k, s, t = (f.float().contiguous() for f in factors)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        self._backward_input(grad.data_ptr(), y.data_ptr(), x.data_ptr(), k.data_ptr(), s.data_ptr(), t.data_ptr(),
                             grad_x.data_ptr(), _rows(x))
        return grad_x


@functools.cache
def batch_norm_relu_kernel(channels: int) -> Optional[BatchNormReLUKernel]:
    """The native passes for this channel count, built on first use; None where they cannot be built."""
    library = build.load('batch_norm_relu.c', CHANNELS=channels)
    return None if library is None else BatchNormReLUKernel(library, channels)


class _BatchNormReLU(torch.autograd.Function):
    """``relu(batch_norm(x, weight, bias))`` with batch statistics; also returns them (mean, biased variance) for the
    caller's running statistics. Keeps ``x`` and the output, as torch's two operators do."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                kernel: BatchNormReLUKernel, eps: float):
        mean, var = kernel.statistics(x)
        inv_std = torch.rsqrt(var + eps)
        gamma = inv_std.new_ones(()) if weight is None else weight.detach().double()
        beta = inv_std.new_zeros(()) if bias is None else bias.detach().double()
        scale = gamma * inv_std
        y = kernel.forward(x, scale.float(), (beta - mean * scale).float())
        ctx.kernel = kernel
        ctx.save_for_backward(x, y, mean, inv_std, gamma.expand_as(mean))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _mean: torch.Tensor, _var: torch.Tensor):
        x, y, mean, inv_std, gamma = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad = grad.contiguous(memory_format=torch.channels_last)
        centre = mean.float()  # the kernel's centre; the float64 mean's remainder is corrected for below
        sum_gy, sum_gy_centred = ctx.kernel.backward_sums(grad, y, x, centre)
        sum_gy_normed = (sum_gy_centred - (mean - centre.double()) * sum_gy) * inv_std  # the sum of gy x_hat
        grad_x = None
        if needs_x:
            rows = _rows(x)
            mean_gy, mean_gy_normed = sum_gy / rows, sum_gy_normed / rows
            k = gamma * inv_std  # grad_x = k (gy - mean(gy) - x_hat mean(gy x_hat)), x_hat = (x - mean) inv_std
            s = -k * inv_std * mean_gy_normed
            grad_x = ctx.kernel.backward_input(grad, y, x, (k, s, -k * mean_gy - s * mean))
        grad_weight = sum_gy_normed.float() if needs_weight else None
        grad_bias = sum_gy.float() if needs_bias else None
        return grad_x, grad_weight, grad_bias, None, None


@torch.no_grad()
def update_running_statistics(norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What ``norm``'s forward does to its running statistics, given the batch's mean and biased variance over
    ``count`` values per channel: for the ops that compute a BatchNorm's batch statistics themselves."""
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        return
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)


def _native(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the native passes run for ``relu(norm(x))`` (measuring on first use). Only a training BatchNorm2d is
    this op's concern: any other module (an eval one included) runs its own forward, unrecorded."""
    if type(norm) is not nn.BatchNorm2d or not norm.training:
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    applicable = (x.dim() == 4 and x.shape[1] == norm.num_features
                  and _rows(x) > 1 and x.is_contiguous(memory_format=torch.channels_last)
                  and not torch.compiler.is_compiling() and dispatch.native_applicable(x, *params))

    def library() -> Optional[Path]:
        kernel = batch_norm_relu_kernel(x.shape[1])
        return None if kernel is None else kernel.path

    def candidates():
        kernel = batch_norm_relu_kernel(x.shape[1])
        sample = x.detach()

        def step(forward):
            def run() -> None:
                with torch.enable_grad():
                    leaf = sample.requires_grad_()
                    torch.autograd.grad(forward(leaf), leaf, sample)
            return run

        native = step(lambda t: _BatchNormReLU.apply(t, norm.weight, norm.bias, kernel, norm.eps)[0])
        reference = step(lambda t: F.relu(F.batch_norm(t, None, None, norm.weight, norm.bias, True, 0., norm.eps)))
        return native, reference

    return dispatch.choose(OP, applicable, library, tuple(x.shape), candidates)


def batch_norm_relu(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``relu(norm(x))`` (the ReLU in place where torch's operators run); ``norm``'s running statistics updated as its
    forward would. The native passes run for a ``BatchNorm2d`` in training over fp32 channels-last CPU maps where they
    were measured faster (see the module)."""
    if not _native(norm, x):
        return F.relu(norm(x), inplace=True)
    y, mean, var = _BatchNormReLU.apply(x, norm.weight, norm.bias, batch_norm_relu_kernel(x.shape[1]), norm.eps)
    update_running_statistics(norm, mean, var, _rows(x))
    return y
