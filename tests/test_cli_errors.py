"""The command line's failures: one line and the right exit code instead of a traceback, for bad flags, files,
models and data; offline pretrained weights; where the reproduction script writes."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refiner_vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--img-size', '16', '--model-kwargs', 'depth=1', 'embed_dim=16', '--no-progress', '--no-tensorboard',
        '--batch-size', '64']


def _one_line(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


@pytest.mark.parametrize('extra, message', [
    (['--lr', '-1'], '--lr must be > 0, got -1.0'),
    (['--amp', 'fp16', '--device', 'cpu'], '--amp fp16 needs CUDA'),
    (['--model', 'deit_tiny_patch16_224', '--img-size', '100', '--model-kwargs', 'depth=1'],
     'image size 100 is not divisible by its patch size 16'),
])
def test_bad_training_settings_are_one_line(tmp_path, capsys, extra, message):
    line = _one_line(capsys, ['train', '--output', str(tmp_path / 'run'), *TINY, *extra])
    assert line.startswith('refiner train: error: ') and message in line
    assert not (tmp_path / 'run').exists()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty cache, as on a machine that never downloaded the weights."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))


@pytest.mark.parametrize('argv', [
    ['eval', '--model', 'deit_tiny_patch16_224', '--pretrained'],
    ['relabel', '--teacher', 'resnet18', '--pretrained', '--data', '.', '--output', 'maps'],
    ['train', '--model', 'resnet18', '--pretrained', '--epochs', '1'],
], ids=['eval', 'relabel', 'train'])
def test_pretrained_offline_fails_at_once_and_says_how_to_pass_a_file(offline_hub, capsys, tmp_path, argv):
    """Offline, a missing pretrained checkpoint fails within seconds (no hub retries), in one line without a stray
    '{}', and says how to pass a local file."""
    started = time.perf_counter()
    line = _one_line(capsys, [*argv, *(['--output', str(tmp_path / 'run')] if argv[0] == 'train' else [])])
    assert time.perf_counter() - started < 20
    assert 'not in the local cache' in line and 'HF_HUB_OFFLINE' in line and '--checkpoint FILE' in line
    assert '{}' not in line


def test_pretrained_weights_in_the_cache_need_no_network(offline_hub, tmp_path, capsys):
    """A cached file is handed to timm as a local file: no hub request, offline or not."""
    import timm
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from refiner_vit.models.resolve import resolve_model

    weights = timm.create_model('resnet18').state_dict()
    cfg = timm.models.get_pretrained_cfg('resnet18')
    repo = Path(constants.HF_HUB_CACHE) / f'models--{cfg.hf_hub_id.replace("/", "--")}'
    (repo / 'snapshots' / 'abc').mkdir(parents=True)
    save_file(weights, str(repo / 'snapshots' / 'abc' / 'model.safetensors'))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('abc')
    resolved = resolve_model('resnet18', pretrained=True)
    assert resolved.weights == 'pretrained'
    assert torch.equal(resolved.model.state_dict()['fc.weight'], weights['fc.weight'])


def test_ctrl_c_says_where_to_continue_and_exits_130(tmp_path, capsys, monkeypatch):
    from refiner_vit.train import runner
    real, calls = runner.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, 'train_one_epoch', interrupted_in_epoch_2)

    def last_line(output: Path) -> str:
        assert main(['train', '--output', str(output), *TINY, '--epochs', '3']) == 130
        err = capsys.readouterr().err
        assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
        return err.strip().splitlines()[-1]

    assert last_line(tmp_path / 'run') == 'refiner train: interrupted after epoch 1; continue with --resume auto'
    calls[:] = [1]  # the next call is the second: interrupted before any checkpoint of this fresh run
    assert last_line(tmp_path / 'other') == ('refiner train: interrupted before the first checkpoint; nothing was '
                                             'written')
    assert not (tmp_path / 'other').exists()


def _images(folder: Path) -> list:
    folder.mkdir()
    paths = []
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f'{i}.png')
        paths.append(folder / f'{i}.png')
    (folder / 'broken.png').write_bytes(b'not a png')
    return paths


def test_predict_goes_past_unreadable_files_and_lists_each_file_once(tmp_path, capsys):
    paths = _images(tmp_path / 'images')
    code = main(['predict', '--model', 'refiner_vit_digits', str(paths[0]), str(tmp_path / 'images'), '--topk', '1'])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split(':')[0] for line in out.strip().splitlines()] == [str(p) for p in paths]
    failures = [line for line in err.splitlines() if 'could not read' in line]
    assert len(failures) == 1 and 'could not read 1 of 4 images' in failures[0] and 'broken.png' in failures[0]


def test_version_and_a_fast_help_that_imports_neither_torch_nor_timm(capsys):
    import refiner_vit
    with pytest.raises(SystemExit) as exit_info:
        main(['--version'])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f'refiner-vit {refiner_vit.__version__}'
    probe = ('import sys\nfrom refiner_vit.cli import main\ntry:\n    main(["train", "--help"])\nexcept SystemExit:\n'
             '    pass\nprint(sorted(m for m in ("torch", "timm") if m in sys.modules))')
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == '[]' and '--precise-bn-batches' in out


def test_import_registers_the_models_once_timm_is_loaded():
    """`import refiner_vit` stays light, and still registers the models whichever is imported first."""
    probe = ('import refiner_vit, sys; assert "timm" not in sys.modules; import timm; '
             'print(timm.is_model("refiner_vit_digits"), timm.is_model("refined_deit_tiny_patch16_224"), '
             'refiner_vit.RefinerVisionTransformer.__name__)')  # (timm first: every test process does that)
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out == 'True True RefinerVisionTransformer\n'


def test_run_reproduction_writes_into_the_work_folder_by_default(tmp_path):
    """Without RESULTS / PLOTS, tables and pictures go under the work folder, never over the tracked
    benchmarks/results/* and docs/img/*."""
    log = tmp_path / 'calls.txt'
    stub = tmp_path / 'python'
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, 'PYTHON': str(stub), 'WORK': str(tmp_path / 'work')}
    subprocess.run(['bash', str(ROOT / 'benchmarks' / 'run_reproduction.sh'), 'none', 'form'], env=env, check=True,
                   capture_output=True, text=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for call in calls:
        args = call.split()
        written = [args[args.index(flag) + 1] for flag in ('--json', '--plot')]
        assert all(path.startswith(str(tmp_path / 'work')) for path in written), call
    assert (tmp_path / 'work' / 'results').is_dir()
