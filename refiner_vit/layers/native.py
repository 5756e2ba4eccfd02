"""When a native kernel of :mod:`refiner_vit.kernels` may stand in for torch's operators.

The kernels compute in fp32 on the CPU. Torch's operators run instead on other devices and dtypes, under autocast,
while the model is exported or jit-traced, under dispatch modes and inside torch.func transforms. One check serves
every kernel, so that all of them step aside in the same places.
"""
import torch
from torch import nn
from torch.utils import _python_dispatch

__all__ = ['native_applicable', 'native_inference_applicable']


def _exporting() -> bool:
    """True while torch.export (or, on torch versions that cannot tell, any compiler) or jit tracing records the
    model: exported programs must hold standard operators."""
    if torch.jit.is_tracing():
        return True
    if not torch.compiler.is_compiling():
        return False
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return is_exporting is None or is_exporting()


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:  # torch < 2.4 spells it differently
        return torch.is_autocast_cpu_enabled()


def native_applicable(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may stand in for torch's operators on these tensors here and now.

    fp32 CPU tensors outside autocast (whose operators would compute in another dtype), not while the model is
    exported or jit-traced. In eager mode the tensors must be plain (no subclass, FX proxy, fake tensor or
    torch.func wrapper) and no dispatch mode may be active; under ``torch.compile`` the kernels run as opaque
    operators.
    """
    if any(t.device.type != 'cpu' or t.dtype != torch.float32 for t in tensors) or _exporting() or _autocast_cpu():
        return False
    if torch.compiler.is_compiling():
        return True
    return (all(type(t) in (torch.Tensor, nn.Parameter) and not _functorch_wrapped(t) for t in tensors)
            and _python_dispatch._get_current_dispatch_mode() is None)


def native_inference_applicable(*tensors: torch.Tensor) -> bool:
    """:func:`native_applicable` for the inference-only kernels, which have no autograd formula: no graph wanted."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return native_applicable(*tensors)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """True inside torch.func transforms (vmap, grad, ...), which the operators have no rules for."""
    is_wrapped = getattr(torch._C._functorch, 'is_functorch_wrapped_tensor', None)
    return is_wrapped is not None and is_wrapped(t)
