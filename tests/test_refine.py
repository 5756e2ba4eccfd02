"""The plug-in refiner on timm's ViT family: weights kept, identity start, small cost, clear refusals."""
import pytest
import timm
import torch
from torch import nn

from refiner_vit import AttentionRefiner, RefinedAttention, refine

SMALL = dict(img_size=32, depth=3)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('model_name', ['vit_tiny_patch16_224', 'deit_tiny_patch16_224', 'deit3_small_patch16_224'])
def test_identity_refine_keeps_predictions_and_weights(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    qkv, proj = model.blocks[0].attn.qkv, model.blocks[0].attn.proj
    state_before = model.state_dict()
    assert refine(model) is model
    assert all(isinstance(b.attn, RefinedAttention) for b in model.blocks)
    assert model.blocks[0].attn.qkv is qkv and model.blocks[0].attn.proj is proj
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # every original weight keeps its key; only refiner weights are new
    state_after = model.state_dict()
    assert set(state_before) <= set(state_after)
    assert all('.attn.refiner.' in k for k in set(state_after) - set(state_before))
    # and it trains: the refiners receive gradients
    model.train()
    model(x).sum().backward()
    assert all(b.attn.refiner.reduce.weight.grad.abs().sum() > 0 for b in model.blocks)


def test_pretrained_timm_state_dict_loads_into_a_refined_model():
    source = timm.create_model('deit_tiny_patch16_224', **SMALL)
    target = refine(timm.create_model('deit_tiny_patch16_224', **SMALL))
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all('.attn.refiner.' in k for k in result.missing_keys)


def test_refined_attention_matches_a_manual_computation():
    """softmax(q k^T s) -> refiner -> @ v, computed by hand with the composed convolution."""
    torch.manual_seed(1)
    model = refine(timm.create_model('vit_tiny_patch16_224', **SMALL), init='random').eval()
    attn = model.blocks[1].attn
    x = torch.randn(2, 5, 192)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    maps = (q @ k.transpose(-2, -1) * 64 ** -0.5).softmax(-1)
    refined = nn.functional.conv2d(maps, attn.refiner.composed_weight(), padding=1)
    expected = attn.proj((refined @ v).transpose(1, 2).reshape(2, 5, 192))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_selected_blocks_and_released_form():
    model = refine(timm.create_model('vit_tiny_patch16_224', **SMALL), blocks=[0, -1], form='released')
    kinds = [isinstance(b.attn, RefinedAttention) for b in model.blocks]
    assert kinds == [True, False, True]
    assert not model.blocks[0].attn.refiner.is_linear
    assert model.refine_args['blocks'] == [0, 2] and model.refine_args['init'] == 'random'
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_refiner_adds_under_two_percent_parameters():
    with torch.device('meta'):
        deit = timm.create_model('deit_small_patch16_224')
        refined = timm.create_model('refined_deit_small_patch16_224')
    added = _params(refined) - _params(deit)
    assert added == 12 * (18 * 6 + 18 * 9 + 6 * 18)  # expand + depthwise + reduce, 12 blocks
    assert added / _params(deit) < 0.02


def test_refined_deit_models_are_deit_plus_random_refiners():
    model = timm.create_model('refined_deit_tiny_patch16_224')
    assert all(isinstance(b.attn, RefinedAttention) for b in model.blocks)
    refiner = model.blocks[0].attn.refiner
    assert refiner.is_linear and refiner.expansion_ratio == 3 and refiner.kernel_size == 3
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        refined_maps = []
        handle = model.blocks[0].attn.tap.register_forward_hook(lambda m, args, out: refined_maps.append(args))
        model.eval()(x)
        handle.remove()
    raw, refined = refined_maps[0]
    assert raw.shape == refined.shape == (1, 3, 197, 197)
    torch.testing.assert_close(raw.sum(-1), torch.ones(1, 3, 197))
    assert not torch.allclose(raw, refined)  # randomly initialised: the refiner changes the maps


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(form='conv'), ValueError, 'form'),
    (dict(init='zeros'), ValueError, 'init'),
    (dict(form='released', init='identity'), ValueError, 'linear'),
    (dict(blocks=[7]), IndexError, 'block index 7'),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        refine(timm.create_model('vit_tiny_patch16_224', **SMALL), **kwargs)


def test_refusals():
    model = refine(timm.create_model('vit_tiny_patch16_224', **SMALL))
    with pytest.raises(ValueError, match='already refined'):
        refine(model)
    with pytest.raises(TypeError, match='blocks'):
        refine(timm.create_model('resnet18'))
    with pytest.raises(TypeError, match='Attention'):
        RefinedAttention.from_attention(nn.Linear(4, 4), AttentionRefiner(2))
