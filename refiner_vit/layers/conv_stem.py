"""Refiner-ViT's convolutional stem, on its own and behind timm's ``PatchEmbed`` interface.

:class:`ConvStem` is the stem of Refiner-ViT (three conv-BN-ReLU layers, the first with stride 2, then a patch
projection conv). :class:`ConvStemPatchEmbed` is the same module as timm's ``VisionTransformer`` builds its
``embed_layer``, so any timm ViT can take the stem: ``VisionTransformer(embed_layer=ConvStemPatchEmbed, ...)``.

timm is imported only where a method needs it, as everywhere in ``layers`` (see ``refiner_vit.models``).
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..ops.batch_norm import batch_norm_relu

__all__ = ['ConvStem', 'ConvStemPatchEmbed']


def _pair(value: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@torch.fx.wrap
def _channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last in memory on the CPU, where oneDNN runs the stem's convolutions, and their backward, faster
    in that layout (docs/performance.md); as it is elsewhere. A leaf of FX graphs, which cannot branch on a device."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == 'cpu' else x


@torch.fx.wrap
def _project_patches(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The patch projection, a convolution whose stride is its kernel: on the CPU one matmul over the patches, whose
    backward is two matmuls (oneDNN's backward of that convolution ran at a third of the GEMM peak: Refiner-ViT-S's
    took 666 ms, the matmuls 437 ms, batch 16; docs/performance.md); elsewhere the convolution. A leaf of FX graphs."""
    size = weight.shape[-1]
    if x.device.type != 'cpu':
        return F.conv2d(x, weight, bias, stride=size)
    batch, channels, height, width = x.shape
    rows, cols = height // size, width // size
    patches = x[:, :, :rows * size, :cols * size].permute(0, 2, 3, 1)  # (B, H, W, C): a view of channels-last maps
    patches = patches.reshape(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch * rows * cols, size * size * channels)
    flat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # the same (row, column, channel) order
    out = patches @ flat.t() if bias is None else torch.addmm(bias, patches, flat.t())
    return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Three conv-BN-ReLU layers (the first with stride 2), then a patch projection conv.

    The total stride is ``patch_size``: 2 from the stem and ``patch_size // 2`` from the projection.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 384,
            stem_chs: Tuple[int, int, int] = (32, 64, 128),
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f'patch_size must be even and >= 2 (the stem has stride 2), got {patch_size}')
        c1, c2, c3 = stem_chs
        self.patch_size = patch_size
        self.img_size = _pair(img_size)
        self.conv1 = nn.Conv2d(in_chans, c1, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(c1, **dd)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(c2, **dd)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(c3, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(c3, embed_dim, patch_size // 2, stride=patch_size // 2, **dd)

    def feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid (rows, cols) for an input of ``img_size`` (H, W)."""
        return tuple((math.ceil(s / 2)) // (self.patch_size // 2) for s in img_size)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return self.feat_size(self.img_size)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the (eval-mode) BatchNorms into the convolutions, for timm's ``reparameterize_model``."""
        for i in (1, 2, 3):
            norm = getattr(self, f'bn{i}')
            if isinstance(norm, nn.BatchNorm2d):
                setattr(self, f'conv{i}', fuse_conv_bn_eval(getattr(self, f'conv{i}'), norm))
                setattr(self, f'bn{i}', nn.Identity())
        # channels-last weights make oneDNN run the stem channels-last (an NCHW input is converted once): faster
        self.to(memory_format=torch.channels_last)

    def _norm_relu(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``relu(norm(x))``: in training on the CPU one op of four passes where that was measured faster
        (:func:`~refiner_vit.ops.batch_norm.batch_norm_relu`); an FX trace records the two modules."""
        if isinstance(x, torch.fx.Proxy):
            return self.relu(norm(x))
        return batch_norm_relu(x, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the token grid as ``(B, embed_dim, rows, cols)`` (channels-last in memory on the CPU)."""
        x = self._norm_relu(self.bn1, self.conv1(_channels_last_on_cpu(x)))
        x = self._norm_relu(self.bn2, self.conv2(x))
        x = self._norm_relu(self.bn3, self.conv3(x))
        return _project_patches(x, self.proj.weight, self.proj.bias)


class ConvStemPatchEmbed(ConvStem):
    """:class:`ConvStem` behind timm's ``PatchEmbed`` interface.

    timm's ViT builds its ``embed_layer`` with ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``bias``
    and ``dynamic_img_pad`` (plus ``strict_img_size=False, output_fmt='NHWC'`` for ``dynamic_img_size``), reads
    ``num_patches``, ``grid_size``, ``feat_ratio()`` and ``dynamic_feat_size()``, and expects ``(B, N, C)`` tokens.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            stem_chs: Tuple[int, int, int] = (32, 64, 128),
            bias: bool = True,
            output_fmt: Optional[str] = None,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        from timm.layers import Format

        if dynamic_img_pad:
            raise ValueError('ConvStemPatchEmbed does not support dynamic_img_pad (its first conv pads by itself)')
        super().__init__(img_size, patch_size, in_chans, embed_dim, stem_chs)
        if not bias:  # timm asks for a bias-free projection when a norm follows it (pre_norm)
            self.proj.register_parameter('bias', None)
        self.output_fmt = Format(output_fmt) if output_fmt else None
        self.strict_img_size = strict_img_size
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        return self.patch_size if as_scalar else (self.patch_size, self.patch_size)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.feat_size(img_size)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """A new input size (the stem's strides are fixed, so the patch size cannot change)."""
        if patch_size is not None and _pair(patch_size) != (self.patch_size, self.patch_size):
            raise ValueError(f'ConvStemPatchEmbed cannot change its patch size {self.patch_size} to {patch_size}')
        if img_size is not None:
            self.img_size = _pair(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import _assert, nchw_to

        if self.strict_img_size:  # one dimension per check, so that FX can trace it (as timm's PatchEmbed)
            _assert(x.shape[-2] == self.img_size[0], f'input height does not match the model\'s {self.img_size}')
            _assert(x.shape[-1] == self.img_size[1], f'input width does not match the model\'s {self.img_size}')
        x = super().forward(x)
        return x.flatten(2).transpose(1, 2) if self.output_fmt is None else nchw_to(x, self.output_fmt)
