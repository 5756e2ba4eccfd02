"""The native composed-convolution kernel against float64 torch convolutions, and when it is (not) used."""
import warnings

import pytest
import torch
from torch.nn import functional as F

from refiner_vit import kernels
from refiner_vit.layers import LocalConv2d, local_conv2d
from refiner_vit.layers.local_conv import native_kernels_for

# (batch, heads, rows, columns, kernel size): maps narrower than a vector, exact multiples of one and two vectors,
# one column past them, non-square maps, DeiT-S's 197 x 197, more heads than the wide block allows, k = 1 and 5.
SHAPES = [
    (2, 4, 5, 5, 3), (1, 6, 16, 16, 3), (2, 4, 32, 33, 3), (3, 4, 65, 65, 3), (1, 6, 7, 40, 3),
    (1, 6, 197, 197, 3), (2, 12, 20, 50, 3), (2, 3, 17, 17, 1), (2, 5, 30, 31, 5), (1, 1, 1, 1, 3),
]


def _case(batch, heads, rows, cols, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, rows, cols, generator=gen)
    weight = torch.randn(heads, heads, k, k, generator=gen)
    grad = torch.randn(batch, heads, rows, cols, generator=gen)
    return x, weight, grad


def _reference(x, weight, grad):
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    out = F.conv2d(x64, w64, padding=weight.shape[-1] // 2)
    grad_x, grad_w = torch.autograd.grad(out, (x64, w64), grad.double())
    return out.detach(), grad_x, grad_w


def _assert_close(actual, expected, rtol=1e-5):
    """Within rtol of the float64 result, relative to its largest magnitude (sums of many terms cancel)."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    error = (actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert error < rtol, f'relative error {error:.2e}'


def test_kernel_builds_on_this_machine():
    """CI has a C compiler: the native path is what the other tests here exercise, not the fallback."""
    assert kernels.local_conv_kernels(4, 3) is not None


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_native_forward_and_gradients_match_float64(shape):
    x, weight, grad = _case(*shape)
    native = kernels.local_conv_kernels(shape[1], shape[4])
    out, grad_x, grad_w = _reference(x, weight, grad)
    _assert_close(native.conv(x, weight), out)
    _assert_close(native.input_grad(grad, weight), grad_x)
    _assert_close(native.weight_grad(x, grad), grad_w)


@pytest.mark.parametrize('threads', [1, 2, 3])
def test_native_results_do_not_depend_on_thread_count(threads):
    x, weight, grad = _case(3, 4, 33, 47, 3, seed=1)
    out, grad_x, grad_w = _reference(x, weight, grad)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = kernels.local_conv_kernels(4, 3)
        _assert_close(native.conv(x, weight), out)
        _assert_close(native.input_grad(grad, weight), grad_x)
        _assert_close(native.weight_grad(x, grad), grad_w)
    finally:
        torch.set_num_threads(previous)


def test_native_accepts_non_contiguous_maps():
    x, weight, grad = _case(2, 4, 30, 30, 3, seed=2)
    transposed = x.transpose(-2, -1)  # a view, as the refiner's maps can be
    out, _, _ = _reference(transposed.contiguous(), weight, grad)
    _assert_close(local_conv2d(transposed, weight), out)


def test_local_conv2d_autograd_matches_float64():
    x, weight, grad = _case(2, 6, 23, 41, 3, seed=3)
    out, grad_x, grad_w = _reference(x, weight, grad)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    y = local_conv2d(x, weight)
    assert y.grad_fn is not None and 'Native' in type(y.grad_fn).__name__
    y.backward(grad)
    _assert_close(y.detach(), out)
    _assert_close(x.grad, grad_x)
    _assert_close(weight.grad, grad_w)


def test_local_conv2d_double_backward():
    """create_graph=True falls back to torch's differentiable convolution: second derivatives are right."""
    x, weight, _ = _case(1, 4, 9, 9, 3, seed=4)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    (gx64,) = torch.autograd.grad(F.conv2d(x64, w64, padding=1).pow(2).sum(), x64, create_graph=True)
    (ggw64,) = torch.autograd.grad(gx64.sum(), w64)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    (gx,) = torch.autograd.grad(local_conv2d(x, weight).pow(2).sum(), x, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.sum(), weight)
    _assert_close(gx.detach(), gx64.detach())
    _assert_close(ggw, ggw64)


@pytest.mark.parametrize('case', ['float64', 'autocast', 'other channel count', 'even kernel', 'flop counter'])
def test_native_kernel_steps_aside(case):
    """Where it does not apply, local_conv2d is torch's convolution (and says so by not dispatching natively)."""
    x, weight, _ = _case(1, 4, 10, 10, 3, seed=6)
    if case == 'float64':
        x, weight = x.double(), weight.double()
    elif case == 'other channel count':
        weight = torch.randn(4, 2, 3, 3)
        x = x[:, :2]
    elif case == 'even kernel':
        weight = torch.randn(4, 4, 2, 2)
    if case == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert native_kernels_for(x, weight) is None
            assert local_conv2d(x, weight).dtype == torch.bfloat16
        return
    if case == 'flop counter':
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            assert native_kernels_for(x, weight) is None
            local_conv2d(x, weight)
        assert counter.get_total_flops() == 2 * 4 * 4 * 9 * 100
        return
    assert native_kernels_for(x, weight) is None
    if weight.shape[-1] % 2:
        torch.testing.assert_close(local_conv2d(x, weight), F.conv2d(x, weight, padding=1))


def test_module_keeps_conv2d_state_dict_and_checks_its_weight():
    weight = torch.randn(6, 6, 3, 3)
    module = LocalConv2d(weight)
    assert list(module.state_dict()) == ['weight'] and torch.equal(module.weight, weight)
    with pytest.raises(ValueError, match=r'\(H, H, k, k\)'):
        LocalConv2d(torch.randn(6, 3, 3, 3))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_DISABLE, '0')
    kernels.local_conv_kernels.cache_clear()
    try:
        assert kernels.local_conv_kernels(4, 3) is None
    finally:
        monkeypatch.undo()
        kernels.local_conv_kernels.cache_clear()


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    """No usable compiler: one warning naming the command, then torch's convolution; nothing half-written is left."""
    monkeypatch.setenv('CC', 'false')
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    kernels.local_conv_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match='false'):
            assert kernels.local_conv_kernels(4, 3) is None
        x, weight, _ = _case(1, 4, 6, 6, 3)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # not warned again
            torch.testing.assert_close(local_conv2d(x, weight), F.conv2d(x, weight, padding=1))
        assert list(tmp_path.iterdir()) == []
    finally:
        monkeypatch.undo()
        kernels.local_conv_kernels.cache_clear()


def test_build_is_cached_and_keyed_by_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path))
    first = kernels._build(2, 3)
    stamp = first.stat().st_mtime_ns
    assert kernels._build(2, 3) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert kernels._build(2, 5) != first  # one library per (heads, kernel size)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == ['.so', '.so']

