"""The typed training config: every shipped recipe parses, the command line wins over the file, a run's
config.yaml round-trips, and bad values are named."""
import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml

import refiner_vit
from refiner_vit.cli import main
from refiner_vit.train.config import TrainConfig, load_yaml_config, parse_train_config

RECIPES = sorted((Path(refiner_vit.__file__).parent / 'recipes').glob('*.yaml'))


def _resolve(argv):
    return parse_train_config(argv)


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {'digits', 'small_data', 'imagenet_refiner_s', 'imagenet_refiner_m', 'imagenet_refiner_l',
            'imagenet_refiner_s_token_label', 'finetune_384', 'finetune_l_448'} <= names


@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_into_valid_flags(recipe):
    args = _resolve(['--config', str(recipe)])
    values = load_yaml_config(recipe)
    assert values, 'empty recipe'
    for key, value in values.items():
        assert getattr(args, key) == value, key
    if 'model' in values:
        import timm
        assert timm.is_model(args.model)


def test_imagenet_recipe_is_the_authors():
    args = _resolve(['--config', str(RECIPES[0].parent / 'imagenet_refiner_l_token_label.yaml')])
    assert (args.model, args.epochs, args.cooldown_epochs, args.lr, args.cos_reg) == (
        'refiner_vit_l_patch16_224', 300, 10, 5e-4, 12)
    assert (args.dense_weight, args.mix_token, args.drop_path, args.model_ema_decay) == (0.5, True, 0.25, 0.99996)


def test_command_line_beats_file_beats_default(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump({'epochs': 7, 'lr-base': 1e-3, 'batch_size': 8}))
    args = _resolve(['--config', str(config), '--epochs', '30'])
    assert (args.epochs, args.lr_base, args.batch_size, args.seed) == (30, 1e-3, 8, 42)


@pytest.mark.parametrize('content, message', [
    ({'epochz': 3}, "unknown setting 'epochz'"),
    ({'amp': 'fp8'}, "amp: 'fp8' is not one of"),
    ({'scale': 0.5}, 'scale must be a list'),
    ({'model_ema': 'yes'}, 'model_ema must be true or false'),
])
def test_bad_config_values_are_named(tmp_path, content, message):
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message):
        _resolve(['--config', str(config)])


def test_shipped_recipes_load_by_name():
    assert load_yaml_config('digits') == load_yaml_config(RECIPES[0].parent / 'digits.yaml')
    with pytest.raises(ValueError, match='no such file'):
        load_yaml_config('no_such_recipe')


def test_base_files_chain_and_cycles_are_refused(tmp_path):
    (tmp_path / 'a.yaml').write_text('base: b.yaml\nepochs: 3\n')
    (tmp_path / 'b.yaml').write_text('epochs: 9\nseed: 1\n')
    assert load_yaml_config(tmp_path / 'a.yaml') == {'epochs': 3, 'seed': 1}
    (tmp_path / 'b.yaml').write_text('base: a.yaml\n')
    with pytest.raises(ValueError, match='include each other'):
        load_yaml_config(tmp_path / 'a.yaml')


def test_refine_starts_random_from_scratch_and_as_identity_when_fine_tuning(tmp_path):
    """The init ablation of docs/reproduction.md: identity hurts from scratch, so it is kept for fine-tuning."""
    import torch
    from safetensors.torch import save_file

    from refiner_vit.train.model_builder import build_model

    common = ['--model', 'vit_tiny_patch16_224', '--refine', '--model-kwargs', 'img_size=16', 'patch_size=4',
              'depth=2']
    scratch, _ = build_model(_resolve(common), num_classes=10)
    assert scratch.refine_args['init'] == 'random'
    forced, _ = build_model(_resolve([*common, '--refine-init', 'identity']), num_classes=10)
    assert forced.refine_args['init'] == 'identity'

    plain, _ = build_model(_resolve(['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=16',
                                     'patch_size=4', 'depth=2']), num_classes=10)
    weights = tmp_path / 'plain.safetensors'
    save_file(plain.state_dict(), str(weights))
    tuned, _ = build_model(_resolve([*common, '--checkpoint', str(weights)]), num_classes=10)
    assert tuned.refine_args['init'] == 'identity'
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('argv', [
    ['--model', 'refined_deit_tiny_patch16_224'],  # built refined
    ['--model', 'vit_tiny_patch16_224', '--refine'],  # refined by the engine
], ids=['refined_deit', 'refine_flag'])
def test_a_saved_spec_rebuilds_the_same_model(argv):
    """`refiner eval RUN/best` rebuilds the model from the run's spec; it must not refine it twice."""
    import torch

    from refiner_vit.models.resolve import build_from_spec
    from refiner_vit.train.model_builder import build_model

    model, spec = build_model(_resolve([*argv, '--model-kwargs', 'img_size=16', 'patch_size=4', 'depth=2']),
                              num_classes=10)
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


# ------------------------------------------------------------------------------------------------------ round trips


def test_every_setting_round_trips_through_yaml_by_construction():
    """Every field at a non-default value, saved as config.yaml writes it and read back: an equal config."""
    changed = dict(data='folder', data_dir='/d', dataset_download=True, img_size=32, workers=2,
                   skip_bad_images=True, crop_pct=0.9, interpolation='bicubic', model='deit_tiny_patch16_224',
                   model_kwargs={'depth': 2, 'stem_chs': (8, 8, 16)}, refine=True, refine_form='released',
                   pretrained=True, checkpoint='w.pth', lr=1e-3, lr_base=5e-4, clip_grad=1.0, model_ema=True,
                   aa='rand-m9', scale=[0.5, 1.0], color_jitter=0.4, output='runs/y', resume='auto', seed=3,
                   amp='bf16', no_progress=True, no_tensorboard=True, precise_bn_batches=0)
    config = TrainConfig(**changed)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    assert TrainConfig.from_dict(yaml.safe_load(text)) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert config.model_kwargs == {'depth': 2, 'stem_chs': [8, 8, 16]}  # tuples become lists, YAML keeps them
    assert {f.name for f in fields(TrainConfig)} == set(config.to_dict())


@pytest.mark.slow
def test_a_runs_config_yaml_repeats_the_run(tmp_path, capsys):
    """A run's config.yaml, given back as `--config`, parses to the config it records and trains the same run."""
    tiny = ['--img-size', '16', '--model-kwargs', 'depth=1', 'embed_dim=16', '--no-progress', '--no-tensorboard',
            '--epochs', '1', '--batch-size', '64']
    assert main(['train', '--output', str(tmp_path / 'a'), *tiny]) == 0
    saved = yaml.safe_load((tmp_path / 'a' / 'config.yaml').read_text())
    config = parse_train_config(['--config', str(tmp_path / 'a' / 'config.yaml')])
    assert config.to_dict() == saved
    assert main(['train', '--config', str(tmp_path / 'a' / 'config.yaml'), '--output', str(tmp_path / 'b')]) == 0
    first, second = (json.loads((tmp_path / r / 'summary.json').read_text()) for r in 'ab')
    assert first['top1'] == second['top1'] and first['train_loss'] == second['train_loss']
    assert yaml.safe_load((tmp_path / 'b' / 'config.yaml').read_text()) == {**saved, 'output': str(tmp_path / 'b')}


@pytest.mark.parametrize('argv, message', [
    (['--lr', '-1'], '--lr must be > 0, got -1.0'),
    (['--precise-bn-batches', '-2'], '--precise-bn-batches must be >= 0'),
    (['--model-kwargs', 'depth'], "model argument 'depth': expected KEY=VALUE"),
    (['--resume', 'auto', '--overwrite'], 'give one of them'),
    (['--drop-path', '1.5'], '--drop-path must be between 0 and 1'),
])
def test_out_of_range_settings_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        _resolve(argv)


def test_a_script_builds_the_config_without_parsing_kwargs_as_strings():
    """The study (benchmarks/study) builds a run's config from the pinned recipe flags and the variant's
    kwargs as they are (no `k=v` strings and back, no module global of the command)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from study import runs
    from study import variants as study_variants

    variants = study_variants.main_variants(embed_dim=16, depth=2, num_heads=2, patch_size=4)
    run = runs.Run('refiner_vit', variants['refiner_vit'], 'digits', 16, 1e-3, 0, 2, 1.0, '/tmp/work')
    config = runs.train_args(run)
    assert isinstance(config, TrainConfig)
    assert config.model == 'test_refiner_vit' and tuple(config.model_kwargs['stem_chs']) == (8, 8, 16)
    assert (config.lr, config.epochs, config.crop_pct, config.resume) == (1e-3, 2, 1.0, 'auto')
    assert replace(config, lr=2e-3).lr == 2e-3
    refine = study_variants.ablation_variants('init', variants, 2)['identity'][1]
    assert runs.train_args(replace(run, variant=refine)).refine_init == 'identity'
    assert not hasattr(__import__('refiner_vit.commands.train', fromlist=['x']), 'FLAGS')
