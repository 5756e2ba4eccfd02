"""The models between a plain ViT and Refiner-ViT: each changes one thing, and only that, from its neighbour.

vit -> vit_conv_stem (stem) -> refiner_vit_no_sharing (block details) -> refiner_vit_no_refiner (sharing) ->
refiner_vit (refiner); vit_conv_stem_refiner is the conv-stem ViT with the paper-form refiner.
"""
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from refiner_vit import fuse_for_inference
from refiner_vit.layers import AttentionRefiner, ConvStem, ConvStemPatchEmbed
from refiner_vit.models.refiner_vit import ComputingAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from study import variants  # noqa: E402,F401  (registers the study's models)
from study.sharing import IsolatedAttention  # noqa: E402

E, DEPTH, HEADS, STEM = 16, 4, 2, (8, 8, 16)
ARCH = dict(img_size=8, patch_size=2, embed_dim=E, depth=DEPTH, num_heads=HEADS, num_classes=5)
VARIANTS = {
    'vit': ('deit_tiny_patch16_224', {}),
    'vit_conv_stem': ('deit_tiny_conv_stem_patch16_224', dict(stem_chs=STEM)),
    'vit_conv_stem_refiner': ('refined_deit_tiny_conv_stem_patch16_224', dict(stem_chs=STEM)),
    'refiner_vit_no_sharing': ('study_refiner_vit_no_sharing', dict(stem_chs=STEM, aux_head=False)),
    'refiner_vit_no_refiner': ('study_refiner_vit_no_refiner', dict(stem_chs=STEM, aux_head=False)),
    'refiner_vit': ('test_refiner_vit', dict(stem_chs=STEM, aux_head=False)),
}


def _build(name: str) -> nn.Module:
    model, kwargs = VARIANTS[name]
    torch.manual_seed(0)
    return timm.create_model(model, **ARCH, **kwargs)


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def _count(shapes: dict) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def _mlp(ratio: int) -> int:
    return 2 * ratio * E * E + ratio * E + E  # fc1 and fc2 with biases


@pytest.mark.parametrize('name', list(VARIANTS))
def test_each_variant_builds_and_trains_one_step(name):
    model = _build(name).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'
    # In training, the released refiner's per-head out_norm subtracts the batch mean of norm3's output plus the
    # shortcut, so norm3's bias cannot change the output: its exact gradient is zero, and it starts at zero.
    cancelled = {k for k in before if k.endswith('refiner.norm3.bias')}
    for k in cancelled:
        assert model.get_parameter(k).grad.abs().max() < 1e-6, k
    optimizer.step()
    still = [k for k, p in model.named_parameters() if k not in cancelled and torch.equal(before[k], p)]
    assert not still, f'parameters did not move: {still}'
    assert torch.isfinite(loss) and model.eval()(x).shape == (4, 5)


def test_conv_stem_replaces_only_the_patch_embedding():
    vit, stem = _shapes(_build('vit')), _shapes(_build('vit_conv_stem'))
    assert {k: s for k, s in vit.items() if not k.startswith('patch_embed.')} == \
        {k: s for k, s in stem.items() if not k.startswith('patch_embed.')}
    c1, c2, c3 = STEM
    stem_params = 3 * c1 * 49 + c1 * c2 * 9 + c2 * c3 * 9 + 2 * (c1 + c2 + c3) + c3 * E * 1 * 1 + E
    assert _count(stem) - _count(vit) == stem_params - (3 * E * 2 * 2 + E)


def test_conv_stem_vit_embeds_with_refiner_vits_stem():
    model = _build('vit_conv_stem').eval()
    assert isinstance(model.patch_embed, ConvStemPatchEmbed) and model.patch_embed.grid_size == (4, 4)
    assert model.patch_embed.num_patches == 16 and model.patch_embed.feat_ratio() == 2
    assert model.pretrained_cfg['first_conv'] == 'patch_embed.conv1'
    x = torch.randn(2, 3, 8, 8)
    grid = ConvStem.forward(model.patch_embed, x)  # the unchanged stem: (B, C, rows, cols)
    assert torch.equal(model.patch_embed(x), grid.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match='dynamic_img_pad'):
        ConvStemPatchEmbed(8, 2, 3, E, dynamic_img_pad=True)


def test_conv_stem_vit_follows_a_dynamic_input_size():
    model = timm.create_model('deit_tiny_conv_stem_patch16_224', **ARCH, stem_chs=STEM, dynamic_img_size=True).eval()
    final, intermediates = model.forward_intermediates(torch.randn(1, 3, 12, 12))
    assert intermediates[-1].shape == (1, E, 6, 6) and final.shape == (1, 1 + 36, E)


def test_refined_conv_stem_vit_adds_exactly_the_refiners():
    stem, refined = _shapes(_build('vit_conv_stem')), _shapes(_build('vit_conv_stem_refiner'))
    added = {k: s for k, s in refined.items() if k not in stem}
    assert all('.attn.refiner.' in k for k in added) and set(stem) <= set(refined)
    expanded = 3 * HEADS
    assert _count(refined) - _count(stem) == DEPTH * (HEADS * expanded + expanded * 9 + expanded * HEADS)


def test_block_details_keep_the_stem_and_change_the_mlp():
    stem, blocks = _build('vit_conv_stem'), _build('refiner_vit_no_sharing')
    assert _shapes(stem.patch_embed) == _shapes(blocks.patch_embed)
    # MLP ratio 4 -> 3, plus a per-channel MLP output scale; attention, norms and heads have the same sizes
    assert _count(_shapes(blocks)) - _count(_shapes(stem)) == DEPTH * (_mlp(3) + E - _mlp(4))


def test_no_sharing_computes_every_map_from_its_own_block():
    model = _build('refiner_vit_no_sharing').eval()
    assert all(isinstance(b.attn, IsolatedAttention) for b in model.blocks)
    x = torch.randn(2, 3, 8, 8)
    tokens = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        tokens, _ = block(tokens, None)  # no map handed on, nothing accumulated
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_head(model.norm(tokens)), atol=1e-6)
        # a computing block of the released model, with the same weights, adds the map handed to it: another function
        attn = model.blocks[1].attn
        handing_on = ComputingAttention(E, HEADS)
        handing_on.load_state_dict(attn.state_dict())
        y, prev = torch.randn(2, 17, E), torch.rand(2, HEADS, 17, 17)
        assert torch.equal(attn(y, prev)[0], attn(y, None)[0])
        assert not torch.allclose(handing_on(y, prev)[0], attn(y, prev)[0], atol=1e-4)


def test_sharing_removes_the_query_and_key_weights_of_odd_blocks():
    computing, sharing = _build('refiner_vit_no_sharing'), _build('refiner_vit_no_refiner')
    assert [b.sharing for b in sharing.blocks] == [False, True] * (DEPTH // 2)
    assert _count(_shapes(computing)) - _count(_shapes(sharing)) == DEPTH // 2 * (2 * E * E + 2 * E)


def test_no_refiner_shares_the_maps_unrefined():
    model, released = _build('refiner_vit_no_refiner'), _build('refiner_vit')
    assert [isinstance(b.attn.refiner, nn.Identity) for b in model.blocks if b.sharing] == [True] * (DEPTH // 2)
    assert not any(isinstance(m, AttentionRefiner) for m in model.modules())
    refiner = sum(p.numel() for p in AttentionRefiner.released(HEADS, 3, 3).parameters())
    assert _count(_shapes(released)) - _count(_shapes(model)) == DEPTH // 2 * refiner
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the deployment folding still applies (it skips the identity)
        assert torch.allclose(fuse_for_inference(model)(x), model.eval()(x), atol=1e-5)


@pytest.mark.parametrize('name', list(VARIANTS)[1:-1])
def test_new_variants_keep_timms_contract(name):
    """FX tracing equals eager, intermediates end in the features (timm's checks, as test_timm_contract)."""
    from test_timm_contract import _fx_model

    model = _build(name).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        traced = list(_fx_model(model, train=False)(x).values())[0]
        assert torch.allclose(traced, model(x), atol=1e-5)
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6) and intermediates[-1].shape == (2, E, 4, 4)
