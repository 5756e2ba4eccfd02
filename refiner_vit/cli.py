"""The ``refiner`` command line (also ``python -m refiner_vit``): a thin dispatcher over subcommands.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers an argparse
sub-parser whose ``func`` default takes the parsed arguments and returns an exit code.
"""
import argparse
import importlib
import sys
import traceback
from typing import List, Optional

from .errors import UsageError

__all__ = ['build_parser', 'main']

# Modules defining subcommands, in the order `refiner --help` lists them.
COMMAND_MODULES = ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='refiner',
        description='Refiner-ViT: train, evaluate, convert, analyse and benchmark refined vision transformers.',
    )
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f'refiner {args.command}: error: {e}', file=sys.stderr)
        return 2
