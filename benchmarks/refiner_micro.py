"""The refiner alone on one layer's maps (batch 16, 197 tokens): each implementation, timed round-robin.

* linear refiner (DeiT-S: 6 heads, r=3): the three stages vs the composed convolution, inference and
  forward+backward;
* released refiner (Refiner-ViT-S: 12 heads, r=3, eval, times the attention scale): the stages vs the folded
  refiner in NCHW vs the folded refiner in channels-last (what ``fuse_for_inference`` uses).

Usage: ``python benchmarks/refiner_micro.py [--repeats 8] [--threads N]``; prints median milliseconds.
"""
import argparse
import copy

import torch

from refiner_vit.benchmark import interleaved_medians
from refiner_vit.fuse import fold_refiner
from refiner_vit.layers import AttentionRefiner

BATCH, TOKENS = 16, 197


def _maps(heads: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(BATCH, heads, TOKENS, TOKENS).softmax(-1).requires_grad_(requires_grad)


def _inference_step(forward, maps: torch.Tensor):
    """A no-argument callable timing one inference-mode call of ``forward`` on ``maps``."""
    def step():
        with torch.inference_mode():
            forward(maps)
    return step


def linear_cases() -> dict:
    refiner = AttentionRefiner(6)
    maps, grad_maps = _maps(6), _maps(6, requires_grad=True)
    upstream = torch.randn_like(maps)

    def train(forward):
        return lambda: torch.autograd.grad(forward(grad_maps), [grad_maps, *refiner.parameters()], upstream)

    return {
        'linear H=6 infer: stages': _inference_step(refiner.forward_stages, maps),
        'linear H=6 infer: composed conv': _inference_step(refiner, maps),
        'linear H=6 fwd+bwd: stages': train(refiner.forward_stages),
        'linear H=6 fwd+bwd: composed conv': train(refiner),
    }


def released_cases(scale: float = 32 ** -0.5) -> dict:
    refiner = AttentionRefiner.released(12).eval()
    folded_cl = fold_refiner(refiner, scale)
    folded_nchw = copy.deepcopy(folded_cl).to(memory_format=torch.contiguous_format)
    folded_nchw.channels_last = False
    maps = _maps(12)

    return {
        'released H=12 infer: stages x scale': _inference_step(lambda a: refiner(a) * scale, maps),
        'released H=12 infer: folded, NCHW': _inference_step(folded_nchw, maps),
        'released H=12 infer: folded, channels-last': _inference_step(folded_cl, maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=8, help='timed rounds (median)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {**linear_cases(), **released_cases()}
    seconds = interleaved_medians(list(cases.values()), torch.device('cpu'), warmup=1, repeats=args.repeats)
    for name, sec in zip(cases, seconds):
        print(f'{name:<48} {sec * 1e3:8.1f} ms')


if __name__ == '__main__':
    main()
