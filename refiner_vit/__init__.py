"""refiner-vit: Refiner (Zhou et al., arXiv 2106.03714) for timm.

Importing the package registers the ``refiner_vit_*`` and ``refined_deit_*`` models with timm, so
``timm.create_model('refiner_vit_s_patch16_224')`` works after ``import refiner_vit``.
"""
from .allocator import keep_freed_memory
from .analysis import attention_maps
from .fuse import fuse_for_inference
from .layers import AttentionRefiner, AttentionTap, RefinedAttention
from .models import RefinedVisionTransformer, RefinerVisionTransformer, checkpoint_filter_fn, refine
from .models.convert import convert_official_checkpoint, create_model_from_official

__version__ = '0.1.0'

__all__ = [
    'AttentionRefiner',
    'AttentionTap',
    'RefinedAttention',
    'RefinedVisionTransformer',
    'RefinerVisionTransformer',
    'attention_maps',
    'checkpoint_filter_fn',
    'convert_official_checkpoint',
    'create_model_from_official',
    'fuse_for_inference',
    'keep_freed_memory',
    'refine',
]
