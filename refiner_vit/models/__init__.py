"""Model families; importing this package registers their entry points with timm."""
from .conv_stem_vit import ConvStemPatchEmbed
from .refined_vit import RefinedVisionTransformer, refine
from .refiner_vit import RefinerVisionTransformer, checkpoint_filter_fn
from .resolve import ResolvedModel, resolve_model

__all__ = [
    'ConvStemPatchEmbed', 'RefinedVisionTransformer', 'RefinerVisionTransformer', 'ResolvedModel',
    'checkpoint_filter_fn', 'refine', 'resolve_model',
]
