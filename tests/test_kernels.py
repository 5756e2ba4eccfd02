"""The native local-convolution and folded-refiner kernels against float64 torch references, and where the ops
step aside for torch's operators."""
import warnings

import pytest
import timm
import torch
from helpers import needs_compiler, randomise_batchnorms
from torch import nn
from torch.nn import functional as F

import refiner_vit
from refiner_vit.layers import AttentionRefiner, FoldedRefiner, LocalConv2d
from refiner_vit.ops import local_conv2d, mode_set
from refiner_vit.ops.folded_refiner import folded_refiner_kernel
from refiner_vit.ops.local_conv import input_grad_weight, local_conv_kernels, uses_native_kernel

# (batch, heads, rows, columns, kernel size): maps narrower than a vector, exact multiples of one and two vectors,
# one column past them, non-square maps, DeiT-S's 197 x 197, more heads than the wide block allows, k = 1 and 5.
SHAPES = [
    (2, 4, 5, 5, 3), (1, 6, 16, 16, 3), (2, 4, 32, 33, 3), (3, 4, 65, 65, 3), (1, 6, 7, 40, 3),
    (1, 6, 197, 197, 3), (2, 12, 20, 50, 3), (2, 3, 17, 17, 1), (2, 5, 30, 31, 5), (1, 1, 1, 1, 3),
    (2, 16, 9, 300, 3),  # a weight-gradient chunk of one row (16 gradient rows of 300 floats fill its L1 budget)
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


@needs_compiler
def test_kernel_builds_on_this_machine():
    """Where there is a compiler, the native path is what the other tests here exercise, not the fallback."""
    assert local_conv_kernels(4, 3) is not None


@needs_compiler
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_native_forward_and_gradients_match_float64(shape):
    x, weight, grad = _case(*shape)
    native = local_conv_kernels(shape[1], shape[4])
    out, grad_x, grad_w = _reference(x, weight, grad)
    _assert_close(native.conv(x, weight), out)
    _assert_close(native.conv(grad, input_grad_weight(weight)), grad_x)
    _assert_close(native.weight_grad(x, grad), grad_w)


@needs_compiler
@pytest.mark.parametrize('threads', [1, 2, 3])
def test_native_results_do_not_depend_on_thread_count(threads):
    x, weight, grad = _case(3, 4, 33, 47, 3, seed=1)
    out, grad_x, grad_w = _reference(x, weight, grad)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native = local_conv_kernels(4, 3)
        _assert_close(native.conv(x, weight), out)
        _assert_close(native.conv(grad, input_grad_weight(weight)), grad_x)
        _assert_close(native.weight_grad(x, grad), grad_w)
    finally:
        torch.set_num_threads(previous)


@needs_compiler
def test_native_accepts_non_contiguous_maps():
    x, weight, grad = _case(2, 4, 30, 30, 3, seed=2)
    transposed = x.transpose(-2, -1)  # a view, as the refiner's maps can be
    out, _, _ = _reference(transposed.contiguous(), weight, grad)
    with mode_set('1'):
        _assert_close(local_conv2d(transposed, weight), out)


@needs_compiler
def test_local_conv2d_autograd_matches_float64():
    x, weight, grad = _case(2, 6, 23, 41, 3, seed=3)
    out, grad_x, grad_w = _reference(x, weight, grad)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    with mode_set('1'):
        y = local_conv2d(x, weight)
        assert 'refiner_vit_local_conv' in type(y.grad_fn).__name__  # the native operator ran
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
    with mode_set('1'):
        (gx,) = torch.autograd.grad(local_conv2d(x, weight).pow(2).sum(), x, create_graph=True)
        (ggw,) = torch.autograd.grad(gx.sum(), weight)
    _assert_close(gx.detach(), gx64.detach())
    _assert_close(ggw, ggw64)


@pytest.mark.parametrize('case', ['float64', 'autocast', 'other channel count', 'even kernel', 'flop counter'])
def test_native_kernel_steps_aside(case, monkeypatch):
    """Where it does not apply, local_conv2d is torch's convolution (and says so by not dispatching natively), even
    with the kernels forced on."""
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', '1')
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
            assert not uses_native_kernel(x, weight)
            assert local_conv2d(x, weight).dtype == torch.bfloat16
        return
    if case == 'flop counter':
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            assert not uses_native_kernel(x, weight)
            local_conv2d(x, weight)
        assert counter.get_total_flops() == 2 * 4 * 4 * 9 * 100
        return
    assert not uses_native_kernel(x, weight)
    if weight.shape[-1] % 2:
        torch.testing.assert_close(local_conv2d(x, weight), F.conv2d(x, weight, padding=1))


def test_module_keeps_conv2d_state_dict_and_checks_its_weight():
    weight = torch.randn(6, 6, 3, 3)
    module = LocalConv2d(weight)
    assert list(module.state_dict()) == ['weight'] and torch.equal(module.weight, weight)
    with pytest.raises(ValueError, match=r'\(H, H, k, k\)'):
        LocalConv2d(torch.randn(6, 3, 3, 3))


def _released_refiner(heads, ratio, k, shortcut, seed):
    """The released refiner with non-trivial BatchNorm statistics, in eval mode."""
    refiner = AttentionRefiner(heads, ratio, k, nn.BatchNorm2d, nn.ReLU6, shortcut, nn.BatchNorm2d)
    return randomise_batchnorms(refiner, torch.Generator().manual_seed(seed)).eval()


# (batch, heads, expansion ratio, rows, columns, kernel size, shortcut): Refiner-ViT-S's refiner over 197 x 197
# maps, a 5 x 5 kernel over non-square maps, maps narrower than a vector, no shortcut, an odd expanded count.
FOLDED = [(2, 12, 3, 197, 197, 3, True), (2, 4, 2, 33, 40, 5, True), (3, 3, 3, 5, 7, 3, True),
          (1, 6, 3, 20, 20, 3, False), (1, 5, 3, 17, 18, 3, True)]


def _folded_args(folded: FoldedRefiner):
    return (folded.expand.weight, folded.expand.bias, folded.conv.weight, folded.conv.bias, folded.reduce.weight,
            folded.reduce.bias, folded.shortcut_scale)


@needs_compiler
@pytest.mark.parametrize('case', FOLDED, ids=lambda c: 'x'.join(map(str, c[:6])) + ('' if c[6] else '-no-shortcut'))
def test_native_folded_refiner_matches_the_float64_stages(case):
    batch, heads, ratio, rows, cols, k, shortcut = case
    refiner = _released_refiner(heads, ratio, k, shortcut, seed=heads)
    folded = refiner.fuse(output_scale=0.5)
    assert isinstance(folded, FoldedRefiner)
    x = torch.randn(batch, heads, rows, cols, generator=torch.Generator().manual_seed(7)).softmax(-1)
    expected = refiner.double().forward_stages(x.double()).detach() * 0.5
    kernel = folded_refiner_kernel(heads, heads * ratio, k)
    with torch.no_grad():
        _assert_close(kernel(x, *_folded_args(folded)), expected)
        with mode_set('1'):
            _assert_close(folded(x), expected)  # the module, through the op


@needs_compiler
def test_native_folded_refiner_keeps_nan_where_torch_does():
    folded = _released_refiner(4, 3, 3, True, seed=1).fuse()
    x = torch.rand(1, 4, 12, 12)
    x[0, 1, 5, 6] = float('nan')
    with torch.no_grad():
        native = folded_refiner_kernel(4, 12, 3)(x, *_folded_args(folded))
        with mode_set('0'):
            torch_ops = folded(x)
    assert torch.equal(native.isnan(), torch_ops.isnan()) and native.isnan().any()
    torch.testing.assert_close(native.nan_to_num(), torch_ops.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_folded_refiner_uses_torch_when_a_graph_is_wanted(monkeypatch):
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', '1')
    folded = _released_refiner(4, 3, 3, True, seed=2).fuse()
    x = torch.rand(1, 4, 10, 10, requires_grad=True)
    with refiner_vit.ops.recording() as record:
        folded(x).sum().backward()
    assert x.grad is not None and set(record['folded_refiner']) == {'torch (not applicable)'}


@needs_compiler
def test_compiled_graphs_keep_the_native_operators_and_exported_programs_do_not(monkeypatch):
    """Forced on, torch.compile keeps the kernels as opaque operators; torch.export records standard operators."""
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', '1')
    refined = timm.create_model('refined_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=1).eval()
    released = refiner_vit.fuse_for_inference(timm.create_model('refiner_vit_s_patch16_224', img_size=32, depth=2))
    x = torch.randn(2, 3, 32, 32)
    for model, operator in ((refined, 'refiner_vit.local_conv'), (released, 'refiner_vit.folded_refiner'),
                            (released, 'refiner_vit.attention_probs'), (refined, 'refiner_vit.attention_probs')):
        graphs = []

        def record(graph_module, example_inputs, graphs=graphs):
            graphs.append(graph_module.code)
            return graph_module.forward

        with torch.no_grad():
            compiled = torch.compile(model, backend=record)(x)
            eager = model(x)
        assert any(operator in code for code in graphs)
        torch.testing.assert_close(compiled, eager)
        exported = torch.export.export(model, (x,))
        assert 'refiner_vit' not in str(exported.graph)
        torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_get_torch_convolutions(monkeypatch):
    """vmap and grad wrap tensors the native operators have no rules for: local_conv2d steps aside, silently."""
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', '1')
    x, weight, _ = _case(3, 4, 9, 9, 3, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        batched = torch.func.vmap(lambda maps: local_conv2d(maps[None], weight)[0])(x)
        grad = torch.func.grad(lambda w: local_conv2d(x, w).square().sum())(weight)
    torch.testing.assert_close(batched, F.conv2d(x, weight, padding=1))
    torch.testing.assert_close(grad, torch.func.grad(lambda w: F.conv2d(x, w, padding=1).square().sum())(weight))


def test_eval_mode_released_refiner_follows_every_weight_change():
    """An unfused eval-mode refiner runs its stages: a change the autograd version counter does not see (through
    ``.data``) shows at once, as there is no folded copy to go stale."""
    refiner = _released_refiner(4, 3, 3, True, seed=3)
    x = torch.rand(2, 4, 21, 21)
    with torch.no_grad():
        refiner(x)
        refiner.conv.weight.data.mul_(-2.)
        refiner.norm2.running_var.data.add_(1.)
        torch.testing.assert_close(refiner(x), refiner.forward_stages(x), rtol=0, atol=0)
    assert not any(isinstance(m, FoldedRefiner) for m in refiner.modules())
