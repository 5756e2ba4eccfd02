"""timm's ViT with Refiner-ViT's convolutional stem: one step of the way from a ViT to Refiner-ViT.

Refiner-ViT ("Refiner: Refining Self-attention for Vision Transformers", Zhou et al., arXiv 2106.03714) differs
from a plain ViT in its stem, its blocks, its shared maps and its refiners. The models here change only the stem,
so that its share of the gap can be measured: timm's ``VisionTransformer`` built with
``embed_layer=ConvStemPatchEmbed`` (DeiT-Tiny's architecture otherwise), and the same with the paper-form refiner
in every block (:class:`~refiner_vit.models.refined_vit.RefinedVisionTransformer`).
"""
from functools import partial
from typing import Any, Optional, Tuple, Union

import torch
from timm.layers import Format, _assert, nchw_to, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .refined_vit import RefinedVisionTransformer, _cfg
from .refiner_vit import ConvStem

__all__ = ['ConvStemPatchEmbed']


class ConvStemPatchEmbed(ConvStem):
    """Refiner-ViT's :class:`~refiner_vit.models.refiner_vit.ConvStem` behind timm's ``PatchEmbed`` interface.

    timm's ViT builds its ``embed_layer`` with ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``bias``
    and ``dynamic_img_pad`` (plus ``strict_img_size=False, output_fmt='NHWC'`` for ``dynamic_img_size``), reads
    ``num_patches``, ``grid_size``, ``feat_ratio()`` and ``dynamic_feat_size()``, and expects ``(B, N, C)`` tokens.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            stem_chs: Tuple[int, int, int] = (32, 64, 128),
            bias: bool = True,
            output_fmt: Optional[str] = None,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        if dynamic_img_pad:
            raise ValueError('ConvStemPatchEmbed does not support dynamic_img_pad (its first conv pads by itself)')
        super().__init__(img_size, patch_size, in_chans, embed_dim, stem_chs)
        if not bias:  # timm asks for a bias-free projection when a norm follows it (pre_norm)
            self.proj.register_parameter('bias', None)
        self.output_fmt = Format(output_fmt) if output_fmt else None
        self.strict_img_size = strict_img_size
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        return self.patch_size if as_scalar else (self.patch_size, self.patch_size)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.feat_size(img_size)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """A new input size (the stem's strides are fixed, so the patch size cannot change)."""
        if patch_size is not None and to_2tuple(patch_size) != (self.patch_size, self.patch_size):
            raise ValueError(f'ConvStemPatchEmbed cannot change its patch size {self.patch_size} to {patch_size}')
        if img_size is not None:
            self.img_size = to_2tuple(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size:  # one dimension per check, so that FX can trace it (as timm's PatchEmbed)
            _assert(x.shape[-2] == self.img_size[0], f'input height does not match the model\'s {self.img_size}')
            _assert(x.shape[-1] == self.img_size[1], f'input width does not match the model\'s {self.img_size}')
        x = super().forward(x)
        return x.flatten(2).transpose(1, 2) if self.output_fmt is None else nchw_to(x, self.output_fmt)


def _create_conv_stem_vit(variant: str, refined: bool, pretrained: bool = False, **kwargs: Any):
    stem_chs = tuple(kwargs.pop('stem_chs', (32, 64, 128)))
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        RefinedVisionTransformer if refined else VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        embed_layer=partial(ConvStemPatchEmbed, stem_chs=stem_chs),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    # DeiT's configuration (the refined DeiT family's), except for the first convolution
    'deit_tiny_conv_stem_patch16_224': _cfg(first_conv='patch_embed.conv1'),
    'refined_deit_tiny_conv_stem_patch16_224': _cfg(first_conv='patch_embed.conv1'),
})


@register_model
def deit_tiny_conv_stem_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-Tiny whose patch embedding is Refiner-ViT's conv stem (``stem_chs`` sets its channels)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, stem_chs=(32, 64, 128))
    return _create_conv_stem_vit('deit_tiny_conv_stem_patch16_224', False, pretrained, **dict(model_args, **kwargs))


@register_model
def refined_deit_tiny_conv_stem_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinedVisionTransformer:
    """:func:`deit_tiny_conv_stem_patch16_224` with the paper-form refiner in every block (random init)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, stem_chs=(32, 64, 128))
    return _create_conv_stem_vit(
        'refined_deit_tiny_conv_stem_patch16_224', True, pretrained, **dict(model_args, **kwargs))
