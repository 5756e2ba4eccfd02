"""keep_freed_memory: freed large blocks are reused without page faults, and the opt-out is honoured."""
import os
import subprocess
import sys

import pytest

from refiner_vit.utils.allocator import ENV_OPT_OUT, keep_freed_memory

# Allocates and frees a 64 MiB tensor 6 times and prints the minor page faults of the last 3 rounds. timm is
# loaded as in every process that runs a model (`import refiner_vit` does not load it): in a process holding only
# torch, glibc's heap here served each 64 MiB block from fresh pages even with the policy applied.
PROBE = '''
import resource, torch, timm
from refiner_vit.utils.allocator import keep_freed_memory
print(int(keep_freed_memory()))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2 ** 20)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))
'''


def _probe(opt_out: bool) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    env[ENV_OPT_OUT] = '0' if opt_out else '1'
    out = subprocess.run([sys.executable, '-c', PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == '1', int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt is Linux-only')
def test_freed_maps_are_reused_without_page_faults():
    """Counted in faults, which a 64 MiB block takes 16,384 of in 4 KiB pages and 32 of in 2 MiB pages (transparent
    huge pages set to 'always'): the test holds under both."""
    huge_page_faults = 64 * 2 ** 20 // (2 * 2 ** 20)
    applied, faults_kept = _probe(opt_out=False)
    assert applied
    applied, faults_default = _probe(opt_out=True)
    assert not applied and faults_default >= 3 * huge_page_faults  # glibc's default: fresh pages in every round
    assert faults_kept < faults_default / 10  # each round reuses the pages of the one before


def test_the_environment_opts_out(monkeypatch):
    monkeypatch.setenv(ENV_OPT_OUT, '0')
    assert keep_freed_memory() is False


@pytest.mark.parametrize('argv, applied', [
    (['eval', '--model', 'refiner_vit_digits', '--batch-size', '360'], True),
    (['convert', '--checkpoint', 'missing.pth', '--output', 'out'], False),
    (['export', '--model', 'refiner_vit_digits', '--output', 'x.zip'], False),
])
def test_the_allocator_policy_applies_to_model_running_commands_only(monkeypatch, argv, applied):
    from refiner_vit.cli import main
    from refiner_vit.utils import allocator

    calls = []
    monkeypatch.setattr(allocator, 'keep_freed_memory', lambda: calls.append(1) or True)
    main(argv)
    assert bool(calls) == applied
