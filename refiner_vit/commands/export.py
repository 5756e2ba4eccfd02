"""``refiner export``: a fused model as a ``torch.export`` program (.pt2) or ONNX file, checked against eager."""
import argparse
from pathlib import Path

from ..errors import UsageError
from .model_source import add_model_options, load_model

EXAMPLE = """examples:
  refiner export --model refiner_vit_s_patch16_224 --checkpoint weights.safetensors --output model.onnx
  refiner export --model runs/demo --output runs/demo/model.pt2      # after `make demo`
"""

FORMATS = {'.pt2': 'torch.export', '.onnx': 'ONNX'}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'export',
        help='export a fused model to torch.export (.pt2) or ONNX (.onnx) with a dynamic batch',
        description='Fuse a model for inference (BatchNorms folded, refiners composed), export it with a dynamic '
                    'batch dimension, and check the exported outputs against the eager model on a batch of another '
                    'size. The format follows the suffix of --output.',
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    p.add_argument('--img-size', type=int, default=None, help="input side in pixels (default: the model's own)")
    p.add_argument('--output', type=Path, required=True, help='output file: .pt2 (torch.export) or .onnx')
    p.add_argument('--max-batch', type=int, default=1024, help='largest batch the exported graph accepts')
    p.add_argument('--no-fuse', action='store_true', help='export the model as it is, without fusion')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest accepted max|exported - eager| / max|eager| (default 1e-4)')
    p.set_defaults(func=run, runs_models=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..deployment import export_onnx, export_program, fuse_for_inference, onnx_outputs, relative_error, save_program

    fmt = FORMATS.get(args.output.suffix)
    if fmt is None:
        raise UsageError(f'--output {args.output}: unknown suffix; use one of {sorted(FORMATS)}')
    if args.max_batch < 3:
        raise UsageError(f'--max-batch must be >= 3 (the export traces a batch of 2), got {args.max_batch}')
    resolved = load_model(args, args.model, args.checkpoint, args.model_kwargs, args.img_size)
    model = resolved.model
    deployed = model if args.no_fuse else fuse_for_inference(model)
    size = resolved.data_config['input_size'][1:]
    example, check = torch.randn(2, 3, *size), torch.randn(3, 3, *size)
    if fmt == 'ONNX':
        export_onnx(deployed, example, args.output, args.max_batch)
        exported = onnx_outputs(args.output, check)
    else:
        program = export_program(deployed, example, args.max_batch)
        save_program(program, args.output)
        with torch.no_grad():
            exported = program.module()(check)
    with torch.no_grad():
        error = relative_error(exported, model(check))
    print(f'{fmt}: wrote {args.output}; relative error against eager on a batch of 3: {error:.2e}')
    if error > args.tolerance:
        print(f'error {error:.2e} exceeds --tolerance {args.tolerance:.0e}')
        return 1
    return 0
