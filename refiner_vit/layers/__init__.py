"""Generic building blocks: the attention refiner and refined attention (no model registration here)."""
from .attention import AttentionMap, AttentionTap, RefinedAttention
from .folded import FoldedRefiner, LocalConv2d, scale_outputs
from .refiner import AttentionRefiner

__all__ = ['AttentionMap', 'AttentionRefiner', 'AttentionTap', 'FoldedRefiner', 'LocalConv2d', 'RefinedAttention',
           'scale_outputs']
