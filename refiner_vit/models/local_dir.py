"""timm's local-dir model format (``model.safetensors`` + ``config.json``): the one writer and its reader.

``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds such a folder offline (after
``import refiner_vit`` for our models). ``refiner train`` writes ``RUN/best`` with it, ``refiner convert`` the
authors' checkpoints; :mod:`refiner_vit.models.resolve` reads both. The config is written by timm's own
:func:`save_config_for_hf`, so it stays in timm's format; keys of ours sit beside timm's at the top level:
``refine`` (the arguments of :func:`refiner_vit.refine`, replayed before the weights are loaded) and
``train_data`` (the ``data`` / ``data_dir`` a run was trained on).
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from torch import nn

from ..errors import ConfigError, WeightsError
from ..utils.io import atomic_write

__all__ = ['CONFIG_FILE', 'WEIGHTS_FILE', 'WEIGHTS_FILES', 'find_weights_file', 'read_config', 'save_local_dir']

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
# Weights files a timm local dir may hold, in the order they are looked for.
WEIGHTS_FILES = (WEIGHTS_FILE, 'pytorch_model.bin', 'model.pth')


def _imagenet_labels() -> Dict[str, Any]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = info.label_names()
    return dict(label_names=names, label_descriptions={n: info.index_to_description(i) for i, n in enumerate(names)})


def save_local_dir(
        model: nn.Module,
        directory: Union[str, os.PathLike],
        *,
        model_args: Optional[Mapping[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        description: Optional[str] = None,
        extra: Optional[Mapping[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``model`` as ``DIR/model.safetensors`` + ``DIR/config.json`` (each file atomically, weights first).

    Args:
        model_args: Constructor arguments that rebuild the architecture (timm records those of its factory).
        label_names: Class names in head order; without them a 1000-class model gets ImageNet-1k's synsets.
        data_config: Preprocessing of these weights (input size, crop, mean, std, interpolation).
        description: Stored as the ``pretrained_cfg`` description.
        extra: More top-level config keys (``refine``, ``train_data``).
        overwrite: Replace existing files (else they are refused).

    Raises:
        ConfigError: the files exist and ``overwrite`` is off, or ``label_names`` has the wrong length.
    """
    from safetensors.torch import save as safetensors_bytes
    from timm.models._hub import save_config_for_hf

    directory = Path(directory)
    targets = [directory / WEIGHTS_FILE, directory / CONFIG_FILE]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f'{" and ".join(existing)} already there; pass --overwrite (overwrite=True) to replace')
    if label_names is not None and len(label_names) != model.num_classes:
        raise ConfigError(f'label names: {len(label_names)} for a model with {model.num_classes} classes')
    model_config: Dict[str, Any] = dict(extra or {})
    if label_names is not None:
        model_config['label_names'] = list(label_names)
    elif model.num_classes == 1000:
        model_config.update(_imagenet_labels())
    if description:
        model_config['pretrained_cfg'] = {'description': description}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, str(Path(tmp) / CONFIG_FILE), model_config=model_config,
                           model_args=dict(model_args or {}), data_config=dict(data_config or {}))
        config = (Path(tmp) / CONFIG_FILE).read_bytes()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = safetensors_bytes(tensors, metadata={'format': 'pt'})
    atomic_write(targets[0], lambda f: f.write(weights))
    atomic_write(targets[1], lambda f: f.write(config))
    return directory


def read_config(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``DIR/config.json`` as a dict.

    Raises:
        WeightsError: no config.json, or not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f'{directory}: no {CONFIG_FILE} (not a timm local dir)')
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f'{path}: not readable JSON ({e})') from e
    if not isinstance(config, dict) or 'architecture' not in config:
        raise WeightsError(f'{path}: not a timm model config (no "architecture")')
    return config


def find_weights_file(directory: Union[str, os.PathLike]) -> Path:
    """The weights file of a local dir (:data:`WEIGHTS_FILES`, first found).

    Raises:
        WeightsError: none of them is there.
    """
    found = [Path(directory) / f for f in WEIGHTS_FILES if (Path(directory) / f).is_file()]
    if not found:
        raise WeightsError(f'{directory}: no weights file ({", ".join(WEIGHTS_FILES)})')
    return found[0]
