"""The authors' checkpoints -> this package's models and timm's local-dir format.

The authors trained with a timm-0.4 trainer, whose checkpoints are a dict with ``state_dict`` (maybe
``module.``-prefixed), ``state_dict_ema``, ``optimizer``, ``epoch``, ``arch`` and an ``argparse.Namespace``
under ``args``. Nothing here unpickles more than that: files go through :mod:`refiner_vit.utils.io`.

Reading, choosing the weights, the key renames, the position-embedding resampling and the strict check are
the weights pipeline's (:mod:`refiner_vit.models.weights`, through the family's
:func:`~refiner_vit.models.refiner_vit.checkpoint_filter_fn`, which timm's own ``pretrained=True`` path uses as
well); this module adds what a file without a recorded architecture needs: recognising the variant from the
tensor shapes. :func:`refiner_vit.models.local_dir.save_local_dir` writes the result where
``timm.create_model('local-dir:DIR', pretrained=True)`` finds it.
"""
import functools
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch

from ..errors import WeightsError
from . import weights as weights_pipeline
from .refiner_vit import RefinerVisionTransformer

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


def _weights(obj: Checkpoint, use_ema: Optional[bool]) -> Tuple[StateDict, str, str]:
    """The chosen weights of a checkpoint (file or dict), their key, and a name for the checkpoint in messages."""
    source = 'checkpoint'
    if isinstance(obj, (str, os.PathLike)):
        source, obj = str(obj), weights_pipeline.read_checkpoint(obj)
    weights, key = weights_pipeline.extract(obj, source, use_ema)
    return weights, key, source


def _head_args(weights: StateDict) -> Dict[str, Any]:
    """``num_classes`` and ``aux_head`` as the checkpoint's heads have them."""
    head = weights.get('head.weight')
    return dict(num_classes=0 if head is None else head.shape[0], aux_head='aux_head.weight' in weights)


def _grid(weights: StateDict) -> int:
    """Side of the (square) token grid the checkpoint's position embedding was trained for."""
    pos = weights.get('pos_embed')
    if pos is None or pos.ndim != 3:
        raise WeightsError('checkpoint has no pos_embed of shape (1, 1 + tokens, dim): not a Refiner-ViT checkpoint')
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise WeightsError(f'pos_embed holds {pos.shape[1] - 1} patch tokens, not a square grid')
    return side


def _meta_model(name: str, **kwargs: Any) -> RefinerVisionTransformer:
    """The model without allocating memory for its weights (they are replaced anyway)."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@functools.cache
def _candidate(name: str, num_classes: int, aux_head: bool) -> RefinerVisionTransformer:
    """A read-only meta model for shape matching; cached, as building one runs the whole initialisation."""
    return _meta_model(name, num_classes=num_classes, aux_head=aux_head)


def infer_model_args(weights: StateDict) -> Tuple[str, Dict[str, Any]]:
    """The entry point whose architecture ``weights`` fit, and the kwargs that make it fit exactly.

    Every registered Refiner-ViT is built on the meta device (no weight memory) and fits when all keys
    and shapes but ``pos_embed`` agree. Among those, one built for the checkpoint's token grid wins;
    otherwise the first gets ``img_size`` set to the checkpoint's. ``num_classes`` and ``aux_head``
    follow the checkpoint's heads.

    Raises:
        WeightsError: no entry point fits; the message names the closest one and what differs.
    """
    grid = _grid(weights)
    head_args = _head_args(weights)
    without_pos = {k: v for k, v in weights.items() if k != 'pos_embed'}
    fits, closest = [], None
    for name in family_models():
        model = _candidate(name, **head_args)
        skip = ['pos_embed'] + [k for k in model.state_dict() if k.endswith('.num_batches_tracked')]
        found = weights_pipeline.diff(model, weights_pipeline.apply_family_filter(model, without_pos), skip)
        if not found:
            fits.append((name, model))
        elif closest is None or len(found) < len(closest[1]):
            closest = (name, found)
    if not fits:
        raise WeightsError(f'the weights fit no Refiner-ViT entry point; closest {closest[0]}: '
                           f'{closest[1].describe()}')
    for name, model in fits:
        if model.patch_embed.grid_size == (grid, grid):
            return name, head_args
    name, model = fits[0]
    return name, {**head_args, 'img_size': grid * model.patch_embed.patch_size}


def _target(weights: StateDict, model_name: Optional[str], img_size: Optional[int],
            source: str) -> RefinerVisionTransformer:
    """:func:`_target_model`, its errors naming the checkpoint."""
    try:
        return _target_model(weights, model_name, img_size)
    except WeightsError as e:
        raise WeightsError(f'{source}: {e}') from e


def _target_model(weights: StateDict, model_name: Optional[str], img_size: Optional[int]) -> RefinerVisionTransformer:
    """A meta-device model for ``weights``: ``model_name`` (at its own size) or the inferred entry point."""
    if model_name is None:
        model_name, kwargs = infer_model_args(weights)
    elif model_name in family_models():
        kwargs = _head_args(weights)
    else:
        raise WeightsError(f'unknown model {model_name!r}; choose one of: {", ".join(family_models())}')
    if img_size is not None:
        kwargs['img_size'] = img_size
    return _meta_model(model_name, **kwargs)


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
        WeightsError: an unreadable or unsafe file (refused before anything is loaded), missing weights, or
            weights that do not fit the target (the message names the file, the keys and the shapes).
    """
    if model is not None and (img_size is not None or model_name is not None):
        raise TypeError('pass either model or img_size / model_name, not both')
    weights, _, source = _weights(obj, use_ema)
    target = model if model is not None else _target(weights, model_name, img_size, source)
    return weights_pipeline.fit(target, weights, source, 'strict')


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
    model = weights_pipeline.load(_target(weights, model_name, img_size, source), weights, source, assign=True)
    return model.eval(), key or 'state dict'
