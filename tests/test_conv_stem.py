"""The conv stem's CPU forms (channels-last maps, the patch projection as a matmul) against plain NCHW convolutions
in float64: outputs and every gradient, for sizes the projection divides and sizes it crops."""
import copy

import pytest
import torch
from helpers import randomise_batchnorms
from torch.nn import functional as F

from refiner_vit.layers import ConvStem, ConvStemPatchEmbed


def _reference_forward(stem: ConvStem, x: torch.Tensor) -> torch.Tensor:
    """The stem as its modules define it: NCHW convolutions, the projection a strided convolution."""
    x = stem.relu(stem.bn1(stem.conv1(x)))
    x = stem.relu(stem.bn2(stem.conv2(x)))
    x = stem.relu(stem.bn3(stem.conv3(x)))
    return F.conv2d(x, stem.proj.weight, stem.proj.bias, stride=stem.proj.stride)


@pytest.mark.parametrize('size, bias', [(32, True), (36, False)], ids=['divisible', 'cropped-no-bias'])
def test_stem_matches_its_nchw_convolutions_in_float64(size, bias):
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed(img_size=size, patch_size=8, embed_dim=24, stem_chs=(8, 16, 32), bias=bias,
                              strict_img_size=False).double().train()
    randomise_batchnorms(stem, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(stem)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = ConvStem.forward(stem, x)
    expected = _reference_forward(reference, x)
    assert out.shape == expected.shape == (2, 24, size // 8, size // 8)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(stem.parameters()), upstream)
    grads_ref = torch.autograd.grad(expected, list(reference.parameters()), upstream)
    for (name, _), a, b in zip(stem.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    tokens = stem(x)  # timm's (B, N, C) tokens: a view of the channels-last maps
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
