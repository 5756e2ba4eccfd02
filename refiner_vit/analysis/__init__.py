"""Attention analysis: raw and refined maps through hooks, their metrics, and pictures of them."""
from .maps import ATTENTION_KINDS, attention_layers, attention_maps, record_attention, token_grid
from .metrics import (
    effective_maps,
    entropy,
    head_similarity,
    layer_similarity,
    layer_stats,
    mean_distance,
    patch_distances,
    rollout,
)

__all__ = [
    'ATTENTION_KINDS',
    'attention_layers',
    'attention_maps',
    'effective_maps',
    'entropy',
    'head_similarity',
    'layer_similarity',
    'layer_stats',
    'mean_distance',
    'patch_distances',
    'record_attention',
    'rollout',
    'token_grid',
]
