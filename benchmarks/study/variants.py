"""The compared models: timm names and kwargs that ``refiner train --model NAME --model-kwargs ...`` builds.

Every variant is a registered model (or kwargs of one), so ``refiner train`` trains any row of a table. The core
registers the plain, refined and Refiner-ViT models; the models that exist only for the study (the conv-stem ViTs,
Refiner-ViT without sharing or without its refiner, the 2-D key grid, the rivals) are registered by the study's
modules imported here, so that the study's process, and any reload of its runs there, builds them by name.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, Tuple

from . import conv_stem, key_grid, rivals, sharing  # noqa: F401  (register the study's models with timm)

MAIN_VARIANTS = ('vit', 'refiner', 'refiner_vit')
# From the plain ViT to the released architecture, one change per step; `refiner` is the paper's refiner on the ViT.
DECOMPOSITION = ('vit', 'vit_conv_stem', 'vit_conv_stem_refiner', 'refiner_vit_no_sharing', 'refiner_vit_no_refiner',
                 'refiner_vit', 'refiner')
# (step, from, to): the attribution of the vit -> refiner_vit gap, then the paper-form refiner on either ViT.
DECOMPOSITION_STEPS = (
    ('stem: patch projection -> conv stem', 'vit', 'vit_conv_stem'),
    ('block details: residual/MLP scaling, MLP ratio 3', 'vit_conv_stem', 'refiner_vit_no_sharing'),
    ('sharing: odd blocks reuse the maps (accumulated)', 'refiner_vit_no_sharing', 'refiner_vit_no_refiner'),
    ('refiner: released refiner on the shared maps', 'refiner_vit_no_refiner', 'refiner_vit'),
    ('(paper refiner on the ViT)', 'vit', 'refiner'),
    ('(paper refiner on the conv-stem ViT)', 'vit_conv_stem', 'vit_conv_stem_refiner'),
)
# The refiner beside simpler ways of mixing heads, on the plain ViT and on the conv-stem ViT (``--ablation rivals``),
# each tuned by its own sweep; ``rivals_depth`` is the plain-ViT part, for a deeper setting (``--depth``).
RIVALS_DEPTH = ('vit', 'refiner', 'talking_heads', 'reattention')
RIVALS = (*RIVALS_DEPTH, 'refiner_k1', 'refiner_r1', 'vit_conv_stem', 'vit_conv_stem_refiner',
          'conv_stem_talking_heads', 'conv_stem_reattention', 'conv_stem_refiner_k1', 'conv_stem_refiner_r1')


@dataclass(frozen=True)
class Variant:
    """A model as the engine builds it: a timm name, its kwargs and extra ``refiner train`` flags."""
    model: str
    kwargs: Dict[str, Any]
    flags: Tuple[str, ...] = ()

    def with_kwargs(self, **kwargs: Any) -> 'Variant':
        return replace(self, kwargs={**self.kwargs, **kwargs})


def stem_channels(embed_dim: int) -> Tuple[int, int, int]:
    """The conv stem's channels at a width: the default small model's (16, 32, 64) at 64."""
    return tuple(max(8, embed_dim // 2 ** i) for i in (2, 1, 0))


def main_variants(embed_dim: int, depth: int, num_heads: int, patch_size: int) -> Dict[str, Variant]:
    """The three compared models, equal in width, depth, heads and token grid.

    Refiner-ViT trains with ``refiner_recompute=False``: the same arithmetic, and at the study's sizes the memory
    the recompute saves does not matter while its time does (one CPU thread per run).
    """
    arch = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    released = {**arch, 'stem_chs': stem_channels(embed_dim), 'aux_head': False, 'refiner_recompute': False}
    return {
        'vit': Variant('deit_tiny_patch16_224', arch),
        'refiner': Variant('refined_deit_tiny_patch16_224', {**arch, 'refiner_expansion': 3, 'refiner_kernel': 3,
                                                              'refiner_form': 'linear'}),
        'refiner_vit': Variant('test_refiner_vit', released),
    }


def decomposition_variants(base: Dict[str, Variant]) -> Dict[str, Variant]:
    """:data:`DECOMPOSITION`: the main variants and the four models between the plain ViT and Refiner-ViT."""
    vit, refiner, released = base['vit'], base['refiner'], base['refiner_vit']
    stem = dict(stem_chs=released.kwargs['stem_chs'])
    refiner_kwargs = {k: v for k, v in refiner.kwargs.items() if k.startswith('refiner_')}
    table = {
        **base,
        'vit_conv_stem': Variant('deit_tiny_conv_stem_patch16_224', {**vit.kwargs, **stem}),
        'vit_conv_stem_refiner': Variant('refined_deit_tiny_conv_stem_patch16_224',
                                         {**vit.kwargs, **stem, **refiner_kwargs}),
        'refiner_vit_no_sharing': replace(released, model='study_refiner_vit_no_sharing'),
        'refiner_vit_no_refiner': replace(released, model='study_refiner_vit_no_refiner'),
    }
    return {name: table[name] for name in DECOMPOSITION}


def rival_variants(table: Dict[str, Variant]) -> Dict[str, Variant]:
    """:data:`RIVALS` not in ``table`` (which holds the decomposition's): talking heads and re-attention
    (:mod:`study.rivals`) on either ViT, and the refiner with kernel 1 (expansion only) or expansion 1 (convolution
    only), the models of the kernel and expansion ablations at ``k=1`` / ``r=1``."""
    plain, stem = table['vit'], table['vit_conv_stem']
    out = {}
    for prefix, vit, refined in (('', plain, table['refiner']), ('conv_stem_', stem, table['vit_conv_stem_refiner'])):
        out[f'{prefix}talking_heads'] = Variant('study_talking_heads', {**vit.kwargs, 'base': vit.model})
        out[f'{prefix}reattention'] = Variant('study_reattention', {**vit.kwargs, 'base': vit.model})
        out[f'{prefix}refiner_k1'] = refined.with_kwargs(refiner_kernel=1)
        out[f'{prefix}refiner_r1'] = refined.with_kwargs(refiner_expansion=1)
    return out


def ablation_variants(name: str, base: Dict[str, Variant], depth: int) -> Dict[str, Tuple[str, Variant]]:
    """``label -> (tuned variant whose lr it uses, variant)`` for one ablation of the ``refiner`` variant."""
    refiner = base['refiner']
    half = depth // 2
    table: Dict[str, Dict[str, Variant]] = {
        'expansion': {f'r={r}': refiner.with_kwargs(refiner_expansion=r) for r in (1, 2, 3, 4, 6)},
        'kernel': {f'k={k}': refiner.with_kwargs(refiner_kernel=k) for k in (1, 3, 5, 7)},
        'placement': {'first half': refiner.with_kwargs(refiner_blocks=list(range(half))),
                      'second half': refiner.with_kwargs(refiner_blocks=list(range(half, depth))),
                      'all blocks': refiner},
        'form': {'linear (paper)': refiner, 'released (BN+ReLU6)': refiner.with_kwargs(refiner_form='released')},
        # the engine's --refine: refine(model, form='linear') on the plain ViT, started as the identity
        'init': {'random (paper)': refiner,
                 'identity': replace(base['vit'], flags=('--refine', '--refine-init', 'identity'))},
        'conv2d': {'1-D (released)': refiner, '2-D key grid': replace(refiner, model='refined_vit_key_grid')},
        'cos_reg': {'off': refiner, 'on': replace(refiner, flags=('--cos-reg', str(depth - 1)))},
    }
    return {label: ('refiner', variant) for label, variant in table[name].items()}
