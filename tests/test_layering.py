"""Issue 18 (the parts in the files issue 16 changed): errors belong to their layer, one way to do each thing, no
dead code, no umask games, the allocator policy only where it helps."""
import ast
import importlib.util
import inspect
import os
import stat
from pathlib import Path

import pytest
import torch

from refiner_vit.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / 'refiner_vit'


def test_models_and_the_train_config_raise_value_errors_not_usage_errors(tmp_path):
    from refiner_vit.models.resolve import resolve_model
    from refiner_vit.models.weights import extract
    from refiner_vit.train.config import TrainConfig

    with pytest.raises(ValueError, match='no EMA weights'):
        extract({'state_dict': {'w': torch.zeros(1)}}, 'file.pth', use_ema=True)
    with pytest.raises(ValueError, match='no such model'):
        resolve_model('no_such_model_xyz')
    with pytest.raises(ValueError, match='no such file or folder'):
        resolve_model(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='epochs must be >= 1'):
        TrainConfig(epochs=0)


def test_train_models_is_renamed():
    assert importlib.util.find_spec('refiner_vit.train.models') is None  # it shadowed the models/ package's name


def test_one_local_dir_writer():
    writers = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob('*.py')
               if 'save_config_for_hf' in path.read_text() or 'save_for_hf' in path.read_text()]
    assert writers == ['models/local_dir.py']


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node


def test_commands_import_no_private_names_and_no_other_command():
    for path in sorted((PACKAGE / 'commands').glob('*.py')):
        for node in _imports(path):
            private = [a.name for a in node.names if a.name.startswith('_')]
            assert not private, (path.name, node.module, private)
            sibling = node.level == 1 and node.module not in (None, 'model_source')
            assert not sibling, (path.name, node.module)


def test_one_model_argument_syntax():
    for path in PACKAGE.rglob('*.py'):
        assert '--model-args' not in path.read_text(), path


def test_dead_code_is_gone():
    from refiner_vit.train import engine, outputs

    assert 'forward' not in inspect.signature(engine.train_one_epoch).parameters
    assert not hasattr(outputs, 'METRIC_KEYS')


def test_atomic_write_never_touches_the_umask(tmp_path, monkeypatch):
    """Today it set the umask to 0 for a moment, when another thread (TensorBoard's writer) could create a
    world-writable file."""
    from refiner_vit import io

    mask = os.umask(0o027)
    os.umask(mask | 0o027)
    calls = []
    monkeypatch.setattr(os, 'umask', lambda value: calls.append(value) or 0o027)
    try:
        io.atomic_write(tmp_path / 'f.bin', lambda f: f.write(b'x'))
    finally:
        monkeypatch.undo()
        os.umask(mask)
    assert calls == []
    assert stat.S_IMODE((tmp_path / 'f.bin').stat().st_mode) == 0o666 & ~(mask | 0o027)


@pytest.mark.parametrize('argv, applied', [
    (['eval', '--model', 'refiner_vit_digits', '--batch-size', '360'], True),
    (['convert', '--checkpoint', 'missing.pth', '--output', 'out'], False),
    (['export', '--model', 'refiner_vit_digits', '--output', 'x.zip'], False),
])
def test_the_allocator_policy_applies_to_model_running_commands_only(monkeypatch, argv, applied):
    from refiner_vit import allocator

    calls = []
    monkeypatch.setattr(allocator, 'keep_freed_memory', lambda: calls.append(1) or True)
    main(argv)
    assert bool(calls) == applied
