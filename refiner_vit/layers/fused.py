"""What a refiner becomes when it is folded for inference (:meth:`AttentionRefiner.fuse`).

* :class:`LocalConv2d`: a linear refiner, i.e. the single k x k convolution H -> H of its composed weight;
* :class:`FoldedRefiner`: the released refiner with its BatchNorms folded into the convolutions: ``expand ->
  ReLU6 -> depthwise -> ReLU6 -> reduce`` with biases, plus a per-head scaled shortcut;

and :func:`scale_outputs`, with which attention layers and blocks fold constant factors into their linear layers.
"""
from typing import Optional, Union

import torch
from torch import nn

from ..ops import folded_refiner, local_conv2d

__all__ = ['FoldedRefiner', 'LocalConv2d', 'scale_outputs']


@torch.no_grad()
def scale_outputs(linear: nn.Linear, factor: Union[float, torch.Tensor], rows: slice = slice(None)) -> None:
    """Multiply output features ``rows`` of ``linear`` (weight and bias) by ``factor``: a scalar or one per row."""
    factor = torch.as_tensor(factor, dtype=linear.weight.dtype, device=linear.weight.device)
    linear.weight[rows] *= factor.reshape(-1, 1) if factor.ndim else factor
    if linear.bias is not None:
        linear.bias[rows] *= factor


class LocalConv2d(nn.Module):
    """A bias-free "same"-padded k x k convolution H -> H over attention maps (:func:`~refiner_vit.ops.local_conv2d`).

    Its state dict (``weight``) is that of the ``nn.Conv2d`` it stands for.
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


class FoldedRefiner(nn.Module):
    """A released-form refiner with its BatchNorms folded: convolutions with biases and a scaled shortcut."""

    def __init__(self, expand: nn.Conv2d, conv: nn.Conv2d, reduce: nn.Conv2d,
                 shortcut_scale: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.expand, self.conv, self.reduce = expand, conv, reduce
        if shortcut_scale is None:
            self.shortcut_scale = None
        else:
            self.register_buffer('shortcut_scale', shortcut_scale.reshape(1, -1, 1, 1))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return folded_refiner(attn, self.expand.weight, self.expand.bias, self.conv.weight, self.conv.bias,
                              self.reduce.weight, self.reduce.bias, self.shortcut_scale)
