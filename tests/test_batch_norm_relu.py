"""``relu(batch_norm(x))`` in training as one op (refiner_vit.ops.batch_norm): the native passes against float64
autograd through torch's modules, torch's BatchNorm semantics for the running statistics, where torch's operators
run instead, and the conv stem that uses it."""
import copy

import pytest
import torch
from helpers import needs_compiler, randomise_batchnorms
from torch import nn
from torch.nn import functional as F

from refiner_vit.layers import ConvStem
from refiner_vit.ops import mode_set, recording
from refiner_vit.ops.batch_norm import batch_norm_relu

SHAPES = [(3, 8, 9, 11), (2, 20, 5, 7), (2, 3, 4, 4), (4, 64, 16, 16)]  # 20, 3: a partial last vector of channels
NORMS = {
    'default': {},
    'no affine, cumulative average': dict(affine=False, momentum=None),
    'no running statistics': dict(track_running_stats=False),
    'other momentum and eps': dict(momentum=0.3, eps=1e-3),
}


def _inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    return x.contiguous(memory_format=torch.channels_last), torch.randn(shape, generator=gen)


def _norm(channels: int, settings: dict) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, **settings)
    randomise_batchnorms(norm, torch.Generator().manual_seed(2))
    return norm.train()


@needs_compiler
@pytest.mark.parametrize('settings', list(NORMS.values()), ids=list(NORMS))
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_native_op_equals_float64_modules(shape, settings):
    x, upstream = _inputs(shape)
    norm = _norm(shape[1], settings)
    reference = copy.deepcopy(norm).double()
    leaf, leaf64 = x.detach().requires_grad_(), x.detach().double().requires_grad_()
    for _ in range(2):  # the running statistics twice
        with mode_set('1'), recording() as record:
            out = batch_norm_relu(leaf, norm)
        assert dict(record['batch_norm_relu']) == {'native (REFINER_NATIVE_KERNELS=1)': 1}
        expected = F.relu(reference(leaf64))
        grads = torch.autograd.grad(out, [leaf, *norm.parameters()], upstream)
        grads64 = torch.autograd.grad(expected, [leaf64, *reference.parameters()], upstream.double())
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        for name, actual, wanted in zip(['x', 'weight', 'bias'], grads, grads64):
            scale = wanted.abs().max()
            torch.testing.assert_close(actual.double() / scale, wanted / scale, rtol=0, atol=2e-6, msg=name)
    for name, buffer in norm.named_buffers():  # fp32 statistics of inputs up to ~8: a few ulps
        torch.testing.assert_close(buffer.double(), getattr(reference, name).double(), rtol=4e-6, atol=1e-6)


def _cases():
    x, _ = _inputs((2, 8, 5, 5))
    norm = _norm(8, {})

    class Subclass(nn.BatchNorm2d):
        pass

    sub = Subclass(8).train()
    return {
        'eval mode': (x, copy.deepcopy(norm).eval(), False),
        'NCHW input': (x.contiguous(), norm, False),
        'float64': (x.double(), copy.deepcopy(norm).double(), False),
        'autocast': (x, norm, True),
        'a BatchNorm2d subclass': (x, sub, False),
        'one value per channel': (x[:1, :, :1, :1], norm, False),
    }


@pytest.mark.parametrize('case', list(_cases()), ids=str)
def test_torch_operators_run_where_the_kernel_does_not_apply(case):
    x, norm, autocast = _cases()[case]
    reference = copy.deepcopy(norm)
    with mode_set('1'), recording() as record, torch.autocast('cpu', torch.bfloat16, enabled=autocast):
        if case == 'one value per channel':
            with pytest.raises(ValueError, match='more than 1 value per channel'):  # as torch's BatchNorm says
                batch_norm_relu(x, norm)
            return
        out = batch_norm_relu(x, norm)
        expected = F.relu(reference(x))
    recorded = {} if case in ('eval mode', 'a BatchNorm2d subclass') else {'torch (not applicable)': 1}
    assert dict(record.get('batch_norm_relu', {})) == recorded  # not training BatchNorm2d: not the op's concern
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name, buffer in norm.named_buffers():
        torch.testing.assert_close(buffer, getattr(reference, name), rtol=0, atol=0, msg=name)


@needs_compiler
def test_stem_with_the_native_op_equals_float64_stem():
    torch.manual_seed(0)
    stem = ConvStem(img_size=32, patch_size=8, embed_dim=24, stem_chs=(8, 16, 32)).train()
    randomise_batchnorms(stem, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(stem).double()
    x = torch.randn(2, 3, 32, 32)
    with mode_set('1'), recording() as record:
        out = stem(x)
    assert dict(record['batch_norm_relu']) == {'native (REFINER_NATIVE_KERNELS=1)': 3}
    expected = reference(x.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    upstream = torch.randn(out.shape)
    grads = torch.autograd.grad(out, list(stem.parameters()), upstream)
    grads64 = torch.autograd.grad(expected, list(reference.parameters()), upstream.double())
    for (name, _), actual, wanted in zip(stem.named_parameters(), grads, grads64):
        scale = wanted.abs().max()
        torch.testing.assert_close(actual.double() / scale, wanted / scale, rtol=0, atol=1e-4, msg=name)
    for (name, buffer), wanted in zip(stem.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer.double(), wanted.double(), rtol=1e-5, atol=1e-6, msg=name)
