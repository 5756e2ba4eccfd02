"""Multi-head self-attention with a refiner on the post-softmax maps, a drop-in for timm's ``Attention``."""
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..ops import attention_probs
from .fused import scale_outputs
from .refiner import AttentionRefiner

__all__ = ['AttentionMap', 'AttentionTap', 'RefinedAttention']


class AttentionTap(nn.Module):
    """Does nothing; the place where forward hooks observe an attention layer's maps.

    Attention modules call ``self.tap(raw, refined)`` with the post-softmax maps ``raw`` and the maps
    actually multiplied with V (``refined``, or ``None`` where the layer does not refine). A forward hook
    on the tap receives both as its ``args``; without hooks the call costs one Python call.
    """

    def forward(self, raw: torch.Tensor, refined: Optional[torch.Tensor] = None) -> None:
        return None

    @property
    def observed(self) -> bool:
        """Whether a hook (of this tap, or a global module hook) would see a call. Callers may skip computing a
        map that only the tap needs when nothing observes it."""
        # global hooks live in torch's private registries; should they move, assume someone is watching
        return bool(self._forward_hooks or self._forward_pre_hooks
                    or getattr(torch_module, '_global_forward_hooks', True)
                    or getattr(torch_module, '_global_forward_pre_hooks', True))


class AttentionMap(nn.Module):
    """Returns its input: the attention map that multiplies V, at the name timm gives that map (``attn.softmax``).

    timm's feature tools find attention maps by name: ``timm.utils.AttentionExtract`` takes the FX node
    ``*attn.softmax`` (this module, a leaf of timm's FX graphs) or the output of the module ``*attn_drop``.
    Every attention module of this package routes the map it multiplies with V through both, so either
    method returns one map per block, refined where the block refines. ``attn.tap`` shows raw and refined
    maps together.
    """

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return attn


class RefinedAttention(nn.Module):
    """timm's ``Attention`` with an :class:`AttentionRefiner` applied to the attention probabilities.

    Keeps timm's submodule names (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``,
    ``proj_drop``) so timm ViT weights load unchanged; adds ``refiner``, ``softmax`` (an
    :class:`AttentionMap` on the refined map) and ``tap``. The maps must be materialised, so there is no fused
    SDPA path.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[type] = None,
            refiner: Optional[AttentionRefiner] = None,
            **refiner_kwargs: Any,
    ) -> None:
        """
        Args:
            dim: Token width.
            num_heads: Number of heads.
            qkv_bias: Bias in the qkv projection.
            qk_norm: Normalise q and k per head with ``norm_layer``.
            proj_bias: Bias in the output projection.
            attn_drop: Dropout on the refined maps.
            proj_drop: Dropout after the output projection.
            norm_layer: Normalisation for ``qk_norm``.
            refiner: A ready refiner; when None one is built from ``refiner_kwargs``.
            **refiner_kwargs: Arguments of :class:`AttentionRefiner` (``expansion_ratio``, ``kernel_size``, ...).
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if qk_norm and norm_layer is None:
            raise ValueError('qk_norm=True needs a norm_layer')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.refiner = refiner if refiner is not None else AttentionRefiner(num_heads, **refiner_kwargs)
        self.softmax = AttentionMap()
        self.tap = AttentionTap()

    @classmethod
    def from_attention(cls, attn: nn.Module, refiner: AttentionRefiner) -> 'RefinedAttention':
        """Wrap an existing timm ``Attention``, sharing (not copying) its modules and weights."""
        from timm.layers import Attention

        if not isinstance(attn, Attention):
            raise TypeError(f'expected a timm.layers.Attention, got {type(attn).__name__}')
        if getattr(attn, 'gate', None) is not None:
            raise TypeError('gated timm Attention is not supported by the refiner')
        if attn.head_dim * attn.num_heads != attn.qkv.in_features or attn.proj.out_features != attn.qkv.in_features:
            raise TypeError('only timm Attention with dim == num_heads * head_dim == dim_out can be refined')
        if refiner.num_heads != attn.num_heads:
            raise ValueError(f'refiner has {refiner.num_heads} heads, the attention has {attn.num_heads}')
        new = cls(attn.qkv.in_features, attn.num_heads, refiner=refiner)
        new.scale = attn.scale
        for name in ('qkv', 'q_norm', 'k_norm', 'attn_drop', 'norm', 'proj', 'proj_drop'):
            setattr(new, name, getattr(attn, name))
        return new

    def reparameterize(self) -> None:
        """Fold the attention scale into the rows of ``qkv`` that produce q (timm's ``reparameterize_model`` calls
        this; the walk then fuses the refiner). Not with ``qk_norm``, which normalises q after the projection."""
        if self.scale == 1. or not isinstance(self.q_norm, nn.Identity):
            return
        scale_outputs(self.qkv, self.scale, slice(0, self.qkv.in_features))
        self.scale = 1.

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        from timm.layers.attention import resolve_self_attn_mask  # loaded by then: this layer serves a timm model

        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = resolve_self_attn_mask(N, q, attn_mask, is_causal)  # q: the dtype and device of the maps
        attn = attention_probs(q, k, self.scale, mask)  # 1 once reparameterize() folded it into qkv
        refined = self.softmax(self.refiner(attn))
        x = self.attn_drop(refined) @ v
        self.tap(attn, refined)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))
