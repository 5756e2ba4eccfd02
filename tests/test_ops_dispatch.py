"""The rule that picks an op's implementation: measured on first use, remembered across processes, overridable."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from refiner_vit.ops import dispatch, recording


@pytest.fixture
def fake_library(monkeypatch, tmp_path) -> Path:
    """A stand-in kernel library in an empty cache, with this process's remembered choices forgotten."""
    monkeypatch.setattr(dispatch, '_choices', {})
    monkeypatch.delenv(dispatch.ENV_MODE, raising=False)
    library = tmp_path / 'fake_kernel_heads4_0123456789abcdef.so'
    library.touch()
    return library


def _calls(sleep_native: float, sleep_torch: float, log: list):
    def native():
        log.append('native')
        time.sleep(sleep_native)

    def reference():
        log.append('torch')
        time.sleep(sleep_torch)
    return lambda: (native, reference)


def _choose(library: Path, candidates, shape=(2, 4, 9, 9)) -> bool:
    return dispatch.choose('fake_op', True, lambda: library, shape, candidates)


def test_a_slow_native_kernel_loses_to_torch(fake_library):
    log = []
    assert not _choose(fake_library, _calls(0.02, 0.0, log))
    assert log.count('native') == log.count('torch') >= 2  # a warm-up call each, then interleaved rounds


def test_a_fast_native_kernel_wins_and_is_measured_once(fake_library):
    log = []
    assert _choose(fake_library, _calls(0.0, 0.02, log))
    calls = len(log)
    assert _choose(fake_library, _calls(0.0, 0.02, log)) and len(log) == calls  # remembered in this process
    assert not _choose(fake_library, _calls(0.02, 0.0, log), shape=(3, 4, 9, 9))  # another shape: measured anew


def test_a_near_tie_keeps_torch(fake_library):
    """Native must be faster by a clear margin; an equal time is noise, not a reason to run a kernel."""
    assert not _choose(fake_library, _calls(0.01, 0.01, []))


@pytest.mark.parametrize('seconds,calls', [(0.15, 2), (0.25, 1)])
def test_the_measurement_stays_within_its_budget(fake_library, seconds, calls):
    """Slow calls get fewer rounds: after the first call each, one more round at most when a round costs about the
    budget, none when the first calls alone overran it."""
    log = []
    _choose(fake_library, _calls(seconds, seconds, log))
    assert log.count('native') == log.count('torch') == calls


def test_the_choice_persists_across_processes(fake_library):
    assert _choose(fake_library, _calls(0.0, 0.02, []))
    files = list(fake_library.parent.glob('*.choice.json'))
    assert len(files) == 1 and json.loads(files[0].read_text())['native'] is True
    assert f't{torch.get_num_threads()}' in files[0].name and torch.__version__ in files[0].name
    script = (  # a new process whose candidates would now lose, and must not even be measured
        'import sys; from pathlib import Path; from refiner_vit.ops import dispatch\n'
        'def never(): raise AssertionError("measured again")\n'
        f'print(dispatch.choose("fake_op", True, lambda: Path({str(fake_library)!r}), (2, 4, 9, 9), never))\n')
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_MODE}
    env['OMP_NUM_THREADS'] = str(torch.get_num_threads())  # the same thread count: the same choice
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == 'True', done.stderr[-2000:]


def test_another_thread_count_is_measured_anew(fake_library):
    assert _choose(fake_library, _calls(0.0, 0.02, []))
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        assert not _choose(fake_library, _calls(0.02, 0.0, []))
    finally:
        torch.set_num_threads(before)


def test_a_damaged_choice_file_is_measured_again(fake_library):
    assert _choose(fake_library, _calls(0.0, 0.02, []))
    (choice,) = fake_library.parent.glob('*.choice.json')
    choice.write_text('{not json')
    dispatch._choices.clear()
    assert not _choose(fake_library, _calls(0.02, 0.0, []))


@pytest.mark.parametrize('value,native', [('0', False), ('1', True)])
def test_the_environment_overrides_the_rule(fake_library, monkeypatch, value, native):
    monkeypatch.setenv(dispatch.ENV_MODE, value)
    log = []
    with recording() as record:
        fast_or_slow = _calls(0.0, 0.02, log) if value == '0' else _calls(0.02, 0.0, log)
        assert _choose(fake_library, fast_or_slow) is native
    assert log == []  # nothing measured
    assert record['fake_op'] == {f'{"native" if native else "torch"} (REFINER_NATIVE_KERNELS={value})': 1}


def test_an_unknown_mode_warns_and_means_auto(fake_library, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, 'yes')
    with pytest.warns(RuntimeWarning, match='auto'):
        assert _choose(fake_library, _calls(0.0, 0.02, []))


def test_a_kernel_that_cannot_be_built_or_does_not_apply_is_not_measured(fake_library):
    def never():
        raise AssertionError('measured')

    with recording() as record:
        assert not dispatch.choose('fake_op', True, lambda: None, (1,), never)
        assert not dispatch.choose('fake_op', False, lambda: fake_library, (1,), never)
    assert record['fake_op'] == {'torch (not built)': 1, 'torch (not applicable)': 1}


def test_models_record_what_each_op_ran(monkeypatch):
    """In the default mode every op of an eval model is measured on first use, then reused."""
    monkeypatch.setattr(dispatch, '_choices', {})
    model = timm.create_model('test_refiner_vit').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), recording() as first:
        model(x)
    with torch.no_grad(), recording() as again:
        model(x)
    assert set(first) == {'attention_probs'}  # the unfused released refiner runs its stages
    assert sum(first['attention_probs'].values()) == 2  # the two computing blocks
    reasons = {how.split(' (')[1] for counts in (first, again) for how in counts['attention_probs']}
    assert reasons <= {'measured faster)', 'measured slower)', 'measured earlier)', 'not built)'}


def test_ops_sharing_a_library_and_shape_keep_their_own_choices(fake_library):
    """The local convolution's forward and weight gradient live in one library and meet the same shapes."""
    assert dispatch.choose('forward', True, lambda: fake_library, (2, 4, 9, 9), _calls(0.0, 0.02, []))
    assert not dispatch.choose('weight_grad', True, lambda: fake_library, (2, 4, 9, 9), _calls(0.02, 0.0, []))
    dispatch._choices.clear()  # as a new process: from the files
    never = _calls(0.02, 0.02, ['unused'])
    assert dispatch.choose('forward', True, lambda: fake_library, (2, 4, 9, 9), never)
    assert not dispatch.choose('weight_grad', True, lambda: fake_library, (2, 4, 9, 9), never)
    assert len(list(fake_library.parent.glob('*.choice.json'))) == 2
