"""One grammar for every `refiner` command (timm's): `--model SOURCE`, `--checkpoint` / `--pretrained` /
`--model-kwargs` wherever a model is built, `--output` for what a command writes, `--format json` for machine-readable
stdout, `--use-ema` for EMA weights, no abbreviated flags, and a `--help` that ends with a `make demo` example."""
import argparse
import json
from pathlib import Path

import pytest
import yaml
from helpers import one_error_line

from refiner_vit.cli import build_parser, main

TINY = ['--epochs', '1', '--model-kwargs', 'depth=1', 'embed_dim=16', '--precise-bn-batches', '0', '--no-progress',
        '--no-tensorboard']
# Commands that build a model from a source, and the flag naming it (relabel's model is a teacher).
MODEL_FLAG = {'train': '--model', 'eval': '--model', 'predict': '--model', 'relabel': '--teacher',
              'attention': '--model', 'benchmark': '--model', 'export': '--model'}
WRITERS = ('train', 'relabel', 'convert', 'attention', 'benchmark', 'export')
MACHINE_READABLE = ('eval', 'predict', 'benchmark')


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set:
    return {option for action in parser._actions for option in action.option_strings}


def _positionals(parser: argparse.ArgumentParser) -> list:
    return [action.dest for action in parser._actions if not action.option_strings]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp('grammar') / 'run'
    assert main(['train', '--output', str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize('command', sorted(MODEL_FLAG))
def test_every_model_is_given_the_same_way(command):
    flags = _flags(_subparsers()[command])
    assert {MODEL_FLAG[command], '--checkpoint', '--model-kwargs', '--pretrained'} <= flags, command
    assert command == 'predict' or not _positionals(_subparsers()[command]), 'the model is no positional argument'


def test_convert_reads_its_weights_from_checkpoint_and_names_the_target_with_model():
    convert = _subparsers()['convert']
    assert {'--checkpoint', '--model', '--output', '--use-ema', '--no-use-ema'} <= _flags(convert)
    assert not _positionals(convert)


@pytest.mark.parametrize('command', WRITERS)
def test_what_a_command_writes_is_output(command):
    flags = _flags(_subparsers()[command])
    assert '--output' in flags and not {'--out', '--json'} & flags, command


@pytest.mark.parametrize('command', MACHINE_READABLE)
def test_machine_readable_output_is_format_json(command):
    fmt = next(a for a in _subparsers()[command]._actions if '--format' in a.option_strings)
    assert 'json' in fmt.choices


def test_ema_is_spelled_one_way():
    for name, parser in _subparsers().items():
        flags = _flags(parser)
        assert not {'--ema', '--no-ema'} & flags, name
    assert '--model-ema' in _flags(_subparsers()['train'])  # keeping an EMA while training (timm's spelling)
    assert {'--use-ema'} <= _flags(_subparsers()['eval']) & _flags(_subparsers()['predict'])


@pytest.mark.parametrize('argv', [
    ['train', '--out', 'runs/x'],                     # an abbreviation of --output
    ['train', '--checkpoint-st', '5'],                # an abbreviation of --checkpoint-steps
    ['export', '--model', 'refiner_vit_digits', '--output', 'm.pt2', '--no-fu'],
    ['eval', '--model', 'refiner_vit_digits', '--form', 'json'],
    ['benchmark', '--model', 'refiner_vit_digits', '--no-mem'],
])
def test_abbreviations_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert 'unrecognized arguments' in capsys.readouterr().err


@pytest.mark.parametrize('command', ['train', 'eval', 'benchmark'])
def test_model_arguments_have_one_spelling(command, capsys):
    """``--model-kwargs`` (timm's train.py spelling) and no other."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, '--model', 'refiner_vit_digits', '--model-args', 'depth=2'])
    assert e.value.code == 2 and 'unrecognized arguments: --model-args' in capsys.readouterr().err
    args = build_parser().parse_args([command, '--model', 'refiner_vit_digits', '--model-kwargs', 'depth=2'])
    assert args.model_kwargs == ['depth=2']


def test_train_checkpoint_is_the_fine_tuning_weights_not_checkpoint_steps():
    args = build_parser().parse_args(['train', '--checkpoint', 'L-448.pth.tar'])
    assert args.checkpoint == 'L-448.pth.tar' and not hasattr(args, 'checkpoint_steps')


@pytest.mark.parametrize('command', sorted(_subparsers()))
def test_help_ends_with_an_example_for_a_make_demo_checkout(command):
    last = _subparsers()[command].format_help().rstrip().splitlines()[-1].strip()
    assert last.startswith(f'refiner {command} ') and 'runs/demo' in last, last


def test_ema_of_a_run_without_ema_is_one_line(tiny_run, capsys):
    line = one_error_line(capsys, ['eval', '--model', str(tiny_run), '--use-ema'])
    assert 'has no EMA weights (train with --model-ema)' in line


def test_train_fine_tunes_a_run_given_as_model(tiny_run, tmp_path, capsys):
    tuned = tmp_path / 'tuned'
    assert main(['train', '--model', str(tiny_run), '--output', str(tuned), *TINY[:2], *TINY[-4:]]) == 0
    config = yaml.safe_load((tuned / 'config.yaml').read_text())
    assert config['model'] == 'refiner_vit_digits' and config['checkpoint'] == str(tiny_run)
    assert {'depth': 1, 'embed_dim': 16, 'patch_size': 4}.items() <= config['model_kwargs'].items()
    assert config['img_size'] == 16 and 'num_classes' not in config['model_kwargs']
    capsys.readouterr()
    assert main(['eval', '--model', str(tuned), '--format', 'json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 360 and result['top1'] > 20  # started from the trained run, not at chance


def test_train_refuses_pretrained_with_a_run(tiny_run, tmp_path, capsys):
    line = one_error_line(capsys, ['train', '--model', str(tiny_run), '--pretrained', '--output', str(tmp_path)])
    assert '--pretrained applies to a model name' in line
