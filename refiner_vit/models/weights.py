"""One pipeline from a weights file to a model, for every command and every way in: read, extract, filter, diff, load.

1. **read** (:func:`read_checkpoint`): ``.safetensors`` or a torch file, through :mod:`refiner_vit.utils.io`, which
   never executes code from a file.
2. **extract** (:func:`extract`): the weights inside: a plain state dict, or a training checkpoint of timm's
   trainer, DeiT's, the authors' or ``refiner train``'s (``state_dict`` / ``state_dict_ema`` / ``model`` /
   ``model_ema``, EMA preferred), without the ``module.`` prefixes of DataParallel / DDP.
3. **filter** (:func:`apply_family_filter`): the model family's ``checkpoint_filter_fn``, in timm's convention: it
   only renames foreign keys and resamples the position embedding, so timm's ``pretrained=True`` path and this
   pipeline map a file the same way.
4. **diff** (:func:`diff`): missing, unexpected and wrongly shaped keys, reported in one format.
5. **load** (:func:`load`): ``'strict'`` (runs, converted checkpoints: every key fits) or ``'finetune'`` (classifier
   weights of another class count dropped; the new head keeps its initialisation).

Every problem is a :class:`~refiner_vit.errors.WeightsError` (a ``ValueError``) naming the file and the keys.
"""
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import WeightsError
from ..utils.io import load_state_dict_file

__all__ = ['LOAD_MODES', 'WeightsDiff', 'apply_family_filter', 'classifier_names', 'diff', 'extract', 'fit', 'load',
           'num_classes_of', 'read', 'read_checkpoint']

StateDict = Dict[str, torch.Tensor]
LOAD_MODES = ('strict', 'finetune')

# Where training checkpoints keep their weights: timm-based trainers (the authors' included) use
# `state_dict` / `state_dict_ema`, DeiT-style trainers (and `refiner train`) `model` / `model_ema`.
_WEIGHTS_KEYS = ('state_dict', 'model')
_EMA_WEIGHTS_KEYS = ('state_dict_ema', 'model_ema')
_COUNTER_SUFFIX = '.num_batches_tracked'


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """The object stored in a weights file, read without executing code from it.

    Raises:
        WeightsError: the file is missing, unreadable, or pickles objects that are not weights.
    """
    return load_state_dict_file(path)


def _select(checkpoint: Dict[str, Any], use_ema: Optional[bool]) -> Tuple[Dict[str, Any], str]:
    """The weights inside a training checkpoint and the key they were under (``''``: a bare state dict)."""
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
    raise WeightsError(f'checkpoint holds no {wanted}; its top-level keys: {found}')


def extract(obj: Any, source: Any, use_ema: Optional[bool] = None) -> Tuple[StateDict, str]:
    """The weights in a loaded file, without ``module.`` prefixes, and the checkpoint key they came from (``''``
    for a bare state dict).

    A run with model EMA evaluates and publishes the EMA weights, so they are preferred when present
    (``use_ema=None``), as timm's own loader does; ``use_ema=True`` requires them, ``False`` skips them.

    Raises:
        WeightsError: not a dict, or the requested weights are not in it (the message lists its top-level keys).
    """
    if not isinstance(obj, dict):
        raise WeightsError(f'{source}: expected a state dict or a training checkpoint (a dict), got '
                           f'{type(obj).__name__}')
    try:
        weights, key = _select(obj, use_ema)
    except WeightsError as e:
        raise WeightsError(f'{source}: {e}') from e
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in weights.items()}, key


def read(path: Union[str, os.PathLike], use_ema: Optional[bool] = None) -> StateDict:
    """The weights in a file: :func:`read_checkpoint`, then :func:`extract`."""
    return extract(read_checkpoint(path), path, use_ema)[0]


def apply_family_filter(model: nn.Module, state: StateDict) -> StateDict:
    """Map foreign keys onto ``model`` with its family's ``checkpoint_filter_fn`` (timm's convention), if any.

    The function lives in the module defining the model's class: ours for Refiner-ViT (the authors' key names,
    position-embedding resampling), timm's for its families (e.g. ViT: original JAX/DeiT layouts).
    """
    filter_fn = getattr(importlib.import_module(type(model).__module__), 'checkpoint_filter_fn', None)
    return dict(filter_fn(state, model)) if filter_fn is not None else dict(state)


@dataclass
class WeightsDiff:
    """How a state dict differs from a model's: keys only the model has, keys only the file has, and keys whose
    shapes differ (``(key, shape in the file, shape in the model)``)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    def describe(self, limit: int = 8) -> str:
        """``shape mismatches: KEY: (..) in the file, (..) in the model; missing keys: ...; unexpected keys: ...``,
        at most ``limit`` of each kind (a wrong shape tells most about a file of another variant)."""
        def listed(items: Sequence[str]) -> str:
            more = f' (and {len(items) - limit} more)' if len(items) > limit else ''
            return ', '.join(items[:limit]) + more

        shapes = [f'{k}: {theirs} in the file, {ours} in the model' for k, theirs, ours in self.wrong_shape]
        parts = (('shape mismatches', shapes), ('missing keys', self.missing), ('unexpected keys', self.unexpected))
        return '; '.join(f'{label}: {listed(items)}' for label, items in parts if items)


def diff(model: nn.Module, state: Mapping[str, torch.Tensor], skip: Sequence[str] = ()) -> WeightsDiff:
    """How ``state`` (already filtered) differs from ``model``'s state dict, keys in ``skip`` ignored."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = {k: v for k, v in state.items() if k not in skip}
    return WeightsDiff(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        wrong_shape=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                     if k in own and v.shape != own[k].shape])


def classifier_names(model: Union[nn.Module, str]) -> Tuple[str, ...]:
    """Module names of the classifier(s) (timm's pretrained cfg ``classifier``) of a model or an entry point."""
    if isinstance(model, str):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
        classifier = cfg.classifier if cfg is not None else None
    else:
        classifier = getattr(model, 'pretrained_cfg', {}).get('classifier')
    classifier = classifier or 'head'
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def num_classes_of(state: Mapping[str, torch.Tensor], model: Union[nn.Module, str]) -> Optional[int]:
    """The class count of the weights' classifier, named as ``model``'s family names it; None without one."""
    for name in classifier_names(model):
        weight = state.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def fit(model: nn.Module, state: StateDict, source: Any, mode: str = 'strict') -> StateDict:
    """``state`` mapped onto ``model`` (:func:`apply_family_filter`) and checked (:func:`diff`), ready for
    ``model.load_state_dict(..., strict=mode == 'strict')``.

    ``'strict'``: every key fits. BatchNorm counters (``num_batches_tracked``), which older state dicts lack, are
    the only keys that may be missing (they count updates and do not change the outputs; they start at 0).
    ``'finetune'``: classifier weights of another shape are dropped, and keys the file lacks keep the model's
    initialisation; nothing else may differ.

    Raises:
        WeightsError: the weights do not fit (the message lists the keys and shapes).
    """
    if mode not in LOAD_MODES:
        raise ValueError(f'mode must be one of {LOAD_MODES}, got {mode!r}')
    state = apply_family_filter(model, state)
    found = diff(model, state)
    if mode == 'strict':
        for key in found.missing:
            if key.endswith(_COUNTER_SUFFIX):
                state[key] = torch.zeros((), dtype=torch.long)
        found.missing = [k for k in found.missing if not k.endswith(_COUNTER_SUFFIX)]
    else:
        heads = tuple(f'{name}.' for name in classifier_names(model))
        dropped = {k for k, _, _ in found.wrong_shape if k.startswith(heads)}
        state = {k: v for k, v in state.items() if k not in dropped}
        found.missing = []
        found.wrong_shape = [entry for entry in found.wrong_shape if entry[0] not in dropped]
    if found:
        raise WeightsError(f'{source}: does not fit the model {_model_name(model)} ({found.describe()})')
    if not state:
        raise WeightsError(f'{source}: no weight of the file fits the model {_model_name(model)}')
    return state


def load(model: nn.Module, state: StateDict, source: Any, mode: str = 'strict', assign: bool = False) -> nn.Module:
    """Load ``state`` (from :func:`read`) into ``model`` through :func:`fit`; ``assign`` takes the tensors as they
    are (a model built on the meta device)."""
    model.load_state_dict(fit(model, state, source, mode), strict=mode == 'strict', assign=assign)
    return model
