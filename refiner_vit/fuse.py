"""Inference-time fusion: fold BatchNorms into convolutions and compose linear refiners into one convolution.

In eval mode every BatchNorm is a fixed per-channel affine map, so it folds into the convolution before it;
what is left of the authors' released refiner is ``expand -> ReLU6 -> depthwise -> ReLU6 -> reduce`` with
biases, plus a per-head scaled shortcut (the per-head output BatchNorm applied to the identity branch).
A linear refiner becomes the plain k x k convolution of its composed weight. Constant factors are folded
into the weights next to them, so no pass over maps or tokens is spent multiplying by a constant: a sharing
block's attention scale (into its refiner), the scale on ``q . k`` (into ``qkv``) and Refiner-ViT's residual
scaling (into the LayerNorms' eps and the branches' last linear layers).

The fused model computes the same function (to float rounding) with fewer passes over the attention maps,
and is what :mod:`refiner_vit.export` exports. It is a deployment artefact: its state dict differs.
"""
import copy
from typing import Optional, Union

import torch
from timm.layers import LayerScale, register_notrace_module
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .kernels import folded_refiner_kernel
from .layers import AttentionRefiner, RefinedAttention
from .layers.local_conv import LocalConv2d
from .layers.native import native_inference_applicable
from .models.refiner_vit import ComputingAttention, ConvStem, RefinerBlock, SharingAttention

__all__ = ['FoldedRefiner', 'fold_refiner', 'fuse_for_inference']


@register_notrace_module  # a leaf in timm's FX graphs, so that traced models take the same (native) path as eager
class FoldedRefiner(nn.Module):
    """A released-form refiner with its BatchNorms folded: convolutions with biases and a scaled shortcut."""

    def __init__(
            self,
            expand: nn.Conv2d,
            conv: nn.Conv2d,
            reduce: nn.Conv2d,
            shortcut_scale: Optional[torch.Tensor],
            channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.expand, self.conv, self.reduce = expand, conv, reduce
        self.channels_last = channels_last
        if shortcut_scale is None:
            self.shortcut_scale = None
        else:
            self.register_buffer('shortcut_scale', shortcut_scale.reshape(1, -1, 1, 1))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        if self.uses_native_kernel(attn):
            return _folded_refiner(attn, self.expand.weight, self.expand.bias, self.conv.weight, self.conv.bias,
                                   self.reduce.weight, self.reduce.bias, self.shortcut_scale)
        # Channels-last (heads innermost): oneDNN's 1x1 and depthwise convolutions over few channels and huge
        # maps run 2-3x faster than in NCHW; the two layout conversions cost less than that.
        if self.channels_last:
            attn = attn.contiguous(memory_format=torch.channels_last)
        x = F.relu6(self.expand(attn), inplace=True)  # in place: no new map stack for the activations
        x = F.relu6(self.conv(x), inplace=True)
        x = self.reduce(x)
        if self.shortcut_scale is not None:
            x = torch.addcmul(x, attn, self.shortcut_scale)
        return x.contiguous()

    def uses_native_kernel(self, attn: torch.Tensor) -> bool:
        """Whether forward runs the native kernel: CPU, fp32, no autograd graph wanted, not while exporting."""
        if any(m.bias is None for m in (self.expand, self.conv, self.reduce)) or attn.dim() != 4:
            return False
        params = [p for m in (self.expand, self.conv, self.reduce) for p in (m.weight, m.bias)]
        if not native_inference_applicable(attn, *params):
            return False
        k = self.conv.kernel_size[0]
        if self.conv.kernel_size != (k, k) or self.conv.padding != (k // 2, k // 2):
            return False
        if self.expand.in_channels != attn.shape[1] or self.reduce.out_channels != attn.shape[1]:
            return False
        return folded_refiner_kernel.available(self.expand.in_channels, self.expand.out_channels, k)


@torch.library.custom_op('refiner_vit::folded_refiner', mutates_args=(), device_types='cpu')
def _folded_refiner(x: torch.Tensor, expand_weight: torch.Tensor, expand_bias: torch.Tensor, conv_weight: torch.Tensor,
                    conv_bias: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                    shortcut_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The native kernel as an operator (inference only: no autograd), which torch.compile keeps in its graphs."""
    expanded, heads, k = conv_weight.shape[0], x.shape[1], conv_weight.shape[-1]
    return folded_refiner_kernel(heads, expanded, k)(x, expand_weight, expand_bias, conv_weight, conv_bias,
                                                     reduce_weight, reduce_bias, shortcut_scale)


@_folded_refiner.register_fake
def _(x, *weights):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    return conv if isinstance(bn, nn.Identity) else fuse_conv_bn_eval(conv, bn)


def _scaled(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
    conv.weight.data.mul_(factor)
    if conv.bias is not None:
        conv.bias.data.mul_(factor)
    return conv


@torch.no_grad()
def fold_refiner(refiner: AttentionRefiner, output_scale: float = 1.) -> nn.Module:
    """An eval-mode module equal to ``refiner(attn) * output_scale``, with BatchNorms folded.

    A linear refiner becomes one :class:`LocalConv2d` H -> H with the composed weight; the released form
    a :class:`FoldedRefiner`. Activations other than ReLU6 (or none) are refused: they are what it folds.
    """
    if getattr(refiner, 'key_grid', None) is not None:
        raise TypeError('a refiner with key_grid convolves on the patch grid; it has no folded form')
    if refiner.is_linear:
        return LocalConv2d(refiner.composed_weight() * output_scale)
    for act in (refiner.act1, refiner.act2):
        if not isinstance(act, nn.ReLU6):
            raise TypeError(f'cannot fold a refiner with {type(act).__name__} activations (ReLU6 expected)')
    for norm in (refiner.norm1, refiner.norm2, refiner.norm3, refiner.out_norm):
        if not (isinstance(norm, nn.Identity)
                or (isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and norm.running_var is not None)):
            raise TypeError(f'cannot fold a {type(norm).__name__} (BatchNorm2d with running statistics expected)')
    refiner = copy.deepcopy(refiner).eval()
    expand = _fold(refiner.expand, refiner.norm1)
    conv = _fold(refiner.conv, refiner.norm2)
    reduce = _fold(_fold(refiner.reduce, refiner.norm3), refiner.out_norm)
    shortcut = None
    if refiner.shortcut:
        identity_gain = torch.ones_like(reduce.weight[:, 0, 0, 0])
        if not isinstance(refiner.out_norm, nn.Identity):
            identity_gain = _bn_scale(refiner.out_norm)
        shortcut = identity_gain * output_scale
    folded = FoldedRefiner(expand, conv, _scaled(reduce, output_scale), shortcut)
    return folded.to(memory_format=torch.channels_last)


def _fuse_stem(stem: ConvStem) -> None:
    for i in (1, 2, 3):
        setattr(stem, f'conv{i}', fuse_conv_bn_eval(getattr(stem, f'conv{i}'), getattr(stem, f'bn{i}')))
        setattr(stem, f'bn{i}', nn.Identity())
    # Channels-last weights make oneDNN run the stem channels-last (an NCHW input is converted once): Refiner-ViT-S's
    # stem at batch 16 on the 2-core CPU of docs/performance.md, 306 -> 179 ms.
    stem.to(memory_format=torch.channels_last)


def _scale_outputs(linear: nn.Linear, factor: Union[float, torch.Tensor], rows: slice = slice(None)) -> None:
    """Multiply output features ``rows`` of ``linear`` by ``factor`` (a scalar or one value per row)."""
    factor = torch.as_tensor(factor, dtype=linear.weight.dtype)
    linear.weight.data[rows] *= factor.reshape(-1, 1) if factor.ndim else factor
    if linear.bias is not None:
        linear.bias.data[rows] *= factor


def _fold_residual_scale(block: RefinerBlock) -> None:
    """``x + f(norm(s x)) / s`` -> ``x + f'(norm'(x))``: no passes over the tokens spent on the constant ``s``.

    LayerNorm ignores the scale of its input except through eps, so ``norm(s x)`` with ``eps`` is ``norm(x)``
    with ``eps / s^2``. The ``1 / s`` of each branch goes into its last linear layer: the attention's ``proj``,
    and the MLP's ``fc2`` together with the LayerScale after it.
    """
    s = block.residual_scale
    if s == 1. or not all(isinstance(norm, nn.LayerNorm) for norm in (block.norm1, block.norm2)):
        return
    for norm in (block.norm1, block.norm2):
        norm.eps /= s * s
    _scale_outputs(block.attn.proj, 1. / s)
    gamma = block.mlp_scale.gamma if isinstance(block.mlp_scale, LayerScale) else torch.ones(())
    _scale_outputs(block.mlp.fc2, gamma.detach() / s)
    block.mlp_scale = nn.Identity()
    block.residual_scale = 1.


def _fold_qk_scale(attention: nn.Module) -> None:
    """Fold the constant factor on ``q . k`` into the rows of ``qkv`` that produce q (and k)."""
    dim = attention.qkv.in_features
    if isinstance(attention, ComputingAttention) and attention.qk_scale != 1.:
        root_scale = attention.qk_scale ** 0.5  # split between q and k, as the authors' code scales them
        _scale_outputs(attention.qkv, root_scale, slice(0, 2 * dim))
        attention.qk_scale = 1.
    elif isinstance(attention, RefinedAttention) and isinstance(attention.q_norm, nn.Identity):
        _scale_outputs(attention.qkv, attention.scale, slice(0, dim))
        attention.scale = 1.


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A fused eval-mode copy of ``model`` (the original is left as it is).

    Folds the conv stem's BatchNorms, every refiner's BatchNorms (and a sharing block's attention scale), the
    constant factors on ``q . k`` and Refiner-ViT's residual scaling, and composes linear refiners; the result
    equals the eval-mode model up to float rounding. Refiners with a ``key_grid`` (the 2-D ablation) are left as
    they are.
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, ConvStem):
            _fuse_stem(module)
        if isinstance(module, RefinerBlock):
            _fold_residual_scale(module)
        if isinstance(module, (ComputingAttention, RefinedAttention)):
            _fold_qk_scale(module)
        refiner = getattr(module, 'refiner', None)
        if isinstance(refiner, AttentionRefiner) and getattr(refiner, 'key_grid', None) is None:
            if isinstance(module, SharingAttention):
                module.refiner = fold_refiner(refiner, module.scale)
                module.scale = 1.
            else:
                module.refiner = fold_refiner(refiner)
    return fused
