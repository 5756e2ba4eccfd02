"""Exact BatchNorm statistics ("precise BN", as in pycls and detectron2) before a model is evaluated or saved.

Training keeps a BatchNorm's running mean and variance as an exponential average (momentum 0.1), so they lag the
weights and, after a short run, still hold much of their initial values. The released refiner's BatchNorms see
maps whose variance is about 0, while 90 steps leave 0.9^90 = 8e-5 of the initial variance of 1: eval mode then
normalises with statistics far from the real ones, and a run that fits its training images scores near chance
(docs/training.md has the numbers). Here the statistics are recomputed as the plain average over N training
batches with the weights fixed: each BatchNorm in train mode with ``momentum=None`` (PyTorch's cumulative
average), no gradients, and every other module in eval mode except those that own BatchNorms directly.

Unlike ``torch.optim.swa_utils.update_bn``, which puts the whole model in train mode, dropout and drop-path stay
off: eval mode does not apply them, so statistics gathered with them would describe inputs eval never sees. The
owners of BatchNorms run in train mode because an eval-mode module may take a fused path that never calls its
BatchNorms (the released refiner folds them into one native kernel in eval mode without gradients), which would
leave the statistics at their reset values.
"""
from contextlib import contextmanager
from itertools import islice
from typing import Iterable, Iterator, List, Sequence

import torch
from torch import nn

from .engine import autocast_context

__all__ = ['batchnorms', 'recompute_batchnorm_stats']


def batchnorms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (any dimension, SyncBatchNorm included) that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def _cumulative_statistics(models: Sequence[nn.Module]) -> Iterator[None]:
    """``models`` in eval mode except their BatchNorms (reset, averaging cumulatively) and the modules owning them,
    which run in train mode; all restored after (modes and momenta; the new statistics stay)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    norms = [bn for model in models for bn in batchnorms(model)]
    owners = [m for model in models for m in model.modules() if any(c in norms for c in m.children())]
    momenta = [bn.momentum for bn in norms]
    for model in models:
        model.eval()
    for module in owners:
        module.training = True
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        yield
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        for module, training in modes:
            module.training = training


@torch.no_grad()
def recompute_batchnorm_stats(models: Sequence[nn.Module], images: Iterable[torch.Tensor], num_batches: int,
                              device: torch.device, amp: str = 'none', world_size: int = 1) -> int:
    """Replace the running statistics of every BatchNorm in ``models`` by their average over the first
    ``num_batches`` batches of ``images`` (all of them if fewer), each model seeing every batch.

    Under DDP (``world_size > 1``, a collective call) each process averages over its own batches and the results
    are averaged over the processes (timm's ``distribute_bn``), so every process holds the statistics of
    ``num_batches x world_size`` batches: the model each one evaluates is the one rank 0 saves.

    Returns:
        The number of batches this process used; 0 (nothing changed) for models without BatchNorm.
    """
    models = [m for m in models if batchnorms(m)]
    if not models or num_batches < 1:
        return 0
    used = 0
    with _cumulative_statistics(models):
        for x in islice(images, num_batches):
            x = x.to(device, non_blocking=True)
            with autocast_context(device, amp):
                for model in models:
                    model(x)
            used += 1
    if used == 0:
        raise ValueError('precise BatchNorm statistics: no training batch to compute them on')
    if world_size > 1:
        from timm.utils import distribute_bn
        for model in models:
            distribute_bn(model, world_size, reduce=True)
    return used
