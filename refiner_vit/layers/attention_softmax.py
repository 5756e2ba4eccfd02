"""Attention probabilities ``softmax(scale * q k^T + mask) + alpha * prev``, in one pass over the maps for inference.

A refined attention layer must materialise its maps, and torch spends more time around the ``q k^T`` matmul than
in it: the matmul writes the logits, the softmax reads and writes them, and Refiner-ViT's computing blocks add the
previous block's map in a third pass. For inference on the CPU in fp32, :func:`attention_probs` runs the native
kernel of :mod:`refiner_vit.kernels` instead (operator ``torch.ops.refiner_vit.attention_probs``), which writes
the maps once. Where there is a mask, where autograd needs a graph, on GPUs, in other dtypes, under autocast, while
exporting or tracing, under dispatch modes (the FLOP counter) and inside torch.func transforms, torch's operators
run.
"""
from typing import Optional

import torch
from timm.layers import register_notrace_function
from timm.layers.attention import maybe_add_mask

from ..kernels import attention_probs_kernel
from .native import native_inference_applicable

__all__ = ['attention_probs', 'uses_native_attention_probs']


@torch.library.custom_op('refiner_vit::attention_probs', mutates_args=(), device_types='cpu')
def _attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, prev: Optional[torch.Tensor],
                     alpha: float) -> torch.Tensor:
    """The native kernel as an operator (inference only: no autograd), which torch.compile keeps in its graphs."""
    return attention_probs_kernel(q.shape[-1])(q, k, scale, prev, alpha)


@_attention_probs.register_fake
def _(q, k, scale, prev, alpha):
    batch, heads, tokens, _ = q.shape
    return q.new_empty(batch, heads, tokens, tokens)


def uses_native_attention_probs(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                                prev: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`attention_probs` runs the native kernel for these arguments here and now."""
    tensors = [q, k] if prev is None else [q, k, prev]
    if mask is not None or q.dim() != 4 or k.shape != q.shape:
        return False
    if prev is not None and prev.shape != (*q.shape[:3], q.shape[2]):
        return False  # broadcasting is torch's
    return native_inference_applicable(*tensors) and attention_probs_kernel.available(q.shape[-1])


@register_notrace_function  # a leaf in timm's FX graphs: whether mask is None is known only when it runs
def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float = 1., mask: Optional[torch.Tensor] = None,
                    prev: Optional[torch.Tensor] = None, alpha: float = 1.) -> torch.Tensor:
    """``softmax(scale * q @ k^T + mask, -1) + alpha * prev`` (without the terms that are None).

    Args:
        q, k: Queries and keys ``(B, H, N, head_dim)``; views into the qkv projection's output are read in place.
        scale: Factor on the logits.
        mask: Additive mask broadcastable to the maps (timm's ``resolve_self_attn_mask``), or None.
        prev: Maps ``(B, H, N, N)`` to accumulate, or None.
        alpha: Factor on ``prev``.
    """
    if uses_native_attention_probs(q, k, mask, prev):
        return _attention_probs(q, k, scale, prev, alpha)
    attn = ((q * scale) if scale != 1. else q) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, mask).softmax(dim=-1)
    return attn if prev is None else torch.add(attn, prev, alpha=alpha)
