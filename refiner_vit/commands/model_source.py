"""The model flags every command shares, and the one call that turns them into a model.

Every command that builds a model takes it as ``--model SOURCE`` (``benchmark``: several): a run folder,
``RUN/best``, a ``checkpoint-last.pth``, a timm local dir with or without ``local-dir:``, or a model name. Beside
it: ``--checkpoint`` for weights to put into it, ``--model-kwargs K=V`` for constructor arguments and, where they
make sense, ``--pretrained`` and ``--use-ema`` (the EMA weights of a run). :func:`load_model` resolves them with
:func:`refiner_vit.models.resolve_model`, turns its errors into one-line usage errors and warns, in one line, when
the weights are random. ``refiner train`` declares the same flags from its typed config
(:class:`refiner_vit.train.config.TrainConfig`), so they can also come from a YAML file.
"""
import argparse
import sys
from typing import Any, Optional, Union

from ..errors import UsageError
from ..utils.model_kwargs import parse_model_kwargs

__all__ = ['SOURCE_HELP', 'add_model_options', 'load_model']

SOURCE_HELP = ("a run folder, RUN/best, a checkpoint-last.pth, a timm local dir ('local-dir:' optional), or a model "
               'name (timm or refiner_vit; random weights unless --checkpoint or --pretrained)')


def add_model_options(parser: argparse.ArgumentParser, *, model: str = 'one', checkpoint: str = 'optional',
                      pretrained: bool = True, use_ema: Union[bool, str] = False, model_kwargs: bool = True,
                      model_help: str = SOURCE_HELP, flag: str = '--model') -> None:
    """``--model`` (``model``: ``'one'`` required, ``'many'`` one or more, ``'optional'``; ``flag`` renames it, as
    ``relabel --teacher``), ``--checkpoint`` (``checkpoint='required'`` where the weights are the input), and
    optionally ``--model-kwargs``,
    ``--pretrained`` and ``--use-ema`` (``use_ema='auto'``: ``--use-ema`` / ``--no-use-ema``, default None, for a
    file that may or may not hold EMA weights)."""
    parser.add_argument(flag, required=model != 'optional', nargs='+' if model == 'many' else None,
                        metavar='SOURCE', help=model_help)
    parser.add_argument('--checkpoint', required=checkpoint == 'required', metavar='WEIGHTS',
                        help='weights for the model: a weights file (.safetensors, weights-only .pth, a training '
                             'checkpoint of timm, DeiT or the authors) or any model source; with a model name the '
                             "class count follows the file's classifier")
    if model_kwargs:
        parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                            help='model arguments (Python literals), e.g. depth=6 img_size=32 num_classes=2')
    if pretrained:
        parser.add_argument('--pretrained', action='store_true', help="with a model name: timm's pretrained weights "
                            '(from the local cache when offline)')
    if use_ema == 'auto':
        parser.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=None,
                            help='--use-ema requires the EMA weights, --no-use-ema takes the plain ones; default: the '
                                 'EMA weights when the file has them')
    elif use_ema:
        parser.add_argument('--use-ema', action='store_true', help="the EMA weights of a run's checkpoint-last.pth "
                            '(a run trained with --model-ema)')


def load_model(args: argparse.Namespace, source: str, checkpoint: Optional[str], model_kwargs: Any,
               img_size: Optional[int] = None):
    """The :class:`~refiner_vit.models.resolve.ResolvedModel` of ``source`` with these weights and model
    arguments (``--pretrained`` / ``--use-ema`` from ``args`` where the command has them)."""
    from ..models.resolve import resolve_model

    try:
        kwargs = parse_model_kwargs(model_kwargs)
    except ValueError as e:
        raise UsageError(f'--model-kwargs: {e}') from e
    # a source or weights that cannot be used is the library's ConfigError / WeightsError, which the command line
    # reports as one line; anything else is a bug and keeps its traceback
    resolved = resolve_model(source, checkpoint=checkpoint, model_kwargs=kwargs,
                             pretrained=getattr(args, 'pretrained', False), use_ema=getattr(args, 'use_ema', False),
                             img_size=img_size)
    if resolved.random_weights:
        print(f'refiner {args.command}: warning: {source} has random weights (give --checkpoint, --pretrained or a '
              'trained run)', file=sys.stderr)
    return resolved
