"""The weights pipeline (refiner_vit.models.weights): every checkpoint layout gives the same weights, the family
filter only maps keys, one report of what does not fit, strict and fine-tuning loads, and every way in (resolve,
convert, timm's pretrained path) goes through it with ValueErrors naming the file."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from refiner_vit import convert_official_checkpoint, resolve_model
from refiner_vit.errors import WeightsError
from refiner_vit.models import weights
from refiner_vit.models.refiner_vit import checkpoint_filter_fn


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return timm.create_model('test_refiner_vit', num_classes=5).eval()


def _layouts(state):
    prefixed = {f'module.{k}': v for k, v in state.items()}
    stale = {k: torch.zeros_like(v) for k, v in state.items()}
    return {
        'bare': state,
        'timm trainer': {'state_dict': prefixed, 'epoch': 3},
        'timm trainer with EMA': {'state_dict': stale, 'state_dict_ema': state, 'epoch': 3},
        'DeiT': {'model': prefixed},
        'DeiT with EMA': {'model': stale, 'model_ema': prefixed},
    }


def test_every_checkpoint_layout_gives_the_same_weights_ema_first(small):
    state = small.state_dict()
    for name, checkpoint in _layouts(state).items():
        extracted, _ = weights.extract(checkpoint, name)
        assert extracted.keys() == state.keys(), name
        assert all(torch.equal(extracted[k], state[k]) for k in state), name
    plain, key = weights.extract(_layouts(state)['timm trainer with EMA'], 'ckpt', use_ema=False)
    assert key == 'state_dict' and all(not v.any() for v in plain.values())
    with pytest.raises(WeightsError, match=r'^ckpt: checkpoint holds no EMA weights'):
        weights.extract({'model': state}, 'ckpt', use_ema=True)


def test_the_family_filter_maps_keys_only(small):
    state = small.state_dict()
    assert checkpoint_filter_fn(state, small).keys() == state.keys()
    # taking weights out of a checkpoint is the pipeline's extract step, not the filter's
    assert set(checkpoint_filter_fn({f'module.{k}': v for k, v in state.items()}, small)) == {
        f'module.{k}' for k in state}


def test_one_report_of_what_does_not_fit(small):
    state = dict(small.state_dict())
    state['extra.weight'] = torch.zeros(1)
    state['head.weight'] = torch.zeros(7, state['head.weight'].shape[1])
    del state['cls_token']
    found = weights.diff(small, state)
    assert found.missing == ['cls_token'] and found.unexpected == ['extra.weight']
    assert found.wrong_shape == [('head.weight', tuple(state['head.weight'].shape), (5, small.embed_dim))]
    assert found.describe() == (f'shape mismatches: head.weight: (7, {small.embed_dim}) in the file, '
                                f'(5, {small.embed_dim}) in the model; missing keys: cls_token; unexpected keys: '
                                'extra.weight')
    with pytest.raises(WeightsError, match=r'^f.pth: does not fit the model test_refiner_vit \(shape mismatches'):
        weights.fit(small, state, 'f.pth')


def test_strict_load_tolerates_missing_batchnorm_counters_only(small):
    state = {k: v for k, v in small.state_dict().items() if not k.endswith('num_batches_tracked')}
    model = timm.create_model('test_refiner_vit', num_classes=5).eval()
    weights.load(model, state, 'f.pth')
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(images), small(images), rtol=0, atol=0)


def test_finetune_load_drops_a_classifier_of_another_class_count_only(small):
    model = timm.create_model('test_refiner_vit', num_classes=3)
    head = model.head.weight.detach().clone()
    weights.load(model, small.state_dict(), 'f.pth', mode='finetune')
    assert torch.equal(model.head.weight, head)
    assert torch.equal(model.cls_token, small.cls_token)
    wider = timm.create_model('test_refiner_vit', num_classes=3, embed_dim=96)
    with pytest.raises(WeightsError, match=r'shape mismatches: cls_token: \(1, 1, \d+\) in the file'):
        weights.load(wider, small.state_dict(), 'f.pth', mode='finetune')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_a_corrupt_weights_file_is_a_value_error_naming_it(tmp_path, suffix):
    path = tmp_path / f'corrupt{suffix}'
    path.write_bytes(b'\x00not weights' * 8)
    for load in (lambda: resolve_model('test_refiner_vit', checkpoint=str(path)),
                 lambda: resolve_model(str(path)),
                 lambda: convert_official_checkpoint(path)):
        with pytest.raises(ValueError, match=str(path)):
            load()


def test_resolve_and_convert_load_a_training_checkpoint_alike(small, tmp_path):
    path = tmp_path / 'ema.pth'
    torch.save(_layouts(small.state_dict())['DeiT with EMA'], path)
    resolved = resolve_model('test_refiner_vit', checkpoint=str(path)).model
    converted = convert_official_checkpoint(path, model_name='test_refiner_vit')
    for key, value in small.state_dict().items():
        assert torch.equal(resolved.state_dict()[key], value), key
        assert torch.equal(converted[key], value), key
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    assert resolve_model('test_refiner_vit', checkpoint=str(tmp_path / 'w.safetensors')).model.head.out_features == 5
