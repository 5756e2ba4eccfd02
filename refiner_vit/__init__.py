"""refiner-vit: Refiner (Zhou et al., arXiv 2106.03714) for timm.

Importing the package registers the ``refiner_vit_*`` and ``refined_deit_*`` models with timm, so
``timm.create_model('refiner_vit_s_patch16_224')`` works after ``import refiner_vit``.

The import itself is light (the ``refiner`` command line starts without torch): the names below and the
subpackages (``refiner_vit.data``, ``refiner_vit.train``, ``refiner_vit.analysis``, ...) load on first use, and
the models register with timm as soon as timm is loaded — at once if it already is, else right after whoever
imports it first.
"""
import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
from typing import Any, List

__version__ = '0.1.0'

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    'AttentionRefiner': '.layers',
    'AttentionTap': '.layers',
    'RefinedAttention': '.layers',
    'RefinedVisionTransformer': '.models',
    'RefinerVisionTransformer': '.models',
    'attention_maps': '.analysis',
    'checkpoint_filter_fn': '.models',
    'convert_official_checkpoint': '.models.convert',
    'create_model_from_official': '.models.convert',
    'fuse_for_inference': '.deployment',
    'keep_freed_memory': '.utils.allocator',
    'refine': '.models',
    'resolve_model': '.models',
}

__all__ = sorted(_EXPORTS)


def _submodules() -> List[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')]


def _import_with_submodules(name: str) -> Any:
    """The subpackage and its modules, so that attribute access reaches them too (``refiner_vit.data.token_labels``).
    A module needing an extra that is not installed (the app's gradio) is left for an explicit import to report."""
    package = importlib.import_module(f'.{name}', __name__)
    for info in pkgutil.iter_modules(getattr(package, '__path__', [])):
        try:
            importlib.import_module(f'{package.__name__}.{info.name}')
        except ModuleNotFoundError as e:
            if (e.name or __name__).startswith(__name__):
                raise
    return package


def __getattr__(name: str) -> Any:
    """A public name on first use, or a subpackage (``refiner_vit.data``, ``.train``, ``.analysis``, ...), so that
    ``import refiner_vit`` alone reaches ``refiner_vit.data.DigitsDataset`` as the README shows."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _submodules():
        value = _import_with_submodules(name)
    else:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_submodules()))


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers our models right after timm is imported (registering needs timm, which takes seconds to load)."""

    def __init__(self) -> None:
        self.finding = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != 'timm' or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module('.models', __name__)

        spec.loader.exec_module = exec_and_register
        return spec


if 'timm' in sys.modules:
    importlib.import_module('.models', __name__)
else:
    sys.meta_path.insert(0, _RegisterWithTimm())
