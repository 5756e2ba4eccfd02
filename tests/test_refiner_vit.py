"""Refiner-ViT: the authors' architecture exactly (parameter table, key map, golden fixture) and its behaviour."""

import pytest
import timm
import torch
from official import VARIANTS

import refiner_vit.models.refiner_vit as refiner_vit_module
from refiner_vit import RefinerVisionTransformer, checkpoint_filter_fn


def _meta_model(name: str, **kwargs) -> RefinerVisionTransformer:
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('variant', VARIANTS)
def test_parameter_counts_equal_the_authors(variant, official_shapes):
    expected = official_shapes[variant]
    assert _num_params(_meta_model(VARIANTS[variant])) == expected['params_with_aux_head']
    assert _num_params(_meta_model(VARIANTS[variant], aux_head=False)) == expected['params_without_aux_head']


@pytest.mark.parametrize('variant', VARIANTS)
def test_authors_keys_map_onto_ours_exactly(variant, official_shapes):
    model = _meta_model(VARIANTS[variant])
    official = {k: torch.empty(shape, device='meta') for k, shape in official_shapes[variant]['state_dict'].items()}
    mapped = checkpoint_filter_fn(official, model)
    ours = model.state_dict()
    assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
    for key, value in mapped.items():
        assert value.shape == ours[key].shape, key


def _golden_model(golden) -> RefinerVisionTransformer:
    model = RefinerVisionTransformer(
        img_size=64, embed_dim=64, num_heads=4, depth=4, mlp_ratio=3, num_classes=10, aux_head=True)
    official = {k[len('official.'):]: v for k, v in golden.items() if k.startswith('official.')}
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    return model


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= rel, f'relative error {error:.3g} > {rel}'


def test_golden_fixture_eval_output(golden):
    model = _golden_model(golden).eval()
    with torch.no_grad():
        _assert_rel_close(model(golden['input']), golden['logits_eval'])


def test_golden_fixture_train_outputs(golden):
    model = _golden_model(golden).train()
    with torch.no_grad():
        cls_logits, aux_logits, box = model.forward_train(golden['input'])
    assert box == (0, 0, 0, 0)
    _assert_rel_close(cls_logits, golden['train_cls'])
    _assert_rel_close(aux_logits, golden['train_aux'])


def test_golden_fixture_detects_a_wrong_model(golden):
    """The comparison can fail: dropping the refiner's shortcut changes the output well beyond 1e-5."""
    model = _golden_model(golden).eval()
    model.blocks[1].attn.refiner.shortcut = False
    with torch.no_grad():
        out = model(golden['input'])
    assert (out - golden['logits_eval']).abs().max() / golden['logits_eval'].abs().max() > 1e-3


def test_blocks_alternate_computing_and_sharing():
    model = timm.create_model('test_refiner_vit', depth=5)
    assert [b.sharing for b in model.blocks] == [False, True, False, True, False]
    assert model.blocks[1].attn.v.weight.shape == (64, 64)
    assert model.blocks[0].attn.qkv.weight.shape == (192, 64)


def test_eval_output_combines_class_and_aux_heads():
    model = timm.create_model('test_refiner_vit').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.head(features[:, 0]) + 0.5 * model.aux_head(features[:, 1:]).max(1)[0]
        torch.testing.assert_close(model(x), expected)
        cls_logits, aux, _ = model.forward_train(x)
        torch.testing.assert_close(cls_logits, model.head(features[:, 0]))
        assert aux.shape == (2, 16, 10)
    no_aux = timm.create_model('test_refiner_vit', aux_head=False).eval()
    assert no_aux.aux_head is None
    assert no_aux.forward_train(x).shape == (2, 10)


def test_mix_token_unmixes_aux_logits(monkeypatch):
    """With a box covering the whole grid, MixToken swaps whole images: class logits come from the
    partner image and the un-mixed aux logits must equal those of an un-mixed pass."""
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit', mix_token=True).train()
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.setattr(refiner_vit_module, 'rand_bbox', lambda size, lam: (0, 0, size[1], size[2]))
    with torch.no_grad():
        cls_mixed, aux_mixed, box = model.forward_train(x)
        model.mix_token = False
        cls_plain, aux_plain, _ = model.forward_train(x)
    assert box == (0, 0, 4, 4)
    torch.testing.assert_close(cls_mixed, cls_plain.flip(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aux_mixed, aux_plain, rtol=1e-4, atol=1e-5)


def test_mix_token_partial_box_only_changes_tokens_inside(monkeypatch):
    model = timm.create_model('test_refiner_vit', mix_token=True).train()
    monkeypatch.setattr(refiner_vit_module, 'rand_bbox', lambda size, lam: (1, 0, 3, 2))
    captured = {}

    def capture(module, args):
        captured['tokens'] = args[0].detach()

    model.blocks[0].register_forward_pre_hook(capture)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, aux, box = model.forward_train(x)
        grid = model.patch_embed(x)
    assert box == (1, 0, 3, 2) and aux.shape == (2, 16, 10)
    tokens = (captured['tokens'][:, 1:] - model.pos_embed[:, 1:]).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 0:2] = True
    torch.testing.assert_close(tokens[..., inside], grid.flip(0)[..., inside], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens[..., ~inside], grid[..., ~inside], rtol=1e-4, atol=1e-5)


def test_other_input_sizes_resample_the_position_embedding():
    small = timm.create_model('test_refiner_vit').eval()
    big = timm.create_model('test_refiner_vit', img_size=96).eval()
    assert big.pos_embed.shape == (1, 1 + 6 * 6, 64)
    missing = big.load_state_dict(checkpoint_filter_fn(small.state_dict(), big))
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(1, 3, 96, 96)
    dynamic = timm.create_model('test_refiner_vit', dynamic_img_size=True).eval()
    dynamic.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), big(x), rtol=1e-5, atol=1e-5)
        small.set_input_size(96)
        torch.testing.assert_close(small(x), big(x), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit', drop_path_rate=0.)
    model.eval()  # running BatchNorm statistics: recomputation must not change anything
    x = torch.randn(2, 3, 64, 64)
    outputs, grads = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_model_api_helpers():
    model = timm.create_model('test_refiner_vit')
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    groups = model.group_matcher()
    assert 'stem' in groups and 'blocks' in groups
    from timm.models import group_parameters
    grouped = group_parameters(model, groups)
    assert sum(len(v) for v in grouped.values()) == len(list(model.named_parameters()))
    model.reset_classifier(5)
    assert model.head.out_features == 5 and model.aux_head.out_features == 5
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert model.aux_head is None and model(torch.randn(1, 3, 64, 64)).shape == (1, 64)


@pytest.mark.parametrize('kwargs,match', [
    (dict(global_pool='max'), 'global_pool'),
    (dict(embed_dim=66), 'divisible'),
    (dict(patch_size=15), 'patch_size'),
    (dict(mix_token=True, aux_head=False), 'mix_token'),
])
def test_bad_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('test_refiner_vit', **kwargs)


@pytest.mark.parametrize('batch', [1, 2])
def test_token_pooling_and_the_aux_head(batch):
    """global_pool='' gives logits per token; the aux head's image-level term cannot be added to them, so that
    combination is refused (it once broadcast the aux maximum onto every token at batch 1, and failed at 2)."""
    with pytest.raises(ValueError, match="global_pool=''"):
        timm.create_model('test_refiner_vit', global_pool='')
    model = timm.create_model('test_refiner_vit')
    with pytest.raises(ValueError, match="global_pool=''"):
        model.reset_classifier(10, '')
    assert model.global_pool == 'token' and model.num_classes == 10  # unchanged by the refused call
    model.reset_classifier(0, '')  # no heads: tokens out
    plain = timm.create_model('test_refiner_vit', global_pool='', aux_head=False).eval()
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        assert model.eval()(x).shape == (batch, 17, 64)
        assert plain(x).shape == (batch, 17, 10)


@pytest.mark.parametrize('drop_path', [0., 0.2])
@pytest.mark.parametrize('residual_scale', [0.5, 0.3])
@pytest.mark.parametrize('sharing', [False, True])
def test_block_scales_its_branches_as_the_authors_formula(sharing, residual_scale, drop_path):
    """The block folds ``s`` into the LayerNorms' eps and its residual adds: the authors'
    ``x + drop_path(f(norm(s x)) / s)`` still, outputs and gradients in float64, in training and eval."""
    block = refiner_vit_module.RefinerBlock(
        32, 4, sharing=sharing, residual_scale=residual_scale, drop_path=drop_path, mlp_scale_init=0.3).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)
    prev = torch.rand(2, 4, 10, 10, dtype=torch.float64).softmax(-1)

    def authors(x):
        y, attn_map = block.attn(block.norm1(x * residual_scale), prev)
        x = x + block.drop_path1(y / residual_scale)
        return x + block.drop_path2(block.mlp_scale(block.mlp(block.norm2(x * residual_scale))) / residual_scale)

    for training in (True, False):
        block.train(training)
        results = []
        for forward in (lambda x: block(x, prev)[0], authors):
            torch.manual_seed(0)  # the same drop path draws
            out = forward(x)
            results.append((out, *torch.autograd.grad((out ** 2).sum(), [x, *block.parameters()])))
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
