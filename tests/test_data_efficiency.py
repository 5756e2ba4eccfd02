"""benchmarks/data_efficiency.py (the ``study`` package): variants and their sizes, subsets, aggregation, lr choice
and its extension, training-set accuracy, the decomposition, token grids, the JSON it writes."""
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch

from refiner_vit.data.digits import DigitsDataset
from refiner_vit.errors import ConfigError, UsageError

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))
from study import cli, experiments, runs, variants  # noqa: E402
from study import data as study_data  # noqa: E402
from study import report as study_report  # noqa: E402
from study.key_grid import KeyGridRefiner  # noqa: E402

TINY = dict(embed_dim=16, depth=2, num_heads=2, patch_size=2)


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
    assert cli.main(argv) == 0
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
        tuned = data['tuning'][name]
        # two rates: the best is an end, and the sweep is extended once beyond it
        assert tuned['extended_to'] in (5e-4, 4e-3) and set(tuned['tune_top1']) == {'0.001', '0.002',
                                                                                    f'{tuned["extended_to"]:g}'}
        assert run['lr'] == tuned['lr'] and tuned['sweep_edge'] == experiments.sweep_edge(
            tuned['lr'], [1e-3, 2e-3, tuned['extended_to']])
        assert 0. <= run['train_top1'] <= 100. and set(tuned['tune_train_top1']) == set(tuned['tune_top1'])
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
    assert cli.main([*argv[:-1], str(again)]) == 0
    assert json.loads(again.read_text())['variants'] == data['variants']


def test_the_study_keeps_freed_memory_before_any_run(report, monkeypatch):
    """Like ``refiner train``; set before the runs start, since the workers fork from this process and inherit it."""
    _, out, argv = report
    calls = []

    class StopError(Exception):
        pass

    def first_study(*args):
        calls.append('study')
        raise StopError  # enough: the policy had to be in place by now

    monkeypatch.setattr(cli, 'keep_freed_memory', lambda: calls.append('keep_freed_memory') or True)
    monkeypatch.setattr(cli, 'Study', first_study)
    with pytest.raises(StopError):
        cli.main([*argv[:-1], str(out / 'unused.json')])
    assert calls == ['keep_freed_memory', 'study']


def test_aggregate_mean_and_sample_std():
    runs = [dict(top1=90.), dict(top1=92.), dict(top1=97.)]
    agg = study_report.aggregate(runs)
    assert agg['top1_mean'] == 93.0
    assert agg['top1_std'] == round(math.sqrt((9 + 1 + 16) / 2), 3)  # n - 1 in the denominator
    assert agg['runs'] == runs
    with pytest.raises(ValueError):
        study_report.aggregate([])


def test_best_lr_prefers_the_higher_score_then_the_smaller_lr():
    assert experiments.best_lr({5e-4: 80., 1e-3: 91., 2e-3: 85.}) == 1e-3
    assert experiments.best_lr({5e-4: 91., 1e-3: 91.}) == 5e-4


def test_sweep_edge_flags_a_best_lr_at_either_end():
    swept = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert experiments.sweep_edge(2.5e-4, swept) == 'lowest'
    assert experiments.sweep_edge(4e-3, swept) == 'highest'
    assert experiments.sweep_edge(1e-3, swept) is None
    assert experiments.sweep_edge(1e-3, [1e-3]) is None  # a single rate is not a sweep


def test_fraction_epochs_keep_the_steps_or_the_epochs():
    assert [experiments.fraction_epochs(30, pct, 'steps') for pct in (10, 25, 50, 100)] == [300, 120, 60, 30]
    assert [experiments.fraction_epochs(30, pct, 'epochs') for pct in (10, 25, 50, 100)] == [30, 30, 30, 30]
    with pytest.raises(ConfigError, match='fractions'):
        experiments.fraction_epochs(30, 0, 'steps')


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    samples = [(f'/x/{c}/{i}.png', c) for c in 'ab' for i in range(20)] + [('/x/c/0.png', 'c')]
    chosen, rest = study_data.stratified_subset(samples, 0.25, seed=1)
    assert sorted(chosen + rest) == sorted(samples) and not set(chosen) & set(rest)
    assert [sum(1 for _, c in chosen if c == name) for name in 'abc'] == [5, 5, 1]  # at least one per class
    assert study_data.stratified_subset(samples, 0.25, seed=1)[0] == chosen
    assert study_data.stratified_subset(samples, 0.25, seed=2)[0] != chosen


def test_ablation_variants_change_one_setting_of_the_refiner():
    base = variants.main_variants(16, 4, 2, 2)
    expansion = variants.ablation_variants('expansion', base, 4)
    assert [v.kwargs['refiner_expansion'] for _, v in expansion.values()] == [1, 2, 3, 4, 6]
    assert all(tuned == 'refiner' for tuned, _ in expansion.values())
    placement = variants.ablation_variants('placement', base, 4)
    assert placement['first half'][1].kwargs['refiner_blocks'] == [0, 1]
    assert placement['second half'][1].kwargs['refiner_blocks'] == [2, 3]
    assert variants.ablation_variants('cos_reg', base, 4)['on'][1].flags == ('--cos-reg', '3')
    identity = variants.ablation_variants('init', base, 4)['identity'][1]
    assert identity.model == base['vit'].model and identity.flags == ('--refine', '--refine-init', 'identity')
    kernel = variants.ablation_variants('kernel', base, 4)
    assert [v.kwargs['refiner_kernel'] for _, v in kernel.values()] == [1, 3, 5, 7]
    assert variants.ablation_variants('form', base, 4)['released (BN+ReLU6)'][1].kwargs['refiner_form'] == 'released'
    grid = variants.ablation_variants('conv2d', base, 4)['2-D key grid'][1]
    assert grid.model == 'refined_vit_key_grid' and grid.kwargs == base['refiner'].kwargs


def test_key_grid_variant_puts_the_2d_refiner_in_every_block():
    model = timm.create_model('refined_vit_key_grid', img_size=8, **TINY, num_classes=10)
    refiners = [b.attn.refiner for b in model.blocks]
    assert all(isinstance(r, KeyGridRefiner) and r.key_grid == (4, 4) for r in refiners)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_run_folder_depends_on_the_settings_not_the_label(tmp_path):
    variant = variants.main_variants(16, 2, 2, 2)['refiner']
    run = runs.Run('refiner', variant, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path))
    run.output.mkdir(parents=True)
    assert runs.Run('r=3', variant, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path)).output == run.output
    assert runs.Run('refiner', variant, 'digits', 8, 1e-3, 1, 1, 0.9, str(tmp_path)).output != run.output
    other = variant.with_kwargs(refiner_kernel=5)
    assert runs.Run('refiner', other, 'digits', 8, 1e-3, 0, 1, 0.9, str(tmp_path)).output != run.output


def test_a_reused_run_trained_by_other_code_is_reported_stale(report, capsys):
    data, out, argv = report
    assert data['stale_runs'] == [] and len(data['config']['engine']) == 12
    assert all(run['engine'] == data['config']['engine'] for agg in data['variants'].values() for run in agg['runs'])
    reused = Path(data['variants']['vit']['runs'][0]['output'])
    (reused / 'engine.txt').write_text('0123456789ab\n')  # as if an older engine had trained it
    try:
        assert cli.main(argv[:-1] + [str(out / 'stale.json')]) == 0  # everything reused, nothing retrained
    finally:
        (reused / 'engine.txt').write_text(data['config']['engine'] + '\n')
    again = json.loads((out / 'stale.json').read_text())
    assert again['stale_runs'] == [str(reused)]
    assert again['variants']['vit']['runs'][0]['engine'] == '0123456789ab'
    assert 'trained by other code' in capsys.readouterr().err


def test_retuned_ablation_settings_each_get_their_own_sweep(report):
    main, out, argv = report
    argv = argv[:-1] + [str(out / 'placement.json'), '--ablation', 'placement', '--retune-ablations']
    assert cli.main(argv) == 0
    data = json.loads((out / 'placement.json').read_text())
    assert set(data['variants']) == {'first half', 'second half', 'all blocks'}
    for label, agg in data['variants'].items():
        assert set(data['tuning'][label]['tune_top1']) >= {'0.001', '0.002'}
        assert agg['runs'][0]['lr'] == data['tuning'][label]['lr']
    assert data['tuning']['all blocks'] == main['tuning']['refiner']  # the same variant: the same (reused) runs


def test_fraction_runs_evaluated_at_other_crops(report):
    _, out, argv = report
    argv = argv[:-1] + [str(out / 'fraction_crops.json'), '--ablation', 'fraction_crop_pct', '--fractions', '50',
                        '--crop-pcts', '0.9', '1.0']
    assert cli.main(argv) == 0
    data = json.loads((out / 'fraction_crops.json').read_text())
    assert set(data['variants']) == {f'{n} 50% crop {c}' for n in ('vit', 'refiner') for c in ('0.9', '1')}
    for name in ('vit', 'refiner'):
        for run in data['variants'][f'{name} 50% crop 0.9']['runs']:  # 0.9 is the crop the run evaluated with
            assert run['top1'] == json.loads((Path(run['output']) / 'summary.json').read_text())['top1']
            assert run['fraction'] == 50 and run['crop_pct'] == 0.9
    assert (out / 'fraction_crops.png').read_bytes()[:4] == b'\x89PNG'
    assert study_report._series('vit 50% crop 1', 'fraction') == 'vit crop 1'
    assert study_report._series('vit crop 1', 'crop_pct') == 'vit'


def test_a_subset_keeps_its_data_order_wherever_the_work_folder_is(tiny_folder, tmp_path):
    samples = study_data.list_images(tiny_folder / 'train')
    subset, _ = study_data.stratified_subset(samples, 0.5, seed=1)
    orders = []
    for work in (tmp_path / 'a', tmp_path / 'somewhere' / 'else'):
        root = study_data.make_subset_root(work, 'half', subset, study_data.list_images(tiny_folder / 'val'))
        orders.append([(Path(path).name, name) for path, name in study_data.list_images(root / 'train')])
    assert orders[0] == orders[1]  # same order: the same seed sees the same batches in both
    expected = sorted((Path(path).name, name) for path, name in subset)
    assert sorted(orders[0]) == expected and len(orders[0]) == len(subset)


def test_lr_grid_runs_every_variant_at_every_rate(report):
    _, out, argv = report
    main = json.loads((out / 'main.json').read_text())
    rates = sorted({1e-3, 2e-3} | {tuned['lr'] for tuned in main['tuning'].values()})  # the tuned ones included
    argv = argv[:argv.index('--lrs')] + ['--lrs', *map(str, rates)] + argv[argv.index('--jobs'):-1]
    assert cli.main(argv + [str(out / 'grid.json'), '--ablation', 'lr_grid']) == 0
    data = json.loads((out / 'grid.json').read_text())
    names = ('vit', 'refiner', 'refiner_vit')
    assert set(data['variants']) == {f'{n} lr={lr:g}' for n in names for lr in rates}
    for label, agg in data['variants'].items():
        run = agg['runs'][0]
        assert run['lr'] == run['swept_lr'] == float(label.split('lr=')[1])
    # the main comparison's runs are the grid's runs at the tuned rates (reused, not retrained)
    for name, tuned in main['tuning'].items():
        assert data['variants'][f'{name} lr={tuned["lr"]:g}']['top1_mean'] == main['variants'][name]['top1_mean']
    assert (out / 'grid.png').read_bytes()[:4] == b'\x89PNG'


def test_a_best_rate_at_an_end_extends_the_sweep_by_a_factor_of_two():
    swept = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert experiments.extension(4e-3, swept) == 8e-3
    assert experiments.extension(2.5e-4, swept) == 1.25e-4
    assert experiments.extension(1e-3, swept) is None
    assert experiments.extension(1e-3, [1e-3]) is None  # a single rate is not a sweep: nothing to extend


def test_training_accuracy_is_the_final_weights_on_the_training_images(tiny_folder, tmp_path):
    samples = study_data.list_images(tiny_folder / 'train')
    same = study_data.make_subset_root(tmp_path, 'same', samples, samples)  # validation = the training images
    variant = variants.main_variants(16, 2, 2, 2)['vit']
    record = runs.execute(runs.Run('vit', variant, str(same), 8, 2e-3, 0, 2, 0.9, str(tmp_path), 0.))
    assert record['train_top1'] == record['top1']  # eval transform, final weights: the validation number again
    cached = json.loads((Path(record['output']) / 'train_top1.json').read_text())
    assert cached == dict(top1=record['train_top1'], crop_pct=0.9)


def test_effects_are_paired_by_seed():
    def agg(name, values, train, params):
        return study_report.aggregate([dict(label=name, seed=s, top1=v, train_top1=t, params=params, lr=1e-3)
                                       for s, (v, t) in enumerate(zip(values, train))])
    table = {'vit': agg('vit', [80., 90.], [85., 95.], 100), 'vit_conv_stem': agg('vit_conv_stem', [83., 91.],
                                                                                  [90., 99.], 150)}
    rows = study_report.effects(table)
    assert [r['step'] for r in rows] == ['stem: patch projection -> conv stem']  # only steps with both sides
    row = rows[0]
    assert row['delta'] == (2.0, round(math.sqrt(2.), 3)) and row['train_delta'] == (4.5, round(math.sqrt(.5), 3))
    assert row['params_delta'] == 50 and row['top1'] == 87.0 and row['train_top1'] == 94.5
    assert 'stem: patch projection -> conv stem' in study_report.format_attribution(table)


@pytest.mark.slow
def test_decomposition_attributes_the_gap_step_by_step(report, capsys):
    _, out, argv = report
    assert cli.main(argv[:-1] + [str(out / 'decomposition.json'), '--ablation', 'decomposition']) == 0
    data = json.loads((out / 'decomposition.json').read_text())
    assert list(data['variants']) == list(variants.DECOMPOSITION)
    assert set(data['tuning']) == set(variants.DECOMPOSITION)  # the same sweep for every model
    assert [row['step'] for row in data['effects']] == [step for step, _, _ in study_report.EFFECTS]
    printed = capsys.readouterr().out
    for step, _, after in variants.DECOMPOSITION_STEPS:
        assert step in printed
        assert data['variants'][after]['runs'][0]['lr'] == data['tuning'][after]['lr']
    params = {name: agg['runs'][0]['params'] for name, agg in data['variants'].items()}
    table = variants.decomposition_variants(variants.main_variants(16, 2, 2, 2))
    for name, variant in table.items():  # each row is the registered model / kwargs a user can train
        model = timm.create_model(variant.model, img_size=8, num_classes=10, **variant.kwargs)
        assert params[name] == sum(p.numel() for p in model.parameters()), name


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vit_conv_stem', 'vit_conv_stem_refiner', 'refiner_vit_no_sharing',
                                  'refiner_vit_no_refiner'])
def test_decomposition_variant_round_trips_through_refiner_train(tiny_folder, tmp_path, name):
    from refiner_vit.cli import main
    from refiner_vit.models import resolve_model

    variant = variants.decomposition_variants(variants.main_variants(16, 2, 2, 2))[name]
    model_flags = ['--model', variant.model, '--model-kwargs', *(f'{k}={v!r}' for k, v in variant.kwargs.items()),
                   *variant.flags]
    out = tmp_path / 'run'
    assert main(['train', '--data', str(tiny_folder), '--img-size', '8', *model_flags, '--epochs', '1',
                 '--batch-size', '100', '--output', str(out), '--no-progress', '--no-tensorboard']) == 0
    config = json.loads((out / 'best' / 'config.json').read_text())
    assert config['architecture'] == variant.model
    assert {k: config['model_args'][k] for k in variant.kwargs} == json.loads(json.dumps(variant.kwargs))
    for target in (out / 'best', out / 'checkpoint-last.pth'):
        model = resolve_model(str(target)).model
        fresh = timm.create_model(variant.model, img_size=8, num_classes=10, **variant.kwargs)
        assert type(model) is type(fresh)
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in
                                                                        fresh.state_dict().items()}
    trained = torch.load(out / 'checkpoint-last.pth', weights_only=True)['model']
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_token_grids_each_run_and_are_summarised(report, capsys):
    _, out, argv = report
    argv = argv[:-1] + [str(out / 'grids.json'), '--patch-sizes', '2', '4', '--lrs', '1e-3']
    assert cli.main(argv) == 0
    per_grid = {g: json.loads((out / f'grids_{g}.json').read_text()) for g in ('4x4', '2x2')}
    assert {g: r['patch_size'] for g, r in per_grid.items()} == {'4x4': 2, '2x2': 4}
    assert all(set(r['variants']) == set(variants.MAIN_VARIANTS) for r in per_grid.values())
    summary = json.loads((out / 'grids_grids.json').read_text())
    assert summary['grids'] == ['4x4', '2x2']
    refiner = summary['effects']['(paper refiner on the ViT)']
    for grid, result in per_grid.items():
        vit, ref = (result['variants'][n]['runs'][0]['top1'] for n in ('vit', 'refiner'))
        assert refiner[grid] == [round(ref - vit, 3), 0.0]  # one seed: the difference itself
    assert 'how the effects change with the token grid' in capsys.readouterr().out


def test_patch_sizes_the_conv_stem_cannot_take_are_refused_before_training(tmp_path):
    with pytest.raises(UsageError, match='--patch-sizes 3: every patch size must be even'):
        cli.main(['--img-size', '12', '--patch-sizes', '3', '--work', str(tmp_path)])
    assert not (tmp_path / 'runs').exists()


def test_the_script_is_still_the_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['data_efficiency.py', '--patch-sizes', '5', '--work', str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCHMARKS / 'data_efficiency.py'), run_name='__main__')
    assert done.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        'error: --patch-sizes 5: every patch size must be even, >= 2 (the conv stem has stride 2) and divide '
        '--img-size 16']


def test_engine_fingerprint_covers_c_and_h_sources_anywhere_in_the_package(tmp_path, monkeypatch):
    import refiner_vit

    package = tmp_path / 'refiner_vit'
    (package / 'ops' / 'kernels').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    sources = [package / 'ops' / 'kernels' / 'k.c', package / 'ops' / 'k.h', package / 'ops' / 'x.py']
    for path in sources:
        path.write_text('1\n')
    (package / 'notes.txt').write_text('1\n')
    monkeypatch.setattr(refiner_vit, '__file__', str(package / '__init__.py'))
    first = runs.engine_fingerprint()
    (package / 'notes.txt').write_text('2\n')
    assert runs.engine_fingerprint() == first  # not a source
    for path in sources:
        path.write_text('2\n')
        changed = runs.engine_fingerprint()
        assert changed != first, path
        first = changed


def test_defaults_train_on_a_grid_of_at_least_7x7_for_100_epochs():
    opts = cli.build_arg_parser().parse_args(['--data', 'mnist5k'])
    cli._check(opts)
    assert (opts.img_size, opts.patch_sizes, opts.epochs, opts.warmup_epochs) == (28, [4], 100, 5.)
    assert [size // cli.default_patch_size(size) for size in (16, 28, 32)] == [8, 7, 8]
