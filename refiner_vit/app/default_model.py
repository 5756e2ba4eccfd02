"""The model ``refiner app`` shows when given none: ``runs/demo`` if it exists, else the digits demo, trained once.

The demo is what ``make demo`` trains (``refiner train`` with its defaults: a small Refiner-ViT on the embedded
digits, about 1-2 minutes on a 2-core CPU). It is trained in a child process (its progress bar on the terminal,
its thread and allocator settings its own) into a cache folder, ``~/.cache/refiner_vit/app/demo`` or
``$REFINER_APP_CACHE/demo``, and every later start uses it. A training that was killed is continued
(``--resume auto``); a folder counts as trained once it holds ``summary.json``, which a run writes last.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ['DEMO_RUN', 'ENV_CACHE', 'app_cache', 'default_model_source']

DEMO_RUN = Path('runs/demo')
ENV_CACHE = 'REFINER_APP_CACHE'


def app_cache() -> Path:
    """The app's cache folder: ``$REFINER_APP_CACHE``, else ``~/.cache/refiner_vit/app``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / '.cache' / 'refiner_vit' / 'app').expanduser()


def _trained(run: Path) -> bool:
    return (run / 'summary.json').is_file() and (run / 'best' / 'config.json').is_file()


def default_model_source(train_args: Sequence[str] = (), demo_run: Optional[Path] = None) -> str:
    """The source of the app's default model, training the digits demo into the cache first if needed.

    Args:
        train_args: More ``refiner train`` flags for that training (tests train a shorter demo).
        demo_run: Where a ``make demo`` run is looked for (default ``runs/demo`` of the working directory).

    Raises:
        RuntimeError: the training failed (its own error is on the terminal above).
    """
    demo_run = DEMO_RUN if demo_run is None else demo_run
    if demo_run.is_dir():
        return str(demo_run)
    cached = app_cache() / 'demo'
    if not _trained(cached):
        print(f'refiner app: no {demo_run}; training the digits demo once into {cached} (about 1-2 minutes on a '
              '2-core CPU)', file=sys.stderr, flush=True)
        command = [sys.executable, '-m', 'refiner_vit', 'train', '--output', str(cached), '--resume', 'auto',
                   *train_args]
        if subprocess.run(command, check=False).returncode != 0 or not _trained(cached):
            raise RuntimeError(f'training the digits demo into {cached} failed (see above); '
                               f'or give a model: refiner app --model SOURCE')
    return str(cached)
