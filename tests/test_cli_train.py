"""Bad input to train / eval / predict: one line naming the problem, exit code 2, nothing trained."""
import numpy as np
import pytest
from helpers import one_error_line as _error
from PIL import Image

QUICK = ['--no-progress', '--no-tensorboard', '--epochs', '1', '--img-size', '16']


def _folder(root, corrupt: bool = False):
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(root / split / c / f'{i}.png')
    if corrupt:
        (root / 'train' / 'a' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(200)))



@pytest.mark.parametrize('extra, message', [
    (['--model', 'no_such_model_xyz'], 'no_such_model_xyz: no such model'),
    (['--img-size', '18'], '--img-size 18 is not divisible'),
    (['--mix-token'], '--mix-token needs --token-label-dir'),
    (['--refine'], '--refine needs --model'),
    (['--epochs', '0'], '--epochs must be >= 1'),
    (['--data', '/no/such/folder'], 'no such folder'),
    (['--resume', '/no/such.pth'], '--resume /no/such.pth: no such checkpoint'),
    (['--model', 'resnet18', '--cos-reg', '2'], '--cos-reg 2 needs 3 attention layers'),
    (['--model', 'resnet18', '--refine'], '--refine on resnet18'),
    (['--batch-size', '5000'], 'fewer than one batch'),
])
def test_train_rejects_bad_flags(tmp_path, capsys, extra, message):
    err = _error(capsys, ['train', '--output', str(tmp_path / 'run'), *QUICK, *extra])
    assert message in err
    assert not (tmp_path / 'run' / 'checkpoint-last.pth').exists()


@pytest.mark.parametrize('workers', ['0', '1'])
def test_unreadable_image_is_named(tmp_path, capsys, workers):
    _folder(tmp_path / 'data', corrupt=True)
    err = _error(capsys, ['train', '--output', str(tmp_path / 'run'), *QUICK, '--data', str(tmp_path / 'data'),
                          '--batch-size', '2', '--workers', workers])
    assert 'broken.png: cannot read image' in err


def test_missing_token_labels_are_a_loud_error(tmp_path, capsys):
    _folder(tmp_path / 'data')
    err = _error(capsys, ['train', '--output', str(tmp_path / 'run'), *QUICK, '--data', str(tmp_path / 'data'),
                          '--model', 'test_refiner_vit', '--token-label-dir', str(tmp_path / 'labels')])
    assert 'token labels requested' in err and 'labels' in err


def test_eval_and_predict_refuse_foreign_files(tmp_path, capsys):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(np.random.default_rng(0).bytes(256))
    assert 'junk.pth' in _error(capsys, ['eval', '--model', str(junk)])
    assert 'no config.json' in _error(capsys, ['eval', '--model', str(tmp_path)])
    assert 'nothing.png: no such file' in _error(capsys, ['predict', '--model', 'test_refiner_vit',
                                                          str(tmp_path / 'nothing.png')])


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys, monkeypatch):
    from refiner_vit.train import runner

    def exploding(*args, **kwargs):
        return lambda output, target: output.sum() * float('nan')

    monkeypatch.setattr(runner, 'build_criterion', exploding)
    err = _error(capsys, ['train', '--output', str(tmp_path / 'run'), *QUICK], code=3)  # diverged: errors.py
    assert 'the loss is nan at epoch 1, step 1' in err
    assert not (tmp_path / 'run' / 'checkpoint-last.pth').exists()
