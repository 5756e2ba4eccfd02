"""The refiner's ops alone on one layer's maps: torch's operators vs the native kernel, timed round-robin.

* linear refiner, DeiT-S's layer (6 heads, r=3, batch 16, 197 tokens) and the digits model's (4 heads, batch 64,
  65 tokens): the three stages, and the composed convolution (``ops.local_conv2d``) run by torch (oneDNN) and by the
  native kernel, inference and forward+backward;
* released refiner (Refiner-ViT-S: 12 heads, r=3, eval, times the attention scale, batch 16, 197 tokens): the stages,
  and the folded refiner (``ops.folded_refiner``) run by torch (channels-last) and by the native kernel;
* attention probabilities, inference and forward + backward (``ops.attention_probs``): a Refiner-ViT-S computing
  layer (12 heads of 32 features, adding the previous map) and a DeiT-S layer (6 heads of 64), q and k being views
  into one qkv tensor;
* ``--train``: the released refiner's training path (:mod:`refiner_vit.layers.released`) on a Refiner-ViT-S layer
  (12 heads, r=3, ``--batch-size``, 197 tokens), pass by pass, each with the bytes it must move at least (inputs read
  once, outputs written once) and the GB/s that makes, beside a copy of the expanded maps timed in the same rounds:
  most passes are memory-bound, so the copy's rate is their limit, not the GEMM peak. Then the whole refiner:
  forward, forward + backward with and without the recompute, and the autograd stages.

Each op runs through its public function with ``REFINER_NATIVE_KERNELS`` set to 0 (torch) or 1 (native) around the
call, so the rows include the dispatch overhead the models pay. ``CC='gcc -mno-avx512f'`` times an AVX2 build on an
AVX-512 machine. Like the ``refiner`` commands, it keeps freed memory in the process.

Usage: ``python benchmarks/refiner_micro.py [--repeats 8] [--threads N] [--train [--batch-size 16]]``; prints median
milliseconds (and, with ``--train``, bytes, GB/s and the share of the copy's GB/s).
"""
import argparse
from typing import Callable, Dict, Optional, Tuple

import torch

import refiner_vit
from refiner_vit.layers import AttentionRefiner
from refiner_vit.layers import released as path
from refiner_vit.ops import attention_probs, local_conv2d, mode_set
from refiner_vit.ops.head_passes import TORCH, native_head_passes
from refiner_vit.ops.released_training import released_training_kernel
from refiner_vit.performance import interleaved_medians, machine_info


def _both(label: str, step: Callable[[], object]) -> dict:
    """``step`` with REFINER_NATIVE_KERNELS=0 (torch) and =1 (native)."""
    def under(value: str) -> Callable[[], None]:
        def run() -> None:
            with mode_set(value):
                step()
        return run
    return {f'{label}, torch': under('0'), f'{label}, native': under('1')}


def _maps(heads: int, batch: int = 16, tokens: int = 197, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(batch, heads, tokens, tokens).softmax(-1).requires_grad_(requires_grad)


def _inference_step(forward, maps: torch.Tensor):
    """A no-argument callable timing one inference-mode call of ``forward`` on ``maps``."""
    def step():
        with torch.inference_mode():
            forward(maps)
    return step


def linear_cases(heads: int, batch: int, tokens: int) -> dict:
    refiner = AttentionRefiner(heads)
    maps, grad_maps = _maps(heads, batch, tokens), _maps(heads, batch, tokens, requires_grad=True)
    upstream = torch.randn_like(maps)

    def composed(attn):
        return local_conv2d(attn, refiner.composed_weight())

    def train(forward):
        return lambda: torch.autograd.grad(forward(grad_maps), [grad_maps, *refiner.parameters()], upstream)

    label = f'linear H={heads} B={batch} N={tokens}'
    return {
        f'{label} infer: stages': _inference_step(refiner.forward_stages, maps),
        **_both(f'{label} infer: composed', _inference_step(composed, maps)),
        f'{label} fwd+bwd: stages': train(refiner.forward_stages),
        **_both(f'{label} fwd+bwd: composed', train(composed)),
    }


def released_cases(scale: float = 32 ** -0.5) -> dict:
    refiner = AttentionRefiner.released(12).eval()
    folded = refiner.fuse(output_scale=scale)
    maps = _maps(12)
    return {
        'released H=12 infer: stages x scale': _inference_step(lambda a: refiner(a) * scale, maps),
        **_both('released H=12 infer: folded', _inference_step(folded, maps)),
    }


def probability_cases(heads: int, head_dim: int, accumulate: bool, batch: int = 16, tokens: int = 197) -> dict:
    """Inference, and forward + backward (gradients w.r.t. the qkv buffer and prev), q and k being views into it."""
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, requires_grad=True)
    prev = _maps(heads, batch, tokens, requires_grad=True) if accumulate else None
    scale = head_dim ** -0.5
    upstream = torch.randn(batch, heads, tokens, tokens)

    def probs():
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attention_probs(q, k, scale, prev=prev, alpha=scale)

    def train():
        return torch.autograd.grad(probs(), [qkv] + ([prev] if accumulate else []), upstream)

    label = f'probabilities H={heads} d={head_dim}{" + prev" if accumulate else ""}'
    return {**_both(f'{label} infer', _inference_step(lambda _: probs(), qkv)), **_both(f'{label} fwd+bwd', train)}


def training_cases(batch: int, heads: int = 12, ratio: int = 3, tokens: int = 197
                   ) -> Dict[str, Tuple[Callable[[], object], Optional[int]]]:
    """The released refiner's training passes on one layer's maps, the native kernels' and the torch forms':
    ``{name: (step, least bytes moved)}``."""
    refiner = AttentionRefiner.released(heads, expansion_ratio=ratio).train()
    attn = _maps(heads, batch, tokens)
    maps_bytes = attn.numel() * 4  # A: one stack of input maps
    expanded_bytes = maps_bytes * ratio  # X: one stack of expanded maps
    stats, centred = path.input_statistics(refiner, attn, torch.float32)
    ones = attn.new_ones(batch * tokens * tokens)
    first, conv, second = path.expanded_maps(stats, attn, centred, refiner.norm2, ones)
    upstream = torch.randn_like(attn)
    with torch.no_grad():
        reduced = (stats.reduce @ second.transpose(1, 2)).view(attn.shape)
    grad_maps = attn.clone().requires_grad_()
    kernel = released_training_kernel(heads, heads * ratio, refiner.kernel_size)
    passes = native_head_passes()
    weights = path.expanded_weights(stats)
    slope, offset = torch.zeros_like(stats.mean2), torch.zeros_like(stats.mean2)
    flat = [t.flatten(2) for t in (upstream, reduced, attn)]
    factors = torch.ones(heads)

    def backward(keep: bool) -> Callable[[], object]:
        def step() -> object:
            refiner.recompute = not keep  # at each call: the rows run round-robin
            return torch.autograd.grad(refiner(grad_maps), [grad_maps, *refiner.parameters()], upstream)
        return step

    def stages() -> object:
        return torch.autograd.grad(refiner.forward_stages(grad_maps), [grad_maps, *refiner.parameters()], upstream)

    label = f'released H={heads} r={ratio} B={batch} N={tokens} train'
    native = f'{label}, native'
    def forward() -> object:
        refiner.recompute = True
        return refiner(grad_maps)

    wholes = (('forward', forward), ('fwd+bwd, recompute', backward(keep=False)),
              ('fwd+bwd, no recompute', backward(keep=True)))
    return {
        f'{label}: copy of the expanded maps': (lambda: first.clone(), 2 * expanded_bytes),
        f'{native}: BN1 statistics (input moments)': (lambda: kernel.input_moments(attn, 1 / tokens), maps_bytes),
        f'{native}: BN2 statistics (expanded stages)': (
            lambda: kernel.conv_stats(attn, weights.expand, weights.expand_bias, weights.kernel), maps_bytes),
        f'{native}: forward (moments, BN2 statistics, reduced maps)': (lambda: path.native_forward(refiner, attn),
                                                                     2 * maps_bytes),
        f'{native}: tail sums (3 pairs of stacks)': (
            lambda: passes.sums([(flat[1], None), (flat[1], flat[1]), (flat[1], flat[2])], torch.float64),
            2 * maps_bytes),
        f'{native}: tail affine (3 stacks)': (lambda: passes.affine(factors, [(t, factors) for t in flat]),
                                              4 * maps_bytes),
        f'{native}: backward sums (BN2, reduction)': (lambda: kernel.backward_stats(attn, upstream, weights),
                                                     2 * maps_bytes),
        f'{native}: backward, input (conv, BN1, expansion)': (
            lambda: kernel.backward_input(attn, upstream, weights, slope, offset, need_input=True), 3 * maps_bytes),
        f'{label}, torch: BN1 statistics (centred input, its moments)': (
            lambda: path.input_statistics(refiner, attn, torch.float32), 2 * maps_bytes),
        f'{label}, torch: expansion + BN1 + ReLU6': (lambda: path.expand_normalise(stats, centred),
                                                     maps_bytes + expanded_bytes),
        f'{label}, torch: depthwise conv': (lambda: path.depthwise(first, stats.kernel, attn.shape),
                                            2 * expanded_bytes),
        f'{label}, torch: BN2 statistics': (lambda: stats.second(refiner.norm2, conv, ones), expanded_bytes),
        f'{label}, torch: BN2 + ReLU6': (lambda: path.normalise_second(stats, conv), 2 * expanded_bytes),
        f'{label}, torch: reduction': (lambda: stats.reduce @ second.transpose(1, 2), expanded_bytes + maps_bytes),
        f'{label}, torch: tail sums (3 pairs of stacks)': (
            lambda: TORCH.sums([(flat[1], None), (flat[1], flat[1]), (flat[1], flat[2])], torch.float32),
            2 * maps_bytes),
        f'{label}, torch: tail affine (3 stacks)': (lambda: TORCH.affine(factors, [(t, factors) for t in flat]),
                                                    4 * maps_bytes),
        f'{label}, torch: expanded backward': (  # reads the three kept stacks, the gradient and the input; writes one
            lambda: path.expanded_backward(refiner, stats, centred, upstream, [first, conv, second], owned=False,
                                           need_input=True),
            3 * expanded_bytes + 3 * maps_bytes),
        **{row: (step, None) for name, whole in wholes
           for row, step in _both(f'{label}: refiner {name}', whole).items()},
        f'{label}: autograd stages fwd+bwd': (stages, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=8, help='timed rounds (median)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--train', action='store_true', help="the released refiner's training passes instead")
    parser.add_argument('--batch-size', type=int, default=16, help='with --train: maps per layer')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    refiner_vit.keep_freed_memory()
    torch.manual_seed(0)
    machine = machine_info()
    print(f"{machine['cpu']} ({', '.join(machine['isa'])}), {machine['threads']} threads, CC={machine['kernel_cc']}")
    if args.train:
        _print_training(training_cases(args.batch_size), args.repeats)
        return
    cases = {**linear_cases(6, 16, 197), **linear_cases(4, 64, 65), **released_cases(),
             **probability_cases(12, 32, accumulate=True), **probability_cases(6, 64, accumulate=False)}
    seconds = interleaved_medians(list(cases.values()), torch.device('cpu'), warmup=1, repeats=args.repeats)
    for name, sec in zip(cases, seconds):
        print(f'{name:<56} {sec * 1e3:8.1f} ms')


def _print_training(cases: Dict[str, Tuple[Callable[[], object], Optional[int]]], repeats: int) -> None:
    """Median ms of each case; for passes with a byte count, MB moved, GB/s and its share of the copy's GB/s."""
    seconds = interleaved_medians([step for step, _ in cases.values()], torch.device('cpu'), warmup=1,
                                  repeats=repeats)
    copy_gbs = None
    print(f'{"case":<84} {"ms":>8} {"MB":>7} {"GB/s":>6} {"of copy":>7}')
    for (name, (_, moved)), sec in zip(cases.items(), seconds):
        row = f'{name:<84} {sec * 1e3:8.1f}'
        if moved is not None:
            gbs = moved / sec / 1e9
            copy_gbs = copy_gbs or gbs  # the first row is the copy
            row += f' {moved / 1e6:7.0f} {gbs:6.1f} {gbs / copy_gbs:7.0%}'
        print(row)


if __name__ == '__main__':
    main()
