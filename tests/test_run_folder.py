"""Run folders: a run is never overwritten by accident, `--output` is checked before anything is written, and a
start that fails writes nothing."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line as _error
from PIL import Image

from refiner_vit.cli import main

TINY = ['--img-size', '16', '--model-kwargs', 'depth=1', 'embed_dim=16', '--no-progress', '--no-tensorboard',
        '--batch-size', '64']


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}




@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp('finished') / 'run'
    assert main(['train', '--output', str(run), *TINY, '--epochs', '1']) == 0
    return run


@pytest.mark.slow
def test_a_second_train_into_a_finished_run_changes_no_byte(finished, capsys):
    before = _snapshot(finished)
    err = _error(capsys, ['train', '--output', str(finished), *TINY, '--epochs', '2'])
    assert 'holds a run' in err and '--resume auto' in err and '--overwrite' in err
    assert _snapshot(finished) == before


@pytest.mark.slow
def test_overwrite_replaces_the_run_whole(finished, tmp_path):
    copy = tmp_path / 'copy'
    copy.mkdir()
    for name, _ in _snapshot(finished).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((finished / name).read_bytes())
    (copy / 'notes.txt').write_text('mine')
    assert main(['train', '--output', str(copy), *TINY, '--epochs', '2', '--overwrite']) == 0
    assert [json.loads(line)['epoch'] for line in (copy / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
    assert (copy / 'notes.txt').read_text() == 'mine'  # only the run's own files are replaced


def _folder(root: Path, bad: bool = False) -> None:
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(8):
                Image.fromarray(np.full((6, 6, 3), 30 * i, dtype=np.uint8)).save(root / split / c / f'{i}.png')
    if bad:
        (root / 'train' / 'a' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(200))


@pytest.mark.slow
def test_a_failed_resume_leaves_config_yaml_and_the_run_as_they_were(tmp_path, capsys):
    data = tmp_path / 'data'
    _folder(data)
    run = tmp_path / 'run'
    argv = ['train', '--output', str(run), *TINY, '--data', str(data), '--batch-size', '4', '--workers', '0']
    assert main([*argv, '--epochs', '1']) == 0
    before = _snapshot(run)
    _folder(data, bad=True)
    err = _error(capsys, [*argv, '--epochs', '2', '--resume', 'auto', '--lr', '0.01'])
    assert 'broken.png: cannot read image' in err
    assert _snapshot(run) == before


def test_a_failed_fresh_start_writes_nothing(tmp_path, capsys):
    data = tmp_path / 'data'
    _folder(data, bad=True)
    run = tmp_path / 'run'
    err = _error(capsys, ['train', '--output', str(run), *TINY, '--data', str(data), '--batch-size', '4',
                          '--workers', '0'])
    assert 'broken.png' in err and not run.exists()


def test_output_that_is_a_file_or_under_a_file(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    assert 'is a file, not a folder' in _error(capsys, ['train', '--output', str(tmp_path / 'file'), *TINY])
    assert 'is a file, not a folder' in _error(capsys, ['train', '--output', str(tmp_path / 'file' / 'run'), *TINY])
    assert (tmp_path / 'file').read_text() == 'x'


def test_unwritable_output_parent_is_one_line(tmp_path, capsys, monkeypatch):
    """(The suite may run as root, which writes anywhere; the permission the process lacks is simulated.)"""
    locked = tmp_path / 'locked'
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: False if Path(path) == locked else
                        real_access(path, mode, **kw))
    err = _error(capsys, ['train', '--output', str(locked / 'run'), *TINY])
    assert f'{locked} is not writable' in err and not (locked / 'run').exists()
