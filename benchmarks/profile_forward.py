"""Where a model's inference time goes: ``torch.profiler`` over a few fused forwards, operators by self time.

Usage: ``python benchmarks/profile_forward.py [--model refiner_vit_s_patch16_224] [--batch-size 16] [--repeats 3]``.
The native refiner kernels are not aten operators, so their time is not listed; it is the forward's total minus
the listed operators. The profiler adds its own overhead: use it for shares, the harness for throughput.
"""
import argparse
import time

import timm
import torch

import refiner_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='refiner_vit_s_patch16_224')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=3, help='profiled forwards (after 2 warm-up ones)')
    parser.add_argument('--rows', type=int, default=15, help='operators listed')
    args = parser.parse_args()
    refiner_vit.keep_freed_memory()
    model = refiner_vit.fuse_for_inference(timm.create_model(args.model).eval())
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with torch.profiler.profile() as profile:
            start = time.perf_counter()
            for _ in range(args.repeats):
                model(x)
            wall_ms = (time.perf_counter() - start) * 1e3 / args.repeats
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    listed_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.repeats
    print(f'{args.model}, batch {args.batch_size}, per forward: {wall_ms:.0f} ms wall, {listed_ms:.0f} ms in aten '
          f'operators, {wall_ms - listed_ms:.0f} ms elsewhere (native kernels, Python)')
    for event in events[:args.rows]:
        per_forward = event.self_cpu_time_total / 1e3 / args.repeats
        print(f'{event.key:<32} {per_forward:8.1f} ms  {event.count // args.repeats:5d} calls')


if __name__ == '__main__':
    main()
