"""Weights: the authors' checkpoint format, timm's file and local-dir paths, safe loading, resolution changes.

The authors' trainer (timm 0.4) saves a dict with a ``module.``-prefixed ``state_dict``, an EMA copy,
optimizer state, epoch, arch and an ``argparse.Namespace``. The fixture below builds exactly that around
the golden weights of ``tests/data/official`` (EMA = the true weights, plain copy perturbed), so every
path is checked against outputs of the authors' own code.
"""
import argparse
import json
import random
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from official import VARIANTS

from refiner_vit import RefinerVisionTransformer, convert_official_checkpoint, create_model_from_official
from refiner_vit.cli import main
from refiner_vit.errors import WeightsError
from refiner_vit.models.convert import infer_model_args
from refiner_vit.models.local_dir import save_local_dir

# (authors' variant, our entry point of another size): the position embedding must be resampled.
CROSS_SIZE = [('S_224', 'refiner_vit_s_patch16_384'), ('M_384', 'refiner_vit_m_patch16_224'),
              ('L_224', 'refiner_vit_l_patch16_448')]


@pytest.fixture(scope='module')
def official_weights(golden):
    return {k[len('official.'):]: v for k, v in golden.items() if k.startswith('official.')}


def _perturbed(weights):
    gen = torch.Generator().manual_seed(0)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in weights.items()}


def _trainer_checkpoint(weights, ema_weights=None):
    """A checkpoint laid out as timm 0.4's CheckpointSaver writes it (DDP prefix, Namespace args)."""
    checkpoint = {
        'epoch': 309,
        'arch': 'Refiner_ViT_L',
        'state_dict': {'module.' + k: v for k, v in weights.items()},
        'optimizer': {'state': {0: {'step': torch.tensor(5.), 'exp_avg': torch.zeros(3)}},
                      'param_groups': [{'lr': 1e-5, 'weight_decay': 0.05, 'params': [0]}]},
        'version': 2,
        'args': argparse.Namespace(model='Refiner_ViT_L', img_size=448, lr=5e-4, model_ema=True),
        'metric': 86.0,
    }
    if ema_weights is not None:
        checkpoint['state_dict_ema'] = {'module.' + k: v for k, v in ema_weights.items()}
    return checkpoint


@pytest.fixture(scope='module')
def authors_file(official_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp('authors') / 'L-448.pth.tar'
    torch.save(_trainer_checkpoint(_perturbed(official_weights), official_weights), path)
    return path


def _golden_model() -> RefinerVisionTransformer:
    return RefinerVisionTransformer(
        img_size=64, embed_dim=64, num_heads=4, depth=4, mlp_ratio=3, num_classes=10, aux_head=True)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _assert_reproduces_golden(model: torch.nn.Module, golden) -> None:
    """Eval output and train-mode ``forward_train`` outputs equal the authors' to 1e-5 relative."""
    with torch.no_grad():
        assert _relative_error(model.eval()(golden['input']), golden['logits_eval']) <= 1e-5
        cls_logits, aux_logits, box = model.train().forward_train(golden['input'])
    assert box == (0, 0, 0, 0)
    assert _relative_error(cls_logits, golden['train_cls']) <= 1e-5
    assert _relative_error(aux_logits, golden['train_aux']) <= 1e-5


def test_converter_reproduces_the_authors_outputs(authors_file, golden):
    model = _golden_model()
    model.load_state_dict(convert_official_checkpoint(authors_file), strict=True)
    _assert_reproduces_golden(model, golden)


def test_timm_file_path_reproduces_the_authors_outputs(authors_file, golden):
    model = timm.create_model('test_refiner_vit', pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    _assert_reproduces_golden(model, golden)


def test_ema_choice(authors_file, official_weights, tmp_path):
    """EMA preferred by default and on request; --no-ema gives the plain copy; EMA required but absent fails."""
    plain = _perturbed(official_weights)
    assert torch.equal(convert_official_checkpoint(authors_file, use_ema=True)['norm.weight'],
                       official_weights['norm.weight'])
    assert torch.equal(convert_official_checkpoint(authors_file, use_ema=False)['norm.weight'], plain['norm.weight'])
    no_ema = tmp_path / 'no_ema.pth'
    torch.save(_trainer_checkpoint(official_weights), no_ema)
    assert torch.equal(convert_official_checkpoint(no_ema)['norm.weight'], official_weights['norm.weight'])
    with pytest.raises(ValueError, match='no EMA weights'):
        convert_official_checkpoint(no_ema, use_ema=True)


@pytest.mark.parametrize('model_classes, overlay_classes', [(7, 7), (3, 7)])
def test_timm_file_path_with_other_num_classes(official_weights, golden, tmp_path, model_classes, overlay_classes):
    """A 7-class checkpoint: heads load when the model has 7 classes, are re-initialised otherwise;
    the backbone always loads."""
    weights = dict(official_weights)
    for head in ('head', 'aux_head'):
        weights[f'{head}.weight'], weights[f'{head}.bias'] = weights[f'{head}.weight'][:7], weights[f'{head}.bias'][:7]
    path = tmp_path / 'seven.pth'
    torch.save(_trainer_checkpoint(weights, weights), path)
    model = timm.create_model('test_refiner_vit', pretrained=True, num_classes=model_classes,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=overlay_classes)).eval()
    reference = _golden_model().eval()
    reference.load_state_dict(convert_official_checkpoint(official_weights, model=reference), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(golden['input']), reference.forward_features(golden['input']))
    assert model.head.weight.shape == (model_classes, 64)
    assert torch.equal(model.head.weight, reference.head.weight[:7]) == (model_classes == 7)


def test_resolution_change_resamples_pos_embed(authors_file, official_weights):
    """Into a 96 px model (grid 4 -> 6) through both paths; compared with a direct bicubic interpolation."""
    pos = official_weights['pos_embed']
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode='bicubic', antialias=True, align_corners=False)
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 36, 64)], dim=1)
    converted = convert_official_checkpoint(authors_file, img_size=96)
    torch.testing.assert_close(converted['pos_embed'], expected)
    model = timm.create_model('test_refiner_vit', img_size=96, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(authors_file))).eval()
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def _meta_weights(official_shapes, variant):
    return {k: torch.empty(shape, device='meta') for k, shape in official_shapes[variant]['state_dict'].items()}


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_released_variant_converts_strictly(official_shapes, variant):
    weights = _meta_weights(official_shapes, variant)
    assert infer_model_args(weights) == (VARIANTS[variant], dict(num_classes=1000, aux_head=True))
    with torch.device('meta'):
        model = timm.create_model(VARIANTS[variant])
    result = model.load_state_dict(convert_official_checkpoint(weights), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_state_dict_without_batchnorm_counters_converts(official_shapes):
    weights = {k: v for k, v in _meta_weights(official_shapes, 'S_224').items() if 'num_batches_tracked' not in k}
    converted = convert_official_checkpoint(weights)
    assert converted['blocks.1.attn.refiner.out_norm.num_batches_tracked'] == 0


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_released_variant_loads_through_timm_file_path(official_shapes, variant, tmp_path):
    """Meta tensors keep the file tiny; timm's strict load still checks every key and shape."""
    path = tmp_path / f'{variant}.pth.tar'
    torch.save(_trainer_checkpoint(_meta_weights(official_shapes, variant)), path)
    with torch.device('meta'):
        model = timm.create_model(VARIANTS[variant], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pos_embed.shape == tuple(official_shapes[variant]['state_dict']['pos_embed'])


@pytest.mark.parametrize('variant, target', CROSS_SIZE)
def test_cross_size_conversion(official_shapes, variant, target, tmp_path):
    weights = _meta_weights(official_shapes, variant)
    with torch.device('meta'):
        model = timm.create_model(target)
    converted = convert_official_checkpoint(weights, model_name=target)
    assert model.load_state_dict(converted, strict=True, assign=True) is not None
    assert converted['pos_embed'].shape == model.pos_embed.shape
    assert convert_official_checkpoint(weights, model=model)['pos_embed'].shape == model.pos_embed.shape
    path = tmp_path / 'cross.pth'
    torch.save(weights, path)
    with torch.device('meta'):
        loaded = timm.create_model(target, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed.shape == model.pos_embed.shape


def test_weights_of_another_variant_are_refused_by_name(official_shapes):
    with pytest.raises(ValueError, match=r'not fit the model refiner_vit_m_patch16_224 \(shape mismatches: cls_token: '
                                          r'\(1, 1, 384\) in the file, \(1, 1, 420\) in the model'):
        convert_official_checkpoint(_meta_weights(official_shapes, 'S_224'), model_name='refiner_vit_m_patch16_224')
    weights = _meta_weights(official_shapes, 'S_224')
    del weights['blocks.3.mlp.scale_channel']
    with pytest.raises(ValueError, match=r'closest refiner_vit_s_patch16_224: missing keys: '
                                          r'blocks\.3\.mlp_scale\.gamma'):
        convert_official_checkpoint(weights)


class _Payload:
    """Unpickling this would create ``marker``: proof that a load executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def _load_via(path_kind: str, path: Path, tmp_path: Path) -> None:
    if path_kind == 'converter':
        convert_official_checkpoint(path)
    elif path_kind == 'create_model_from_official':
        create_model_from_official(path)
    elif path_kind == 'cli':
        raise SystemExit(main(['convert', '--checkpoint', str(path), '--output', str(tmp_path / 'out')]))
    else:
        timm.create_model('test_refiner_vit', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


LOAD_PATHS = ['converter', 'create_model_from_official', 'cli', 'timm_file']


@pytest.mark.parametrize('path_kind', LOAD_PATHS)
def test_pickle_payload_is_refused_without_running(official_weights, tmp_path, path_kind, capsys):
    marker = tmp_path / 'payload_ran'
    checkpoint = _trainer_checkpoint(official_weights, official_weights)
    checkpoint['args'] = _Payload(marker)  # where the authors' file has its argparse.Namespace
    path = tmp_path / 'evil.pth.tar'
    torch.save(checkpoint, path)
    with pytest.raises((SystemExit, WeightsError, RuntimeError)) as error:  # the command line's, ours, timm's
        _load_via(path_kind, path, tmp_path)
    assert not isinstance(error.value, SystemExit) or error.value.code == 2
    message = str(error.value) + capsys.readouterr().err
    assert ('blocked' if path_kind == 'timm_file' else 'refused') in message
    assert re.search(r'(GLOBAL|globals:) [\w.]*open\b', message), message  # names the blocked callable
    assert not marker.exists()


@pytest.mark.parametrize('path_kind', LOAD_PATHS[:3])
@pytest.mark.parametrize('suffix', ['.pth.tar', '.safetensors'])
def test_random_bytes_are_a_clear_error(tmp_path, path_kind, suffix, capsys):
    """Our paths name the file and say what is wrong. (timm's own path raises too, with its own messages,
    which vary with the bytes: not asserted here.)"""
    path = tmp_path / f'noise{suffix}'
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises((SystemExit, WeightsError)) as error:  # the command line's, the library's
        _load_via(path_kind, path, tmp_path)
    assert not isinstance(error.value, SystemExit) or error.value.code == 2
    message = str(error.value) + capsys.readouterr().err
    assert str(path) in message and ('not a weights-only PyTorch checkpoint' in message or 'safetensors' in message)


def test_local_dir_round_trip(authors_file, golden, tmp_path):
    model, key = create_model_from_official(authors_file)
    assert key == 'state_dict_ema' and model.pretrained_cfg['architecture'] == 'test_refiner_vit'
    save_local_dir(model, tmp_path / 'exported')
    loaded = timm.create_model(f'local-dir:{tmp_path / "exported"}', pretrained=True)
    _assert_reproduces_golden(loaded, golden)
    config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
    assert config['architecture'] == 'test_refiner_vit' and config['num_classes'] == 10
    cfg = config['pretrained_cfg']
    assert (cfg['mean'], cfg['std'], cfg['input_size'], cfg['crop_pct']) == ([.5] * 3, [.5] * 3, [3, 64, 64], .9)
    with pytest.raises(ValueError, match='already there'):
        save_local_dir(model, tmp_path / 'exported')


def test_cli_convert(authors_file, official_weights, golden, tmp_path):
    out = tmp_path / 'cli'
    assert main(['convert', '--checkpoint', str(authors_file), '--output', str(out)]) == 0
    _assert_reproduces_golden(timm.create_model(f'local-dir:{out}', pretrained=True), golden)
    assert main(['convert', '--checkpoint', str(authors_file), '--output', str(out)]) == 2  # refuses to overwrite
    labels = tmp_path / 'labels.txt'
    labels.write_text('cat\ndog\n')
    assert main(['convert', '--checkpoint', str(authors_file), '--output', str(out), '--overwrite', '--labels',
                 str(labels)]) == 2
    labels.write_text(''.join(f'class {i}\n' for i in range(10)))
    assert main(['convert', '--checkpoint', str(authors_file), '--output', str(out), '--overwrite', '--no-use-ema',
                 '--img-size', '96', '--labels', str(labels)]) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['label_names'][3] == 'class 3'
    assert config['pretrained_cfg']['input_size'] == [3, 96, 96]
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.pos_embed.shape == (1, 37, 64)
    assert torch.equal(loaded.norm.weight, _perturbed(official_weights)['norm.weight'])


def test_thousand_class_export_carries_imagenet_labels(tmp_path):
    model = timm.create_model('test_refiner_vit', num_classes=1000)
    save_local_dir(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert len(config['label_names']) == 1000 and config['label_names'][0] == 'n01440764'
    assert config['label_descriptions']['n01440764'].startswith('tench')


def test_pretrained_cfg_names_the_published_checkpoint():
    with torch.device('meta'):
        cfg = timm.create_model('refiner_vit_l_patch16_448').pretrained_cfg
        assert timm.create_model('refiner_vit_l_patch16_448.tl_in1k').pretrained_cfg == cfg
        with pytest.raises(RuntimeError, match='No pretrained weights'):
            timm.create_model('refiner_vit_l_patch16_448', pretrained=True)  # no download location invented
    assert cfg['tag'] == 'tl_in1k'
    assert (cfg['input_size'], cfg['crop_pct'], cfg['mean']) == ((3, 448, 448), 1.13, (0.5, 0.5, 0.5))
    assert cfg['origin_url'] == 'https://github.com/zhoudaquan/Refiner_ViT' and '86.0' in cfg['description']
