"""Attention analysis: maps of each model kind, hand-computed metrics, no trace left on the model, the CLI."""
import json
import math

import matplotlib.image
import pytest
import timm
import torch
from safetensors.torch import save_file

from refiner_vit import attention_maps, refine
from refiner_vit.analysis import (
    entropy,
    head_similarity,
    layer_similarity,
    layer_stats,
    mean_distance,
    record_attention,
    rollout,
    token_grid,
)
from refiner_vit.cli import main

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
STAT_KEYS = {'mean_distance', 'head_similarity', 'layer_similarity', 'entropy', 'mean_distance_per_head',
             'entropy_per_head'}


def _plain_vit():
    return timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, num_classes=5)


def _build(kind):
    torch.manual_seed(0)
    if kind == 'refiner_vit':
        return timm.create_model('test_refiner_vit').eval(), torch.randn(2, 3, 64, 64)
    model = _plain_vit()
    if kind == 'refined_deit':
        refine(model, init='random')
    return model.eval(), torch.randn(2, 3, 32, 32)


EXPECTED_KINDS = {
    'refiner_vit': ['computing', 'sharing', 'computing', 'sharing'],
    'refined_deit': ['refined', 'refined'],
    'plain_vit': ['plain', 'plain'],
}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize('kind', list(EXPECTED_KINDS))
def test_maps_shapes_kinds_and_probabilities(kind):
    model, x = _build(kind)
    records = attention_maps(model, x)
    assert [r['kind'] for r in records] == EXPECTED_KINDS[kind]
    assert [r['block'] for r in records] == list(range(len(records)))
    assert records[0]['name'] == 'blocks.0.attn'
    grid = token_grid(model, x.shape[-2:])
    n = 1 + grid[0] * grid[1]
    for r in records:
        assert r['raw'].shape == (2, model.blocks[0].attn.num_heads, n, n)
        assert r['raw'].min() >= 0
        torch.testing.assert_close(r['raw'].sum(-1), torch.ones(r['raw'].shape[:-1]))
        if r['kind'] in ('sharing', 'refined'):
            assert r['refined'].shape == r['raw'].shape
            assert not torch.allclose(r['refined'], r['raw'], atol=1e-3)
        else:
            assert r['refined'] is None


def test_sharing_raw_is_the_received_map_normalised():
    # block 1 receives softmax_0; block 3 receives softmax_2 + s * softmax_0, whose rows sum to 1 + s
    model, x = _build('refiner_vit')
    records = attention_maps(model, x)
    s = model.blocks[0].attn.scale
    torch.testing.assert_close(records[1]['raw'], records[0]['raw'])
    torch.testing.assert_close(records[3]['raw'], (records[2]['raw'] + s * records[0]['raw']) / (1 + s))


def test_plain_raw_equals_a_naive_softmax_and_fused_flag_is_restored():
    model, x = _build('plain_vit')
    attn = model.blocks[0].attn
    attn.fused_attn = True
    records = attention_maps(model, x)
    assert attn.fused_attn is True
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = model.blocks[0].norm1(tokens).double()
        qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()
        B, N, _ = qkv.shape
        q, k, _ = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) * attn.head_dim ** -0.5).softmax(-1)
    torch.testing.assert_close(records[0]['raw'].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kind', list(EXPECTED_KINDS))
def test_output_unchanged_and_no_hooks_left(kind):
    model, x = _build(kind)
    with torch.no_grad():
        before = model(x)
        with record_attention(model) as records:
            assert _hook_count(model) == len(records)
            during = model(x)
        after = model(x)
    assert torch.equal(before, after)
    # A plain ViT is recorded through the unfused path; an observed Refiner-ViT computing block adds the previous map
    # after the tap instead of inside the attention-probabilities op (whose native kernel may be chosen): same maths,
    # other rounding.
    if kind in ('plain_vit', 'refiner_vit'):
        torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(during, before)
    assert _hook_count(model) == 0


@pytest.mark.parametrize('kind', ['refiner_vit', 'plain_vit'])
def test_no_hooks_left_after_an_exception(kind):
    model, x = _build(kind)
    flags = [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')]
    with pytest.raises(RuntimeError):
        attention_maps(model, x[:, :2])  # a wrong channel count fails inside the forward
    with pytest.raises(KeyError):
        with record_attention(model):
            raise KeyError('interrupted')
    assert _hook_count(model) == 0
    assert [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')] == flags


def test_layer_selection():
    model, x = _build('refiner_vit')
    records = attention_maps(model, x, layers=[-1, 1])
    assert [(r['block'], r['kind']) for r in records] == [(1, 'sharing'), (3, 'sharing')]
    with pytest.raises(IndexError, match='out of range'):
        attention_maps(model, x, layers=[4])
    with pytest.raises(TypeError, match='no supported attention'):
        attention_maps(torch.nn.Linear(2, 2), torch.randn(1, 2))


def _maps(patch_rows, grid, prefix=1):
    """A (1, 1, N, N) map from a (P, P) patch-to-patch block, prefix tokens attending to themselves."""
    p = grid[0] * grid[1]
    n = prefix + p
    maps = torch.zeros(1, 1, n, n, dtype=torch.float64)
    maps[0, 0, :prefix, :prefix] = torch.eye(prefix, dtype=torch.float64)
    maps[0, 0, prefix:, prefix:] = patch_rows
    return maps


def test_mean_distance_on_crafted_maps():
    grid = (3, 3)
    assert mean_distance(_maps(torch.eye(9), grid), grid).item() == 0
    # 2x2 grid: attend to the horizontal mirror (distance 1), to the opposite corner (sqrt 2)
    mirror = torch.tensor([1, 0, 3, 2])
    opposite = torch.tensor([3, 2, 1, 0])
    assert mean_distance(_maps(torch.eye(4)[mirror], (2, 2)), (2, 2)).item() == pytest.approx(1)
    assert mean_distance(_maps(torch.eye(4)[opposite], (2, 2)), (2, 2)).item() == pytest.approx(math.sqrt(2))
    # 3x3 grid: each patch attends to the patch two rows down (or up): distance 2
    two_rows = torch.eye(9)[[i + 6 if i < 3 else i - 6 if i >= 6 else i for i in range(9)]]
    # rows 0 and 2 move by 2, the middle row stays: mean (6 * 2 + 3 * 0) / 9
    assert mean_distance(_maps(two_rows, grid), grid).item() == pytest.approx(12 / 9)
    # half on itself, half on the mirror; class-token weight and signs do not count
    half = 0.5 * torch.eye(4) - 0.5 * torch.eye(4)[mirror]
    maps = _maps(half, (2, 2))
    maps[0, 0, 1:, 0] = 3.0
    assert mean_distance(maps, (2, 2)).item() == pytest.approx(0.5)


def test_mean_distance_matches_a_naive_loop():
    torch.manual_seed(1)
    grid = (3, 4)
    maps = torch.rand(2, 3, 13, 13, dtype=torch.float64) - 0.3
    maps[0, 1, 5, 1:] = 0  # a query attending only to the class token is left out
    expected = torch.zeros(3, dtype=torch.float64)
    for h in range(3):
        values = []
        for b in range(2):
            for qi in range(12):
                weights = maps[b, h, 1 + qi, 1:].abs()
                if weights.sum() == 0:
                    continue
                qr, qc = divmod(qi, 4)
                dist = sum(weights[ki] * math.hypot(qr - ki // 4, qc - ki % 4) for ki in range(12))
                values.append(dist / weights.sum())
        expected[h] = sum(values) / len(values)
    torch.testing.assert_close(mean_distance(maps, grid), expected)


def test_entropy_similarity_and_rollout_on_crafted_maps():
    n = 5
    uniform = torch.full((1, 2, n, n), 1 / n)
    torch.testing.assert_close(entropy(uniform), torch.full((2,), math.log(n), dtype=torch.float64))
    assert entropy(torch.eye(n).expand(1, 1, n, n)).item() == 0
    assert head_similarity(uniform) == pytest.approx(1)
    disjoint = torch.zeros(1, 2, n, n)
    disjoint[0, 0, :, 0] = 1
    disjoint[0, 1, :, 1] = 1
    assert head_similarity(disjoint) == pytest.approx(0)
    assert math.isnan(head_similarity(uniform[:, :1]))
    a = torch.tensor([[[[1., 0.], [0., 0.]]]])
    b = torch.tensor([[[[1., 1.], [0., 0.]]]])
    assert layer_similarity(a, b) == pytest.approx(1 / math.sqrt(2))
    assert layer_similarity(b, b) == pytest.approx(1)
    eye = torch.eye(n).expand(1, 2, n, n)
    torch.testing.assert_close(rollout([eye, eye]), torch.eye(n, dtype=torch.float64).unsqueeze(0))
    torch.testing.assert_close(rollout([uniform], residual=0.0), uniform[:, 0].double())
    # two layers of uniform attention with a residual half: 0.5 I + 0.5 U, squared
    step = 0.5 * torch.eye(n, dtype=torch.float64) + 0.5 / n
    torch.testing.assert_close(rollout([uniform, uniform])[0], step @ step)


def test_layer_stats_keys_and_previous_layer_rule():
    model, x = _build('refiner_vit')
    grid = token_grid(model, x.shape[-2:])
    stats = layer_stats(attention_maps(model, x), grid)
    assert [s['kind'] for s in stats] == EXPECTED_KINDS['refiner_vit']
    assert set(stats[1]['raw']) == STAT_KEYS and set(stats[1]['refined']) == STAT_KEYS
    assert stats[0]['raw']['layer_similarity'] is None and stats[0]['refined'] is None
    assert stats[1]['raw']['layer_similarity'] == pytest.approx(1)  # the received map is block 0's
    assert len(stats[2]['raw']['mean_distance_per_head']) == 4
    gapped = layer_stats(attention_maps(model, x, layers=[0, 2]), grid)
    assert gapped[1]['raw']['layer_similarity'] is None


@pytest.fixture(scope='module')
def cli_inputs(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp('attention_cli')
    image = folder / 'image.png'
    pixels = (torch.rand(48, 60, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(image)
    torch.manual_seed(0)
    refiner = timm.create_model('test_refiner_vit')
    save_file(refiner.state_dict(), str(folder / 'refiner.safetensors'))
    torch.save({'model': refiner.state_dict()}, folder / 'refiner_ckpt.pth')
    local = folder / 'plain'
    local.mkdir()
    config = {'architecture': 'vit_tiny_patch16_224', 'num_classes': 5,
              'pretrained_cfg': {'input_size': [3, 32, 32], 'crop_pct': 1.0, 'mean': [0.5] * 3, 'std': [0.5] * 3},
              'model_args': {'img_size': 32, 'depth': 2}}
    (local / 'config.json').write_text(json.dumps(config))
    save_file(_plain_vit().state_dict(), str(local / 'model.safetensors'))
    return folder


def test_cli_writes_pngs_and_stats(cli_inputs, tmp_path, capsys):
    out = tmp_path / 'out'
    code = main(['attention', '--model', 'test_refiner_vit', '--checkpoint', str(cli_inputs / 'refiner_ckpt.pth'),
                 '--image', str(cli_inputs / 'image.png'), '--output', str(out), '--layers', '1',
                 '--compare', f'local-dir:{cli_inputs / "plain"}'])
    assert code == 0
    for name in ('attention.png', 'metrics.png'):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(out / name).ndim == 3
    stats = json.loads((out / 'attention_stats.json').read_text())
    assert [layer['kind'] for layer in stats['layers']] == EXPECTED_KINDS['refiner_vit']
    assert set(stats['layers'][1]['raw']) == STAT_KEYS
    assert stats['grid'] == [4, 4]
    assert [layer['kind'] for layer in stats['compare']['layers']] == ['plain', 'plain']
    assert stats['compare']['layers'][1]['refined'] is None


@pytest.mark.parametrize('flags, message', [
    (['--layers', '7'], 'out of range'),
    (['--image', 'missing.png'], 'missing.png: no such file'),
    (['--checkpoint', 'plain/model.safetensors'], 'does not fit'),
    (['--model', 'no_such_model'], 'no_such_model: no such model'),
])
def test_cli_refuses_bad_input(cli_inputs, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(cli_inputs)
    args = dict(zip(['--model', '--image', '--output'], ['test_refiner_vit', 'image.png', str(tmp_path)]))
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag] = value
    assert main(['attention', *[item for pair in args.items() for item in pair]]) == 2
    assert message in capsys.readouterr().err
