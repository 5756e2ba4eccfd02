"""One way from "whatever the user pointed at" to a model, for every command.

A *source* is one of:

* a run folder of ``refiner train`` (its ``best/``; with ``use_ema`` its ``checkpoint-last.pth``);
* a timm local dir (``RUN/best``, a ``refiner convert`` output, any ``config.json`` + weights folder), with or
  without timm's ``local-dir:`` prefix;
* a training checkpoint of ``refiner train`` (``checkpoint-last.pth``: ``spec``, ``model``, ``ema``,
  ``data_config``, ``class_names``, ``args``);
* a registered model name (timm's or ours), with random or ``pretrained`` weights, or the weights of a file
  (``checkpoint``: a state dict, a foreign training checkpoint, or any source above).

A model is described by its *spec* ``{'model': name, 'model_kwargs': {...}, 'refine': {...} or None}``: enough
to rebuild the architecture, refinement included, before the weights are loaded. Runs and local dirs record
theirs. Errors name the source: a :class:`~refiner_vit.errors.WeightsError` for a source or weights that cannot be
used, a :class:`~refiner_vit.errors.ConfigError` for a model that cannot be built as asked (both ``ValueError``).
"""
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..utils.model_kwargs import parse_model_kwargs
from . import weights as weights_pipeline
from .local_dir import find_weights_file, read_config
from .pretrained import pretrained_overlay

__all__ = ['ResolvedModel', 'build_from_spec', 'check_patch_grid', 'create_timm_model', 'is_model_name',
           'model_data_config', 'read_source_weights', 'resolve_model']

LOCAL_DIR_PREFIX = 'local-dir:'
RUN_CHECKPOINT = 'checkpoint-last.pth'
RUN_BEST = 'best'
WEIGHTS_SUFFIXES = ('.pth', '.pt', '.tar', '.safetensors', '.bin', '.ckpt')
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')
StateDict = Dict[str, torch.Tensor]


@dataclass
class ResolvedModel:
    """A model (eval mode) and what a command needs to run it."""

    model: nn.Module
    spec: Dict[str, Any]
    data_config: Dict[str, Any]
    class_names: Optional[List[str]]
    weights: str  # the file the weights came from, 'pretrained' or 'random'
    train_data: Optional[Dict[str, Any]] = None  # {'data': ..., 'data_dir': ...} of the run, where recorded

    @property
    def random_weights(self) -> bool:
        return self.weights == 'random'


def check_patch_grid(model: nn.Module, name: str) -> None:
    """A patch-embedding model whose input size is not a multiple of its patch would silently drop pixels."""
    embed = getattr(model, 'patch_embed', None)
    size, patch = getattr(embed, 'img_size', None), getattr(embed, 'patch_size', None)
    if size is None or patch is None:
        return
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if any(s % p for s, p in zip(size, patch)):
        shown = size[0] if size[0] == size[1] else 'x'.join(map(str, size))
        raise ConfigError(f'{name}: image size {shown} is not divisible by its patch size {patch[0]}')


def create_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with errors that name the model and its arguments.

    ``img_size`` goes only to models built for one input size (timm's ``fixed_input_size``: ViTs and their kin, and
    any model without a pretrained config); the others (CNNs) run at any size, so the transforms alone set it.
    ``pretrained`` weights come from a local cache or fail at once when offline (:mod:`.pretrained`).

    Raises:
        ConfigError: unknown name, arguments the model does not take, an input size that is not a multiple of the
            patch.
        WeightsError: no pretrained weights (none in timm, or not cached and offline).
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
        close += [m for m in timm.list_models(f'*{name}*')[:5] if m not in close]
        hint = f' (did you mean: {", ".join(close[:5])})' if close else ''
        raise ConfigError(f'{name}: no such model in timm or refiner_vit{hint}')
    if 'img_size' in kwargs and not _fixed_input_size(name):
        kwargs = {k: v for k, v in kwargs.items() if k != 'img_size'}
    overlay = pretrained_overlay(name) if pretrained else {}
    extra = dict(pretrained_cfg_overlay=overlay) if overlay else {}
    try:
        model = timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except (TypeError, ValueError, RuntimeError, OSError, AssertionError) as e:
        raise ConfigError(f'{name}{_shown(kwargs)}: cannot build it ({type(e).__name__}: {e})') from e
    check_patch_grid(model, name)
    return model


def _fixed_input_size(name: str) -> bool:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return cfg is None or bool(cfg.fixed_input_size)


def _shown(kwargs: Mapping[str, Any]) -> str:
    return f' ({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})' if kwargs else ''


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The architecture a spec describes (random weights), refined as recorded."""
    from .refined_deit import refine

    model = create_timm_model(spec['model'], **spec.get('model_kwargs', {}))
    if spec.get('refine'):
        refine(model, **spec['refine'])
    return model


def model_data_config(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                      interpolation: Optional[str] = None) -> Dict[str, Any]:
    """timm's data config of ``model`` (input size, interpolation, mean, std, crop_pct), with the overrides given."""
    from timm.data import resolve_data_config

    args: Dict[str, Any] = {}
    if img_size:
        args['input_size'] = (3, img_size, img_size)
    if crop_pct:
        args['crop_pct'] = crop_pct
    if interpolation:
        args['interpolation'] = interpolation
    config = resolve_data_config(args, model=model)
    return {k: config[k] for k in DATA_CONFIG_KEYS}


# --------------------------------------------------------------------------------------------- locating a source
@dataclass
class _Record:
    """What a source with a recorded architecture holds."""

    spec: Dict[str, Any]
    weights: StateDict
    weights_file: str
    data_config: Dict[str, Any]
    class_names: Optional[List[str]]
    train_data: Optional[Dict[str, Any]]


def _local_dir_record(folder: Path) -> _Record:
    config = read_config(folder)
    weights_file = find_weights_file(folder)
    cfg = config.get('pretrained_cfg', {})
    spec = dict(model=config['architecture'], model_kwargs=dict(config.get('model_args', {})),
                refine=config.get('refine'))
    if 'num_classes' in config:
        spec['model_kwargs'].setdefault('num_classes', config['num_classes'])
    names = config.get('label_names')
    return _Record(spec, weights_pipeline.read(weights_file), str(weights_file),
                   {k: cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}, list(names) if isinstance(names, list) else None,
                   config.get('train_data'))


def _checkpoint_record(path: Path, ckpt: Dict[str, Any], use_ema: bool) -> _Record:
    key = 'ema' if use_ema else 'model'
    if ckpt.get(key) is None:
        raise WeightsError(f'{path}: has no EMA weights (train with --model-ema)')
    args = ckpt.get('args') or {}
    train_data = {k: args.get(k) for k in ('data', 'data_dir')} if 'data' in args else None
    return _Record(dict(ckpt['spec']), ckpt[key], str(path), dict(ckpt.get('data_config') or {}),
                   ckpt.get('class_names'), train_data)


def _file(path: Path, use_ema: bool) -> Union[_Record, StateDict]:
    """A training checkpoint's record, or the weights of any other weights file."""
    obj = weights_pipeline.read_checkpoint(path)
    if isinstance(obj, dict) and 'spec' in obj:
        return _checkpoint_record(path, obj, use_ema)
    return weights_pipeline.extract(obj, path, True if use_ema else None)[0]


def _open(source: str, use_ema: bool) -> Union[_Record, StateDict]:
    """The record of a folder or a training checkpoint; the bare weights of a weights file."""
    path = Path(source[len(LOCAL_DIR_PREFIX):] if source.startswith(LOCAL_DIR_PREFIX) else source).expanduser()
    if path.is_dir():
        if (path / 'config.json').is_file():
            if use_ema:
                raise WeightsError(f"{path}: holds one set of weights; for the EMA weights give the run's "
                                 f'{RUN_CHECKPOINT}')
            return _local_dir_record(path)
        if use_ema:
            if not (path / RUN_CHECKPOINT).is_file():
                raise WeightsError(f'{path}: the EMA weights are in a run\'s {RUN_CHECKPOINT}, and there is none')
            return _file(path / RUN_CHECKPOINT, True)
        if (path / RUN_BEST / 'config.json').is_file():
            return _local_dir_record(path / RUN_BEST)
        if (path / RUN_CHECKPOINT).is_file():
            return _file(path / RUN_CHECKPOINT, use_ema)
        raise WeightsError(f'{path}: neither a run folder (no {RUN_BEST}/ or {RUN_CHECKPOINT}) nor a timm local dir '
                         '(no config.json)')
    if path.is_file():
        return _file(path, use_ema)
    raise WeightsError(f'{source}: no such file or folder')


def is_model_name(source: str) -> bool:
    """A model name, not a path: no separator, no weights suffix, nothing of that name on disk."""
    return not (source.startswith(LOCAL_DIR_PREFIX) or '/' in source or source.startswith('.')
                or source.endswith(WEIGHTS_SUFFIXES) or Path(source).expanduser().exists())


def read_source_weights(source: str, use_ema: bool = False) -> Tuple[StateDict, str]:
    """The weights of any source, and where they came from (a model name: timm's pretrained weights).

    Used to fine-tune (``refiner train --checkpoint``) and for ``checkpoint=`` of :func:`resolve_model`.
    """
    if is_model_name(source):
        return create_timm_model(source, pretrained=True).state_dict(), f'{source} (pretrained)'
    opened = _open(source, use_ema)
    if isinstance(opened, _Record):
        return opened.weights, opened.weights_file
    return opened, source


def resolve_model(
        source: str,
        *,
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        pretrained: bool = False,
        use_ema: bool = False,
        img_size: Optional[int] = None,
) -> ResolvedModel:
    """The model ``source`` names, in eval mode, with its data config and class names.

    Args:
        source: See the module docstring.
        checkpoint: Weights to load instead of the source's own (any source; with a model name the class count
            follows the file's classifier).
        model_kwargs: Constructor arguments; over a recorded spec's own.
        pretrained: timm's pretrained weights (with a model name and no ``checkpoint``).
        use_ema: The EMA weights of a run or a training checkpoint.
        img_size: Build the model for this input size (a recorded ``pos_embed`` is resampled) and evaluate at it.

    Raises:
        WeightsError: the source does not exist, does not describe a model, or its weights cannot be read or do
            not fit (a ``ValueError``).
        ConfigError: the model cannot be built with these arguments, or an option does not apply to this kind of
            source (a ``ValueError``).
    """
    kwargs = parse_model_kwargs(model_kwargs)
    if img_size:
        kwargs['img_size'] = img_size
    if not is_model_name(source):
        record = _open(source, use_ema)
        if not isinstance(record, _Record):
            raise WeightsError(f'{source}: holds weights without an architecture; name the model and pass this file '
                             f'as its checkpoint (e.g. --model NAME --checkpoint {source})')
        if pretrained:
            raise ConfigError(f'{source}: has weights of its own; pretrained applies to a model name')
        spec = dict(record.spec, model_kwargs={**record.spec.get('model_kwargs', {}), **kwargs})
        model = build_from_spec(spec)
        weights, weights_file = record.weights, record.weights_file
        if checkpoint is not None:
            weights, weights_file = read_source_weights(checkpoint, use_ema)
        weights_pipeline.load(model, weights, weights_file)
        data_config = {**model_data_config(model), **record.data_config}
        names, train_data = record.class_names, record.train_data
    else:
        weights = None
        if checkpoint is not None:
            weights, weights_file = read_source_weights(checkpoint, use_ema)
            classes = weights_pipeline.num_classes_of(weights, source)
            if classes is not None:
                kwargs.setdefault('num_classes', classes)
        elif use_ema:
            raise ConfigError(f'{source}: a model name has no EMA weights; give a run or a training checkpoint')
        spec = dict(model=source, model_kwargs=kwargs, refine=None)
        model = create_timm_model(source, pretrained=pretrained and weights is None, **kwargs)
        if weights is not None:
            weights_pipeline.load(model, weights, weights_file)
        else:
            weights_file = 'pretrained' if pretrained else 'random'
        data_config = model_data_config(model)
        label_names = model.pretrained_cfg.get('label_names')
        names, train_data = (list(label_names) if label_names else None), None
    data_config = _plain_config(data_config)
    if img_size:
        data_config['input_size'] = (data_config['input_size'][0], img_size, img_size)
    # As timm does for a local dir: the cfg describes the weights the model holds (timm's resolve_data_config,
    # benchmarks and exporters read it).
    model.pretrained_cfg = {**getattr(model, 'pretrained_cfg', {}), **data_config}
    return ResolvedModel(model.eval(), spec, data_config, names, weights_file, train_data)


def _plain_config(data_config: Mapping[str, Any]) -> Dict[str, Any]:
    """Sizes and statistics as tuples, as timm's cfgs hold them (JSON gives lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
