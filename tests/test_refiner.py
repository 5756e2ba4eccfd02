"""The refiner layer against an independent float64 loop reference and against its composed-conv identity."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from refiner_vit.layers import AttentionRefiner


def _batchnorm_eval(x: np.ndarray, bn: torch.nn.BatchNorm2d) -> np.ndarray:
    """Eval-mode BatchNorm over axis 1, element by element."""
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    weight, bias = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        out[:, c] = (x[:, c] - mean[c]) / np.sqrt(var[c] + bn.eps) * weight[c] + bias[c]
    return out


def naive_refiner(attn: np.ndarray, refiner: AttentionRefiner) -> np.ndarray:
    """The refiner written from its definition with explicit loops (float64, eval mode)."""
    B, H, N, _ = attn.shape
    expand = refiner.expand.weight.detach().double().numpy()[:, :, 0, 0]
    kernels = refiner.conv.weight.detach().double().numpy()[:, 0]
    reduce = refiner.reduce.weight.detach().double().numpy()[:, :, 0, 0]
    E, k = expand.shape[0], refiner.kernel_size
    half = k // 2
    released = not refiner.is_linear

    expanded = np.zeros((B, E, N, N))
    for b in range(B):
        for j in range(E):
            for i in range(H):
                expanded[b, j] += expand[j, i] * attn[b, i]
    if released:
        expanded = np.clip(_batchnorm_eval(expanded, refiner.norm1), 0, 6)

    local = np.zeros_like(expanded)
    for b in range(B):
        for j in range(E):
            for q in range(N):
                for key in range(N):
                    total = 0.
                    for a in range(k):
                        for c in range(k):
                            qq, kk = q + a - half, key + c - half
                            if 0 <= qq < N and 0 <= kk < N:  # zero "same" padding
                                total += kernels[j, a, c] * expanded[b, j, qq, kk]
                    local[b, j, q, key] = total
    if released:
        local = np.clip(_batchnorm_eval(local, refiner.norm2), 0, 6)

    reduced = np.zeros((B, H, N, N))
    for b in range(B):
        for o in range(H):
            for j in range(E):
                reduced[b, o] += reduce[o, j] * local[b, j]
    if released:
        reduced = _batchnorm_eval(reduced, refiner.norm3)
    if refiner.shortcut:
        reduced = reduced + attn
    if released:
        reduced = _batchnorm_eval(reduced, refiner.out_norm)
    return reduced


def _randomise_batchnorms(module: torch.nn.Module, generator: torch.Generator) -> None:
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.randn(c, generator=generator))
            bn.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


def _random_maps(B: int, H: int, N: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(B, H, N, N, generator=generator, dtype=torch.float64).softmax(-1)


@pytest.mark.parametrize('form', ['linear', 'linear_shortcut', 'released'])
@pytest.mark.parametrize('kernel_size,expansion_ratio', [(3, 3), (5, 2), (1, 1)])
def test_refiner_matches_float64_loop_reference(form, kernel_size, expansion_ratio):
    g = torch.Generator().manual_seed(0)
    heads, tokens = 3, 7  # odd N: the padding must be symmetric
    if form == 'released':
        refiner = AttentionRefiner.released(heads, expansion_ratio, kernel_size)
        with torch.no_grad():
            _randomise_batchnorms(refiner, g)
    else:
        refiner = AttentionRefiner(heads, expansion_ratio, kernel_size, shortcut=form == 'linear_shortcut')
    refiner = refiner.double().eval()
    attn = _random_maps(2, heads, tokens, g)
    with torch.no_grad():
        out = refiner(attn).numpy()
    ref = naive_refiner(attn.numpy(), refiner)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert not np.allclose(ref, attn.numpy())  # the refiner does something


@pytest.mark.parametrize('shortcut', [False, True])
def test_linear_refiner_equals_one_conv_with_composed_weight(shortcut):
    g = torch.Generator().manual_seed(1)
    refiner = AttentionRefiner(4, expansion_ratio=3, kernel_size=3, shortcut=shortcut).double()
    attn = _random_maps(2, 4, 9, g)
    weight = refiner.composed_weight()
    assert weight.shape == (4, 4, 3, 3)
    # W[o, i] = sum_j R[o, j] K[j] E[j, i], written out independently of composed_weight's einsum
    R = refiner.reduce.weight[:, :, 0, 0]
    K = refiner.conv.weight[:, 0]
    E = refiner.expand.weight[:, :, 0, 0]
    manual = sum(R[:, j, None, None, None] * K[j] * E[j, None, :, None, None] for j in range(12))
    if shortcut:
        manual = manual.clone()
        manual[:, :, 1, 1] += torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(weight, manual)

    direct = refiner.forward_stages(attn)  # expand -> depthwise conv -> reduce, stage by stage
    composed = F.conv2d(attn, weight, padding=1)
    torch.testing.assert_close(composed, direct, rtol=1e-12, atol=1e-12)

    # gradients reach expand / conv / reduce identically through the composition
    upstream = torch.randn(direct.shape, generator=g, dtype=torch.float64)
    grads_direct = torch.autograd.grad((direct * upstream).sum(), list(refiner.parameters()))
    grads_composed = torch.autograd.grad((composed * upstream).sum(), list(refiner.parameters()))
    for a, b in zip(grads_direct, grads_composed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_composed_weight_refuses_a_nonlinear_refiner():
    with pytest.raises(RuntimeError, match='linear'):
        AttentionRefiner.released(2).composed_weight()


@pytest.mark.parametrize('shortcut', [False, True])
def test_identity_init_is_exact_and_can_learn(shortcut):
    g = torch.Generator().manual_seed(2)
    refiner = AttentionRefiner(3, expansion_ratio=3, kernel_size=3, shortcut=shortcut).double()
    refiner.init_identity()
    attn = _random_maps(2, 3, 8, g)
    torch.testing.assert_close(refiner(attn), attn, rtol=0, atol=1e-15)

    target = torch.randn(attn.shape, generator=g, dtype=torch.float64)
    optimizer = torch.optim.SGD(refiner.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(refiner(attn), target).backward()
        optimizer.step()
    out = refiner(attn)
    assert not torch.allclose(out, attn)
    # every expanded copy takes part: all read-out weights have moved away from zero or one
    reduce = refiner.reduce.weight[:, :, 0, 0]
    assert (reduce.abs() > 0).all()


def test_released_form_structure():
    refiner = AttentionRefiner.released(12)
    names = {name for name, _ in refiner.named_parameters()}
    assert names == {
        'expand.weight', 'norm1.weight', 'norm1.bias', 'conv.weight', 'norm2.weight', 'norm2.bias',
        'reduce.weight', 'norm3.weight', 'norm3.bias', 'out_norm.weight', 'out_norm.bias'}
    assert refiner.expand.weight.shape == (36, 12, 1, 1)
    assert refiner.conv.weight.shape == (36, 1, 3, 3)
    assert refiner.reduce.weight.shape == (12, 36, 1, 1)
    assert refiner.shortcut and not refiner.is_linear


@pytest.mark.parametrize('kwargs', [dict(kernel_size=2), dict(kernel_size=0), dict(expansion_ratio=0)])
def test_bad_arguments_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AttentionRefiner(4, **kwargs)
