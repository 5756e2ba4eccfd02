"""Transforms and loaders: timm's transforms, sharded sampling that can resume, reproducible workers.

Shuffling and every random augmentation are functions of ``(seed, epoch, rank)`` only: the sampler order
comes from :class:`~torch.utils.data.DistributedSampler` (also used with one process) and the loader's
generator is reseeded every epoch (:func:`reseed_loader`), which fixes the per-worker seeds. A run resumed
at an epoch boundary therefore draws exactly the batches of an uninterrupted run.
"""
import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.queues
import multiprocessing.reduction
import signal
import sys
from contextlib import contextmanager
from multiprocessing import resource_sharer
from types import TracebackType
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Set

import torch
import torch.multiprocessing.reductions
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, default_collate

from ..errors import DataError, LoaderWorkerError
from .datasets import BadImage

__all__ = ['HAND_OVER_GRACE_S', 'RecordingLoader', 'ShardSampler', 'batches', 'build_eval_transform', 'build_loader',
           'build_train_transform', 'collate_skipping', 'dataset_classes', 'ignore_preemption_signals', 'init_worker',
           'kill_workers_left_at_exit', 'loader_worker_faults', 'quiet_broken_handle_transfers', 'reseed_loader']


def build_train_transform(data_config: Dict[str, Any], args: Any):
    """timm's training transform (random-resized crop, flips, RandAugment, colour jitter, random erasing)."""
    return create_transform(
        data_config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
    )


def build_eval_transform(data_config: Dict[str, Any]):
    """timm's evaluation transform: resize to ``input_size / crop_pct``, centre crop, normalise."""
    return create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
    )


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding (exact metrics under DDP)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkippedFiles(NamedTuple):
    """A batch that lost items to unreadable files: the rest (``None`` if nothing is left) and those files."""

    batch: Any
    files: List[str]


def collate_skipping(items: List[Any]) -> Any:
    """``default_collate``, except that :class:`BadImage` items are left out and named (in the worker)."""
    bad = [item.path for item in items if isinstance(item, BadImage)]
    if not bad:
        return default_collate(items)
    good = [item for item in items if not isinstance(item, BadImage)]
    return SkippedFiles(default_collate(good) if good else None, bad)


def ignore_preemption_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGUSR1: a scheduler that signals the whole process group preempts the
    training process (refiner_vit/train/preemption.py), which saves at the next step and then stops its workers;
    a worker dying on the signal first would turn a clean stop into a failed batch."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def quiet_broken_handle_transfers() -> None:
    """In a loader worker, leave out the report of a batch hand-over that broke off.

    A worker hands each batch's shared memory to the main process through multiprocessing's resource sharer, whose
    background thread prints a traceback when a connection breaks during the handshake, as it does when the main
    process stops receiving because another worker died. The run already ends with one line naming that death
    (:func:`loader_worker_faults`); the traceback would bury it. Any other error still reaches the previous hook.
    """
    # the sharer's private serving loop: the one frame whose errors are dropped
    serve = getattr(getattr(resource_sharer, '_ResourceSharer', None), '_serve', None)
    previous = sys.excepthook

    def hook(exc_type: type, exc: BaseException, tb: Optional[TracebackType]) -> None:
        if serve is None or tb is None or tb.tb_frame.f_code is not serve.__code__:
            previous(exc_type, exc, tb)

    sys.excepthook = hook


def init_worker(worker_id: int) -> None:
    """Every loader worker's ``worker_init_fn``: signals ignored, broken hand-overs left unreported (see both)."""
    ignore_preemption_signals(worker_id)
    quiet_broken_handle_transfers()


def kill_workers_left_at_exit() -> None:
    """Kill the daemonic children (loader workers) still running when the interpreter exits.

    At exit, multiprocessing stops daemonic children with SIGTERM and then joins them without a timeout. Workers that
    ignore SIGTERM (:func:`ignore_preemption_signals`) and whose loader never shut them down, as when a run ends on
    another worker's death, would keep that join, and so the process, waiting forever. Registered with ``atexit``
    after multiprocessing's own exit hook, so it runs first. DataLoader's SIGCHLD handler is reset first: these deaths
    are the exit's, not a failure to report.
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join(timeout=5)


class RecordingLoader(DataLoader):
    """A DataLoader that collects the files its dataset skipped as unreadable (``bad_images``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, collate_fn=collate_skipping, worker_init_fn=init_worker, **kwargs)
        self.bad_images: Set[str] = set()
        if self.num_workers:
            atexit.unregister(kill_workers_left_at_exit)  # registered once, after multiprocessing's hook
            atexit.register(kill_workers_left_at_exit)


def build_loader(
        dataset: Dataset,
        batch_size: int,
        is_training: bool,
        workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
) -> RecordingLoader:
    """A loader over this process's shard: shuffled (per epoch, see :func:`reseed_loader`) when training.

    Raises:
        DataError: a streaming dataset, or a training set smaller than one batch per process.
    """
    if isinstance(dataset, IterableDataset):
        raise DataError(f'{type(dataset).__name__} is a streaming dataset; train/eval need a map-style dataset')
    if is_training:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        if len(dataset) // world_size < batch_size:
            raise DataError(f'the training set has {len(dataset)} images, fewer than one batch per process '
                             f'(--batch-size {batch_size} x {world_size} processes)')
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return RecordingLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=is_training,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
    )


def reseed_loader(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s order and worker seeds depend on ``(seed, epoch)`` only."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)


def dataset_classes(dataset: Dataset) -> Optional[List[str]]:
    """Class names of a torchvision / timm dataset when it knows them."""
    classes = getattr(dataset, 'classes', None)
    if classes is None:
        reader = getattr(dataset, 'reader', None)
        class_to_idx = getattr(reader, 'class_to_idx', None)
        if class_to_idx:
            classes = sorted(class_to_idx, key=class_to_idx.get)
    return [str(c) for c in classes] if classes else None


# How long a broken batch hand-over waits for a worker to be seen dead (see _received); a killed worker's pipes
# close as it exits, so its death is visible within milliseconds; this only bounds the wait for other errors.
HAND_OVER_GRACE_S = 5.0

# The errors of a hand-over whose sending worker is gone: its resource sharer's socket reset or refused, the
# connection closed mid-message, its shared-memory file unlinked (torch's 'file_system' sharing strategy).
_HAND_OVER_ERRORS = (ConnectionError, EOFError, FileNotFoundError)

# The code a batch passes through from a worker's queue into the main process: the queue's unpickling, torch's
# rebuilding of shared storages and multiprocessing's transfer of their file descriptors.
_HAND_OVER_FILES = frozenset(module.__file__ for module in (
    multiprocessing.queues, multiprocessing.reduction, multiprocessing.connection, resource_sharer,
    torch.multiprocessing.reductions))


def _from_hand_over(error: BaseException) -> bool:
    """Whether ``error`` was raised while receiving a batch (a frame of the hand-over code in its traceback)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in _HAND_OVER_FILES:
            return True
        tb = tb.tb_next
    return False


def _worker_died(detail: str) -> LoaderWorkerError:
    """The one line for a dead loader worker, ``detail`` naming it."""
    return LoaderWorkerError(f'a data-loader worker died: {detail} (out of memory? try fewer --workers); the last '
                             'checkpoint is intact: rerun with --resume auto')


def _dead_workers(iterator: Any) -> List[multiprocessing.Process]:
    """The workers of a multi-process DataLoader ``iterator`` that have exited with a failure, waiting up to
    :data:`HAND_OVER_GRACE_S` for one to exit: a hand-over can break before the worker it came from is gone."""
    workers = list(getattr(iterator, '_workers', ()))  # only multi-process iterators have workers
    if not workers:
        return []
    ready = set(multiprocessing.connection.wait([w.sentinel for w in workers], timeout=HAND_OVER_GRACE_S))
    dead = [w for w in workers if w.sentinel in ready]
    for worker in dead:
        worker.join(timeout=HAND_OVER_GRACE_S)  # its pipes are closed; this reaps it and sets its exit code
    return [w for w in dead if w.exitcode not in (None, 0)]


def _exit_status(exitcode: int) -> str:
    """'was killed by SIGKILL' for a negative multiprocessing exit code, 'exited with code N' otherwise."""
    if exitcode < 0:
        try:
            return f'was killed by {signal.Signals(-exitcode).name}'
        except ValueError:
            return f'was killed by signal {-exitcode}'
    return f'exited with code {exitcode}'


def _received(loader: DataLoader) -> Iterator[Any]:
    """``loader``'s batches, with a batch hand-over broken by a worker's death raised as :class:`LoaderWorkerError`.

    A worker passes each batch's tensors as shared memory whose file descriptors the main process fetches from
    that worker's resource sharer while it unpickles the batch. A worker killed during that exchange makes it
    fail with ``ConnectionResetError`` (or refused, or EOF), and DataLoader reports such an error as the worker's
    death only if that worker has already been reaped, which it often has not. Here the error counts as a
    worker's death only if it came from the hand-over and a worker is then found dead (within
    :data:`HAND_OVER_GRACE_S`); any other error goes on unchanged.
    """
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except _HAND_OVER_ERRORS as e:
            dead = _dead_workers(iterator) if _from_hand_over(e) else []
            if not dead:
                raise
            died = '; '.join(f'DataLoader worker (pid {w.pid}) {_exit_status(w.exitcode)}' for w in dead)
            raise _worker_died(f'{died} during a batch hand-over ({type(e).__name__})') from e
        yield batch


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; a :class:`~refiner_vit.errors.DataError` raised in a worker (an unreadable image) comes
    out as the worker's one-line message, not wrapped in the worker's traceback as DataLoader re-raises it. Files a
    :class:`RecordingLoader` skipped are added to its ``bad_images``; a batch left empty is not yielded.

    Raises:
        LoaderWorkerError: a worker process died (killed, out of memory), also during a batch hand-over
            (:func:`_received`), in one line.
    """
    marker = f'{DataError.__module__}.{DataError.__name__}: '
    try:
        with loader_worker_faults():
            for batch in _received(loader):
                if isinstance(batch, SkippedFiles):
                    loader.bad_images.update(batch.files)
                    if batch.batch is None:
                        continue
                    batch = batch.batch
                yield batch
    except DataError as e:  # DataLoader re-raises a worker's error as its type, with the worker's traceback
        message = str(e)
        if marker not in message:
            raise
        raise DataError(message.rsplit(marker, 1)[1].strip()) from e


@contextmanager
def loader_worker_faults() -> Iterator[None]:
    """Turn DataLoader's error for a dead worker into one :class:`LoaderWorkerError` line. DataLoader raises it
    from the next batch request or from its SIGCHLD handler, i.e. anywhere in the main thread (a training step
    too), so the training wraps its whole run in this as well as :func:`batches` does."""
    try:
        yield
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), '')
        if isinstance(e, LoaderWorkerError) or not first.startswith('DataLoader worker'):
            raise
        raise _worker_died(first) from e
