"""The refiner as a plug-in for timm's VisionTransformer family (ViT, DeiT, DeiT-III, ...).

:func:`refine` swaps the ``attn`` module of chosen blocks for a :class:`~refiner_vit.layers.RefinedAttention`
that shares the original qkv / proj modules, so pretrained weights stay where they are. The registered
``refined_deit_*`` models are DeiT with the paper-form refiner in every block (the paper's "refiner on DeiT").
"""
from typing import Any, Dict, List, Optional, Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import (
    VisionTransformer,
    checkpoint_filter_fn,  # this family's weights are timm ViT weights
)
from torch import nn

from ..layers import AttentionRefiner, RefinedAttention

__all__ = ['checkpoint_filter_fn', 'refine', 'resolve_block_indices', 'RefinedVisionTransformer']

REFINER_FORMS = ('linear', 'released')


def resolve_block_indices(num_blocks: int, blocks: Optional[Sequence[int]]) -> List[int]:
    """``blocks`` (indices, negative from the end; None for all) as sorted distinct indices into ``num_blocks``."""
    if blocks is None:
        return list(range(num_blocks))
    resolved = []
    for index in blocks:
        if not -num_blocks <= index < num_blocks:
            raise IndexError(f'block index {index} is out of range for a model with {num_blocks} blocks')
        resolved.append(index % num_blocks)
    return sorted(set(resolved))


def refine(
        model: nn.Module,
        expansion_ratio: int = 3,
        kernel_size: int = 3,
        blocks: Optional[Sequence[int]] = None,
        form: str = 'linear',
        init: Optional[str] = None,
) -> nn.Module:
    """Put a refiner into the attention of ``model``'s blocks, in place; returns ``model``.

    Args:
        model: A timm VisionTransformer-family model (``model.blocks[i].attn`` is a ``timm.layers.Attention``).
        expansion_ratio: Heads are expanded to ``num_heads * expansion_ratio`` maps.
        kernel_size: Side of the depthwise kernel over the (query, key) plane.
        blocks: Indices of the blocks to refine (negative from the end); all when None.
        form: ``'linear'`` (the paper's expand -> depthwise conv -> reduce) or ``'released'`` (the authors'
            trained form with BatchNorm, ReLU6, shortcut and per-head BatchNorm).
        init: ``'identity'`` makes each refiner start as the identity map, so a pretrained model predicts
            exactly as before until fine-tuned (linear form only); ``'random'`` keeps PyTorch's default
            initialisation (as when training from scratch). None: identity for linear, random for released.
    """
    if form not in REFINER_FORMS:
        raise ValueError(f'form must be one of {REFINER_FORMS}, got {form!r}')
    init = init or ('identity' if form == 'linear' else 'random')
    if init not in ('identity', 'random'):
        raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
    if init == 'identity' and form != 'linear':
        raise ValueError("init='identity' needs form='linear' (BatchNorm in training mode is no identity)")
    model_blocks = getattr(model, 'blocks', None)
    if model_blocks is None:
        raise TypeError(f'{type(model).__name__} has no `blocks`; refine() expects a timm ViT-family model')
    indices = resolve_block_indices(len(model_blocks), blocks)
    for index in indices:
        attn = model_blocks[index].attn
        if isinstance(attn, RefinedAttention):
            raise ValueError(f'block {index} is already refined')
        num_heads = getattr(attn, 'num_heads', None)
        if num_heads is None:
            raise TypeError(f'block {index}: {type(attn).__name__} is not a timm Attention')
        if form == 'linear':
            refiner = AttentionRefiner(num_heads, expansion_ratio, kernel_size)
        else:
            refiner = AttentionRefiner.released(num_heads, expansion_ratio, kernel_size)
        if init == 'identity':
            refiner.init_identity()
        weight = attn.qkv.weight
        refiner.to(device=weight.device, dtype=weight.dtype)
        model_blocks[index].attn = RefinedAttention.from_attention(attn, refiner)
    model.refine_args = dict(
        expansion_ratio=expansion_ratio, kernel_size=kernel_size, blocks=indices, form=form, init=init)
    return model


class RefinedVisionTransformer(VisionTransformer):
    """timm's VisionTransformer with refined attention, built refined (refiners initialised at random).

    timm builds the ViT and :func:`refine` puts the refiners in, rather than timm's ``attn_layer=`` hook: timm
    constructs an ``attn_layer`` class itself with a fixed set of arguments (it checks ``issubclass``, so a
    ``functools.partial`` is refused), so neither the model-wide refiner settings (expansion, kernel, form) nor a
    choice of blocks (``refiner_blocks``) can pass through it. ``refine()`` is also how a pretrained ViT is refined,
    so both paths share one implementation.
    """

    def __init__(
            self,
            *args: Any,
            refiner_expansion: int = 3,
            refiner_kernel: int = 3,
            refiner_blocks: Optional[Sequence[int]] = None,
            refiner_form: str = 'linear',
            **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        refine(self, refiner_expansion, refiner_kernel, refiner_blocks, refiner_form, init='random')


def _create_refined_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> RefinedVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        RefinedVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'paper_ids': 'arXiv:2106.03714',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'refined_deit_tiny_patch16_224': _cfg(),
    'refined_deit_small_patch16_224': _cfg(),
    'refined_deit_base_patch16_224': _cfg(),
})


@register_model
def refined_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinedVisionTransformer:
    """DeiT-Tiny with the paper-form refiner in every block."""
    arch = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_refined_vit('refined_deit_tiny_patch16_224', pretrained, **{**arch, **kwargs})


@register_model
def refined_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinedVisionTransformer:
    """DeiT-Small with the paper-form refiner in every block."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_refined_vit('refined_deit_small_patch16_224', pretrained, **{**arch, **kwargs})


@register_model
def refined_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinedVisionTransformer:
    """DeiT-Base with the paper-form refiner in every block."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_refined_vit('refined_deit_base_patch16_224', pretrained, **{**arch, **kwargs})
