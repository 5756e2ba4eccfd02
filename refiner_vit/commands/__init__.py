"""Subcommands of the ``refiner`` CLI, one module each, each exposing ``add_parser(subparsers)``."""
