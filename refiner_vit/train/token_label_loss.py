"""The token-labeling loss (LV-ViT), aware of MixToken.

``loss = cls_weight * SoftCE(class logits, class target) + dense_weight * SoftCE(aux logits, token targets)``
with the dense term averaged over every token of the batch.

MixToken (done inside ``RefinerVisionTransformer.forward_train``) gives rows ``r1:r2``, cols ``c1:c2`` of
the token grid the patches of the batch-flipped image and flips the aux logits there back, so the aux logits
always line up with the image's own token targets; only the class token saw a mixed image, and its target
becomes ``lam * own + (1 - lam) * flipped`` with ``lam = 1 - box area / grid area``.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

__all__ = ['TokenLabelCriterion', 'mix_token_lam']

ModelOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, Sequence[int]]]


def mix_token_lam(box: Sequence[int], n_tokens: int) -> float:
    """Share of the class token's input that is the image's own: ``1 - (r2 - r1) * (c2 - c1) / n_tokens``."""
    r1, c1, r2, c2 = (int(v) for v in box)
    return 1. - (r2 - r1) * (c2 - c1) / n_tokens


class TokenLabelCriterion(nn.Module):
    """Soft cross-entropy on the class token plus the dense token-label term.

    Targets may be token-label targets ``(B, C, 2 + N)`` (see :mod:`refiner_vit.data.token_labels`: ground
    truth, image-level soft label, N token labels), soft class targets ``(B, C)`` (e.g. timm's Mixup) or class
    indices ``(B,)``; without token labels every token is taught the class target. ``output`` is what
    ``model.forward_train(x)`` returns: ``(cls_logits, aux_logits (B, N, C), box)``, or a plain logits tensor
    for a model without an aux head (then only the class term is used).
    """

    def __init__(
            self,
            dense_weight: float = 0.5,
            cls_weight: float = 1.0,
            smoothing: float = 0.0,
            cls_target: str = 'teacher',
    ):
        """
        Args:
            dense_weight: Weight of the token term (0.5 in the authors' configs).
            cls_weight: Weight of the class-token term.
            smoothing: Label smoothing applied to every target (``t * (1 - s) + s / C``).
            cls_target: With token-label targets, what the class token learns: ``'teacher'`` the image-level
                soft label (LV-ViT's choice) or ``'ground_truth'`` the dataset's label.
        """
        super().__init__()
        if cls_target not in ('teacher', 'ground_truth'):
            raise ValueError(f"cls_target must be 'teacher' or 'ground_truth', got {cls_target!r}")
        if dense_weight < 0 or cls_weight < 0 or dense_weight + cls_weight == 0:
            raise ValueError(f'weights must be >= 0 and not both 0, got dense {dense_weight}, cls {cls_weight}')
        self.dense_weight = dense_weight
        self.cls_weight = cls_weight
        self.smoothing = smoothing
        self.cls_column = 1 if cls_target == 'teacher' else 0
        self.soft_ce = SoftTargetCrossEntropy()

    def _split(self, target: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(class target (B, C), token targets (B, N, C) or None)``, smoothed."""
        if target.ndim == 1:
            target = F.one_hot(target.long(), num_classes).float()
        if target.shape[1] != num_classes:
            raise ValueError(f'target has {target.shape[1]} classes, the logits {num_classes}')
        if target.ndim == 3:
            cls_t, tokens = target[:, :, self.cls_column], target[:, :, 2:].transpose(1, 2)
        else:
            cls_t, tokens = target, None
        if self.smoothing:
            cls_t = cls_t * (1. - self.smoothing) + self.smoothing / num_classes
            tokens = None if tokens is None else tokens * (1. - self.smoothing) + self.smoothing / num_classes
        return cls_t, tokens

    def forward(self, output: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            cls_logits, aux, box = output, None, (0, 0, 0, 0)
        else:
            cls_logits, aux, box = output
        cls_t, tokens = self._split(target, cls_logits.shape[-1])
        own_cls_t = cls_t
        if aux is not None:
            lam = mix_token_lam(box, aux.shape[1])
            if lam < 1.:
                cls_t = lam * cls_t + (1. - lam) * cls_t.flip(0)
        loss = self.cls_weight * self.soft_ce(cls_logits, cls_t)
        if aux is None or self.dense_weight == 0:
            return loss
        if tokens is None:
            tokens = own_cls_t[:, None].expand_as(aux)
        elif tokens.shape != aux.shape:
            raise ValueError(f'token targets {tuple(tokens.shape)} do not match the aux logits {tuple(aux.shape)}: '
                             'was the dataset built with the model\'s token grid?')
        return loss + self.dense_weight * self.soft_ce(aux.flatten(0, 1), tokens.flatten(0, 1))
