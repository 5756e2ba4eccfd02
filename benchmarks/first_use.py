"""What the ops' first-use choices cost: with an empty kernel cache, each model's first step builds the kernels it
may use and measures them against torch's operators for each new shape; later steps and processes reuse both.

Prints, per model and mode, the first, second and third step's seconds, then every choice made: the op, the input
shape, the median milliseconds of each implementation, the seconds the measurement took, and what was chosen.

Usage: ``python benchmarks/first_use.py [--batch-size 16] [--models ...]`` (uses a fresh temporary kernel cache).
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from refiner_vit.ops.build import ENV_CACHE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['deit_small_patch16_224', 'refined_deit_small_patch16_224',
                                                        'refiner_vit_s_patch16_224'])
    parser.add_argument('--batch-size', type=int, default=16)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix='refiner-first-use-'))
    os.environ[ENV_CACHE] = str(cache)

    import timm

    import refiner_vit

    refiner_vit.keep_freed_memory()
    torch.manual_seed(0)
    print(f'{"model":<32} {"mode":<6} {"1st step s":>10} {"2nd":>6} {"3rd":>6}')
    for name in args.models:
        for mode in ('infer', 'train'):
            model = timm.create_model(name).train(mode == 'train')
            if mode == 'infer':
                model = refiner_vit.fuse_for_inference(model)
            x = torch.randn(args.batch_size, 3, 224, 224)
            seconds = []
            for _ in range(3):
                began = time.perf_counter()
                if mode == 'infer':
                    with torch.inference_mode():
                        model(x)
                else:
                    model(x).sum().backward()
                seconds.append(time.perf_counter() - began)
            print(f'{name:<32} {mode:<6} {seconds[0]:>10.2f} {seconds[1]:>6.2f} {seconds[2]:>6.2f}')
    print(f'\n{"choice (op, shape, threads)":<72} {"native ms":>9} {"torch ms":>9} {"measure s":>9}  chosen')
    for path in sorted(cache.glob('*.choice.json')):
        choice = json.loads(path.read_text())
        op, size, threads = path.name.split('.')[1:4]
        print(f'{op + " " + size + " " + threads:<72} {choice["native_ms"]:>9.1f} {choice["torch_ms"]:>9.1f} '
              f'{choice["measure_s"]:>9.2f}  {"native" if choice["native"] else "torch"}')


if __name__ == '__main__':
    main()
