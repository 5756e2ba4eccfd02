"""Load weights files into models: safely, through the model family's key mapping, naming what does not fit.

Every command that takes a ``--checkpoint`` goes through here, so each accepts the same files: safetensors,
a plain state dict, a training checkpoint of timm's trainer or the authors' (``state_dict`` /
``state_dict_ema`` / ``model`` / ``model_ema``, EMA preferred), with or without ``module.`` prefixes. Files
are read by :func:`refiner_vit.io.load_state_dict_file`, which never executes code from them.
"""
import importlib
import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..errors import UsageError
from ..io import load_state_dict_file
from .refiner_vit import select_state_dict

__all__ = ['apply_family_filter', 'check_state_dict_fits', 'load_weights', 'read_weights']

StateDict = Dict[str, torch.Tensor]


def read_weights(path: Union[str, os.PathLike], use_ema: Optional[bool] = None) -> StateDict:
    """The weights in a file (EMA weights preferred in a training checkpoint), without ``module.`` prefixes."""
    obj = load_state_dict_file(path)
    if not isinstance(obj, dict):
        raise UsageError(f'{path}: expected a state dict or a training checkpoint (a dict), got {type(obj).__name__}')
    try:
        weights, _ = select_state_dict(obj, use_ema)
    except UsageError as e:
        raise UsageError(f'{path}: {e}') from e
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in weights.items()}


def apply_family_filter(model: nn.Module, state: StateDict) -> StateDict:
    """Map foreign keys onto ``model`` with its family's ``checkpoint_filter_fn`` (timm's convention), if any.

    The function lives in the module defining the model's class: ours for Refiner-ViT (the authors' key names,
    position-embedding resampling), timm's for its families (e.g. ViT: original JAX/DeiT layouts).
    """
    filter_fn = getattr(importlib.import_module(type(model).__module__), 'checkpoint_filter_fn', None)
    return filter_fn(state, model) if filter_fn is not None else state


def check_state_dict_fits(model: nn.Module, state: StateDict, source: Any) -> None:
    """Raise a :class:`UsageError` listing missing, unexpected and wrongly shaped keys (at most 8 of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f'{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model'
             for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f'{label}: {", ".join(keys[:8])}' for label, keys in
                (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong)) if keys]
    if problems:
        raise UsageError(f'{source}: does not fit the model ({"; ".join(problems)})')


def load_weights(model: nn.Module, state: StateDict, source: Any) -> nn.Module:
    """Load ``state`` (from :func:`read_weights`) into ``model`` exactly, after the family's key mapping."""
    state = apply_family_filter(model, state)
    check_state_dict_fits(model, state, source)
    model.load_state_dict(state)
    return model
