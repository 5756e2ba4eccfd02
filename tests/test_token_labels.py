"""Token labeling: relabel maps, crop-aware targets, mixing, the loss and `refiner relabel`."""
import json
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

import refiner_vit  # noqa: F401  (registers the models)
import refiner_vit.models.refiner_vit as refiner_vit_module
from refiner_vit.cli import main
from refiner_vit.commands.relabel import dense_logits
from refiner_vit.data.token_labels import (
    CropRecord,
    TokenLabelMixup,
    build_token_label_dataset,
    build_token_label_transform,
    label_map_path,
    load_label_map,
    pack_label_map,
    save_label_map,
    token_soft_labels,
)
from refiner_vit.errors import ConfigError, DataError
from refiner_vit.train.token_label_loss import TokenLabelCriterion


def position_map(rows: int, cols: int) -> torch.Tensor:
    """A packed [2, 2, rows, cols] map whose two top classes at (y, x) are y and rows + x, equally likely."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij')
    classes = torch.stack([y, rows + x]).float()
    return torch.stack([torch.full_like(classes, 7.), classes])


def expected_positions(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Mean map row and column (in cells) that each token's soft label points at: (2, n_tokens)."""
    row_mass, col_mass = tokens[:rows], tokens[rows:rows + cols]
    mean_row = (row_mass * torch.arange(rows)[:, None]).sum(0) / row_mass.sum(0)
    mean_col = (col_mass * torch.arange(cols)[:, None]).sum(0) / col_mass.sum(0)
    return torch.stack([mean_row, mean_col])


# ------------------------------------------------------------------------------------- crop-box geometry
def test_crop_box_axis_order_on_asymmetric_map():
    # Image 80 x 160 px, map 8 x 16 cells (10 px each). Crop rows 20:60, cols 40:120 -> map rows 2:6, cols 4:12.
    logits, classes = position_map(8, 16)
    record = CropRecord(top=20, left=40, height=40, width=80, image_height=80, image_width=160)
    assert record.map_box(8, 16) == (4., 2., 12., 6.)  # (x1, y1, x2, y2)
    tokens = token_soft_labels(logits, classes.long(), record, (4, 8), num_classes=24)
    for r in range(4):
        for c in range(8):
            expect = torch.zeros(24)
            expect[2 + r] = expect[8 + 4 + c] = 0.5
            torch.testing.assert_close(tokens[:, r * 8 + c], expect, atol=1e-6, rtol=0)
    # A coarser grid averages the cells under each token: token (r, c) covers map rows 2+2r.., cols 4+2c..
    coarse = token_soft_labels(logits, classes.long(), record, (2, 4), num_classes=24)
    torch.testing.assert_close(coarse.sum(0), torch.ones(8))
    assert torch.allclose(expected_positions(coarse, 8, 16)[:, 1 * 4 + 2], torch.tensor([4.5, 8.5]), atol=1e-5)


def test_horizontal_flip_mirrors_token_labels():
    logits, classes = position_map(4, 6)
    plain = CropRecord(0, 0, 40, 60, 40, 60, flipped=False)
    mirrored = CropRecord(0, 0, 40, 60, 40, 60, flipped=True)
    a = token_soft_labels(logits, classes.long(), plain, (4, 6), 10).reshape(10, 4, 6)
    b = token_soft_labels(logits, classes.long(), mirrored, (4, 6), 10).reshape(10, 4, 6)
    torch.testing.assert_close(b, a.flip(-1))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize('hflip', [0., 1.])
@pytest.mark.parametrize('seed', range(3))
def test_recorded_crop_and_flip_keep_image_and_labels_aligned(seed, hflip):
    """Real transform on a gradient image: where each token's label points must be where its pixels came from."""
    height, width, cell = 64, 96, 8
    y = (np.arange(height) + 0.5) / height
    x = (np.arange(width) + 0.5) / width
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.round(255 * x)[None, :]
    pixels[..., 1] = np.round(255 * y)[:, None]
    transform = build_token_label_transform(
        32, scale=(0.2, 1.0), hflip=hflip, color_jitter=None, interpolation='bilinear', mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    image, record = transform(Image.fromarray(pixels))
    rows, cols = height // cell, width // cell
    logits, classes = position_map(rows, cols)
    tokens = token_soft_labels(logits, classes.long(), record, (4, 4), rows + cols)
    label_pos = expected_positions(tokens, rows, cols)  # in map cells
    patches = image[:2].reshape(2, 4, 8, 4, 8).mean(dim=(2, 4)).flatten(1)  # (G=y, R=x) channel means
    pixel_pos = torch.stack([patches[1] * rows - 0.5, patches[0] * cols - 0.5])  # colours move with the pixels
    assert record.flipped == bool(hflip)
    assert (label_pos - pixel_pos).abs().max() < 0.5, (record, (label_pos - pixel_pos).abs().max())


def test_randaugment_loses_geometric_ops():
    transform = build_token_label_transform(32, auto_augment='rand-m9-mstd0.5-inc1')
    names = [op.name for op in transform.photometric.transforms[0].ops]
    assert 'Rotate' not in names and 'ShearX' not in names and 'TranslateXRel' not in names
    assert 'SolarizeIncreasing' in names
    with pytest.raises(ConfigError, match='RandAugment'):
        build_token_label_transform(32, auto_augment='original')


# ------------------------------------------------------------------------------------- files and targets
def write_image_folder(root, classes=('cat', 'dog'), per_class=2, size=(56, 40)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f'{i}.png')
    return root


def test_pack_save_load_round_trip(tmp_path):
    dense = torch.randn(12, 3, 5)
    packed = pack_label_map(dense)
    assert packed.shape == (2, 5, 3, 5) and packed.dtype == torch.float16
    path = label_map_path(tmp_path, 'cls/img.JPEG')
    assert path == tmp_path / 'cls' / 'img.pt'
    save_label_map(packed, path)
    logits, classes = load_label_map(path, num_classes=12)
    torch.testing.assert_close(classes, dense.topk(5, dim=0).indices)
    torch.testing.assert_close(logits, dense.topk(5, dim=0).values, atol=1e-2, rtol=1e-3)
    with pytest.raises(DataError, match='outside 0..9'):
        load_label_map(path, num_classes=10)
    torch.save(torch.zeros(3, 4), tmp_path / 'bad.pt')
    with pytest.raises(DataError, match='bad.pt: not a relabel map'):
        load_label_map(tmp_path / 'bad.pt', num_classes=12)


def test_dataset_targets_shape_and_normalisation(tmp_path):
    root = write_image_folder(tmp_path / 'images')
    labels = tmp_path / 'labels'
    for path in sorted(root.rglob('*.png')):
        save_label_map(pack_label_map(torch.randn(6, 7, 7)), label_map_path(labels, path.relative_to(root)))
    ds = build_token_label_dataset(root, labels, 32, 4, num_classes=6, is_training=True, hflip=0.5)
    image, target = ds[3]
    assert image.shape == (3, 32, 32) and target.shape == (6, 2 + 16)
    torch.testing.assert_close(target.sum(0), torch.ones(18))
    assert target[:, 0].tolist() == [0, 1, 0, 0, 0, 0]  # dog = class 1
    torch.testing.assert_close(target[:, 1], target[:, 2:].mean(1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 6, 18)
    val = build_token_label_dataset(root, None, 32, 4, num_classes=6, is_training=False)
    assert val[0][0].shape == (3, 32, 32) and val[0][1] == 0


def test_missing_maps_fail_loudly(tmp_path):
    root = write_image_folder(tmp_path / 'images')
    with pytest.raises(DataError, match='label folder .*nowhere does not exist.*refiner relabel'):
        build_token_label_dataset(root, tmp_path / 'nowhere', 32, 4, 2, is_training=True)
    labels = tmp_path / 'labels'
    save_label_map(pack_label_map(torch.randn(2, 3, 3)), label_map_path(labels, 'cat/0.png'))
    with pytest.raises(DataError, match=r'3 of 4 label maps are missing \(first: .*cat/1\.pt\)'):
        build_token_label_dataset(root, labels, 32, 4, 2, is_training=True)
    with pytest.raises(DataError, match='no label folder'):
        build_token_label_dataset(root, None, 32, 4, 2, is_training=True)


# --------------------------------------------------------------------------------------------------- mixing
def test_cutmix_mixes_token_labels_by_patch_coverage():
    np.random.seed(3)
    B, C, grid = 4, 4, (4, 4)
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 3, 32, 32).clone()
    tokens = torch.eye(C)[:, :, None].expand(B, C, 16)  # image b: every token is class b
    target = torch.cat([torch.eye(C)[:, :, None], tokens.mean(-1, keepdim=True), tokens], dim=2)
    mixup = TokenLabelMixup(grid, mixup_alpha=0., cutmix_alpha=1.)
    for _ in range(5):
        mixed_x, mixed = mixup(x.clone(), target)
        from_other = (mixed_x[:, 0] != x[:, 0]).float()  # pixels taken from the flipped batch
        per_token = from_other.reshape(B, 4, 8, 4, 8).mean(dim=(2, 4)).flatten(1)
        lam = 1 - from_other.mean(dim=(1, 2))
        for b in range(B):
            torch.testing.assert_close(mixed[b, B - 1 - b, 2:], per_token[b])
            torch.testing.assert_close(mixed[b, B - 1 - b, 0], 1 - lam[b])  # ground truth: lam own
        torch.testing.assert_close(mixed[:, :, 1], mixed[:, :, 2:].mean(-1))
        torch.testing.assert_close(mixed.sum(1), torch.ones(B, 18))


def test_mixup_blends_every_column_with_lam():
    np.random.seed(0)
    x = torch.randn(2, 3, 8, 8)
    target = torch.softmax(torch.randn(2, 5, 2 + 4), dim=1)
    target[:, :, 1] = target[:, :, 2:].mean(-1)
    mixed_x, mixed = TokenLabelMixup(2, mixup_alpha=1., cutmix_alpha=0.)(x.clone(), target)
    lam = float(((mixed_x - x.flip(0)) / (x - x.flip(0)))[0].mean())
    torch.testing.assert_close(mixed, lam * target + (1 - lam) * target.flip(0))


def test_mix_token_unmixes_aux_logits_round_trip(monkeypatch):
    """With no blocks a token's aux logits depend only on its own patch, so un-mixed logits equal unmixed ones."""
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit', mix_token=True)
    model.blocks = nn.ModuleList()
    model.train()
    monkeypatch.setattr(refiner_vit_module, 'rand_bbox', lambda size, lam: (1, 1, 3, 4))  # rows 1:3, cols 1:4
    x = torch.randn(3, 3, 64, 64)
    cls_mixed, mixed_aux, box = model.forward_train(x)
    model.mix_token = False
    cls_plain, plain_aux, no_box = model.forward_train(x)
    assert tuple(box) == (1, 1, 3, 4) and tuple(no_box) == (0, 0, 0, 0)
    torch.testing.assert_close(mixed_aux, plain_aux)
    # ... and the box really swapped something: inside it, the flipped batch's logits differ from the own.
    grid = plain_aux.reshape(3, 4, 4, -1)
    assert not torch.allclose(grid[:, 1:3, 1:4], grid.flip(0)[:, 1:3, 1:4])
    # The class token saw 6 of 16 patches of the partner image: the criterion's lam is 10/16.
    crit = TokenLabelCriterion(dense_weight=0.)
    target = torch.eye(10)[torch.tensor([0, 1, 2])]
    mixed_target = 10 / 16 * target + 6 / 16 * target.flip(0)
    torch.testing.assert_close(crit((cls_mixed, mixed_aux, box), target), crit(cls_mixed, mixed_target))


def test_mix_token_samples_a_box_in_training():
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit', mix_token=True).train()
    with torch.no_grad():
        boxes = [tuple(model.forward_train(torch.randn(2, 3, 64, 64))[2]) for _ in range(8)]
    assert all(0 <= r1 <= r2 <= 4 and 0 <= c1 <= c2 <= 4 for r1, c1, r2, c2 in boxes)
    assert any((r2 - r1) * (c2 - c1) > 0 for r1, c1, r2, c2 in boxes)  # lam ~ Beta(1, 1) mixes something


# ----------------------------------------------------------------------------------------------------- loss
def naive_soft_ce(logits, target):
    return float(np.mean([-(t * torch.log_softmax(z, -1)).sum() for z, t in zip(logits, target)]))


def test_loss_equals_hand_computation():
    torch.manual_seed(0)
    B, C, N = 2, 3, 4
    cls_logits = torch.randn(B, C, dtype=torch.float64)
    aux = torch.randn(B, N, C, dtype=torch.float64)
    target = torch.softmax(torch.randn(B, C, 2 + N, dtype=torch.float64), dim=1)
    box = (0, 0, 1, 2)  # 2 of 4 tokens -> lam 0.5
    crit = TokenLabelCriterion(dense_weight=0.5, cls_weight=1.0)
    cls_t = [0.5 * target[b, :, 1] + 0.5 * target[B - 1 - b, :, 1] for b in range(B)]
    dense = [(aux[b, n], target[b, :, 2 + n]) for b in range(B) for n in range(N)]
    expect = naive_soft_ce(cls_logits, cls_t) + 0.5 * naive_soft_ce(*zip(*dense))
    assert abs(float(crit((cls_logits, aux, box), target)) - expect) < 1e-10
    # No MixToken box -> own targets; ground truth as class target; smoothing.
    crit = TokenLabelCriterion(dense_weight=0.25, cls_weight=2.0, smoothing=0.1, cls_target='ground_truth')
    smooth = target * 0.9 + 0.1 / C
    expect = 2.0 * naive_soft_ce(cls_logits, smooth[:, :, 0]) + 0.25 * naive_soft_ce(
        aux.flatten(0, 1), smooth[:, :, 2:].transpose(1, 2).flatten(0, 1))
    assert abs(float(crit((cls_logits, aux, (0, 0, 0, 0)), target)) - expect) < 1e-10


def test_loss_without_token_labels_or_aux_head():
    torch.manual_seed(0)
    cls_logits, aux = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    one_hot = torch.eye(3, dtype=torch.float64)[labels]
    crit = TokenLabelCriterion()
    assert abs(float(crit(cls_logits, labels)) - naive_soft_ce(cls_logits, one_hot)) < 1e-10
    dense = naive_soft_ce(aux.flatten(0, 1), one_hot.repeat_interleave(4, 0))
    expect = naive_soft_ce(cls_logits, one_hot) + 0.5 * dense
    assert abs(float(crit((cls_logits, aux, (0, 0, 0, 0)), labels)) - expect) < 1e-10


# ---------------------------------------------------------------------------------------- refiner relabel
def test_dense_logits_of_a_cnn_average_to_its_prediction():
    model = timm.create_model('resnet18', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = dense_logits(model, x)
        assert dense.shape == (2, 10, 2, 2)
        torch.testing.assert_close(dense.mean(dim=(2, 3)), model(x), atol=1e-5, rtol=1e-5)


def test_dense_logits_of_refiner_vit_are_its_aux_head():
    model = timm.create_model('test_refiner_vit').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = dense_logits(model, x)
        features = model.forward_features(x)
        assert dense.shape == (2, 10, 4, 4)
        torch.testing.assert_close(model(x), model.head(features[:, 0]) + 0.5 * dense.amax(dim=(2, 3)))


def test_relabel_end_to_end(tmp_path, capsys, monkeypatch):
    data = tmp_path / 'data'
    write_image_folder(data / 'train', classes=('a', 'b', 'c'))
    out = tmp_path / 'labels'
    assert main(['relabel', '--teacher', 'test_refiner_vit', '--data', str(data), '--output', str(out),
                 '--batch-size', '4', '--workers', '0']) == 0
    assert 'wrote 6 maps [2, 5, 4, 4]' in capsys.readouterr().out
    for path in (data / 'train').rglob('*.png'):
        logits, classes = load_label_map(label_map_path(out, path.relative_to(data / 'train')), num_classes=10)
        assert logits.shape == classes.shape == (5, 4, 4)
        assert (logits[:-1] >= logits[1:]).all()  # top-k, best first
    assert json.loads((out / 'relabel.json').read_text())['images'] == 6

    # The maps feed a training step: dataset -> CutMix -> MixToken forward -> loss -> gradients.
    ds = build_token_label_dataset(data / 'train', out, 64, 4, num_classes=10, is_training=True)
    images, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    np.random.seed(0)
    images, targets = TokenLabelMixup(4)(images, targets)
    model = timm.create_model('test_refiner_vit', mix_token=True).train()
    monkeypatch.setattr(refiner_vit_module, 'rand_bbox', lambda size, lam: (0, 2, 3, 4))
    loss = TokenLabelCriterion()(model.forward_train(images), targets)
    loss.backward()
    assert torch.isfinite(loss) and model.aux_head.weight.grad.abs().sum() > 0


def test_relabel_with_checkpoint_and_errors(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'images', classes=('a', 'b'), per_class=1)
    teacher = timm.create_model('test_refiner_vit', num_classes=3)
    save_file(teacher.state_dict(), str(tmp_path / 'teacher.safetensors'))
    args = ['relabel', '--teacher', 'test_refiner_vit', '--checkpoint', str(tmp_path / 'teacher.safetensors'),
            '--data', str(data), '--output', str(tmp_path / 'labels'), '--workers', '0']
    assert main(args) == 0  # the class count follows the checkpoint's head
    assert load_torch_shape(tmp_path / 'labels' / 'a' / '0.pt') == (2, 3, 4, 4)  # top-3 of 3 classes
    assert main([*args, '--model-kwargs', 'num_classes=4']) == 2
    assert 'does not fit' in capsys.readouterr().err
    assert main(['relabel', '--teacher', 'test_refiner_vit', '--data', str(tmp_path / 'none'),
                 '--output', str(tmp_path / 'x')]) == 2
    assert 'no such image folder' in capsys.readouterr().err


def load_torch_shape(path):
    return tuple(torch.load(path, weights_only=True).shape)
