"""The released refiner's training path: on the CPU in fp32 native kernels that never write the expanded maps; else
its expanded stages as matmuls over channels-last maps (the torch forms), BatchNorm and ReLU6 differentiated by hand.

The released refiner (:meth:`AttentionRefiner.released`) in training runs, over ``E = H * r`` expanded maps,
``expand (1x1) -> BatchNorm -> ReLU6 -> depthwise k x k -> BatchNorm -> ReLU6 -> reduce (1x1)``, then a per-head
tail (BatchNorm, shortcut, per-head BatchNorm). Autograd runs each stage as its own operator over NCHW maps of
12-36 channels, where oneDNN's convolutions and torch's BatchNorm are several passes slower than the memory allows.

**Native kernels** (:mod:`refiner_vit.ops.released_training`, :mod:`refiner_vit.ops.head_passes`): once both
BatchNorms' batch statistics are known, the expanded stages are the folded inference refiner's, so the kernels run
them and their backward a query row at a time with the expanded rows recomputed in cache; each pass gives the
float64 sums the next needs (input moments, the second BatchNorm's sums, the reduced maps; backward: the second
BatchNorm's and the reduction's sums, then the input pass). They keep nothing but the input and reduced maps, so they
serve a refiner with ``recompute``. Forward and backward are each chosen between them and the torch forms below by
:func:`refiner_vit.ops.dispatch.choose`'s measured rule; float64, autocast, ``recompute=False`` and other devices run
the torch forms.

**Torch forms**: the expanded maps are ``(B, N*N, E)`` matrices (channels last, so the channels are each row's
contiguous values) and every stage is a matmul, one depthwise convolution in channels-last, or an elementwise pass:

* **expansion + first BatchNorm + ReLU6**: the expansion is linear, so the first BatchNorm's batch statistics follow
  from the input maps' ``H x H`` second moments (``mean_e = W mean_a``, ``var_e = diag(W S W^T)``, ``S`` the centred
  moments of the input): the normalisation folds into the expansion's weight and bias, one matmul writes the
  normalised maps and one clamp makes them ReLU6's output;
* **depthwise convolution**, torch's channels-last form;
* **second BatchNorm + ReLU6**: per-channel sums as matrix-vector products, one multiply-add, one clamp;
* **reduction**: one matmul, writing the reduced maps in the input's NCHW layout;
* **backward**: the same forms: ReLU6's gradient from its output, each BatchNorm's gradient as
  ``scale * (g - mean(g) - x_hat * mean(g x_hat))``; the first BatchNorm's sums again from ``H``-column products
  with the input, so its input is never formed in backward.

* **tail**: with the reduced maps ``r`` centred (BatchNorm ignores a shift), ``out_norm(norm3(r) + a)`` is
  ``k_r r + k_a a + c`` per head, its statistics from ``var(r)``, ``cov(r, a)`` and the input's moments, and its
  gradients are again affine in the upstream gradient, ``r`` and ``a`` (:class:`Tail`). Other tails run as torch's
  modules, without a graph in the forward and differentiated on the reduced maps in backward, as :mod:`.recompute`
  does.

With ``recompute``, only the input and the (centred) reduced maps are kept, and backward recomputes the three
expanded stacks it reads once, in the same forms, writing the gradients over them; without it, those three stacks are
kept.

BatchNorm semantics are torch's: batch statistics (biased variance) normalise, the running statistics get the
unbiased variance once per forward with the module's momentum (or the cumulative average when it is None), and
``num_batches_tracked`` counts. Under autocast, the matmuls and the convolution run in the autocast dtype, the
statistics in float32, as torch's autocast runs the stages.
"""
import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from ..ops import dispatch
from ..ops.batch_norm import update_running_statistics
from ..ops.dispatch import exporting, plain_tensors
from ..ops.folded_refiner import FoldedRefinerKernel, folded_refiner_kernel
from ..ops.head_passes import TORCH, HeadPasses, native_head_passes
from ..ops.released_training import (
    ExpandedWeights,
    ReleasedTrainingKernel,
    released_training_kernel,
    training_applicable,
)
from .recompute import expanded_bytes, running_stats_frozen, tail

__all__ = ['Statistics', 'Tail', 'centred_maps', 'depthwise', 'expand_normalise', 'expanded_backward', 'expanded_maps',
           'expanded_weights', 'input_statistics', 'native_forward', 'normalise_second', 'refine_released',
           'released_applies']


def _batch_norm(norm: nn.Module) -> bool:
    """A BatchNorm2d that normalises with the batch's statistics (training, or no running statistics)."""
    return type(norm) is nn.BatchNorm2d and (norm.training or norm.running_mean is None)


# Below this many bytes of expanded maps per call, autograd's stages are faster: the path's fixed cost (a dozen more
# small operations) outweighs its fewer passes over memory. On a 2-core Xeon (AVX-512), forward and backward of one
# refiner: the stages 1.3x faster at 0.7 MiB (the digits demo's maps: 32 x 4 heads x 17 x 17 tokens), the path 1.1x
# faster at 0.9 MiB and 2.5x faster from 5.5 MiB (Refiner-ViT-S: 85 MiB).
RELEASED_MIN_BYTES = 1 << 20


def released_applies(refiner: nn.Module, attn: torch.Tensor) -> bool:
    """Whether :func:`refine_released` computes ``refiner(attn)``: a graph is wanted, in eager mode on plain tensors,
    the expanded maps have at least :data:`RELEASED_MIN_BYTES`, and the refiner is the released form (BatchNorms
    with batch statistics around the expanded stages, ReLU6, a depthwise convolution, the released local
    convolution). Other refiners, smaller maps, and these in eval mode, run their stages."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    return (torch.is_grad_enabled() and (attn.requires_grad or bool(params)) and attn.dim() == 4
            and expanded_bytes(refiner, attn) >= RELEASED_MIN_BYTES
            and attn.is_floating_point() and not torch.compiler.is_compiling() and not exporting()
            and plain_tensors(attn, *params) and refiner.released_local_conv
            and refiner.conv.groups == refiner.conv.in_channels == refiner.conv.out_channels
            and _batch_norm(refiner.norm1) and _batch_norm(refiner.norm2)
            and type(refiner.act1) is nn.ReLU6 and type(refiner.act2) is nn.ReLU6)


def refine_released(refiner: nn.Module, attn: torch.Tensor, recompute: bool, output_scale: float = 1.
                    ) -> torch.Tensor:
    """``refiner.forward_stages(attn) * output_scale`` for a refiner :func:`released_applies` to (see the module);
    the closed-form tail takes the factor into its own, so that it costs no pass over the maps."""
    params = [p for p in refiner.parameters() if p.requires_grad]
    return _ReleasedRefiner.apply(refiner, recompute, float(output_scale), attn, *params)


def _affine(norm: nn.BatchNorm2d, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm's weight and bias (ones and zeros without affine parameters) in ``like``'s dtype."""
    channels = norm.num_features
    weight = like.new_ones(channels) if norm.weight is None else norm.weight.detach().to(like.dtype)
    bias = like.new_zeros(channels) if norm.bias is None else norm.bias.detach().to(like.dtype)
    return weight, bias


def _colsum(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """Per-channel sums of ``(B, M, C)`` maps in ``ones``' dtype: a matrix-vector product, one pass over ``x``."""
    if x.dtype == ones.dtype:
        return (ones @ x.reshape(-1, x.shape[-1]))
    return x.reshape(-1, x.shape[-1]).sum(0, dtype=ones.dtype)


def _channel_dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel ``sum(x * y)`` of two ``(B, M, C)`` stacks: the diagonals of their batched ``C x C`` products, so
    that no product stack is formed (a stack of expanded maps is the largest transient of a training step)."""
    return (x.transpose(1, 2) @ y).diagonal(dim1=1, dim2=2).sum(0, dtype=dtype)


class Statistics:
    """The batch statistics and folded affine factors of the two expanded BatchNorms, and what backward needs of the
    input maps' moments (all per channel, in the statistics' dtype)."""

    def __init__(self, refiner: nn.Module, moments: torch.Tensor, mean_a: torch.Tensor, count: int) -> None:
        """From the input maps' centred second moments ``S (H, H)`` and per-head means, both in the statistics'
        dtype, over ``count`` positions per head."""
        stat_dtype = mean_a.dtype
        self.count = count
        self.mean_a = mean_a
        self.moments = moments
        self.expand = refiner.expand.weight.detach()[:, :, 0, 0].to(stat_dtype)  # (E, H)
        self.reduce = refiner.reduce.weight.detach()[:, :, 0, 0]  # (H, E)
        self.kernel = refiner.conv.weight.detach()
        mean1 = self.expand @ self.mean_a
        var1 = ((self.expand @ self.moments) * self.expand).sum(1) / self.count
        self.invstd1 = torch.rsqrt(var1 + refiner.norm1.eps)
        weight1, bias1 = _affine(refiner.norm1, mean1)
        self.scale1 = weight1 * self.invstd1
        self.shift1 = bias1 - mean1 * self.scale1
        self.mean1, self.var1 = mean1, var1
        self.scale2 = self.shift2 = self.invstd2 = self.mean2 = self.var2 = None

    def second(self, norm: nn.BatchNorm2d, conv: torch.Tensor, ones: torch.Tensor) -> None:
        """The second BatchNorm's statistics from the depthwise convolution's output ``(B, M, E)``."""
        self.second_from_sums(norm, _colsum(conv, ones), _channel_dot(conv, conv, ones.dtype))

    def second_from_sums(self, norm: nn.BatchNorm2d, total: torch.Tensor, squares: torch.Tensor) -> None:
        """The second BatchNorm's statistics from the per-channel sums of the convolution's output and of its square
        (in their dtype, then the statistics')."""
        mean2 = total / self.count
        var2 = (squares / self.count - mean2 * mean2).clamp_(min=0)
        mean2, var2 = mean2.to(self.mean_a.dtype), var2.to(self.mean_a.dtype)
        self.invstd2 = torch.rsqrt(var2 + norm.eps)
        weight2, bias2 = _affine(norm, mean2)
        self.scale2 = weight2 * self.invstd2
        self.shift2 = bias2 - mean2 * self.scale2
        self.mean2, self.var2 = mean2, var2


def input_statistics(refiner: nn.Module, attn: torch.Tensor, stat_dtype: torch.dtype
                     ) -> Tuple[Statistics, torch.Tensor]:
    """The forward's statistics of ``attn (B, H, N, K)``, and its centred maps (:func:`centred_maps`) in
    ``stat_dtype``."""
    mean = attn.flatten(2).mean((0, 2), dtype=stat_dtype)
    centred = centred_maps(attn, mean, stat_dtype)
    moments = (centred @ centred.transpose(1, 2)).sum(0)  # S: (H, H)
    return Statistics(refiner, moments, mean, centred.shape[0] * centred.shape[2]), centred


def centred_maps(attn: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``attn (B, H, N, K)`` less its per-head mean, as ``(B, H, N*K)`` in ``dtype``: what the expansion and the
    first BatchNorm's sums read, so that no sum subtracts two large, nearly equal numbers."""
    return (attn.flatten(2).to(mean.dtype) - mean[:, None]).to(dtype)


def depthwise(maps: torch.Tensor, kernel: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """The depthwise convolution of channels-last maps ``(B, M, E)`` (M = N * K of ``shape (B, H, N, K)``), in the
    same layout."""
    batch, _, queries, keys = shape
    channels = maps.shape[-1]
    planes = maps.view(batch, queries, keys, channels).permute(0, 3, 1, 2)
    out = F.conv2d(planes, kernel.to(maps.dtype), padding=kernel.shape[-1] // 2, groups=channels)
    return out.permute(0, 2, 3, 1).reshape(batch, queries * keys, channels)


def expand_normalise(stats: Statistics, centred: torch.Tensor) -> torch.Tensor:
    """Expansion, first BatchNorm and ReLU6 of the centred input maps (:func:`centred_maps`, in the compute dtype): one
    matmul with the normalisation folded into its weight and bias, one clamp in place. ``(B, M, E)``."""
    compute = centred.dtype
    weight = (stats.expand * stats.scale1[:, None]).to(compute)
    bias = stats.shift1 + stats.mean1 * stats.scale1  # the first BatchNorm's bias: the mean is subtracted already
    first = torch.baddbmm(bias.to(compute), centred.transpose(1, 2), weight.t().expand(centred.shape[0], -1, -1))
    return first.clamp_(0, 6)


def normalise_second(stats: Statistics, conv: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Second BatchNorm and ReLU6 of the depthwise convolution's output (into ``out``, which may be ``conv``): one
    multiply-add, one clamp in place."""
    compute = conv.dtype
    return torch.addcmul(stats.shift2.to(compute), conv, stats.scale2.to(compute), out=out).clamp_(0, 6)


def expanded_maps(stats: Statistics, attn: torch.Tensor, centred: torch.Tensor, norm2: Optional[nn.BatchNorm2d],
                  ones: Optional[torch.Tensor], keep: bool = True) -> List[Optional[torch.Tensor]]:
    """ReLU6's outputs after each expanded BatchNorm and the depthwise convolution's output, all ``(B, M, E)``, from
    the centred input maps; with ``norm2``, its statistics are taken first (the forward), else they are the
    forward's. Without ``keep``, only the last (two stacks exist at any moment, not three)."""
    first = expand_normalise(stats, centred)
    conv = depthwise(first, stats.kernel, attn.shape)
    if norm2 is not None:
        stats.second(norm2, conv, ones)
    if not keep:
        del first
        return [None, None, normalise_second(stats, conv, out=conv)]
    return [first, conv, normalise_second(stats, conv)]


def _fast_tail(refiner: nn.Module) -> bool:
    """The released tail: BatchNorm with batch statistics, the shortcut, per-head BatchNorm with batch statistics."""
    return refiner.shortcut and _batch_norm(refiner.norm3) and _batch_norm(refiner.out_norm)


class Tail:
    """The released tail ``out_norm(norm3(r) + a)`` in closed form: BatchNorm is blind to a shift, so with ``r``
    levelled (less its mean) the output is ``k_r r + k_a a + c`` per head, and its statistics follow from ``var(r)``,
    ``cov(r, a)`` and the input moments; backward's gradients are again ``alpha g + beta r + gamma a + delta`` per
    head, from three sums. Its passes over the maps are :class:`HeadPasses`' (torch's operators or the native
    kernel)."""

    def __init__(self, refiner: nn.Module, stats: Statistics, attn: torch.Tensor, reduced: torch.Tensor,
                 passes: HeadPasses) -> None:
        """Takes the statistics of both BatchNorms. Where the passes sum in the maps' dtype ``reduced (B, H, N, K)`` is
        centred in place first (sums of small numbers); where they sum in float64 it is left as it is, and its mean is
        then ``level``."""
        dtype, count = stats.mean_a.dtype, stats.count
        flat = reduced.flatten(2)
        maps = attn.flatten(2).to(flat.dtype)
        if not passes.float64_sums:
            mean_r = flat.sum((0, 2), dtype=dtype) / count
            flat.sub_(mean_r.to(flat.dtype)[:, None])
            squares, with_a = passes.sums([(flat, flat), (flat, maps)], dtype)
            self.level = torch.zeros_like(mean_r)
        else:
            total, squares, with_a = passes.sums([(flat, None), (flat, flat), (flat, maps)], torch.float64)
            mean_r = total / count
            squares = squares - count * mean_r ** 2
            with_a = with_a - count * mean_r * stats.mean_a.double()
            mean_r, squares, with_a = mean_r.to(dtype), squares.to(dtype), with_a.to(dtype)
            self.level = mean_r
        self.var_r = squares / count
        self.cov = with_a / count
        self.var_a = stats.moments.diagonal() / count
        self.invstd3 = torch.rsqrt(self.var_r + refiner.norm3.eps)
        self.weight3, bias3 = _affine(refiner.norm3, mean_r)
        self.gain3 = self.weight3 * self.invstd3  # norm3's factor on r
        var_s = self.gain3 ** 2 * self.var_r + self.var_a + 2 * self.gain3 * self.cov
        self.invstd4 = torch.rsqrt(var_s + refiner.out_norm.eps)
        self.weight4, bias4 = _affine(refiner.out_norm, mean_r)
        self.gain4 = self.weight4 * self.invstd4
        self.offset = bias4 - self.gain4 * stats.mean_a
        self.running = ((mean_r, self.var_r), (bias3 + stats.mean_a, var_s))

    def forward(self, attn: torch.Tensor, reduced: torch.Tensor, passes: HeadPasses, scale: float) -> torch.Tensor:
        """``out_norm(norm3(r) + a) * scale`` from ``reduced`` as the constructor left it."""
        gain = self.gain4 * self.gain3
        terms = [(reduced.flatten(2), gain * scale), (attn.flatten(2), self.gain4 * scale)]
        out = passes.affine((self.offset - gain * self.level) * scale, terms)
        return out.view(attn.shape)

    def backward(self, stats: Statistics, grads: Dict[nn.Parameter, torch.Tensor], refiner: nn.Module,
                 grad: torch.Tensor, attn: torch.Tensor, reduced: torch.Tensor, passes: HeadPasses, scale: float
                 ) -> Tuple[Callable[..., torch.Tensor], torch.Tensor]:
        """For ``grad``, the gradient of the output times ``scale``: the gradient of the input maps through the
        shortcut, as a call that adds it to a ``(B, H, M)`` stack in place (so that it is formed only when the
        expanded stages' is), and that of the reduced maps ``(B, H, N, K)``; the four norm parameters' gradients go
        to ``grads``."""
        dtype, count = stats.mean_a.dtype, stats.count
        g = grad.flatten(2)
        r = reduced.flatten(2).to(g.dtype)
        a = attn.flatten(2).to(g.dtype)
        # float64 sums stay float64 in what follows from them: nearly equal terms cancel below
        sums = passes.sums([(g, None), (g, r), (g, a)], torch.float64 if passes.float64_sums else dtype) * scale
        total, with_r, with_a = sums  # of the unscaled output's gradient, scale * g
        with_r = with_r - self.level * total  # sum(g * (r - mean r))
        dot4 = self.invstd4 * (self.gain3 * with_r + with_a - stats.mean_a * total)  # sum(g * s_hat)
        _set_affine(grads, refiner.out_norm, dot4, total)
        # dL/ds = gs_g g + gs_r r + gs_a a + gs_c, also dL/da through the shortcut
        gs_g = self.gain4
        gs_a = -self.gain4 * self.invstd4 * dot4 / count
        gs_r = gs_a * self.gain3
        gs_c = -self.gain4 * total / count - gs_a * stats.mean_a
        sum_s = gs_g * total + gs_a * count * stats.mean_a + gs_c * count
        dot3 = self.invstd3 * (gs_g * with_r + gs_r * count * self.var_r + gs_a * count * self.cov)  # sum(gs * r_hat)
        _set_affine(grads, refiner.norm3, dot3, sum_s)
        grad_attn = functools.partial(passes.affine, gs_c - gs_r * self.level,
                                      [(g, gs_g * scale), (r, gs_r), (a, gs_a)])
        f = self.gain3
        on_r = f * gs_r - f * self.invstd3 * dot3 / count
        grad_reduced = passes.affine(f * (gs_c - sum_s / count) - on_r * self.level,
                                     [(g, f * gs_g * scale), (r, on_r), (a, f * gs_a)])
        return grad_attn, grad_reduced.view(attn.shape)


def _relu6_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ReLU6's input gradient from its output (the same mask as from its input), written into ``grad``."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, out, 0., 6., grad_input=grad)


def _torch_forward(refiner: nn.Module, attn: torch.Tensor, stat_dtype: torch.dtype, compute: torch.dtype, keep: bool
                   ) -> Tuple[Statistics, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The statistics and the reduced maps ``(B, H, N, K)`` by the torch forms, and the three expanded stacks
    backward reads where ``keep``."""
    stats, centred = input_statistics(refiner, attn, stat_dtype)
    ones = attn.new_ones(attn.shape[0] * attn.shape[2] * attn.shape[3], dtype=stat_dtype)
    maps = expanded_maps(stats, attn, centred.to(compute), refiner.norm2, ones, keep=keep)
    del centred
    reduced = (stats.reduce.to(compute) @ maps[2].transpose(1, 2)).view(attn.shape)
    return stats, reduced, tuple(maps) if keep else ()


def _kernels(refiner: nn.Module) -> Tuple[Optional[ReleasedTrainingKernel], Optional[FoldedRefinerKernel]]:
    shape = (refiner.num_heads, refiner.expand.out_channels, refiner.kernel_size)
    return released_training_kernel(*shape), folded_refiner_kernel(*shape)


def _choose(op: str, refiner: nn.Module, attn: torch.Tensor, applicable: bool, native: Callable[[], object],
            reference: Callable[[], object]) -> bool:
    """Whether ``op`` runs the native kernels (``native``) for these maps rather than the torch forms
    (``reference``), by :func:`dispatch.choose`'s measured rule; recorded either way."""
    def library() -> Optional[Path]:
        training, folded = _kernels(refiner)
        built = training is not None and folded is not None and native_head_passes() is not None
        return training.path if built else None

    shape = (*attn.shape, refiner.expand.out_channels, refiner.kernel_size)
    return dispatch.choose(op, applicable, library, shape, lambda: (native, reference))


def expanded_weights(stats: Statistics) -> ExpandedWeights:
    """The expanded stages with both BatchNorms' batch statistics folded in, in float32."""
    return ExpandedWeights(expand=stats.expand * stats.scale1[:, None], expand_bias=stats.shift1,
                           kernel=stats.kernel[:, 0].float(), scale2=stats.scale2, shift2=stats.shift2,
                           reduce=stats.reduce.float())


def native_forward(refiner: nn.Module, attn: torch.Tensor) -> Tuple[Statistics, torch.Tensor, Tuple[()]]:
    """The statistics and the reduced maps by the native kernels: the input's moments from one pass (shifted by the
    mean of an attention row, ``1 / K``, so that the float partial sums stay small), the second BatchNorm's
    statistics from another, then the folded refiner's kernel with both BatchNorms folded. Nothing is kept."""
    training, folded = _kernels(refiner)
    shift = 1.0 / attn.shape[-1]
    count = attn.shape[0] * attn.shape[2] * attn.shape[3]
    total, moments = training.input_moments(attn, shift)
    offset = total / count  # the mean less the shift
    moments = moments - count * torch.outer(offset, offset)  # centred
    stats = Statistics(refiner, moments.float(), (offset + shift).float(), count)
    return stats, _native_reduced(refiner, stats, attn), ()


def _native_reduced(refiner: nn.Module, stats: Statistics, attn: torch.Tensor) -> torch.Tensor:
    """The reduced maps by the native kernels, from the first BatchNorm's statistics."""
    training, folded = _kernels(refiner)
    total, squares = training.conv_stats(attn, stats.expand * stats.scale1[:, None], stats.shift1, stats.kernel[:, 0])
    stats.second_from_sums(refiner.norm2, total, squares)
    weights = expanded_weights(stats)
    return folded(attn, weights.expand[:, :, None, None], weights.expand_bias,
                  (weights.kernel * weights.scale2[:, None, None])[:, None], weights.shift2,
                  weights.reduce[:, :, None, None], attn.new_zeros(refiner.num_heads), None)


def _native_backward(refiner: nn.Module, stats: Statistics, attn: torch.Tensor, grad_reduced: torch.Tensor,
                     need_input: bool) -> Tuple[Dict[nn.Parameter, torch.Tensor], Optional[torch.Tensor]]:
    """What :func:`expanded_backward` gives, by the native kernels' two passes (sums in float64)."""
    training, _ = _kernels(refiner)
    weights, dtype = expanded_weights(stats), stats.mean_a.dtype
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    total2, with_conv, grad_reduce = training.backward_stats(attn, grad_reduced, weights)
    grads[refiner.reduce.weight] = grad_reduce.to(dtype)[:, :, None, None]
    slope, offset = _second_backward(grads, refiner, stats, total2, with_conv)  # float64: no cancellation lost
    grad_kernel, total1, products, mixed = training.backward_input(attn, grad_reduced, weights, slope.to(dtype),
                                                                   offset.to(dtype), need_input)
    grads[refiner.conv.weight] = grad_kernel.to(dtype)
    centred_products = products - total1[:, None] * stats.mean_a.double()  # g1^T (a - mean_a)
    slope1 = _first_backward(grads, refiner, stats, total1, centred_products)
    if not need_input:
        return grads, None
    return grads, _input_gradient(stats, slope1, total1, mixed.flatten(2), attn.flatten(2), centred=False
                                  ).view(grad_reduced.shape)


def _passes(native: bool) -> HeadPasses:
    return native_head_passes() if native else TORCH


def _forward(refiner: nn.Module, attn: torch.Tensor, stat_dtype: torch.dtype, compute: torch.dtype, keep: bool,
             scale: float, native: bool) -> Tuple[Statistics, torch.Tensor, Tuple[torch.Tensor, ...], Optional[Tail],
                                                  Optional[torch.Tensor]]:
    """The statistics, the reduced maps, the expanded stacks kept for backward, and with the released tail its closed
    form and the output (times ``scale``): by the native kernels or by the torch forms. Nothing outside changes."""
    if native:
        stats, reduced, kept = native_forward(refiner, attn)
    else:
        stats, reduced, kept = _torch_forward(refiner, attn, stat_dtype, compute, keep)
    if not _fast_tail(refiner):
        return stats, reduced, kept, None, None
    with record_function('released_refiner: tail forward'):
        closed = Tail(refiner, stats, attn, reduced, _passes(native))
        return stats, reduced, kept, closed, closed.forward(attn, reduced, _passes(native), scale)


_ATTN_INPUT = 3  # attn's place among _ReleasedRefiner's inputs (refiner, recompute, scale, attn, *params)


class _ReleasedRefiner(torch.autograd.Function):
    """The released refiner's forward and backward (see the module); the trainable parameters are inputs, so that
    autograd asks for their gradients."""

    @staticmethod
    def forward(ctx, refiner: nn.Module, recompute: bool, scale: float, attn: torch.Tensor, *params: torch.Tensor
                ) -> torch.Tensor:
        ctx.scale = scale
        device = attn.device.type
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else attn.dtype
        stat_dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
        ctx.refiner, ctx.compute = refiner, compute
        ctx.autocast = (device, autocast, torch.get_autocast_dtype(device))
        # the native kernels keep nothing for backward: they serve a refiner that recomputes
        ctx.native = refiner.recompute and training_applicable(attn, *params)
        with torch.no_grad(), torch.autocast(device, enabled=False), record_function('released_refiner: forward'):
            native, torch_forms = (functools.partial(_forward, refiner, attn, stat_dtype, compute, not recompute,
                                                     ctx.scale, n) for n in (True, False))
            chosen = _choose('released_training_forward', refiner, attn, ctx.native, native, torch_forms)
            stats, reduced, kept, ctx.tail, out = (native if chosen else torch_forms)()
            update_running_statistics(refiner.norm1, stats.mean1, stats.var1, stats.count)
            update_running_statistics(refiner.norm2, stats.mean2, stats.var2, stats.count)
            if ctx.tail is not None:
                for norm, (mean, var) in zip((refiner.norm3, refiner.out_norm), ctx.tail.running):
                    update_running_statistics(norm, mean, var, stats.count)
        if ctx.tail is None:
            with torch.no_grad(), record_function('released_refiner: tail forward'):  # the caller's autocast
                out = tail(refiner, attn, reduced)  # the tail's modules: running statistics updated here
                if ctx.scale != 1.:
                    out.mul_(ctx.scale)
        ctx.stats = stats
        ctx.save_for_backward(attn, reduced, *kept)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        attn, reduced, *kept = ctx.saved_tensors
        refiner = ctx.refiner
        params = [p for p in refiner.parameters() if p.requires_grad]
        device, enabled, dtype = ctx.autocast
        grads: Dict[nn.Parameter, Optional[torch.Tensor]] = {}
        grad_attn = grad_reduced = None
        if ctx.tail is None:
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), \
                    running_stats_frozen(refiner), record_function('released_refiner: tail backward'):
                attn_in = attn.detach().requires_grad_()
                reduced_in = reduced.detach().requires_grad_()
                tail_params = [p for p in params if not _expanded_parameter(refiner, p)]
                grad_attn, grad_reduced, *tail_grads = torch.autograd.grad(
                    tail(refiner, attn_in, reduced_in), [attn_in, reduced_in, *tail_params], grad * ctx.scale,
                    allow_unused=True)
            grads.update(zip(tail_params, tail_grads))
        with torch.no_grad(), torch.autocast(device, enabled=False):
            native, torch_forms = (functools.partial(_backward, ctx, grad, attn, reduced, kept, grad_attn,
                                                     grad_reduced, n) for n in (True, False))
            chosen = _choose('released_training_backward', refiner, attn, ctx.native and not kept, native, torch_forms)
            own_grads, grad_attn = (native if chosen else torch_forms)()
        grads.update(own_grads)
        return (None, None, None, grad_attn if ctx.needs_input_grad[_ATTN_INPUT] else None,
                *(None if grads.get(p) is None else grads[p].to(p.dtype) for p in params))


def _backward(ctx, grad: torch.Tensor, attn: torch.Tensor, reduced: torch.Tensor, kept: List[torch.Tensor],
              grad_attn: Optional[torch.Tensor], grad_reduced: Optional[torch.Tensor], native: bool
              ) -> Tuple[Dict[nn.Parameter, torch.Tensor], Optional[torch.Tensor]]:
    """The parameters' gradients (but a tail run as modules, whose are given) and the input maps' gradient: by the
    native kernels, or by the torch forms (recomputing the expanded maps unless they were kept). Nothing outside
    changes, so that either can be timed."""
    refiner, stats, compute = ctx.refiner, ctx.stats, ctx.compute
    need_input = ctx.needs_input_grad[_ATTN_INPUT]
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    if ctx.tail is not None:
        with record_function('released_refiner: tail backward'):
            grad_attn, grad_reduced = ctx.tail.backward(stats, grads, refiner, grad, attn, reduced, _passes(native),
                                                        ctx.scale)
    if native:
        with record_function('released_refiner: backward (native)'):
            expanded_grads, grad_maps = _native_backward(refiner, stats, attn, grad_reduced, need_input)
    else:
        centred = centred_maps(attn, stats.mean_a, compute)
        if kept:
            maps = list(kept)
        else:
            with record_function('released_refiner: recompute'):
                maps = expanded_maps(stats, attn, centred, None, None)
        with record_function('released_refiner: backward'):
            expanded_grads, grad_maps = expanded_backward(refiner, stats, centred, grad_reduced, maps,
                                                          owned=not kept, need_input=need_input)
    grads.update(expanded_grads)
    if grad_maps is not None:
        grad_maps = grad_maps.to(attn.dtype)
        if callable(grad_attn):  # the closed-form tail's share, added in place
            grad_attn = grad_attn(out=grad_maps.flatten(2)).view(attn.shape)
        else:
            grad_attn = grad_maps if grad_attn is None else grad_attn.to(attn.dtype) + grad_maps
    return grads, grad_attn


def _expanded_parameter(refiner: nn.Module, param: nn.Parameter) -> bool:
    modules = (refiner.expand, refiner.norm1, refiner.conv, refiner.norm2, refiner.reduce)
    return any(param is p for module in modules for p in module.parameters(recurse=False))


def expanded_backward(refiner: nn.Module, stats: Statistics, centred: torch.Tensor, grad_reduced: torch.Tensor,
                      maps: List[torch.Tensor], owned: bool, need_input: bool,
                      ) -> Tuple[Dict[nn.Parameter, torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the expanded stages' parameters and of the input maps, from the reduced maps' gradient and the
    centred input maps (:func:`centred_maps`). ``maps`` (ReLU6's outputs and the convolution's output, as
    :func:`expanded_maps` gives them) is emptied, so that each stack is freed once read; ``owned`` maps (recomputed,
    not saved) are overwritten with gradients."""
    first, conv, second = maps
    maps.clear()
    compute, stat_dtype = first.dtype, stats.mean_a.dtype
    ones = first.new_ones(first.shape[0] * first.shape[1], dtype=stat_dtype)
    upstream = grad_reduced.flatten(2).to(compute)  # (B, H, M)
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    grads[refiner.reduce.weight] = (upstream @ second).sum(0, dtype=stat_dtype)[:, :, None, None]
    # second BatchNorm and ReLU6: g2 = dL/d(normalised), dL/dconv = scale * (g2 - mean(g2) - x_hat mean(g2 x_hat)).
    # g2 goes into the ReLU6 output's place where the maps are this call's own, a batch element at a time.
    grad2 = second if owned else torch.empty_like(second)
    reduce = stats.reduce.to(compute)
    for item in range(second.shape[0]):
        torch.ops.aten.hardtanh_backward.grad_input(upstream[item].t() @ reduce, second[item], 0., 6.,
                                                    grad_input=grad2[item])
    del second
    slope, offset = _second_backward(grads, refiner, stats, _colsum(grad2, ones), _channel_dot(grad2, conv, stat_dtype))
    grad_conv = torch.addcmul(offset.to(compute), conv, slope.to(compute), out=conv if owned else None)
    grad_conv.addcmul_(grad2, stats.scale2.to(compute))
    del grad2
    # depthwise convolution
    batch, _, queries, keys = grad_reduced.shape
    channels = first.shape[-1]

    def planes(maps: torch.Tensor) -> torch.Tensor:
        return maps.view(batch, queries, keys, channels).permute(0, 3, 1, 2)

    kernel = stats.kernel.to(compute)
    pad = kernel.shape[-1] // 2
    grad_first, grad_kernel, _ = torch.ops.aten.convolution_backward(
        planes(grad_conv), planes(first), kernel, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], channels,
        [True, refiner.conv.weight.requires_grad, False])
    del grad_conv
    if grad_kernel is not None:
        grads[refiner.conv.weight] = grad_kernel
    grad1 = _relu6_grad(grad_first.permute(0, 2, 3, 1).reshape(batch, queries * keys, channels), first)
    del first, grad_first
    # first BatchNorm and the expansion, through the input's H columns: x_hat = (a - mean_a) W^T * invstd1
    sum1 = _colsum(grad1, ones)
    products = (grad1.transpose(1, 2) @ centred.transpose(1, 2)).sum(0, dtype=stat_dtype)  # (E, H): g1^T (a - mean_a)
    slope1 = _first_backward(grads, refiner, stats, sum1, products)
    if not need_input:
        return grads, None
    weight = (stats.scale1[:, None] * stats.expand).to(compute)
    mixed = weight.t() @ grad1.transpose(1, 2)  # (B, H, M): g1 (scale1 W)
    return grads, _input_gradient(stats, slope1, sum1, mixed, centred, centred=True).view(grad_reduced.shape)


def _second_backward(grads: Dict[nn.Parameter, torch.Tensor], refiner: nn.Module, stats: Statistics,
                     total: torch.Tensor, with_conv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The second BatchNorm's parameter gradients, and ``slope``, ``offset`` of its input gradient
    ``scale2 g2 + slope conv + offset``, from ``total = sum(g2)`` and ``with_conv = sum(g2 conv)`` per channel."""
    dot2 = (with_conv - stats.mean2 * total) * stats.invstd2  # sum(g2 * x_hat)
    _set_affine(grads, refiner.norm2, dot2, total)
    slope = -stats.scale2 * stats.invstd2 * dot2 / stats.count
    return slope, -stats.scale2 * total / stats.count - slope * stats.mean2


def _first_backward(grads: Dict[nn.Parameter, torch.Tensor], refiner: nn.Module, stats: Statistics,
                    total: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """The first BatchNorm's and the expansion's gradients from ``total = sum(g1)`` and ``products = g1^T (a -
    mean_a)`` ``(E, H)``; returns the ``slope1`` of the first BatchNorm's input gradient."""
    dot1 = (stats.expand * products).sum(1) * stats.invstd1  # sum(g1 * x_hat)
    _set_affine(grads, refiner.norm1, dot1, total)
    slope1 = stats.scale1 * stats.invstd1 * dot1 / stats.count
    grads[refiner.expand.weight] = (stats.scale1[:, None] * products
                                    - slope1[:, None] * (stats.expand @ stats.moments))[:, :, None, None]
    return slope1


def _input_gradient(stats: Statistics, slope1: torch.Tensor, total: torch.Tensor, mixed: torch.Tensor,
                    maps: torch.Tensor, centred: bool) -> torch.Tensor:
    """``dL/da = g1 (scale1 W) - (a - mean_a) (W^T diag(slope1) W) - (scale1 sum(g1) / count) W`` ``(B, H, M)``, in
    place of ``mixed = g1 (scale1 W)``, for the input ``maps`` ``(B, H, M)``, ``centred`` (less ``mean_a``) or not."""
    expand = stats.expand.to(slope1.dtype)
    quadratic = expand.t() @ (slope1[:, None] * expand)  # (H, H)
    constant = (stats.scale1 * total / stats.count) @ expand
    if not centred:
        constant = constant - quadratic @ stats.mean_a.to(quadratic.dtype)
    mixed.baddbmm_(-quadratic.to(mixed.dtype).expand(mixed.shape[0], -1, -1), maps)
    return mixed.sub_(constant.to(mixed.dtype)[:, None])


def _set_affine(grads: Dict[nn.Parameter, torch.Tensor], norm: nn.BatchNorm2d, dot: torch.Tensor,
                total: torch.Tensor) -> None:
    if norm.weight is not None:
        grads[norm.weight] = dot
    if norm.bias is not None:
        grads[norm.bias] = total

