"""The ``refiner`` command line (also ``python -m refiner_vit``): a thin dispatcher over subcommands.

Each subcommand lives in its own module under :mod:`refiner_vit.commands` exposing ``add_parser(subparsers)``,
which registers an argparse sub-parser whose ``func`` default takes the parsed arguments and returns an exit
code. They share one grammar, timm's: ``--model SOURCE`` with ``--checkpoint`` / ``--pretrained`` /
``--model-kwargs`` (:mod:`refiner_vit.commands.model_source`), ``--output`` for what a command writes,
``--format json`` for machine-readable output, ``--use-ema`` for a run's EMA weights, and no abbreviated flags.
Those modules import torch and timm only inside ``func``, so ``refiner --help`` and ``--version`` answer at once.
A flag that makes no sense raises :class:`~refiner_vit.errors.UsageError`; :func:`main` reports it, and every
library error of :data:`refiner_vit.errors.EXIT_CODES` (bad data, weights or settings, a diverged run, a full
disk, a dead peer, preemption), as one line on stderr with its exit code (bad input 2), and the traceback only with
``--debug``. Any other exception is a bug and keeps its traceback. Ctrl-C is one line and exit code 130.

Commands that run models (``runs_models``: train, eval, predict, relabel, attention, benchmark) first make glibc
keep freed memory for reuse (:func:`~refiner_vit.utils.allocator.keep_freed_memory`: faster refined attention, resident
memory near the peak); ``REFINER_KEEP_FREED_MEMORY=0`` opts out. ``convert`` and ``export`` leave the allocator
alone.
"""
import argparse
import importlib
import sys
import traceback
from typing import List, Optional

from . import __version__
from .errors import RunInterruptedError, RunPreemptedError, exit_code

__all__ = ['build_parser', 'main']

# Modules defining subcommands, in the order `refiner --help` lists them.
COMMAND_MODULES = (
    'refiner_vit.commands.train',
    'refiner_vit.commands.eval',
    'refiner_vit.commands.predict',
    'refiner_vit.commands.relabel',
    'refiner_vit.commands.convert',
    'refiner_vit.commands.attention',
    'refiner_vit.commands.benchmark',
    'refiner_vit.commands.export',
    'refiner_vit.commands.app',
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='refiner',
        description='Refiner-ViT: train, evaluate, convert, analyse and benchmark refined vision transformers.',
        allow_abbrev=False,
    )
    parser.add_argument('--version', action='version', version=f'refiner-vit {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    for subparser in subparsers.choices.values():
        subparser.allow_abbrev = False  # `--out` is no `--output`, `--checkpoint` no `--checkpoint-steps`
        subparser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, 'runs_models', False):
        from .utils.allocator import keep_freed_memory
        keep_freed_memory()  # large attention maps reuse freed pages instead of faulting in new ones (allocator.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f'refiner {args.command}: interrupted', file=sys.stderr)
        return 130
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        if isinstance(e, (RunInterruptedError, RunPreemptedError)):  # a stop on request, no error
            print(f'refiner {args.command}: {e}', file=sys.stderr)
        else:
            if args.debug:
                traceback.print_exc()
            print(f'refiner {args.command}: error: {e}', file=sys.stderr)
        return code
