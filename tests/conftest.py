"""Shared fixtures: the authors' golden fixture and state-dict shapes (see tests/data/official/README.md), and a
private kernel cache."""
import json
import os

import pytest
from official import OFFICIAL
from safetensors.torch import load_file

from refiner_vit.ops.build import ENV_CACHE


@pytest.fixture(scope='session')
def official_shapes():
    with open(OFFICIAL / 'state_dict_shapes.json') as f:
        return json.load(f)


@pytest.fixture(scope='session')
def golden():
    return load_file(OFFICIAL / 'golden_small.safetensors')


@pytest.fixture(scope='session', autouse=True)
def private_kernel_cache(tmp_path_factory):
    """Kernels and their measured choices in a folder of this session's own: no test sees another run's choices."""
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp('kernel-cache'))
