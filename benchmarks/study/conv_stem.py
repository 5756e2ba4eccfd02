"""timm's ViT with Refiner-ViT's convolutional stem: one step of the way from a ViT to Refiner-ViT.

Refiner-ViT ("Refiner: Refining Self-attention for Vision Transformers", Zhou et al., arXiv 2106.03714) differs
from a plain ViT in its stem, its blocks, its shared maps and its refiners. The models here change only the stem,
so that its share of the gap can be measured: timm's ``VisionTransformer`` built with
``embed_layer=ConvStemPatchEmbed`` (:class:`refiner_vit.layers.ConvStemPatchEmbed`; DeiT-Tiny's architecture
otherwise), and the same with the paper-form refiner in every block
(:class:`refiner_vit.models.RefinedVisionTransformer`). Registered when the study is imported.
"""
from functools import partial
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from refiner_vit.layers import ConvStemPatchEmbed
from refiner_vit.models import RefinedVisionTransformer

__all__ = ['deit_tiny_conv_stem_patch16_224', 'refined_deit_tiny_conv_stem_patch16_224']


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


def _cfg() -> Dict[str, Any]:
    """DeiT's configuration (no weights), except for the first convolution."""
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='patch_embed.conv1', classifier='head')


default_cfgs = generate_default_cfgs({
    'deit_tiny_conv_stem_patch16_224': _cfg(),
    'refined_deit_tiny_conv_stem_patch16_224': _cfg(),
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
