"""Token labeling (LV-ViT, Jiang et al. 2021): relabel maps, crop-aware dense targets, and mixing them.

The authors' best Refiner-ViT models are trained with LV-ViT's token labeling: besides the class token,
every patch token is supervised by a soft label that a teacher predicted for that region of the image.

**Relabel map** (LV-ViT's format): one ``torch.save`` file per training image holding a tensor
``[2, K, H, W]`` (K = 5 normally): ``[0]`` the teacher's top-K *logits* and ``[1]`` their class indices
(stored as floats), at every location of the teacher's dense ``H x W`` output over the *whole* image. For
an ImageFolder the file mirrors the image's path relative to the folder: ``<class>/<stem>.jpg`` ->
``label_dir/<class>/<stem>.pt`` (as LV-ViT's published ImageNet maps). ``refiner relabel`` writes them.

**Crop-aware targets.** The random-resized crop must be the last geometric transform so the label map can
follow the image: :class:`RecordingTransform` mirrors the image (recorded), crops it (box recorded), and
then applies only photometric transforms. The map is mirrored too, turned into per-location teacher
probabilities (softmax over its top-K, zero elsewhere), and the crop box is pooled onto the model's
``rows x cols`` token grid with ``torchvision.ops.roi_align``. Pooling probabilities (not logits, as LV-ViT
does) makes every token label an average of the teacher's predictions over its region: a distribution
that does not depend on the teacher's logit offset. RandAugment's geometric ops (rotate, shear,
translate) are removed because the map cannot follow them.

**Target** per training image: a ``(num_classes, 2 + rows * cols)`` float tensor whose columns are
``[0]`` the one-hot ground truth, ``[1]`` the image-level soft label = the mean of the token labels (the
teacher's average prediction over the crop), ``[2:]`` one soft label per token in row-major order (the
order of a ViT's patch tokens). Every column sums to 1.
"""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import ImageDataset, Mixup
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train
from timm.layers import to_2tuple
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from ..errors import ConfigError, DataError
from ..utils.io import PathLike, atomic_torch_save, load_torch_file

__all__ = [
    'MAP_SUFFIX', 'TOP_K', 'CropRecord', 'RecordingTransform', 'TokenLabelDataset', 'TokenLabelMixup',
    'build_target', 'build_token_label_dataset', 'build_token_label_transform', 'label_map_path', 'load_label_map',
    'open_image_folder', 'pack_label_map', 'save_label_map', 'token_soft_labels',
]

MAP_SUFFIX = '.pt'
TOP_K = 5
# RandAugment ops that move pixels: the label map cannot follow them, so they are left out.
GEOMETRIC_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel'})
# float16 holds every integer up to 2048 exactly; larger class indices need float32.
_HALF_MAX_INDEX = 2048

GridSize = Union[int, Tuple[int, int]]


# ----------------------------------------------------------------------------------------------- map files
def label_map_path(label_dir: PathLike, image_relpath: PathLike) -> Path:
    """Where the map of the image at ``image_relpath`` (relative to its ImageFolder root) lives."""
    return Path(label_dir) / Path(image_relpath).with_suffix(MAP_SUFFIX)


def pack_label_map(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Dense teacher logits ``(C, H, W)`` -> the ``[2, min(k, C), H, W]`` top-k map (values, indices)."""
    values, indices = logits.float().topk(min(k, logits.shape[0]), dim=0)
    dtype = torch.float16 if logits.shape[0] <= _HALF_MAX_INDEX else torch.float32
    return torch.stack([values, indices.float()]).to(dtype)


def save_label_map(label_map: torch.Tensor, path: PathLike) -> None:
    """Write one packed map atomically (a plain tensor: loadable with ``weights_only``, as LV-ViT's files)."""
    atomic_torch_save(label_map.contiguous().cpu(), path)


def load_label_map(path: PathLike, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read and validate a map; returns ``(logits (K, H, W) float32, classes (K, H, W) int64)``.

    Raises:
        WeightsError: the file is missing or not a safe torch file (:func:`~refiner_vit.utils.io.load_torch_file`).
        DataError: it holds no ``[2, K, H, W]`` tensor, or classes outside ``0..num_classes - 1``.
    """
    data = load_torch_file(path)
    if not isinstance(data, torch.Tensor) or data.ndim != 4 or data.shape[0] != 2 or data.shape[1] < 1:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise DataError(f'{path}: not a relabel map: expected a tensor [2, K, H, W] (top-K logits, classes), '
                         f'got {got}')
    classes = data[1].round().long()
    if classes.min() < 0 or classes.max() >= num_classes:
        raise DataError(
            f'{path}: class index {int(classes.max())} outside 0..{num_classes - 1}: the map was made by a teacher '
            f'with other classes than the {num_classes} being trained'
        )
    return data[0].float(), classes


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class CropRecord:
    """What the geometric transforms did: the crop box (timm's ``(i, j, h, w)`` = top, left, height, width,
    in pixels of the source image, after the mirror), the source size, and whether the image was mirrored."""
    top: int
    left: int
    height: int
    width: int
    image_height: int
    image_width: int
    flipped: bool = False

    def map_box(self, map_height: int, map_width: int) -> Tuple[float, float, float, float]:
        """The crop in label-map cell units, in ``roi_align``'s order ``(x1, y1, x2, y2)`` (x = column)."""
        sx, sy = map_width / self.image_width, map_height / self.image_height
        return self.left * sx, self.top * sy, (self.left + self.width) * sx, (self.top + self.height) * sy


def token_soft_labels(
        logits: torch.Tensor,
        classes: torch.Tensor,
        record: CropRecord,
        grid_size: GridSize,
        num_classes: int,
) -> torch.Tensor:
    """Soft labels ``(num_classes, rows * cols)`` of the tokens of a crop, from a ``(K, H, W)`` top-K map."""
    rows, cols = to_2tuple(grid_size)
    probs = logits.softmax(dim=0)
    if record.flipped:
        probs, classes = probs.flip(-1), classes.flip(-1)
    # Pool only the classes the map mentions: a few dozen channels instead of num_classes.
    used, slot = classes.unique(return_inverse=True)
    dense = probs.new_zeros((len(used),) + probs.shape[1:]).scatter_add_(0, slot, probs)
    box = torch.tensor([[0., *record.map_box(*probs.shape[1:])]], dtype=probs.dtype)
    pooled = roi_align(dense[None], box, output_size=(rows, cols), aligned=True)[0]
    out = probs.new_zeros(num_classes, rows * cols)
    out[used] = pooled.flatten(1)
    return out


def build_target(label: int, tokens: torch.Tensor) -> torch.Tensor:
    """``[one-hot label | mean token label | token labels]``: the ``(num_classes, 2 + N)`` training target."""
    truth = F.one_hot(torch.tensor(label), tokens.shape[0]).to(tokens.dtype)
    return torch.cat([truth[:, None], tokens.mean(dim=1, keepdim=True), tokens], dim=1)


# --------------------------------------------------------------------------------------------- transforms
class RecordingTransform:
    """Mirror -> random-resized crop (the last geometric transform) -> photometric ops -> tensor.

    Returns ``(image, CropRecord)`` so the label map can be cut exactly like the image.
    """

    def __init__(
            self,
            crop: RandomResizedCropAndInterpolation,
            hflip: float,
            photometric: Callable,
            final: Callable,
    ):
        self.crop = crop
        self.hflip = hflip
        self.photometric = photometric
        self.final = final

    def __call__(self, img) -> Tuple[torch.Tensor, CropRecord]:
        width, height = TF.get_image_size(img)
        flipped = bool(torch.rand(1).item() < self.hflip)
        if flipped:
            img = TF.hflip(img)
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        img = TF.resized_crop(img, top, left, h, w, list(self.crop.size), interpolation)
        return self.final(self.photometric(img)), CropRecord(top, left, h, w, height, width, flipped)


def _without_geometric_ops(photometric: Callable, auto_augment: Optional[str]) -> Callable:
    """Drop the pixel-moving ops from timm's RandAugment; refuse other auto-augment policies."""
    for t in getattr(photometric, 'transforms', ()):
        if isinstance(t, RandAugment):
            keep = [i for i, op in enumerate(t.ops) if op.name not in GEOMETRIC_OPS]
            if t.choice_weights is not None:
                weights = t.choice_weights[keep]
                t.choice_weights = weights / weights.sum()
            t.ops = [t.ops[i] for i in keep]
        elif isinstance(t, (AutoAugment, AugMixAugment)):
            raise ConfigError(
                f'auto-augment {auto_augment!r}: only RandAugment (rand-...) works with token labels (its '
                'geometric ops are dropped so the label map stays aligned)'
            )
    return photometric


def build_token_label_transform(
        img_size: GridSize,
        *,
        scale: Optional[Sequence[float]] = None,
        ratio: Optional[Sequence[float]] = None,
        hflip: float = 0.5,
        color_jitter: Optional[float] = 0.4,
        auto_augment: Optional[str] = None,
        interpolation: str = 'random',
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        re_prob: float = 0.,
        re_mode: str = 'const',
        re_count: int = 1,
) -> RecordingTransform:
    """timm's train transforms, re-ordered for token labeling (see :class:`RecordingTransform`)."""
    primary, photometric, final = transforms_imagenet_train(
        img_size, scale=scale, ratio=ratio, hflip=0., color_jitter=color_jitter, auto_augment=auto_augment,
        interpolation=interpolation, mean=tuple(mean), std=tuple(std), re_prob=re_prob, re_mode=re_mode,
        re_count=re_count, separate=True,
    )
    crop = primary.transforms[0]
    return RecordingTransform(crop, hflip, _without_geometric_ops(photometric, auto_augment), final)


# ----------------------------------------------------------------------------------------------- datasets
def open_image_folder(root: PathLike, transform: Optional[Callable] = None) -> ImageDataset:
    """timm's ImageFolder reader, with a clear error for a missing or empty folder."""
    if not Path(root).is_dir():
        raise DataError(f'{root}: no such image folder')
    try:
        return ImageDataset(str(root), transform=transform)
    except RuntimeError as e:
        raise DataError(f'{root}: {e}') from e


class TokenLabelDataset(Dataset):
    """ImageFolder items ``(image, target)`` with the ``(num_classes, 2 + rows * cols)`` token-label target."""

    def __init__(
            self,
            root: PathLike,
            label_dir: PathLike,
            transform: RecordingTransform,
            grid_size: GridSize,
            num_classes: int,
    ):
        self.images = open_image_folder(root)
        self.transform = transform
        self.grid_size = to_2tuple(grid_size)
        self.num_classes = num_classes
        self.map_paths = [label_map_path(label_dir, self.images.filename(i)) for i in range(len(self.images))]
        self._check(root, label_dir)

    def _check(self, root: PathLike, label_dir: PathLike) -> None:
        """Fail before training starts, naming what is missing (not hours later, in a loader worker)."""
        hint = f'generate them with: refiner relabel --teacher MODEL --data {root} --output {label_dir}'
        if not Path(label_dir).is_dir():
            raise DataError(f'token labels requested but the label folder {label_dir} does not exist; {hint}')
        missing = [p for p in self.map_paths if not p.is_file()]
        if missing:
            raise DataError(
                f'token labels requested but {len(missing)} of {len(self.map_paths)} label maps are missing '
                f'(first: {missing[0]}); {hint}'
            )
        targets = [t for _, t in self.images.reader.samples]
        if max(targets) >= self.num_classes:
            raise DataError(f'{root}: {max(targets) + 1} classes but the model has {self.num_classes}')

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img, label = self.images[index]
        image, record = self.transform(img)
        logits, classes = load_label_map(self.map_paths[index], self.num_classes)
        tokens = token_soft_labels(logits, classes, record, self.grid_size, self.num_classes)
        return image, build_target(label, tokens)


def build_token_label_dataset(
        root: PathLike,
        label_dir: Optional[PathLike],
        img_size: GridSize,
        grid_size: GridSize,
        num_classes: int,
        is_training: bool,
        *,
        crop_pct: Optional[float] = None,
        **aug,
) -> Dataset:
    """The token-labeling dataset of an ImageFolder ``root`` (class subfolders).

    Training items are ``(image, target)`` with the ``(num_classes, 2 + S*S)`` target of the module
    docstring; evaluation items are ``(image, class_index)`` (timm's eval transform with ``crop_pct``;
    ``label_dir`` is not read). ``aug`` are :func:`build_token_label_transform`'s keywords (``scale, ratio, hflip,
    color_jitter, auto_augment, interpolation, mean, std, re_prob, re_mode, re_count``).

    Raises:
        DataError: the folder, the label folder or any of the maps is missing.
        ConfigError: an auto-augment policy other than RandAugment (the label map cannot follow it).
    """
    if not is_training:
        keep = {k: tuple(v) for k, v in aug.items() if k in ('mean', 'std')}
        interpolation = aug.get('interpolation', 'bilinear')
        transform = transforms_imagenet_eval(
            img_size, crop_pct=crop_pct, interpolation='bilinear' if interpolation == 'random' else interpolation,
            **keep,
        )
        return open_image_folder(root, transform)
    if label_dir is None:
        raise DataError('token labels requested but no label folder given (refiner relabel writes one)')
    return TokenLabelDataset(root, label_dir, build_token_label_transform(img_size, **aug), grid_size, num_classes)


# --------------------------------------------------------------------------------------------------- mixing
def _box_coverage(box: Tuple[int, int, int, int], image_size: Tuple[int, int], grid_size: GridSize) -> torch.Tensor:
    """Fraction of each token's patch inside the pixel box ``(y1, x1, y2, x2)``, row-major ``(rows * cols,)``."""
    rows, cols = to_2tuple(grid_size)

    def overlap(lo: int, hi: int, length: int, cells: int) -> torch.Tensor:
        edges = torch.linspace(0, length, cells + 1, dtype=torch.float64)
        inside = (edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp(min=0)
        return inside / (edges[1:] - edges[:-1])

    y1, x1, y2, x2 = box
    return torch.outer(overlap(y1, y2, image_size[0], rows), overlap(x1, x2, image_size[1], cols)).flatten()


class TokenLabelMixup(Mixup):
    """Mixup / CutMix (timm's batch mode) for token-label targets ``(B, num_classes, 2 + rows * cols)``.

    Images are mixed with the batch flipped, as timm's ``Mixup``. For mixup every column of the target is
    ``lam * own + (1 - lam) * flipped``. For CutMix each token label is mixed by the fraction of its patch
    that the box covers, the ground truth by ``lam`` (1 - box area / image area), and the image-level label
    is recomputed as the mean of the mixed token labels. Label smoothing belongs to the criterion.
    """

    def __init__(
            self,
            grid_size: GridSize,
            mixup_alpha: float = 0.8,
            cutmix_alpha: float = 1.0,
            cutmix_minmax: Optional[Sequence[float]] = None,
            prob: float = 1.0,
            switch_prob: float = 0.5,
            correct_lam: bool = True,
    ):
        super().__init__(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
            switch_prob=switch_prob, mode='batch', correct_lam=correct_lam, label_smoothing=0.,
        )
        self.grid_size = to_2tuple(grid_size)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n_tokens = self.grid_size[0] * self.grid_size[1]
        if target.ndim != 3 or target.shape[-1] != 2 + n_tokens:
            raise ValueError(f'expected token-label targets (B, C, {2 + n_tokens}), got {tuple(target.shape)}')
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.:
            return x, target
        if use_cutmix:
            (y1, y2, x1, x2), lam = cutmix_bbox_and_lam(
                x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
            x[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]
            cover = _box_coverage((y1, x1, y2, x2), x.shape[-2:], self.grid_size).to(target.dtype)
        else:
            flipped = x.flip(0).mul_(1. - lam)
            x.mul_(lam).add_(flipped)
            cover = target.new_full((n_tokens,), 1. - lam)
        other = target.flip(0)
        mixed = torch.empty_like(target)
        mixed[:, :, 0] = lam * target[:, :, 0] + (1. - lam) * other[:, :, 0]
        mixed[:, :, 2:] = (1. - cover) * target[:, :, 2:] + cover * other[:, :, 2:]
        mixed[:, :, 1] = mixed[:, :, 2:].mean(dim=-1)
        return x, mixed
