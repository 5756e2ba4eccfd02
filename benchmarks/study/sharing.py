"""Refiner-ViT without its map sharing, or without refining the shared maps: two steps of the decomposition.

Refiner-ViT's odd blocks attend with the map of the computing block before them (which adds the previous computing
block's map), refined. The decomposition takes these apart:

* ``study_refiner_vit_no_sharing``: every block computes its own attention, and no map is handed on or added;
* ``study_refiner_vit_no_refiner``: the maps are shared as released, but the sharing blocks do not refine them
  (they attend with the received map times the attention scale).
"""
from typing import Any, Optional, Tuple

import torch
from timm.models import register_model
from torch import nn

from refiner_vit.models.refiner_vit import ComputingAttention

from .building import build_edited

__all__ = ['IsolatedAttention', 'study_refiner_vit_no_refiner', 'study_refiner_vit_no_sharing']


class IsolatedAttention(ComputingAttention):
    """A computing attention that ignores the map handed to it: its map is its own softmax, nothing added."""

    def forward(self, x: torch.Tensor, prev_map: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x, None)


def _isolate_every_block(model: nn.Module) -> None:
    """Every block's attention becomes an :class:`IsolatedAttention` of the same width, heads, biases and dropout
    (sharing blocks gain q and k), initialised as the model initialises its own."""
    computing = model.blocks[0].attn  # block 0 always computes
    for block in model.blocks:
        old = block.attn
        block.attn = IsolatedAttention(old.proj.in_features, old.num_heads, qkv_bias=computing.qkv.bias is not None,
                                       attn_drop=computing.attn_drop.p, proj_drop=old.proj_drop.p)
    model.init_weights()


def _keep_shared_maps_unrefined(model: nn.Module) -> None:
    for block in model.blocks:
        if block.sharing:
            block.attn.refiner = nn.Identity()


@register_model
def study_refiner_vit_no_sharing(pretrained: bool = False, base: str = 'test_refiner_vit', **kwargs: Any
                                 ) -> nn.Module:
    """The Refiner-ViT ``base`` with every block computing its own attention: no map handed on, none added."""
    return build_edited('study_refiner_vit_no_sharing', base, pretrained, kwargs, _isolate_every_block)


@register_model
def study_refiner_vit_no_refiner(pretrained: bool = False, base: str = 'test_refiner_vit', **kwargs: Any
                                 ) -> nn.Module:
    """The Refiner-ViT ``base`` whose sharing blocks attend with the received map unrefined."""
    return build_edited('study_refiner_vit_no_refiner', base, pretrained, kwargs, _keep_shared_maps_unrefined)
