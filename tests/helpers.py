"""Helpers shared by several test modules."""
import os
import shlex
import shutil
from typing import Optional

import pytest
import torch
from torch import nn


def randomise_batchnorms(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding them is really tested."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                if bn.running_mean is not None:
                    bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                    bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                if bn.affine:
                    bn.weight.copy_(torch.randn(c, generator=generator))
                    bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return module


def c_compiler() -> Optional[str]:
    """The compiler the native kernels are built with (``$CC``, else ``cc``), where it exists."""
    words = shlex.split(os.environ.get('CC') or 'cc')
    return shutil.which(words[0]) if words else None


# Tests of the native kernels themselves; the rest of the suite runs whatever the ops choose.
needs_compiler = pytest.mark.skipif(c_compiler() is None, reason='no C compiler ($CC or cc): the native kernels '
                                    'cannot be built here, and the ops run torch\'s operators (tested elsewhere)')


def one_error_line(capsys, argv, code: int = 2) -> str:
    """Run ``refiner ARGV``: it must exit with ``code`` and print exactly one error line and no traceback."""
    from refiner_vit.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ': error: ' in line]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]
