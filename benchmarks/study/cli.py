"""The command line of ``benchmarks/data_efficiency.py``: options, the order of the experiments, what is written."""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch

from refiner_vit.errors import UsageError
from refiner_vit.utils.allocator import keep_freed_memory

from .data import NATIVE_SIZES
from .experiments import Study
from .report import (
    Aggregates,
    effects,
    format_attribution,
    format_grid_summary,
    format_mechanism,
    format_table,
    grid_summary,
    mechanism_summary,
    plot,
    plot_mechanism,
)
from .runs import RECIPE
from .variants import DECOMPOSITION

ABLATIONS = ('none', 'decomposition', 'rivals', 'rivals_depth', 'lr_grid', 'fraction', 'expansion', 'kernel',
             'placement', 'form', 'init', 'conv2d', 'cos_reg', 'crop_pct', 'fraction_crop_pct')


def build_arg_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='digits', help="'digits', 'mnist5k' (needs the [data] extra) or an ImageFolder "
                                                    'root with train/ and val/')
    p.add_argument('--img-size', type=int, help='input side in pixels (default: 16 for digits, 28 for mnist5k, '
                                                 'else 32)')
    p.add_argument('--patch-sizes', type=int, nargs='+',
                   help='patch side of every variant; several run each experiment once per token grid and add a grid '
                        'summary (even, >= 2: the conv stem has stride 2; default: 4 from 28 px, else 2, a grid of '
                        'at least 7x7)')
    p.add_argument('--embed-dim', type=int, default=64, help='width of every variant')
    p.add_argument('--depth', type=int, default=4, help='blocks of every variant')
    p.add_argument('--num-heads', type=int, default=4, help='attention heads of every variant')
    p.add_argument('--seeds', type=int, default=3, help='seeds per variant (0 .. K-1)')
    p.add_argument('--epochs', type=int, default=100, help='training epochs of every run (scaled for fractions)')
    p.add_argument('--warmup-epochs', type=float, default=5., help='linear warm-up epochs of every run')
    p.add_argument('--lrs', type=float, nargs='+', default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
                   help='learning rates swept for every variant on the tuning split (default: a factor-2 grid '
                        'over 16x); a best rate at either end extends that variant\'s sweep once by a factor of 2')
    p.add_argument('--tune-seed', type=int, default=0, help='seed of the learning-rate sweep runs')
    p.add_argument('--crop-pct', type=float, default=0.9, help='evaluation centre-crop fraction of every run')
    p.add_argument('--ablation', nargs='+', choices=ABLATIONS, default=['none'],
                   help="experiments to run in order ('none': the main three-variant comparison; 'decomposition': "
                        'the models between a plain ViT and Refiner-ViT, one change at a time; \'rivals\': the refiner '
                        'beside talking heads, re-attention, kernel 1 and expansion 1 on the plain and the conv-stem '
                        'ViT; \'rivals_depth\': the plain-ViT rivals, for a deeper --depth)')
    p.add_argument('--retune-ablations', action='store_true',
                   help="give every ablation setting its own --lrs sweep instead of the refiner variant's tuned lr "
                        '(len(--lrs) more runs per setting)')
    p.add_argument('--fractions', type=int, nargs='+', default=[10, 25, 50, 100],
                   help='training-set percentages of the fraction ablation')
    p.add_argument('--fraction-budget', choices=('steps', 'epochs'), default='steps',
                   help='fraction ablation: same optimiser steps for every fraction, or same epochs')
    p.add_argument('--crop-pcts', type=float, nargs='+', default=[0.75, 0.875, 0.9, 1.0, 1.13],
                   help='evaluation crop fractions of the crop_pct ablation')
    p.add_argument('--jobs', type=int, default=2, help='runs in parallel (processes of one thread each)')
    p.add_argument('--work', default='runs/data_efficiency', help='folder of the data copies and the runs')
    p.add_argument('--json', help='write the results here (NAME suffixed by the ablation and the grid when several)')
    p.add_argument('--plot', help='bar chart PNG (default: next to --json, else WORK/<ablation>.png)')
    return p


def default_patch_size(img_size: int) -> int:
    """4 from 28 px (7x7 at 28, 8x8 at 32), else 2 (8x8 at 16): a plain ViT fits its training set on a finer
    grid far better than on the 4x4 grid this study once defaulted to (docs/reproduction.md, calibration)."""
    return 4 if img_size >= 28 else 2


def _check(opts: argparse.Namespace) -> None:
    """Resolve the defaults that depend on the data, and reject what cannot run, before anything is trained."""
    if opts.seeds < 1 or opts.epochs < 1 or opts.jobs < 1:
        raise UsageError('--seeds, --epochs and --jobs must be >= 1')
    if opts.warmup_epochs < 0:
        raise UsageError(f'--warmup-epochs must be >= 0, got {opts.warmup_epochs:g}')
    opts.img_size = opts.img_size or NATIVE_SIZES.get(opts.data, 32)
    opts.patch_sizes = opts.patch_sizes or [default_patch_size(opts.img_size)]
    for patch in opts.patch_sizes:
        if patch < 2 or patch % 2 or opts.img_size % patch:
            raise UsageError(f'--patch-sizes {patch}: every patch size must be even, >= 2 (the conv stem has stride 2) '
                             f'and divide --img-size {opts.img_size}')


def _out_path(base: Optional[str], parts: List[str], suffix: str) -> Optional[Path]:
    """``base`` with ``_PART`` added for each of ``parts`` (the ablation and the grid when several run)."""
    if not base:
        return None
    path = Path(base)
    return path.with_name('_'.join([path.stem, *parts]) + suffix) if parts else path


def _report(study: Study, ablation: str, variants: Aggregates, config: Dict[str, Any], started: float) -> Dict:
    opts = study.opts
    print(f'\n== {ablation if ablation != "none" else "main comparison"} ({opts.data}, {opts.img_size} px, '
          f'{study.grid} grid, {opts.seeds} seeds, {opts.epochs} epochs) ==')
    print(format_table(variants))
    if ablation == 'decomposition':
        print('\nattribution (Δ: paired by seed, against the row\'s starting model):')
        print(format_attribution(variants))
    print('lr sweep (tuning-split top-1):',
          '; '.join(f'{n} {t["tune_top1"]} -> {t["lr"]:g}' for n, t in study.tuned.items()))
    for name, tuned in study.tuned.items():
        if tuned['sweep_edge']:
            swept = ', '.join(sorted(tuned['tune_top1'], key=float))
            print(f'warning: the best lr of {name} ({tuned["lr"]:g}) is the {tuned["sweep_edge"]} of the rates it was '
                  f'tuned at ({swept}; a sweep extends once); its optimum may lie outside them', file=sys.stderr)
    mechanism = mechanism_summary(variants)
    if mechanism:
        print('\nattention metrics of the final weights on the validation images (map multiplied with V / raw map):')
        print(format_mechanism(mechanism))
    return dict(ablation=ablation, grid=study.grid, patch_size=study.patch_size, variants=variants,
                effects=effects(variants), mechanism=mechanism, tuning=study.tuned, stale_runs=list(study.stale),
                config={**config, 'wall_seconds': round(time.perf_counter() - started, 1)})


def main(argv: Optional[List[str]] = None, description: Optional[str] = None) -> int:
    opts = build_arg_parser(description).parse_args(argv)
    _check(opts)
    # as `refiner train` does; the workers fork from here and inherit it. Without it every attention map buffer
    # is a fresh mmap whose pages fault in again: about 3x the time at a 14x14 grid (docs/reproduction.md, costs)
    keep_freed_memory()
    started = time.perf_counter()
    config = {k: v for k, v in vars(opts).items() if k not in ('json', 'plot')}
    config.update(recipe=' '.join(RECIPE), torch=torch.__version__, timm=timm.__version__, cpus=os.cpu_count())
    per_grid: Dict[str, Aggregates] = {}
    stale: List[str] = []
    for patch in opts.patch_sizes:
        study = Study(opts, patch)
        config.update(data_root=str(study.root), engine=study.engine)
        for ablation in opts.ablation:
            variants = study.experiment(ablation)
            report = _report(study, ablation, variants, config, started)
            per_grid.setdefault(study.grid, {}).update({k: v for k, v in variants.items() if k in DECOMPOSITION})
            parts = ([ablation] if len(opts.ablation) > 1 else []) + ([study.grid] if len(opts.patch_sizes) > 1 else [])
            json_path = _out_path(opts.json, parts, '.json')
            if json_path:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(report, indent=1) + '\n')
            chart = _out_path(opts.plot, parts, '.png') or (json_path.with_suffix('.png') if json_path else
                                                            study.work / f'{"_".join([ablation, study.grid])}.png')
            what = 'main comparison' if ablation == 'none' else f'ablation: {ablation}'
            title = f'{Path(opts.data).name}, {opts.img_size} px, {study.grid}, {opts.seeds} seeds: {what}'
            plot(variants, title, chart)
            if report['mechanism']:
                plot_mechanism(report['mechanism'], title, chart.with_name(f'{chart.stem}_mechanism.png'))
        stale += [s for s in study.stale if s not in stale]
    if len(per_grid) > 1:
        summary = grid_summary(per_grid)
        print('\n== how the effects change with the token grid (paired by seed, each model at its tuned lr) ==')
        print(format_grid_summary(summary, list(per_grid)))
        json_path = _out_path(opts.json, ['grids'], '.json')
        if json_path:
            json_path.write_text(json.dumps(dict(grids=list(per_grid), effects=summary, config=config), indent=1)
                                 + '\n')
    if stale:
        print(f'warning: {len(stale)} reused run(s) were trained by other code than this ({config["engine"]}), '
              f'e.g. {stale[0]}; their numbers may differ from a fresh run. Use a fresh --work to re-run '
              'everything (the JSON lists them under stale_runs).', file=sys.stderr)
    print(f'\n{time.perf_counter() - started:.0f} s wall', file=sys.stderr)
    return 0
