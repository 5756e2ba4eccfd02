"""The settings of a training run: one typed dataclass that the command line, YAML files and scripts all build.

:class:`TrainConfig` names every setting once, with its type, default and help. ``refiner train`` derives its
flags from it (:func:`add_train_flags`), ``--config FILE.yaml`` sets any of them (flags typed on the command line
win: :func:`config_from_args`), and a script builds one directly or with :func:`dataclasses.replace`. A run
saves ``TrainConfig.to_dict()`` as ``config.yaml``, which :meth:`TrainConfig.from_dict` reads back to an equal
config, so ``--config RUN/config.yaml`` repeats the run. Bad values are ``ValueError``s naming the setting.
"""
import argparse
import functools
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from ..utils.model_kwargs import parse_model_kwargs

__all__ = ['DEFAULT_MODEL', 'RECIPES_DIR', 'TrainConfig', 'add_train_flags', 'config_from_args', 'load_yaml_config',
           'parse_train_config', 'typed_values']

RECIPES_DIR = Path(__file__).resolve().parent.parent / 'recipes'
# The default model of `refiner train` (registered in models/refiner_vit.py).
DEFAULT_MODEL = 'refiner_vit_digits'


def _setting(default: Any, help: str, **flag: Any) -> Any:  # noqa: A002
    """A dataclass field carrying its flag's help and argparse options (``choices``, ``nargs``, ``metavar``)."""
    metadata = dict(help=help, flag=flag)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of ``refiner train`` (the flag ``--a-b`` is the field ``a_b``)."""

    # data
    data: str = _setting('digits', "'digits' (embedded), a folder with train/ and val/, or a timm dataset spec "
                         '(torch/cifar10, ...)')
    data_dir: Optional[str] = _setting(None, 'root folder of a timm dataset spec')
    dataset_download: bool = _setting(False, 'let timm/torchvision download the dataset spec')
    img_size: Optional[int] = _setting(None, 'input size (default: 16 for digits, 32 for other data with the default '
                                       "model, the model's own size with --model)")
    batch_size: int = _setting(32, 'images per process and step')
    workers: Optional[int] = _setting(None, 'loader worker processes (default: 0 for digits, else min(4, CPUs))')
    skip_bad_images: bool = _setting(False, 'leave out image files that cannot be read (counted and named in '
                                     'summary.json) instead of stopping with an error naming the file')
    crop_pct: Optional[float] = _setting(None, "evaluation centre-crop fraction (default: the model's)")
    interpolation: Optional[str] = _setting(None, "evaluation resize interpolation (default: the model's)")
    # model
    model: Optional[str] = _setting(None, f'any timm or refiner_vit model name (default: {DEFAULT_MODEL}, sized for '
                                    '--img-size), or a run, RUN/best, checkpoint or local dir to fine-tune (its '
                                    'architecture and weights)', metavar='SOURCE')
    model_kwargs: Dict[str, Any] = _setting({}, 'model arguments, e.g. depth=6 embed_dim=96 (Python literals)',
                                            nargs='*', metavar='K=V')
    refine: bool = _setting(False, 'put the paper-form refiner into every attention of a timm ViT (see --refine-init)')
    refine_form: str = _setting('linear', 'refiner form for --refine', choices=('linear', 'released'))
    refine_init: str = _setting('auto', "start of the --refine refiners: 'auto' = identity when fine-tuning, random "
                                'from scratch', choices=('auto', 'identity', 'random'))
    pretrained: bool = _setting(False, "start from timm's pretrained weights (head re-sized)")
    checkpoint: Optional[str] = _setting(
        None, 'start from these weights: a run folder, RUN/best, a checkpoint, a weights file (.safetensors or '
        'weights-only .pth) or a model name (its pretrained weights); head re-sized, position embedding resampled',
        metavar='SOURCE')
    drop_path: float = _setting(0.1, 'stochastic depth rate')
    drop: float = _setting(0.0, 'dropout rate')
    grad_checkpointing: bool = _setting(False, "recompute the model's blocks in backward "
                                        '(model.set_grad_checkpointing): less memory, more time')
    # optimisation
    epochs: int = _setting(30, 'training epochs (cooldown epochs come on top)')
    opt: str = _setting('adamw', 'optimizer name for timm.optim.create_optimizer_v2')
    lr: Optional[float] = _setting(None, 'learning rate, used as is (default: --lr-base rule, else 1e-3)')
    lr_base: Optional[float] = _setting(None, 'learning rate per --lr-base-size images of global batch (DeiT: 5e-4)')
    lr_base_size: int = _setting(512, 'global batch size that --lr-base refers to')
    weight_decay: float = _setting(0.05, 'AdamW weight decay')
    sched: str = _setting('cosine', 'timm scheduler name')
    warmup_epochs: float = _setting(1.0, 'linear warm-up epochs')
    warmup_lr: float = _setting(1e-5, 'learning rate at the start of warm-up')
    min_lr: float = _setting(1e-5, 'final learning rate of the cosine schedule')
    cooldown_epochs: int = _setting(0, 'epochs at --min-lr after the schedule')
    clip_grad: Optional[float] = _setting(None, 'clip the gradient norm to this value')
    model_ema: bool = _setting(False, 'keep an exponential moving average of the weights')
    model_ema_decay: float = _setting(0.9998, 'EMA decay per step')
    cos_reg: int = _setting(0, "the authors' attention cosine regulariser over the first N pairs of consecutive "
                            'attention layers (their configs: 12)', metavar='N')
    precise_bn_batches: int = _setting(
        16, 'at each epoch end, before evaluating and saving, recompute the BatchNorm statistics exactly over this '
        'many training batches (models without BatchNorm: nothing to do; 0: keep the running averages)', metavar='N')
    # augmentation
    aa: Optional[str] = _setting(None, 'RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    scale: List[float] = _setting([0.6, 1.0], 'random-resized-crop area range', nargs=2)
    ratio: List[float] = _setting([0.75, 1.3333], 'random-resized-crop aspect range', nargs=2)
    hflip: float = _setting(0.0, 'horizontal flip probability (0 suits digits)')
    color_jitter: Optional[float] = _setting(None, 'colour jitter strength')
    train_interpolation: str = _setting('bilinear', "training resize interpolation ('random' as DeiT)")
    reprob: float = _setting(0.0, 'random erasing probability')
    remode: str = _setting('pixel', 'random erasing mode')
    recount: int = _setting(1, 'random erasing count')
    mixup: float = _setting(0.0, 'mixup alpha (DeiT: 0.8)')
    cutmix: float = _setting(0.0, 'cutmix alpha (DeiT: 1.0)')
    mixup_prob: float = _setting(1.0, 'probability of mixing a batch')
    mixup_switch_prob: float = _setting(0.5, 'probability of cutmix instead of mixup')
    smoothing: float = _setting(0.1, 'label smoothing')
    token_label_dir: Optional[str] = _setting(None, 'token-labeling maps (refiner relabel); needs --data FOLDER',
                                              metavar='DIR')
    dense_weight: float = _setting(0.5, 'weight of the token-labeling dense loss')
    mix_token: bool = _setting(False, 'MixToken (with --token-label-dir)')
    # the run
    output: str = _setting('runs/train', 'output folder')
    resume: Optional[str] = _setting(None, "continue a run: 'auto' = OUTPUT/checkpoint-last.pth if present",
                                     metavar='auto|PATH')
    overwrite: bool = _setting(False, 'replace the run already in --output (without it, such a folder needs --resume)')
    seed: int = _setting(42, 'random seed')
    checkpoint_steps: int = _setting(0, 'also write checkpoint-last.pth every N steps inside an epoch, so a killed '
                                     'run repeats at most N steps (0: at epoch ends only, a killed run repeats its '
                                     'epoch). Resume is exact either way', metavar='N')
    amp: str = _setting('none', 'mixed precision (fp16 only on CUDA)', choices=('none', 'bf16', 'fp16'))
    device: str = _setting('auto', "'auto', 'cpu', 'cuda' or 'cuda:N'")
    dist_timeout: float = _setting(10., 'minutes a process of a torchrun job waits for the others (joining, every '
                                   'collective) before the run ends with an error naming what it waited for',
                                   metavar='MIN')
    threads: int = _setting(1, 'CPU threads per process (0: PyTorch default). 1 is best for the small default model '
                            'and keeps a shared machine responsive')
    no_progress: bool = _setting(False, 'no progress bar')
    no_tensorboard: bool = _setting(False, 'no TensorBoard logs even when tensorboard is installed')

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, _hints()[f.name], getattr(self, f.name), f.metadata))
        _check(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: Optional[str] = None) -> 'TrainConfig':
        """A config from setting names (``lr_base`` or ``lr-base``) to values; the rest at their defaults.

        Raises:
            ValueError: an unknown setting, a value of the wrong type or range, or settings that do not go
                together (prefixed with ``source`` when given).
        """
        try:
            return cls(**typed_values(values))
        except ValueError as e:
            raise ValueError(f'{source}: {e}' if source else str(e)) from e

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (YAML- and JSON-safe), in field order; :meth:`from_dict` reads them back equal."""
        return asdict(self)


@functools.cache
def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def typed_values(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Setting names (``-`` or ``_``) to values of their field's type.

    Raises:
        ValueError: an unknown setting or a value of the wrong type.
    """
    values = {str(k).replace('-', '_'): v for k, v in values.items()}
    settings = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(settings))
    if unknown:
        raise ValueError(f'unknown setting {unknown[0]!r} (settings are the flag names of refiner train)')
    return {k: _coerce(k, _hints()[k], v, settings[k].metadata) for k, v in values.items()}


def _coerce(name: str, hint: Any, value: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` as the field's type, or a ValueError naming the setting."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    flag = metadata.get('flag', {})
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f'{name} must be true or false, got {value!r}')
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
            raise ValueError(f'{name} must be {"an integer" if hint is int else "a number"}, got {value!r}')
        value = hint(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f'{name} must be a string, got {value!r}')
    elif typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)) or len(value) != flag['nargs'] or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f'{name} must be a list of {flag["nargs"]} numbers, got {value!r}')
        value = [float(v) for v in value]
    elif typing.get_origin(hint) is dict:
        if not isinstance(value, (dict, list, tuple)):
            raise ValueError(f'{name} must be a mapping of names to values, got {value!r}')
        value = parse_model_kwargs(value)
    if 'choices' in flag and value not in flag['choices']:
        raise ValueError(f'{name}: {value!r} is not one of {", ".join(flag["choices"])}')
    return value


def _check(c: TrainConfig) -> None:
    """Out-of-range values and flags that do not go together."""
    at_least = dict(epochs=1, batch_size=1, lr_base_size=1, checkpoint_steps=0, precise_bn_batches=0, cos_reg=0,
                    cooldown_epochs=0, recount=0, threads=0, weight_decay=0, warmup_epochs=0, warmup_lr=0, min_lr=0,
                    mixup=0, cutmix=0, workers=0, img_size=8)
    for name, low in at_least.items():
        value = getattr(c, name)
        if value is not None and value < low:
            raise ValueError(f'--{name.replace("_", "-")} must be >= {low}, got {value}')
    for name in ('lr', 'lr_base', 'clip_grad', 'crop_pct', 'dist_timeout'):
        value = getattr(c, name)
        if value is not None and value <= 0:
            raise ValueError(f'--{name.replace("_", "-")} must be > 0, got {value}')
    for name in ('drop_path', 'drop', 'hflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'smoothing',
                 'model_ema_decay'):
        value = getattr(c, name)
        if not 0 <= value <= 1:
            raise ValueError(f'--{name.replace("_", "-")} must be between 0 and 1, got {value}')
    if c.mix_token and not c.token_label_dir:
        raise ValueError('--mix-token needs --token-label-dir (MixToken is un-mixed with token labels)')
    if c.refine and not c.model:
        raise ValueError('--refine needs --model NAME of a timm ViT (the default model is a Refiner-ViT already)')
    if c.skip_bad_images and c.token_label_dir:
        raise ValueError('--skip-bad-images does not apply to --token-label-dir data (each image has a label map)')
    if c.resume and c.overwrite:
        raise ValueError('--resume continues the run in --output, --overwrite replaces it: give one of them')


def load_yaml_config(path: Any, _seen: tuple = ()) -> Dict[str, Any]:
    """A YAML mapping of setting names (``lr_base`` or ``lr-base``) to values.

    ``path`` may also name a shipped recipe (``imagenet_refiner_s``: ``refiner_vit/recipes/imagenet_refiner_s.yaml``).
    ``base: OTHER.yaml`` (relative to this file) loads that file first, so variants list only what differs.

    Raises:
        ValueError: a missing or unreadable file, not a mapping, or base files that include each other.
    """
    path = Path(path)
    shipped = RECIPES_DIR / f'{path.name}.yaml'
    if not path.is_file() and path.name == str(path) and shipped.is_file():
        path = shipped  # a shipped recipe by name: --config imagenet_refiner_s
    if path.resolve() in _seen:
        raise ValueError(f'--config {path}: base files include each other')
    if not path.is_file():
        raise ValueError(f'--config {path}: no such file')
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f'--config {path}: not readable YAML ({e})') from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f'--config {path}: expected a mapping of setting names to values')
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    base = data.pop('base', None)
    if base is None:
        return data
    return {**load_yaml_config(path.parent / str(base), _seen + (path.resolve(),)), **data}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, plus ``--config``. Flags default to nothing (``SUPPRESS``), so the
    parsed namespace holds exactly what was typed and :func:`config_from_args` can layer it over a YAML file."""
    parser.add_argument('--config', metavar='FILE.yaml', help='YAML file of settings (e.g. a run\'s config.yaml), or '
                        'the name of a shipped recipe: digits, small_data, imagenet_refiner_{s,m,l}[_token_label], '
                        'finetune_384, finetune_l_448')
    hints = _hints()
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        flag = dict(f.metadata['flag'])
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if hint is bool:
            flag['action'] = 'store_true'
        elif typing.get_origin(hint) is list:
            flag['type'] = float
        elif hint in (int, float):
            flag['type'] = hint
        shown = '' if default in (None, False, {}) else f' (default: {default})'
        parser.add_argument(f'--{f.name.replace("_", "-")}', dest=f.name, default=argparse.SUPPRESS,
                            help=f.metadata['help'] + shown, **flag)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of parsed flags: defaults, then the ``--config`` YAML file (if any), then the typed flags.

    Raises:
        ValueError: as :meth:`TrainConfig.from_dict`; a bad value in the file names the file.
    """
    names = {f.name for f in fields(TrainConfig)}
    typed = {k: v for k, v in vars(args).items() if k in names}
    from_file: Dict[str, Any] = {}
    if getattr(args, 'config', None):
        try:
            from_file = typed_values(load_yaml_config(args.config))
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith('--config') else f'--config {args.config}: {e}') from e
    return TrainConfig.from_dict({**from_file, **typed})


def parse_train_config(argv: Sequence[str]) -> TrainConfig:
    """The config of ``refiner train ARGV`` (for scripts that keep their settings as flags)."""
    parser = argparse.ArgumentParser(prog='refiner train', add_help=False, allow_abbrev=False)
    add_train_flags(parser)
    return config_from_args(parser.parse_args(list(argv)))
