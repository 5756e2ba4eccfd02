"""The 2-D key-grid refiner: the ``conv2d`` ablation's alternative to the released 1-D neighbourhood.

The released refiner convolves each map over the (query, key) plane, so a 3x3 kernel mixes a key with the keys just
before and after it in raster order. :class:`KeyGridRefiner` lays each query's row of keys out on the patch grid
and convolves it there instead, so a 3x3 kernel mixes a key's 8 grid neighbours (the query axis is not convolved).
``refined_vit_key_grid`` is the study's ``refiner`` variant with it in every block.
"""
from typing import Any, Tuple

import torch
from timm.models import register_model
from torch import nn
from torch.nn import functional as F

from refiner_vit.layers import AttentionRefiner

from .building import build_edited

__all__ = ['KeyGridRefiner', 'refined_vit_key_grid']


class KeyGridRefiner(AttentionRefiner):
    """An :class:`~refiner_vit.layers.AttentionRefiner` whose stage 2 convolves the key axis on a 2-D patch grid."""

    def __init__(self, num_heads: int, expansion_ratio: int = 3, kernel_size: int = 3, *,
                 key_grid: Tuple[int, int], **kwargs: Any) -> None:
        """
        Args:
            num_heads, expansion_ratio, kernel_size, kwargs: as :class:`~refiner_vit.layers.AttentionRefiner`.
            key_grid: ``(Gh, Gw)``, the patch grid the last ``Gh * Gw`` keys of every map lie on.
        """
        if len(key_grid) != 2 or min(key_grid) < 1:
            raise ValueError(f'key_grid must be (rows, columns) of the patch grid, got {key_grid}')
        super().__init__(num_heads, expansion_ratio, kernel_size, **kwargs)
        self.key_grid = (int(key_grid[0]), int(key_grid[1]))

    def local_conv(self, maps: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """For every query, its last ``Gh * Gw`` keys (the patches) are convolved on the patch grid (zero padding at
        the grid border); the leading keys (class / prefix tokens), which have no place on the grid, are multiplied
        by the kernel's centre tap, i.e. treated as a grid cell with no neighbours. Linear in ``weight``, and a
        centred delta kernel is the identity, as the base class requires."""
        pad = self.kernel_size // 2
        rows, cols = self.key_grid
        batch, _, queries, keys = maps.shape
        prefix = keys - rows * cols
        if prefix < 0:
            raise ValueError(f'key_grid {self.key_grid} has {rows * cols} cells but the maps have only {keys} keys')
        grid = maps[..., prefix:].reshape(batch, -1, queries, rows, cols)
        grid = F.conv3d(grid, weight[:, :, None], padding=(0, pad, pad), groups=groups).flatten(3)
        if prefix == 0:
            return grid
        centre = F.conv2d(maps[..., :prefix], weight[:, :, pad:pad + 1, pad:pad + 1], groups=groups)
        return torch.cat([centre, grid], dim=-1)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, key_grid={self.key_grid}'


def _convolve_on_the_key_grid(model: nn.Module) -> None:
    grid = tuple(model.patch_embed.grid_size)
    for block in model.blocks:
        old = block.attn.refiner
        if not old.is_linear:
            raise ValueError('refined_vit_key_grid: the 2-D key-grid ablation is defined for the linear refiner')
        block.attn.refiner = KeyGridRefiner(old.num_heads, old.expansion_ratio, old.kernel_size, key_grid=grid)


@register_model
def refined_vit_key_grid(pretrained: bool = False, base: str = 'refined_deit_tiny_patch16_224',
                         **kwargs: Any) -> nn.Module:
    """The refined ViT ``base`` (the study's ``refiner`` variant) whose refiners convolve on the 2-D key grid."""
    return build_edited('refined_vit_key_grid', base, pretrained, kwargs, _convolve_on_the_key_grid)
