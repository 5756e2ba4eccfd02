"""The library raises standard exception types (through the classes of ``refiner_vit.errors``) naming what is
wrong, and the command line alone turns exactly those into one line and an exit code; any other exception is a
bug and keeps its traceback."""
import math

import pytest
import torch
from helpers import one_error_line
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from refiner_vit import errors
from refiner_vit.cli import main
from refiner_vit.errors import ConfigError, DataError, TrainingDivergedError, UsageError, WeightsError

QUICK = ['--no-progress', '--no-tensorboard', '--epochs', '1', '--img-size', '16']


def test_a_corrupt_weights_file_is_a_value_error_naming_it(tmp_path):
    from refiner_vit.models import resolve_model

    path = tmp_path / 'weights.pth'
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match=f'^{path}: not a weights-only PyTorch checkpoint') as error:
        resolve_model('refiner_vit_digits', checkpoint=str(path))
    assert isinstance(error.value, WeightsError)


def test_a_missing_data_folder_is_a_value_error_naming_it(tmp_path):
    from refiner_vit.data import resolve_data

    with pytest.raises(ValueError, match=f'{tmp_path / "nowhere"}: no such folder') as error:
        resolve_data(str(tmp_path / 'nowhere'))
    assert isinstance(error.value, DataError)


def test_an_unknown_model_is_a_value_error_naming_it():
    from refiner_vit.models import resolve_model

    with pytest.raises(ConfigError, match='^no_such_model_xyz: no such model'):
        resolve_model('no_such_model_xyz')


def test_a_resume_checkpoint_that_is_missing_or_foreign_is_a_weights_error(tmp_path):
    from refiner_vit.train.checkpoint import find_resume, load_training_state

    with pytest.raises(WeightsError, match='--resume .*missing.pth: no such checkpoint'):
        find_resume(str(tmp_path / 'missing.pth'), tmp_path)
    foreign = tmp_path / 'weights.pth'
    torch.save({'w': torch.zeros(1)}, foreign)
    with pytest.raises(WeightsError, match=f'{foreign}: not a refiner train checkpoint'):
        load_training_state(foreign)


def test_a_non_finite_loss_is_a_runtime_error_naming_the_step():
    from refiner_vit.train.engine import train_one_epoch

    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    steps = []

    def loss_nan_at_step_2(output, target):
        steps.append(1)
        loss = nn.functional.cross_entropy(output, target)
        return loss * math.inf if len(steps) == 2 else loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match='the loss is (nan|inf) at epoch 3, step 2') as error:
        train_one_epoch(model, loader, loss_nan_at_step_2, optimizer, torch.device('cpu'), epoch=2)
    assert isinstance(error.value, TrainingDivergedError)


def test_every_library_error_has_an_exit_code_and_usage_errors_are_the_command_lines():
    assert errors.exit_code(DataError('x')) == errors.exit_code(WeightsError('x')) == 2
    assert errors.exit_code(ConfigError('x')) == errors.exit_code(UsageError('x')) == 2
    assert errors.exit_code(TrainingDivergedError('x')) == 3
    assert errors.exit_code(ValueError('x')) is None and errors.exit_code(OSError('x')) is None
    assert not issubclass(UsageError, (ValueError, OSError, RuntimeError))  # never caught as a library error


def test_training_on_a_bad_data_folder_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    line = one_error_line(capsys, ['train', '--data', str(tmp_path / 'data'), '--output', str(tmp_path / 'run'),
                                   *QUICK])
    assert line.startswith('refiner train: error: --data ') and 'expected the subfolders train/ and val/' in line


def test_a_diverged_run_exits_3_with_one_line(tmp_path, capsys, monkeypatch):
    from refiner_vit.train import runner

    monkeypatch.setattr(runner, 'build_criterion', lambda *args, **kwargs: lambda out, target: out.sum() * math.nan)
    line = one_error_line(capsys, ['train', '--output', str(tmp_path / 'run'), *QUICK], code=3)
    assert line.startswith('refiner train: error: the loss is nan at epoch 1, step 1')


@pytest.mark.parametrize('bug', [ValueError('a bug'), OSError('a bug'), RuntimeError('a bug')])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    from refiner_vit.train import runner

    def broken(config):
        raise bug

    monkeypatch.setattr(runner, 'fit', broken)
    with pytest.raises(type(bug), match='a bug'):
        main(['train', '--output', str(tmp_path / 'run'), *QUICK])


def test_models_and_the_train_config_raise_value_errors(tmp_path):
    """Bad model names, sources, EMA requests and settings are ValueErrors naming the problem."""
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
