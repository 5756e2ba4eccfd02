"""Aggregation over seeds, the printed tables (the decomposition's step-by-step attribution, the grid summary)
and the charts of the study."""
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .mechanism import METRICS, block_metrics
from .variants import DECOMPOSITION_STEPS

Aggregates = Dict[str, Dict[str, Any]]  # label -> aggregate() of its runs
# Steps whose differences a grid summary tabulates: the decomposition's, and the whole gap.
EFFECTS = DECOMPOSITION_STEPS + (('total: ViT -> Refiner-ViT', 'vit', 'refiner_vit'),)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return (round(statistics.fmean(values), 3),
            round(statistics.stdev(values), 3) if len(values) > 1 else 0.0)


def aggregate(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Validation (``top1``) and training-set (``train_top1``) top-1 over runs: mean and sample std, with the runs."""
    if not records:
        raise ValueError('aggregate() needs at least one run')
    out: Dict[str, Any] = {}
    for key in ('top1', 'train_top1'):
        if all(key in r for r in records):
            out[f'{key}_mean'], out[f'{key}_std'] = _mean_std([float(r[key]) for r in records])
    return dict(out, runs=list(records))


def aggregate_by_label(records: Sequence[Dict[str, Any]]) -> Aggregates:
    """``label -> aggregate`` of the records, labels in the order they first appear."""
    labels = dict.fromkeys(r['label'] for r in records)
    return {label: aggregate([r for r in records if r['label'] == label]) for label in labels}


def format_table(variants: Aggregates) -> str:
    """A fixed-width table: variant, parameters, MFLOPs per image (where measured), lr, validation and training
    top-1 (mean ± std), seeds, s/run."""
    lines = [f'{"variant":<24} {"params":>9} {"MFLOPs":>7} {"lr":>8} {"val top-1 (%)":>15} {"train top-1 (%)":>15} '
             f'{"seeds":>5} {"s/run":>6}']
    for name, agg in variants.items():
        runs = agg['runs']
        seconds = statistics.fmean(r['train_seconds'] for r in runs)
        train = (f'{agg["train_top1_mean"]:>7.2f} ± {agg["train_top1_std"]:<5.2f}' if 'train_top1_mean' in agg
                 else f'{"-":>15}')
        flops = f'{runs[0]["flops"] / 1e6:>7.2f}' if 'flops' in runs[0] else f'{"-":>7}'
        lines.append(f'{name:<24} {runs[0]["params"]:>9,} {flops} {runs[0]["lr"]:>8.2g} '
                     f'{agg["top1_mean"]:>7.2f} ± {agg["top1_std"]:<5.2f} {train} {len(runs):>5} {seconds:>6.0f}')
    return '\n'.join(lines)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


def mechanism_summary(variants: Aggregates) -> Dict[str, Dict[str, Any]]:
    """``label -> {'raw' | 'used': {metric: {'blocks': mean over blocks and seeds, 'deepest': the last block's mean
    over seeds, 'per_block': mean over seeds per block}}}`` of the runs that recorded the attention metrics
    (:mod:`study.mechanism`; ``used`` is the map multiplied with V)."""
    out: Dict[str, Dict[str, Any]] = {}
    for label, agg in variants.items():
        runs = [r['mechanism'] for r in agg['runs'] if 'mechanism' in r]
        if not runs:
            continue
        out[label] = {}
        for which in ('raw', 'used'):
            out[label][which] = {}
            for metric in METRICS:
                per_run = [block_metrics(layers, which, metric) for layers in runs]
                per_block = [_mean(values) for values in zip(*per_run)]
                out[label][which][metric] = dict(blocks=_mean([v for r in per_run for v in r]),
                                                 deepest=per_block[-1], per_block=per_block)
    return out


def _cell(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.3f}'


def format_mechanism(summary: Dict[str, Dict[str, Any]]) -> str:
    """Variant x metric, for the map multiplied with V and the raw softmax map: the mean over blocks and seeds,
    then the deepest block alone."""
    short = dict(head_similarity='head sim', mean_distance='distance', entropy='entropy',
                 layer_similarity='prev-block sim')
    lines = []
    for part in ('blocks', 'deepest'):
        lines.append(f'{"(mean over blocks and seeds)" if part == "blocks" else "(deepest block, mean over seeds)"}')
        lines.append(f'{"variant":<24} ' + ' '.join(f'{short[m] + " used/raw":>22}' for m in METRICS))
        for label, maps in summary.items():
            cells = [f'{_cell(maps["used"][m][part]):>10} / {_cell(maps["raw"][m][part]):<9}' for m in METRICS]
            lines.append(f'{label:<24} ' + ' '.join(f'{c:>22}' for c in cells))
    return '\n'.join(lines)


def plot_mechanism(summary: Dict[str, Dict[str, Any]], title: str, path: Path) -> None:
    """Each metric against depth, one colour per variant: the map multiplied with V (solid), the raw softmax map
    (dotted, where the block refines it)."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colours = plt.get_cmap('tab20').colors
    for ax, metric in zip(axes.flatten(), METRICS):
        for colour, (label, maps) in zip(colours, summary.items()):
            used, raw = maps['used'][metric]['per_block'], maps['raw'][metric]['per_block']
            blocks = range(len(used))
            ax.plot(blocks, [float('nan') if v is None else v for v in used], 'o-', color=colour, ms=3, label=label)
            if raw != used:
                ax.plot(blocks, [float('nan') if v is None else v for v in raw], ':', color=colour)
        ax.set(title=metric.replace('_', ' '), xlabel='block')
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc='lower center', ncol=min(6, len(names)), fontsize=8)
    fig.suptitle(f'{title} (solid: map multiplied with V; dotted: raw softmax map)', fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def paired_difference(before: Dict[str, Any], after: Dict[str, Any], key: str = 'top1'
                      ) -> Optional[Tuple[float, float]]:
    """Mean and sample std over seeds of ``after - before`` (runs paired by seed); None without common seeds."""
    first = {r['seed']: float(r[key]) for r in before['runs'] if key in r}
    deltas = [float(r[key]) - first[r['seed']] for r in after['runs'] if key in r and r['seed'] in first]
    return _mean_std(deltas) if deltas else None


def effects(variants: Aggregates, steps: Sequence[Tuple[str, str, str]] = EFFECTS) -> List[Dict[str, Any]]:
    """One row per step whose two variants were run: each side's numbers and the paired differences."""
    rows = []
    for step, before, after in steps:
        if before not in variants or after not in variants:
            continue
        a, b = variants[before], variants[after]
        rows.append(dict(
            step=step, before=before, after=after, top1=b['top1_mean'], top1_std=b['top1_std'],
            delta=paired_difference(a, b), train_top1=b.get('train_top1_mean'),
            train_delta=paired_difference(a, b, 'train_top1'),
            params_delta=b['runs'][0]['params'] - a['runs'][0]['params'], lr=b['runs'][0]['lr'],
        ))
    return rows


def _signed(pair: Optional[Tuple[float, float]]) -> str:
    return '-' if pair is None else f'{pair[0]:+.2f} ± {pair[1]:.2f}'


def format_attribution(variants: Aggregates) -> str:
    """The vit -> refiner_vit gap step by step: each step's model, its top-1 and what the step changed (paired by
    seed), validation and training set, and the parameters it adds."""
    lines = [f'{"step":<52} {"model after the step":<24} {"lr":>7} {"val top-1":>15} {"Δ val":>15} '
             f'{"train top-1":>11} {"Δ train":>15} {"Δ params":>9}']
    for row in effects(variants):
        train = '-' if row['train_top1'] is None else f'{row["train_top1"]:.2f}'
        lines.append(f'{row["step"]:<52} {row["after"]:<24} {row["lr"]:>7.2g} '
                     f'{row["top1"]:>7.2f} ± {row["top1_std"]:<5.2f} {_signed(row["delta"]):>15} {train:>11} '
                     f'{_signed(row["train_delta"]):>15} {row["params_delta"]:>+9,}')
    return '\n'.join(lines)


def grid_summary(per_grid: Dict[str, Aggregates]) -> Dict[str, Dict[str, Any]]:
    """``step -> {grid: paired validation difference [mean, std]}`` over the grids a study ran."""
    out: Dict[str, Dict[str, Any]] = {}
    for grid, variants in per_grid.items():
        for row in effects(variants):
            out.setdefault(row['step'], {})[grid] = row['delta']
    return out


def format_grid_summary(summary: Dict[str, Dict[str, Any]], grids: Sequence[str]) -> str:
    """How each effect changes with the token grid: one column per grid, paired difference in points."""
    lines = [f'{"effect (Δ val top-1, points)":<52} ' + ' '.join(f'{g:>15}' for g in grids)]
    for step, by_grid in summary.items():
        lines.append(f'{step:<52} ' + ' '.join(f'{_signed(by_grid.get(g)):>15}' for g in grids))
    return '\n'.join(lines)


CURVE_SETTINGS = ('fraction', 'crop_pct', 'swept_lr')  # run settings that make a sweep a curve rather than bars


def _series(label: str, setting: str) -> str:
    """The curve a row belongs to: its label without the x value (``vit 10% crop 1`` -> ``vit crop 1``)."""
    if setting == 'fraction':
        return ' '.join(token for token in label.split() if not token.endswith('%'))
    return label.split(' crop ')[0] if setting == 'crop_pct' else label.split(' lr=')[0]


def plot(variants: Aggregates, title: str, path: Path) -> None:
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


def _bars(plt: Any, variants: Aggregates, title: str) -> Any:
    """Validation top-1 per variant (bars, ±1 std, one dot per seed) and the training-set top-1 (hollow marks)."""
    names = list(variants)
    fig, ax = plt.subplots(figsize=(max(4., 1.2 * len(names) + 1.5), 3.6))
    means = [variants[n]['top1_mean'] for n in names]
    ax.bar(range(len(names)), means, yerr=[variants[n]['top1_std'] for n in names], capsize=4, color='#8fb3d9')
    for i, name in enumerate(names):
        ax.plot([i] * len(variants[name]['runs']), [r['top1'] for r in variants[name]['runs']], 'k.', ms=4)
    trained = [i for i, n in enumerate(names) if 'train_top1_mean' in variants[n]]
    if trained:
        ax.plot(trained, [variants[names[i]]['train_top1_mean'] for i in trained], 'v', mfc='none', mec='#c0392b',
                ls='none', label='training set')
        ax.legend(loc='lower right', fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha='right' if len(names) > 4
                  else 'center')
    low = min(min(r['top1'] for r in variants[n]['runs']) for n in names)
    ax.set_ylim(max(0., low - 10.), 100.)
    ax.set(ylabel='top-1 (%)', title=title)
    fig.tight_layout()
    return fig
