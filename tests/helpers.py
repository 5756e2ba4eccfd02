"""Helpers shared by several test modules."""
import torch
from torch import nn


def randomise_batchnorms(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                bn.weight.copy_(torch.randn(c, generator=generator))
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return module
