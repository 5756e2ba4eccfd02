"""How the study's own models are built: a registered model, edited, under the study's name.

Every study model is a core model (a timm ViT, a refined ViT, a Refiner-ViT) with one part swapped. Building it as
``base`` plus an edit keeps the core free of study-only switches; naming the edited model in its pretrained config
lets a saved run or model folder rebuild it by that name in the study's process, where it is registered.
"""
from typing import Any, Callable, Dict

import timm
from torch import nn

__all__ = ['build_edited']


def build_edited(name: str, base: str, pretrained: bool, kwargs: Dict[str, Any],
                 edit: Callable[[nn.Module], None]) -> nn.Module:
    """``base`` built by timm with ``kwargs``, then changed in place by ``edit``; its config names ``name``."""
    if pretrained:
        raise ValueError(f'{name}: the study\'s models have no pretrained weights (their new parts start at random)')
    model = timm.create_model(base, **kwargs)
    edit(model)
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, 'architecture': name}
    return model
