"""The attention refiner of Refiner (Zhou et al., arXiv 2106.03714).

The refiner operates on the stack of per-head attention maps ``(B, H, N, N)`` (all N tokens, class
token included) and returns refined maps of the same shape, in three stages:

1. **attention expansion**: a learned mix across heads, H -> H * r maps (a 1x1 convolution whose
   channels are the heads), so that more, and more diverse, maps are available;
2. **distributed local attention**: a depthwise k x k convolution over each expanded map, whose two
   spatial axes are the query and the key index ("same" zero padding). Multiplying the result with
   V first mixes each value with its neighbours in token order, then aggregates globally;
3. **attention reduction**: a learned mix back to H maps (a 1x1 convolution).

Two forms are in use:

* the **paper form** (``AttentionRefiner(...)`` with its defaults): purely linear, so the whole
  refiner is one k x k convolution H -> H whose weight is ``W[o, i] = sum_j R[o, j] K[j] E[j, i]``
  (see :meth:`AttentionRefiner.composed_weight`);
* the **released form** the authors trained (:meth:`AttentionRefiner.released`, their ``DLA`` in
  ``conv_exapnd`` mode): BatchNorm + ReLU6 after expansion and after the depthwise convolution,
  BatchNorm after reduction, an identity shortcut around the three stages, then a per-head
  BatchNorm of the sum.

Stage 2's neighbourhood is :meth:`AttentionRefiner.local_conv`, the one method a subclass overrides to convolve
the maps differently (the study's 2-D key grid does); such a subclass runs :meth:`AttentionRefiner.forward_stages`
in training and is not folded, since the fast paths and the fusion assume the released convolution.
"""
import copy
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..ops import local_conv2d
from . import recompute
from .fused import FoldedRefiner, LocalConv2d
from .recompute import recomputable, refine_recomputing
from .released import refine_released, released_applies

__all__ = ['AttentionRefiner']

LayerFactory = Optional[Callable[[int], nn.Module]]


def _make(factory: LayerFactory, channels: int, dd: Dict[str, Any]) -> nn.Module:
    """``factory(channels)`` (any ``channels -> module``) moved to ``dd``'s device and dtype, or an Identity."""
    if factory is None:
        return nn.Identity()
    return factory(channels).to(**{k: v for k, v in dd.items() if v is not None})


class AttentionRefiner(nn.Module):
    """Refines multi-head attention maps: expand heads, convolve each map locally, reduce heads.

    Submodules are named after the stages (``expand``, ``conv``, ``reduce``) with the optional
    normalisation / activation after each (``norm1``, ``act1``, ``norm2``, ``act2``, ``norm3``) and
    the optional per-head ``out_norm`` after the shortcut, so that a state dict reads like the
    method. All convolutions are bias-free, as in the authors' code.
    """

    def __init__(
            self,
            num_heads: int,
            expansion_ratio: int = 3,
            kernel_size: int = 3,
            norm_layer: LayerFactory = None,
            act_layer: Optional[Callable[[], nn.Module]] = None,
            shortcut: bool = False,
            out_norm_layer: LayerFactory = None,
            recompute: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            num_heads: Number of attention heads H of the maps to refine.
            expansion_ratio: r, the expanded maps number H * r (1 disables expansion, not the mix).
            kernel_size: Odd side of the depthwise kernel over the (query, key) plane.
            norm_layer: Factory ``channels -> module`` applied after each of the three stages.
            act_layer: Factory of the activation after expansion and after the local convolution.
            shortcut: Add the input maps to the reduced maps (a residual refiner).
            out_norm_layer: Factory ``channels -> module`` applied per head to the final maps.
            recompute: In training, keep only the input maps for backward and recompute the stages there (a
                non-linear refiner; see :meth:`forward`). An attribute: set it False to compare.
            device, dtype: Where and in which dtype the parameters are created (timm's factory arguments).
        """
        super().__init__()
        if num_heads < 1 or expansion_ratio < 1:
            raise ValueError(f'num_heads ({num_heads}) and expansion_ratio ({expansion_ratio}) must be >= 1')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd number for "same" padding, got {kernel_size}')
        self.num_heads = num_heads
        self.expansion_ratio = expansion_ratio
        self.kernel_size = kernel_size
        self.shortcut = shortcut
        self.recompute = recompute
        expanded = num_heads * expansion_ratio

        dd = dict(device=device, dtype=dtype)
        self.expand = nn.Conv2d(num_heads, expanded, 1, bias=False, **dd)
        self.norm1 = _make(norm_layer, expanded, dd)
        self.act1 = act_layer() if act_layer is not None else nn.Identity()
        self.conv = nn.Conv2d(expanded, expanded, kernel_size, padding=kernel_size // 2, groups=expanded, bias=False,
                              **dd)
        self.norm2 = _make(norm_layer, expanded, dd)
        self.act2 = act_layer() if act_layer is not None else nn.Identity()
        self.reduce = nn.Conv2d(expanded, num_heads, 1, bias=False, **dd)
        self.norm3 = _make(norm_layer, num_heads, dd)
        self.out_norm = _make(out_norm_layer, num_heads, dd)

    @classmethod
    def released(cls, num_heads: int, expansion_ratio: int = 3, kernel_size: int = 3, recompute: bool = True,
                 **dd: Any) -> 'AttentionRefiner':
        """The refiner as the authors trained it (BatchNorm, ReLU6, shortcut, per-head BatchNorm)."""
        return cls(
            num_heads,
            expansion_ratio=expansion_ratio,
            kernel_size=kernel_size,
            norm_layer=nn.BatchNorm2d,
            act_layer=nn.ReLU6,
            shortcut=True,
            out_norm_layer=nn.BatchNorm2d,
            recompute=recompute,
            **dd,
        )

    @property
    def released_local_conv(self) -> bool:
        """Whether stage 2 is the released k x k convolution over the (query, key) plane, that is, whether this class
        keeps :meth:`local_conv`. The training fast paths and :meth:`fuse` hold only for that convolution; a subclass
        that redefines it runs :meth:`forward_stages` and stays unfused."""
        return type(self).local_conv is AttentionRefiner.local_conv

    @property
    def is_linear(self) -> bool:
        """True when the refiner is a linear map of its input (no normalisation, no activation)."""
        stages = (self.norm1, self.act1, self.norm2, self.act2, self.norm3, self.out_norm)
        return all(isinstance(m, nn.Identity) for m in stages)

    def composed_weight(self) -> torch.Tensor:
        """The single k x k convolution ``(H, H, k, k)`` equal to a linear refiner.

        ``W[o, i] = sum_j R[o, j] * K[j] * E[j, i]`` (plus a centred identity with the shortcut).
        Differentiable: gradients reach ``expand``, ``conv`` and ``reduce`` through it.
        """
        if not self.is_linear:
            raise RuntimeError('composed_weight() needs a linear refiner (no norm or activation layers)')
        expand = self.expand.weight[:, :, 0, 0]  # (H*r, H)
        kernels = self.conv.weight[:, 0]  # (H*r, k, k)
        reduce = self.reduce.weight[:, :, 0, 0]  # (H, H*r)
        weight = torch.einsum('oj,jab,ji->oiab', reduce, kernels, expand)
        if self.shortcut:
            half = self.kernel_size // 2
            identity = torch.eye(self.num_heads, dtype=weight.dtype, device=weight.device)[:, :, None, None]
            weight = weight + F.pad(identity, (half, half, half, half))
        return weight

    @torch.no_grad()
    def init_identity(self) -> None:
        """Initialise a linear refiner to the identity map while leaving it able to learn.

        Used when refining a pretrained model, whose predictions must not change before fine-tuning.
        With the shortcut, zeroing ``reduce`` suffices. Without it, the first expanded copy of each head
        is that head passed through a centred delta kernel and read back by ``reduce``; the other copies
        keep their random weights and get a zero read-out weight, whose gradient is not zero, so the
        copies diverge from the first step (an all-identity start would keep them identical forever).
        """
        if not self.is_linear:
            raise RuntimeError('init_identity() needs a linear refiner (no norm or activation layers)')
        self.reduce.weight.zero_()
        if self.shortcut:
            return
        r, centre = self.expansion_ratio, self.kernel_size // 2
        first_copies = torch.arange(self.num_heads) * r
        self.expand.weight[first_copies] = 0.
        self.expand.weight[first_copies, torch.arange(self.num_heads), 0, 0] = 1.
        self.conv.weight[first_copies] = 0.
        self.conv.weight[first_copies, 0, centre, centre] = 1.
        self.reduce.weight[torch.arange(self.num_heads), first_copies, 0, 0] = 1.

    def forward(self, attn: torch.Tensor, output_scale: float = 1.) -> torch.Tensor:
        """Refine ``attn`` of shape ``(B, H, N, N)``; returns the same shape, times ``output_scale`` (a constant factor
        the caller would apply, such as the attention scale: the released path takes it into its tail's own, at no
        pass over the maps).

        A linear refiner runs as its single composed k x k convolution H -> H, composed anew on every call so that
        gradients reach the three stages' weights: the same map as :meth:`forward_stages` with far fewer passes over
        the (r times larger) expanded maps, and one stack of maps kept for backward instead of ``2 + 2r``.

        The released refiner in training runs its fast path (:mod:`.released`: on the CPU in fp32 native kernels
        that never write the expanded maps, else matmuls over channels-last maps, BatchNorm and ReLU6 differentiated
        by hand); with ``recompute`` (and, for the torch forms, expanded maps of at least ``RECOMPUTE_MIN_BYTES``) it
        keeps only ``attn`` and the reduced maps and recomputes the expanded maps in backward, else it keeps three
        stacks of them. Other non-linear refiners in training with ``recompute`` keep the same two stacks and
        recompute a few heads' worth at a time (:mod:`.recompute`); the rest run :meth:`forward_stages`.
        """
        if self.is_linear:
            out = self.local_conv(attn, self.composed_weight())
        elif released_applies(self, attn):
            large = recompute.expanded_bytes(self, attn) >= recompute.RECOMPUTE_MIN_BYTES
            return refine_released(self, attn, self.recompute and large, output_scale)
        elif self.recompute and self.training and recomputable(self, attn):
            out = refine_recomputing(self, attn)
        else:
            out = self.forward_stages(attn)
        return out if output_scale == 1. else out * output_scale

    @torch.no_grad()
    def fuse(self, output_scale: float = 1.) -> nn.Module:
        """An inference module equal to the eval-mode ``self(attn) * output_scale``, for timm's
        ``reparameterize_model``: a :class:`LocalConv2d` of the composed weight for a linear refiner, a
        :class:`FoldedRefiner` for the released form. ``self`` (unscaled) where there is no folded form: a redefined
        :meth:`local_conv`, or norms and activations other than BatchNorm with running statistics and ReLU6.
        """
        if not self.released_local_conv:
            return self
        if self.is_linear:
            return LocalConv2d(self.composed_weight() * output_scale)
        if not all(isinstance(act, nn.ReLU6) for act in (self.act1, self.act2)) or not all(
                _foldable_norm(norm) for norm in (self.norm1, self.norm2, self.norm3, self.out_norm)):
            return self
        refiner = copy.deepcopy(self).eval()
        expand = _fold_bn(refiner.expand, refiner.norm1)
        conv = _fold_bn(refiner.conv, refiner.norm2)
        reduce = _fold_bn(_fold_bn(refiner.reduce, refiner.norm3), refiner.out_norm)
        reduce.weight.mul_(output_scale)
        reduce.bias.mul_(output_scale)
        shortcut = None
        if self.shortcut:
            out_norm = refiner.out_norm
            gain = torch.ones(self.num_heads, dtype=reduce.weight.dtype, device=reduce.weight.device)
            if isinstance(out_norm, nn.BatchNorm2d):
                gain = out_norm.weight / torch.sqrt(out_norm.running_var + out_norm.eps)
            shortcut = gain * output_scale
        # channels-last weights: oneDNN's convolutions over few channels and large maps run faster in that layout
        return FoldedRefiner(expand, conv, reduce, shortcut).to(memory_format=torch.channels_last)

    def local_conv(self, maps: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Stage 2's convolution of ``maps (B, C, N, N)`` with ``weight (C_out, C / groups, k, k)``: a k x k
        convolution over the (query, key) plane with zero "same" padding, as released.

        The extension point for another neighbourhood: an override must stay linear in ``weight`` (so that
        :meth:`composed_weight` still composes a linear refiner) and map a centred delta kernel to the identity (so
        that :meth:`init_identity` still holds).
        """
        if groups == 1:
            return local_conv2d(maps, weight)
        return F.conv2d(maps, weight, padding=self.kernel_size // 2, groups=groups)

    def forward_stages(self, attn: torch.Tensor) -> torch.Tensor:
        """The refiner stage by stage, as the method defines it; the reference every fast path is tested against."""
        x = self.act1(self.norm1(self.expand(attn)))
        x = self.act2(self.norm2(self.local_conv(x, self.conv.weight, self.conv.groups)))
        x = self.norm3(self.reduce(x))
        if self.shortcut:
            x = x + attn
        return self.out_norm(x)

    def extra_repr(self) -> str:
        return (
            f'num_heads={self.num_heads}, expansion_ratio={self.expansion_ratio}, '
            f'kernel_size={self.kernel_size}, shortcut={self.shortcut}'
            + ('' if self.is_linear or self.recompute else ', recompute=False')
        )


def _foldable_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.Identity) or (
        isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and norm.running_var is not None)


def _fold_bn(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """``conv`` followed by ``norm`` (eval mode) as one convolution with a bias (always one, so shapes are uniform)."""
    if isinstance(norm, nn.Identity):
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        return conv
    return fuse_conv_bn_eval(conv, norm)
