"""Training losses: timm's classification losses and the authors' attention cosine regulariser."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..errors import ConfigError
from ..layers import AttentionTap

__all__ = ['AttentionCosineRegularizer', 'build_criterion']


def build_criterion(mixup_active: bool, smoothing: float, token_labels: bool = False,
                    dense_weight: float = 0.5) -> nn.Module:
    """The training loss: soft targets under Mixup/CutMix (which already smooth), else label smoothing.

    With token labels the LV-ViT loss (class term + ``dense_weight`` x token term) takes every target form.
    """
    if token_labels:
        from .token_label_loss import TokenLabelCriterion
        return TokenLabelCriterion(dense_weight=dense_weight, smoothing=0. if mixup_active else smoothing)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class AttentionCosineRegularizer:
    """``weight`` x mean cosine similarity, over the head axis, of consecutive blocks' attention maps.

    The authors' regulariser against attention collapse (``cos_reg_component`` in their configs): for the
    first ``num_pairs`` pairs of consecutive attention layers, the cosine similarity between the two
    ``(B, H, N, N)`` maps is taken along the head axis, averaged over batch, queries and keys, summed over the
    pairs and divided by ``num_pairs``. Maps are observed through the ``tap`` of every attention module
    (forward hooks; the models are unchanged) and only while the module is training. The map of a layer is
    what its tap shows: the refined map where the layer refines, else the layer's own softmax map. In
    Refiner-ViT's computing blocks after the first, that softmax is taken before the previous block's map is
    added, so it is not the map those blocks multiply with V (the sum). (The authors' code compared the maps each
    block hands on, so a computing block and the sharing block after it contributed a constant; here every pair
    carries a gradient.)
    """

    def __init__(self, model: nn.Module, num_pairs: int, weight: float = 0.1) -> None:
        taps = [m for m in model.modules() if isinstance(m, AttentionTap)]
        if len(taps) < num_pairs + 1:
            raise ConfigError(f'--cos-reg {num_pairs} needs {num_pairs + 1} attention layers with a tap; the model '
                             f'has {len(taps)} (Refiner-ViT models and --refine models have one per block)')
        self.num_pairs = num_pairs
        self.weight = weight
        self.maps: List[torch.Tensor] = []
        self.handles = [tap.register_forward_hook(self._record) for tap in taps[:num_pairs + 1]]

    def _record(self, module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            raw, refined = args
            self.maps.append(refined if refined is not None else raw)

    def reset(self) -> None:
        """Forget maps of a previous forward (call before each training forward)."""
        self.maps = []

    def loss(self) -> Optional[torch.Tensor]:
        """The regulariser over the maps recorded since :meth:`reset`; None if none were recorded."""
        maps, self.maps = self.maps, []
        if len(maps) < 2:
            return None
        pairs = list(zip(maps[:-1], maps[1:]))[:self.num_pairs]
        total = sum(F.cosine_similarity(a.float(), b.float(), dim=1).mean() for a, b in pairs)
        return self.weight * total / self.num_pairs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
