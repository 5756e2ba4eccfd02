"""``pretrained=True`` that answers at once: weights from the local caches, or a one-line error when offline.

timm downloads pretrained weights through huggingface_hub (or ``torch.hub`` for a plain URL). Without a network
huggingface_hub retries for about 50 s before giving up, and it asks the hub even when the file is already
cached. So before timm is asked: weights found in a local cache are handed to timm as a ``file`` (read without
contacting anyone); otherwise the host is probed once with a short timeout, and an unreachable host (or
``HF_HUB_OFFLINE=1``) is a :class:`~refiner_vit.errors.WeightsError` (a ``ValueError``) saying how to pass a local
file instead.
"""
import os
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

from ..errors import WeightsError

__all__ = ['pretrained_overlay']

PROBE_TIMEOUT_S = 3.0
HINT = ('give the weights as a local file instead (refiner: --checkpoint FILE), or fetch them once on a connected '
        'machine into the same cache')


def _reachable(host: str) -> Tuple[bool, str]:
    """Whether a TCP connection to ``host``:443 opens within :data:`PROBE_TIMEOUT_S` (and why not)."""
    try:
        with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
            return True, ''
    except OSError as e:
        return False, e.strerror or type(e).__name__


def _hub_cached(repo: str, filename: Optional[str]) -> Tuple[Optional[str], str, bool]:
    """(cached file or None, host, offline mode) for weights on the Hugging Face hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo_id, _, revision = repo.partition('@')
    names = ('model.safetensors', filename or 'pytorch_model.bin')
    for name in names:
        path = try_to_load_from_cache(repo_id, name, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
        if isinstance(path, str):
            return path, '', False
    return None, urlparse(constants.ENDPOINT).hostname or 'huggingface.co', bool(constants.HF_HUB_OFFLINE)


def _url_cached(url: str) -> Tuple[Optional[str], str, bool]:
    """(cached file or None, host, offline mode) for weights at a plain URL (``torch.hub``'s cache)."""
    import torch

    cached = Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(urlparse(url).path)
    return (str(cached) if cached.is_file() else None), urlparse(url).hostname or url, False


def pretrained_overlay(name: str) -> Dict[str, Any]:
    """The ``pretrained_cfg_overlay`` for ``timm.create_model(name, pretrained=True)``: ``{'file': PATH}`` when the
    weights are cached locally, ``{}`` when timm may download them.

    Raises:
        WeightsError: timm has no weights for ``name``, or they are not cached and their host cannot be reached.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.file or cfg.hf_hub_id or cfg.url):
        raise WeightsError(f'{name}: timm knows no pretrained weights for it; {HINT}')
    if cfg.file:
        return {}
    cached, host, offline = _hub_cached(cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_id else \
        _url_cached(cfg.url)
    if cached is not None:
        return {'file': cached}
    reason = 'HF_HUB_OFFLINE is set' if offline else _reachable(host)[1]
    if reason:
        raise WeightsError(f'{name}: pretrained weights are not in the local cache and {host} cannot be reached '
                         f'({reason}); {HINT}')
    return {}
