"""`--config FILE.yaml`: every shipped recipe parses into valid flags; the command line wins over the file."""
from pathlib import Path

import pytest
import yaml

import refiner_vit
from refiner_vit.cli import build_parser
from refiner_vit.commands import train as train_command
from refiner_vit.errors import UsageError
from refiner_vit.train.config import load_yaml_config

RECIPES = sorted((Path(refiner_vit.__file__).parent / 'recipes').glob('*.yaml'))


def _resolve(argv):
    args = build_parser().parse_args(['train', *argv])
    return train_command.FLAGS.resolve(args, args.config)


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
    with pytest.raises(UsageError, match=message):
        _resolve(['--config', str(config)])


def test_shipped_recipes_load_by_name():
    assert load_yaml_config('digits') == load_yaml_config(RECIPES[0].parent / 'digits.yaml')
    with pytest.raises(UsageError, match='no such file'):
        load_yaml_config('no_such_recipe')


def test_base_files_chain_and_cycles_are_refused(tmp_path):
    (tmp_path / 'a.yaml').write_text('base: b.yaml\nepochs: 3\n')
    (tmp_path / 'b.yaml').write_text('epochs: 9\nseed: 1\n')
    assert load_yaml_config(tmp_path / 'a.yaml') == {'epochs': 3, 'seed': 1}
    (tmp_path / 'b.yaml').write_text('base: a.yaml\n')
    with pytest.raises(UsageError, match='include each other'):
        load_yaml_config(tmp_path / 'a.yaml')


def test_refine_starts_random_from_scratch_and_as_identity_when_fine_tuning(tmp_path):
    """The init ablation of docs/reproduction.md: identity hurts from scratch, so it is kept for fine-tuning."""
    import torch
    from safetensors.torch import save_file

    from refiner_vit.train.models import build_model

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
    tuned, _ = build_model(_resolve([*common, '--initial-checkpoint', str(weights)]), num_classes=10)
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

    from refiner_vit.train.models import _from_spec, build_model

    model, spec = build_model(_resolve([*argv, '--model-kwargs', 'img_size=16', 'patch_size=4', 'depth=2']),
                              num_classes=10)
    rebuilt = _from_spec(spec, model.state_dict(), 'run')
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
