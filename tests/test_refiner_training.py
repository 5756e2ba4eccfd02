"""The released refiner's training path (refiner_vit/layers/released.py) against the autograd stages: BatchNorm's
semantics in each of its settings, rectangular maps, and a whole model under grad checkpointing."""
import copy

import pytest
import timm
import torch
from helpers import randomise_batchnorms
from torch import nn

from refiner_vit.layers import AttentionRefiner, recompute, released
from refiner_vit.layers import refiner as refiner_module


@pytest.fixture(autouse=True)
def fast_paths_for_small_maps(monkeypatch):
    """The tests' maps are small; the path and the recompute apply from a size on, here from any."""
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', 0)
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', 0)


def _grads(refiner: AttentionRefiner, maps: torch.Tensor, upstream: torch.Tensor, stages: bool):
    x = maps.clone().requires_grad_()
    out = refiner.forward_stages(x) if stages else refiner(x)
    assert stages or out.grad_fn.name() == '_ReleasedRefinerBackward'
    params = [p for p in refiner.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad((out * upstream).sum(), [x, *params])


@pytest.mark.parametrize('recompute_on', [True, False])
@pytest.mark.parametrize('norm', [
    dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.3, eps=1e-3)],
    ids=['cumulative', 'no-affine', 'no-running-stats', 'momentum-eps'])
def test_batchnorm_settings_match_the_stages_in_float64(norm, recompute_on):
    def make() -> AttentionRefiner:
        torch.manual_seed(0)
        refiner = AttentionRefiner(3, expansion_ratio=2, kernel_size=5, norm_layer=lambda c: nn.BatchNorm2d(c, **norm),
                                   act_layer=nn.ReLU6, shortcut=True, out_norm_layer=nn.BatchNorm2d,
                                   recompute=recompute_on)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in [*refiner.norm1.parameters(), *refiner.norm2.parameters(), *refiner.norm3.parameters()]:
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            for bn in (refiner.norm1, refiner.norm2):
                if bn.running_var is not None:
                    bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        return refiner.double().train()

    fast, reference = make(), make()
    gen = torch.Generator().manual_seed(2)
    for step in range(2):  # the second step sees the first's running statistics (cumulative average: 1/2)
        maps = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64).softmax(-1) * 3  # rectangular maps
        upstream = torch.randn(maps.shape, generator=gen, dtype=torch.float64)
        out, grads = _grads(fast, maps, upstream, stages=False)
        out_ref, grads_ref = _grads(reference, maps, upstream, stages=True)
        torch.testing.assert_close(out, out_ref, rtol=1e-11, atol=1e-12)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for (name, a), b in zip(fast.named_buffers(), reference.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f'{name} after step {step}')


def test_frozen_parameters_and_maps_without_gradient():
    """Only what needs a gradient gets one; the maps may need none (a refiner's parameters alone train)."""
    torch.manual_seed(0)
    fast = AttentionRefiner.released(2).double().train()
    fast.expand.weight.requires_grad_(False)
    reference = copy.deepcopy(fast)
    maps = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    upstream = torch.randn(maps.shape, dtype=torch.float64)
    out = fast(maps)
    assert out.grad_fn.name() == '_ReleasedRefinerBackward'
    params = [p for p in fast.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    grads_ref = torch.autograd.grad((reference.forward_stages(maps) * upstream).sum(), ref_params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('recompute_on', [True, False])
def test_grad_checkpointed_model_matches_the_autograd_stages(monkeypatch, recompute_on):
    """A whole model under grad checkpointing, the training path against the stages (path switched off)."""
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit', refiner_recompute=recompute_on).double().train()
    randomise_batchnorms(model, torch.Generator().manual_seed(5))
    model.set_grad_checkpointing(True)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def step(net):
        loss = net(x).logsumexp(-1).mean()
        return loss.detach(), torch.autograd.grad(loss, list(net.parameters()))

    loss, grads = step(model)
    monkeypatch.setattr(refiner_module, 'released_applies', lambda refiner, attn: False)
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', 2 ** 62)  # and no chunked recompute: plain autograd
    loss_ref, grads_ref = step(reference)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11, msg=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize('recompute_on', [True, False])
@pytest.mark.parametrize('shortcut, out_norm', [(False, nn.BatchNorm2d), (True, None)],
                         ids=['no-shortcut', 'no-out-norm'])
def test_other_tails_run_as_modules_and_match_the_stages(shortcut, out_norm, recompute_on):
    """The closed-form tail serves the released one (BatchNorm, shortcut, BatchNorm); others run their modules."""
    def make() -> AttentionRefiner:
        torch.manual_seed(0)
        refiner = AttentionRefiner(3, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU6, shortcut=shortcut,
                                   out_norm_layer=out_norm, recompute=recompute_on)
        return randomise_batchnorms(refiner, torch.Generator().manual_seed(1)).double().train()

    fast, reference = make(), make()
    maps = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    upstream = torch.randn(maps.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, grads = _grads(fast, maps, upstream, stages=False)
    out_ref, grads_ref = _grads(reference, maps, upstream, stages=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-11, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(fast.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('recompute_on', [True, False])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(recompute_on):
    """Backward writes gradients over maps it recomputed, never over the maps it saved."""
    torch.manual_seed(0)
    refiner = AttentionRefiner.released(2, recompute=recompute_on).double().train()
    maps = torch.rand(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    loss = (refiner(maps) * torch.randn(maps.shape, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, [maps, *refiner.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [maps, *refiner.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_maps_too_small_to_gain_run_the_stages(monkeypatch):
    """Below RELEASED_MIN_BYTES of expanded maps the autograd stages are faster, so they run; from it on, the path."""
    refiner = AttentionRefiner.released(2, 3, 3).train()
    maps = torch.rand(2, 2, 5, 5).softmax(-1).requires_grad_()
    expanded_bytes = maps.numel() * maps.element_size() * 3
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', expanded_bytes + 1)
    assert refiner(maps).grad_fn.name() != '_ReleasedRefinerBackward'
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', expanded_bytes)
    assert refiner(maps).grad_fn.name() == '_ReleasedRefinerBackward'
