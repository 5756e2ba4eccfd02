"""Learning-rate tuning and the experiments of one invocation: the main comparison, the decomposition, the lr grid,
the training-set fraction curve, evaluation crops and the refiner ablations, all at one token grid."""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from refiner_vit.errors import ConfigError

from .data import data_root, list_images, make_subset_root, stratified_subset
from .report import Aggregates, aggregate, aggregate_by_label
from .runs import Run, engine_fingerprint, execute_all
from .variants import (
    DECOMPOSITION,
    MAIN_VARIANTS,
    RIVALS,
    RIVALS_DEPTH,
    Variant,
    ablation_variants,
    decomposition_variants,
    main_variants,
    rival_variants,
)

TUNE_FRACTION = 0.2  # share of the training images held out to choose the learning rate
SPLIT_SEED = 0


def fraction_epochs(epochs: int, percent: int, budget: str) -> int:
    """Epochs of a run on ``percent`` % of the training set: ``epochs`` x 100 / percent for the same number of
    optimiser steps as a full run (``budget='steps'``), or ``epochs`` unchanged (``'epochs'``)."""
    if not 0 < percent <= 100:
        raise ConfigError(f'--fractions: percentages must be in (0, 100], got {percent}')
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


def extension(lr: float, swept: Sequence[float]) -> Optional[float]:
    """The rate one factor of 2 beyond the end of the sweep that ``lr`` is at (None inside the sweep)."""
    edge = sweep_edge(lr, swept)
    return None if edge is None else lr / 2 if edge == 'lowest' else lr * 2


class Study:
    """The data, variants and tuned learning rates that every experiment at one token grid shares."""

    def __init__(self, opts: argparse.Namespace, patch_size: int) -> None:
        self.opts = opts
        self.work = Path(opts.work).resolve()
        self.root = data_root(opts.data, self.work)
        self.train_images = list_images(self.root / 'train')
        tune_val, tune_train = stratified_subset(self.train_images, TUNE_FRACTION, SPLIT_SEED)
        self.tune_root = make_subset_root(self.work, 'tune', tune_train, tune_val)
        self.patch_size = patch_size
        self.grid = f'{opts.img_size // patch_size}x{opts.img_size // patch_size}'
        self.variants = main_variants(opts.embed_dim, opts.depth, opts.num_heads, patch_size)
        self.variants.update(decomposition_variants(self.variants))
        self.variants.update(rival_variants(self.variants))
        self.tuned: Dict[str, Dict[str, Any]] = {}
        self.engine = engine_fingerprint()
        self.stale: List[str] = []  # reused runs that other code (or code before fingerprints) trained

    def execute(self, runs: Sequence[Run]) -> List[Dict[str, Any]]:
        records = execute_all(runs, self.opts.jobs)
        self.stale += [r['output'] for r in records if r['engine'] != self.engine and r['output'] not in self.stale]
        return records

    def run(self, label: str, variant: Variant, lr: float, seed: int, data: Optional[Path] = None,
            epochs: Optional[int] = None, **settings: Any) -> Run:
        o = self.opts
        crops = tuple(o.crop_pcts) if settings.pop('crops', False) else ()
        # the attention metrics of the runs on the whole training set (not the tuning split's or a fraction's)
        return Run(label, variant, str(data or self.root), o.img_size, lr, seed, epochs or o.epochs, o.crop_pct,
                   str(self.work), o.warmup_epochs, crops, settings, mechanism=data is None, engine=self.engine)

    def tune(self, names: Sequence[str]) -> None:
        """The same lr sweep for every variant named, scored on the tuning split; best lr kept per variant.

        A best rate at an end of the sweep extends that variant's sweep once, by one factor of 2 beyond that end.
        """
        names = [n for n in names if n not in self.tuned]
        sweeps = {n: list(self.opts.lrs) for n in names}
        records = self.execute([self.run(n, self.variants[n], lr, self.opts.tune_seed, self.tune_root)
                                for n in names for lr in sweeps[n]])
        extra = {n: extension(best_lr({r['lr']: r['top1'] for r in records if r['label'] == n}), sweeps[n])
                 for n in names}
        extra = {n: lr for n, lr in extra.items() if lr is not None}
        records += self.execute([self.run(n, self.variants[n], lr, self.opts.tune_seed, self.tune_root)
                                 for n, lr in extra.items()])
        for name in names:
            own = [r for r in records if r['label'] == name]
            lr = best_lr({r['lr']: r['top1'] for r in own})
            swept = sweeps[name] + ([extra[name]] if name in extra else [])
            self.tuned[name] = dict(lr=lr, tune_top1={f'{r["lr"]:g}': r['top1'] for r in own},
                                    tune_train_top1={f'{r["lr"]:g}': r['train_top1'] for r in own},
                                    extended_to=extra.get(name), sweep_edge=sweep_edge(lr, swept))

    def seeds(self) -> List[int]:
        return list(range(self.opts.seeds))

    def compare(self, labelled: Dict[str, Tuple[str, Variant]], crops: bool = False) -> Aggregates:
        """Every labelled variant at its tuned variant's lr, each seed; aggregated per label."""
        self.tune(sorted({tuned for tuned, _ in labelled.values()}))
        runs = [self.run(label, variant, self.tuned[tuned]['lr'], seed, crops=crops)
                for label, (tuned, variant) in labelled.items() for seed in self.seeds()]
        return aggregate_by_label(self.execute(runs))

    def fraction_curve(self, crops: bool = False) -> Aggregates:
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

    def lr_grid(self) -> Aggregates:
        """Every main variant at every ``--lrs`` rate, each seed, on the validation split.

        The tuning split picks one rate per variant from one run each; this shows the whole curve, so that a
        comparison does not hinge on that pick (each variant's best rate here is an optimistic, equal-budget
        number for all).
        """
        runs = [self.run(f'{n} lr={lr:g}', self.variants[n], lr, seed, swept_lr=lr)
                for n in MAIN_VARIANTS for lr in self.opts.lrs for seed in self.seeds()]
        return aggregate_by_label(self.execute(runs))

    def per_crop(self, compared: Aggregates) -> Aggregates:
        """Rows ``LABEL crop C`` from runs evaluated at each ``--crop-pcts`` value (no retraining)."""
        out = {}
        for name, agg in compared.items():
            for pct in self.opts.crop_pcts:
                runs = [{**r, 'top1': r['crop_top1'][f'{pct:g}'], 'crop_pct': pct} for r in agg['runs']]
                out[f'{name} crop {pct:g}'] = aggregate(runs)
        return out

    def experiment(self, ablation: str) -> Aggregates:
        """The rows of one ``--ablation``: ``label -> aggregate``."""
        if ablation in ('none', 'decomposition', 'rivals', 'rivals_depth'):
            names = dict(none=MAIN_VARIANTS, decomposition=DECOMPOSITION, rivals=RIVALS,
                         rivals_depth=RIVALS_DEPTH)[ablation]
            return self.compare({n: (n, self.variants[n]) for n in names})
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
