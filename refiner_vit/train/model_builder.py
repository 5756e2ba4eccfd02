"""The model ``refiner train`` trains, built from its config: architecture, refinement, fine-tuning weights.

Its *spec* (``{'model': name, 'model_kwargs': {...}, 'refine': {...} or None}``, see
:mod:`refiner_vit.models.resolve`) is stored in ``checkpoint-last.pth`` and ``best/config.json``, so every other
command rebuilds the model without flags. A problem is a :class:`~refiner_vit.errors.ConfigError` naming the flag
or a :class:`~refiner_vit.errors.WeightsError` naming the file (both ``ValueError``).
"""
from typing import Any, Dict, Tuple

from torch import nn

from ..errors import ConfigError
from ..models import refine
from ..models.resolve import create_timm_model, read_source_weights
from ..models.weights import fit
from .config import DEFAULT_MODEL, TrainConfig

__all__ = ['build_model', 'default_model_kwargs']


def default_model_kwargs(img_size: int) -> Dict[str, Any]:
    """:data:`DEFAULT_MODEL` at ``img_size``: the patch grows with the input (4 px up to 32 px, 8 px up to 128 px,
    else 16 px) so the number of tokens, whose square the refiner's cost follows, stays small."""
    patch = 4 if img_size <= 32 else 8 if img_size <= 128 else 16
    if img_size % patch:
        raise ConfigError(f'--img-size {img_size} is not divisible by the default model\'s patch size {patch}')
    return dict(img_size=img_size, patch_size=patch)


def build_model(config: TrainConfig, num_classes: int, token_labels: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model to train and its spec. Fine-tuning weights (``--checkpoint``) are loaded here."""
    name = config.model or DEFAULT_MODEL
    kwargs: Dict[str, Any] = {} if config.model else default_model_kwargs(config.img_size)
    if config.model and config.img_size:
        kwargs['img_size'] = config.img_size
    kwargs['num_classes'] = num_classes
    if config.drop_path:
        kwargs['drop_path_rate'] = config.drop_path
    if config.drop:
        kwargs['drop_rate'] = config.drop
    if token_labels:
        kwargs.update(aux_head=True, mix_token=bool(config.mix_token))
    kwargs.update(config.model_kwargs)
    try:
        model = create_timm_model(name, pretrained=config.pretrained, **kwargs)
    except ConfigError as e:
        raise ConfigError(f'--model {e}') from e
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if token_labels and not hasattr(model, 'forward_train'):
        raise ConfigError(f'--token-label-dir needs a model with a token-labeling head (refiner_vit_*), not {name}')
    if config.refine:
        # Identity start keeps pretrained predictions; from scratch the random start trains better
        # (docs/reproduction.md, init ablation).
        init = config.refine_init
        if init == 'auto':
            init = None if config.pretrained or config.checkpoint else 'random'
        try:
            refine(model, form=config.refine_form, init=init)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'--refine on {name}: {e}') from e
    if config.checkpoint:
        state, source = read_source_weights(config.checkpoint)
        model.load_state_dict(fit(model, state, source, mode='finetune'), strict=False)
    # Only a refinement this function applied is replayed on load: refined_deit_* models are built refined.
    spec = dict(model=name, model_kwargs=kwargs, refine=model.refine_args if config.refine else None)
    return model, spec
