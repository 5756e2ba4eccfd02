"""The released refiner's native training kernels (refiner_vit/ops/csrc/released_training.c): each pass against the
formulas in float64, the whole training path against the float64 autograd stages, and the measured rule that
chooses them."""
import copy
import json

import pytest
import timm
import torch
from helpers import needs_compiler, randomise_batchnorms
from torch import nn
from torch.nn import functional as F

from refiner_vit.layers import AttentionRefiner, recompute, released
from refiner_vit.ops import dispatch, mode_set, recording
from refiner_vit.ops.build import cache_dir
from refiner_vit.ops.head_passes import TORCH, native_head_passes
from refiner_vit.ops.released_training import ExpandedWeights, released_training_kernel

OPS = ('released_training_forward', 'released_training_backward')
# (batch, heads, expansion ratio, kernel size, rows, columns): maps narrower than a vector, a column past one and two
# vectors, rectangular maps, k = 1, 5 and 7, Refiner-ViT-S's 12 heads.
SHAPES = [(3, 4, 3, 3, 13, 21), (2, 3, 2, 5, 7, 9), (2, 12, 3, 3, 33, 33), (1, 5, 3, 7, 20, 3), (2, 2, 2, 1, 17, 16),
          (1, 1, 1, 3, 1, 1)]


@pytest.fixture(autouse=True)
def fast_paths_for_small_maps(monkeypatch):
    """The tests' maps are small; the path and the recompute apply from a size on, here from any."""
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', 0)
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', 0)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """Largest error relative to the largest magnitude of the float64 result (sums of many terms cancel), or to
    ``floor`` where that is smaller (a gradient that is zero but for rounding, as norm3's bias before out_norm)."""
    assert actual.shape == expected.shape
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()


def _problem(batch, heads, ratio, k, rows, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    expanded = heads * ratio
    x = torch.randn(batch, heads, rows, cols, generator=gen).softmax(-1) * 5
    grad = torch.randn(batch, heads, rows, cols, generator=gen)
    weights = ExpandedWeights(
        expand=torch.randn(expanded, heads, generator=gen), expand_bias=torch.randn(expanded, generator=gen),
        kernel=torch.randn(expanded, k, k, generator=gen) * 0.5, scale2=torch.rand(expanded, generator=gen) + 0.5,
        shift2=torch.randn(expanded, generator=gen), reduce=torch.randn(heads, expanded, generator=gen))
    return x, grad, weights


def _formulas(x, grad, w, slope, offset):
    """The passes' quantities in float64, written from the formulas in the kernel's comment."""
    d = torch.float64
    k = w.kernel.shape[-1]
    x, grad = x.to(d), grad.to(d)
    kernel = w.kernel.to(d)[:, None].requires_grad_()
    f = (torch.einsum('eh,bhnm->benm', w.expand.to(d), x) + w.expand_bias.to(d)[:, None, None]).clamp(0, 6)
    f.requires_grad_()
    z = F.conv2d(f, kernel, padding=k // 2, groups=f.shape[1])
    y = w.scale2.to(d)[:, None, None] * z + w.shift2.to(d)[:, None, None]
    s = y.clamp(0, 6)
    g2 = torch.einsum('he,bhnm->benm', w.reduce.to(d), grad) * ((y > 0) & (y < 6))
    gz = (w.scale2.to(d)[:, None, None] * g2 + slope.to(d)[:, None, None] * z + offset.to(d)[:, None, None]).detach()
    grad_f, grad_kernel = torch.autograd.grad(z, [f, kernel], gz)
    g1 = grad_f * ((f > 0) & (f < 6))
    return dict(
        z_sum=z.sum((0, 2, 3)), z_squares=(z * z).sum((0, 2, 3)), g2_sum=g2.sum((0, 2, 3)),
        g2_z=(g2 * z).sum((0, 2, 3)), grad_reduce=torch.einsum('bhnm,benm->he', grad, s), grad_kernel=grad_kernel,
        g1_sum=g1.sum((0, 2, 3)), g1_x=torch.einsum('benm,bhnm->eh', g1, x),
        gx=torch.einsum('eh,benm->bhnm', w.expand.to(d), g1))


@needs_compiler
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_each_pass_matches_its_formulas_in_float64(shape):
    x, grad, weights = _problem(*shape)
    heads, expanded, k = shape[1], shape[1] * shape[2], shape[3]
    gen = torch.Generator().manual_seed(9)
    slope, offset = torch.randn(expanded, generator=gen), torch.randn(expanded, generator=gen)
    kernel = released_training_kernel(heads, expanded, k)
    expected = _formulas(x, grad, weights, slope, offset)
    x_sum, x_products = kernel.input_moments(x, 0.25)
    z_sum, z_squares = kernel.conv_stats(x, weights.expand, weights.expand_bias, weights.kernel)
    g2_sum, g2_z, grad_reduce = kernel.backward_stats(x, grad, weights)
    grad_kernel, g1_sum, g1_x, gx = kernel.backward_input(x, grad, weights, slope, offset, need_input=True)
    shifted = x.double().transpose(0, 1).flatten(1) - 0.25
    expected.update(x_sum=shifted.sum(1), x_products=shifted @ shifted.t())
    actual = dict(x_sum=x_sum, x_products=x_products, z_sum=z_sum, z_squares=z_squares, g2_sum=g2_sum, g2_z=g2_z,
                  grad_reduce=grad_reduce, grad_kernel=grad_kernel, g1_sum=g1_sum, g1_x=g1_x, gx=gx)
    for name, value in actual.items():
        assert _relative_error(value, expected[name]) < 2e-6, name
    assert kernel.backward_input(x, grad, weights, slope, offset, need_input=False)[3] is None


@needs_compiler
def test_passes_do_not_depend_on_the_thread_count_beyond_rounding():
    x, grad, weights = _problem(3, 4, 3, 3, 29, 29)
    kernel = released_training_kernel(4, 12, 3)
    slope, offset = torch.ones(12), torch.zeros(12)
    before = torch.get_num_threads()
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            results.append(kernel.backward_input(x, grad, weights, slope, offset, need_input=True))
        finally:
            torch.set_num_threads(before)
    for one, other in zip(*results):
        assert _relative_error(other, one.double()) < 1e-6


def _refiner(heads=4, ratio=3, k=3, seed=0, **norm) -> AttentionRefiner:
    torch.manual_seed(seed)
    refiner = AttentionRefiner(heads, expansion_ratio=ratio, kernel_size=k,
                               norm_layer=lambda c: nn.BatchNorm2d(c, **norm), act_layer=nn.ReLU6, shortcut=True,
                               out_norm_layer=nn.BatchNorm2d)
    return randomise_batchnorms(refiner, torch.Generator().manual_seed(seed + 1)).train()


def _step(refiner, maps, upstream, dtype, stages=False, input_grad=True):
    """Output, gradients (input first where wanted) and buffers after one training step, all in float64."""
    refiner = refiner.to(dtype)
    x = maps.to(dtype).clone().requires_grad_(input_grad)
    out = refiner.forward_stages(x) if stages else refiner(x)
    params = [p for p in refiner.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * upstream.to(dtype)).sum(), ([x] if input_grad else []) + params)
    return out.detach().double(), [g.double() for g in grads], [b.double() for b in refiner.buffers()]


@needs_compiler
@pytest.mark.parametrize('norm', [{}, dict(momentum=None), dict(affine=False), dict(momentum=0.3, eps=1e-3)],
                         ids=['default', 'cumulative', 'no-affine', 'momentum-eps'])
@pytest.mark.parametrize('shape', [(3, 4, 3, 3, 17, 17), (2, 3, 2, 5, 7, 9)], ids=['17x17', '7x9-k5'])
def test_native_training_path_matches_the_float64_stages(shape, norm):
    batch, heads, ratio, k, rows, cols = shape
    gen = torch.Generator().manual_seed(2)
    native, reference, torch_forms = (_refiner(heads, ratio, k, **norm) for _ in range(3))
    reference.double()
    for step in range(2):  # the second step sees the first's running statistics
        maps = torch.randn(batch, heads, rows, cols, generator=gen, dtype=torch.float64).softmax(-1) * 3
        upstream = torch.randn(maps.shape, generator=gen, dtype=torch.float64)
        with mode_set('1'), recording() as record:
            out, grads, buffers = _step(native, maps, upstream, torch.float32)
        assert {op: dict(record[op]) for op in OPS} == {op: {'native (REFINER_NATIVE_KERNELS=1)': 1} for op in OPS}
        with mode_set('0'):
            out_torch, grads_torch, _ = _step(torch_forms, maps, upstream, torch.float32)
        out_ref, grads_ref, buffers_ref = _step(reference, maps, upstream, torch.float64, stages=True)
        assert _relative_error(out, out_ref) < 1e-5
        floor = 1e-2 * max(g.abs().max().item() for g in grads_ref)
        for a, b, t in zip(grads, grads_ref, grads_torch):  # as accurate as the torch forms in float32, or better
            assert _relative_error(a, b, floor) < max(1e-5, 3 * _relative_error(t, b, floor))
        for name, a, b in zip(dict(native.named_buffers()), buffers, buffers_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f'{name} after step {step}')


@needs_compiler
def test_maps_without_gradient_and_frozen_parameters():
    refiner, reference = _refiner(), _refiner().double()
    refiner.conv.weight.requires_grad_(False)
    reference.conv.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 4, 15, 15, generator=gen, dtype=torch.float64).softmax(-1)
    upstream = torch.randn(maps.shape, generator=gen, dtype=torch.float64)
    with mode_set('1'):
        _, grads, _ = _step(refiner, maps, upstream, torch.float32, input_grad=False)
    _, grads_ref, _ = _step(reference, maps, upstream, torch.float64, stages=True, input_grad=False)
    assert len(grads) == len(grads_ref) == len(list(refiner.parameters())) - 1
    floor = 1e-2 * max(g.abs().max().item() for g in grads_ref)
    for a, b in zip(grads, grads_ref):
        assert _relative_error(a, b, floor) < 1e-5


@needs_compiler
def test_grad_checkpointed_model_matches_the_torch_forms():
    """A whole model under grad checkpointing (the forward runs twice, the refiner's BatchNorms update once)."""
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit').train()
    randomise_batchnorms(model, torch.Generator().manual_seed(5))
    model.set_grad_checkpointing(True)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))

    def step(net, native):
        with mode_set(native), recording() as record:
            loss = net(x).logsumexp(-1).mean()
            grads = torch.autograd.grad(loss, list(net.parameters()))
        return loss.detach(), grads, record

    loss, grads, record = step(model, '1')
    assert record['released_training_backward']['native (REFINER_NATIVE_KERNELS=1)'] > 0
    loss_ref, grads_ref, _ = step(reference, '0')
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _one_step(refiner, record_ops=OPS):
    dtype = refiner.expand.weight.dtype
    maps = torch.randn(2, 4, 17, 17, generator=torch.Generator().manual_seed(4), dtype=dtype).softmax(-1)
    maps.requires_grad_()
    with recording() as record:
        refiner(maps).sum().backward()
    return {op: dict(record[op]) for op in record_ops}


@needs_compiler
@pytest.mark.parametrize('native_ms, torch_ms, native', [(1.0, 10.0, True), (10.0, 1.0, False)],
                         ids=['fast-native-wins', 'slow-native-loses'])
def test_the_measured_rule_chooses_and_remembers(monkeypatch, native_ms, torch_ms, native):
    """Fakes stand in for the timings (the real ones are the rule's own tests): the faster side is chosen, the choice
    is written to the kernel cache, and a later process (here: an emptied memory) reads it instead of measuring."""
    monkeypatch.setattr(dispatch, '_choices', {})
    measured = []
    monkeypatch.setattr(dispatch, 'measure', lambda *calls: measured.append(calls) or (native_ms, torch_ms))
    cache = cache_dir()
    for old in cache.glob('released_training*.choice.json'):
        old.unlink()
    which = 'native' if native else 'torch'
    with mode_set('auto'):
        assert _one_step(_refiner()) == {op: {f'{which} (measured {"faster" if native else "slower"})': 1}
                                         for op in OPS}
        files = sorted(cache.glob('released_training*.choice.json'))
        assert len(files) == 2 and all(json.loads(f.read_text())['native'] is native for f in files)
        assert len(measured) == 2
        monkeypatch.setattr(dispatch, '_choices', {})
        assert _one_step(_refiner()) == {op: {f'{which} (measured earlier)': 1} for op in OPS}
        assert len(measured) == 2
    with mode_set('0'):
        assert _one_step(_refiner()) == {op: {'torch (REFINER_NATIVE_KERNELS=0)': 1} for op in OPS}


@needs_compiler
def test_the_torch_forms_serve_what_the_kernels_cannot(monkeypatch):
    """Float64 maps, bf16 autocast, a refiner that keeps its expanded maps (recompute off), and a kernel that does
    not build: the torch forms, and the recorded reason."""
    not_applicable = {op: {'torch (not applicable)': 1} for op in OPS}
    with mode_set('1'):
        assert _one_step(_refiner().double()) == not_applicable
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert _one_step(_refiner()) == not_applicable
        kept = _refiner()
        kept.recompute = False
        assert _one_step(kept) == not_applicable
        monkeypatch.setattr(released, 'released_training_kernel', lambda *shape: None)
        assert _one_step(_refiner()) == {op: {'torch (not built)': 1} for op in OPS}


@needs_compiler
@pytest.mark.parametrize('plane', [1, 7, 17 * 17, 3000], ids=lambda p: f'plane{p}')
def test_native_head_passes_match_torch_in_float64(plane):
    """Per-head sums of products and affine combinations: planes shorter than a vector, not a whole number of
    vectors, and longer than the kernel's chunk."""
    gen = torch.Generator().manual_seed(7)
    x, y, z = (torch.randn(3, 5, plane, generator=gen) for _ in range(3))
    factors = [torch.randn(5, generator=gen) for _ in range(3)]
    constant = torch.randn(5, generator=gen)
    native = native_head_passes()
    pairs = [(x, None), (x, y), (y, z)]
    expected = TORCH.sums([(a.double(), None if b is None else b.double()) for a, b in pairs], torch.float64)
    assert _relative_error(native.sums(pairs, torch.float64), expected) < 1e-6
    terms = list(zip((x, y, z), factors))
    expected = TORCH.affine(constant.double(), [(a.double(), f.double()) for a, f in terms])
    assert _relative_error(native.affine(constant, terms), expected) < 1e-6
    out = z.clone()  # in place: out's own values are a term
    expected = TORCH.affine(constant.double(), [(a.double(), f.double()) for a, f in terms[:2]], out=z.double())
    assert native.affine(constant, terms[:2], out=out) is out
    assert _relative_error(out, expected) < 1e-6


@needs_compiler
@pytest.mark.parametrize('native', ['1', '0'])
@pytest.mark.parametrize('shortcut', [True, False], ids=['released-tail', 'tail-as-modules'])
def test_an_output_scale_is_the_scaled_output(native, shortcut):
    """``refiner(attn, s)`` is ``refiner(attn) * s``, forward and backward, whichever path and tail run."""
    scaled, reference = _refiner(), _refiner()
    for refiner in (scaled, reference):
        refiner.shortcut = shortcut
    gen = torch.Generator().manual_seed(8)
    maps = torch.randn(2, 4, 17, 17, generator=gen).softmax(-1)
    upstream = torch.randn(maps.shape, generator=gen)
    with mode_set(native):
        x, x_ref = maps.clone().requires_grad_(), maps.clone().requires_grad_()
        out, out_ref = scaled(x, 0.3), reference(x_ref) * 0.3
        grads = torch.autograd.grad(out, [x, *scaled.parameters()], upstream)
        grads_ref = torch.autograd.grad(out_ref, [x_ref, *reference.parameters()], upstream)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(scaled.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
