"""Shared fixtures: the authors' golden fixture and state-dict shapes (see tests/data/official/README.md)."""
import json

import pytest
from official import OFFICIAL
from safetensors.torch import load_file


@pytest.fixture(scope='session')
def official_shapes():
    with open(OFFICIAL / 'state_dict_shapes.json') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def golden():
    return load_file(OFFICIAL / 'golden_small.safetensors')
