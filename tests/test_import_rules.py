"""The package's layering, checked on the import statements of every module (lazy imports inside functions too).

Each top-level module or subpackage of ``refiner_vit`` has a layer; a module imports only from lower layers and
from its own subpackage. So the building blocks (``ops``, ``layers``) know nothing of models, data or training,
the models nothing of training or the command line, and the library nothing of the command line, whose
:class:`~refiner_vit.errors.UsageError` only ``cli.py`` and ``commands/`` may raise or name.
"""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'refiner_vit'

# Layer of each top-level name under refiner_vit/; a new module or subpackage must be given one here.
# (The package's __init__ imports its subpackages by name, lazily: no import statement to check.)
LAYERS: Dict[str, int] = {
    '__init__': 0, 'errors': 0,
    'utils': 1, 'ops': 1,
    'layers': 2,
    'models': 3, 'data': 3,
    'train': 4, 'analysis': 4, 'deployment': 4, 'performance': 4,
    'app': 5,
    'commands': 6,
    'cli': 7,
    '__main__': 8,
}
COMMAND_LINE = ('cli', 'commands')  # where UsageError belongs


def _imports(path: Path, package: Path) -> Iterator[Tuple[int, List[str]]]:
    """``(line, dotted module as parts)`` of every import in ``path``, relative imports resolved."""
    here = list(path.relative_to(package.parent).with_suffix('').parts)[:-1]  # the module's package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split('.')) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = base + (node.module.split('.') if node.module else [])
            if len(module) > 1:
                yield node.lineno, module
            else:  # `from refiner_vit import cli` / `from .. import cli`: the names are the modules
                yield from ((node.lineno, module + [alias.name]) for alias in node.names)


def _names_usage_error(path: Path) -> List[int]:
    """Lines of ``path`` that import or name ``UsageError``."""
    return sorted({node.lineno for node in ast.walk(ast.parse(path.read_text()))
                   if (isinstance(node, ast.alias) and node.name.split('.')[-1] == 'UsageError')
                   or (isinstance(node, ast.Attribute) and node.attr == 'UsageError')
                   or (isinstance(node, ast.Name) and node.id == 'UsageError')})


def violations(package: Path) -> List[str]:
    """Every import against :data:`LAYERS`, and every use of ``UsageError`` outside the command line."""
    found = []
    root = package.name
    for path in sorted(package.rglob('*.py')):
        where = path.relative_to(package)
        top = where.parts[0].removesuffix('.py')
        if top not in LAYERS:
            found.append(f'{where}: {top} has no layer in LAYERS')
            continue
        for line, target in _imports(path, package):
            if target[0] != root or len(target) < 2 or target[1] == top:
                continue
            other = target[1]
            if other in LAYERS and LAYERS[other] >= LAYERS[top]:
                found.append(f'{where}:{line}: {top} (layer {LAYERS[top]}) imports {".".join(target[:2])} '
                             f'(layer {LAYERS[other]})')
        if top not in COMMAND_LINE and where != Path('errors.py'):
            found += [f'{where}:{line}: UsageError outside the command line' for line in _names_usage_error(path)]
    return found


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def _package(tmp_path: Path, files: Dict[str, str]) -> Path:
    root = tmp_path / 'refiner_vit'
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize('name, text, problem', [
    ('layers/attn.py', 'from ..models.resolve import resolve_model\n', 'layers (layer 2) imports refiner_vit.models'),
    ('ops/kernels.py', 'import refiner_vit.train.engine\n', 'ops (layer 1) imports refiner_vit.train'),
    ('models/resolve.py', 'def f():\n    from ..train import fit\n', 'models (layer 3) imports refiner_vit.train'),
    ('models/resolve.py', 'from .. import cli\n', 'models (layer 3) imports refiner_vit.cli'),
    ('data/datasets.py', 'from ..errors import UsageError\n', 'data/datasets.py:1: UsageError outside'),
    ('train/engine.py', 'from .. import errors\nraise errors.UsageError("x")\n', 'train/engine.py:2: UsageError'),
    ('tools/paths.py', '', 'tools has no layer'),
])
def test_a_broken_rule_is_reported(tmp_path, name, text, problem):
    found = violations(_package(tmp_path, {name: text}))
    assert len(found) == 1 and problem in found[0], found


def test_the_command_line_may_use_usage_errors_and_lower_layers(tmp_path):
    allowed = {
        'cli.py': 'from .errors import UsageError\nfrom . import __version__\n',
        'commands/train.py': 'from ..errors import UsageError\nfrom ..train.runner import fit\nfrom . import eval\n',
        'models/resolve.py': 'from ..layers import refine\nfrom . import weights\n',
        'errors.py': 'class UsageError(Exception):\n    pass\n',
    }
    assert violations(_package(tmp_path, allowed)) == []


def test_commands_import_no_private_names_and_no_other_command():
    """A command is a thin layer over the library: it uses public names only, and no command leans on another
    (the shared model options live in ``commands/model_source.py``)."""
    for path in sorted((PACKAGE / 'commands').glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            private = [a.name for a in node.names if a.name.startswith('_')]
            assert not private, (path.name, node.module, private)
            sibling = node.level == 1 and node.module not in (None, 'model_source')
            assert not sibling, (path.name, node.module)
