"""Load weights files into models: safely, through the model family's key mapping, naming what does not fit.

Every command that takes weights goes through here (by way of :mod:`refiner_vit.models.resolve`), so each
accepts the same files: safetensors, a plain state dict, a training checkpoint of timm's trainer, DeiT's or
the authors' (``state_dict`` / ``state_dict_ema`` / ``model`` / ``model_ema``, EMA preferred), with or without
``module.`` prefixes. Files are read by :func:`refiner_vit.io.load_state_dict_file`, which never executes code
from them. Problems are ``ValueError``s naming the file and the keys; the command line turns them into its
one-line errors.
"""
import importlib
import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..io import load_state_dict_file

__all__ = ['apply_family_filter', 'check_state_dict_fits', 'classifier_prefixes', 'fit_for_finetuning',
           'load_weights', 'read_weights', 'select_state_dict', 'strip_module_prefix', 'weights_of']

StateDict = Dict[str, torch.Tensor]

# Where training checkpoints keep their weights: timm-based trainers (the authors' included) use
# `state_dict` / `state_dict_ema`, DeiT-style trainers (and `refiner train`) `model` / `model_ema`.
_WEIGHTS_KEYS = ('state_dict', 'model')
_EMA_WEIGHTS_KEYS = ('state_dict_ema', 'model_ema')


def select_state_dict(checkpoint: Dict[str, Any], use_ema: Optional[bool] = None) -> Tuple[Dict[str, Any], str]:
    """The weights inside a training checkpoint, and the key they were found under (``''``: a bare state dict).

    A run with model EMA evaluates and publishes the EMA weights, so they are preferred when present
    (``use_ema=None``), as timm's own loader does; ``use_ema=True`` requires them, ``False`` skips them.

    Raises:
        ValueError: the requested weights are not in the checkpoint; the message lists its top-level keys.
    """
    ema_key = next((k for k in _EMA_WEIGHTS_KEYS if isinstance(checkpoint.get(k), dict)), None)
    key = next((k for k in _WEIGHTS_KEYS if isinstance(checkpoint.get(k), dict)), None)
    if use_ema is not False and ema_key is not None:
        key = ema_key
    elif use_ema:
        key = None
    if key is not None:
        return checkpoint[key], key
    if not use_ema and ema_key is None and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, ''
    if use_ema is None:
        wanted = 'weights (' + ', '.join(_WEIGHTS_KEYS + _EMA_WEIGHTS_KEYS) + ', or only tensors)'
    else:
        wanted = ('EMA' if use_ema else 'non-EMA') + ' weights (' + ' or '.join(
            _EMA_WEIGHTS_KEYS if use_ema else _WEIGHTS_KEYS) + ')'
    found = ', '.join(sorted(map(str, checkpoint))[:12]) or 'none'
    raise ValueError(f'checkpoint holds no {wanted}; its top-level keys: {found}')


def strip_module_prefix(state: Dict[str, Any]) -> Dict[str, Any]:
    """Keys without the ``module.`` prefix that DataParallel / DDP checkpoints carry."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def weights_of(obj: Any, source: Any, use_ema: Optional[bool] = None) -> StateDict:
    """The weights in a loaded file (EMA weights preferred in a training checkpoint), without ``module.``
    prefixes; ``source`` names the file in errors."""
    if not isinstance(obj, dict):
        raise ValueError(f'{source}: expected a state dict or a training checkpoint (a dict), got '
                         f'{type(obj).__name__}')
    try:
        weights, _ = select_state_dict(obj, use_ema)
    except ValueError as e:
        raise ValueError(f'{source}: {e}') from e
    return strip_module_prefix(weights)


def read_weights(path: Union[str, os.PathLike], use_ema: Optional[bool] = None) -> StateDict:
    """The weights in a file: :func:`weights_of` the file, read without executing code."""
    return weights_of(load_state_dict_file(path), path, use_ema)


def apply_family_filter(model: nn.Module, state: StateDict) -> StateDict:
    """Map foreign keys onto ``model`` with its family's ``checkpoint_filter_fn`` (timm's convention), if any.

    The function lives in the module defining the model's class: ours for Refiner-ViT (the authors' key names,
    position-embedding resampling), timm's for its families (e.g. ViT: original JAX/DeiT layouts).
    """
    filter_fn = getattr(importlib.import_module(type(model).__module__), 'checkpoint_filter_fn', None)
    return filter_fn(state, model) if filter_fn is not None else state


def check_state_dict_fits(model: nn.Module, state: StateDict, source: Any) -> None:
    """Raise a ``ValueError`` listing missing, unexpected and wrongly shaped keys (at most 8 of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f'{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model'
             for k in state if k in own and state[k].shape != own[k].shape]
    problems = [f'{label}: {", ".join(keys[:8])}' for label, keys in
                (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong)) if keys]
    if problems:
        raise ValueError(f'{source}: does not fit the model ({"; ".join(problems)})')


def load_weights(model: nn.Module, state: StateDict, source: Any) -> nn.Module:
    """Load ``state`` (from :func:`read_weights`) into ``model`` exactly, after the family's key mapping.

    BatchNorm counters (``num_batches_tracked``), which older state dicts lack, are the only keys that may be
    missing: they count updates and do not change the outputs.
    """
    state = dict(apply_family_filter(model, state))
    for key, value in model.state_dict().items():
        if key.endswith('.num_batches_tracked'):
            state.setdefault(key, value.clone())
    check_state_dict_fits(model, state, source)
    model.load_state_dict(state)
    return model


def classifier_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """``('head.', 'aux_head.')``-style prefixes of the model's classifier weights (timm's cfg ``classifier``)."""
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f'{n}.' for n in names)


def fit_for_finetuning(model: nn.Module, state: StateDict, source: Any) -> StateDict:
    """Map foreign weights onto ``model`` for fine-tuning: family key renames and position-embedding resampling,
    classifier weights of another class count dropped (the new head keeps its initialisation).

    Raises:
        ValueError: keys the model does not have, or non-classifier weights of another shape (listed).
    """
    state = apply_family_filter(model, state)
    own = model.state_dict()
    heads = classifier_prefixes(model)
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape and not k.startswith(heads)]
    if unexpected or wrong:
        details = [f'unexpected keys: {", ".join(unexpected[:8])}'] if unexpected else []
        details += [f'{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model' for k in wrong[:8]]
        raise ValueError(f'{source}: does not fit the model ({"; ".join(details)})')
    fitted = {k: v for k, v in state.items() if v.shape == own[k].shape}
    if not fitted:
        raise ValueError(f'{source}: no weight of the file fits the model')
    return fitted
