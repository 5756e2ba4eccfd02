"""Recomputing activations in backward: the refiner's expanded maps, and blocks under grad checkpointing.

A non-linear refiner in training would keep about six stacks of its r-times-larger expanded maps for backward.
:func:`refine_recomputing` keeps its input maps and its reduced maps (the reduction's output, the size of the input)
and no graph; backward differentiates the tail (per-head norms and shortcut) on the reduced maps, then recomputes the
expanded maps a head's worth of channels at a time and differentiates each chunk. The expanded channels are
independent until the reduction (1x1 expansion, per-channel BatchNorm, depthwise convolution, elementwise
activations), so a chunk needs nothing from the others, and at any moment only a chunk's maps exist.

Recomputation runs a forward again, in which a BatchNorm in training mode would update its running statistics a
second time. Inside :func:`running_stats_frozen` those updates go to scratch copies of the statistics, which are then
dropped; the normalisation uses the batch's statistics exactly as the forward did. (The BatchNorm still sees running
statistics, so it saves for backward what the forward saved, as torch's checkpointing requires.)
"""
import contextlib
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..ops.dispatch import exporting, plain_tensors

__all__ = ['checkpoint_once', 'recomputable', 'refine_recomputing', 'running_stats_frozen']

_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')
# Below this many bytes of expanded maps per call, keeping them costs little memory and recomputing them costs more
# time than it saves (the recompute's fixed costs dominate small maps): such calls run the plain stages.
RECOMPUTE_MIN_BYTES = 16 * 2 ** 20
# Activations that act on each element alone, so that chunks of channels can be recomputed apart.
_ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside the block, updates of the running statistics of ``module``'s BatchNorms do not last."""
    norms: List[_BatchNorm] = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    kept = [{name: getattr(norm, name) for name in _STATISTICS} for norm in norms]
    for norm, statistics in zip(norms, kept):
        for name, value in statistics.items():
            setattr(norm, name, None if value is None else value.clone())
    try:
        yield
    finally:
        for norm, statistics in zip(norms, kept):
            for name, value in statistics.items():
                setattr(norm, name, value)


def _contexts(module: nn.Module) -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), running_stats_frozen(module)


def checkpoint_once(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, its activations recomputed in backward (non-reentrant ``torch.utils.checkpoint``), with
    the BatchNorms of ``module`` updating their running statistics in the forward only."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=partial(_contexts, module))


def _per_channel(norm: nn.Module) -> bool:
    return isinstance(norm, nn.Identity) or type(norm) is nn.BatchNorm2d


def expanded_bytes(refiner: nn.Module, attn: torch.Tensor) -> int:
    """Bytes of one stack of ``refiner``'s expanded maps for input maps ``attn``: the size the training paths'
    thresholds are measured in."""
    return attn.numel() * attn.element_size() * refiner.expansion_ratio


def recomputable(refiner: nn.Module, attn: torch.Tensor) -> bool:
    """Whether :func:`refine_recomputing` applies: a graph is wanted, on plain tensors in eager mode, the expanded
    maps are large enough to matter (``RECOMPUTE_MIN_BYTES``), and the expanded channels are independent
    (per-channel norms, elementwise activations, a depthwise convolution, the released local convolution)."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    return (torch.is_grad_enabled() and (attn.requires_grad or bool(params))
            and expanded_bytes(refiner, attn) >= RECOMPUTE_MIN_BYTES
            and not torch.compiler.is_compiling()
            and not exporting() and plain_tensors(attn, *params) and refiner.released_local_conv
            and refiner.conv.groups == refiner.conv.in_channels
            and _per_channel(refiner.norm1) and _per_channel(refiner.norm2)
            and isinstance(refiner.act1, _ELEMENTWISE) and isinstance(refiner.act2, _ELEMENTWISE))


def refine_recomputing(refiner: nn.Module, attn: torch.Tensor) -> torch.Tensor:
    """``refiner.forward_stages(attn)`` that keeps ``attn`` and the reduced maps for backward (see the module)."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    return _RecomputingRefiner.apply(refiner, attn, *params)


def tail(refiner: nn.Module, attn: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    """What follows the reduction: its norm, the shortcut, the per-head norm."""
    out = refiner.norm3(reduced)
    return refiner.out_norm(out + attn if refiner.shortcut else out)


def _norm(norm: nn.Module, maps: torch.Tensor, channels: slice) -> torch.Tensor:
    """``norm`` (Identity or BatchNorm2d) on the ``channels`` it normalises in ``maps``, its running statistics left
    alone: batch statistics where the forward used them, else the running ones."""
    if isinstance(norm, nn.Identity):
        return maps
    batch = norm.training or norm.running_mean is None
    mean, var, weight, bias = (None if t is None else t[channels] for t in (
        None if batch else norm.running_mean, None if batch else norm.running_var, norm.weight, norm.bias))
    return F.batch_norm(maps, mean, var, weight, bias, batch, 0., norm.eps)


def _reduced_part(refiner: nn.Module, attn: torch.Tensor, channels: slice) -> torch.Tensor:
    """The expanded ``channels``' share of the reduced maps: their expansion, norm, activation, depthwise convolution,
    norm and activation, then their columns of the reduction."""
    conv = refiner.conv
    maps = _norm(refiner.norm1, F.conv2d(attn, refiner.expand.weight[channels]), channels)
    maps = F.conv2d(refiner.act1(maps), conv.weight[channels], padding=conv.padding,
                    groups=channels.stop - channels.start)
    maps = refiner.act2(_norm(refiner.norm2, maps, channels))
    return F.conv2d(maps, refiner.reduce.weight[:, channels])


def _add(total: Optional[torch.Tensor], part: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return part if total is None else total if part is None else total + part


class _RecomputingRefiner(torch.autograd.Function):
    """The released refiner's stages keeping only the input and reduced maps; the trainable parameters are inputs,
    so that autograd asks for their gradients. Backward runs under the forward's autocast state."""

    @staticmethod
    def forward(ctx, refiner: nn.Module, attn: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = attn.device.type
        ctx.refiner = refiner
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.no_grad():  # the modules themselves: running statistics updated once, here
            maps = refiner.act1(refiner.norm1(refiner.expand(attn)))
            reduced = refiner.reduce(refiner.act2(refiner.norm2(refiner.conv(maps))))
            del maps
            out = tail(refiner, attn, reduced)
        ctx.save_for_backward(attn, reduced)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        attn, reduced = ctx.saved_tensors
        refiner = ctx.refiner
        params = [p for p in refiner.parameters() if p.requires_grad]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), running_stats_frozen(refiner):
            attn = attn.detach().requires_grad_()
            reduced = reduced.detach().requires_grad_()
            grad_attn, grad_reduced, *grads = torch.autograd.grad(
                tail(refiner, attn, reduced), [attn, reduced, *params], grad, allow_unused=True)
            heads, expanded = refiner.expand.in_channels, refiner.expand.out_channels
            for start in range(0, expanded, heads):
                part = _reduced_part(refiner, attn, slice(start, min(start + heads, expanded)))
                part_grads = torch.autograd.grad(part, [attn, *params], grad_reduced, allow_unused=True)
                grad_attn = _add(grad_attn, part_grads[0])
                grads = [_add(total, g) for total, g in zip(grads, part_grads[1:])]
        return (None, grad_attn if ctx.needs_input_grad[1] else None, *grads)
