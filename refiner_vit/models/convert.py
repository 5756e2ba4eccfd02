"""The authors' checkpoints -> this package's models and timm's local-dir format.

The authors trained with a timm-0.4 trainer, whose checkpoints are a dict with ``state_dict`` (maybe
``module.``-prefixed), ``state_dict_ema``, ``optimizer``, ``epoch``, ``arch`` and an ``argparse.Namespace``
under ``args``. Nothing here unpickles more than that: files go through :mod:`refiner_vit.io`.

The key renames and the position-embedding resampling live in the model family's
:func:`~refiner_vit.models.refiner_vit.checkpoint_filter_fn`, which timm's own ``pretrained=True`` path
uses as well; this module adds what a file on its own needs: choosing the weights, recognising the
variant from the tensor shapes, a strict check that names what does not fit, and writing the result
where ``timm.create_model('local-dir:DIR', pretrained=True)`` finds it
(:func:`refiner_vit.models.local_dir.save_local_dir`).
"""
import contextlib
import functools
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch

from ..io import load_state_dict_file
from .loading import select_state_dict, strip_module_prefix
from .refiner_vit import RefinerVisionTransformer, checkpoint_filter_fn

__all__ = [
    'convert_official_checkpoint',
    'create_model_from_official',
    'infer_model_args',
]

Checkpoint = Union[str, os.PathLike, Dict[str, Any]]
StateDict = Dict[str, torch.Tensor]

FAMILY_MODULE = 'refiner_vit'


def family_models() -> List[str]:
    """The registered Refiner-ViT entry points, in timm's (alphabetical) order."""
    return timm.list_models(module=FAMILY_MODULE)


@contextlib.contextmanager
def _about(source: str) -> Iterator[None]:
    """Prefix the ``ValueError`` raised inside with the checkpoint it concerns."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f'{source}: {e}') from e


def _weights(obj: Checkpoint, use_ema: Optional[bool]) -> Tuple[StateDict, str, str]:
    """The chosen weights of a checkpoint (file or dict) without ``module.`` prefixes, their key, and a
    name for the checkpoint in messages."""
    source = 'checkpoint'
    if isinstance(obj, (str, os.PathLike)):
        source, obj = str(obj), load_state_dict_file(obj)
    if not isinstance(obj, dict):
        raise ValueError(f'{source}: expected a state dict or a training checkpoint (a dict), got {type(obj).__name__}')
    with _about(source):
        weights, key = select_state_dict(obj, use_ema)
    return strip_module_prefix(weights), key, source


def _head_args(weights: StateDict) -> Dict[str, Any]:
    """``num_classes`` and ``aux_head`` as the checkpoint's heads have them."""
    head = weights.get('head.weight')
    return dict(num_classes=0 if head is None else head.shape[0], aux_head='aux_head.weight' in weights)


def _grid(weights: StateDict) -> int:
    """Side of the (square) token grid the checkpoint's position embedding was trained for."""
    pos = weights.get('pos_embed')
    if pos is None or pos.ndim != 3:
        raise ValueError('checkpoint has no pos_embed of shape (1, 1 + tokens, dim): not a Refiner-ViT checkpoint')
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f'pos_embed holds {pos.shape[1] - 1} patch tokens, not a square grid')
    return side


def _meta_model(name: str, **kwargs: Any) -> RefinerVisionTransformer:
    """The model without allocating memory for its weights (they are replaced anyway)."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@functools.cache
def _candidate(name: str, num_classes: int, aux_head: bool) -> RefinerVisionTransformer:
    """A read-only meta model for shape matching; cached, as building one runs the whole initialisation."""
    return _meta_model(name, num_classes=num_classes, aux_head=aux_head)


def _mismatches(mapped: StateDict, model: torch.nn.Module, skip: Sequence[str] = ()) -> List[str]:
    """Human-readable differences between ``mapped`` and ``model``'s state dict (keys in ``skip`` ignored)."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    mapped = {k: v for k, v in mapped.items() if k not in skip}
    problems = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in mapped.items() if k in expected and v.shape != expected[k].shape
    ]
    # BatchNorm counters missing from older state dicts are harmless: they start at 0 (see _map_strictly).
    problems += [f'missing {k}' for k in expected if k not in mapped and not k.endswith('.num_batches_tracked')]
    return problems + [f'unexpected {k}' for k in mapped if k not in expected]


def _describe(problems: List[str], limit: int = 6) -> str:
    more = f' (and {len(problems) - limit} more)' if len(problems) > limit else ''
    return '; '.join(problems[:limit]) + more


def infer_model_args(weights: StateDict) -> Tuple[str, Dict[str, Any]]:
    """The entry point whose architecture ``weights`` fit, and the kwargs that make it fit exactly.

    Every registered Refiner-ViT is built on the meta device (no weight memory) and fits when all keys
    and shapes but ``pos_embed`` agree. Among those, one built for the checkpoint's token grid wins;
    otherwise the first gets ``img_size`` set to the checkpoint's. ``num_classes`` and ``aux_head``
    follow the checkpoint's heads.

    Raises:
        ValueError: no entry point fits; the message names the closest one and what differs.
    """
    grid = _grid(weights)
    head_args = _head_args(weights)
    without_pos = {k: v for k, v in weights.items() if k != 'pos_embed'}
    fits, closest = [], None
    for name in family_models():
        model = _candidate(name, **head_args)
        problems = _mismatches(checkpoint_filter_fn(without_pos, model), model, skip=('pos_embed',))
        if not problems:
            fits.append((name, model))
        elif closest is None or len(problems) < len(closest[1]):
            closest = (name, problems)
    if not fits:
        raise ValueError(f'the weights fit no Refiner-ViT entry point; closest {closest[0]}: {_describe(closest[1])}')
    for name, model in fits:
        if model.patch_embed.grid_size == (grid, grid):
            return name, head_args
    name, model = fits[0]
    return name, {**head_args, 'img_size': grid * model.patch_embed.patch_size}


def _target_model(weights: StateDict, model_name: Optional[str], img_size: Optional[int]) -> RefinerVisionTransformer:
    """A meta-device model for ``weights``: ``model_name`` (at its own size) or the inferred entry point."""
    if model_name is None:
        model_name, kwargs = infer_model_args(weights)
    elif model_name in family_models():
        kwargs = _head_args(weights)
    else:
        raise ValueError(f'unknown model {model_name!r}; choose one of: {", ".join(family_models())}')
    if img_size is not None:
        kwargs['img_size'] = img_size
    return _meta_model(model_name, **kwargs)


def _map_strictly(weights: StateDict, model: RefinerVisionTransformer) -> StateDict:
    mapped = checkpoint_filter_fn(weights, model)
    for key in model.state_dict():
        if key.endswith('.num_batches_tracked'):  # a meta model needs every tensor; the counter only counts
            mapped.setdefault(key, torch.zeros((), dtype=torch.long))
    problems = _mismatches(mapped, model)
    if problems:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise ValueError(f'the weights do not fit {name}: {_describe(problems)}')
    return mapped


def convert_official_checkpoint(
        obj: Checkpoint,
        use_ema: Optional[bool] = None,
        model: Optional[RefinerVisionTransformer] = None,
        img_size: Optional[int] = None,
        model_name: Optional[str] = None,
) -> StateDict:
    """The authors' weights as a state dict of ours, ready for ``model.load_state_dict(..., strict=True)``.

    Args:
        obj: A path (``.safetensors`` or a torch file, loaded without executing code), a bare state dict,
            or a training checkpoint holding ``state_dict`` / ``state_dict_ema`` (``module.`` prefixes allowed).
        use_ema: ``None`` takes the EMA weights when present, ``True`` requires them, ``False`` skips them.
        model: The target model (any device, meta included); its token grid decides the ``pos_embed``
            resampling. Without it the target is ``model_name`` or the entry point the shapes fit.
        img_size: Target image size when no ``model`` is given (the position embedding is resampled).
        model_name: Target entry point when no ``model`` is given (default: inferred from the shapes).

    Raises:
        ValueError: missing weights, or weights that do not fit the target (the message names the keys and
            shapes). An unreadable or unsafe file is refused by :mod:`refiner_vit.io` before anything is loaded.
    """
    if model is not None and (img_size is not None or model_name is not None):
        raise TypeError('pass either model or img_size / model_name, not both')
    weights, _, source = _weights(obj, use_ema)
    with _about(source):
        return _map_strictly(weights, model if model is not None else _target_model(weights, model_name, img_size))


def create_model_from_official(
        obj: Checkpoint,
        model_name: Optional[str] = None,
        use_ema: Optional[bool] = None,
        img_size: Optional[int] = None,
) -> Tuple[RefinerVisionTransformer, str]:
    """An eval-mode model holding the authors' weights, and the checkpoint key they came from
    (``'state dict'`` for a bare state dict).

    The model is built on the meta device and takes the checkpoint's tensors as they are (dtype
    included), so nothing is initialised twice. Arguments as in :func:`convert_official_checkpoint`.
    """
    weights, key, source = _weights(obj, use_ema)
    with _about(source):
        model = _target_model(weights, model_name, img_size)
        model.load_state_dict(_map_strictly(weights, model), strict=True, assign=True)
    return model.eval(), key or 'state dict'
