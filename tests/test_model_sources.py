"""Model sources: one resolver for every command, and every command accepts every kind of source (registered name,
run folder, local model folder, checkpoint)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from refiner_vit.cli import main
from refiner_vit.models.resolve import resolve_model

QUICK = ['--no-progress', '--no-tensorboard', '--epochs', '1', '--batch-size', '64', '--precise-bn-batches', '2']
# A timm ViT refined by `refiner train --refine` (the refinement is replayed from the run's records).
REFINED = ['--model', 'vit_tiny_patch16_224', '--refine', '--img-size', '16', '--model-kwargs', 'patch_size=4',
           'depth=2', 'embed_dim=32', 'num_heads=2']
DEFAULT = ['--img-size', '16', '--model-kwargs', 'depth=1', 'embed_dim=16']


def _write_folder(root: Path, per_class: int = 4) -> Path:
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((12, 12, 3), 50 * i + (100 if c == 'b' else 0), np.uint8)).save(
                    root / split / c / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('sources')
    assert main(['train', '--output', str(root / 'refined'), *REFINED, *QUICK]) == 0
    assert main(['train', '--output', str(root / 'default'), *DEFAULT, *QUICK]) == 0
    _write_folder(root / 'folder')
    return root


def _sources(root: Path) -> dict:
    refined, default = root / 'refined', root / 'default'
    return {
        'run folder': [str(refined)],
        'RUN/best': [str(refined / 'best')],
        'local-dir:RUN/best': [f'local-dir:{refined / "best"}'],
        'checkpoint-last.pth': [str(refined / 'checkpoint-last.pth')],
        'name + weights file': ['refiner_vit_digits', '--model-kwargs', 'depth=1', 'embed_dim=16', '--checkpoint',
                                str(default / 'best' / 'model.safetensors')],
    }


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['run folder', 'RUN/best', 'local-dir:RUN/best', 'checkpoint-last.pth',
                                  'name + weights file'])
def test_every_command_accepts_every_model_source(runs, tmp_path, capsys, kind):
    model, *options = _sources(runs)[kind]
    image = str(runs / 'folder' / 'val' / 'a' / '1.png')
    folder = str(runs / 'folder')
    commands = {
        'eval': ['eval', '--model', model, *options],
        'predict': ['predict', '--model', model, image, *options],
        'attention': ['attention', '--model', model, *options, '--image', image, '--output', str(tmp_path / 'att')],
        'export': ['export', '--model', model, *options, '--output', str(tmp_path / 'm.pt2')],
        'benchmark': ['benchmark', '--model', model, *options, '--modes', 'infer', '--batch-size', '2',
                      '--warmup', '0', '--repeats', '1', '--gemm-size', '64'],
        'relabel': ['relabel', '--teacher', model, *options, '--data', folder, '--output', str(tmp_path / 'maps'),
                    '--workers', '0'],
        'train --checkpoint': ['train', '--output', str(tmp_path / 'tuned'), '--data', folder,
                               '--batch-size', '4', *QUICK[:4], '--precise-bn-batches', '1',
                               *(REFINED if kind != 'name + weights file' else DEFAULT),
                               '--checkpoint', options[-1] if options else model],
    }
    for name, argv in commands.items():
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, (name, captured.err[-2000:])
        assert 'warning' not in captured.err or name == 'benchmark', (name, captured.err)


@pytest.mark.slow
def test_export_from_a_run_folder_matches_predict(runs, tmp_path, capsys):
    """`refiner export --model local-dir:RUN/best` without --checkpoint exports the run's trained weights: the
    exported program predicts what `refiner predict` does."""
    run = runs / 'refined'
    images = sorted(str(p) for p in (runs / 'folder' / 'val').rglob('*.png'))
    assert main(['predict', '--model', str(run), *images, '--format', 'json', '--topk', '2']) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert main(['export', '--model', str(run), '--output', str(tmp_path / 'm.pt2')]) == 0
    program = torch.export.load(tmp_path / 'm.pt2').module()
    resolved = resolve_model(str(run))
    from refiner_vit.data import build_eval_transform
    transform = build_eval_transform(resolved.data_config)
    x = torch.stack([transform(Image.open(p).convert('RGB')) for p in images])
    with torch.no_grad():
        probs = program(x).softmax(-1)
    for row, item in zip(probs, predicted):
        top = row.topk(2)
        assert [c['index'] for c in item['top']] == top.indices.tolist()
        np.testing.assert_allclose([c['prob'] for c in item['top']], top.values.numpy(), atol=1e-5)


def test_benchmark_measures_random_weights_without_a_warning(capsys):
    assert main(['benchmark', '--model', 'refiner_vit_digits', '--modes', 'infer', '--batch-size', '2',
                 '--warmup', '0', '--repeats', '1', '--gemm-size', '64']) == 0
    assert 'warning' not in capsys.readouterr().err
    assert resolve_model('refiner_vit_digits').random_weights


def test_eval_of_a_model_name_warns_once_that_its_weights_are_random(capsys):
    assert main(['eval', '--model', 'refiner_vit_digits', '--batch-size', '360']) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
    assert warnings == ['refiner eval: warning: refiner_vit_digits has random weights (give --checkpoint, '
                        '--pretrained or a trained run)']


@pytest.mark.slow
def test_the_default_model_has_a_name_of_its_own(runs):
    summary = json.loads((runs / 'default' / 'summary.json').read_text())
    assert summary['model'] == 'refiner_vit_digits'
    full = timm.create_model('refiner_vit_digits')
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(0.20e6, rel=0.05)
    assert full.pretrained_cfg['input_size'] == (3, 16, 16)
    test = timm.create_model('test_refiner_vit')
    assert test.pretrained_cfg['input_size'] == (3, 64, 64)  # the tiny test config keeps its own size


@pytest.mark.slow
def test_eval_of_a_run_defaults_to_the_runs_data(tmp_path, capsys):
    data = _write_folder(tmp_path / 'data')
    run = tmp_path / 'run'
    assert main(['train', '--output', str(run), *DEFAULT, *QUICK[:4], '--data', str(data), '--batch-size', '4',
                 '--precise-bn-batches', '1']) == 0
    capsys.readouterr()
    for source in (run / 'best', run, run / 'checkpoint-last.pth'):
        assert main(['eval', '--model', str(source), '--format', 'json']) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result['data'], result['images']) == (str(data), 8)


def test_sources_that_name_nothing_are_one_line(tmp_path, capsys):
    cases = {
        'export --model runs/x/best': (['export', '--model', str(tmp_path / 'x' / 'best'), '--output',
                                        str(tmp_path / 'm.pt2')], 'no such file or folder'),
        'an empty folder': (['eval', '--model', str(tmp_path)], 'neither a run folder'),
        'a weights file alone': (['eval', '--model', str(tmp_path / 'w.safetensors')],
                                 'holds weights without an architecture'),
        'an unknown name': (['attention', '--model', 'refiner_vit_digitz', '--image', 'x.png', '--output',
                             str(tmp_path)], 'did you mean: refiner_vit_digits'),
    }
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(1)}, str(tmp_path / 'w.safetensors'))
    for name, (argv, message) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and 'Traceback' not in err[0], (name, err)
