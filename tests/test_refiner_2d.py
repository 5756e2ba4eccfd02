"""The study's 2-D key-grid refiner (``KeyGridRefiner``) against an independent float64 loop reference."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from refiner_vit.layers import AttentionRefiner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from study.key_grid import KeyGridRefiner  # noqa: E402

GRID = (3, 4)  # rows x columns of patches: not square, so a swapped row/column order would show


def naive_key_grid_conv(maps: np.ndarray, kernels: np.ndarray, grid) -> np.ndarray:
    """Depthwise convolution of each query's key row laid out on ``grid``, written from the definition.

    ``maps (B, C, N, N)``, ``kernels (C, k, k)``. Keys ``N - rows * cols ..`` are the grid cells in raster
    order; the leading (class) keys are scaled by the kernel's centre tap.
    """
    B, C, N, _ = maps.shape
    rows, cols = grid
    prefix = N - rows * cols
    k = kernels.shape[-1]
    half = k // 2
    out = np.zeros_like(maps)
    for b in range(B):
        for c in range(C):
            for q in range(N):
                for j in range(prefix):
                    out[b, c, q, j] = kernels[c, half, half] * maps[b, c, q, j]
                for r in range(rows):
                    for s in range(cols):
                        total = 0.
                        for dr in range(k):
                            for ds in range(k):
                                rr, ss = r + dr - half, s + ds - half
                                if 0 <= rr < rows and 0 <= ss < cols:
                                    total += kernels[c, dr, ds] * maps[b, c, q, prefix + rr * cols + ss]
                        out[b, c, q, prefix + r * cols + s] = total
    return out


def naive_linear_refiner(attn: np.ndarray, refiner: AttentionRefiner) -> np.ndarray:
    """expand (head mix) -> key-grid depthwise conv -> reduce (head mix), float64 loops."""
    expand = refiner.expand.weight.detach().double().numpy()[:, :, 0, 0]
    kernels = refiner.conv.weight.detach().double().numpy()[:, 0]
    reduce = refiner.reduce.weight.detach().double().numpy()[:, :, 0, 0]
    expanded = np.einsum('ji,bikl->bjkl', expand, attn)
    local = naive_key_grid_conv(expanded, kernels, refiner.key_grid)
    return np.einsum('oj,bjkl->bokl', reduce, local)


def _maps(heads: int, prefix: int = 1, batch: int = 2) -> torch.Tensor:
    n = prefix + GRID[0] * GRID[1]
    return torch.randn(batch, heads, n, n, dtype=torch.float64).softmax(-1)


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
@pytest.mark.parametrize('prefix', [0, 1, 2])
def test_depthwise_key_grid_conv_matches_loops(kernel_size, prefix):
    torch.manual_seed(kernel_size + 10 * prefix)
    refiner = KeyGridRefiner(2, expansion_ratio=2, kernel_size=kernel_size, key_grid=GRID).double()
    x = _maps(4, prefix)
    weight = refiner.conv.weight.detach()
    out = refiner.local_conv(x, weight, groups=4).numpy()
    ref = naive_key_grid_conv(x.numpy(), weight.numpy()[:, 0], GRID)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('prefix', [0, 1])
def test_linear_key_grid_refiner_fast_and_stages_match_loops(prefix):
    torch.manual_seed(1)
    refiner = KeyGridRefiner(3, expansion_ratio=3, kernel_size=3, key_grid=GRID).double()
    attn = _maps(3, prefix)
    ref = naive_linear_refiner(attn.numpy(), refiner)
    np.testing.assert_allclose(refiner.forward_stages(attn).detach().numpy(), ref, rtol=1e-11, atol=1e-13)
    # the composed single convolution is exact for the grid layout too (the map is linear in the kernel)
    np.testing.assert_allclose(refiner(attn).detach().numpy(), ref, rtol=1e-11, atol=1e-13)


def test_key_grid_mixes_grid_neighbours_not_raster_neighbours():
    refiner = KeyGridRefiner(1, expansion_ratio=1, kernel_size=3, key_grid=GRID).double()
    with torch.no_grad():
        refiner.expand.weight.fill_(1.)
        refiner.conv.weight.fill_(1.)
        refiner.reduce.weight.fill_(1.)
    n = 1 + GRID[0] * GRID[1]
    attn = torch.zeros(1, 1, n, n, dtype=torch.float64)
    attn[0, 0, 5, 1 + 1 * GRID[1] + 0] = 1.  # query 5, key at grid cell (row 1, column 0)
    out = refiner(attn)[0, 0]
    hit = {tuple(index) for index in torch.nonzero(out).tolist()}
    cells = {(r, c) for r in (0, 1, 2) for c in (0, 1)}  # the 3x3 neighbourhood clipped at the left border
    assert hit == {(5, 1 + r * GRID[1] + c) for r, c in cells}
    # the 1-D (released) refiner instead spreads over raster neighbours and neighbouring queries
    flat = AttentionRefiner(1, expansion_ratio=1, kernel_size=3).double()
    flat.load_state_dict(refiner.state_dict())
    assert int((flat(attn)[0, 0] != 0).sum()) == 9 and (flat(attn)[0, 0, 4:7, 4:7] != 0).all()


def test_released_key_grid_refiner_and_identity_init():
    torch.manual_seed(2)
    released = KeyGridRefiner(2, kernel_size=3, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU6, shortcut=True,
                              out_norm_layer=nn.BatchNorm2d, key_grid=GRID).double().eval()
    attn = _maps(2)
    assert released(attn).shape == attn.shape
    identity = KeyGridRefiner(2, kernel_size=3, key_grid=GRID).double()
    identity.init_identity()
    torch.testing.assert_close(identity(attn), attn, rtol=1e-12, atol=1e-14)


def test_key_grid_refiner_has_the_gradients_of_the_stages():
    torch.manual_seed(3)
    refiner = KeyGridRefiner(2, kernel_size=3, key_grid=GRID).double()
    attn = _maps(2).requires_grad_()
    v = torch.randn(2, 2, attn.shape[-1], 5, dtype=torch.float64, requires_grad=True)
    refined = refiner(attn)
    out = refined @ v
    ref = naive_linear_refiner(attn.detach().numpy(), refiner)
    np.testing.assert_allclose(refined.detach().numpy(), ref, rtol=1e-11, atol=1e-13)
    grads = torch.autograd.grad(out.sum(), (attn, v, refiner.conv.weight))
    expected = torch.autograd.grad((refiner.forward_stages(attn) @ v).sum(), (attn, v, refiner.conv.weight))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_key_grid_refuses_bad_grids():
    with pytest.raises(ValueError, match='key_grid'):
        KeyGridRefiner(2, key_grid=(0, 4))
    with pytest.raises(ValueError, match='12 cells'):
        KeyGridRefiner(2, key_grid=GRID)(torch.rand(1, 2, 10, 10))


def test_a_refiner_with_its_own_local_conv_trains_and_stays_unfused_as_its_stages():
    """The released refiner's fast training paths and its fusion hold only for the released convolution: a subclass
    that redefines it must train exactly as its stages and fuse to itself."""
    torch.manual_seed(4)
    refiner = KeyGridRefiner.released(2, kernel_size=3, key_grid=GRID).double().train()
    reference = KeyGridRefiner.released(2, kernel_size=3, key_grid=GRID).double().train()
    reference.load_state_dict(refiner.state_dict())
    assert not refiner.released_local_conv and AttentionRefiner.released(2).released_local_conv
    attn = _maps(2).requires_grad_()
    out, expected = refiner(attn), reference.forward_stages(attn)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (attn, refiner.conv.weight))
    want = torch.autograd.grad((expected * weights).sum(), (attn, reference.conv.weight))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(refiner.norm1.running_mean, reference.norm1.running_mean, rtol=0, atol=0)
    assert refiner.eval().fuse() is refiner
