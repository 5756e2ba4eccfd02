"""Attention probabilities ``softmax(scale * q k^T + mask) + alpha * prev``, in one pass over the maps.

A refined attention layer must materialise its maps, and torch spends more time around the ``q k^T`` matmul than
in it: the matmul writes the logits, the softmax reads and writes them, and Refiner-ViT's computing blocks add the
previous block's map in a third pass. The native kernel (``csrc/attention_probs.c``, operator
``torch.ops.refiner_vit.attention_probs``) computes a few query rows' logits into a buffer that stays in cache and
writes the maps once. It applies without a mask and with a ``prev`` of the maps' own shape, and runs where
:mod:`.dispatch` chooses it, by timing the forward. The operator's backward recovers the softmax from its output (as
:class:`_SoftmaxPlus` does): the softmax's gradient and ``prev``'s in one pass natively where that was measured faster
(a choice of its own; torch's operators take three passes), then torch's matmuls for ``q`` and ``k``. Kept for
backward are the output, ``prev`` and the ``q`` and ``k`` views: the model keeps all four anyway, where torch's path
keeps its own scaled copy of ``q`` and contiguous copy of ``k``.
"""
import ctypes
import functools
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import build, dispatch

__all__ = ['AttentionProbsKernel', 'attention_probs', 'attention_probs_kernel', 'uses_native_attention_probs']

OP, BACKWARD_OP = 'attention_probs', 'attention_probs_backward'


class AttentionProbsKernel:
    """The compiled ``softmax(scale * q k^T) + alpha * prev`` for one head dimension (forward only; the operator
    adds the backward)."""

    def __init__(self, library: build.Library, head_dim: int) -> None:
        self.path, self.head_dim = library.path, head_dim
        self._probs = library.cdll.attention_probs
        self._probs.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 3) * 2 + [ctypes.c_void_p] \
            + [ctypes.c_float] * 2 + [ctypes.c_void_p] + [ctypes.c_long] * 3
        self._probs.restype = ctypes.c_int
        self._backward = library.cdll.attention_probs_backward
        self._backward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 2 \
            + [ctypes.c_long] * 2
        self._backward.restype = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float = 1., prev: Optional[torch.Tensor] = None,
                 alpha: float = 1.) -> torch.Tensor:
        """Maps ``(B, H, N, N)`` for fp32 CPU ``q`` and ``k`` ``(B, H, N, head_dim)``, read in place where their last
        dimension is contiguous; ``prev`` like the result, or None."""
        q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
        B, H, N, _ = q.shape
        out = q.new_empty(B, H, N, N)
        prev_ptr = None if prev is None else prev.contiguous().data_ptr()
        if out.numel() and self._probs(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], prev_ptr,
                                       scale, alpha, out.data_ptr(), B, H, N):
            raise MemoryError('attention_probs could not allocate its key and logit buffers')
        return out

    def backward(self, grad: torch.Tensor, out: torch.Tensor, prev: Optional[torch.Tensor], alpha: float,
                 needs_prev: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What :func:`_softmax_plus_backward` gives, in one pass over the maps: the gradients w.r.t. the logits and
        (where wanted) ``prev``, for fp32 CPU maps."""
        grad, out = grad.contiguous(), out.contiguous()
        prev = None if prev is None else prev.contiguous()
        grad_logits = torch.empty_like(out)
        grad_prev = torch.empty_like(out) if needs_prev and prev is not None else None
        if out.numel():
            self._backward(grad.data_ptr(), out.data_ptr(), None if prev is None else prev.data_ptr(), alpha,
                           grad_logits.data_ptr(), None if grad_prev is None else grad_prev.data_ptr(),
                           out.numel() // out.shape[-1], out.shape[-1])
        return grad_logits, grad_prev


@functools.cache
def attention_probs_kernel(head_dim: int) -> Optional[AttentionProbsKernel]:
    """The native attention probabilities for this head dimension, built on first use; None where it cannot be."""
    library = build.load('attention_probs.c', HEAD_DIM=head_dim)
    return None if library is None else AttentionProbsKernel(library, head_dim)


def _library(head_dim: int) -> Optional[Path]:
    kernel = attention_probs_kernel(head_dim)
    return None if kernel is None else kernel.path


def _softmax_plus_backward(grad: torch.Tensor, out: torch.Tensor, prev: Optional[torch.Tensor], alpha: float,
                           logits_dtype: torch.dtype, needs_prev: bool
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``out = softmax(logits) + alpha * prev`` w.r.t. the logits and ``prev``, from ``out``: the softmax
    is ``out - alpha * prev``, so it need not be kept."""
    probs = out if prev is None else torch.add(out, prev, alpha=-alpha)
    grad_logits = torch.ops.aten._softmax_backward_data(grad.to(probs.dtype), probs, -1, logits_dtype)
    return grad_logits, grad * alpha if needs_prev else None


class _SoftmaxPlus(torch.autograd.Function):
    """``softmax(logits, -1) + alpha * prev`` that keeps for backward only its output and ``prev``, which the model
    keeps anyway (for ``attn @ v`` and the previous block's own product with V), not a third stack of maps. Its
    backward is torch's operators on the saved output, so it is differentiable again."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, prev: torch.Tensor, alpha: float) -> torch.Tensor:
        out = torch.add(logits.softmax(dim=-1), prev, alpha=alpha)
        ctx.alpha, ctx.logits_dtype = alpha, logits.dtype
        ctx.save_for_backward(out, prev)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, prev = ctx.saved_tensors
        grad_logits, grad_prev = _softmax_plus_backward(grad, out, prev, ctx.alpha, ctx.logits_dtype,
                                                        ctx.needs_input_grad[1])
        return grad_logits, grad_prev, None


def _reference(q: torch.Tensor, k: torch.Tensor, scale: float, mask: Optional[torch.Tensor],
               prev: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    logits = ((q * scale) if scale != 1. else q) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    if prev is None:
        return logits.softmax(dim=-1)
    if torch.is_grad_enabled() and (logits.requires_grad or prev.requires_grad) and prev.shape == logits.shape \
            and not torch.compiler.is_compiling() and dispatch.plain_tensors(logits, prev):  # the check is not traced
        return _SoftmaxPlus.apply(logits, prev, alpha)
    return torch.add(logits.softmax(dim=-1), prev, alpha=alpha)


@torch.library.custom_op('refiner_vit::attention_probs', mutates_args=(), device_types='cpu')
def _attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, prev: Optional[torch.Tensor],
                     alpha: float) -> torch.Tensor:
    """The native kernel as an operator, which torch.compile keeps in its graphs."""
    kernel = attention_probs_kernel(q.shape[-1])
    return _reference(q, k, scale, None, prev, alpha) if kernel is None else kernel(q, k, scale, prev, alpha)


@_attention_probs.register_fake
def _(q, k, scale, prev, alpha):
    batch, heads, tokens, _ = q.shape
    return q.new_empty(batch, heads, tokens, tokens)


def _setup_context(ctx, inputs, output) -> None:
    q, k, scale, prev, alpha = inputs
    ctx.scale, ctx.alpha = scale, alpha
    ctx.save_for_backward(q, k, prev, output)


def _scaled_product(maps: torch.Tensor, features: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * maps @ features`` for maps ``(B, H, N, N)`` (a transposed view too) and ``features (B, H, N, d)``: one
    batched matmul with the scale as its alpha, so no pass over the result applies it (7-10 % faster than a matmul
    and a multiply at DeiT-S's and Refiner-ViT-S's shapes)."""
    tokens, dim = features.shape[-2:]
    maps = maps.reshape(-1, *maps.shape[-2:])
    product = torch.baddbmm(maps.new_zeros(()), maps, features.reshape(-1, tokens, dim), beta=0, alpha=scale)
    return product.view(features.shape)


def _native_backward(head_dim: int, grad: torch.Tensor, out: torch.Tensor, prev: Optional[torch.Tensor],
                     alpha: float, needs_prev: bool) -> bool:
    """Whether the softmax's backward runs natively (the kernel of the forward's library; measuring on first use);
    never for a differentiable gradient (``create_graph``), which torch's operators give."""
    tensors = [grad, out] if prev is None else [grad, out, prev]
    applicable = not torch.is_grad_enabled() and dispatch.native_applicable(*tensors)

    def candidates():
        kernel = attention_probs_kernel(head_dim)
        return (lambda: kernel.backward(grad, out, prev, alpha, needs_prev),
                lambda: _softmax_plus_backward(grad, out, prev, alpha, out.dtype, needs_prev))

    shape = (*out.shape, int(prev is not None), int(needs_prev))
    return dispatch.choose(BACKWARD_OP, applicable, lambda: _library(head_dim), shape, candidates)


def _backward(ctx, grad: torch.Tensor):
    """The softmax's gradient from the output (natively where measured faster), then torch's two matmuls of
    ``scale * q k^T``, the scale applied as their alpha rather than to the maps; differentiable again under
    ``create_graph`` (torch's operators throughout)."""
    q, k, prev, out = ctx.saved_tensors
    needs_q, needs_k, _, needs_prev, _ = ctx.needs_input_grad
    if _native_backward(q.shape[-1], grad, out, prev, ctx.alpha, needs_prev):
        grad_logits, grad_prev = attention_probs_kernel(q.shape[-1]).backward(grad, out, prev, ctx.alpha, needs_prev)
    else:
        grad_logits, grad_prev = _softmax_plus_backward(grad, out, prev, ctx.alpha, out.dtype, needs_prev)
    grad_q = _scaled_product(grad_logits, k, ctx.scale) if needs_q else None
    grad_k = _scaled_product(grad_logits.transpose(-2, -1), q, ctx.scale) if needs_k else None
    return grad_q, grad_k, None, grad_prev, None


_attention_probs.register_autograd(_backward, setup_context=_setup_context)


def uses_native_attention_probs(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                                prev: Optional[torch.Tensor] = None, scale: float = 1., alpha: float = 1.) -> bool:
    """Whether :func:`attention_probs` runs the native kernel for these arguments here and now (measuring on first
    use)."""
    tensors = [q, k] if prev is None else [q, k, prev]
    applicable = (mask is None and q.dim() == 4 and k.shape == q.shape
                  and (prev is None or prev.shape == (*q.shape[:3], q.shape[2]))  # broadcasting is torch's
                  and dispatch.native_applicable(*tensors))

    def candidates():
        kernel = attention_probs_kernel(q.shape[-1])
        return (lambda: kernel(q, k, scale, prev, alpha)), (lambda: _reference(q, k, scale, None, prev, alpha))

    shape = (*q.shape, int(prev is not None))
    return dispatch.choose(OP, applicable, lambda: _library(q.shape[-1]), shape, candidates)


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
    if uses_native_attention_probs(q, k, mask, prev, scale, alpha):
        return _attention_probs(q, k, scale, prev, alpha)
    return _reference(q, k, scale, mask, prev, alpha)
