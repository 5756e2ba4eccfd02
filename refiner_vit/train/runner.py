"""``refiner train``: put data, model, recipe, checkpoints and logs together and run the epochs."""
import os
import sys
import time
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
from ..errors import UsageError
from ..io import remove_stale_temps
from .checkpoint import (
    CHECKPOINT_NAME,
    find_resume,
    get_rng_state,
    load_training_state,
    save_training_state,
    seed_everything,
    set_rng_state,
)
from .distributed import DistContext, init_distributed, shutdown_distributed
from .engine import EpochProgress, evaluate, train_one_epoch
from .losses import AttentionCosineRegularizer, build_criterion
from .models import build_model, resolve_model_data_config, restore_model_dir, save_model_dir
from .outputs import RunLog, write_json, write_yaml

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


def resolve_lr(args: Any, world_size: int) -> float:
    """``--lr`` as given; else ``--lr-base`` x global batch / ``--lr-base-size`` (DeiT's rule); else 1e-3."""
    if args.lr:
        return float(args.lr)
    if args.lr_base:
        return float(args.lr_base) * args.batch_size * world_size / args.lr_base_size
    return DEFAULT_LR


def _validate(args: Any) -> None:
    """Conflicting or out-of-range flags, before anything is loaded."""
    for name in ('epochs', 'batch_size'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.mix_token and not args.token_label_dir:
        raise UsageError('--mix-token needs --token-label-dir (MixToken is un-mixed with token labels)')
    if args.refine and not args.model:
        raise UsageError('--refine needs --model NAME of a timm ViT (the default model is a Refiner-ViT already)')
    if args.img_size is not None and args.img_size < 8:
        raise UsageError(f'--img-size must be >= 8, got {args.img_size}')
    if args.checkpoint_steps < 0:
        raise UsageError(f'--checkpoint-steps must be >= 0, got {args.checkpoint_steps}')
    if args.skip_bad_images and args.token_label_dir:
        raise UsageError('--skip-bad-images does not apply to --token-label-dir data (each image has a label map)')


def _datasets(args: Any, source: DataSource, model: nn.Module, data_config: Dict[str, Any], num_classes: int):
    skip = args.skip_bad_images
    val_ds = open_split(source, 'val', build_eval_transform(data_config), args.dataset_download, skip)
    if not args.token_label_dir:
        train_ds = open_split(source, 'train', build_train_transform(data_config, args), args.dataset_download, skip)
        return train_ds, val_ds
    if source.kind != 'folder':
        raise UsageError('--token-label-dir needs --data FOLDER (an ImageFolder root with train/ and val/)')
    from ..data.token_labels import build_token_label_dataset
    train_ds = build_token_label_dataset(
        source.train_root, args.token_label_dir, data_config['input_size'][-2:], model.patch_embed.grid_size,
        num_classes, True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation,
        mean=data_config['mean'], std=data_config['std'], re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount,
    )
    return train_ds, val_ds


def _mixup(args: Any, num_classes: int, model: nn.Module) -> Optional[Mixup]:
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    common = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob)
    if args.token_label_dir:
        from ..data.token_labels import TokenLabelMixup
        return TokenLabelMixup(model.patch_embed.grid_size, **common)
    return Mixup(**common, label_smoothing=args.smoothing, num_classes=num_classes)


def _num_classes(args: Any, source: DataSource) -> Tuple[int, list]:
    if source.classes:
        return len(source.classes), list(source.classes)
    from ..data import dataset_classes
    classes = dataset_classes(open_split(source, 'train', None, args.dataset_download))
    if not classes:
        raise UsageError(f'--data {source.spec}: cannot tell the number of classes')
    return len(classes), classes


def _default_img_size(args: Any, source: DataSource) -> Optional[int]:
    if args.img_size or args.model:
        return args.img_size
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
        raise UsageError(f'{path}: was trained as another model ({"; ".join(outer + inner)}); use another --output')
    if state.get('step') and len(state['ranks']) != world_size:
        raise UsageError(f'{path}: was written inside an epoch by {len(state["ranks"])} process(es); resume it with '
                         f'{len(state["ranks"])} (this run has {world_size})')


def _gather_rank_states(ctx: DistContext, progress: EpochProgress) -> List[Dict[str, Any]]:
    """Every process's random states and epoch loss so far, in rank order (collective under DDP)."""
    own = dict(rng=get_rng_state(), loss_sum=progress.loss_sum, count=progress.count)
    if not ctx.distributed:
        return [own]
    gathered: List[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, own)
    return gathered


def fit(args: Any) -> Dict[str, Any]:
    """Train as the flags say; returns the summary (also written to ``OUTPUT/summary.json``) on the main process,
    an empty dict on the others."""
    _validate(args)
    ctx = init_distributed(args.device)
    try:
        return _fit(args, ctx)
    finally:
        shutdown_distributed()


def _fit(args: Any, ctx: DistContext) -> Dict[str, Any]:
    if ctx.device.type == 'cpu' and args.threads > 0:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    resume_path = find_resume(args.resume, output)
    source = resolve_data(args.data, args.data_dir)
    args.img_size = _default_img_size(args, source)
    num_classes, class_names = _num_classes(args, source)
    seed_everything(args.seed)
    token_labels = bool(args.token_label_dir)
    model, spec = build_model(args, num_classes, token_labels)
    data_config = resolve_model_data_config(model, args.img_size, args.crop_pct, args.interpolation)
    train_ds, val_ds = _datasets(args, source, model, data_config, num_classes)
    workers = args.workers if args.workers is not None else (0 if source.kind == 'digits' else min(4, os.cpu_count()))
    train_loader = build_loader(train_ds, args.batch_size, True, workers, args.seed, ctx.rank, ctx.world_size)
    val_loader = build_loader(val_ds, args.batch_size, False, workers, args.seed, ctx.rank, ctx.world_size)

    model.to(ctx.device)
    mixup = _mixup(args, num_classes, model)
    criterion = build_criterion(mixup is not None, args.smoothing, token_labels, args.dense_weight)
    cos_reg = AttentionCosineRegularizer(model, args.cos_reg) if args.cos_reg else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    lr = resolve_lr(args, ctx.world_size)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs, step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    use_scaler = args.amp == 'fp16' and ctx.device.type == 'cuda'
    scaler = torch.amp.GradScaler('cuda') if use_scaler else None

    start_epoch, start_step, best_top1, train_seconds, resumed = 0, 0, -1., 0., None
    if resume_path is not None:
        state = load_training_state(resume_path)
        _check_resumable(state, resume_path, spec, ctx.world_size)
        try:
            model.load_state_dict(state['model'])
            optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError) as e:
            raise UsageError(f'{resume_path}: does not fit this run ({str(e).splitlines()[0]})') from e
        if ema is not None and state.get('ema') is not None:
            ema.module.load_state_dict(state['ema'])
        if scaler is not None and state.get('scaler') is not None:
            scaler.load_state_dict(state['scaler'])
        start_epoch, start_step = state['epoch'], state.get('step', 0)
        best_top1, train_seconds = state['best_top1'], state['train_seconds']
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
    resolved = {k: v for k, v in vars(args).items() if k not in ('func', 'command', 'debug', 'config')}
    log = None
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(output)  # left by a run killed while writing
        restore_model_dir(output / 'best')
        write_yaml(output / 'config.yaml', resolved)
        log = RunLog(output, start_epoch, tensorboard=not args.no_tensorboard)
        print(f'refiner train: {spec["model"]} ({params / 1e6:.2f}M params) on {args.data} ({len(train_ds)} train / '
              f'{len(val_ds)} val images, {num_classes} classes), {total_epochs} epochs, lr {lr:.3g}, '
              f'{ctx.world_size} process(es) on {ctx.device}', file=sys.stderr)

    steps = len(train_loader)
    bar = tqdm(total=total_epochs * steps, initial=start_epoch * steps + start_step, unit='step', dynamic_ncols=True,
               disable=not ctx.is_main or args.no_progress, file=sys.stderr)
    last: Dict[str, Any] = log.history[-1] if log and log.history else {}

    def bad_images() -> List[str]:
        return sorted(train_loader.bad_images | val_loader.bad_images)

    def save(epoch: int, progress: EpochProgress, seconds: float) -> None:
        """Write checkpoint-last.pth: at an epoch end (``progress.step == 0``) or inside ``epoch``."""
        ranks = _gather_rank_states(ctx, progress)
        if ctx.is_main:
            save_training_state(
                output / CHECKPOINT_NAME, model=model.state_dict(), optimizer=optimizer.state_dict(),
                ema=None if ema is None else ema.module.state_dict(),
                scaler=None if scaler is None else scaler.state_dict(), epoch=epoch, step=progress.step,
                ranks=ranks, best_top1=best_top1, train_seconds=train_seconds + seconds, spec=spec,
                data_config=data_config, class_names=class_names, bad_images=bad_images(), args=resolved,
            )

    def save_inside(epoch: int, started: float, progress: EpochProgress) -> None:
        save(epoch, progress, time.perf_counter() - started)

    for epoch in range(start_epoch, total_epochs):
        seed_everything(args.seed + 1_000 * epoch + ctx.rank)
        reseed_loader(train_loader, args.seed * 1_000 + ctx.rank, epoch)
        started = time.perf_counter()
        bar.set_description(f'epoch {epoch + 1}/{total_epochs}')
        progress, on_resumed = EpochProgress(), None
        if resumed is not None:
            progress = EpochProgress(start_step, resumed['loss_sum'], resumed['count'])
            on_resumed = partial(set_rng_state, resumed['rng'])
        stats = train_one_epoch(
            train_module, train_loader, criterion, optimizer, ctx.device, epoch, scheduler=scheduler, mixup=mixup,
            cos_reg=cos_reg, ema=ema, scaler=scaler, amp=args.amp, clip_grad=args.clip_grad,
            on_step=lambda loss: (bar.update(), bar.set_postfix(loss=f'{loss:.3f}', refresh=False)),
            progress=progress, on_resumed=on_resumed, checkpoint_steps=args.checkpoint_steps,
            on_checkpoint=partial(save_inside, epoch, started),
        )
        resumed = None
        metrics = evaluate(model, val_loader, ctx.device, args.amp)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        last = dict(epoch=epoch + 1, train_loss=round(stats['train_loss'], 5), top1=round(metrics['top1'], 3),
                    top5=round(metrics['top5'], 3), lr=optimizer.param_groups[0]['lr'], seconds=round(seconds, 3),
                    val_loss=round(metrics['loss'], 5))
        if ema is not None:
            last['ema_top1'] = round(evaluate(ema.module, val_loader, ctx.device, args.amp)['top1'], 3)
        is_best = metrics['top1'] > best_top1
        best_top1 = max(best_top1, metrics['top1'])
        if ctx.is_main:
            bar.write(f'epoch {epoch + 1}/{total_epochs}: loss {last["train_loss"]:.4f}, top-1 {last["top1"]:.2f} %, '
                      f'top-5 {last["top5"]:.2f} %, {seconds:.1f} s')
            if is_best:
                save_model_dir(model, output / 'best', spec, data_config, class_names)
            log.append(last)
        save(epoch + 1, EpochProgress(), 0.)
    bar.close()
    if cos_reg is not None:
        cos_reg.remove()
    summary = dict(
        model=spec['model'], model_kwargs=spec['model_kwargs'], refine=spec['refine'], data=args.data,
        epochs=total_epochs, top1=last.get('top1'), top5=last.get('top5'), best_top1=round(best_top1, 3),
        train_loss=last.get('train_loss'),
        ema_top1=last.get('ema_top1'), params=params, world_size=ctx.world_size, train_seconds=round(train_seconds, 2),
        img_size=data_config['input_size'][-1], batch_size=args.batch_size, lr=lr, seed=args.seed,
        device=str(ctx.device), classes=num_classes, output=str(output),
        bad_images=dict(count=len(bad_images()), files=bad_images()),
    )
    if not ctx.is_main:
        return {}
    write_json(output / 'summary.json', summary)
    log.close()
    return summary
