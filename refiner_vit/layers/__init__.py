"""Generic building blocks: the attention refiner and refined attention (no model registration here)."""
from .attention import AttentionTap, RefinedAttention
from .refiner import AttentionRefiner

__all__ = ['AttentionRefiner', 'AttentionTap', 'RefinedAttention']
