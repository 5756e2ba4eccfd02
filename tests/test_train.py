"""End-to-end `refiner train` / `eval` / `predict` runs at tiny sizes, resume, and a 2-process DDP run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refiner_vit.cli import main
from refiner_vit.train import runner

# A tiny default model and one short epoch on digits: the whole run takes a couple of seconds.
TINY = ['--img-size', '16', '--model-kwargs', 'depth=2', 'embed_dim=32', '--no-progress', '--no-tensorboard',
        '--precise-bn-batches', '4']


def _train(tmp: Path, *extra: str) -> dict:
    assert main(['train', '--output', str(tmp), *TINY, *extra]) == 0
    return json.loads((tmp / 'summary.json').read_text())


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp('digits')
    _train(run, '--epochs', '2')
    return run


@pytest.mark.slow
def test_digits_run_writes_every_output(digits_run):
    summary = json.loads((digits_run / 'summary.json').read_text())
    for key in ('model', 'data', 'epochs', 'top1', 'top5', 'best_top1', 'params', 'world_size', 'train_seconds'):
        assert key in summary
    assert summary['world_size'] == 1 and summary['epochs'] == 2 and summary['data'] == 'digits'
    rows = _metrics(digits_run)
    assert [r['epoch'] for r in rows] == [1, 2]
    assert set(rows[0]) >= {'epoch', 'train_loss', 'top1', 'top5', 'lr', 'seconds'}
    assert summary['top1'] == rows[-1]['top1'] and summary['best_top1'] == max(r['top1'] for r in rows)
    assert summary['top1'] > 20  # two epochs of a tiny model learn something (chance is 10 %)
    for name in ('checkpoint-last.pth', 'config.yaml', 'curves.png', 'best/model.safetensors', 'best/config.json'):
        assert (digits_run / name).is_file(), name
    assert (digits_run / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_eval_reproduces_the_training_metrics(digits_run, capsys):
    rows = _metrics(digits_run)
    assert main(['eval', '--model', str(digits_run / 'best'), '--format', 'json']) == 0
    best = json.loads(capsys.readouterr().out)
    assert best['top1'] == pytest.approx(max(r['top1'] for r in rows), abs=1e-3)
    assert main(['eval', '--model', str(digits_run / 'checkpoint-last.pth'), '--format', 'json']) == 0
    last = json.loads(capsys.readouterr().out)
    assert last['top1'] == pytest.approx(rows[-1]['top1'], abs=1e-3) and last['images'] == 360


@pytest.mark.slow
def test_predict_names_classes_with_probabilities(digits_run, tmp_path, capsys):
    from refiner_vit.data import DigitsDataset
    val = DigitsDataset('val')
    for i in range(3):
        val[i][0].save(tmp_path / f'{i}.png')
    assert main(['predict', '--model', str(digits_run / 'best'), str(tmp_path), '--topk', '3', '--format', 'json']) == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r['file']).name for r in results] == ['0.png', '1.png', '2.png']
    for item in results:
        probs = [c['prob'] for c in item['top']]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(c['name'] == str(c['index']) for c in item['top'])


@pytest.mark.slow
def test_resume_auto_continues_exactly(tmp_path, monkeypatch):
    full = _train(tmp_path / 'full', '--epochs', '3')
    calls = {'n': 0}
    real = runner.train_one_epoch

    def dies_in_third_epoch(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt  # as a kill after epoch 2's checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, 'train_one_epoch', dies_in_third_epoch)
    assert main(['train', '--output', str(tmp_path / 'cut'), *TINY, '--epochs', '3']) == 130
    monkeypatch.setattr(runner, 'train_one_epoch', real)
    resumed = _train(tmp_path / 'cut', '--epochs', '3', '--resume', 'auto')
    assert [r['epoch'] for r in _metrics(tmp_path / 'cut')] == [1, 2, 3]
    for key in ('top1', 'top5', 'best_top1'):
        assert resumed[key] == full[key], key
    strip = [{k: v for k, v in r.items() if k != 'seconds'} for r in _metrics(tmp_path / 'cut')]
    assert strip == [{k: v for k, v in r.items() if k != 'seconds'} for r in _metrics(tmp_path / 'full')]


def _write_folder(root: Path, classes=('cat', 'dog'), per_class: int = 6, size=(20, 14)) -> None:
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{i}.png')


@pytest.mark.slow
def test_image_folder_run_with_recipe_parts(tmp_path):
    _write_folder(tmp_path / 'data')
    summary = _train(tmp_path / 'run', '--data', str(tmp_path / 'data'), '--epochs', '1', '--batch-size', '4',
                     '--workers', '0', '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25', '--aa',
                     'rand-m9-mstd0.5-inc1', '--model-ema', '--cos-reg', '1', '--clip-grad', '1.0', '--amp', 'bf16')
    assert summary['classes'] == 2 and summary['epochs'] == 1 and summary['ema_top1'] is not None
    config = json.loads((tmp_path / 'run' / 'best' / 'config.json').read_text())
    assert config['label_names'] == ['cat', 'dog']


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'refiner_vit', 'train', '--output', str(tmp_path), '--epochs', '1', *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['world_size'] == 2
    assert [r['epoch'] for r in _metrics(tmp_path)] == [1]


@pytest.mark.slow
def test_token_labeling_run_with_relabel_maps(tmp_path):
    _write_folder(tmp_path / 'data', size=(20, 20))
    assert main(['relabel', '--teacher', 'resnet18', '--model-kwargs', 'num_classes=2', '--data',
                 str(tmp_path / 'data'), '--output', str(tmp_path / 'labels'), '--img-size', '32',
                 '--workers', '0']) == 0
    summary = _train(tmp_path / 'run', '--data', str(tmp_path / 'data'), '--model', 'test_refiner_vit',
                     '--img-size', '32', '--model-kwargs', 'patch_size=4', 'depth=2', '--token-label-dir',
                     str(tmp_path / 'labels'), '--mix-token', '--mixup', '0.8', '--cutmix', '1.0', '--epochs', '1',
                     '--batch-size', '4')
    assert summary['model_kwargs']['aux_head'] is True and summary['model_kwargs']['mix_token'] is True
    assert math.isfinite(_metrics(tmp_path / 'run')[0]['train_loss'])


@pytest.mark.slow
def test_fine_tune_from_a_run_at_another_size_and_class_count(digits_run, tmp_path):
    from safetensors.torch import load_file
    _write_folder(tmp_path / 'data')
    source = digits_run / 'best' / 'model.safetensors'
    summary = _train(tmp_path / 'run', '--data', str(tmp_path / 'data'), '--img-size', '32', '--epochs', '1',
                     '--batch-size', '4', '--checkpoint', str(source), '--lr', '1e-12', '--warmup-epochs', '0',
                     '--min-lr', '0', '--drop-path', '0')
    tuned = load_file(tmp_path / 'run' / 'best' / 'model.safetensors')
    original = load_file(source)
    assert summary['classes'] == 2 and tuned['head.weight'].shape == (2, 32)
    assert tuned['pos_embed'].shape == (1, 1 + 8 * 8, 32) and original['pos_embed'].shape == (1, 1 + 4 * 4, 32)
    # lr ~ 0: the body is the source run's (BatchNorm statistics aside)
    assert np.allclose(tuned['blocks.1.attn.v.weight'], original['blocks.1.attn.v.weight'], atol=1e-6)
