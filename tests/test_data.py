"""Datasets and samplers: the fixed digits split, folder checks, sharding without loss or duplicates."""
import numpy as np
import pytest
import torch
from PIL import Image

from refiner_vit.data import DigitsDataset, ShardSampler, build_loader, reseed_loader, resolve_data
from refiner_vit.data.datasets import eval_source
from refiner_vit.errors import DataError


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).min() >= 35 and np.bincount(val.targets).max() <= 37  # 20 % of ~180 per class
    train_rows = {img.tobytes() + bytes([t]) for img, t in zip(train.images, train.targets)}
    overlap = sum(img.tobytes() + bytes([t]) in train_rows for img, t in zip(val.images, val.targets))
    assert overlap <= 2  # the raw digits hold a couple of exact duplicate images; the split adds none
    assert np.array_equal(DigitsDataset('val').images, val.images)  # same split every time
    img, label = val[0]
    assert img.mode == 'RGB' and img.size == (8, 8) and label == val.targets[0]


@pytest.mark.parametrize('length, world', [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_shard_sampler_covers_every_index_once(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))


def test_training_order_depends_only_on_seed_and_epoch():
    dataset = torch.utils.data.TensorDataset(torch.arange(40), torch.zeros(40))

    def order(epoch):
        loader = build_loader(dataset, 4, True, 0, seed=3)
        reseed_loader(loader, 3, epoch)
        return torch.cat([x for x, _ in loader]).tolist()

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(40))


def _folder(root, classes):
    for c in classes:
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / c / 'a.png')


def test_folder_checks_name_the_problem(tmp_path):
    with pytest.raises(DataError, match='no such folder'):
        resolve_data(str(tmp_path / 'missing'))
    with pytest.raises(DataError, match='expected the subfolders train/ and val/'):
        resolve_data(str(tmp_path))
    _folder(tmp_path / 'train', ['a', 'b'])
    _folder(tmp_path / 'val', ['a', 'c'])
    with pytest.raises(DataError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        resolve_data(str(tmp_path))
    (tmp_path / 'empty' / 'train' / 'x').mkdir(parents=True)
    (tmp_path / 'empty' / 'val').mkdir(parents=True)
    with pytest.raises(DataError, match='class folders without images: x'):
        resolve_data(str(tmp_path / 'empty'))
    assert eval_source(str(tmp_path / 'val')).classes == ['a', 'c']
