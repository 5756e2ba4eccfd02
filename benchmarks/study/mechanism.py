"""What a run's final weights do to attention: the mechanism metrics of every block on the validation images.

The paper's mechanism claims are about the maps, not accuracy: expansion makes the heads' maps more diverse
(head similarity), the convolution adds local patterns (mean attention distance, entropy), and refined attention
keeps deeper blocks from collapsing onto the previous block's map (similarity to the previous block). A run's
metrics are those of ``refiner attention`` (:func:`refiner_vit.analysis.layer_stats` of
:func:`~refiner_vit.analysis.attention_maps`), for the raw and the refined maps of every block, with the model
loaded and each image preprocessed as that command does, averaged over the validation images.

The analysis averages every metric over the images of a batch; the images are fed in batches and the batch
results averaged weighted by their size, which is the average over all images at once (a per-head value that is
undefined for one image, NaN, would be left out of one batch's mean but not of the other's: the study's models
attend to patches from every query, so it does not arise). The run's FLOPs per image are counted on the same
model (torch's ``FlopCounterMode``: matrix products and convolutions, so the attention's ``q k^T`` and ``A v``,
the refiner's and the head mixes' products, the stem; not softmax, norms or activations).
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .data import list_images

# per map (raw / refined) of a block: the study's table and plots report these; layer_stats holds them
METRICS = ('head_similarity', 'mean_distance', 'entropy', 'layer_similarity')
BATCH = 32  # images per forward pass: a 14x14 grid's maps of four blocks, raw and refined, stay near 100 MB


def _weighted_mean(values: Sequence[Any], weights: Sequence[int]) -> Any:
    """The mean of equally shaped JSON values (numbers, None, lists, dicts), weighted; None where every one is None;
    strings and ints (block index, name, kind) are taken from the first."""
    first = values[0]
    if isinstance(first, dict):
        return {key: _weighted_mean([v[key] for v in values], weights) for key in first}
    if isinstance(first, list):
        return [_weighted_mean([v[i] for v in values], weights) for i in range(len(first))]
    if isinstance(first, float) or first is None:
        pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None
    return first


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    """FLOPs of ``model(image)`` as torch's ``FlopCounterMode`` counts them (see the module docstring), by
    :func:`refiner_vit.performance.count_flops`, which counts timm's fused attention as its two matrix products, so a
    plain ViT's ``q k^T`` and ``A v`` count as a refined one's do."""
    from refiner_vit.performance import count_flops as count_step_flops

    with torch.no_grad():
        return int(count_step_flops(lambda: model(image)))


def split_metrics(model_source: str, images: Sequence[str], batch: int = BATCH) -> Dict[str, Any]:
    """``{'grid', 'images', 'layers', 'flops'}``: :func:`~refiner_vit.analysis.layer_stats` of the model that
    ``refiner attention --model MODEL_SOURCE`` loads, averaged over ``images`` (paths), and its FLOPs per image."""
    from refiner_vit.analysis import attention_maps, layer_stats, token_grid
    from refiner_vit.commands.attention import load_image
    from refiner_vit.models.resolve import resolve_model

    resolved = resolve_model(model_source)
    model = resolved.model.eval()
    per_batch, sizes, grid = [], [], None
    for start in range(0, len(images), batch):
        x = torch.cat([load_image(path, resolved.data_config)[0] for path in images[start:start + batch]])
        grid = token_grid(model, x.shape[-2:])
        per_batch.append(layer_stats(attention_maps(model, x), grid))
        sizes.append(len(x))
    return dict(grid=list(grid), images=len(images), layers=_weighted_mean(per_batch, sizes),
                flops=count_flops(model, x[:1]))


def run_metrics(output: Path, data_root: str) -> Dict[str, Any]:
    """:func:`split_metrics` of a finished run (its folder, as ``refiner attention --model`` takes it) on the
    validation images of its ImageFolder root; computed once and kept in the run folder as ``mechanism.json``."""
    cache = output / 'mechanism.json'
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        images = [path for path, _ in list_images(Path(data_root) / 'val')]
        metrics = split_metrics(str(output), images)
        cache.write_text(json.dumps(metrics) + '\n')
        return metrics


def block_metrics(layers: List[Dict[str, Any]], which: str, metric: str) -> List[Any]:
    """One metric per block: of the ``'raw'`` map, or of the ``'used'`` one (the map multiplied with V: the
    refined map where a block refines, else the raw one)."""
    out = []
    for layer in layers:
        stats = layer['raw'] if which == 'raw' or layer['refined'] is None else layer['refined']
        out.append(stats[metric])
    return out
