"""``refiner train``: put data, model, recipe, checkpoints and logs together and run the epochs."""
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import build_eval_transform, build_loader, build_train_transform, open_split, reseed_loader, resolve_data
from ..data.datasets import DataSource
from ..data.loader import batches, loader_worker_faults
from ..errors import ConfigError, DataError, RunInterruptedError, RunPreemptedError, WeightsError
from ..models.local_dir import save_local_dir
from ..models.resolve import model_data_config
from ..utils.io import remove_stale_temps
from .checkpoint import (
    CHECKPOINT_NAME,
    find_resume,
    get_rng_state,
    load_training_state,
    save_training_state,
    seed_everything,
    set_rng_state,
)
from .config import TrainConfig
from .distributed import DistContext, collective_faults, init_distributed, shutdown_distributed
from .engine import EpochProgress, evaluate, train_one_epoch
from .losses import AttentionCosineRegularizer, build_criterion
from .model_builder import build_model
from .outputs import RunLog, write_json, write_yaml
from .precise_bn import batchnorms, recompute_batchnorm_stats
from .preemption import PreemptionNotice, preemption_notice
from .run_folder import check_output, clear_run

__all__ = ['DEFAULT_LR', 'fit', 'resolve_lr']

# Learning rate when neither --lr nor --lr-base is given: right for the small default model and batch.
DEFAULT_LR = 1e-3


class ForwardTrain(nn.Module):
    """Makes ``model.forward_train`` the ``forward`` (so DDP, which wraps ``forward``, syncs its gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_train(x)


def resolve_lr(config: TrainConfig, world_size: int) -> float:
    """``--lr`` as given; else ``--lr-base`` x global batch / ``--lr-base-size`` (DeiT's rule); else 1e-3."""
    if config.lr:
        return float(config.lr)
    if config.lr_base:
        return float(config.lr_base) * config.batch_size * world_size / config.lr_base_size
    return DEFAULT_LR


def _datasets(config: TrainConfig, source: DataSource, model: nn.Module, data_config: Dict[str, Any], num_classes: int):
    skip = config.skip_bad_images
    val_ds = open_split(source, 'val', build_eval_transform(data_config), config.dataset_download, skip)
    if not config.token_label_dir:
        transform = build_train_transform(data_config, config)
        train_ds = open_split(source, 'train', transform, config.dataset_download, skip)
        return train_ds, val_ds
    if source.kind != 'folder':
        raise ConfigError('--token-label-dir needs --data FOLDER (an ImageFolder root with train/ and val/)')
    from ..data.token_labels import build_token_label_dataset
    train_ds = build_token_label_dataset(
        source.train_root, config.token_label_dir, data_config['input_size'][-2:], model.patch_embed.grid_size,
        num_classes, True, scale=tuple(config.scale), ratio=tuple(config.ratio), hflip=config.hflip,
        color_jitter=config.color_jitter, auto_augment=config.aa, interpolation=config.train_interpolation,
        mean=data_config['mean'], std=data_config['std'], re_prob=config.reprob, re_mode=config.remode,
        re_count=config.recount,
    )
    return train_ds, val_ds


def _mixup(config: TrainConfig, num_classes: int, model: nn.Module) -> Optional[Mixup]:
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    common = dict(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                  switch_prob=config.mixup_switch_prob)
    if config.token_label_dir:
        from ..data.token_labels import TokenLabelMixup
        return TokenLabelMixup(model.patch_embed.grid_size, **common)
    return Mixup(**common, label_smoothing=config.smoothing, num_classes=num_classes)


def _num_classes(config: TrainConfig, source: DataSource) -> Tuple[int, list]:
    if source.classes:
        return len(source.classes), list(source.classes)
    from ..data import dataset_classes
    classes = dataset_classes(open_split(source, 'train', None, config.dataset_download))
    if not classes:
        raise DataError(f'--data {source.spec}: cannot tell the number of classes')
    return len(classes), classes


def _default_img_size(config: TrainConfig, source: DataSource) -> Optional[int]:
    if config.img_size or config.model:
        return config.img_size
    return 16 if source.kind == 'digits' else 32


def _check_resumable(state: Dict[str, Any], path: Path, spec: Dict[str, Any], world_size: int) -> None:
    """A checkpoint of another model, or one written inside an epoch by another number of processes, cannot
    continue this run."""
    if state['spec'] != spec:
        keys = sorted(k for k in set(spec) | set(state['spec']) if spec.get(k) != state['spec'].get(k))
        inner = [f'{key}.{k}: {state["spec"][key].get(k)!r} in the checkpoint, {spec[key].get(k)!r} now'
                 for key in keys if isinstance(spec.get(key), dict) and isinstance(state['spec'].get(key), dict)
                 for k in sorted(set(spec[key]) | set(state['spec'][key]))
                 if spec[key].get(k) != state['spec'][key].get(k)]
        outer = [f'{k}: {state["spec"].get(k)!r} in the checkpoint, {spec.get(k)!r} now'
                 for k in keys if not (isinstance(spec.get(k), dict) and isinstance(state['spec'].get(k), dict))]
        raise ConfigError(f'{path}: was trained as another model ({"; ".join(outer + inner)}); use another --output')
    if state.get('step') and len(state['ranks']) != world_size:
        raise ConfigError(f'{path}: was written inside an epoch by {len(state["ranks"])} process(es); resume it with '
                         f'{len(state["ranks"])} (this run has {world_size})')


def _gather_rank_states(ctx: DistContext, progress: EpochProgress) -> List[Dict[str, Any]]:
    """Every process's random states and epoch loss so far, in rank order (collective under DDP)."""
    own = dict(rng=get_rng_state(), loss_sum=progress.loss_sum, count=progress.count)
    if not ctx.distributed:
        return [own]
    gathered: List[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, own)
    return gathered


class _Saved:
    """The newest checkpoint of the run on disk, for the message of an interrupted run."""

    def __init__(self) -> None:
        self.epoch, self.step, self.exists = 0, 0, False

    def interrupted(self) -> str:
        if not self.exists:
            return 'interrupted before the first checkpoint; nothing was written'
        if self.step:
            return (f'interrupted in epoch {self.epoch + 1} (checkpoint at step {self.step}); continue with '
                    '--resume auto')
        return f'interrupted after epoch {self.epoch}; continue with --resume auto'

    def preempted(self, signum: int, path: Path) -> str:
        where = f'in epoch {self.epoch + 1} at step {self.step}' if self.step else f'after epoch {self.epoch}'
        return (f'preempted by {PreemptionNotice.name(signum)} {where}: saved {path}; continue with the same command '
                'and --resume auto')


class _Phase:
    """What the processes are doing together, for the message of a failed collective (``str()``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def fit(config: TrainConfig) -> Dict[str, Any]:
    """Train as ``config`` says; returns the summary (also written to ``OUTPUT/summary.json``) on the main process,
    an empty dict on the others.

    Raises:
        ConfigError, DataError, WeightsError: bad settings, data or weights, found before anything is written
            where possible.
        TrainingDivergedError: the loss became NaN or infinite; the last checkpoint is the last good state.
        RunInterruptedError: Ctrl-C; the message says where the run can continue from.
        RunPreemptedError: SIGTERM / SIGUSR1: every process stopped after the same step, which the checkpoint holds.
        DistributedFaultError: another process died, stalled past ``--dist-timeout`` or never joined.
        OutputWriteError: a file of the run could not be written; the previous one is intact.
        LoaderWorkerError: a loader worker died; the last checkpoint is intact.
    """
    saved = _Saved()
    ctx = init_distributed(config.device, config.dist_timeout)
    phase = _Phase('the start of the run')
    try:
        with preemption_notice() as notice, loader_worker_faults(), \
                collective_faults(ctx.rank, phase, config.dist_timeout):
            return _fit(config, ctx, saved, notice, phase)
    except KeyboardInterrupt as e:
        raise RunInterruptedError(saved.interrupted()) from e
    finally:
        shutdown_distributed()


def _precise_bn(config: TrainConfig, ctx: DistContext, loader: Any, models: List[nn.Module], epoch: int) -> None:
    """Exact BatchNorm statistics of ``models`` (precise_bn.py) on training batches that depend on
    ``(seed, epoch, rank)`` only, with every random state restored after: the training that follows, and hence
    resume, is unchanged."""
    if not config.precise_bn_batches:
        return
    rng = get_rng_state()
    seed_everything(config.seed + 1_000 * epoch + ctx.rank + 500)
    reseed_loader(loader, config.seed * 1_000 + ctx.rank + 500, epoch)
    images = (x for x, _ in batches(loader))
    try:
        recompute_batchnorm_stats(models, images, config.precise_bn_batches, ctx.device, config.amp, ctx.world_size)
    finally:
        images.close()  # stops the loader's workers now, not when garbage-collected
        set_rng_state(rng)


def _fit(config: TrainConfig, ctx: DistContext, saved: _Saved, notice: PreemptionNotice,
         phase: _Phase) -> Dict[str, Any]:
    output = Path(config.output)
    check_output(output, config.resume, config.overwrite)
    if config.amp == 'fp16' and ctx.device.type != 'cuda':
        raise ConfigError(f'--amp fp16 needs CUDA (the device is {ctx.device}); use --amp bf16 on a CPU')
    if ctx.device.type == 'cpu' and config.threads > 0:
        torch.set_num_threads(config.threads)
    resume_path = find_resume(config.resume, output)
    source = resolve_data(config.data, config.data_dir)
    config = replace(config, img_size=_default_img_size(config, source))
    num_classes, class_names = _num_classes(config, source)
    seed_everything(config.seed)
    token_labels = bool(config.token_label_dir)
    model, spec = build_model(config, num_classes, token_labels)
    data_config = model_data_config(model, config.img_size, config.crop_pct, config.interpolation)
    train_ds, val_ds = _datasets(config, source, model, data_config, num_classes)
    workers = config.workers if config.workers is not None else \
        (0 if source.kind == 'digits' else min(4, os.cpu_count()))
    train_loader = build_loader(train_ds, config.batch_size, True, workers, config.seed, ctx.rank, ctx.world_size)
    val_loader = build_loader(val_ds, config.batch_size, False, workers, config.seed, ctx.rank, ctx.world_size)

    model.to(ctx.device)
    mixup = _mixup(config, num_classes, model)
    criterion = build_criterion(mixup is not None, config.smoothing, token_labels, config.dense_weight)
    cos_reg = AttentionCosineRegularizer(model, config.cos_reg) if config.cos_reg else None
    ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
    lr = resolve_lr(config, ctx.world_size)
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=lr, weight_decay=config.weight_decay)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr, min_lr=config.min_lr, cooldown_epochs=config.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=len(train_loader),
    )
    scaler = torch.amp.GradScaler('cuda') if config.amp == 'fp16' else None

    start_epoch, start_step, best_top1, train_seconds, resumed = 0, 0, -1., 0., None
    if resume_path is not None:
        state = load_training_state(resume_path)
        _check_resumable(state, resume_path, spec, ctx.world_size)
        try:
            model.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f'{resume_path}: does not fit this run ({str(e).splitlines()[0]})') from e
        if ema is not None and state.get('ema') is not None:
            ema.module.load_state_dict(state['ema'])
        if scaler is not None and state.get('scaler') is not None:
            scaler.load_state_dict(state['scaler'])
        start_epoch, start_step = state['epoch'], state.get('step', 0)
        best_top1, train_seconds = state['best_top1'], state['train_seconds']
        saved.epoch, saved.step, saved.exists = start_epoch, start_step, True
        train_loader.bad_images.update(state.get('bad_images', []))
        # the current flags' schedule at the saved update (the same value the run had, unless --lr etc. changed)
        scheduler.step_update(start_epoch * len(train_loader) + start_step)
        if start_step:
            resumed = state['ranks'][ctx.rank]

    train_module = ForwardTrain(model) if token_labels else model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == 'cuda' else None
        train_module = DistributedDataParallel(train_module, device_ids=device_ids)
    params = sum(p.numel() for p in model.parameters())
    # what to do with the folder is not a setting of the run: a saved config must never resume or overwrite
    settings = replace(config, resume=None, overwrite=False).to_dict()
    log = RunLog(output, start_epoch, tensorboard=not config.no_tensorboard) if ctx.is_main else None
    if ctx.is_main:
        precise = f', precise BatchNorm statistics over {config.precise_bn_batches} batches' \
            if config.precise_bn_batches and batchnorms(model) else ''
        print(f'refiner train: {spec["model"]} ({params / 1e6:.2f}M params) on {config.data} ({len(train_ds)} train / '
              f'{len(val_ds)} val images, {num_classes} classes), {total_epochs} epochs, lr {lr:.3g}, '
              f'{ctx.world_size} process(es) on {ctx.device}{precise}', file=sys.stderr)
    writing = []

    def begin_writing() -> None:
        """Before the run's first write (main process): the folder, a replaced run's files gone, config.yaml."""
        if writing or not ctx.is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            clear_run(output)
        remove_stale_temps(output)  # left by a run killed while writing
        if (output / 'best').is_dir():
            remove_stale_temps(output / 'best')
        write_yaml(output / 'config.yaml', settings)
        writing.append(True)

    steps = len(train_loader)
    bar = tqdm(total=total_epochs * steps, initial=start_epoch * steps + start_step, unit='step', dynamic_ncols=True,
               disable=not ctx.is_main or config.no_progress, file=sys.stderr)
    last: Dict[str, Any] = log.history[-1] if log and log.history else {}

    def bad_images() -> List[str]:
        return sorted(train_loader.bad_images | val_loader.bad_images)

    def save(epoch: int, progress: EpochProgress, seconds: float) -> None:
        """Write checkpoint-last.pth: at an epoch end (``progress.step == 0``) or inside ``epoch``."""
        ranks = _gather_rank_states(ctx, progress)
        if ctx.is_main:
            begin_writing()
            save_training_state(
                output / CHECKPOINT_NAME, model=model.state_dict(), optimizer=optimizer.state_dict(),
                ema=None if ema is None else ema.module.state_dict(),
                scaler=None if scaler is None else scaler.state_dict(), epoch=epoch, step=progress.step,
                ranks=ranks, best_top1=best_top1, train_seconds=train_seconds + seconds, spec=spec,
                data_config=data_config, class_names=class_names, bad_images=bad_images(), args=settings,
            )
        saved.epoch, saved.step, saved.exists = epoch, progress.step, True

    def save_inside(epoch: int, started: float, progress: EpochProgress) -> None:
        save(epoch, progress, time.perf_counter() - started)

    def stop_if_preempted(epoch: int, started: float, progress: EpochProgress) -> None:
        """At a step boundary (``progress.step`` > 0) or an epoch end: all processes stop if any got the signal."""
        signum = notice.agreed(ctx.device)
        if not signum:
            return
        if progress.step and (saved.epoch, saved.step) != (epoch, progress.step):
            save_inside(epoch, started, progress)
        raise RunPreemptedError(saved.preempted(signum, output / CHECKPOINT_NAME))

    try:
        for epoch in range(start_epoch, total_epochs):
            seed_everything(config.seed + 1_000 * epoch + ctx.rank)
            reseed_loader(train_loader, config.seed * 1_000 + ctx.rank, epoch)
            started = time.perf_counter()
            bar.set_description(f'epoch {epoch + 1}/{total_epochs}')
            phase.text = f'the training steps of epoch {epoch + 1} (gradients, checkpoint states)'
            progress, on_resumed = EpochProgress(), None
            if resumed is not None:
                progress = EpochProgress(start_step, resumed['loss_sum'], resumed['count'])
                on_resumed = partial(set_rng_state, resumed['rng'])
            stats = train_one_epoch(
                train_module, train_loader, criterion, optimizer, ctx.device, epoch, scheduler=scheduler,
                mixup=mixup, cos_reg=cos_reg, ema=ema, scaler=scaler, amp=config.amp, clip_grad=config.clip_grad,
                on_step=lambda loss: (bar.update(), bar.set_postfix(loss=f'{loss:.3f}', refresh=False)),
                progress=progress, on_resumed=on_resumed, checkpoint_steps=config.checkpoint_steps,
                on_checkpoint=partial(save_inside, epoch, started),
                after_step=partial(stop_if_preempted, epoch, started),
            )
            resumed = None
            phase.text = f'the evaluation of epoch {epoch + 1}'
            _precise_bn(config, ctx, train_loader, [model] + ([ema.module] if ema is not None else []), epoch)
            metrics = evaluate(model, val_loader, ctx.device, config.amp)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            last = dict(epoch=epoch + 1, train_loss=round(stats['train_loss'], 5), top1=round(metrics['top1'], 3),
                        top5=round(metrics['top5'], 3), lr=optimizer.param_groups[0]['lr'], seconds=round(seconds, 3),
                        val_loss=round(metrics['loss'], 5))
            if ema is not None:
                last['ema_top1'] = round(evaluate(ema.module, val_loader, ctx.device, config.amp)['top1'], 3)
            is_best = metrics['top1'] > best_top1
            best_top1 = max(best_top1, metrics['top1'])
            if ctx.is_main:
                bar.write(f'epoch {epoch + 1}/{total_epochs}: loss {last["train_loss"]:.4f}, top-1 '
                          f'{last["top1"]:.2f} %, top-5 {last["top5"]:.2f} %, {seconds:.1f} s')
                begin_writing()
                if is_best:
                    _save_best(model, output / 'best', spec, data_config, class_names, config)
                log.append(last)
            phase.text = f'the checkpoint states after epoch {epoch + 1}'
            save(epoch + 1, EpochProgress(), 0.)
            stop_if_preempted(epoch + 1, 0., EpochProgress())
    finally:
        bar.close()
        if cos_reg is not None:
            cos_reg.remove()
        if log is not None:
            log.close()
    summary = dict(
        model=spec['model'], model_kwargs=spec['model_kwargs'], refine=spec['refine'], data=config.data,
        epochs=total_epochs, top1=last.get('top1'), top5=last.get('top5'), best_top1=round(best_top1, 3),
        train_loss=last.get('train_loss'), ema_top1=last.get('ema_top1'), params=params, world_size=ctx.world_size,
        train_seconds=round(train_seconds, 2), img_size=data_config['input_size'][-1], batch_size=config.batch_size,
        lr=lr, seed=config.seed, device=str(ctx.device), classes=num_classes, output=str(output),
        bad_images=dict(count=len(bad_images()), files=bad_images()),
    )
    if not ctx.is_main:
        return {}
    begin_writing()
    write_json(output / 'summary.json', summary)
    return summary


def _save_best(model: nn.Module, folder: Path, spec: Dict[str, Any], data_config: Dict[str, Any],
               class_names: List[str], config: TrainConfig) -> None:
    """``RUN/best``: a timm local dir that records what rebuilds the model and what it was trained on."""
    save_local_dir(model, folder, model_args=spec['model_kwargs'], label_names=class_names, data_config=data_config,
                   overwrite=True,
                   extra=dict(refine=spec['refine'], train_data=dict(data=config.data, data_dir=config.data_dir)))
