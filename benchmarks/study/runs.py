"""One training run of the study: ``refiner train``'s flags and engine, reused when finished, then evaluated.

A run is identified by everything that determines its result (variant, data, size, lr, seed, epochs, warm-up,
crop, recipe), so any experiment that needs a finished run reuses it. Every run records a fingerprint of the code
that trained it; a reused run trained by other code is reported as stale.
"""
import contextlib
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

import torch

from .mechanism import run_metrics
from .variants import Variant

if TYPE_CHECKING:
    from refiner_vit.train.config import TrainConfig

# The recipe every run gets, pinned here so that a change of the engine's defaults cannot change the study:
# DeiT-style AdamW + cosine, label smoothing, stochastic depth, random-resized crops (the warm-up is an option).
RECIPE = ('--batch-size', '32', '--opt', 'adamw', '--weight-decay', '0.05', '--sched', 'cosine',
          '--warmup-lr', '1e-5', '--min-lr', '1e-5', '--cooldown-epochs', '0',
          '--drop-path', '0.1', '--smoothing', '0.1', '--scale', '0.6', '1.0', '--ratio', '0.75', '1.3333',
          '--hflip', '0', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--train-interpolation', 'bilinear',
          '--interpolation', 'bilinear', '--amp', 'none', '--device', 'cpu', '--threads', '1', '--workers', '0',
          '--no-progress', '--no-tensorboard')
SOURCE_SUFFIXES = ('.py', '.c', '.h')  # the kernels' C sources change numerics as much as Python does


def engine_fingerprint() -> str:
    """A digest of the code that trains a run: every source of the ``refiner_vit`` package and of the study.

    Finished runs are reused by their settings alone, so a ``--work`` folder can hold runs that older code
    trained (this study once compared new runs with baselines cached before an engine change). Every run
    records the fingerprint it was trained with; a reused run with another one is reported as stale. Sources are
    found anywhere below the package (``*.py``, and the native kernels' ``*.c`` / ``*.h``), wherever they move.
    """
    import refiner_vit

    package = Path(refiner_vit.__file__).resolve().parent
    study = Path(__file__).resolve().parent
    entry = study.parent / 'data_efficiency.py'
    digest = hashlib.sha1()
    for base in (package, study):
        for path in sorted(p for p in base.rglob('*') if p.suffix in SOURCE_SUFFIXES and p.is_file()):
            digest.update(f'{base.name}/{path.relative_to(base)}'.encode() + b'\0' + path.read_bytes() + b'\0')
    digest.update(entry.name.encode() + b'\0' + entry.read_bytes() + b'\0')
    return digest.hexdigest()[:12]


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
    warmup_epochs: float = 1.
    crop_pcts: Tuple[float, ...] = ()
    settings: Dict[str, Any] = field(default_factory=dict)
    mechanism: bool = False  # record the final weights' attention metrics on the validation images (study.mechanism)
    engine: str = ''  # engine_fingerprint() of the code that runs it; not part of the run's identity

    @property
    def output(self) -> Path:
        """``WORK/runs/<label>-<hash>``; the hash covers everything that determines the result (not the label), so
        a finished run is reused by any experiment that needs it, under whatever label it was first run."""
        key = json.dumps([asdict(self.variant), self.data, self.img_size, self.lr, self.seed, self.epochs,
                          self.crop_pct, self.warmup_epochs, RECIPE], sort_keys=True, default=str)
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
                   seed=run.seed, epochs=run.epochs, warmup_epochs=run.warmup_epochs, crop_pct=run.crop_pct,
                   output=str(run.output), resume='auto')


def evaluate_checkpoint(config: 'TrainConfig', checkpoint: Path,
                        evaluations: Sequence[Tuple[str, float]]) -> List[float]:
    """Top-1 of the run's final weights on each ``(split, evaluation crop fraction)``, with the eval transform.

    The training split read this way (centre crop, no augmentation) tells whether a model fits its training set.
    """
    from refiner_vit.data import build_eval_transform, build_loader, open_split, resolve_data
    from refiner_vit.models.resolve import model_data_config, resolve_model
    from refiner_vit.train.engine import evaluate

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    source = resolve_data(config.data)
    model = resolve_model(str(checkpoint)).model
    out = []
    for split, pct in evaluations:
        data_config = model_data_config(model, config.img_size, pct, config.interpolation)
        loader = build_loader(open_split(source, split, build_eval_transform(data_config)), 64, False, 0, 0)
        out.append(round(evaluate(model, loader, torch.device('cpu'))['top1'], 3))
    return out


def _train_top1(run: Run, config: 'TrainConfig') -> float:
    """The final weights' top-1 on the run's training images (computed once, kept in the run folder)."""
    cache = run.output / 'train_top1.json'
    try:
        return float(json.loads(cache.read_text())['top1'])
    except (OSError, ValueError, KeyError, TypeError):
        top1, = evaluate_checkpoint(config, run.output / 'checkpoint-last.pth', [('train', run.crop_pct)])
        cache.write_text(json.dumps(dict(top1=top1, crop_pct=run.crop_pct)) + '\n')
        return top1


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
                  train_top1=_train_top1(run, config), best_top1=summary['best_top1'], params=summary['params'],
                  train_seconds=summary['train_seconds'], output=str(run.output), engine=trained_by,
                  **run.settings)
    if run.crop_pcts:
        crops = evaluate_checkpoint(config, run.output / 'checkpoint-last.pth', [('val', p) for p in run.crop_pcts])
        record['crop_top1'] = {f'{pct:g}': top1 for pct, top1 in zip(run.crop_pcts, crops)}
    if run.mechanism:
        metrics = run_metrics(run.output, run.data)
        record.update(flops=metrics['flops'], mechanism=metrics['layers'])
    return record


def execute_all(runs: Sequence[Run], jobs: int) -> List[Dict[str, Any]]:
    """Run ``runs`` in ``jobs`` processes (one CPU thread each), results in the order given."""
    if jobs <= 1 or len(runs) <= 1:
        return [execute(run) for run in runs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(execute, runs))
