"""Nothing lost on a kill, nothing executed from a file, every bad input named.

The kill tests SIGKILL real ``refiner train`` processes at chosen moments (a driver patches one function to kill
its own process there) and at an arbitrary moment (killed from outside), resume with ``--resume auto`` and
compare the final summary and metrics with an uninterrupted run's: bitwise equal on CPU.
"""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_error_line as _error
from PIL import Image

from refiner_vit.cli import main
from refiner_vit.train.checkpoint import CHECKPOINT_NAME, load_training_state

TINY = ['--img-size', '16', '--model-kwargs', 'depth=2', 'embed_dim=32', '--no-progress', '--no-tensorboard',
        '--epochs', '2', '--precise-bn-batches', '4']  # precise statistics on (their RNG restore is part of resume)
COMPARED = ('top1', 'top5', 'best_top1', 'train_loss')

# Runs `refiner train ARGS` and SIGKILLs its own process at the COUNT-th event of KIND:
#   batch    a batch drawn by the engine (training or evaluation)
#   write    half of a checkpoint-last.pth written into its temporary file
#   replace  a complete, fsynced temporary checkpoint-last.pth about to be renamed over the old one
DRIVER = r'''
import io, os, signal, sys
import torch
from refiner_vit.cli import main
from refiner_vit.train import engine
kind, count = sys.argv[1], int(sys.argv[2])
seen = [0]
def hit():
    seen[0] += 1
    if seen[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
def is_checkpoint(path):
    name = os.path.basename(str(path))
    return name == 'checkpoint-last.pth' or name.startswith('.checkpoint-last.pth.')
if kind == 'batch':
    real_batches = engine.batches
    def counting(loader):
        for batch in real_batches(loader):
            hit()
            yield batch
    engine.batches = counting
elif kind == 'write':
    real_save = torch.save
    def torn(obj, f, *args, **kwargs):
        if not hasattr(f, 'fileno') or not is_checkpoint(os.readlink(f'/proc/self/fd/{f.fileno()}')):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        hit()
        f.write(data[len(data) // 2:])
    torch.save = torn
else:
    real_replace = os.replace
    def replacing(src, dst, *args, **kwargs):
        if is_checkpoint(dst):
            hit()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replacing
sys.exit(main(['train', *sys.argv[3:]]))
'''


def _train(out: Path, *extra: str) -> dict:
    assert main(['train', '--output', str(out), *TINY, *extra]) == 0
    return json.loads((out / 'summary.json').read_text())


def _popen(out: Path, kill: tuple, *extra: str) -> subprocess.Popen:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    argv = [sys.executable, '-c', DRIVER, *map(str, kill), '--output', str(out), *TINY, *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed(out: Path, kill: tuple, *extra: str) -> dict:
    """Run the driver until it kills itself; the checkpoint it leaves (epoch, step)."""
    proc = _popen(out, kill, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return _position(out)


def _position(out: Path) -> tuple:
    state = load_training_state(out / CHECKPOINT_NAME)
    return state['epoch'], state['step']


def _metrics(out: Path) -> list:
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


def _assert_same_run(resumed: dict, full: dict, out: Path, reference: Path) -> None:
    assert {k: resumed[k] for k in COMPARED} == {k: full[k] for k in COMPARED}
    assert _metrics(out) == _metrics(reference)  # each epoch once, bitwise the same values
    assert not list(out.glob('.*.tmp'))


@pytest.mark.slow
def test_sigkill_mid_epoch_and_during_checkpoint_writes_then_resume_is_exact(tmp_path):
    """Without loader workers, 10-step checkpoints: killed mid-epoch, half-way through writing a checkpoint,
    just before a checkpoint's rename and from outside at an arbitrary moment; resumed each time."""
    extra = ('--workers', '0', '--checkpoint-steps', '10')
    full = _train(tmp_path / 'full', *extra)
    out = tmp_path / 'cut'
    # 44 training steps per epoch; the 25th batch is step 25 of epoch 1: the checkpoint of step 20 is the last
    assert _killed(out, ('batch', 25), *extra) == (0, 20)
    before = (out / CHECKPOINT_NAME).read_bytes()
    # resumed at step 20, killed half-way through writing step 30's checkpoint: step 20's survives untouched
    assert _killed(out, ('write', 1), '--resume', 'auto', *extra) == (0, 20)
    assert (out / CHECKPOINT_NAME).read_bytes() == before and list(out.glob('.checkpoint-last.pth.*.tmp'))
    # resumed at step 20, step 30 saved, killed with step 40's complete file not yet renamed
    assert _killed(out, ('replace', 2), '--resume', 'auto', *extra) == (0, 30)
    # killed from outside as soon as epoch 1 is logged: between that line and its checkpoint, or later
    proc = _popen(out, ('batch', 10 ** 9), '--resume', 'auto', *extra)
    while proc.poll() is None and not (out / 'metrics.jsonl').is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _position(out) >= (0, 40)
    # a torn last line and a duplicate epoch, as an older writer could leave them: repaired on resume
    with open(out / 'metrics.jsonl', 'a') as f:
        f.write((out / 'metrics.jsonl').read_text().splitlines()[0] + '\n{"epoch": 2, "train_lo')
    resumed = _train(out, '--resume', 'auto', *extra)
    _assert_same_run(resumed, full, out, tmp_path / 'full')


@pytest.mark.slow
def test_sigkill_with_loader_workers_then_resume_is_exact(tmp_path):
    """Two loader workers (their random augmentations must line up): a mid-epoch checkpoint resumed, then a kill
    before epoch 2's first checkpoint, whose epoch is replayed from its start."""
    extra = ('--workers', '2', '--checkpoint-steps', '15', '--reprob', '0.5')
    full = _train(tmp_path / 'full', *extra)
    out = tmp_path / 'cut'
    assert _killed(out, ('batch', 30), *extra) == (0, 15)
    # 15 skipped + 29 trained + 12 validation batches, then 8 batches into epoch 2
    assert _killed(out, ('batch', 65), '--resume', 'auto', *extra) == (1, 0)
    resumed = _train(out, '--resume', 'auto', *extra)
    _assert_same_run(resumed, full, out, tmp_path / 'full')


# ------------------------------------------------------------------------------------------ disk full, NaN


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))



def test_atomic_write_leaves_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from refiner_vit.errors import OutputWriteError
    from refiner_vit.utils.io import atomic_write
    target = tmp_path / 'file.bin'
    target.write_bytes(b'old')

    def half_then_full(f):
        f.write(b'new new new')
        _enospc()

    with pytest.raises(OutputWriteError, match=r'file\.bin: No space left on device; the previous file is unchanged'):
        atomic_write(target, half_then_full)
    monkeypatch.setattr(os, 'replace', _enospc)
    with pytest.raises(OutputWriteError, match='No space left on device'):
        atomic_write(target, lambda f: f.write(b'new'))
    assert target.read_bytes() == b'old' and sorted(tmp_path.iterdir()) == [target]


def test_disk_full_while_saving_stops_with_the_last_checkpoint_intact(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    real_replace, calls = os.replace, []

    def full_at_second_checkpoint(src, dst, *args, **kwargs):
        if Path(dst).name == CHECKPOINT_NAME:
            calls.append(dst)
            if len(calls) == 2:
                _enospc()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, 'replace', full_at_second_checkpoint)
    err = _error(capsys, ['train', '--output', str(out), *TINY], code=74)
    assert f'cannot write {out / CHECKPOINT_NAME}: No space left on device; the previous file is unchanged' in err
    assert _position(out) == (1, 0) and not list(out.glob('.*.tmp'))
    monkeypatch.setattr(os, 'replace', real_replace)
    _train(out, '--resume', 'auto')
    assert [r['epoch'] for r in _metrics(out)] == [1, 2]


def test_non_finite_loss_stops_and_the_last_checkpoint_resumes_with_a_lower_lr(tmp_path, capsys, monkeypatch):
    from refiner_vit.train import runner
    real_build, steps = runner.build_criterion, []

    def nan_at_epoch_2_step_5(*args, **kwargs):
        criterion = real_build(*args, **kwargs)

        def loss(output, target):
            steps.append(1)
            value = criterion(output, target)
            return value * float('nan') if len(steps) == 44 + 5 else value
        return loss

    out = tmp_path / 'run'
    monkeypatch.setattr(runner, 'build_criterion', nan_at_epoch_2_step_5)
    err = _error(capsys, ['train', '--output', str(out), *TINY], code=3)  # diverged: errors.py
    assert 'the loss is nan at epoch 2, step 5; training stopped' in err
    assert _position(out) == (1, 0)
    monkeypatch.setattr(runner, 'build_criterion', real_build)
    summary = _train(out, '--resume', 'auto', '--lr', '2e-4')
    rows = _metrics(out)
    assert [r['epoch'] for r in rows] == [1, 2] and summary['lr'] == 2e-4
    assert rows[1]['lr'] < rows[0]['lr']  # the new, lower schedule applies from the saved step on


# ---------------------------------------------------------------------------------------------- bad images


def _folder(root: Path, bad: dict = ()) -> None:
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((6, 6, 3), 30 * i, dtype=np.uint8)).save(root / split / c / f'{i}.png')
    for rel, data in dict(bad).items():
        (root / rel).write_bytes(data)


def _truncated_png() -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, 'PNG')
    return buffer.getvalue()[:300]


BAD = {'train/a/truncated.png': _truncated_png(), 'val/b/noise.jpg': np.random.default_rng(1).bytes(500)}


@pytest.mark.parametrize('workers', ['0', '2'])
def test_bad_images_are_named_or_skipped_counted_and_listed(tmp_path, capsys, workers):
    _folder(tmp_path / 'data', BAD)
    argv = ['train', *TINY, '--data', str(tmp_path / 'data'), '--batch-size', '4', '--workers', workers,
            '--epochs', '1']
    err = _error(capsys, [*argv, '--output', str(tmp_path / 'stop')])
    assert 'truncated.png: cannot read image' in err or 'noise.jpg: cannot read image' in err
    assert '--skip-bad-images' in err
    summary = _train(tmp_path / 'skip', *argv[1:], '--skip-bad-images', '--mixup', '0.8')
    files = [str(tmp_path / 'data' / rel) for rel in sorted(BAD)]
    assert summary['bad_images'] == {'count': 2, 'files': files}


# ------------------------------------------------------------------------------------ no code from files


class _Payload:
    """Unpickling this creates ``marker``: proof that loading a file ran code from it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def _load_paths(tmp_path: Path, file: Path) -> dict:
    """Every CLI path that reads a weights file, each reading ``file``."""
    _folder(tmp_path / 'data')
    image = str(tmp_path / 'data' / 'val' / 'a' / '0.png')
    train = ['train', '--output', str(tmp_path / 'run'), *TINY]
    return {
        'train --resume': [*train, '--resume', str(file)],
        'train --checkpoint': [*train, '--checkpoint', str(file)],
        'eval': ['eval', '--model', str(file)],
        'predict': ['predict', '--model', str(file), image],
        'attention': ['attention', '--model', 'test_refiner_vit', '--checkpoint', str(file), '--image', image,
                      '--output', str(tmp_path / 'att')],
        'relabel': ['relabel', '--teacher', 'test_refiner_vit', '--checkpoint', str(file), '--data',
                    str(tmp_path / 'data'), '--output', str(tmp_path / 'labels'), '--workers', '0'],
        'convert': ['convert', '--checkpoint', str(file), '--output', str(tmp_path / 'converted')],
    }


def test_no_load_path_runs_code_from_a_file(tmp_path, capsys):
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'epoch': 1, 'extra': _Payload(marker)}, evil)
    for name, argv in _load_paths(tmp_path, evil).items():
        err = _error(capsys, argv)
        assert str(evil) in err and 'refused' in err and 'open' in err, (name, err)
        assert not marker.exists(), name


def test_random_bytes_as_a_checkpoint_are_one_clear_line(tmp_path, capsys):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    for name, argv in _load_paths(tmp_path, junk).items():
        err = _error(capsys, argv)
        assert str(junk) in err and 'not a weights-only PyTorch checkpoint' in err, (name, err)


# -------------------------------------------------------------------------------------- up-front checks


def test_inputs_are_checked_up_front_with_one_line_naming_the_problem(tmp_path, capsys):
    train = ['train', '--output', str(tmp_path / 'run'), *TINY]
    empty = tmp_path / 'empty'
    for split in ('train', 'val'):
        (empty / split / 'a').mkdir(parents=True)
    _folder(tmp_path / 'differ')
    (tmp_path / 'differ' / 'val' / 'b').rename(tmp_path / 'differ' / 'val' / 'c')
    cases = {
        'class folders without images: a': [*train, '--data', str(empty)],
        "only in train: ['b']; only in val: ['c']": [*train, '--data', str(tmp_path / 'differ')],
        '--checkpoint-steps must be >= 0': [*train, '--checkpoint-steps', '-1'],
        '--skip-bad-images does not apply to --token-label-dir': [*train, '--skip-bad-images', '--token-label-dir',
                                                                  str(tmp_path)],
    }
    for message, argv in cases.items():
        assert message in _error(capsys, argv)
    assert not (tmp_path / 'run' / CHECKPOINT_NAME).exists()


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_list_the_offending_keys(tmp_path, capsys):
    _folder(tmp_path / 'data')
    digits = tmp_path / 'digits'
    _train(digits, '--epochs', '1')
    two_classes = ['train', *TINY, '--data', str(tmp_path / 'data'), '--batch-size', '4', '--epochs', '1']
    err = _error(capsys, [*two_classes, '--output', str(tmp_path / 'x'), '--resume', str(digits / CHECKPOINT_NAME)])
    assert 'model_kwargs.num_classes: 10 in the checkpoint, 2 now' in err
    wider = ['--model-kwargs', 'depth=2', 'embed_dim=48']
    err = _error(capsys, [*two_classes, *wider, '--output', str(tmp_path / 'y'),
                          '--checkpoint', str(digits / 'best' / 'model.safetensors')])
    assert 'does not fit the model' in err and 'blocks.0.mlp.fc2.weight: (32, 96) in the file, (48, 144)' in err
    err = _error(capsys, ['eval', '--model', str(digits / 'best'), '--data', str(tmp_path / 'data')])
    assert 'trained on 10 classes (0, 1, 2, 3, 4, ...), but --data' in err and 'has 2 (a, b, ...)' in err


def test_cli_process_prints_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, '-m', 'refiner_vit', 'train', '--output', str(tmp_path), '--model', 'no_such_model_xyz']
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and 'Traceback' not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        'refiner train: error: --model no_such_model_xyz: no such model in timm or refiner_vit']
    debug = subprocess.run([*argv, '--debug'], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and 'Traceback' in debug.stderr


def test_atomic_write_never_touches_the_umask(tmp_path, monkeypatch):
    """An atomic write creates its temporary file with the usual mode (0666 less the umask) without reading or
    setting the process umask, which another thread (TensorBoard's writer) may rely on at the same moment."""
    from refiner_vit.utils import io

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
