"""Deployment: a model fused for inference, exported as a ``torch.export`` program or an ONNX file.

**Fusing** goes through timm's re-parameterisation walk (``timm.utils.reparameterize_model``): every module that can
be folded says how itself. A refiner's ``fuse()`` returns its folded form (BatchNorms folded into the convolutions, a
linear refiner composed into one convolution); attention layers, blocks and the conv stem ``reparameterize()`` in
place, folding constant factors and BatchNorms into the weights next to them. The fused model computes the same
function (to float rounding) with fewer passes over the attention maps and tokens. It is a deployment artefact: its
state dict differs.

**Export** takes the fused model, so the exported graph holds one convolution per linear refiner and no BatchNorm,
with a dynamic batch. Parity is measured as ``max|out - ref| / max|ref|`` on a batch size different from the one the
graph was traced with, which also checks that the batch is dynamic.
"""
import copy
from pathlib import Path
from typing import Union

import torch
from timm.utils.model import reparameterize_model
from torch import nn

from .errors import ConfigError
from .utils.io import atomic_write

__all__ = ['export_onnx', 'export_program', 'fuse_for_inference', 'onnx_outputs', 'relative_error',
           'save_program']

PathLike = Union[str, Path]


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A fused eval-mode copy of ``model`` (the original is left as it is)."""
    return reparameterize_model(copy.deepcopy(model).eval(), inplace=True)


def _batch_dim(max_batch: int) -> dict:
    return {0: torch.export.Dim('batch', min=1, max=max_batch)}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|``: the worst deviation relative to the output's scale."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def export_program(model: nn.Module, example: torch.Tensor, max_batch: int = 1024) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (in eval mode) with a dynamic batch dimension up to ``max_batch``."""
    if example.shape[0] < 2:
        raise ValueError('trace with a batch of at least 2: torch.export specialises a batch of 1')
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({**_batch_dim(max_batch)},))


def save_program(program: torch.export.ExportedProgram, path: PathLike) -> None:
    """Write an exported program (``.pt2``) atomically."""
    atomic_write(path, lambda f: torch.export.save(program, f))


def export_onnx(model: nn.Module, example: torch.Tensor, path: PathLike, max_batch: int = 1024) -> None:
    """Export ``model`` to an ONNX file with a dynamic batch (torch's dynamo-based exporter), atomically.

    Raises:
        ConfigError: the ``onnx`` package (the ``export`` extra) is not installed; checked before tracing starts.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail with the install hint instead of deep inside)
    except ImportError as e:
        raise ConfigError('ONNX export needs the `export` extra: pip install "refiner-vit[export]"') from e
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, input_names=['images'], output_names=['logits'],
        dynamic_shapes=({**_batch_dim(max_batch)},), verbose=False)
    proto = program.model_proto
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))


def onnx_outputs(path: PathLike, images: torch.Tensor) -> torch.Tensor:
    """Run an exported ONNX file with onnxruntime on CPU; returns its first output as a tensor."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.numpy()})[0])
