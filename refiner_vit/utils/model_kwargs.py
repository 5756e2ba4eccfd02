"""The one syntax of model arguments: ``--model-kwargs K=V ...`` (timm's train.py spelling) in every command.

Values are Python literals (``depth=6``, ``img_size=32``, ``stem_chs=(16,32,64)``, ``qkv_bias=False``), anything
else a string (``global_pool=avg``). In YAML the same arguments are a mapping. Tuples become lists, so arguments
survive YAML and JSON (``config.yaml``, ``config.json``) unchanged. Light on purpose: the command line imports it
before torch.
"""
import ast
from typing import Any, Dict, Mapping

__all__ = ['parse_model_kwargs']


def parse_model_kwargs(items: Any) -> Dict[str, Any]:
    """``['k=v', ...]``, ``'k=v k=v'`` or a mapping -> a dict of plain values.

    Raises:
        ValueError: an item without ``=``.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k): _plain(v) for k, v in items.items()}
    if isinstance(items, str):
        items = items.split()
    out = {}
    for item in items:
        key, sep, value = str(item).partition('=')
        if not sep or not key:
            raise ValueError(f'model argument {item!r}: expected KEY=VALUE')
        try:
            out[key] = _plain(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
