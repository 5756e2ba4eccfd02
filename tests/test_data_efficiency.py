"""benchmarks/data_efficiency.py: variants and their sizes, subsets, aggregation, lr choice, the JSON it writes."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch

from refiner_vit.data.digits import DigitsDataset
from refiner_vit.layers import AttentionRefiner

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'data_efficiency.py'
TINY = dict(embed_dim=16, depth=2, num_heads=2, patch_size=2)


def _load_script():
    spec = importlib.util.spec_from_file_location('data_efficiency', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault('data_efficiency', module)
    spec.loader.exec_module(sys.modules['data_efficiency'])
    return sys.modules['data_efficiency']


de = _load_script()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory) -> Path:
    """10 digits per class for training and 3 for validation, as an ImageFolder of 8x8 PNG files."""
    root = tmp_path_factory.mktemp('tiny_digits')
    for split, per_class in (('train', 10), ('val', 3)):
        dataset, seen = DigitsDataset(split), {}
        for index in range(len(dataset)):
            image, label = dataset[index]
            if seen.get(label, 0) < per_class:
                seen[label] = seen.get(label, 0) + 1
                (root / split / str(label)).mkdir(parents=True, exist_ok=True)
                image.save(root / split / str(label) / f'{index}.png')
    return root


@pytest.fixture(scope='module')
def report(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('study')
    argv = ['--data', str(tiny_folder), '--img-size', '8', '--embed-dim', '16', '--depth', '2', '--num-heads', '2',
            '--seeds', '1', '--epochs', '1', '--lrs', '1e-3', '2e-3', '--jobs', '1', '--work', str(out / 'work'),
            '--json', str(out / 'main.json')]
    assert de.main(argv) == 0
    return json.loads((out / 'main.json').read_text()), out, argv


def test_main_comparison_json_schema_and_chart(report):
    data, out, _ = report
    assert set(data['variants']) == {'vit', 'refiner', 'refiner_vit'}
    for name, agg in data['variants'].items():
        assert set(agg) >= {'top1_mean', 'top1_std', 'runs'}
        assert len(agg['runs']) == 1 and agg['top1_std'] == 0.0
        run = agg['runs'][0]
        assert run['top1'] == agg['top1_mean'] and 0. <= run['top1'] <= 100.
        assert run['seed'] == 0 and run['epochs'] == 1
        assert run['lr'] == data['tuning'][name]['lr'] and set(data['tuning'][name]['tune_top1']) == {'0.001', '0.002'}
        assert data['tuning'][name]['sweep_edge'] in ('lowest', 'highest')  # two rates: the best is an end
    assert data['config']['epochs'] == 1 and '--weight-decay 0.05' in data['config']['recipe']
    assert (out / 'main.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_reported_parameter_counts_are_the_models_built_independently(report):
    data, _, _ = report
    params = {name: agg['runs'][0]['params'] for name, agg in data['variants'].items()}
    arch = dict(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    assert params['vit'] == _params(timm.create_model('deit_tiny_patch16_224', **arch))
    # refiner per block: expand H -> 3H, 3H depthwise 3x3 kernels, reduce 3H -> H (no biases)
    heads, expanded = 2, 6
    assert params['refiner'] - params['vit'] == 2 * (expanded * heads + expanded * 9 + heads * expanded)
    rv = timm.create_model('test_refiner_vit', **arch, stem_chs=(8, 8, 16), aux_head=False)
    assert params['refiner_vit'] == _params(rv)


def test_a_second_invocation_reuses_the_finished_runs(report, monkeypatch):
    data, out, argv = report

    def no_training(args):
        raise AssertionError(f'trained again: {args.output}')

    monkeypatch.setattr('refiner_vit.train.runner.fit', no_training)
    again = out / 'again.json'
    assert de.main([*argv[:-1], str(again)]) == 0
    assert json.loads(again.read_text())['variants'] == data['variants']


def test_aggregate_mean_and_sample_std():
    runs = [dict(top1=90.), dict(top1=92.), dict(top1=97.)]
    agg = de.aggregate(runs)
    assert agg['top1_mean'] == 93.0
    assert agg['top1_std'] == round(math.sqrt((9 + 1 + 16) / 2), 3)  # n - 1 in the denominator
    assert agg['runs'] == runs
    with pytest.raises(ValueError):
        de.aggregate([])


def test_best_lr_prefers_the_higher_score_then_the_smaller_lr():
    assert de.best_lr({5e-4: 80., 1e-3: 91., 2e-3: 85.}) == 1e-3
    assert de.best_lr({5e-4: 91., 1e-3: 91.}) == 5e-4


def test_sweep_edge_flags_a_best_lr_at_either_end():
    swept = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert de.sweep_edge(2.5e-4, swept) == 'lowest'
    assert de.sweep_edge(4e-3, swept) == 'highest'
    assert de.sweep_edge(1e-3, swept) is None
    assert de.sweep_edge(1e-3, [1e-3]) is None  # a single rate is not a sweep


def test_fraction_epochs_keep_the_steps_or_the_epochs():
    assert [de.fraction_epochs(30, pct, 'steps') for pct in (10, 25, 50, 100)] == [300, 120, 60, 30]
    assert [de.fraction_epochs(30, pct, 'epochs') for pct in (10, 25, 50, 100)] == [30, 30, 30, 30]
    with pytest.raises(de.UsageError, match='fractions'):
        de.fraction_epochs(30, 0, 'steps')


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    samples = [(f'/x/{c}/{i}.png', c) for c in 'ab' for i in range(20)] + [('/x/c/0.png', 'c')]
    chosen, rest = de.stratified_subset(samples, 0.25, seed=1)
    assert sorted(chosen + rest) == sorted(samples) and not set(chosen) & set(rest)
    assert [sum(1 for _, c in chosen if c == name) for name in 'abc'] == [5, 5, 1]  # at least one per class
    assert de.stratified_subset(samples, 0.25, seed=1)[0] == chosen
    assert de.stratified_subset(samples, 0.25, seed=2)[0] != chosen


def test_ablation_variants_change_one_setting_of_the_refiner():
    base = de.main_variants(16, 4, 2, 2)
    expansion = de.ablation_variants('expansion', base, 4)
    assert [v.kwargs['refiner_expansion'] for _, v in expansion.values()] == [1, 2, 3, 4, 6]
    assert all(tuned == 'refiner' for tuned, _ in expansion.values())
    placement = de.ablation_variants('placement', base, 4)
    assert placement['first half'][1].kwargs['refiner_blocks'] == [0, 1]
    assert placement['second half'][1].kwargs['refiner_blocks'] == [2, 3]
    assert de.ablation_variants('cos_reg', base, 4)['on'][1].flags == ('--cos-reg', '3')
    identity = de.ablation_variants('init', base, 4)['identity'][1]
    assert identity.model == base['vit'].model and identity.flags == ('--refine', '--refine-init', 'identity')
    assert [v.kwargs['refiner_kernel'] for _, v in de.ablation_variants('kernel', base, 4).values()] == [1, 3, 5, 7]
    assert de.ablation_variants('form', base, 4)['released (BN+ReLU6)'][1].kwargs['refiner_form'] == 'released'
    grid = de.ablation_variants('conv2d', base, 4)['2-D key grid'][1]
    assert grid.model == 'refined_vit_key_grid' and grid.kwargs == base['refiner'].kwargs


def test_key_grid_variant_puts_the_2d_refiner_in_every_block():
    model = timm.create_model('refined_vit_key_grid', img_size=8, **TINY, num_classes=10)
    refiners = [b.attn.refiner for b in model.blocks]
    assert all(isinstance(r, AttentionRefiner) and r.key_grid == (4, 4) for r in refiners)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_run_folder_depends_on_the_settings_not_the_label(tmp_path):
    variant = de.main_variants(16, 2, 2, 2)['refiner']
    run = de.Run('refiner', variant, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path))
    run.output.mkdir(parents=True)
    assert de.Run('r=3', variant, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path)).output == run.output
    assert de.Run('refiner', variant, 'digits', 8, 1e-3, 1, 1, 0.9, str(tmp_path)).output != run.output
    other = variant.with_kwargs(refiner_kernel=5)
    assert de.Run('refiner', other, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path)).output != run.output


def test_a_reused_run_trained_by_other_code_is_reported_stale(report, capsys):
    data, out, argv = report
    assert data['stale_runs'] == [] and len(data['config']['engine']) == 12
    assert all(run['engine'] == data['config']['engine'] for agg in data['variants'].values() for run in agg['runs'])
    reused = Path(data['variants']['vit']['runs'][0]['output'])
    (reused / 'engine.txt').write_text('0123456789ab\n')  # as if an older engine had trained it
    try:
        assert de.main(argv[:-1] + [str(out / 'stale.json')]) == 0  # everything reused, nothing retrained
    finally:
        (reused / 'engine.txt').write_text(data['config']['engine'] + '\n')
    again = json.loads((out / 'stale.json').read_text())
    assert again['stale_runs'] == [str(reused)]
    assert again['variants']['vit']['runs'][0]['engine'] == '0123456789ab'
    assert 'trained by other code' in capsys.readouterr().err


def test_retuned_ablation_settings_each_get_their_own_sweep(report):
    main, out, argv = report
    argv = argv[:-1] + [str(out / 'placement.json'), '--ablation', 'placement', '--retune-ablations']
    assert de.main(argv) == 0
    data = json.loads((out / 'placement.json').read_text())
    assert set(data['variants']) == {'first half', 'second half', 'all blocks'}
    for label, agg in data['variants'].items():
        assert set(data['tuning'][label]['tune_top1']) == {'0.001', '0.002'}
        assert agg['runs'][0]['lr'] == data['tuning'][label]['lr']
    assert data['tuning']['all blocks'] == main['tuning']['refiner']  # the same variant: the same (reused) runs


def test_fraction_runs_evaluated_at_other_crops(report):
    _, out, argv = report
    argv = argv[:-1] + [str(out / 'fraction_crops.json'), '--ablation', 'fraction_crop_pct', '--fractions', '50',
                        '--crop-pcts', '0.9', '1.0']
    assert de.main(argv) == 0
    data = json.loads((out / 'fraction_crops.json').read_text())
    assert set(data['variants']) == {f'{n} 50% crop {c}' for n in ('vit', 'refiner') for c in ('0.9', '1')}
    for name in ('vit', 'refiner'):
        for run in data['variants'][f'{name} 50% crop 0.9']['runs']:  # 0.9 is the crop the run evaluated with
            assert run['top1'] == json.loads((Path(run['output']) / 'summary.json').read_text())['top1']
            assert run['fraction'] == 50 and run['crop_pct'] == 0.9
    assert (out / 'fraction_crops.png').read_bytes()[:4] == b'\x89PNG'
    assert de._series('vit 50% crop 1', 'fraction') == 'vit crop 1' and de._series('vit crop 1', 'crop_pct') == 'vit'


def test_a_subset_keeps_its_data_order_wherever_the_work_folder_is(tiny_folder, tmp_path):
    samples = de.list_images(tiny_folder / 'train')
    subset, _ = de.stratified_subset(samples, 0.5, seed=1)
    orders = []
    for work in (tmp_path / 'a', tmp_path / 'somewhere' / 'else'):
        root = de.make_subset_root(work, 'half', subset, de.list_images(tiny_folder / 'val'))
        orders.append([(Path(path).name, name) for path, name in de.list_images(root / 'train')])
    assert orders[0] == orders[1]  # same order: the same seed sees the same batches in both
    expected = sorted((Path(path).name, name) for path, name in subset)
    assert sorted(orders[0]) == expected and len(orders[0]) == len(subset)


def test_lr_grid_runs_every_variant_at_every_rate(report):
    _, out, argv = report
    assert de.main(argv[:-1] + [str(out / 'grid.json'), '--ablation', 'lr_grid']) == 0
    data = json.loads((out / 'grid.json').read_text())
    names = ('vit', 'refiner', 'refiner_vit')
    assert set(data['variants']) == {f'{n} lr={lr}' for n in names for lr in ('0.001', '0.002')}
    for label, agg in data['variants'].items():
        run = agg['runs'][0]
        assert run['lr'] == run['swept_lr'] == float(label.split('lr=')[1])
    # the main comparison's runs are the grid's runs at the tuned rates (reused, not retrained)
    main = json.loads((out / 'main.json').read_text())
    for name, tuned in main['tuning'].items():
        assert data['variants'][f'{name} lr={tuned["lr"]:g}']['top1_mean'] == main['variants'][name]['top1_mean']
    assert (out / 'grid.png').read_bytes()[:4] == b'\x89PNG'
