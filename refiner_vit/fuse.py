"""Inference-time fusion of any model of this package, by timm's re-parameterisation walk.

Every module that can be folded says how itself (timm's convention, which ``timm.utils.reparameterize_model`` walks):
a refiner's ``fuse()`` returns its folded form (BatchNorms folded into the convolutions, a linear refiner composed
into one convolution), and attention layers, blocks and the conv stem ``reparameterize()`` in place, folding constant
factors and BatchNorms into the weights next to them. The fused model computes the same function (to float rounding)
with fewer passes over the attention maps and tokens, and is what :mod:`refiner_vit.export` exports. It is a
deployment artefact: its state dict differs.
"""
import copy

from timm.utils.model import reparameterize_model
from torch import nn

__all__ = ['fuse_for_inference']


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A fused eval-mode copy of ``model`` (the original is left as it is)."""
    return reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
