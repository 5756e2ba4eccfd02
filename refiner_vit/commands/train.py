"""``refiner train``: train a (refined) ViT; defaults train a small Refiner-ViT on the embedded digits."""
import argparse

from ..train.config import FlagSet

EXAMPLE = """examples:
  refiner train --output runs/demo                         # digits, small Refiner-ViT, about a minute on a CPU
  refiner train --data DIR --img-size 32 --output runs/x   # DIR/train/<class>/*.png and DIR/val/<class>/*.png
  refiner train --config imagenet_refiner_s --data /data/imagenet --output runs/s    # a shipped recipe
  torchrun --nproc_per_node 2 -m refiner_vit train --output runs/ddp
"""

FLAGS: FlagSet = None  # set by add_parser; run() resolves the YAML config through it


def _data_flags(f: FlagSet) -> None:
    f.add('--data', default='digits', help="'digits' (embedded), a folder with train/ and val/, or a timm dataset "
          'spec (torch/cifar10, ...)')
    f.add('--data-dir', help='root folder of a timm dataset spec')
    f.add('--dataset-download', action='store_true', help='let timm/torchvision download the dataset spec')
    f.add('--img-size', type=int, help='input size (default: 16 for digits, 32 for other data with the default '
          "model, the model's own size with --model)")
    f.add('--batch-size', type=int, default=32, help='images per process and step')
    f.add('--workers', type=int, help='loader worker processes (default: 0 for digits, else min(4, CPUs))')
    f.add('--skip-bad-images', action='store_true', help='leave out image files that cannot be read (counted and '
          'named in summary.json) instead of stopping with an error naming the file')
    f.add('--crop-pct', type=float, help="evaluation centre-crop fraction (default: the model's)")
    f.add('--interpolation', help="evaluation resize interpolation (default: the model's)")


def _model_flags(f: FlagSet) -> None:
    f.add('--model', help='any timm or refiner_vit model name (default: a small Refiner-ViT sized for --img-size)')
    f.add('--model-kwargs', nargs='*', metavar='K=V', help='extra model arguments, e.g. depth=6 embed_dim=96')
    f.add('--refine', action='store_true',
          help='put the paper-form refiner into every attention of a timm ViT (see --refine-init)')
    f.add('--refine-form', default='linear', choices=('linear', 'released'), help='refiner form for --refine')
    f.add('--refine-init', default='auto', choices=('auto', 'identity', 'random'),
          help="start of the --refine refiners: 'auto' = identity when fine-tuning, random from scratch")
    f.add('--pretrained', action='store_true', help="start from timm's pretrained weights (head re-sized)")
    f.add('--initial-checkpoint', metavar='FILE', help='start from these weights (.safetensors or weights-only '
          '.pth; head re-sized, position embedding resampled)')
    f.add('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    f.add('--drop', type=float, default=0.0, help='dropout rate')


def _optim_flags(f: FlagSet) -> None:
    f.add('--epochs', type=int, default=30, help='training epochs (cooldown epochs come on top)')
    f.add('--opt', default='adamw', help='optimizer name for timm.optim.create_optimizer_v2')
    f.add('--lr', type=float, help='learning rate, used as is (default: --lr-base rule, else 1e-3)')
    f.add('--lr-base', type=float, help='learning rate per --lr-base-size images of global batch (DeiT: 5e-4)')
    f.add('--lr-base-size', type=int, default=512, help='global batch size that --lr-base refers to')
    f.add('--weight-decay', type=float, default=0.05, help='AdamW weight decay')
    f.add('--sched', default='cosine', help='timm scheduler name')
    f.add('--warmup-epochs', type=float, default=1, help='linear warm-up epochs')
    f.add('--warmup-lr', type=float, default=1e-5, help='learning rate at the start of warm-up')
    f.add('--min-lr', type=float, default=1e-5, help='final learning rate of the cosine schedule')
    f.add('--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after the schedule')
    f.add('--clip-grad', type=float, help='clip the gradient norm to this value')
    f.add('--model-ema', action='store_true', help='keep an exponential moving average of the weights')
    f.add('--model-ema-decay', type=float, default=0.9998, help='EMA decay per step')
    f.add('--cos-reg', type=int, default=0, metavar='N', help="the authors' attention cosine regulariser over the "
          'first N pairs of consecutive attention layers (their configs: 12)')


def _augment_flags(f: FlagSet) -> None:
    f.add('--aa', help='RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    f.add('--scale', type=float, nargs=2, default=[0.6, 1.0], help='random-resized-crop area range')
    f.add('--ratio', type=float, nargs=2, default=[0.75, 1.3333], help='random-resized-crop aspect range')
    f.add('--hflip', type=float, default=0.0, help='horizontal flip probability (0 suits digits)')
    f.add('--color-jitter', type=float, help='colour jitter strength')
    f.add('--train-interpolation', default='bilinear', help="training resize interpolation ('random' as DeiT)")
    f.add('--reprob', type=float, default=0.0, help='random erasing probability')
    f.add('--remode', default='pixel', help='random erasing mode')
    f.add('--recount', type=int, default=1, help='random erasing count')
    f.add('--mixup', type=float, default=0.0, help='mixup alpha (DeiT: 0.8)')
    f.add('--cutmix', type=float, default=0.0, help='cutmix alpha (DeiT: 1.0)')
    f.add('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    f.add('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    f.add('--smoothing', type=float, default=0.1, help='label smoothing')
    f.add('--token-label-dir', metavar='DIR', help='token-labeling maps (refiner relabel); needs --data FOLDER')
    f.add('--dense-weight', type=float, default=0.5, help='weight of the token-labeling dense loss')
    f.add('--mix-token', action='store_true', help='MixToken (with --token-label-dir)')


def _run_flags(f: FlagSet) -> None:
    f.add('--output', default='runs/train', help='output folder')
    f.add('--resume', metavar='auto|PATH', help="continue a run: 'auto' = OUTPUT/checkpoint-last.pth if present")
    f.add('--seed', type=int, default=42, help='random seed')
    f.add('--checkpoint-steps', type=int, default=0, metavar='N', help='also write checkpoint-last.pth every N '
          'steps inside an epoch, so a killed run repeats at most N steps (0: at epoch ends only, a killed run '
          'repeats its epoch). Resume is exact either way')
    f.add('--amp', default='none', choices=('none', 'bf16', 'fp16'), help='mixed precision (fp16 only on CUDA)')
    f.add('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    f.add('--threads', type=int, default=1, help='CPU threads per process (0: PyTorch default). 1 is best for '
          'the small default model and keeps a shared machine responsive')
    f.add('--no-progress', action='store_true', help='no progress bar')
    f.add('--no-tensorboard', action='store_true', help='no TensorBoard logs even when tensorboard is installed')


def add_parser(subparsers) -> None:
    global FLAGS
    p = subparsers.add_parser(
        'train', help='train a model (default: small Refiner-ViT on digits)', epilog=EXAMPLE,
        description='Train a Refiner-ViT, a refined timm ViT or any timm model, with the DeiT/authors\' recipe from '
                    "timm's parts. Every flag can also be set in a YAML file (--config); the command line wins.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('--config', metavar='FILE.yaml', help='YAML file of flag values, or the name of a shipped '
                   'recipe: digits, small_data, imagenet_refiner_{s,m,l}[_token_label], finetune_384, finetune_l_448')
    FLAGS = FlagSet(p)
    for group in (_data_flags, _model_flags, _optim_flags, _augment_flags, _run_flags):
        group(FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.runner import fit

    summary = fit(FLAGS.resolve(args, args.config))
    if summary.get('top1') is not None:
        print(f"top-1 {summary['top1']:.2f} % (best {summary['best_top1']:.2f} %, top-5 {summary['top5']:.2f} %) "
              f"on {summary['data']} after {summary['epochs']} epochs, {summary['train_seconds']:.0f} s training; "
              f"outputs in {summary['output']}")
    return 0
