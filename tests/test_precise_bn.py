"""Exact BatchNorm statistics before evaluating and saving (refiner_vit/train/precise_bn.py)."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from refiner_vit.cli import main
from refiner_vit.data import build_eval_transform, build_loader, open_split, resolve_data
from refiner_vit.models.resolve import resolve_model
from refiner_vit.train.precise_bn import batchnorms, recompute_batchnorm_stats


def test_statistics_are_the_average_over_the_batches_with_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3)).train()
    images = [torch.randn(5, 3, 6, 6) + i for i in range(3)]
    assert recompute_batchnorm_stats([model], iter(images), 10, torch.device('cpu')) == 3
    with torch.no_grad():
        maps = [model[1](x) for x in images]  # what eval mode feeds the BatchNorm: no dropout
    mean = torch.stack([m.mean(dim=(0, 2, 3)) for m in maps]).mean(0)
    var = torch.stack([m.transpose(0, 1).flatten(1).var(dim=1) for m in maps]).mean(0)
    bn = model[2]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 3
    assert all(m.training for m in model.modules())  # modes restored


def test_the_released_refiner_batchnorms_are_reached_although_eval_mode_folds_them():
    """In eval mode without gradients the released refiner runs one folded kernel that never calls its
    BatchNorms; their owners run in train mode here, so every BatchNorm gets statistics."""
    torch.manual_seed(0)
    model = timm.create_model('refiner_vit_digits').eval()
    images = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    recompute_batchnorm_stats([model], iter(images), 2, torch.device('cpu'))
    norms = batchnorms(model)
    assert len(norms) > 3 and all(int(bn.num_batches_tracked) == 2 for bn in norms)
    refiner_norm = model.blocks[1].attn.refiner.norm1
    assert not torch.allclose(refiner_norm.running_var, torch.ones_like(refiner_norm.running_var))
    assert not model.training and not model.blocks[1].attn.refiner.training


def test_models_without_batchnorm_are_left_alone():
    model = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, depth=1)
    assert recompute_batchnorm_stats([model], iter([torch.randn(2, 3, 16, 16)]), 4, torch.device('cpu')) == 0


def _tracked(state):
    return {int(v) for k, v in state.items() if k.endswith('num_batches_tracked')}


@pytest.mark.slow
def test_saved_weights_hold_the_recomputed_statistics_model_and_ema(tmp_path):
    """checkpoint-last.pth (model and EMA) and best/ are written after the recalibration: each BatchNorm has
    counted the precise batches, not the training steps (44 per epoch on digits)."""
    assert main(['train', '--output', str(tmp_path), '--img-size', '16', '--model-kwargs', 'depth=2', 'embed_dim=32',
                 '--no-progress', '--no-tensorboard', '--epochs', '1', '--model-ema', '--precise-bn-batches', '5']) == 0
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert _tracked(ckpt['model']) == {5} and _tracked(ckpt['ema']) == {5}
    assert _tracked(load_file(tmp_path / 'best' / 'model.safetensors')) == {5}


def _write_squares(root: Path, per_class: int = 40) -> None:
    """3 classes of 40x40 noise images with a bright square in the class's colour channel."""
    rng = np.random.default_rng(0)
    for split, n in (('train', per_class), ('val', 10)):
        for c in range(3):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, (40, 40, 3)).astype(np.uint8)
                r0, c0 = rng.integers(0, 20, 2)
                img[r0:r0 + 20, c0:c0 + 20, c] = 255
                Image.fromarray(img).save(root / split / f'c{c}' / f'{i}.png')


def _train_accuracies(run: Path, data: Path) -> tuple:
    """Top-1 on the training images in eval mode and with every BatchNorm on batch statistics (the BatchNorms
    and their owners in train mode: the released refiner folds its BatchNorms when it is in eval mode)."""
    resolved = resolve_model(str(run / 'checkpoint-last.pth'))
    split = open_split(resolve_data(str(data)), 'train', build_eval_transform(resolved.data_config))
    images, labels = next(iter(build_loader(split, 1000, False, 0, 0)))
    batch_stats = copy.deepcopy(resolved.model)
    norms = batchnorms(batch_stats)
    for module in batch_stats.modules():
        if module in norms or any(child in norms for child in module.children()):
            module.training = True
    with torch.no_grad():
        return tuple(100. * (m(images).argmax(1) == labels).float().mean().item()
                     for m in (resolved.model, batch_stats))


@pytest.mark.slow
def test_a_short_run_on_a_small_folder_evaluates_as_it_trains(tmp_path):
    """The issue's case: 3 classes x 40 images at 32 px, 45 steps (3 per epoch). The running averages of the
    released refiner's BatchNorms were far from the real statistics: eval mode predicted one class (33 %) where
    the same weights with batch statistics are right on all training images."""
    _write_squares(tmp_path / 'data')
    assert main(['train', '--data', str(tmp_path / 'data'), '--img-size', '32', '--epochs', '15', '--output',
                 str(tmp_path / 'run'), '--no-progress', '--no-tensorboard', '--workers', '0']) == 0
    evaluated, batch_stats = _train_accuracies(tmp_path / 'run', tmp_path / 'data')
    assert batch_stats > 80 and abs(evaluated - batch_stats) <= 5, (evaluated, batch_stats)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['top1'] > 80
