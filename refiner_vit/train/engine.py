"""One training epoch and one evaluation pass; metrics are reduced over all DDP processes."""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from timm.utils import dispatch_clip_grad
from torch import nn

from ..data.loader import batches
from ..errors import DataError, TrainingDivergedError
from .distributed import all_reduce_sums
from .losses import AttentionCosineRegularizer

__all__ = ['EpochProgress', 'autocast_context', 'evaluate', 'train_one_epoch']


@dataclass
class EpochProgress:
    """How far one process got into an epoch: what a mid-epoch checkpoint must hold to continue it exactly."""

    step: int = 0  # updates done in this epoch
    loss_sum: float = 0.  # this process's sum of per-sample losses over those updates
    count: int = 0  # and its number of samples


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp bf16|fp16`` on ``device``; a no-op for ``none``."""
    if amp == 'none':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def train_one_epoch(
        model: nn.Module,
        loader: Any,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        *,
        scheduler: Any = None,
        mixup: Optional[Callable] = None,
        cos_reg: Optional[AttentionCosineRegularizer] = None,
        ema: Optional[nn.Module] = None,
        scaler: Optional[torch.amp.GradScaler] = None,
        amp: str = 'none',
        clip_grad: Optional[float] = None,
        on_step: Optional[Callable[[float], None]] = None,
        progress: Optional[EpochProgress] = None,
        on_resumed: Optional[Callable[[], None]] = None,
        checkpoint_steps: int = 0,
        on_checkpoint: Optional[Callable[[EpochProgress], None]] = None,
        after_step: Optional[Callable[[EpochProgress], None]] = None,
) -> Dict[str, float]:
    """Train for one pass over ``loader``; returns the mean loss over all processes' samples.

    Args:
        scheduler: timm scheduler stepped per update (``step_update``) so warm-up is smooth on tiny epochs.
        on_step: called with the step's loss (progress bar).
        progress: continue an epoch from a mid-epoch checkpoint: its first ``progress.step`` batches are loaded
            and dropped (so the sampler and every loader worker's random augmentations are where they were),
            then ``on_resumed()`` restores the random states saved with the checkpoint.
        checkpoint_steps: call ``on_checkpoint(progress)`` after every this many updates (not after the last).
        after_step: called with the progress after every update and its checkpoint (the preemption check: it
            may save and raise to stop the run at this step boundary).

    Raises:
        TrainingDivergedError: the loss is not finite (the last checkpoint on disk is the last good state).
    """
    model.train()
    updates_per_epoch = len(loader)
    progress = progress or EpochProgress()
    stream = iter(batches(loader))
    for _ in range(progress.step):
        next(stream)
    if progress.step and on_resumed is not None:
        on_resumed()
    for step, (images, targets) in enumerate(stream, start=progress.step):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            if images.shape[0] % 2:  # a batch that lost an unreadable image (--skip-bad-images): mixup pairs halves
                images, targets = images[:-1], targets[:-1]
                if not images.shape[0]:
                    continue
            images, targets = mixup(images, targets)
        if cos_reg is not None:
            cos_reg.reset()
        with autocast_context(device, amp):
            loss = criterion(model(images), targets)
            if cos_reg is not None:
                reg = cos_reg.loss()
                loss = loss if reg is None else loss + reg
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f'the loss is {value} at epoch {epoch + 1}, step {step + 1}; training stopped. The last checkpoint '
                'is intact: resume it with --resume auto and a lower --lr, or --clip-grad')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                dispatch_clip_grad(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                dispatch_clip_grad(model.parameters(), clip_grad)
            optimizer.step()
        if ema is not None:
            ema.update(model)
        if scheduler is not None:
            scheduler.step_update(epoch * updates_per_epoch + step + 1)
        progress.step, progress.loss_sum, progress.count = (
            step + 1, progress.loss_sum + value * images.shape[0], progress.count + images.shape[0])
        if on_step is not None:
            on_step(value)
        if on_checkpoint is not None and checkpoint_steps and progress.step % checkpoint_steps == 0 \
                and progress.step < updates_per_epoch:
            on_checkpoint(progress)
        if after_step is not None:
            after_step(progress)
    loss_sum, count = all_reduce_sums([progress.loss_sum, progress.count], device)
    return {'train_loss': loss_sum / max(count, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: str = 'none') -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (in %) of ``model`` over all processes' shards.

    Raises:
        DataError: the validation set holds no image (a mean over nothing is no accuracy).
    """
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.
    for images, targets in batches(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction='sum').item()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = topk == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += targets.shape[0]
    loss_sum, correct1, correct5, count = all_reduce_sums([loss_sum, correct1, correct5, count], device)
    if count == 0:
        raise DataError('the validation set is empty')
    return {'loss': loss_sum / count, 'top1': 100. * correct1 / count, 'top5': 100. * correct5 / count,
            'images': int(count)}
