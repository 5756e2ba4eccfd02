"""One model and what the app computes with it, without Gradio: one forward pass per image, then cheap slices.

:meth:`AttentionSession.analyse` runs the model once on an image and keeps everything the page shows: the top-5
prediction, every attention layer's raw and refined maps (:func:`refiner_vit.analysis.record_attention`), their
metrics (:func:`refiner_vit.analysis.layer_stats`, computed when first asked for) and, for the authors' released
refiners, the maps each refiner received. Choosing another query or head only slices those maps
(:meth:`AttentionSession.query_maps`); the expanded maps of a released refiner are recomputed from its stored input
by that refiner alone, never by the model.

The maps are preprocessed exactly as ``refiner attention`` preprocesses an image file (timm's eval transform of the
model's data config), so both show the same maps for the same image and model.
"""
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..analysis import layer_stats, record_attention, token_grid
from ..layers import AttentionRefiner
from ..models.resolve import ResolvedModel

__all__ = ['Analysis', 'AttentionSession', 'LayerMaps', 'TOP_K', 'class_names_of']

TOP_K = 5
IMAGENET_CLASSES = 1000


@dataclass
class LayerMaps:
    """One attention layer's maps for one query on the patch grid: ``(rows, cols)`` each, ``refined`` None where
    the layer does not refine."""

    block: int
    kind: str
    raw: np.ndarray
    refined: Optional[np.ndarray]


@dataclass
class Analysis:
    """What one forward pass of one image gives the page."""

    image: np.ndarray  # the model's input as (height, width, 3) floats in [0, 1]
    records: List[Dict[str, Any]]  # attention_maps() records of the image (batch of one)
    grid: Tuple[int, int]
    prefix: int  # class (and other prefix) tokens before the patches
    top: List[Tuple[str, float]]  # the top-k (class name, probability)
    refiner_inputs: Dict[int, torch.Tensor] = field(default_factory=dict)  # block -> the map a released refiner got

    @functools.cached_property
    def stats(self) -> List[Dict[str, Any]]:
        """``layer_stats()`` of the records, computed on first use (for Refiner-ViT-S about as long as the forward
        pass, so the page shows the maps first)."""
        return layer_stats(self.records, self.grid)

    @property
    def heads(self) -> int:
        return self.records[0]['raw'].shape[1]

    @property
    def default_query(self) -> int:
        """The class token; without prefix tokens, the centre patch."""
        rows, cols = self.grid
        return 0 if self.prefix else (rows // 2) * cols + cols // 2

    def query_of_patch(self, row: int, col: int) -> int:
        """The token index of the patch at ``(row, col)`` of the grid."""
        return self.prefix + row * self.grid[1] + col

    def patch_of_query(self, query: int) -> Optional[Tuple[int, int]]:
        """``(row, col)`` of a patch token; None for a prefix token."""
        if query < self.prefix:
            return None
        return divmod(query - self.prefix, self.grid[1])


def class_names_of(resolved: ResolvedModel, num_classes: int) -> List[str]:
    """The names the source records; for an unnamed 1000-class model ImageNet's (timm's ``ImageNetInfo``); else
    the class indices."""
    if resolved.class_names and len(resolved.class_names) == num_classes:
        return list(resolved.class_names)
    if num_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _released_refiners(model: nn.Module) -> Dict[str, AttentionRefiner]:
    """Attention-layer name -> its refiner, for refiners of the released (non-linear) form."""
    found = {}
    for name, module in model.named_modules():
        refiner = getattr(module, 'refiner', None)
        if isinstance(refiner, AttentionRefiner) and not refiner.is_linear:
            found[name] = refiner
    return found


class AttentionSession:
    """A resolved model (eval mode) and its preprocessing; computes an :class:`Analysis` per image."""

    def __init__(self, resolved: ResolvedModel, label: str) -> None:
        """
        Args:
            resolved: The model from :func:`refiner_vit.models.resolve_model` (or ``load_model``).
            label: How the page names the model (the source the user gave).
        """
        from timm.data import create_transform

        self.model = resolved.model.eval()
        self.label = label
        self.data_config = resolved.data_config
        self.transform = create_transform(**resolved.data_config)
        self.mode = 'L' if resolved.data_config['input_size'][0] == 1 else 'RGB'
        self.input_size = tuple(resolved.data_config['input_size'][1:])
        self.grid = token_grid(self.model, self.input_size)
        self.refiners = _released_refiners(self.model)
        with torch.no_grad(), record_attention(self.model) as records:  # a blank image tells the output's shapes
            num_classes = int(self.model(torch.zeros(1, *self.data_config['input_size'])).shape[-1])
        self.class_names = class_names_of(resolved, num_classes)
        self.heads = int(records[0]['raw'].shape[1])
        self.refined_blocks = [r['block'] for r in records if r['name'] in self.refiners]

    def preprocess(self, image: Image.Image) -> Tuple[torch.Tensor, np.ndarray]:
        """The batch of one the model gets, and the same pixels in [0, 1] as ``(height, width, 3)`` for display."""
        x = self.transform(image.convert(self.mode)).unsqueeze(0)
        mean = torch.tensor(self.data_config['mean']).view(-1, 1, 1)
        std = torch.tensor(self.data_config['std']).view(-1, 1, 1)
        shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        return x, np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown

    def analyse(self, image: Image.Image) -> Analysis:
        """One forward pass of ``image``: prediction, all attention maps, released refiners' inputs (the metrics follow
        on first use of ``stats``)."""
        x, shown = self.preprocess(image)
        inputs: Dict[str, torch.Tensor] = {}
        handles = [refiner.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
                   for name, refiner in self.refiners.items()]
        try:
            with torch.no_grad(), record_attention(self.model) as records:
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        probs = logits.float().softmax(dim=-1)[0]
        values, indices = probs.topk(min(TOP_K, probs.numel()))
        top = [(self.class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
        prefix = records[0]['raw'].shape[-1] - self.grid[0] * self.grid[1]
        blocks = {record['name']: record['block'] for record in records}
        refiner_inputs = {blocks[name]: maps for name, maps in inputs.items() if name in blocks}
        return Analysis(shown, records, self.grid, prefix, top, refiner_inputs)

    @staticmethod
    def query_maps(analysis: Analysis, query: int, head: Optional[int] = None) -> List[LayerMaps]:
        """Every layer's raw and refined map of token ``query`` over the patches, for ``head`` (None: the mean over
        heads)."""
        rows, cols = analysis.grid

        def row(maps: Optional[torch.Tensor]) -> Optional[np.ndarray]:
            if maps is None:
                return None
            picked = maps[0, :, query, analysis.prefix:]
            picked = picked.mean(dim=0) if head is None else picked[head]
            return picked.reshape(rows, cols).float().numpy()

        return [LayerMaps(r['block'], r['kind'], row(r['raw']), row(r['refined'])) for r in analysis.records]

    def expanded_maps(self, analysis: Analysis, block: int, head: int, query: int) -> Tuple[np.ndarray, np.ndarray]:
        """A released refiner's H' expanded maps (after its local convolution) of token ``query`` over the patches,
        ordered by how strongly ``head`` reads them.

        Returns:
            ``(weights (H',), maps (H', rows, cols))``: the reduction weight of ``head`` on each expanded map, largest
            magnitude first, and those maps.
        """
        record = next(r for r in analysis.records if r['block'] == block)
        refiner = self.refiners[record['name']]
        captured: List[torch.Tensor] = []
        handle = refiner.act2.register_forward_hook(lambda m, args, out: captured.append(out))
        try:
            with torch.no_grad():
                refiner.forward_stages(analysis.refiner_inputs[block])
        finally:
            handle.remove()
        weights = refiner.reduce.weight[head, :, 0, 0].detach()
        order = weights.abs().argsort(descending=True)
        rows, cols = analysis.grid
        maps = captured[0][0, :, query, analysis.prefix:].reshape(-1, rows, cols)
        return weights[order].float().numpy(), maps[order].float().numpy()
