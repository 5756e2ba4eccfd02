"""Data: datasets and transforms (digits, ImageFolder, token-labeling targets)."""
from .datasets import DataSource, NamedImageFolder, class_folders, open_split, resolve_data
from .digits import DigitsDataset
from .loader import (
    ShardSampler,
    build_eval_transform,
    build_loader,
    build_train_transform,
    dataset_classes,
    reseed_loader,
)

__all__ = [
    'DataSource', 'DigitsDataset', 'NamedImageFolder', 'ShardSampler', 'build_eval_transform', 'build_loader',
    'build_train_transform', 'class_folders', 'dataset_classes', 'open_split', 'reseed_loader', 'resolve_data',
]
