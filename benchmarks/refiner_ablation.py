"""Before/after of each refiner optimisation, measured in ONE process so that the ratios survive a busy machine.

Variants of the same model differ only in how their refiners run:

* ``stages``: every refiner runs stage by stage (``AttentionRefiner.forward_stages``, the plain implementation);
* ``fast``: the default forward (a linear refiner as one composed convolution, recomputed in backward);
* ``fused``: :func:`refiner_vit.fuse_for_inference` (inference only: BatchNorms folded, scale folded).

Usage (the numbers in docs/performance.md come from this command)::

    python benchmarks/refiner_ablation.py --models deit_small_patch16_224 refined_deit_small_patch16_224 \
        --variants stages fast --batch-size 16 --repeats 5
"""
import argparse
import json
from typing import Callable, Dict

import timm
import torch
from torch import nn

import refiner_vit
from refiner_vit.benchmark import format_table, prepare_case, run_cases
from refiner_vit.layers import AttentionRefiner
from refiner_vit.model_args import parse_model_kwargs


def _stages(model: nn.Module, mode: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, AttentionRefiner):
            module.forward = module.forward_stages
    return model


def _fused(model: nn.Module, mode: str) -> nn.Module:
    return refiner_vit.fuse_for_inference(model) if mode == 'infer' else model


VARIANTS: Dict[str, Callable[[nn.Module, str], nn.Module]] = {
    'stages': _stages,
    'fast': lambda model, mode: model,
    'fused': _fused,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', required=True, help='timm model names')
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=['stages', 'fast'],
                        help='how the refiners run (a model without refiners is measured once)')
    parser.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'], help='modes')
    parser.add_argument('--batch-size', type=int, default=16, help='images per step')
    parser.add_argument('--img-size', type=int, default=None, help='input side (default: the model cfg)')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                        help='model arguments for timm.create_model (Python literals), e.g. depth=4')
    parser.add_argument('--repeats', type=int, default=5, help='timed steps (median)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--json', default=None, help='write the report here')
    args = parser.parse_args()
    args.model_args = parse_model_kwargs(args.model_kwargs)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = []
    for name in args.models:
        refined = any(isinstance(m, AttentionRefiner) for m in _meta_model(name, args.model_args).modules())
        for variant in args.variants if refined else ['fast']:
            label = f'{name} [{variant}]' if refined else name
            cases += [prepare_case(name, mode, args.batch_size, args.img_size, prepare=VARIANTS[variant],
                                   model_args=args.model_args, label=label, amp=args.amp) for mode in args.modes]
    report = run_cases(cases, torch.device('cpu'), args.warmup, args.repeats)
    print(format_table(report))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)


def _meta_model(name: str, model_args: dict) -> nn.Module:
    with torch.device('meta'):
        return timm.create_model(name, **model_args)


if __name__ == '__main__':
    main()
