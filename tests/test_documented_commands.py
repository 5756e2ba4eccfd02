"""Every `refiner` command and Python snippet in README.md and docs/*.md is checked against the code.

* Every command of a fenced block is parsed by the real parser; inline code spans that start with
  `refiner COMMAND ` and give flags (fragments, often) name only flags that command has. A flag or argument that
  drifts from the code fails here.
* Commands that a `make demo` checkout can run (they read `runs/demo` and name no other input that is not in the
  repository) run for real, in a folder whose `runs/demo` is a tiny run trained once, at toy size (`train` for 1
  epoch, `benchmark` for one repeat).
* The last example of every command's `--help` runs the same way.
* Python blocks are compiled, and those that name no file run, with `model` and `images` (which the attention
  snippets take as given) a small Refiner-ViT and a batch for it.

A command that is not meant to parse (an old spelling in a list of changes, a synopsis with `[...]`) is exempted
by the line `<!-- command-test: skip -->` right before its fenced block, paragraph or table.
"""
import ast
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from refiner_vit.cli import COMMAND_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
SKIP = '<!-- command-test: skip -->'
COMMANDS = tuple(module.rsplit('.', 1)[1] for module in COMMAND_MODULES)
# How a documented command line starts: the CLI, its venv path, or the module (also under torchrun).
PREFIX = re.compile(r'^(?:\.venv/bin/refiner|refiner|\S*python3? -m refiner_vit|torchrun .*?-m refiner_vit)\s+')
INLINE = re.compile(r'`((?:\.venv/bin/)?refiner (?:' + '|'.join(COMMANDS) + r') [^`]+)`')
# Flags that make a documented command toy-sized when it runs for real; later flags win in argparse.
TOY = {
    'train': ['--epochs', '1', '--precise-bn-batches', '0', '--no-progress', '--no-tensorboard'],
    'benchmark': ['--repeats', '1', '--warmup', '0', '--gemm-size', '64', '--batch-size', '2'],
}
# The tiny run standing in for `make demo`'s runs/demo (the default architecture, which `convert` recognises).
DEMO = ['train', '--output', 'runs/demo', *TOY['train']]
OUTPUT_FLAGS = ('--output',)
INPUT_SUFFIX = re.compile(r'\.(png|jpe?g|pth|tar|safetensors|pt2|onnx|yaml|json|txt)$')
# A Python snippet that loads a file (the authors' checkpoint, a converted folder) is only compiled.
NAMES_A_FILE = re.compile(r"['\"](?:local-dir:|[^'\"]*\.(?:pth|tar|safetensors)['\"])")


@dataclass
class Documented:
    where: str  # file:line
    argv: List[str]
    complete: bool = True  # a command line, not an inline fragment

    def __str__(self) -> str:
        return f'{self.where}: refiner {" ".join(self.argv)}'


def _argv(line: str) -> List[str]:
    match = PREFIX.match(line)
    return shlex.split(line[match.end():], comments=True) if match else []


def _fenced(name: Path, start: int, block: List[str]) -> List[Documented]:
    """The commands of a fenced block (continuation lines joined), each named by the line it starts on."""
    found, pending, first = [], '', start
    for number, line in enumerate(block, start):
        if not pending:
            first = number
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        argv, pending = _argv((pending + line).strip()), ''
        if argv:
            found.append(Documented(f'{name}:{first}', argv))
    return found


def _inline(name: Path, paragraph: List[Tuple[int, str]]) -> List[Documented]:
    """The command spans of a paragraph (a span may run over a line break)."""
    text = ' '.join(line.strip() for _, line in paragraph)
    return [Documented(f'{name}:{paragraph[0][0]}', _argv(span), complete=False) for span in INLINE.findall(text)]


def _collect() -> tuple:
    """(commands, python blocks) of every doc. The skip marker exempts the next fenced block or paragraph."""
    commands, snippets = [], []
    for path in DOCS:
        name = path.relative_to(ROOT)
        skip, fence, block, start, paragraph = False, None, [], 0, []
        for number, line in enumerate([*path.read_text().splitlines(), ''], 1):
            stripped = line.strip()
            if fence is not None:
                if not stripped.startswith('```'):
                    block.append(line)
                    continue
                if not skip:
                    if fence == 'python':
                        snippets.append((f'{name}:{start}', '\n'.join(block)))
                    else:
                        commands.extend(_fenced(name, start, block))
                skip, fence, block = False, None, []
                continue
            if stripped and not stripped.startswith('```') and stripped != SKIP:
                paragraph.append((number, line))
                continue
            if paragraph:  # a blank line, a fence or a marker ends the paragraph
                if not skip:
                    commands.extend(_inline(name, paragraph))
                skip, paragraph = False, []
            if stripped == SKIP:
                skip = True
            elif stripped.startswith('```'):
                fence, start = stripped[3:].strip() or 'text', number + 1
    return commands, snippets


def _subparsers() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def _help_examples() -> List[Documented]:
    """The last example of every command's --help, which must run after `make demo` (`app` would serve forever)."""
    return [Documented(f'refiner {name} --help', _argv(parser.epilog.strip().splitlines()[-1].strip()))
            for name, parser in _subparsers().items() if name != 'app']


DOCUMENTED, SNIPPETS = _collect()
HELP_EXAMPLES = _help_examples()


def _runnable(argv: List[str]) -> bool:
    """Reads `runs/demo` and names no input beyond it and the repository's docs/ (outputs may be anywhere)."""
    if argv[0] not in COMMANDS or not any(a.startswith('runs/demo') for a in argv):
        return False
    if argv[0] == 'train' and 'runs/demo' in argv and argv[argv.index('runs/demo') - 1] == '--output':
        return False  # `make demo` itself (the fixture) or continuing it
    for i, arg in enumerate(argv[1:], 1):
        if argv[i - 1] in OUTPUT_FLAGS or arg.startswith('-'):
            continue
        pathlike = '/' in arg or INPUT_SUFFIX.search(arg) or arg.isupper()
        if pathlike and not arg.startswith(('runs/demo', 'docs/', 'local-dir:runs/demo')):
            return False
    return True


def test_the_docs_hold_commands():
    assert len(DOCUMENTED) > 40 and SNIPPETS
    assert sum(_runnable(d.argv) for d in DOCUMENTED if d.complete) >= 5


@pytest.mark.parametrize('documented', DOCUMENTED, ids=str)
def test_documented_command_parses(documented):
    if not documented.complete:
        known = {option for action in _subparsers()[documented.argv[0]]._actions for option in action.option_strings}
        unknown = [a for a in documented.argv if a.startswith('--') and a.split('=')[0] not in known]
        assert not unknown, f'{documented}: no such flag {unknown}'
        return
    try:
        build_parser().parse_args(documented.argv)
    except SystemExit as e:
        assert e.code == 0, f'{documented} does not parse (exit code {e.code})'


@pytest.mark.parametrize('where, code', SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_documented_python_compiles(where, code):
    ast.parse(code, where)


@pytest.mark.slow
@pytest.mark.parametrize('where, code', [(w, c) for w, c in SNIPPETS if not NAMES_A_FILE.search(c)],
                         ids=[w for w, c in SNIPPETS if not NAMES_A_FILE.search(c)])
def test_documented_python_runs(where, code):
    import timm
    import torch

    import refiner_vit

    model = timm.create_model('test_refiner_vit')
    namespace = dict(timm=timm, torch=torch, refiner_vit=refiner_vit, model=model,
                     images=torch.randn(2, *model.pretrained_cfg['input_size']))
    exec(compile(code, where, 'exec'), namespace)


@pytest.fixture(scope='module')
def demo_checkout(tmp_path_factory):
    """A folder laid out as a `make demo` checkout: docs/ of the repository and a tiny runs/demo."""
    root = tmp_path_factory.mktemp('checkout')
    (root / 'docs').symlink_to(ROOT / 'docs')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(DEMO) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
@pytest.mark.parametrize('documented', [d for d in DOCUMENTED if d.complete and _runnable(d.argv)] + HELP_EXAMPLES,
                         ids=str)
def test_documented_command_runs_after_make_demo(documented, demo_checkout, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_checkout)
    argv = [*documented.argv, *TOY.get(documented.argv[0], [])]
    if '--output' in argv:  # each command writes its own outputs, beside the tiny run
        index = argv.index('--output') + 1
        argv[index] = str(tmp_path / Path(argv[index]).name) if argv[index].startswith('runs/demo') else argv[index]
    assert main(argv) == 0, documented
