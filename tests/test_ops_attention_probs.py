"""The native attention-probabilities kernel against float64 torch, and where attention layers use it."""
import warnings

import pytest
import timm
import torch
from helpers import needs_compiler
from torch.utils.flop_counter import FlopCounterMode

from refiner_vit.ops import attention_probs, dispatch, recording
from refiner_vit.ops import probs as probs_module
from refiner_vit.ops.probs import attention_probs_kernel, uses_native_attention_probs

# (batch, heads, tokens, head_dim): fewer tokens than a vector, one past a vector, the digits models' 65 tokens,
# Refiner-ViT-S's and DeiT-S's 197 tokens with their head dims, a single token.
SHAPES = [(2, 3, 5, 16), (1, 2, 17, 64), (3, 4, 65, 16), (2, 12, 197, 32), (1, 6, 197, 64), (2, 1, 1, 8)]


def _inputs(batch, heads, tokens, head_dim, seed=0):
    """q and k as views into one qkv buffer (as attention layers hold them), and maps to accumulate."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=gen).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return q, k, torch.rand(batch, heads, tokens, tokens, generator=gen)


def _reference(q, k, scale, prev, alpha):
    out = (scale * q.double() @ k.double().transpose(-2, -1)).softmax(-1)
    return out if prev is None else out + alpha * prev.double()


def _torch_fp32(q, k, scale, prev, alpha):
    out = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
    return out if prev is None else torch.add(out, prev, alpha=alpha)


@pytest.fixture
def forced_native(monkeypatch):
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', '1')


@needs_compiler
def test_kernel_builds_on_this_machine():
    assert attention_probs_kernel(32) is not None


@needs_compiler
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('with_prev', [False, True], ids=['softmax', 'accumulate'])
def test_native_matches_float64_as_closely_as_torch(shape, with_prev, forced_native):
    q, k, prev = _inputs(*shape)
    prev = prev if with_prev else None
    assert uses_native_attention_probs(q, k, prev=prev)
    out = attention_probs(q, k, 0.3, prev=prev, alpha=0.17)
    expected = _reference(q, k, 0.3, prev, 0.17)
    torch_error = (_torch_fp32(q, k, 0.3, prev, 0.17).double() - expected).abs().max()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.double() - expected).abs().max() <= 2 * torch_error + 1e-7


@needs_compiler
def test_large_logits_do_not_overflow(forced_native):
    q, k, _ = _inputs(2, 3, 40, 16, seed=1)
    out = attention_probs(q, k, 1e3)
    torch.testing.assert_close(out.double(), _reference(q, k, 1e3, None, 1.), rtol=0, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize('threads', [1, 2, 3])
def test_results_do_not_depend_on_thread_count(threads, forced_native):
    q, k, prev = _inputs(3, 5, 30, 32, seed=2)
    reference = attention_probs(q, k, 0.5, prev=prev, alpha=0.25)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.equal(attention_probs(q, k, 0.5, prev=prev, alpha=0.25), reference)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_nan_spreads_over_its_row_as_in_torch(forced_native):
    q, k, prev = _inputs(1, 2, 20, 16, seed=3)
    q = q.clone()
    q[0, 1, 7, 3] = float('nan')
    native = attention_probs(q, k, 1., prev=prev, alpha=0.5)
    torch_ops = _torch_fp32(q, k, 1., prev, 0.5)
    assert torch.equal(native.isnan(), torch_ops.isnan()) and native[0, 1, 7].isnan().all()
    torch.testing.assert_close(native.nan_to_num(), torch_ops.nan_to_num())


def _leaves(shape, with_prev: bool, dtype: torch.dtype, seed: int):
    """The leaves (a qkv buffer, then prev or nothing) in ``dtype`` from float64 draws, q and k as views into the
    buffer, prev's leaf (or None) and an upstream gradient for the maps."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, tokens, head_dim = shape
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    prev = torch.rand(batch, heads, tokens, tokens, generator=gen, dtype=torch.float64) if with_prev else None
    upstream = torch.randn(batch, heads, tokens, tokens, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in (qkv, prev) if t is not None]
    q, k, _ = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    return leaves, q, k, leaves[1] if with_prev else None, upstream


def _training_run(shape, with_prev, dtype, native, seed=0):
    """Maps and gradients (w.r.t. the qkv buffer and prev, then a second order one) of ``attention_probs`` on views
    into one qkv buffer, computed in ``dtype`` from the same float64 draws."""
    leaves, q, k, prev, upstream = _leaves(shape, with_prev, dtype, seed)
    with dispatch.mode_set('1' if native else '0'):
        assert uses_native_attention_probs(q, k, prev=prev) == native
        out = attention_probs(q, k, 0.3, prev=prev, alpha=0.7)
    grads = torch.autograd.grad((out * upstream).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(grads[0].square().sum(), leaves[0])[0]
    return [t.detach().double() for t in (out, *grads, second)]


@needs_compiler
@pytest.mark.parametrize('shape', SHAPES[:4], ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('with_prev', [False, True], ids=['softmax', 'accumulate'])
def test_training_through_the_kernel_matches_float64_as_closely_as_torch(shape, with_prev):
    """In training the kernel computes the maps and the operator's backward torch's gradients from them: outputs,
    gradients w.r.t. q, k and prev, and a second-order gradient (create_graph) within twice torch's fp32 error of
    float64 autograd through plain torch operators."""
    expected = _training_run(shape, with_prev, torch.float64, native=False)
    native = _training_run(shape, with_prev, torch.float32, native=True)
    torch_fp32 = _training_run(shape, with_prev, torch.float32, native=False)
    names = ['out', 'grad qkv'] + (['grad prev'] if with_prev else []) + ['second order']
    assert len(names) == len(native) == len(expected) == len(torch_fp32)
    for name, got, want, torch_got in zip(names, native, expected, torch_fp32):
        torch_error = (torch_got - want).abs().max()
        assert (got - want).abs().max() <= 2 * torch_error + 1e-6 * want.abs().max(), name


def _first_order(shape, with_prev: bool, dtype: torch.dtype, native: bool):
    """Gradients w.r.t. qkv (and prev) of a plain backward (no create_graph), with what ran."""
    leaves, q, k, prev, upstream = _leaves(shape, with_prev, dtype, seed=3)
    with dispatch.mode_set('1' if native else '0'), recording() as record:
        out = attention_probs(q, k, 0.3, prev=prev, alpha=0.7)
        out.backward(upstream)
    return [t.grad.double() for t in leaves], dict(record.get('attention_probs_backward', {}))


@needs_compiler
@pytest.mark.parametrize('shape', SHAPES[:4], ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('with_prev', [False, True], ids=['softmax', 'accumulate'])
def test_native_backward_matches_float64_as_closely_as_torch(shape, with_prev):
    """A plain backward runs the softmax's gradient (and prev's) natively, in one pass: within twice torch's fp32
    error of float64."""
    expected, _ = _first_order(shape, with_prev, torch.float64, native=False)
    native, ran = _first_order(shape, with_prev, torch.float32, native=True)
    torch_fp32, _ = _first_order(shape, with_prev, torch.float32, native=False)
    assert ran == {'native (REFINER_NATIVE_KERNELS=1)': 1}
    for name, got, want, torch_got in zip(['grad qkv', 'grad prev'], native, expected, torch_fp32):
        torch_error = (torch_got - want).abs().max()
        assert (got - want).abs().max() <= 2 * torch_error + 1e-6 * want.abs().max(), name


@needs_compiler
def test_training_through_the_kernel_keeps_no_new_tensor_for_backward(forced_native):
    """What the operator saves is the output, prev and the q and k views into the qkv buffer: storage the model
    holds anyway, where torch's path keeps a scaled copy of q and a contiguous copy of k."""
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 9, 3, 3, 16, generator=gen, requires_grad=True)
    prev = torch.rand(2, 3, 9, 9, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_probs(q, k, 0.3, prev=prev, alpha=0.7)
    held = {t.untyped_storage().data_ptr() for t in (qkv, prev, out)}
    assert saved and {t.untyped_storage().data_ptr() for t in saved} <= held


def test_computing_blocks_take_the_second_order_gradient_of_plain_torch():
    """Double backward through softmax + alpha * prev (say, a gradient penalty) equals autograd's through torch's
    softmax and add: the backward that recovers the softmax from the output is differentiable again."""
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    prev = torch.rand(2, 3, 9, 9, generator=gen, dtype=torch.float64, requires_grad=True)

    def second_order(out):
        grad_q, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(grad_q.square().sum(), [q, k, prev])

    plain = torch.add((0.3 * q @ k.transpose(-2, -1)).softmax(-1), prev, alpha=0.7)
    for a, b in zip(second_order(attention_probs(q, k, 0.3, prev=prev, alpha=0.7)), second_order(plain)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('case', ['float64', 'autocast', 'mask', 'broadcast prev', 'flop counter', 'vmap'])
def test_torch_runs_where_the_kernel_does_not_apply(case, forced_native):
    q, k, prev = _inputs(2, 3, 9, 16, seed=4)
    if case == 'float64':
        assert not uses_native_attention_probs(q.double(), k.double(), prev=prev.double())
    elif case == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not uses_native_attention_probs(q, k, prev=prev)
            assert attention_probs(q, k, 1., prev=prev).dtype == torch.float32  # softmax autocasts to fp32
    elif case == 'mask':
        causal = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float('-inf'))
        assert not uses_native_attention_probs(q, k, causal)
        expected = ((q * 0.5) @ k.transpose(-2, -1) + causal).softmax(-1)
        torch.testing.assert_close(attention_probs(q, k, 0.5, causal), expected)
    elif case == 'broadcast prev':
        assert not uses_native_attention_probs(q, k, prev=prev[:1])
        torch.testing.assert_close(attention_probs(q, k, 1., prev=prev[:1]), _torch_fp32(q, k, 1., prev[:1], 1.))
    elif case == 'flop counter':
        with FlopCounterMode(display=False) as counter:
            attention_probs(q, k, 0.5, prev=prev)
        assert counter.get_total_flops() == 2 * 2 * 3 * 9 * 9 * 16
    else:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            batched = torch.func.vmap(lambda a, b: attention_probs(a[None], b[None], 0.5)[0])(q, k)
        torch.testing.assert_close(batched, _torch_fp32(q, k, 0.5, None, 1.))


@pytest.mark.parametrize('name,kwargs', [
    ('test_refiner_vit', {}),
    ('refined_deit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2)),
])
@needs_compiler
def test_eval_models_use_the_kernel_and_match_the_torch_path(name, kwargs, monkeypatch, forced_native):
    """Inference runs the kernel in every computing attention, and agrees with torch's operators. Refiner-ViT's
    computing blocks after the first also accumulate the previous map."""
    model = timm.create_model(name, **kwargs).eval()
    size = kwargs.get('img_size', model.pretrained_cfg['input_size'][-1])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    calls = []
    native = probs_module._attention_probs
    monkeypatch.setattr(probs_module, '_attention_probs', lambda *args: calls.append(args[3] is not None)
                        or native(*args))
    with torch.no_grad():
        out = model(x)
        with dispatch.mode_set('0'):
            torch_path = model(x)
    computing = [b for b in model.blocks if not getattr(b, 'sharing', False)]
    assert len(calls) == len(computing)
    if name == 'test_refiner_vit':
        assert calls == [False] + [True] * (len(computing) - 1)
    torch.testing.assert_close(out, torch_path, rtol=1e-5, atol=1e-5)


def test_observed_computing_blocks_show_the_softmax_before_the_previous_map_is_added(forced_native):
    """A hook on the tap, or a global module hook, sees each computing block's own softmax, as without the kernel;
    the output stays the same."""
    model = timm.create_model('test_refiner_vit').eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = model(x)
    taps = [b.attn.tap for b in model.blocks if not b.sharing]
    assert not any(tap.observed for tap in taps)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(args[0]) if module in taps else None)
    try:
        assert all(tap.observed for tap in taps)
        with torch.no_grad():
            observed = model(x)
    finally:
        handle.remove()
    assert len(seen) == len(taps)
    for raw in seen:
        torch.testing.assert_close(raw.sum(-1), torch.ones(raw.shape[:-1]))  # a softmax, nothing added
    torch.testing.assert_close(observed, plain)
