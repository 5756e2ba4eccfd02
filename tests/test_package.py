"""The package's shape: no import cycle, and the lower layers load without timm (which the registration hook of
refiner_vit/__init__.py relies on), in whatever order a user imports them."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / 'refiner_vit'


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that ``path`` imports anywhere in it (deferred imports too)."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')[:len(package.split('.')) - node.level + 1] if node.level else []
            target = '.'.join(base + ([node.module] if node.module else []))
            found |= {f'{target}.{alias.name}' if f'{target}.{alias.name}' in modules else target
                      for alias in node.names}
    return {m for m in found if m in modules and m != name}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 'done'

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_package_has_no_import_cycle():
    paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    assert graph['refiner_vit.layers.refiner'] >= {'refiner_vit.ops'}  # the walk sees relative imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [['a', 'b', 'c', 'a']]


def test_ops_and_layers_do_not_import_timm_when_they_load():
    for path in [*(PACKAGE / 'ops').glob('*.py'), *(PACKAGE / 'layers').glob('*.py')]:
        body = ast.parse(path.read_text()).body
        top_level = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module or '' for node in top_level if isinstance(node, ast.ImportFrom)]
        assert not any(name.split('.')[0] == 'timm' for name in names), path


def test_a_lower_layer_imported_first_still_registers_the_models():
    script = ('import refiner_vit.ops, refiner_vit.layers, timm, torch\n'
              'from timm.layers._fx import _autowrap_functions, _leaf_modules\n'
              'from refiner_vit.layers import AttentionRefiner\n'
              'from refiner_vit.ops import local_conv2d\n'
              'model = timm.create_model("test_refiner_vit")\n'
              'assert local_conv2d in _autowrap_functions and AttentionRefiner in _leaf_modules\n'
              'print(tuple(model(torch.randn(1, 3, 64, 64)).shape))\n')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == '(1, 10)', done.stderr[-2000:]
