"""Metrics of attention maps: locality, head diversity, cross-layer similarity, entropy, rollout.

All functions take maps ``(B, H, N, N)`` whose last axis is the key axis, with the prefix (class)
tokens first and the patch tokens after them in raster order on a ``grid = (rows, cols)``; the number of
prefix tokens is ``N - rows * cols``. They compute in float64.

Refined maps are not probability maps: they may hold negative weights and their rows need not sum to 1.
Where a metric needs a distribution (distance, entropy, rollout) it uses the **magnitudes** ``|A|``
renormalised per row, i.e. how strongly each key's value enters the output whatever its sign. On raw
(softmax) maps this changes nothing. The similarity metrics use the signed maps as they are.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'effective_maps',
    'entropy',
    'head_similarity',
    'layer_similarity',
    'layer_stats',
    'mean_distance',
    'patch_distances',
    'rollout',
]

Grid = Tuple[int, int]


def _num_prefix(maps: torch.Tensor, grid: Grid) -> int:
    prefix = maps.shape[-1] - grid[0] * grid[1]
    if maps.dim() != 4 or maps.shape[-1] != maps.shape[-2] or prefix < 0:
        raise ValueError(f'maps of shape {tuple(maps.shape)} do not fit a {grid[0]}x{grid[1]} patch grid')
    return prefix


def _row_distributions(maps: torch.Tensor) -> torch.Tensor:
    """|A| / row sums of |A| in float64; rows without mass become NaN."""
    mass = maps.double().abs()
    return mass / mass.sum(dim=-1, keepdim=True)


def patch_distances(grid: Grid) -> torch.Tensor:
    """``(P, P)`` Euclidean distances, in patches, between the patches of a raster-ordered grid."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij')
    coords = torch.stack((r.flatten(), c.flatten()), dim=-1).double()
    return torch.cdist(coords, coords)


def mean_distance(maps: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per head, the expected distance (in patches) between a query patch and the patches it attends to.

    Only patch-to-patch attention counts: prefix-token rows and columns are dropped, each query patch's
    remaining weights (magnitudes) are renormalised to sum to 1, the distance to each key patch on the grid
    is averaged under them, and the result is averaged over query patches and the batch. A query whose
    patch weights are all zero (it attends only to prefix tokens) has no distance and is left out.

    Returns:
        ``(H,)`` float64; NaN for a head where no query attends to any patch.
    """
    prefix = _num_prefix(maps, grid)
    patch_maps = _row_distributions(maps[..., prefix:, prefix:])
    per_query = (patch_maps * patch_distances(grid).to(patch_maps.device)).sum(dim=-1)  # (B, H, P)
    return per_query.transpose(0, 1).flatten(1).nanmean(dim=1)


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Per head, the mean Shannon entropy (nats) of the rows, over all N keys (prefix tokens included).

    A uniform row has entropy ``log N``, a one-hot row 0. Rows are ``|A|`` renormalised (no-op on softmax maps).

    Returns:
        ``(H,)`` float64.
    """
    p = _row_distributions(maps)
    return -torch.special.xlogy(p, p).sum(dim=-1).transpose(0, 1).flatten(1).nanmean(dim=1)


def _flat_unit(maps: torch.Tensor) -> torch.Tensor:
    return F.normalize(maps.double().flatten(2), dim=-1)  # (B, H, N*N), unit length per head


def head_similarity(maps: torch.Tensor) -> float:
    """Mean cosine similarity between the maps of every pair of heads (lower = more diverse heads).

    Each head's whole ``N x N`` map is one vector; the similarity is averaged over the ``H (H - 1) / 2``
    pairs and the batch. NaN for a single head.
    """
    heads = maps.shape[1]
    if heads < 2:
        return math.nan
    unit = _flat_unit(maps)
    sim = unit @ unit.transpose(1, 2)  # (B, H, H)
    i, j = torch.triu_indices(heads, heads, offset=1)
    return sim[:, i, j].mean().item()


def layer_similarity(maps: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean cosine similarity between each head's map and the same head's map in ``previous``.

    The "attention collapse" measure: near 1 when consecutive layers attend alike.
    """
    if maps.shape != previous.shape:
        raise ValueError(f'maps of shapes {tuple(maps.shape)} and {tuple(previous.shape)} cannot be compared')
    return (_flat_unit(maps) * _flat_unit(previous)).sum(dim=-1).mean().item()


def rollout(layers: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token.

    Each layer's map is averaged over heads (magnitudes, rows renormalised), mixed with the identity for
    the residual connection, ``residual * I + (1 - residual) * A``, and the layers are multiplied from the
    first to the last.

    Returns:
        ``(B, N, N)`` float64; row ``i`` is the share of each input token in output token ``i``.
    """
    if not layers:
        raise ValueError('rollout needs at least one layer')
    joint = None
    for maps in layers:
        mixed = _row_distributions(maps).mean(dim=1)
        eye = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = residual * eye + (1 - residual) * mixed
        joint = mixed if joint is None else mixed @ joint
    return joint


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _map_stats(maps: torch.Tensor, previous: Optional[torch.Tensor], grid: Grid) -> Dict[str, Any]:
    distance = mean_distance(maps, grid)
    ent = entropy(maps)
    return {
        'mean_distance': _finite(distance.nanmean().item()),
        'head_similarity': _finite(head_similarity(maps)),
        'layer_similarity': None if previous is None else _finite(layer_similarity(maps, previous)),
        'entropy': _finite(ent.nanmean().item()),
        'mean_distance_per_head': [_finite(v) for v in distance.tolist()],
        'entropy_per_head': [_finite(v) for v in ent.tolist()],
    }


def effective_maps(record: Dict[str, Any]) -> torch.Tensor:
    """The maps a layer attends with as far as recorded: ``refined`` when present, else ``raw``."""
    return record['refined'] if record['refined'] is not None else record['raw']


def layer_stats(records: List[Dict[str, Any]], grid: Grid) -> List[Dict[str, Any]]:
    """JSON-ready metrics of the records of :func:`~refiner_vit.analysis.attention_maps`.

    Per layer: ``block``, ``name``, ``kind`` and, for ``raw`` and ``refined`` (None where the layer does
    not refine), ``mean_distance``, ``head_similarity``, ``layer_similarity``, ``entropy`` and the
    per-head ``mean_distance_per_head`` / ``entropy_per_head``. ``layer_similarity`` compares raw maps with
    the previous layer's raw maps, refined maps with the previous layer's effective maps (refined when it
    has them, else raw); it is None for the first layer and when the previous layer was not recorded.
    Undefined values (NaN) are None.
    """
    out = []
    previous = None
    for record in records:
        adjacent = previous is not None and previous['block'] == record['block'] - 1
        refined = record['refined']
        out.append({
            'block': record['block'],
            'name': record['name'],
            'kind': record['kind'],
            'raw': _map_stats(record['raw'], previous['raw'] if adjacent else None, grid),
            'refined': None if refined is None else _map_stats(
                refined, effective_maps(previous) if adjacent else None, grid),
        })
        previous = record
    return out
