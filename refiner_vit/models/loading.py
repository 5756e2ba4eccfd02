"""``fit_for_finetuning``, the name :mod:`refiner_vit.train.model_builder` imports; the weights pipeline itself is
:mod:`refiner_vit.models.weights` (this module goes once the trainer imports it from there)."""
from functools import partial

from .weights import fit

__all__ = ['fit_for_finetuning']

fit_for_finetuning = partial(fit, mode='finetune')
