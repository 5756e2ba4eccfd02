"""Building the native kernels: the cache, per-kernel failures with one warning, one-thread builds, clang."""
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import needs_compiler
from torch.nn import functional as F

from refiner_vit.ops import build, local_conv2d
from refiner_vit.ops.folded_refiner import folded_refiner_kernel
from refiner_vit.ops.local_conv import input_grad_weight, local_conv_kernels
from refiner_vit.ops.probs import attention_probs_kernel

KERNELS = (local_conv_kernels, folded_refiner_kernel, attention_probs_kernel)


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """An empty kernel cache, no kernel built or failed yet in this process, and the old state back afterwards."""
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / 'cache'))
    monkeypatch.setattr(build, '_failed_sources', set())
    monkeypatch.setattr(build, '_warned', [])
    for kernel in KERNELS:
        kernel.cache_clear()
    yield tmp_path / 'cache'
    for kernel in KERNELS:
        kernel.cache_clear()


def _fake_compiler(folder, refuse: str) -> str:
    """A compiler that fails on any command containing ``refuse`` and hands every other one to the real one."""
    script = folder / 'fake-cc'
    script.write_text(f'#!/bin/sh\ncase "$*" in *{refuse}*) echo "refused: {refuse}" >&2; exit 1;; esac\n'
                      f'exec {shutil.which("cc") or "cc"} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@needs_compiler
def test_build_is_cached_and_keyed_by_the_source(fresh_builds):
    first = build._build('local_conv.c', HEADS=2, KSIZE=3)
    stamp = first.stat().st_mtime_ns
    again = build._build('local_conv.c', HEADS=2, KSIZE=3)
    assert again == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert build._build('local_conv.c', HEADS=2, KSIZE=5) != first  # one library per (heads, kernel size)
    assert sorted(p.suffix for p in fresh_builds.iterdir()) == ['.so', '.so']


def test_no_compiler_warns_once_and_every_op_falls_back(fresh_builds, monkeypatch):
    """No usable compiler: one warning naming the command, then torch's operators for every kernel and shape (each
    kernel tried once, no new warning); nothing half-written is left in the cache."""
    monkeypatch.setenv('CC', 'false')
    with pytest.warns(RuntimeWarning, match='false'):
        assert local_conv_kernels(4, 3) is None
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # not warned again, for this shape or others
        torch.testing.assert_close(local_conv2d(x, weight), F.conv2d(x, weight, padding=1))
        assert local_conv_kernels(6, 3) is None
        assert folded_refiner_kernel(4, 12, 3) is None
        assert attention_probs_kernel(32) is None
    assert not fresh_builds.exists() or list(fresh_builds.iterdir()) == []


@needs_compiler
def test_a_kernel_that_fails_to_build_disables_only_itself(fresh_builds, monkeypatch, tmp_path):
    monkeypatch.setenv('CC', _fake_compiler(tmp_path, 'attention_probs.c'))
    with pytest.warns(RuntimeWarning, match='attention_probs.c'):
        assert attention_probs_kernel(16) is None
    assert local_conv_kernels(4, 3) is not None
    assert folded_refiner_kernel(4, 12, 3) is not None


@needs_compiler
def test_without_openmp_the_kernels_build_for_one_thread(fresh_builds, monkeypatch, tmp_path):
    monkeypatch.setenv('CC', _fake_compiler(tmp_path, '-fopenmp'))
    kernels = local_conv_kernels(4, 3)
    assert kernels is not None and '_serial_' in kernels.path.name
    x, weight = torch.randn(2, 4, 9, 13), torch.randn(4, 4, 3, 3)
    torch.testing.assert_close(kernels.conv(x, weight), F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which('clang') is None, reason='clang is not installed (make clang)')
def test_every_kernel_builds_with_clang_and_matches_torch(fresh_builds, monkeypatch):
    monkeypatch.setenv('CC', 'clang')
    gen = torch.Generator().manual_seed(0)
    x, weight, grad = (torch.randn(*shape, generator=gen) for shape in ((2, 6, 19, 23), (6, 6, 3, 3), (2, 6, 19, 23)))
    conv = local_conv_kernels(6, 3)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    out = F.conv2d(x64, w64, padding=1)
    grad_x, grad_w = torch.autograd.grad(out, (x64, w64), grad.double())
    for actual, expected in ((conv.conv(x, weight), out), (conv.conv(grad, input_grad_weight(weight)), grad_x),
                             (conv.weight_grad(x, grad), grad_w)):
        torch.testing.assert_close(actual.double(), expected.detach(), rtol=1e-5, atol=1e-4)

    q, k = torch.randn(2, 3, 21, 16, generator=gen), torch.randn(2, 3, 21, 16, generator=gen)
    prev = torch.rand(2, 3, 21, 21, generator=gen)
    expected = (0.3 * q.double() @ k.double().transpose(-2, -1)).softmax(-1) + 0.5 * prev.double()
    torch.testing.assert_close(attention_probs_kernel(16)(q, k, 0.3, prev, 0.5).double(), expected, atol=1e-6,
                               rtol=1e-5)

    weights = [torch.randn(*s, generator=gen) for s in ((12, 4, 1, 1), (12,), (12, 1, 3, 3), (12,), (4, 12, 1, 1),
                                                         (4,), (4,))]
    maps = torch.rand(2, 4, 15, 15, generator=gen)
    ew, eb, cw, cb, rw, rb, scale = (w.double() for w in weights)
    y = F.relu6(F.conv2d(maps.double(), ew, eb))
    y = F.conv2d(F.relu6(F.conv2d(y, cw, cb, padding=1, groups=12)), rw, rb) + scale.view(1, -1, 1, 1) * maps
    torch.testing.assert_close(folded_refiner_kernel(4, 12, 3)(maps, *weights).double(), y, rtol=1e-5, atol=1e-4)


def test_unwritable_cache_falls_back_to_a_temporary_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(build.ENV_CACHE, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'home-cache'))
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(build.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
    assert build.cache_dir() == tmp_path / 'home-cache' / 'refiner_vit' / 'kernels'
    monkeypatch.setattr(build.os, 'access', lambda path, mode: False)  # as for a read-only home, even as root
    chosen = build.cache_dir()
    assert chosen.parent == tmp_path / 'tmp' and chosen.name.startswith('refiner_vit-kernels-')


@pytest.mark.skipif(not hasattr(os, 'getuid'), reason='file ownership is a POSIX notion')
def test_temporary_cache_folder_is_private(monkeypatch, tmp_path):
    """A predictable /tmp folder that someone else can write is not used: libraries loaded from it would run."""
    monkeypatch.setattr(build.tempfile, 'gettempdir', lambda: str(tmp_path))
    mine = build._private_temp_dir()
    assert mine.parent == tmp_path and mine.stat().st_mode & 0o777 == 0o700
    mine.chmod(0o777)  # as if another user had created it world-writable
    other = build._private_temp_dir()
    assert other != mine and other.parent == tmp_path and other.stat().st_mode & 0o077 == 0


def test_no_compiler_at_all_the_models_run_on_torch_operators(tmp_path):
    """The suite's promise for a machine without a C compiler, in a process of its own: models build, run forward
    and backward with the same outputs as with the kernels switched off, with at most one warning."""
    script = '''
import os, warnings, torch, timm, refiner_vit
def run():
    torch.manual_seed(0)
    outs = []
    for name, kw, size in (('test_refiner_vit', {}, 64), ('refined_deit_tiny_patch16_224', dict(img_size=32,
                           patch_size=8, depth=2), 32)):
        model = timm.create_model(name, **kw)
        x = torch.randn(2, 3, size, size)
        model(x).sum().backward()
        with torch.no_grad():
            outs += [model.eval()(x), refiner_vit.fuse_for_inference(model)(x)]
    return outs
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    hidden = run()
os.environ['REFINER_NATIVE_KERNELS'] = '0'
plain = run()
for a, b in zip(hidden, plain):
    torch.testing.assert_close(a, b, rtol=0, atol=0)
ours = [w for w in caught if 'refiner_vit' in str(w.message)]
assert len(ours) == 1 and 'could not be built' in str(ours[0].message), [str(w.message) for w in caught]
print('ok')
'''
    done = subprocess.run([sys.executable, '-c', script], env=_without_compiler(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-3000:]


def _without_compiler(tmp_path: Path) -> dict:
    return {**os.environ, 'CC': str(tmp_path / 'no-such-compiler'), build.ENV_CACHE: str(tmp_path / 'cache'),
            'REFINER_NATIVE_KERNELS': 'auto'}


def test_no_compiler_at_all_the_kernel_tests_skip_with_their_reason(tmp_path):
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', str(tests / 'test_kernels.py'),
         str(tests / 'test_ops_attention_probs.py')],
        env=_without_compiler(tmp_path), capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert done.returncode == 0, done.stdout[-3000:]
    assert 'no C compiler' in done.stdout and ' passed' in done.stdout and 'failed' not in done.stdout
