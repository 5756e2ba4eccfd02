"""``refiner benchmark``: images/s, GFLOPs, achieved GFLOP/s against the GEMM peak, and training-step memory."""
import argparse
import json
from pathlib import Path
from typing import Any, Dict

from ..errors import UsageError
from ..utils.model_kwargs import parse_model_kwargs
from .model_source import SOURCE_HELP, add_model_options

EXAMPLE = """examples:
  refiner benchmark --model deit_small_patch16_224 refiner_vit_s_patch16_224 --batch-size 8 --output bench.json
  refiner benchmark --model runs/demo --modes infer --no-memory --format json       # after `make demo`
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'benchmark',
        help='measure throughput, FLOPs and memory of models against the fp32 GEMM peak',
        description='Measure, in one run, the fp32 GEMM peak and for each model and mode the median images/s, '
                    'GFLOPs per image, achieved GFLOP/s and the peak memory of a training step. Compare models '
                    'in one run: on a shared machine only the ratios are stable.',
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, model='many', model_help=f'models to measure, each {SOURCE_HELP}')
    p.add_argument('--batch-size', type=int, default=16, help='images per step (default 16)')
    p.add_argument('--img-size', type=int, default=None, help="input side in pixels (default: the model's own)")
    p.add_argument('--modes', nargs='+', default=None, metavar='MODE',
                   help='what to measure: infer and/or train (default both)')
    p.add_argument('--compare-kwargs', nargs='+', default=None, metavar='K=V',
                   help='also measure every model with these model arguments added (rows "MODEL [K=V]"), in the '
                        'same rounds, e.g. refiner_recompute=False')
    p.add_argument('--no-memory', action='store_true',
                   help="skip the training step's memory count (on the CPU a profiled replay: minutes for big models)")
    p.add_argument('--fuse', action='store_true',
                   help='measure inference on fuse_for_inference(model) (BatchNorms folded, refiners composed)')
    p.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'),
                   help='run under autocast to this dtype (the GEMM peak and %% peak stay fp32; fp16 only on CUDA)')
    p.add_argument('--grad-checkpointing', action='store_true',
                   help="train with the models' gradient checkpointing (model.set_grad_checkpointing(True))")
    p.add_argument('--compile', action='store_true',
                   help='measure torch.compile(model) (compiled by an untimed step; FLOPs counted on the eager model)')
    p.add_argument('--kernels', nargs='+', choices=('auto', '1', '0'), default=None, metavar='auto|1|0',
                   help='REFINER_NATIVE_KERNELS settings to compare in one run (rows "MODEL [kernels=V]"; default: '
                        "the environment's)")
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='device to run on (default cpu)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before timing (default 2)')
    p.add_argument('--repeats', type=int, default=10, help='timed steps; the median is reported (default 10)')
    p.add_argument('--gemm-size', type=int, default=4096, help='side of the square matmul for the peak (default 4096)')
    p.add_argument('--format', choices=('table', 'json'), default='table', help='output format (default: table)')
    p.add_argument('--output', type=Path, default=None, metavar='FILE.json', help='also write the results to this '
                   'JSON file')
    p.set_defaults(func=run, runs_models=True)


def _fuse_for_inference(model: Any, mode: str) -> Any:
    from ..deployment import fuse_for_inference
    return fuse_for_inference(model) if mode == 'infer' else model


def run(args: argparse.Namespace) -> int:
    import torch

    from ..performance import MODES, format_table, run_benchmark
    from ..utils.io import atomic_write

    for flag in ('batch_size', 'repeats', 'gemm_size', 'threads'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.amp == 'fp16' and args.device != 'cuda':
        raise UsageError('--amp fp16 needs --device cuda (CPUs compute fp16 slowly or not at all); use bf16')
    try:
        model_kwargs = parse_model_kwargs(args.model_kwargs)
        compared = [] if args.compare_kwargs is None else [parse_model_kwargs(args.compare_kwargs)]
    except ValueError as e:
        raise UsageError(f'--model-kwargs / --compare-kwargs: {e}') from e
    report: Dict[str, Any] = run_benchmark(
        args.model, args.modes or MODES, args.batch_size, args.img_size, args.device, args.warmup, args.repeats,
        args.gemm_size, _fuse_for_inference if args.fuse else None, model_kwargs,
        amp=None if args.amp == 'none' else args.amp, torch_compile=args.compile, kernels=args.kernels or (None,),
        grad_checkpointing=args.grad_checkpointing, variant_kwargs=[{}, *compared], count_memory=not args.no_memory,
        source_options=dict(checkpoint=args.checkpoint, pretrained=args.pretrained))
    print(json.dumps(report, indent=1) if args.format == 'json' else format_table(report))
    if args.output is not None:
        atomic_write(args.output, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return 0
