"""Per-head sums of products and per-head affine combinations of stacks of maps, one pass over memory each
(``csrc/head_passes.c``), where torch's operators take a pass per term.

The released refiner's closed-form tail (:class:`refiner_vit.layers.released.Tail`) is made of these; it runs them
natively where :mod:`refiner_vit.layers.released` has chosen its native kernels by the measured rule, and as torch's
operators (:data:`TORCH`) everywhere else. Both forms take and give the same things.
"""
import ctypes
import functools
from typing import Optional, Sequence, Tuple

import torch

from . import build

__all__ = ['HeadPasses', 'NativeHeadPasses', 'TORCH', 'native_head_passes']

Pair = Tuple[torch.Tensor, Optional[torch.Tensor]]
Term = Tuple[torch.Tensor, torch.Tensor]


class HeadPasses:
    """The two passes as torch's operators, over ``(B, H, M)`` stacks (any dtype; sums in ``dtype``)."""

    #: Whether the sums are taken in float64 whatever the stacks' dtype (so that a caller may sum uncentred maps).
    float64_sums = False

    def sums(self, pairs: Sequence[Pair], dtype: torch.dtype) -> torch.Tensor:
        """``(P, H)``: per head, the sum of ``x * y`` over the batch and the plane for each pair (``y`` None: of
        ``x``). Products are diagonals of batched ``H x H`` products: no product stack is formed."""
        sums = []
        for x, y in pairs:
            if y is None:
                sums.append(x.sum((0, 2), dtype=dtype))
            else:
                sums.append((x @ y.transpose(1, 2).to(x.dtype)).diagonal(dim1=1, dim2=2).sum(0, dtype=dtype))
        return torch.stack(sums)

    def affine(self, constant: torch.Tensor, terms: Sequence[Term], out: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """``constant + sum(x * factor)`` with per-head ``constant`` and factors (added to ``out`` in place if given),
        one pass per term, in the stacks' promoted dtype."""
        (first, factor), *rest = terms
        dtype = out.dtype if out is not None else (
            torch.promote_types(first.dtype, rest[0][0].dtype) if rest else first.dtype)
        if out is None:
            out = torch.addcmul(constant.to(dtype)[:, None], first, factor.to(dtype)[:, None])
        else:
            out.add_(constant.to(dtype)[:, None]).addcmul_(first, factor.to(dtype)[:, None])
        for x, factor in rest:
            out.addcmul_(x, factor.to(dtype)[:, None])
        return out


TORCH = HeadPasses()


def _pointers(tensors: Sequence[Optional[torch.Tensor]]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


class NativeHeadPasses(HeadPasses):
    """The two passes by the native kernel, for contiguous fp32 CPU stacks of one shape."""

    float64_sums = True

    def __init__(self, library: build.Library) -> None:
        self.path = library.path
        self._sums, self._affine = library.cdll.head_sums, library.cdll.head_affine
        longs = [ctypes.c_long] * 3
        self._sums.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + longs
        self._affine.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + longs
        self._sums.restype = self._affine.restype = ctypes.c_int

    def sums(self, pairs: Sequence[Pair], dtype: torch.dtype) -> torch.Tensor:
        stacks = [(x.contiguous(), None if y is None else y.contiguous()) for x, y in pairs]
        batch, heads, plane = stacks[0][0].shape
        out = torch.zeros(len(stacks), heads, dtype=torch.float64)
        if self._sums(len(stacks), _pointers([x for x, _ in stacks]), _pointers([y for _, y in stacks]),
                      out.data_ptr(), batch, heads, plane):
            raise MemoryError('head_sums: too many pairs, or no memory for the threads\' sums')
        return out.to(dtype)

    def affine(self, constant: torch.Tensor, terms: Sequence[Term], out: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        stacks = [x.contiguous() for x, _ in terms]
        if out is not None:  # out's own values are a term of the sum
            stacks.append(out)
            terms = [*terms, (out, torch.ones_like(constant))]
        factors = [factor.float().contiguous() for _, factor in terms]
        constant = constant.float().contiguous()
        result = torch.empty_like(stacks[0]) if out is None else out
        batch, heads, plane = result.shape
        if self._affine(len(stacks), _pointers(stacks), _pointers(factors), constant.data_ptr(), result.data_ptr(),
                        batch, heads, plane):
            raise ValueError(f'head_affine: {len(stacks)} terms, more than the kernel takes')
        return result


@functools.cache
def native_head_passes() -> Optional[NativeHeadPasses]:
    """The native passes, built on first use; None where they cannot be built."""
    library = build.load('head_passes.c')
    return None if library is None else NativeHeadPasses(library)

