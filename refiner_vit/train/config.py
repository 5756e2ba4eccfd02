"""Flags that a YAML file can set: ``--config FILE.yaml`` sets any flag, flags on the command line win.

argparse cannot tell a flag given on the command line from its default, so flags are registered through
:class:`FlagSet` with ``default=SUPPRESS`` and their defaults kept aside: after parsing, the namespace holds
only what the user typed, and :meth:`FlagSet.resolve` layers ``defaults < YAML file < command line``.
"""
import argparse
from pathlib import Path
from typing import Any, Dict

import yaml

from ..errors import UsageError

__all__ = ['FlagSet', 'RECIPES_DIR', 'load_yaml_config']

RECIPES_DIR = Path(__file__).resolve().parent.parent / 'recipes'


def load_yaml_config(path: Any, _seen: tuple = ()) -> Dict[str, Any]:
    """A YAML mapping of flag names (``lr_base`` or ``lr-base``) to values.

    ``path`` may also name a shipped recipe (``imagenet_refiner_s``: ``refiner_vit/recipes/imagenet_refiner_s.yaml``).
    ``base: OTHER.yaml`` (relative to this file) loads that file first, so variants list only what differs.
    """
    path = Path(path)
    shipped = RECIPES_DIR / f'{path.name}.yaml'
    if not path.is_file() and path.name == str(path) and shipped.is_file():
        path = shipped  # a shipped recipe by name: --config imagenet_refiner_s
    if path.resolve() in _seen:
        raise UsageError(f'--config {path}: base files include each other')
    if not path.is_file():
        raise UsageError(f'--config {path}: no such file')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f'--config {path}: not valid YAML ({e})') from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f'--config {path}: expected a mapping of flag names to values')
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    base = data.pop('base', None)
    if base is None:
        return data
    return {**load_yaml_config(path.parent / str(base), _seen + (path.resolve(),)), **data}


class FlagSet:
    """Registers flags on a parser, remembering defaults; resolves defaults, a YAML file and the command line."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.defaults: Dict[str, Any] = {}
        self.actions: Dict[str, argparse.Action] = {}

    def add(self, *names: str, default: Any = None, help: str, **kwargs: Any) -> None:  # noqa: A002
        shown = '' if default in (None, False) else f' (default: {default})'
        action = self.parser.add_argument(*names, default=argparse.SUPPRESS, help=help + shown, **kwargs)
        self.defaults[action.dest] = default
        self.actions[action.dest] = action

    def _check(self, key: str, value: Any, source: str) -> Any:
        action = self.actions.get(key)
        if action is None:
            raise UsageError(f'{source}: unknown setting {key!r} (settings are the flag names of this command)')
        values = value if isinstance(value, list) else [value]
        if action.nargs in ('+', '*') or (isinstance(action.nargs, int) and action.nargs > 0):
            if not isinstance(value, (list, dict)) and value is not None:
                raise UsageError(f'{source}: {key} must be a list')
        if action.choices is not None and value is not None and any(v not in action.choices for v in values):
            raise UsageError(f'{source}: {key}: {value!r} is not one of {", ".join(map(str, action.choices))}')
        if action.nargs == 0 and not isinstance(value, bool):
            raise UsageError(f'{source}: {key} must be true or false')
        return value

    def resolve(self, args: argparse.Namespace, config: Any = None) -> argparse.Namespace:
        """Namespace with every flag: defaults, then the YAML ``config`` (if any), then the command line."""
        given = {k: v for k, v in vars(args).items() if k in self.defaults}
        from_file = {}
        if config:
            from_file = {k: self._check(k, v, f'--config {config}') for k, v in load_yaml_config(config).items()}
        resolved = argparse.Namespace(**{**vars(args), **self.defaults, **from_file, **given})
        resolved.config = config
        return resolved
