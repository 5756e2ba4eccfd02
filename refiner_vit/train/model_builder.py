"""Building the model to train, loading trained ones back, and fitting foreign weights for fine-tuning.

A trained model is described by a *spec* ``{'model': timm name, 'model_kwargs': {...}, 'refine': {...} or
None}``: enough to rebuild the architecture (the weights come from the checkpoint). It is stored in
``checkpoint-last.pth`` and in ``best/config.json``, so ``refiner eval`` / ``predict`` need no flags.
"""
import ast
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from timm.data import resolve_data_config
from timm.models._hub import save_for_hf
from torch import nn

from ..errors import UsageError
from ..io import load_state_dict_file, load_torch_file
from ..models import refine
from ..models.loading import apply_family_filter, check_state_dict_fits, read_weights

__all__ = ['DEFAULT_MODEL', 'build_model', 'default_model_kwargs', 'fit_state_dict', 'load_trained',
           'parse_model_kwargs', 'resolve_model_data_config', 'restore_model_dir', 'save_model_dir']

DEFAULT_MODEL = 'test_refiner_vit'


def default_model_kwargs(img_size: int) -> Dict[str, Any]:
    """A small Refiner-ViT for CPU training: about 0.2M parameters, a 4x4 to 8x8 token grid at small sizes.

    The patch grows with the input (4 px up to 32 px, 8 px up to 128 px, else 16 px) so the number of tokens,
    whose square the refiner's cost follows, stays small.
    """
    patch = 4 if img_size <= 32 else 8 if img_size <= 128 else 16
    if img_size % patch:
        raise UsageError(f'--img-size {img_size} is not divisible by the default model\'s patch size {patch}')
    return dict(img_size=img_size, patch_size=patch, embed_dim=64, depth=4, num_heads=4, stem_chs=(16, 32, 64),
                aux_head=False)


def parse_model_kwargs(items: Any) -> Dict[str, Any]:
    """``['k=v', ...]`` (values as Python literals, else strings) or a dict (from YAML) -> dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = str(item).partition('=')
        if not sep or not key:
            raise UsageError(f'--model-kwargs {item}: expected KEY=VALUE')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f'*{name}*')[:5]
        hint = f' (did you mean: {", ".join(close)})' if close else ''
        raise UsageError(f'--model {name}: no such model in timm or refiner_vit{hint}')
    patch = kwargs.get('patch_size')
    size = kwargs.get('img_size')
    if isinstance(patch, int) and isinstance(size, int) and size % patch:
        raise UsageError(f'image size {size} is not divisible by the patch size {patch} of --model {name}')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except UsageError:
        raise
    except Exception as e:  # timm raises TypeError/ValueError/RuntimeError/OSError for bad kwargs or no network
        raise UsageError(f'--model {name} {kwargs}: cannot build it ({type(e).__name__}: {e})') from e


def build_model(args: Any, num_classes: int, token_labels: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model to train from the parsed flags, and its spec. Fine-tuning weights are loaded here."""
    name = args.model or DEFAULT_MODEL
    kwargs: Dict[str, Any] = {} if args.model else default_model_kwargs(args.img_size)
    if args.model and args.img_size:
        kwargs['img_size'] = args.img_size
    kwargs['num_classes'] = num_classes
    if args.drop_path:
        kwargs['drop_path_rate'] = args.drop_path
    if args.drop:
        kwargs['drop_rate'] = args.drop
    if token_labels:
        kwargs.update(aux_head=True, mix_token=bool(args.mix_token))
    kwargs.update(parse_model_kwargs(args.model_kwargs))
    try:
        model = _create(name, pretrained=bool(args.pretrained), **kwargs)
    except UsageError as e:
        if "'img_size'" not in str(e) or 'img_size' not in kwargs:
            raise
        del kwargs['img_size']  # a model without a fixed input size (CNNs): the transforms alone set the size
        model = _create(name, pretrained=bool(args.pretrained), **kwargs)
    if token_labels and not hasattr(model, 'forward_train'):
        raise UsageError(f'--token-label-dir needs a model with a token-labeling head (refiner_vit_*), not {name}')
    if args.refine:
        try:
            # Identity start keeps pretrained predictions; from scratch the random start trains better
            # (docs/reproduction.md, init ablation).
            init = args.refine_init
            if init == 'auto':
                init = None if args.pretrained or args.initial_checkpoint else 'random'
            refine(model, form=args.refine_form, init=init)
        except (TypeError, ValueError) as e:
            raise UsageError(f'--refine on {name}: {e}') from e
    if args.initial_checkpoint:
        state = fit_state_dict(model, read_weights(args.initial_checkpoint), args.initial_checkpoint)
        model.load_state_dict(state, strict=False)
    # Only a refinement this function applied is replayed on load: refined_deit_* models are built refined.
    spec = dict(model=name, model_kwargs=kwargs, refine=model.refine_args if args.refine else None)
    return model, spec


def _classifier_prefixes(model: nn.Module) -> Tuple[str, ...]:
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f'{n}.' for n in names)


def fit_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], source: Any) -> Dict[str, torch.Tensor]:
    """Map foreign weights onto ``model`` for fine-tuning: family key renames and position-embedding resampling,
    classifier weights of another class count dropped (the new head keeps its initialisation).

    Raises:
        UsageError: keys the model does not have, or non-classifier weights of another shape (listed).
    """
    state = apply_family_filter(model, state)
    own = model.state_dict()
    heads = _classifier_prefixes(model)
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape and not k.startswith(heads)]
    if unexpected or wrong:
        details = [f'unexpected keys: {", ".join(unexpected[:8])}'] if unexpected else []
        details += [f'{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model' for k in wrong[:8]]
        raise UsageError(f'{source}: does not fit the model ({"; ".join(details)})')
    fitted = {k: v for k, v in state.items() if v.shape == own[k].shape}
    if not fitted:
        raise UsageError(f'{source}: no weight of the file fits the model')
    return fitted


def _from_spec(spec: Dict[str, Any], state: Dict[str, torch.Tensor], source: Any) -> nn.Module:
    model = _create(spec['model'], **spec.get('model_kwargs', {}))
    if spec.get('refine'):
        refine(model, **spec['refine'])
    check_state_dict_fits(model, state, source)
    model.load_state_dict(state)
    return model


def resolve_model_data_config(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                              interpolation: Optional[str] = None) -> Dict[str, Any]:
    """timm's data config of ``model`` (mean, std, interpolation, crop_pct), with the overrides given."""
    args = {}
    if img_size:
        args['input_size'] = (3, img_size, img_size)
    if crop_pct:
        args['crop_pct'] = crop_pct
    if interpolation:
        args['interpolation'] = interpolation
    config = resolve_data_config(args, model=model)
    return {k: config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')}


# (model in eval mode, data config, class names or None)
TrainedModel = Tuple[nn.Module, Dict[str, Any], Optional[List[str]]]


def load_trained(target: str, use_ema: bool = False, pretrained: bool = False, img_size: Optional[int] = None,
                 crop_pct: Optional[float] = None) -> TrainedModel:
    """:func:`_load_trained`, with the data config's input size and crop fraction overridden when given
    (evaluation at another resolution, or the authors' receptive-field calibration)."""
    model, data_config, names = _load_trained(target, use_ema, pretrained)
    if img_size:
        data_config['input_size'] = (data_config['input_size'][0], img_size, img_size)
    if crop_pct:
        data_config['crop_pct'] = crop_pct
    return model, data_config, names


def _load_trained(target: str, use_ema: bool, pretrained: bool) -> TrainedModel:
    """A trained model from a ``best/``-style folder, a training checkpoint or a timm model name.

    Returns ``(model in eval mode, data config, class names or None)``.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        config_file = path / 'config.json'
        if not config_file.is_file():
            raise UsageError(f'{path}: no config.json (expected a folder written by refiner train, e.g. RUN/best)')
        config = json.loads(config_file.read_text())
        if use_ema:
            raise UsageError(f'--use-ema: {path} holds one set of weights; give the run\'s checkpoint-last.pth')
        spec = dict(model=config['architecture'], model_kwargs=config.get('model_args', {}),
                    refine=config.get('refine'))
        weights = path / 'model.safetensors'
        model = _from_spec(spec, load_state_dict_file(weights), weights)
        cfg = config.get('pretrained_cfg', {})
        data_config = {k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct') if k in cfg}
        data_config = {**resolve_model_data_config(model), **data_config}
        return model.eval(), data_config, config.get('label_names')
    if path.is_file():
        ckpt = load_torch_file(path)
        if not isinstance(ckpt, dict) or 'spec' not in ckpt:
            raise UsageError(f'{path}: not a refiner train checkpoint (no model spec); use --model NAME with '
                             '--pretrained or a best/ folder')
        key = 'ema' if use_ema else 'model'
        if ckpt.get(key) is None:
            raise UsageError(f'{path}: has no EMA weights (train with --model-ema)')
        model = _from_spec(ckpt['spec'], ckpt[key], path)
        return model.eval(), dict(ckpt['data_config']), ckpt.get('class_names')
    if target.endswith(('.pth', '.pt', '.safetensors', '.bin')) or '/' in target:
        raise UsageError(f'{target}: no such file or folder')
    model = _create(target, pretrained=pretrained)
    return model.eval(), resolve_model_data_config(model), model.pretrained_cfg.get('label_names')


def _swap_names(folder: Path) -> Tuple[Path, Path]:
    return folder.with_name(f'.{folder.name}.tmp'), folder.with_name(f'.{folder.name}.old')


def restore_model_dir(folder: Path) -> None:
    """Undo a :func:`save_model_dir` killed between its two renames: the previous folder gets its name back."""
    old = _swap_names(Path(folder))[1]
    if old.is_dir() and not Path(folder).exists():
        old.rename(folder)


def save_model_dir(model: nn.Module, folder: Path, spec: Dict[str, Any], data_config: Dict[str, Any],
                   class_names: Optional[Iterable[str]]) -> None:
    """Write ``folder`` as a timm local dir (``model.safetensors`` + ``config.json``), replacing it whole.

    Written to a temporary sibling first and swapped in, so a crash leaves the previous folder readable.
    """
    folder = Path(folder)
    tmp, old = _swap_names(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(model, str(tmp), model_args=dict(spec['model_kwargs']), safe_serialization=True,
                    model_config=dict(label_names=list(class_names or []), refine=spec.get('refine')),
                    data_config=dict(data_config))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f'cannot write {folder}: {e.strerror or e}; the previous folder is unchanged') from e
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
