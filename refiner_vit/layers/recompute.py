"""Recomputing activations in backward without touching BatchNorm's running statistics a second time.

Recomputation (activation checkpointing) runs a forward again in backward. A BatchNorm in training mode would then
update its running statistics twice per step; inside :func:`running_stats_frozen` it normalises with the batch's
statistics, exactly as the forward did, and its updates go to scratch copies of the statistics, which are then
dropped. (It still sees running statistics, so it saves for backward what the forward saved, as checkpointing
requires.)
"""
import contextlib
from functools import partial
from typing import Any, Callable, Iterator, List, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ['checkpoint_once', 'running_stats_frozen']


_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside the block, updates of the running statistics of ``module``'s BatchNorms do not last."""
    norms: List[_BatchNorm] = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    kept = [{name: getattr(norm, name) for name in _STATISTICS} for norm in norms]
    for norm, statistics in zip(norms, kept):
        for name, value in statistics.items():
            setattr(norm, name, None if value is None else value.clone())
    try:
        yield
    finally:
        for norm, statistics in zip(norms, kept):
            for name, value in statistics.items():
                setattr(norm, name, value)


def _contexts(module: nn.Module) -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), running_stats_frozen(module)


def checkpoint_once(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, its activations recomputed in backward (non-reentrant ``torch.utils.checkpoint``), with
    the BatchNorms of ``module`` updating their running statistics in the forward only."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=partial(_contexts, module))
