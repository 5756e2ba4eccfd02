"""Issue 8: nothing lost on a kill, nothing executed from a file, every bad input named.

The kill tests SIGKILL real ``refiner train`` processes at chosen moments (a driver patches one function to kill
its own process there) and at an arbitrary moment (killed from outside), resume with ``--resume auto`` and
compare the final summary and metrics with an uninterrupted run's: bitwise equal on CPU.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_vit.cli import main
from refiner_vit.train.checkpoint import CHECKPOINT_NAME, load_training_state

TINY = ['--img-size', '16', '--model-kwargs', 'depth=2', 'embed_dim=32', '--no-progress', '--no-tensorboard',
        '--epochs', '2']
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
