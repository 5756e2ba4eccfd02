"""The refiner's simpler rivals: other ways of mixing attention heads, as study models built by timm name.

* ``study_talking_heads``: talking-heads attention as in CaiT (timm's ``cait.TalkingHeadAttn``): a learned
  linear mix of the heads' logits before the softmax and of their probabilities after it (``proj_l`` /
  ``proj_w``, each a ``Linear(H, H)`` with bias);
* ``study_reattention``: DeepViT's re-attention: a learned mix of the heads' probabilities after the softmax
  (``Linear(H, H)`` with bias, as DeepViT's 1x1 convolution over heads) followed by a ``BatchNorm2d`` over heads.

Both are :class:`~refiner_vit.layers.RefinedAttention` whose ``refiner`` is the post-softmax head mix, so the
attention analysis (``refiner attention``, :func:`refiner_vit.analysis.attention_maps`) records their maps as it
does a refined ViT's: ``raw`` the softmax map, ``refined`` the map multiplied with V. Each is built on a timm
ViT named by ``base`` (the plain ViT, or the conv-stem ViT); the ViT's other weights are untouched. They are
registered when this module is imported (the study imports it), so ``refiner train --model NAME`` in the study's
process, and any reload of its runs there, builds them by name.
"""
from typing import Any, Callable, Optional

import torch
from timm.models import register_model
from torch import nn

from refiner_vit.layers import RefinedAttention

from .building import build_edited

__all__ = ['HeadMix', 'ReAttention', 'TalkingHeadsAttention', 'study_reattention', 'study_talking_heads']


class HeadMix(nn.Linear):
    """A learned linear map across the head axis of ``(B, H, N, N)`` maps, as timm's ``cait`` applies
    ``proj_l`` / ``proj_w`` (heads moved last, mixed, moved back)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__(num_heads, num_heads)

    @property
    def num_heads(self) -> int:
        return self.in_features

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return super().forward(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ReAttention(nn.Sequential):
    """DeepViT's re-attention on post-softmax maps: a head mix, then a BatchNorm over heads."""

    def __init__(self, num_heads: int) -> None:
        super().__init__(HeadMix(num_heads), nn.BatchNorm2d(num_heads))
        self.num_heads = num_heads


class TalkingHeadsAttention(RefinedAttention):
    """Talking-heads attention: ``proj_l`` mixes the heads' logits, ``refiner`` (a :class:`HeadMix`, CaiT's
    ``proj_w``) their probabilities. The tap sees the softmax of the mixed logits as ``raw``."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        kwargs.setdefault('refiner', HeadMix(num_heads))
        super().__init__(dim, num_heads, **kwargs)
        self.proj_l = HeadMix(num_heads)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError('TalkingHeadsAttention takes no attention mask (as CaiT\'s)')
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = self.proj_l((q * self.scale) @ k.transpose(-2, -1))
        attn = logits.softmax(dim=-1)
        refined = self.refiner(attn)
        x = self.attn_drop(refined) @ v
        self.tap(attn, refined)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, C))))


def _rival(name: str, base: str, pretrained: bool, kwargs: dict, make: Callable[[nn.Module], nn.Module]
           ) -> nn.Module:
    """``base`` built by timm with ``kwargs``, each block's attention replaced by ``make(attention)``."""
    def replace_attention(model: nn.Module) -> None:
        for block in model.blocks:
            block.attn = make(block.attn)

    return build_edited(name, base, pretrained, kwargs, replace_attention)


@register_model
def study_talking_heads(pretrained: bool = False, base: str = 'deit_tiny_patch16_224', **kwargs: Any) -> nn.Module:
    """The ViT ``base`` with talking-heads attention in every block (CaiT's ``proj_l`` / ``proj_w``)."""
    return _rival('study_talking_heads', base, pretrained, kwargs,
                  lambda attn: TalkingHeadsAttention.from_attention(attn, HeadMix(attn.num_heads)))


@register_model
def study_reattention(pretrained: bool = False, base: str = 'deit_tiny_patch16_224', **kwargs: Any) -> nn.Module:
    """The ViT ``base`` with DeepViT's re-attention in every block (head mix, then BatchNorm over heads)."""
    return _rival('study_reattention', base, pretrained, kwargs,
                  lambda attn: RefinedAttention.from_attention(attn, ReAttention(attn.num_heads)))
