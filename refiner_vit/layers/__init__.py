"""Generic building blocks: the attention refiner, refined attention and the conv stem (no model registration here)."""
from .attention import AttentionMap, AttentionTap, RefinedAttention
from .conv_stem import ConvStem, ConvStemPatchEmbed
from .fused import FoldedRefiner, LocalConv2d, scale_outputs
from .refiner import AttentionRefiner

__all__ = ['AttentionMap', 'AttentionRefiner', 'AttentionTap', 'ConvStem', 'ConvStemPatchEmbed', 'FoldedRefiner',
           'LocalConv2d', 'RefinedAttention', 'scale_outputs']
