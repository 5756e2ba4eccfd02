"""The study's rivals of the refiner (talking heads, re-attention, kernel 1, expansion 1) and the attention metrics
every reported run records: sizes, training, reloading from ``refiner train``'s run folder, and equality with
``refiner attention``."""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from refiner_vit.cli import main as refiner_main
from refiner_vit.data.digits import DigitsDataset
from refiner_vit.layers import RefinedAttention
from refiner_vit.models.resolve import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from study import cli, mechanism, rivals, variants  # noqa: E402

E, DEPTH, HEADS = 16, 2, 2
ARCH = dict(img_size=8, patch_size=2, embed_dim=E, depth=DEPTH, num_heads=HEADS)
STEM = dict(stem_chs=(8, 8, 16))
CLASSES = 3


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _table() -> dict:
    table = variants.main_variants(E, DEPTH, HEADS, 2)
    table.update(variants.decomposition_variants(table))
    table.update(variants.rival_variants(table))
    return table


def _build(variant: variants.Variant) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(variant.model, img_size=8, num_classes=CLASSES, **variant.kwargs)


# parameters each rival adds to its ViT (per block, H heads): talking heads two Linear(H, H) with bias (CaiT's
# proj_l, proj_w); re-attention one Linear(H, H) with bias and a BatchNorm2d(H); the refiner (no biases) expands
# H -> r H, convolves each map with a k x k kernel and reduces r H -> H
ADDED = {
    'talking_heads': 2 * (HEADS * HEADS + HEADS),
    'reattention': HEADS * HEADS + HEADS + 2 * HEADS,
    'refiner_k1': 3 * HEADS * HEADS + 3 * HEADS + 3 * HEADS * HEADS,
    'refiner_r1': HEADS * HEADS + 9 * HEADS + HEADS * HEADS,
}


@pytest.mark.parametrize('stem', ['', 'conv_stem_'])
@pytest.mark.parametrize('rival', list(ADDED))
def test_rival_adds_the_stated_parameters_to_its_vit(rival, stem):
    table = _table()
    base = table['vit_conv_stem' if stem else 'vit']
    model = _build(table[stem + rival])
    assert _params(model) - _params(_build(base)) == DEPTH * ADDED[rival]
    assert all(isinstance(block.attn, RefinedAttention) for block in model.blocks)
    assert type(model.patch_embed) is type(_build(base).patch_embed)


def test_kernel_1_and_expansion_1_are_the_ablations_models():
    table, ablation = _table(), variants.ablation_variants
    assert ablation('kernel', _table(), DEPTH)['k=1'][1] == table['refiner_k1']
    assert ablation('expansion', _table(), DEPTH)['r=1'][1] == table['refiner_r1']


def test_talking_heads_equals_a_naive_cait_attention():
    """The same weights in timm's ``cait.TalkingHeadAttn`` give the same output (float64)."""
    from timm.models.cait import TalkingHeadAttn

    torch.manual_seed(0)
    ours = rivals.TalkingHeadsAttention(E, HEADS, qkv_bias=True).double()
    theirs = TalkingHeadAttn(E, HEADS, qkv_bias=True).double()
    theirs.load_state_dict({k.replace('refiner.', 'proj_w.'): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 5, E, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_reattention_is_a_head_mix_then_a_batchnorm_over_heads():
    torch.manual_seed(0)
    reattention = rivals.ReAttention(HEADS).double().train()
    maps = torch.rand(3, HEADS, 5, 5, dtype=torch.float64).softmax(-1)
    mix = reattention[0]
    mixed = torch.einsum('gh,bhij->bgij', mix.weight, maps) + mix.bias.view(1, -1, 1, 1)
    mean, var = mixed.mean(dim=(0, 2, 3), keepdim=True), mixed.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(reattention(maps), (mixed - mean) / torch.sqrt(var + 1e-5), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('name', [name for name in variants.RIVALS if name.endswith(tuple(ADDED))])
def test_rival_trains_one_step(name):
    model = _build(_table()[name]).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters()), 'a parameter did not move'
    assert torch.isfinite(loss)


def test_flops_count_the_plain_attention_as_the_rivals():
    """The rivals' FLOPs over the ViT's are their head mixes alone (2 N^2 H^2 each: one per block for
    re-attention, two for talking heads), so the ViT's fused attention is counted as theirs is, and left fused."""
    table, x = _table(), torch.randn(1, 3, 8, 8)
    vit = _build(table['vit']).eval()
    flops = {name: mechanism.count_flops(_build(table[name]).eval(), x) for name in ('talking_heads', 'reattention')}
    baseline = mechanism.count_flops(vit, x)
    tokens = (8 // 2) ** 2 + 1
    mix = 2 * tokens ** 2 * HEADS ** 2
    assert flops['reattention'] - baseline == DEPTH * mix
    assert flops['talking_heads'] - baseline == DEPTH * 2 * mix
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in vit.blocks)


def test_rival_refuses_pretrained():
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('study_talking_heads', pretrained=True)


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    """Digits of three classes: 14 per class for training (a tuning split of
    one 32-image batch), 1 for validation, as 8x8 PNG files."""
    root = tmp_path_factory.mktemp('three_digits')
    for split, per_class in (('train', 14), ('val', 1)):
        dataset, seen = DigitsDataset(split), {}
        for index in range(len(dataset)):
            image, label = dataset[index]
            if label < CLASSES and seen.get(label, 0) < per_class:
                seen[label] = seen.get(label, 0) + 1
                (root / split / str(label)).mkdir(parents=True, exist_ok=True)
                image.save(root / split / str(label) / f'{index}.png')
    return root


@pytest.mark.parametrize('name', ['conv_stem_talking_heads', 'reattention'])
def test_rival_round_trips_through_refiner_trains_run_folder(name, folder, tmp_path):
    variant = _table()[name]
    out = tmp_path / 'run'
    kwargs = [f'{k}={json.dumps(v) if not isinstance(v, str) else v}' for k, v in variant.kwargs.items()]
    assert refiner_main(['train', '--model', variant.model, '--model-kwargs', *kwargs, '--data', str(folder),
                         '--img-size', '8', '--epochs', '1', '--batch-size', '16', '--output', str(out),
                         '--no-progress', '--no-tensorboard', '--device', 'cpu', '--workers', '0']) == 0
    trained = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=False)['model']
    reloaded = resolve_model(str(out)).model
    assert type(reloaded.blocks[0].attn) is type(_build(variant).blocks[0].attn)
    state = reloaded.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)


@pytest.fixture(scope='module')
def study(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('rivals_study')
    argv = ['--data', str(folder), '--img-size', '8', '--embed-dim', str(E), '--depth', str(DEPTH), '--num-heads',
            str(HEADS), '--seeds', '1', '--epochs', '1', '--lrs', '1e-3', '--jobs', '1', '--ablation', 'rivals_depth',
            '--work', str(out / 'work'), '--json', str(out / 'rivals.json')]
    assert cli.main(argv) == 0
    return json.loads((out / 'rivals.json').read_text()), out


def test_study_records_metrics_flops_table_and_plot(study):
    data, out = study
    assert list(data['variants']) == list(variants.RIVALS_DEPTH)
    for name, agg in data['variants'].items():
        run = agg['runs'][0]
        assert run['flops'] > 0 and len(run['mechanism']) == DEPTH
        summary = data['mechanism'][name]
        for which in ('raw', 'used'):
            assert set(summary[which]) == set(mechanism.METRICS)
            recorded = 'raw' if which == 'raw' or name == 'vit' else 'refined'  # 'used': the map multiplied with V
            assert summary[which]['head_similarity']['deepest'] == pytest.approx(
                run['mechanism'][-1][recorded]['head_similarity'], abs=1e-4)
        assert summary['used']['layer_similarity']['per_block'][0] is None  # no block before the first
    flops = {name: agg['runs'][0]['flops'] for name, agg in data['variants'].items()}
    assert flops['refiner'] > flops['talking_heads'] > flops['vit']
    assert (out / 'rivals_mechanism.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _same(ours, theirs) -> bool:
    """Equal up to the float32 rounding of the forward passes (one image or a batch round differently); None
    (the first block's similarity to a previous one) only with None."""
    return ours is None if theirs is None else ours == pytest.approx(theirs, rel=1e-6, abs=1e-7)


def test_study_metrics_equal_refiner_attentions(study, folder, tmp_path):
    """The study's metrics of a run are ``refiner attention``'s for the same weights, averaged over the
    validation images (here three, each given to the command), also when computed in batches of two."""
    data, _ = study
    run = data['variants']['refiner']['runs'][0]
    images = sorted(str(p) for p in (folder / 'val').rglob('*.png'))
    per_image = []
    for index, image in enumerate(images):
        out = tmp_path / str(index)
        assert refiner_main(['attention', '--model', run['output'], '--image', image, '--output', str(out)]) == 0
        per_image.append(json.loads((out / 'attention_stats.json').read_text())['layers'])
    in_pairs = mechanism.split_metrics(run['output'], images, batch=2)['layers']
    assert len(run['mechanism']) == len(per_image[0]) == len(in_pairs) == DEPTH
    for block, (ours, pairs) in enumerate(zip(run['mechanism'], in_pairs)):
        for which in ('raw', 'refined'):
            for metric in mechanism.METRICS:
                values = [layers[block][which][metric] for layers in per_image]
                mean = None if values[0] is None else sum(values) / len(values)
                assert _same(ours[which][metric], mean), (block, which, metric)
                assert _same(pairs[which][metric], mean), (block, which, metric)
