"""Where a model's time goes: ``torch.profiler`` over a few fused forwards (or training steps), operators by self time.

Usage: ``python benchmarks/profile_forward.py [--model refiner_vit_s_patch16_224] [--batch-size 16] [--repeats 3]
[--train] [--by-shape]``. The native refiner kernels are not aten operators, so their time is not listed; it is the
forward's total minus the listed operators. ``--by-shape`` lists an operator once per set of input shapes (which of
the batched matmuls, which copy). With ``--train`` (forward, cross-entropy, backward, SGD step of the unfused model in
training mode), the step is split into its forward and backward, and the released refiners' training path
(:mod:`refiner_vit.layers.released`) into its labelled parts (expanded forward, tail forward, tail backward, recompute,
expanded backward), each the total over all refiners per step. The profiler adds its own overhead: use it for shares,
the harness for throughput.
"""
import argparse
import time

import timm
import torch
from torch.profiler import record_function

import refiner_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='refiner_vit_s_patch16_224')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=3, help='profiled steps (after 2 warm-up ones)')
    parser.add_argument('--rows', type=int, default=15, help='operators listed')
    parser.add_argument('--train', action='store_true', help='profile training steps instead of fused forwards')
    parser.add_argument('--by-shape', action='store_true',
                        help='list operators per input shapes (which matmul, which copy); recording them costs time')
    args = parser.parse_args()
    refiner_vit.keep_freed_memory()
    model = timm.create_model(args.model)
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
    if args.train:
        model.train()
        target = torch.randint(0, model.num_classes, (args.batch_size,))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with record_function('step: forward'):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            with record_function('step: backward'):
                loss.backward()
            optimizer.step()
        context = torch.enable_grad()
    else:
        model = refiner_vit.fuse_for_inference(model.eval())

        def step() -> None:
            model(x)
        context = torch.inference_mode()
    with context:
        for _ in range(2):
            step()
        with torch.profiler.profile(record_shapes=args.by_shape) as profile:
            start = time.perf_counter()
            for _ in range(args.repeats):
                step()
            wall_ms = (time.perf_counter() - start) * 1e3 / args.repeats
    events = profile.key_averages(group_by_input_shape=args.by_shape)
    labelled = [e for e in events if e.key.startswith(('step: ', 'released_refiner: '))]
    operators = sorted((e for e in events if e not in labelled), key=lambda e: e.self_cpu_time_total, reverse=True)
    listed_ms = sum(e.self_cpu_time_total for e in operators) / 1e3 / args.repeats
    what = 'training step' if args.train else 'forward'
    print(f'{args.model}, batch {args.batch_size}, per {what}: {wall_ms:.0f} ms wall, {listed_ms:.0f} ms in aten '
          f'operators, {wall_ms - listed_ms:.0f} ms elsewhere (native kernels, Python)')
    for event in sorted(labelled, key=lambda e: e.key):
        print(f'{event.key:<40} {event.cpu_time_total / 1e3 / args.repeats:8.1f} ms  '
              f'{event.count // args.repeats:5d} calls')
    for event in operators[:args.rows]:
        per_step = event.self_cpu_time_total / 1e3 / args.repeats
        shapes = f'  {event.input_shapes}' if args.by_shape else ''
        print(f'{event.key:<40} {per_step:8.1f} ms  {event.count // args.repeats:5d} calls{shapes}')


if __name__ == '__main__':
    main()
