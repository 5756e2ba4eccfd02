"""Does the refiner make a ViT more data-efficient? A seeded, equal-budget comparison on a small dataset.

Trains, with the project's own engine (``refiner train``'s flags and :func:`refiner_vit.train.runner.fit`) and
one pinned recipe, three models of the same width, depth and token grid:

* ``vit``: timm's ViT (``deit_tiny_patch16_224`` re-sized by ``--model-kwargs``);
* ``refiner``: the same ViT with the paper-form (linear) refiner in every block, randomly initialised as when
  the paper trains from scratch (``refined_deit_tiny_patch16_224`` re-sized; the identity start that
  ``refine()`` uses for pretrained models is the ``init`` ablation);
* ``refiner_vit``: the authors' released architecture (``test_refiner_vit``: conv stem, computing/sharing
  blocks, BatchNorm refiner) at the same width, depth, heads and patch grid.

Fair tuning: every variant gets the same learning-rate sweep (``--lrs``), scored by the final-epoch top-1 on a
tuning split held out from the TRAINING images (20 %, stratified); the validation split is only used for the
reported numbers, which are final-epoch top-1 (not the best epoch). Then ``--seeds`` seeds per variant.
Ablations (``--ablation``) vary one thing of the ``refiner`` variant at its tuned learning rate, or, with
``--retune-ablations``, each at the best rate of its own sweep.

Data: ``digits`` (scikit-learn's 8x8 digits, written once as PNG files so every experiment reads an ImageFolder)
or an ImageFolder root with ``train/`` and ``val/`` (see ``benchmarks/make_digit_scenes.py``). Subsets (tuning
split, training fractions) are folders of symbolic links. Finished runs are reused (``--work`` folder), so an
interrupted study continues where it stopped.

Usage (the numbers in docs/reproduction.md come from these commands)::

    nice -n 15 python benchmarks/data_efficiency.py --data digits --img-size 16 --seeds 3 --json out.json
    nice -n 15 python benchmarks/data_efficiency.py --data digits --img-size 16 --ablation fraction
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.models import register_model
from torch import nn

from refiner_vit.errors import UsageError
from refiner_vit.layers import AttentionRefiner

if TYPE_CHECKING:
    from refiner_vit.train.config import TrainConfig

ABLATIONS = ('none', 'lr_grid', 'fraction', 'expansion', 'kernel', 'placement', 'form', 'init', 'conv2d', 'cos_reg',
             'crop_pct', 'fraction_crop_pct')
MAIN_VARIANTS = ('vit', 'refiner', 'refiner_vit')
# The recipe every run gets, pinned here so that a change of the engine's defaults cannot change the study:
# DeiT-style AdamW + cosine with a short warm-up, label smoothing, stochastic depth, random-resized crops.
RECIPE = ('--batch-size', '32', '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine',
          '--warmup-epochs', '1', '--warmup-lr', '1e-5', '--min-lr', '1e-5', '--cooldown-epochs', '0',
          '--drop-path', '0.1', '--smoothing', '0.1', '--scale', '0.6', '1.0', '--ratio', '0.75', '1.3333',
          '--hflip', '0', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--train-interpolation', 'bilinear',
          '--interpolation', 'bilinear', '--amp', 'none', '--device', 'cpu', '--threads', '1', '--workers', '0',
          '--no-progress', '--no-tensorboard')
TUNE_FRACTION = 0.2  # share of the training images held out to choose the learning rate
SPLIT_SEED = 0


def engine_fingerprint() -> str:
    """A digest of the code that trains a run: the ``refiner_vit`` package's sources and this script.

    Finished runs are reused by their settings alone, so a ``--work`` folder can hold runs that older code
    trained (this study once compared new runs with baselines cached before an engine change). Every run
    records the fingerprint it was trained with; a reused run with another one is reported as stale.
    """
    import refiner_vit

    package = Path(refiner_vit.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob('*.py')) + [Path(__file__).resolve()]:
        name = path.relative_to(package.parent) if path.is_relative_to(package.parent) else path.name
        digest.update(str(name).encode() + b'\0' + path.read_bytes() + b'\0')
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- the 2-D ablation
@register_model
def refined_vit_key_grid(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The ``refiner`` variant whose refiners convolve the key axis on the 2-D patch grid (``key_grid``).

    Registered (in this process) so that the engine builds it by name like every other variant.
    """
    model = timm.create_model('refined_deit_tiny_patch16_224', pretrained=pretrained, **kwargs)
    grid = tuple(model.patch_embed.grid_size)
    for block in model.blocks:
        old = block.attn.refiner
        if not old.is_linear:
            raise UsageError('refined_vit_key_grid: the 2-D key-grid ablation is defined for the linear refiner')
        block.attn.refiner = AttentionRefiner(old.num_heads, old.expansion_ratio, old.kernel_size, key_grid=grid)
    return model


# ------------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """A model as the engine builds it: a timm name, its kwargs and extra ``refiner train`` flags."""
    model: str
    kwargs: Dict[str, Any]
    flags: Tuple[str, ...] = ()

    def with_kwargs(self, **kwargs: Any) -> 'Variant':
        return replace(self, kwargs={**self.kwargs, **kwargs})


def main_variants(embed_dim: int, depth: int, num_heads: int, patch_size: int) -> Dict[str, Variant]:
    """The three compared models, equal in width, depth, heads and token grid."""
    arch = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    stem = tuple(max(8, embed_dim // 2 ** i) for i in (2, 1, 0))  # the default small model's (16, 32, 64) at 64
    return {
        'vit': Variant('deit_tiny_patch16_224', arch),
        'refiner': Variant('refined_deit_tiny_patch16_224', {**arch, 'refiner_expansion': 3, 'refiner_kernel': 3,
                                                              'refiner_form': 'linear'}),
        'refiner_vit': Variant('test_refiner_vit', {**arch, 'stem_chs': stem, 'aux_head': False}),
    }


def ablation_variants(name: str, base: Dict[str, Variant], depth: int) -> Dict[str, Tuple[str, Variant]]:
    """``label -> (tuned variant whose lr it uses, variant)`` for one ablation (``fraction``/``crop_pct`` excluded)."""
    refiner = base['refiner']
    half = depth // 2
    table: Dict[str, Dict[str, Variant]] = {
        'expansion': {f'r={r}': refiner.with_kwargs(refiner_expansion=r) for r in (1, 2, 3, 4, 6)},
        'kernel': {f'k={k}': refiner.with_kwargs(refiner_kernel=k) for k in (1, 3, 5, 7)},
        'placement': {'first half': refiner.with_kwargs(refiner_blocks=list(range(half))),
                      'second half': refiner.with_kwargs(refiner_blocks=list(range(half, depth))),
                      'all blocks': refiner},
        'form': {'linear (paper)': refiner, 'released (BN+ReLU6)': refiner.with_kwargs(refiner_form='released')},
        # the engine's --refine: refine(model, form='linear') on the plain ViT, started as the identity
        'init': {'random (paper)': refiner,
                 'identity': replace(base['vit'], flags=('--refine', '--refine-init', 'identity'))},
        'conv2d': {'1-D (released)': refiner, '2-D key grid': replace(refiner, model='refined_vit_key_grid')},
        'cos_reg': {'off': refiner, 'on': replace(refiner, flags=('--cos-reg', str(depth - 1)))},
    }
    return {label: ('refiner', variant) for label, variant in table[name].items()}


# ---------------------------------------------------------------------------------------------------------- data
def write_digits_folder(root: Path) -> Path:
    """scikit-learn's digits, its fixed train/val split written as PNG files (once) -> ImageFolder root."""
    from refiner_vit.data.digits import DigitsDataset

    done = root / '.complete'
    if not done.is_file():
        for split in ('train', 'val'):
            dataset = DigitsDataset(split)
            for index in range(len(dataset)):
                image, label = dataset[index]
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f'{index:05d}.png')
        done.write_text('ok\n')
    return root


def list_images(split_root: Path) -> List[Tuple[str, str]]:
    """``(absolute image path, class name)`` of an ImageFolder split, in ImageFolder order."""
    from refiner_vit.data.datasets import NamedImageFolder

    folder = NamedImageFolder(str(split_root))
    return [(os.path.abspath(path), folder.classes[target]) for path, target in folder.samples]


def stratified_subset(samples: Sequence[Tuple[str, str]], fraction: float, seed: int
                      ) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """``(chosen, rest)``: ``fraction`` of each class (at least one image), drawn with ``seed``."""
    rng = random.Random(seed)
    chosen, rest = [], []
    for name in sorted({c for _, c in samples}):
        items = [s for s in samples if s[1] == name]
        rng.shuffle(items)
        take = max(1, round(fraction * len(items)))
        chosen += items[:take]
        rest += items[take:]
    return chosen, rest


def link_split(dest: Path, samples: Sequence[Tuple[str, str]]) -> None:
    """An ImageFolder split of symbolic links to ``samples``, each named as its target file.

    ImageFolder orders a class's images by file name, and that order is the data order a seed shuffles. Links
    named after anything that depends on where the data or ``--work`` lives (an earlier version hashed the
    absolute path) give every work folder another data order, hence other tuning scores and possibly another
    tuned learning rate. Named as their targets, a subset keeps its source's order wherever it is built.
    """
    for path, name in samples:
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / Path(path).name
        if link.is_symlink() and os.readlink(link) != path:
            raise UsageError(f'{link}: two images of class {name!r} share the file name {link.name!r}')
        if not link.is_symlink():
            link.symlink_to(path)


def make_subset_root(work: Path, name: str, train: Sequence, val: Sequence) -> Path:
    """``work/subsets/name/{train,val}`` (made once)."""
    root = work / 'subsets' / name
    if not (root / '.complete').is_file():
        link_split(root / 'train', train)
        link_split(root / 'val', val)
        (root / '.complete').write_text('ok\n')
    return root


# ---------------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run: a variant, its data, learning rate, seed and epochs; evaluated at ``crop_pcts`` too."""
    label: str
    variant: Variant
    data: str
    img_size: int
    lr: float
    seed: int
    epochs: int
    crop_pct: float
    work: str
    crop_pcts: Tuple[float, ...] = ()
    settings: Dict[str, Any] = field(default_factory=dict)
    engine: str = ''  # engine_fingerprint() of the code that runs it; not part of the run's identity

    @property
    def output(self) -> Path:
        """``WORK/runs/<label>-<hash>``; the hash covers everything that determines the result (not the label), so
        a finished run is reused by any experiment that needs it, under whatever label it was first run."""
        key = json.dumps([asdict(self.variant), self.data, self.img_size, self.lr, self.seed, self.epochs,
                          self.crop_pct, RECIPE], sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        runs = Path(self.work) / 'runs'
        existing = sorted(runs.glob(f'*-{digest}'))
        if existing:
            return existing[0]
        slug = ''.join(ch if ch.isalnum() else '_' for ch in self.label)[:40]
        return runs / f'{slug}-{digest}'


def train_args(run: Run) -> 'TrainConfig':
    """The ``refiner train`` config of ``run``: the pinned recipe and the variant's flags, then the run's model,
    data, lr and seed (``resume='auto'``: an interrupted run continues where it stopped)."""
    from refiner_vit.train.config import parse_train_config

    recipe = parse_train_config([*RECIPE, '--model', run.variant.model, *run.variant.flags])
    return replace(recipe, data=run.data, img_size=run.img_size, model_kwargs=dict(run.variant.kwargs), lr=run.lr,
                   seed=run.seed, epochs=run.epochs, crop_pct=run.crop_pct, output=str(run.output), resume='auto')


def evaluate_crops(config: 'TrainConfig', checkpoint: Path, crop_pcts: Sequence[float]) -> Dict[str, float]:
    """Validation top-1 of the run's final weights at each evaluation crop fraction (the authors' calibration)."""
    from refiner_vit.data import build_eval_transform, build_loader, open_split, resolve_data
    from refiner_vit.models.resolve import model_data_config, resolve_model
    from refiner_vit.train.engine import evaluate

    source = resolve_data(config.data)
    model = resolve_model(str(checkpoint)).model
    out = {}
    for pct in crop_pcts:
        data_config = model_data_config(model, config.img_size, pct, config.interpolation)
        loader = build_loader(open_split(source, 'val', build_eval_transform(data_config)), 64, False, 0, 0)
        out[f'{pct:g}'] = round(evaluate(model, loader, torch.device('cpu'))['top1'], 3)
    return out


def execute(run: Run) -> Dict[str, Any]:
    """Train ``run`` (or reuse its finished summary) and return its record."""
    from refiner_vit.train.runner import fit

    config = train_args(run)
    summary_file, stamp = run.output / 'summary.json', run.output / 'engine.txt'
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        trained_by = stamp.read_text().strip() if stamp.is_file() else None
    else:
        run.output.mkdir(parents=True, exist_ok=True)
        stamp.write_text(run.engine + '\n')
        trained_by = run.engine
        with open(run.output / 'log.txt', 'w') as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            summary = fit(config)
    record = dict(label=run.label, lr=run.lr, seed=run.seed, epochs=run.epochs, top1=summary['top1'],
                  best_top1=summary['best_top1'], params=summary['params'],
                  train_seconds=summary['train_seconds'], output=str(run.output), engine=trained_by,
                  **run.settings)
    if run.crop_pcts:
        record['crop_top1'] = evaluate_crops(config, run.output / 'checkpoint-last.pth', run.crop_pcts)
    return record


def execute_all(runs: Sequence[Run], jobs: int) -> List[Dict[str, Any]]:
    """Run ``runs`` in ``jobs`` processes (one CPU thread each), results in the order given."""
    if jobs <= 1 or len(runs) <= 1:
        return [execute(run) for run in runs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(execute, runs))


# ----------------------------------------------------------------------------------------------------- reporting
def aggregate(records: Sequence[Dict[str, Any]], key: str = 'top1') -> Dict[str, Any]:
    """Mean and sample standard deviation (0 for one run) of ``key`` over runs, with the runs."""
    values = [float(r[key]) for r in records]
    if not values:
        raise ValueError('aggregate() needs at least one run')
    return dict(top1_mean=round(statistics.fmean(values), 3),
                top1_std=round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                runs=list(records))


def aggregate_by_label(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``label -> aggregate`` of the records, labels in the order they first appear."""
    labels = dict.fromkeys(r['label'] for r in records)
    return {label: aggregate([r for r in records if r['label'] == label]) for label in labels}


def format_table(variants: Dict[str, Dict[str, Any]]) -> str:
    """A fixed-width table: variant, parameters, lr, top-1 mean +- std, seeds, mean training seconds."""
    lines = [f'{"variant":<24} {"params":>9} {"lr":>8} {"top-1 (%)":>15} {"seeds":>5} {"s/run":>6}']
    for name, agg in variants.items():
        runs = agg['runs']
        seconds = statistics.fmean(r['train_seconds'] for r in runs)
        lines.append(f'{name:<24} {runs[0]["params"]:>9,} {runs[0]["lr"]:>8.2g} '
                     f'{agg["top1_mean"]:>7.2f} ± {agg["top1_std"]:<5.2f} {len(runs):>5} {seconds:>6.0f}')
    return '\n'.join(lines)


CURVE_SETTINGS = ('fraction', 'crop_pct', 'swept_lr')  # run settings that make a sweep a curve rather than bars


def _series(label: str, setting: str) -> str:
    """The curve a row belongs to: its label without the x value (``vit 10% crop 1`` -> ``vit crop 1``)."""
    if setting == 'fraction':
        return ' '.join(token for token in label.split() if not token.endswith('%'))
    return label.split(' crop ')[0] if setting == 'crop_pct' else label.split(' lr=')[0]


def plot(variants: Dict[str, Dict[str, Any]], title: str, path: Path) -> None:
    """A curve per model when the runs sweep a numeric setting (fraction, crop), else bars; +-1 std either way."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    runs = [agg['runs'][0] for agg in variants.values()]
    setting = next((k for k in CURVE_SETTINGS if all(k in r for r in runs)), None)
    if setting is None:
        fig = _bars(plt, variants, title)
    else:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for series in dict.fromkeys(_series(label, setting) for label in variants):
            points = sorted((agg['runs'][0][setting], agg['top1_mean'], agg['top1_std'])
                            for label, agg in variants.items() if _series(label, setting) == series)
            x, mean, std = zip(*points)
            ax.errorbar(x, mean, yerr=std, marker='o', capsize=3, label=series)
        xlabel = {'fraction': 'training images (%)', 'crop_pct': 'evaluation crop_pct', 'swept_lr': 'learning rate'}
        ax.set(xlabel=xlabel[setting], ylabel='validation top-1 (%)', title=title,
               xscale='log' if setting == 'swept_lr' else 'linear')
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bars(plt: Any, variants: Dict[str, Dict[str, Any]], title: str) -> Any:
    names = list(variants)
    fig, ax = plt.subplots(figsize=(max(4., 1.2 * len(names) + 1.5), 3.6))
    means = [variants[n]['top1_mean'] for n in names]
    ax.bar(range(len(names)), means, yerr=[variants[n]['top1_std'] for n in names], capsize=4, color='#8fb3d9')
    for i, name in enumerate(names):
        ax.plot([i] * len(variants[name]['runs']), [r['top1'] for r in variants[name]['runs']], 'k.', ms=4)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha='right' if len(names) > 4
                  else 'center')
    low = min(min(r['top1'] for r in variants[n]['runs']) for n in names)
    ax.set_ylim(max(0., low - 10.), 100.)
    ax.set(ylabel='validation top-1 (%)', title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------- experiments
def fraction_epochs(epochs: int, percent: int, budget: str) -> int:
    """Epochs of a run on ``percent`` % of the training set: ``epochs`` x 100 / percent for the same number of
    optimiser steps as a full run (``budget='steps'``), or ``epochs`` unchanged (``'epochs'``)."""
    if not 0 < percent <= 100:
        raise UsageError(f'--fractions: percentages must be in (0, 100], got {percent}')
    return max(1, round(epochs * 100 / percent)) if budget == 'steps' else epochs


def best_lr(scores: Dict[float, float]) -> float:
    """The learning rate of the highest tuning top-1; on a tie the smaller one (the more conservative)."""
    if not scores:
        raise ValueError('best_lr() needs at least one scored learning rate')
    return max(scores, key=lambda lr: (scores[lr], -lr))


def sweep_edge(lr: float, swept: Sequence[float]) -> Optional[str]:
    """``'lowest'`` or ``'highest'`` when ``lr`` is at that end of a sweep of several rates, else None.

    A best rate at an end means the optimum may lie outside the sweep: the variant may be under-tuned.
    """
    if len(set(swept)) < 2:
        return None
    return 'lowest' if lr == min(swept) else 'highest' if lr == max(swept) else None


class Study:
    """The data, variants and tuned learning rates that every experiment of one invocation shares."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.work = Path(opts.work).resolve()
        self.root = self._data_root()
        self.train_images = list_images(self.root / 'train')
        tune_val, tune_train = stratified_subset(self.train_images, TUNE_FRACTION, SPLIT_SEED)
        self.tune_root = make_subset_root(self.work, 'tune', tune_train, tune_val)
        self.num_classes = len({c for _, c in self.train_images})
        patch = opts.patch_size or max(1, opts.img_size // 4)
        self.variants = main_variants(opts.embed_dim, opts.depth, opts.num_heads, patch)
        self.tuned: Dict[str, Dict[str, Any]] = {}
        self.engine = engine_fingerprint()
        self.stale: List[str] = []  # reused runs that other code (or code before fingerprints) trained

    def execute(self, runs: Sequence[Run]) -> List[Dict[str, Any]]:
        records = execute_all(runs, self.opts.jobs)
        self.stale += [r['output'] for r in records if r['engine'] != self.engine and r['output'] not in self.stale]
        return records

    def _data_root(self) -> Path:
        if self.opts.data == 'digits':
            return write_digits_folder(self.work / 'digits')
        root = Path(self.opts.data).expanduser().resolve()
        for split in ('train', 'val'):
            if not (root / split).is_dir():
                raise UsageError(f'--data {self.opts.data}: expected an ImageFolder root with train/ and val/')
        return root

    def run(self, label: str, variant: Variant, lr: float, seed: int, data: Optional[Path] = None,
            epochs: Optional[int] = None, **settings: Any) -> Run:
        o = self.opts
        crops = tuple(o.crop_pcts) if settings.pop('crops', False) else ()
        return Run(label, variant, str(data or self.root), o.img_size, lr, seed, epochs or o.epochs, o.crop_pct,
                   str(self.work), crops, settings, self.engine)

    def tune(self, names: Sequence[str]) -> None:
        """The same lr sweep for every variant named, scored on the tuning split; best lr kept per variant."""
        names = [n for n in names if n not in self.tuned]
        runs = [self.run(n, self.variants[n], lr, self.opts.tune_seed, self.tune_root) for n in names
                for lr in self.opts.lrs]
        records = self.execute(runs)
        for name in names:
            scores = {r['lr']: r['top1'] for r in records if r['label'] == name}
            lr = best_lr(scores)
            self.tuned[name] = dict(lr=lr, tune_top1={f'{lr:g}': s for lr, s in scores.items()},
                                    sweep_edge=sweep_edge(lr, self.opts.lrs))

    def seeds(self) -> List[int]:
        return list(range(self.opts.seeds))

    def compare(self, labelled: Dict[str, Tuple[str, Variant]], crops: bool = False) -> Dict[str, Dict[str, Any]]:
        """Every labelled variant at its tuned variant's lr, each seed; aggregated per label."""
        self.tune(sorted({tuned for tuned, _ in labelled.values()}))
        runs = [self.run(label, variant, self.tuned[tuned]['lr'], seed, crops=crops)
                for label, (tuned, variant) in labelled.items() for seed in self.seeds()]
        return aggregate_by_label(self.execute(runs))

    def fraction_curve(self, crops: bool = False) -> Dict[str, Dict[str, Any]]:
        """vit and refiner on {10, 25, 50, 100} % of the training images (a new stratified subset per seed).

        ``--fraction-budget steps`` scales the epochs by 100 / percent, so that every run takes the same number of
        optimiser steps (a 10 % run evaluates 10x as often: about twice the cost of a full run); ``epochs`` keeps
        ``--epochs``, so smaller subsets also get proportionally fewer steps.
        """
        names = ('vit', 'refiner')
        self.tune(names)
        runs = []
        for pct in self.opts.fractions:
            for seed in self.seeds():
                data = self.root
                if pct < 100:
                    subset, _ = stratified_subset(self.train_images, pct / 100., seed)
                    data = make_subset_root(self.work, f'fraction{pct}-seed{seed}', subset,
                                            list_images(self.root / 'val'))
                epochs = fraction_epochs(self.opts.epochs, pct, self.opts.fraction_budget)
                runs += [self.run(f'{n} {pct}%', self.variants[n], self.tuned[n]['lr'], seed, data, epochs,
                                  fraction=pct, crops=crops) for n in names]
        return aggregate_by_label(self.execute(runs))

    def lr_grid(self) -> Dict[str, Dict[str, Any]]:
        """Every main variant at every ``--lrs`` rate, each seed, on the validation split.

        The tuning split picks one rate per variant from one run each; this shows the whole curve, so that a
        comparison does not hinge on that pick (each variant's best rate here is an optimistic, equal-budget
        number for all).
        """
        runs = [self.run(f'{n} lr={lr:g}', self.variants[n], lr, seed, swept_lr=lr)
                for n in MAIN_VARIANTS for lr in self.opts.lrs for seed in self.seeds()]
        return aggregate_by_label(self.execute(runs))

    def per_crop(self, compared: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """Rows ``LABEL crop C`` from runs evaluated at each ``--crop-pcts`` value (no retraining)."""
        out = {}
        for name, agg in compared.items():
            for pct in self.opts.crop_pcts:
                runs = [{**r, 'top1': r['crop_top1'][f'{pct:g}'], 'crop_pct': pct} for r in agg['runs']]
                out[f'{name} crop {pct:g}'] = aggregate(runs)
        return out

    def experiment(self, ablation: str) -> Dict[str, Dict[str, Any]]:
        """The rows of one ``--ablation``: ``label -> aggregate``."""
        if ablation == 'none':
            return self.compare({n: (n, self.variants[n]) for n in MAIN_VARIANTS})
        if ablation == 'lr_grid':
            return self.lr_grid()
        if ablation == 'fraction':
            return self.fraction_curve()
        if ablation == 'crop_pct':  # the main comparison's final weights at other evaluation crops
            return self.per_crop(self.compare({n: (n, self.variants[n]) for n in MAIN_VARIANTS}, crops=True))
        if ablation == 'fraction_crop_pct':  # the fraction curve's final weights at other evaluation crops
            return self.per_crop(self.fraction_curve(crops=True))
        labelled = ablation_variants(ablation, self.variants, self.opts.depth)
        if self.opts.retune_ablations:  # every setting gets its own sweep, as the main variants do
            self.variants.update({label: variant for label, (_, variant) in labelled.items()})
            labelled = {label: (label, variant) for label, (_, variant) in labelled.items()}
        return self.compare(labelled)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='digits', help="'digits' or an ImageFolder root with train/ and val/")
    p.add_argument('--img-size', type=int, default=16, help='input side in pixels')
    p.add_argument('--patch-size', type=int, help='patch side (default: img-size / 4, a 4x4 token grid)')
    p.add_argument('--embed-dim', type=int, default=64, help='width of every variant')
    p.add_argument('--depth', type=int, default=4, help='blocks of every variant')
    p.add_argument('--num-heads', type=int, default=4, help='attention heads of every variant')
    p.add_argument('--seeds', type=int, default=3, help='seeds per variant (0 .. K-1)')
    p.add_argument('--epochs', type=int, default=30, help='training epochs of every run (scaled for fractions)')
    p.add_argument('--lrs', type=float, nargs='+', default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
                   help='learning rates swept for every variant on the tuning split (default: a factor-2 grid '
                        'over 16x); a best rate at either end is reported as a warning')
    p.add_argument('--tune-seed', type=int, default=0, help='seed of the learning-rate sweep runs')
    p.add_argument('--crop-pct', type=float, default=0.9, help='evaluation centre-crop fraction of every run')
    p.add_argument('--ablation', nargs='+', choices=ABLATIONS, default=['none'],
                   help="experiments to run in order ('none': the main three-variant comparison)")
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
    p.add_argument('--json', help='write the results here (one file per ablation: NAME suffixed when several)')
    p.add_argument('--plot', help='bar chart PNG (default: next to --json, else WORK/<ablation>.png)')
    return p


def _out_path(base: Optional[str], ablation: str, many: bool, suffix: str) -> Optional[Path]:
    if not base:
        return None
    path = Path(base)
    return path.with_name(f'{path.stem}_{ablation}{suffix}') if many else path


def main(argv: Optional[List[str]] = None) -> int:
    opts = build_arg_parser().parse_args(argv)
    if opts.seeds < 1 or opts.epochs < 1 or opts.jobs < 1:
        raise UsageError('--seeds, --epochs and --jobs must be >= 1')
    if opts.patch_size and opts.img_size % opts.patch_size:
        raise UsageError(f'--img-size {opts.img_size} is not divisible by --patch-size {opts.patch_size}')
    started = time.perf_counter()
    study = Study(opts)
    config = {k: v for k, v in vars(opts).items() if k not in ('json', 'plot')}
    config.update(recipe=' '.join(RECIPE), torch=torch.__version__, timm=timm.__version__, cpus=os.cpu_count(),
                  data_root=str(study.root), engine=study.engine)
    many = len(opts.ablation) > 1
    for ablation in opts.ablation:
        variants = study.experiment(ablation)
        report = dict(ablation=ablation, variants=variants, tuning=study.tuned,
                      config={**config, 'wall_seconds': round(time.perf_counter() - started, 1)},
                      stale_runs=list(study.stale))
        print(f'\n== {ablation if ablation != "none" else "main comparison"} ({opts.data}, {opts.img_size} px, '
              f'{opts.seeds} seeds, {opts.epochs} epochs) ==')
        print(format_table(variants))
        print('lr sweep (tuning-split top-1):',
              '; '.join(f'{n} {t["tune_top1"]} -> {t["lr"]:g}' for n, t in study.tuned.items()))
        for name, tuned in study.tuned.items():
            if tuned['sweep_edge']:
                print(f'warning: the best lr of {name} ({tuned["lr"]:g}) is the {tuned["sweep_edge"]} of --lrs; '
                      'its optimum may lie outside the sweep', file=sys.stderr)
        json_path = _out_path(opts.json, ablation, many, '.json')
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=1) + '\n')
        chart = _out_path(opts.plot, ablation, many, '.png') or (json_path.with_suffix('.png') if json_path else
                                                                 study.work / f'{ablation}.png')
        what = 'main comparison' if ablation == 'none' else f'ablation: {ablation}'
        plot(variants, f'{Path(opts.data).name}, {opts.img_size} px, {opts.seeds} seeds: {what}', chart)
    if study.stale:
        print(f'warning: {len(study.stale)} reused run(s) were trained by other code than this ({study.engine}), '
              f'e.g. {study.stale[0]}; their numbers may differ from a fresh run. Use a fresh --work to re-run '
              'everything (the JSON lists them under stale_runs).', file=sys.stderr)
    print(f'\n{time.perf_counter() - started:.0f} s wall', file=sys.stderr)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
