"""Model families, and where the package meets timm: importing this package registers the models' entry points
with timm, and makes the refiner's ops and modules leaves of timm's FX graphs (so that traced models, feature
extractors among them, run them as eager mode does). The packages below this one (``layers``, ``ops``) do not
import timm when they load, so that the registration hook of ``refiner_vit/__init__.py`` never meets them half
imported."""
from timm.layers import register_notrace_function, register_notrace_module

from ..layers import AttentionMap, AttentionRefiner, FoldedRefiner
from ..ops import attention_probs, folded_refiner, local_conv2d
from .refined_deit import RefinedVisionTransformer, refine
from .refiner_vit import RefinerVisionTransformer, checkpoint_filter_fn
from .resolve import ResolvedModel, resolve_model

for _function in (attention_probs, folded_refiner, local_conv2d):
    register_notrace_function(_function)
for _module in (AttentionMap, AttentionRefiner, FoldedRefiner):
    register_notrace_module(_module)

__all__ = [
    'RefinedVisionTransformer', 'RefinerVisionTransformer', 'ResolvedModel',
    'checkpoint_filter_fn', 'refine', 'resolve_model',
]
