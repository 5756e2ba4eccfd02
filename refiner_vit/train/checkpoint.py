"""Training state on disk: everything needed to continue a run, saved atomically, loaded without code.

``checkpoint-last.pth`` holds plain tensors and containers only (``torch.load(weights_only=True)`` reads it):
model, optimizer, EMA and grad-scaler states, the epoch and the update within it (``step``, 0 at an epoch end),
the best top-1 so far, the training time spent, the model spec / data config / class names (so eval and predict
need no flags) and, per process (``ranks``), every RNG state (python, numpy, torch, CUDA) and the epoch's loss
sum so far. The learning-rate scheduler is not saved: timm's schedulers are functions of the update count,
rebuilt from the flags on resume.
"""
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import WeightsError
from ..utils.io import atomic_torch_save, load_torch_file

__all__ = ['CHECKPOINT_NAME', 'find_resume', 'get_rng_state', 'load_training_state', 'save_training_state',
           'seed_everything', 'set_rng_state']

CHECKPOINT_NAME = 'checkpoint-last.pth'


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_state() -> Dict[str, Any]:
    """Every RNG state as tensors and plain Python values (loadable with weights_only)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        'python': [version, list(state), gauss],
        'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out['cuda'] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    version, values, gauss = state['python']
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_training_state(path: Path, **state: Any) -> None:
    """Write the checkpoint atomically (the previous one survives a crash or a full disk)."""
    atomic_torch_save(state, path)


def load_training_state(path: Path) -> Dict[str, Any]:
    """The state ``refiner train`` saved in ``path`` (model, optimizer, position, the model's spec, every rank's
    random states), read without executing code from the file.

    Raises:
        WeightsError: the file is missing, unreadable or unsafe, or is not a ``refiner train`` checkpoint.
    """
    state = load_torch_file(path)
    needed = ('model', 'optimizer', 'epoch', 'spec', 'ranks')
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise WeightsError(f'{path}: not a refiner train checkpoint (missing {", ".join(missing)})')
    return state


def find_resume(resume: Optional[str], output: Path) -> Optional[Path]:
    """``--resume auto``: the output's last checkpoint if there is one; a path: that file (must exist).

    Raises:
        WeightsError: ``resume`` names a file that does not exist.
    """
    if not resume:
        return None
    if resume == 'auto':
        path = output / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise WeightsError(f'--resume {resume}: no such checkpoint')
    return path
