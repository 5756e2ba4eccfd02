"""Model families; importing this package registers their entry points with timm."""
from .refined_vit import RefinedVisionTransformer, refine
from .refiner_vit import RefinerVisionTransformer, checkpoint_filter_fn

__all__ = ['RefinedVisionTransformer', 'RefinerVisionTransformer', 'checkpoint_filter_fn', 'refine']
