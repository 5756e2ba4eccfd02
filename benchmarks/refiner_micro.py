"""The refiner alone on one layer's maps: each implementation, timed round-robin.

* linear refiner, DeiT-S's layer (6 heads, r=3, batch 16, 197 tokens) and the digits model's (4 heads, batch 64,
  65 tokens): the three stages vs the composed convolution run by torch (oneDNN) vs by the native kernel (what the
  models use on the CPU), inference and forward+backward;
* released refiner (Refiner-ViT-S: 12 heads, r=3, eval, times the attention scale, batch 16, 197 tokens): the
  stages vs the folded refiner run by torch in NCHW and channels-last vs by the native kernel (what
  ``fuse_for_inference`` gives on the CPU);
* attention probabilities, inference: a Refiner-ViT-S computing layer (12 heads of 32 features, adding the previous
  map) and a DeiT-S layer (6 heads of 64), torch's matmul, softmax and add vs the native kernel, q and k being views
  into one qkv tensor as in the models.

Like the ``refiner`` commands, it keeps freed memory in the process (``refiner_vit.keep_freed_memory``).

Usage: ``python benchmarks/refiner_micro.py [--repeats 8] [--threads N]``; prints median milliseconds.
"""
import argparse
import copy

import torch
from torch.nn import functional as F

import refiner_vit
from refiner_vit.benchmark import interleaved_medians
from refiner_vit.fuse import fold_refiner
from refiner_vit.layers import AttentionRefiner, attention_probs


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

    def onednn(attn):
        return F.conv2d(attn, refiner.composed_weight(), padding=refiner.kernel_size // 2)

    def train(forward):
        return lambda: torch.autograd.grad(forward(grad_maps), [grad_maps, *refiner.parameters()], upstream)

    label = f'linear H={heads} B={batch} N={tokens}'
    return {
        f'{label} infer: stages': _inference_step(refiner.forward_stages, maps),
        f'{label} infer: composed, oneDNN': _inference_step(onednn, maps),
        f'{label} infer: composed, native': _inference_step(refiner, maps),
        f'{label} fwd+bwd: stages': train(refiner.forward_stages),
        f'{label} fwd+bwd: composed, oneDNN': train(onednn),
        f'{label} fwd+bwd: composed, native': train(refiner),
    }


def released_cases(scale: float = 32 ** -0.5) -> dict:
    refiner = AttentionRefiner.released(12).eval()
    folded = fold_refiner(refiner, scale)
    folded_cl = copy.deepcopy(folded)
    folded_cl.uses_native_kernel = lambda attn: False  # torch's operators
    folded_nchw = copy.deepcopy(folded_cl).to(memory_format=torch.contiguous_format)
    folded_nchw.channels_last = False
    maps = _maps(12)

    return {
        # forward_stages: in eval mode the refiner itself would fold (and run the native kernel)
        'released H=12 infer: stages x scale': _inference_step(lambda a: refiner.forward_stages(a) * scale, maps),
        'released H=12 infer: folded, torch NCHW': _inference_step(folded_nchw, maps),
        'released H=12 infer: folded, torch channels-last': _inference_step(folded_cl, maps),
        'released H=12 infer: folded, native': _inference_step(folded, maps),
    }


def probability_cases(heads: int, head_dim: int, accumulate: bool, batch: int = 16, tokens: int = 197) -> dict:
    qkv = torch.randn(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    prev = _maps(heads, batch, tokens) if accumulate else None
    scale = head_dim ** -0.5

    def torch_ops(_):
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
        return attn if prev is None else torch.add(attn, prev, alpha=scale)

    label = f'probabilities H={heads} d={head_dim}{" + prev" if accumulate else ""}'
    return {
        f'{label} infer: torch': _inference_step(torch_ops, q),
        f'{label} infer: native': _inference_step(lambda _: attention_probs(q, k, scale, prev=prev, alpha=scale), q),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=8, help='timed rounds (median)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    refiner_vit.keep_freed_memory()
    torch.manual_seed(0)
    cases = {**linear_cases(6, 16, 197), **linear_cases(4, 64, 65), **released_cases(),
             **probability_cases(12, 32, accumulate=True), **probability_cases(6, 64, accumulate=False)}
    seconds = interleaved_medians(list(cases.values()), torch.device('cpu'), warmup=1, repeats=args.repeats)
    for name, sec in zip(cases, seconds):
        print(f'{name:<56} {sec * 1e3:8.1f} ms')


if __name__ == '__main__':
    main()
