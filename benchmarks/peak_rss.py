"""Peak resident memory of one training step (forward and backward) of a model, for sizes where
``refiner benchmark``'s memory count cannot run on the CPU: that count replays the step under the profiler, whose
records outgrow a 23 GB machine for Refiner-ViT-L at 448 px and batch 2.

The peak resident set includes what the count leaves out (the interpreter, the libraries, memory the allocator holds
on to), so compare it with itself, not with the count's allocated megabytes; at batch 1 both are measured.

Usage: ``python benchmarks/peak_rss.py MODEL BATCH [--grad-checkpointing]``. One step per process: the peak is the
process's own. With ``PYTHONPATH`` set to a checkout of another commit it measures that commit's models.
"""
import argparse
import resource

import timm
import torch

import refiner_vit  # noqa: F401  (registers the models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('batch_size', type=int)
    parser.add_argument('--grad-checkpointing', action='store_true')
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    side = model.pretrained_cfg['input_size'][-1]
    out = model(torch.randn(args.batch_size, 3, side, side))
    (out if torch.is_tensor(out) else out[0]).float().sum().backward()  # older trees return (logits, aux) in train
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f'{args.model} batch {args.batch_size}{" grad checkpointing" if args.grad_checkpointing else ""}: '
          f'peak RSS {peak_mb:.0f} MB ({refiner_vit.__file__})')


if __name__ == '__main__':
    main()
