"""Generic building blocks: the attention refiner and refined attention (no model registration here)."""
from .attention import AttentionTap, RefinedAttention
from .attention_softmax import attention_probs
from .local_conv import LocalConv2d, local_conv2d
from .refiner import AttentionRefiner

__all__ = ['AttentionRefiner', 'AttentionTap', 'LocalConv2d', 'RefinedAttention', 'attention_probs', 'local_conv2d']
