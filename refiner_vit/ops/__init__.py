"""The refiner's custom ops: each a torch reference, a native CPU kernel behind it, and the rule that picks one.

* :func:`local_conv2d`: the composed linear refiner, a "same" k x k convolution H -> H over attention maps;
* :func:`attention_probs`: ``softmax(scale * q k^T + mask) + alpha * prev``;
* :func:`folded_refiner`: the released refiner with its BatchNorms folded (inference);
* :func:`~.batch_norm.batch_norm_relu`: ``relu(batch_norm(x))`` in training, the conv stem's normalisations.

Each op equals its torch reference to float rounding whichever implementation runs. :mod:`.dispatch` holds the
rule (a kernel runs only where it was measured faster here, ``REFINER_NATIVE_KERNELS`` overrides it), :mod:`.build`
compiles the kernels in ``csrc/``. Layers and models call these functions and know nothing of kernels.
"""
from .dispatch import ENV_MODE, mode_set, recording
from .folded_refiner import folded_refiner
from .local_conv import local_conv2d
from .probs import attention_probs

__all__ = ['ENV_MODE', 'attention_probs', 'folded_refiner', 'local_conv2d', 'mode_set', 'recording']
