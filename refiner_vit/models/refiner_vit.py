"""Refiner-ViT, the model family of "Refiner: Refining Self-attention for Vision Transformers".

Zhou et al., arXiv 2106.03714; authors' code: https://github.com/zhoudaquan/Refiner_ViT.

This is the architecture of the authors' released code, which differs from the paper's text:

* a convolutional stem (7x7/2 conv, two 3x3 convs, BatchNorm + ReLU each) and a patch projection conv
  with kernel = stride = patch_size / 2;
* blocks alternate **computing** and **sharing** attention. A computing block computes
  ``softmax((sqrt(s) q)(sqrt(s) k)^T)`` (s = head_dim^-0.5), adds the previous computing block's map
  times s, and hands its map on. A sharing block computes only V; it attends with the received map
  after refining it (released-form :class:`~refiner_vit.layers.AttentionRefiner`, per-head BatchNorm,
  times s) and hands on the map it received;
* residual scaling ``x = x + f(norm(0.5 x)) / 0.5`` and an MLP whose output has a learned per-channel
  scale initialised to 1e-5;
* LV-ViT's token-labeling ``aux_head`` on the patch tokens: inference output
  ``head(cls) + 0.5 * max_tokens aux_head(tokens)``; :meth:`forward_train` does MixToken.
"""
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    calculate_drop_path_rates,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.volo import rand_bbox
from torch import nn
from torch.nn import functional as F

from ..layers import AttentionMap, AttentionRefiner, AttentionTap, ConvStem, scale_outputs
from ..layers.recompute import checkpoint_once
from ..ops import attention_probs

__all__ = ['RefinerVisionTransformer', 'checkpoint_filter_fn']

MixBox = Tuple[int, int, int, int]


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D)


class ComputingAttention(nn.Module):
    """Computes attention maps, accumulates the previous computing block's map, hands the result on."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # the factor on q . k (the authors multiply q and k by its square root: the same up to rounding);
        # reparameterize() folds it into qkv's weights and sets it to 1
        self.qk_scale = self.scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.softmax = AttentionMap()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.tap = AttentionTap()

    def reparameterize(self) -> None:
        """Fold the factor on ``q . k`` into the rows of ``qkv`` that produce q and k (its root into each, as the
        authors scale them), for timm's ``reparameterize_model``."""
        if self.qk_scale != 1.:
            scale_outputs(self.qkv, self.qk_scale ** 0.5, slice(0, 2 * self.qkv.in_features))
            self.qk_scale = 1.

    def forward(self, x: torch.Tensor, prev_map: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # The tap shows the softmax before the previous map is added; unobserved, the two happen in one pass.
        add_after_tap = prev_map is not None and self.tap.observed
        attn = attention_probs(q, k, self.qk_scale, prev=None if add_after_tap else prev_map, alpha=self.scale)
        if prev_map is None or add_after_tap:
            self.tap(attn, None)
        if add_after_tap:
            attn = torch.add(attn, prev_map, alpha=self.scale)
        attn = self.attn_drop(self.softmax(attn))
        x = _merge_heads(attn @ v)
        return self.proj_drop(self.proj(x)), attn


class SharingAttention(nn.Module):
    """Attends with the received map after refining it; computes only V; hands on the received map."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            refiner_expansion: int = 3,
            refiner_kernel: int = 3,
            refiner_recompute: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.refiner = AttentionRefiner.released(num_heads, refiner_expansion, refiner_kernel, refiner_recompute, **dd)
        self.softmax = AttentionMap()
        # no dropout on a received map (the authors' blocks); named as timm names the map's dropout, whose output
        # timm's hook-based tools read as the block's attention map
        self.attn_drop = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.tap = AttentionTap()

    def reparameterize(self) -> None:
        """Fold the refiner's BatchNorms and the attention scale into one inference module, for timm's
        ``reparameterize_model``."""
        if self.scale == 1. or not isinstance(self.refiner, AttentionRefiner):
            return
        folded = self.refiner.fuse(output_scale=self.scale)
        if folded is not self.refiner:
            self.refiner, self.scale = folded, 1.

    def forward(self, x: torch.Tensor, prev_map: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if prev_map is None:
            raise RuntimeError('a sharing attention block needs the map of a preceding computing block')
        # times the attention scale (1 once reparameterize() has folded it into the refiner), which an
        # AttentionRefiner's training path takes into its own factors (another module is scaled after it)
        if self.scale == 1.:
            refined = self.refiner(prev_map)
        elif isinstance(self.refiner, AttentionRefiner):
            refined = self.refiner(prev_map, self.scale)
        else:
            refined = self.refiner(prev_map) * self.scale
        self.tap(prev_map, refined)
        refined = self.attn_drop(self.softmax(refined))
        x = _merge_heads(refined @ _split_heads(self.v(x), self.num_heads))
        return self.proj_drop(self.proj(x)), prev_map


class RefinerBlock(nn.Module):
    """Pre-norm transformer block with the authors' residual scaling; passes the attention map along."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            sharing: bool,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            refiner_expansion: int = 3,
            refiner_kernel: int = 3,
            refiner_recompute: bool = True,
            residual_scale: float = 0.5,
            mlp_scale_init: float = 1e-5,
            norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Callable[[], nn.Module] = nn.GELU,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.residual_scale = residual_scale
        self.norm1 = norm_layer(dim, **dd)
        if sharing:
            self.attn = SharingAttention(
                dim, num_heads, qkv_bias, proj_drop, refiner_expansion, refiner_kernel, refiner_recompute, **dd)
        else:
            self.attn = ComputingAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.mlp_scale = LayerScale(dim, init_values=mlp_scale_init, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @property
    def sharing(self) -> bool:
        return isinstance(self.attn, SharingAttention)

    def reparameterize(self) -> None:
        """``x + f(norm(s x)) / s`` -> ``x + f'(norm'(x))``, for timm's ``reparameterize_model``: no passes over the
        tokens spent on the constant ``s``.

        LayerNorm ignores the scale of its input except through eps, so ``norm(s x)`` with ``eps`` is ``norm(x)``
        with ``eps / s^2``. The ``1 / s`` of each branch goes into its last linear layer: the attention's ``proj``,
        and the MLP's ``fc2`` together with the LayerScale after it.
        """
        s = self.residual_scale
        if s == 1. or not all(isinstance(norm, nn.LayerNorm) for norm in (self.norm1, self.norm2)):
            return
        for norm in (self.norm1, self.norm2):
            norm.eps /= s * s
        scale_outputs(self.attn.proj, 1. / s)
        gamma = self.mlp_scale.gamma.detach() if isinstance(self.mlp_scale, LayerScale) else torch.ones(())
        scale_outputs(self.mlp.fc2, gamma / s)
        self.mlp_scale = nn.Identity()
        self.residual_scale = 1.

    def _branch_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``norm(s x)``, the branch's input. For a LayerNorm that is ``norm(x)`` with ``eps / s^2`` (see
        :meth:`reparameterize`): the same function with no pass over the tokens, forward or backward."""
        s = self.residual_scale
        if s == 1.:
            return norm(x)
        if type(norm) is nn.LayerNorm:
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps / (s * s))
        return norm(x * s)

    def _add_branch(self, x: torch.Tensor, y: torch.Tensor, drop_path: nn.Module,
                    layer_scale: Optional[nn.Module] = None) -> torch.Tensor:
        """``x + drop_path(layer_scale(y) / s)``. Without an active drop path, one pass over the tokens
        (``add`` with ``alpha``, ``addcmul`` for a LayerScale) instead of up to three, and as few in backward."""
        s = self.residual_scale
        if self.training and not isinstance(drop_path, nn.Identity):
            y = y if layer_scale is None else layer_scale(y)
            return x + drop_path(y if s == 1. else y / s)
        if type(layer_scale) is LayerScale:
            return torch.addcmul(x, y, layer_scale.gamma, value=1. / s)
        y = y if layer_scale is None else layer_scale(y)
        return x + y if s == 1. else torch.add(x, y, alpha=1. / s)

    def forward(self, x: torch.Tensor, attn_map: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        y, attn_map = self.attn(self._branch_norm(self.norm1, x), attn_map)
        x = self._add_branch(x, y, self.drop_path1)
        y = self.mlp(self._branch_norm(self.norm2, x))
        return self._add_branch(x, y, self.drop_path2, self.mlp_scale), attn_map


class RefinerVisionTransformer(nn.Module):
    """Refiner-ViT: conv stem, alternating computing / sharing refined-attention blocks, token-labeling head."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 16,
            num_heads: int = 12,
            mlp_ratio: float = 3.,
            qkv_bias: bool = True,
            refiner_expansion: int = 3,
            refiner_kernel: int = 3,
            refiner_recompute: bool = True,
            aux_head: bool = True,
            mix_token: bool = False,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            residual_scale: float = 0.5,
            mlp_scale_init: float = 1e-5,
            stem_chs: Tuple[int, int, int] = (32, 64, 128),
            dynamic_img_size: bool = False,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            img_size: Input size the position embedding is built for.
            patch_size: Total stride of the stem (even; the projection conv has kernel = stride = patch_size / 2).
            in_chans: Input channels.
            num_classes: Classes of ``head`` and ``aux_head`` (0: no heads, features out).
            global_pool: ``'token'`` (class token), ``'avg'`` (mean of patch tokens) or ``''`` (all tokens).
            embed_dim: Token width.
            depth: Number of blocks, computing and sharing together (block 0 computes).
            num_heads: Attention heads.
            mlp_ratio: MLP hidden width / embed_dim.
            qkv_bias: Bias in the qkv (and v) projections.
            refiner_expansion: Expansion ratio of the refiners in the sharing blocks.
            refiner_kernel: Kernel size of the refiners' depthwise convolution.
            refiner_recompute: In training, the refiners keep only their input maps and recompute their expanded
                maps in backward (:class:`~refiner_vit.layers.AttentionRefiner`); False keeps them all.
            aux_head: Token-labeling head on the patch tokens.
            mix_token: MixToken in :meth:`forward_train` while training.
            drop_rate: Dropout after the position embedding, in the MLPs and after the attention projections.
            attn_drop_rate: Dropout on the computing blocks' attention maps.
            drop_path_rate: Stochastic depth, increasing linearly to this rate over the blocks.
            residual_scale: Blocks compute ``x + f(norm(x * s)) / s`` with this ``s``.
            mlp_scale_init: Initial per-channel scale of the MLP outputs.
            stem_chs: Channels of the three stem convolutions.
            dynamic_img_size: Resample the position embedding to each input's grid at run time.
            device, dtype: Where and in which dtype the parameters are created (``device='meta'``: none allocated).
        """
        super().__init__()
        _check_pooling(global_pool, aux_head and num_classes > 0)
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
        if mix_token and not aux_head:
            raise ValueError('mix_token=True needs aux_head=True (MixToken is un-mixed on the aux logits)')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.use_aux_head = aux_head
        self.mix_token = mix_token
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        dd = dict(device=device, dtype=dtype)

        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, stem_chs, **dd)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            RefinerBlock(
                embed_dim,
                num_heads,
                sharing=i % 2 == 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                refiner_expansion=refiner_expansion,
                refiner_kernel=refiner_kernel,
                refiner_recompute=refiner_recompute,
                residual_scale=residual_scale,
                mlp_scale_init=mlp_scale_init,
                **dd,
            )
            for i in range(depth)
        ])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes, **dd) if aux_head and num_classes > 0 else None
        self.init_weights()

    def init_weights(self) -> None:
        """The authors' initialisation: truncated-normal (0.02) Linear weights, tokens and position embedding."""
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the conv stem and the blocks in backward, keeping only the stem's input and each group's input
        tokens and map (see :meth:`_forward_blocks`); BatchNorm running statistics are still updated once a step."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``head`` (and ``aux_head`` when used) for ``num_classes`` classes; 0 removes them."""
        global_pool = self.global_pool if global_pool is None else global_pool
        _check_pooling(global_pool, self.use_aux_head and num_classes > 0)
        self.num_classes, self.global_pool = num_classes, global_pool
        dd = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        use_aux = self.use_aux_head and num_classes > 0
        self.aux_head = nn.Linear(self.embed_dim, num_classes, **dd) if use_aux else None

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Rebuild for a new input size, resampling the position embedding to the new token grid."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.img_size = to_2tuple(img_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != old_grid:
            pos = resample_abs_pos_embed(self.pos_embed.data, list(new_grid), list(old_grid), num_prefix_tokens=1)
            self.pos_embed = nn.Parameter(pos)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` grid -> ``(B, 1 + rows * cols, C)`` tokens with class token and positions."""
        B, C, rows, cols = x.shape
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, [rows, cols], list(self.patch_embed.grid_size), num_prefix_tokens=1)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + pos_embed
        return self.pos_drop(x)

    def _forward_blocks(self, x: torch.Tensor, blocks: Sequence[RefinerBlock]) -> Iterator[torch.Tensor]:
        """Runs ``blocks`` on tokens ``x``, passing the attention map along; yields each block's output tokens.

        With grad checkpointing, each computing block and the sharing blocks after it, which attend with its map,
        are recomputed together in backward: a group keeps only its input tokens and map (the previous group's),
        and the map never has to be kept between the blocks that share it. BatchNorms update their running
        statistics in the forward only.
        """
        attn_map = None
        for group in _computing_groups(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                *outputs, attn_map = checkpoint_once(group, _run_group, group, x, attn_map)
            else:
                *outputs, attn_map = _run_group(group, x, attn_map)
            yield from outputs
            x = outputs[-1]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks and final norm over a token sequence ``(B, 1 + N, C)``."""
        tokens = x
        for tokens in self._forward_blocks(x, self.blocks):  # noqa: B007 (the last block's output is wanted)
            pass
        return self.norm(tokens)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stem; with grad checkpointing recomputed in backward too (its activations at half the input's
        resolution outweigh all the blocks' checkpoints)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_once(self.patch_embed, self.patch_embed, x)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self._pos_embed(self._stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            pooled = x[:, 0]
        elif self.global_pool == 'avg':
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = x
        if pre_logits:
            return pooled
        out = self.head(pooled)
        if self.aux_head is not None:
            out = out + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).max(dim=1)[0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, MixBox]]:
        """Training forward for token labeling (as timm's VOLO).

        Returns ``head(cls)`` without an aux head; with it ``(cls_logits, aux_logits, box)`` where
        ``aux_logits`` is ``(B, rows * cols, num_classes)`` and ``box = (r1, c1, r2, c2)`` is the MixToken
        box on the token grid (rows ``r1:r2``, cols ``c1:c2``; all zeros when nothing was mixed). Inside
        the box the patch tokens come from the batch-flipped images; the aux logits there are flipped
        back, so they line up with each image's own token labels.
        """
        grid = self._stem(x)
        box = (0, 0, 0, 0)
        if self.mix_token and self.training:
            lam = torch.distributions.Beta(1., 1.).sample()  # timm's rand_bbox takes a tensor lam
            B, C, rows, cols = grid.shape
            box = rand_bbox((B, rows, cols, C), lam)
            grid = _swap_box(grid.permute(0, 2, 3, 1), box).permute(0, 3, 1, 2)
        x = self.forward_tokens(self._pos_embed(grid))
        cls_logits = self.head(x[:, 0])
        if self.aux_head is None:
            return cls_logits
        aux = self.aux_head(x[:, self.num_prefix_tokens:])
        if box != (0, 0, 0, 0):
            rows, cols = grid.shape[-2:]
            aux = _swap_box(aux.reshape(aux.shape[0], rows, cols, -1), box).flatten(1, 2)
        return cls_logits, aux, box

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs (and the final features), as timm's ViT.

        Args:
            x: Input images.
            indices: Last n blocks if int, all if None, these block indices if a sequence.
            return_prefix_tokens: Return ``(patch_tokens, class_token)`` pairs.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last requested block.
            output_fmt: ``'NCHW'`` (patch tokens as a grid) or ``'NLC'``.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid = self._stem(x)
        B, _, rows, cols = grid.shape
        x = self._pos_embed(grid)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        tokens = x
        for i, tokens in enumerate(self._forward_blocks(x, blocks)):
            if i in take_indices:
                intermediates.append(self.norm(tokens) if norm else tokens)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(B, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm and heads) not needed for ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _check_pooling(global_pool: str, aux_head: bool) -> None:
    """A known pooling, and none that the aux head's ``+ 0.5 * max over tokens`` cannot be added to."""
    if global_pool not in ('', 'token', 'avg'):
        raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
    if global_pool == '' and aux_head:
        raise ValueError("global_pool='' (logits per token) cannot take the aux head's image-level term "
                         "(head(cls) + 0.5 * max over tokens of aux_head); use aux_head=False, num_classes=0, or "
                         'forward_train for the per-token aux logits')


def _computing_groups(blocks: Sequence[RefinerBlock]) -> List[nn.ModuleList]:
    """``blocks`` cut before every computing block: each group is a computing block and the sharing blocks after it."""
    groups: List[List[RefinerBlock]] = []
    for block in blocks:
        if not groups or not block.sharing:
            groups.append([])
        groups[-1].append(block)
    return [nn.ModuleList(group) for group in groups]


def _run_group(group: Sequence[RefinerBlock], x: torch.Tensor, attn_map: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, ...]:
    """Each block's output tokens, then the map the last one hands on."""
    outputs = []
    for block in group:
        x, attn_map = block(x, attn_map)
        outputs.append(x)
    return (*outputs, attn_map)


def _swap_box(x: torch.Tensor, box: MixBox) -> torch.Tensor:
    """Replace rows ``r1:r2`` and cols ``c1:c2`` of a ``(B, rows, cols, C)`` tensor with the batch-flipped ones."""
    r1, c1, r2, c2 = box
    out = x.clone()
    out[:, r1:r2, c1:c2] = x.flip(0)[:, r1:r2, c1:c2]
    return out


# The authors' key names -> ours (substring renames; tests/data/official/state_dict_shapes.json lists their keys).
OFFICIAL_KEY_RENAMES = (
    ('.attn.DLA.conv_exp.', '.attn.refiner.expand.'),
    ('.attn.DLA.bn1.', '.attn.refiner.norm1.'),
    ('.attn.DLA.depth_sep_conv.', '.attn.refiner.conv.'),
    ('.attn.DLA.bn2.', '.attn.refiner.norm2.'),
    ('.attn.DLA.conv_pro.', '.attn.refiner.reduce.'),
    ('.attn.DLA.bn3.', '.attn.refiner.norm3.'),
    ('.attn.adapt_bn.', '.attn.refiner.out_norm.'),
    ('.mlp.scale_channel', '.mlp_scale.gamma'),
)


def _rename_official_key(key: str, model: RefinerVisionTransformer) -> str:
    for old, new in OFFICIAL_KEY_RENAMES:
        key = key.replace(old, new)
    if key.startswith('blocks.') and '.attn.qkv.' in key:
        index = int(key.split('.')[1])
        if index < len(model.blocks) and model.blocks[index].sharing:
            key = key.replace('.attn.qkv.', '.attn.v.')
    return key


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: RefinerVisionTransformer,
) -> Dict[str, torch.Tensor]:
    """Map a state dict of the authors' code (or ours) onto ``model``: renames the authors' keys and resamples
    ``pos_embed`` to the model's token grid. Idempotent on our own state dicts.

    As timm's families' filters, it takes the weights themselves: timm's loader, and
    :func:`refiner_vit.models.weights.extract` for every other way in, take them out of a training checkpoint
    and strip ``module.`` prefixes first.
    """
    out = {}
    for key, value in state_dict.items():
        key = _rename_official_key(key, model)
        if key == 'pos_embed' and value.shape != model.pos_embed.shape:
            value = resample_abs_pos_embed(
                value, list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens, verbose=True)
        out[key] = value
    return out


def _create_refiner_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        RefinerVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.conv1',
        'classifier': ('head', 'aux_head'),
        'paper_ids': 'arXiv:2106.03714',
        'paper_name': 'Refiner: Refining Self-attention for Vision Transformers',
        'origin_url': 'https://github.com/zhoudaquan/Refiner_ViT',
        **kwargs,
    }


# The authors' results (README of origin_url), evaluated with their receptive-field calibration:
# crop_pct 0.9 (S), 1.0 (M), 1.13 (L). Only L at 448 px was published as a checkpoint.
_UNPUBLISHED = 'No checkpoint published; top-1 as reported in the authors\' README.'
_L448_NOTES = (
    'Weights: the Google Drive file linked from the 448 px row of the results table in the README at origin_url. '
    'timm cannot download it (no url); load a local copy with pretrained_cfg_overlay=dict(file=PATH) '
    'or convert it with `refiner convert --checkpoint PATH --output DIR` (docs/weights.md).',
    'Trained on ImageNet-1k with token labeling (the checkpoint carries the token-labeling aux_head); '
    'inference output head(cls) + 0.5 * max over tokens of aux_head; mean/std 0.5, bicubic, crop_pct 1.13.',
    'License: none stated in the authors\' README; check their repository before redistributing the weights.',
)

default_cfgs = generate_default_cfgs({
    'refiner_vit_s_patch16_224': _cfg(crop_pct=0.9, description=f'Refiner-ViT-S, 83.6 % top-1. {_UNPUBLISHED}'),
    'refiner_vit_s_patch16_384': _cfg(
        input_size=(3, 384, 384), crop_pct=0.9, description=f'Refiner-ViT-S, 84.6 % top-1. {_UNPUBLISHED}'),
    'refiner_vit_m_patch16_224': _cfg(crop_pct=1.0, description=f'Refiner-ViT-M, 84.6 % top-1. {_UNPUBLISHED}'),
    'refiner_vit_m_patch16_384': _cfg(
        input_size=(3, 384, 384), crop_pct=1.0, description=f'Refiner-ViT-M, 85.6 % top-1. {_UNPUBLISHED}'),
    'refiner_vit_l_patch16_224': _cfg(crop_pct=1.13, description=f'Refiner-ViT-L, 84.9 % top-1. {_UNPUBLISHED}'),
    'refiner_vit_l_patch16_384': _cfg(
        input_size=(3, 384, 384), crop_pct=1.13, description=f'Refiner-ViT-L, 85.8 % top-1. {_UNPUBLISHED}'),
    # `.tl_in1k`: token labeling on ImageNet-1k; the default (and only) tag, so the bare name resolves to it.
    'refiner_vit_l_patch16_448.tl_in1k': _cfg(
        input_size=(3, 448, 448),
        crop_pct=1.13,
        description='The authors\' published Refiner-ViT-L at 448 px: 86.0 % ImageNet-1k top-1 (their README).',
        notes=_L448_NOTES,
    ),
    # A tiny config of the same architecture for fast tests and CPU experiments (no weights).
    'test_refiner_vit': _cfg(input_size=(3, 64, 64), num_classes=10),
    # The default model of `refiner train`: small enough to train on a laptop CPU in a minute (no weights).
    'refiner_vit_digits': _cfg(input_size=(3, 16, 16), num_classes=10, classifier='head'),  # no aux head
})

@register_model
def refiner_vit_s_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-S (25M), 224 px."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=16, num_heads=12, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_s_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_s_patch16_384(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-S (25M), 384 px."""
    model_args = dict(img_size=384, patch_size=16, embed_dim=384, depth=16, num_heads=12, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_s_patch16_384', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_m_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-M (55M), 224 px."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=420, depth=32, num_heads=12, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_m_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_m_patch16_384(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-M (55M), 384 px."""
    model_args = dict(img_size=384, patch_size=16, embed_dim=420, depth=32, num_heads=12, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_m_patch16_384', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_l_patch16_224(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-L (81M), 224 px."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=512, depth=32, num_heads=16, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_l_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_l_patch16_384(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-L (81M), 384 px."""
    model_args = dict(img_size=384, patch_size=16, embed_dim=512, depth=32, num_heads=16, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_l_patch16_384', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_l_patch16_448(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """Refiner-ViT-L (81M), 448 px: the authors' published checkpoint (86.0 % ImageNet top-1)."""
    model_args = dict(img_size=448, patch_size=16, embed_dim=512, depth=32, num_heads=16, mlp_ratio=3.)
    return _create_refiner_vit('refiner_vit_l_patch16_448', pretrained, **dict(model_args, **kwargs))


@register_model
def test_refiner_vit(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """A tiny Refiner-ViT (dim 64, 4 blocks, 4 heads, 64 px) for tests and quick experiments."""
    model_args = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=3.)
    return _create_refiner_vit('test_refiner_vit', pretrained, **dict(model_args, **kwargs))


@register_model
def refiner_vit_digits(pretrained: bool = False, **kwargs: Any) -> RefinerVisionTransformer:
    """The default model of ``refiner train`` (0.2M): dim 64, 4 blocks, 4 heads, 16 px input in 4 px patches, no
    token-labeling head. Sized for the embedded digits; ``refiner train`` passes ``img_size`` / ``patch_size`` for
    other inputs."""
    model_args = dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=3.,
                      stem_chs=(16, 32, 64), aux_head=False)
    return _create_refiner_vit('refiner_vit_digits', pretrained, **dict(model_args, **kwargs))
