"""Read a vision transformer's attention maps through forward hooks, leaving the model as it was.

Every attention layer the package knows is one of four kinds, and each record of
:func:`attention_maps` says which (``kind``) and what its two maps are:

* ``'computing'`` (Refiner-ViT, even blocks): ``raw`` is ``softmax(q k^T * s)``, rows sum to 1;
  ``refined`` is None. The map this block multiplies with V is ``raw`` plus ``s`` times the map the
  previous computing block handed on (s = head_dim^-0.5), which is not recorded separately.
* ``'sharing'`` (Refiner-ViT, odd blocks): the block computes no attention; it receives the previous
  computing block's accumulated map ``M = softmax_c + s * M_prev`` (rows sum to ``1 + s + s^2 + ...``).
  ``raw`` is ``M`` divided by its row sums: a probability map (rows sum to 1), a convex mixture of the
  computing blocks' softmax maps so far, and the map the refiner receives up to that constant factor.
  ``refined`` is ``refiner(M) * s``, exactly the map multiplied with V.
* ``'refined'`` (``refine(...)`` / ``refined_deit_*`` timm ViTs): ``raw`` is the softmax map (rows sum
  to 1); ``refined`` is ``refiner(raw)``, exactly the map multiplied with V (it may hold negative
  entries and its rows need not sum to 1).
* ``'plain'`` (timm ``Attention``): ``raw`` is the softmax map, ``refined`` is None. timm's fused SDPA path
  never materialises the map, so ``fused_attn`` is switched off while recording (and restored); the map
  is read as the input of ``attn_drop``, which is the post-softmax probability map.

Our own attention modules call ``self.tap(raw, refined)``; the hooks sit on those taps. No hook stays
registered after recording, also when the forward pass raises.
"""
from contextlib import contextmanager
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from torch import nn

from ..layers import RefinedAttention
from ..models.refined_deit import resolve_block_indices
from ..models.refiner_vit import ComputingAttention, SharingAttention

__all__ = ['attention_layers', 'attention_maps', 'record_attention', 'token_grid', 'ATTENTION_KINDS']

ATTENTION_KINDS = ('computing', 'sharing', 'refined', 'plain')

AttentionRecord = Dict[str, Any]


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, SharingAttention):
        return 'sharing'
    if isinstance(module, ComputingAttention):
        return 'computing'
    if isinstance(module, RefinedAttention):
        return 'refined'
    if isinstance(module, Attention):
        return 'plain'
    return None


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(qualified name, module, kind)`` of every attention layer of ``model``, in module order.

    Raises:
        TypeError: the model has no attention layer of a supported kind.
    """
    found = [(name, module, _kind(module)) for name, module in model.named_modules()]
    found = [entry for entry in found if entry[2] is not None]
    if not found:
        raise TypeError(
            f'{type(model).__name__} has no supported attention layer (Refiner-ViT blocks, RefinedAttention '
            'or timm.layers.Attention)')
    return found


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to('cpu', copy=True)


def _store_tap(record: AttentionRecord, module: nn.Module, args: tuple, output: Any) -> None:
    raw = args[0]
    refined = args[1] if len(args) > 1 else None
    if record['kind'] == 'sharing':
        raw = raw / raw.sum(dim=-1, keepdim=True)
    record['raw'] = _keep(raw)
    record['refined'] = None if refined is None else _keep(refined)


def _store_plain(record: AttentionRecord, module: nn.Module, args: tuple, output: Any) -> None:
    record['raw'] = _keep(args[0])


@contextmanager
def record_attention(model: nn.Module, layers: Optional[Sequence[int]] = None) -> Iterator[List[AttentionRecord]]:
    """Record attention maps of the forward passes run inside the ``with`` block.

    Yields one record per chosen layer, ``{'block', 'name', 'kind', 'raw', 'refined'}``; ``raw`` and
    ``refined`` are filled (on the CPU, detached) by each forward pass, the last pass winning.

    Args:
        model: A model with supported attention layers (see the module docstring).
        layers: Indices into the model's attention layers (negative from the end); all when None.
    """
    found = attention_layers(model)
    chosen = resolve_block_indices(len(found), layers)  # attention layers are blocks in ViTs
    records = [dict(block=i, name=found[i][0], kind=found[i][2], raw=None, refined=None) for i in chosen]
    handles = []
    fused_flags = []
    try:
        for record, index in zip(records, chosen):
            module = found[index][1]
            if record['kind'] == 'plain':
                fused_flags.append((module, module.fused_attn))
                module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(partial(_store_plain, record)))
            else:
                handles.append(module.tap.register_forward_hook(partial(_store_tap, record)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in fused_flags:
            module.fused_attn = flag


def attention_maps(
        model: nn.Module,
        images: torch.Tensor,
        layers: Optional[Sequence[int]] = None,
) -> List[AttentionRecord]:
    """Run ``model(images)`` without gradients and return the attention maps of its layers.

    The model runs in the mode it is in: call ``model.eval()`` first for inference maps (in training mode
    dropout and the refiners' batch-statistics BatchNorm change them).

    Args:
        model: A Refiner-ViT, a refined timm ViT or a plain timm ViT.
        images: Input batch ``(B, C, H, W)``, preprocessed as the model expects.
        layers: Indices into the model's attention layers (negative from the end); all when None.

    Returns:
        One dict per chosen layer, in depth order: ``block`` (index among the attention layers, which is
        the block index for ViTs), ``name`` (module name), ``kind`` (``'computing'``, ``'sharing'``,
        ``'refined'`` or ``'plain'``), ``raw`` ``(B, H, N, N)`` with rows summing to 1, ``refined``
        ``(B, H, N, N)`` or None. N counts the prefix (class) tokens first, then the patches in raster order.
    """
    with torch.no_grad(), record_attention(model, layers) as records:
        model(images)
    missing = [record['name'] for record in records if record['raw'] is None]
    if missing:
        raise RuntimeError(f'the forward pass did not run the attention layers {missing}')
    return records


def token_grid(model: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """Rows and columns of the patch-token grid ``model`` makes from an image of ``image_size`` (H, W)."""
    patch_embed = getattr(model, 'patch_embed', None)
    for method in ('feat_size', 'dynamic_feat_size'):  # ours (ConvStem) and timm's PatchEmbed
        if callable(getattr(patch_embed, method, None)):
            return tuple(int(s) for s in getattr(patch_embed, method)(tuple(image_size)))
    raise TypeError(f'{type(model).__name__}: cannot tell the token grid (no patch_embed.feat_size)')
