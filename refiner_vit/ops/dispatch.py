"""Which implementation an op runs: its native kernel or torch's operators.

The rule: a native kernel runs only where it was measured faster than torch's operators, on this machine, for this
shape. The first time an op meets a (shape, thread count) for which a native kernel applies, both implementations
run a few times on the real inputs, interleaved, and the faster one (native only by a clear margin) is chosen. The
choice is written next to the kernel's library in the kernel cache, so every later process reuses it; its name
holds the library's own key (source, shape, compiler command, CPU flags), the input shape, the thread count and
torch's version, since the operators it competes with change with torch.

``REFINER_NATIVE_KERNELS`` overrides the rule: ``auto`` (the default), ``1`` (always native where a kernel applies
and builds: for tests and measurements) or ``0`` (never).

A kernel applies to fp32 CPU tensors outside autocast (whose operators would compute in another dtype), not while the
model is exported or jit-traced, in eager mode on plain tensors (no subclass, FX proxy, fake tensor or torch.func
wrapper) with no dispatch mode active. Under ``torch.compile`` nothing can be measured, so ``auto`` means torch's
operators, which the compiler fuses itself; ``1`` puts the kernels in the graph as opaque operators.
"""
import collections
import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils import _python_dispatch

__all__ = [
    'ENV_MODE', 'Choice', 'choose', 'exporting', 'mode', 'mode_set', 'native_applicable', 'plain_tensors', 'recording',
]

ENV_MODE = 'REFINER_NATIVE_KERNELS'
_MODES = {'auto': 'auto', '': 'auto', '1': 'native', '0': 'torch'}
NATIVE_MARGIN = 0.95  # native must take at most this share of torch's time: noise does not pick it
_TIMING_BUDGET_S = 0.4  # seconds of timed calls per choice, both implementations together, after one call each
_MAX_ROUNDS = 5

Call = Callable[[], object]


def mode() -> str:
    """``'auto'``, ``'native'`` or ``'torch'``, from ``REFINER_NATIVE_KERNELS`` (``auto``, ``1``, ``0``)."""
    value = os.environ.get(ENV_MODE, 'auto').strip().lower()
    if value not in _MODES:
        warnings.warn(f'{ENV_MODE}={value!r} is not auto, 1 or 0; using auto', RuntimeWarning, stacklevel=3)
        os.environ[ENV_MODE] = 'auto'  # warn once
        value = 'auto'
    return _MODES[value]


@contextlib.contextmanager
def mode_set(value: Optional[str]) -> Iterator[None]:
    """``REFINER_NATIVE_KERNELS=value`` inside the block (``auto``, ``1``, ``0``; None changes nothing), so that one
    process can compare the settings."""
    before = os.environ.get(ENV_MODE)
    if value is not None:
        os.environ[ENV_MODE] = value
    try:
        yield
    finally:
        if value is not None and before is None:
            del os.environ[ENV_MODE]
        elif value is not None:
            os.environ[ENV_MODE] = before


@torch.compiler.assume_constant_result
def _forced_native() -> bool:
    """``REFINER_NATIVE_KERNELS=1``, read once per compiled graph."""
    return mode() == 'native'


def exporting() -> bool:
    """True while torch.export (or, on torch versions that cannot tell, any compiler) or jit tracing records the
    model: exported programs must hold standard operators."""
    if torch.jit.is_tracing():
        return True
    if not torch.compiler.is_compiling():
        return False
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return is_exporting is None or is_exporting()


def plain_tensors(*tensors: torch.Tensor) -> bool:
    """Real tensors of eager mode: no subclass, FX proxy, fake tensor or torch.func wrapper, no dispatch mode."""
    is_wrapped = getattr(torch._C._functorch, 'is_functorch_wrapped_tensor', lambda t: False)
    return (all(type(t) in (torch.Tensor, nn.Parameter) and not is_wrapped(t) for t in tensors)
            and _python_dispatch._get_current_dispatch_mode() is None)


def native_applicable(*tensors: torch.Tensor) -> bool:
    """Whether a native kernel may stand in for torch's operators on these tensors here and now (see the module)."""
    if any(t.device.type != 'cpu' or t.dtype != torch.float32 for t in tensors) or exporting() \
            or torch.is_autocast_enabled('cpu'):
        return False
    return torch.compiler.is_compiling() or plain_tensors(*tensors)


@dataclass(frozen=True)
class Choice:
    """What an op ran, and why; where it was measured, the fastest call's milliseconds of each implementation and the
    seconds the measurement took."""

    native: bool
    reason: str
    native_ms: Optional[float] = None
    torch_ms: Optional[float] = None
    measure_s: Optional[float] = None

    @property
    def implementation(self) -> str:
        return 'native' if self.native else 'torch'


_choices: Dict[Tuple, Choice] = {}  # this process's measured (or read) choices
_records: List[Dict[str, collections.Counter]] = []  # open recording() contexts


def _record(op: str, choice: Choice) -> None:
    for record in _records:
        record[op][f'{choice.implementation} ({choice.reason})'] += 1


@contextlib.contextmanager
def recording() -> Iterator[Dict[str, collections.Counter]]:
    """Counts the calls of each op by implementation and reason while open: ``{op: Counter({'native (measured
    faster)': 12, ...})}``, so that a benchmark can say what each model ran."""
    record: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    _records.append(record)
    try:
        yield record
    finally:
        _records.remove(record)


def measure(native: Call, reference: Call) -> Tuple[float, float]:
    """Milliseconds of the fastest timed call of ``native`` and of ``reference`` (other load on the machine only ever
    adds time): one call each (its one-time costs are small beside calls that alone overrun ``_TIMING_BUDGET_S``,
    whose times it then gives), then rounds of one call each, alternating which goes first, while the budget allows,
    at most ``_MAX_ROUNDS``."""
    def timed(call: Call) -> float:
        began = time.perf_counter()
        call()
        return time.perf_counter() - began

    with torch.no_grad():
        first = timed(native), timed(reference)
        if sum(first) > _TIMING_BUDGET_S:
            return 1e3 * first[0], 1e3 * first[1]
        times: Tuple[List[float], List[float]] = ([], [])
        start = time.perf_counter()
        for round_ in range(_MAX_ROUNDS):
            for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                times[which].append(timed((native, reference)[which]))
            spent = time.perf_counter() - start
            if spent * (round_ + 2) / (round_ + 1) > _TIMING_BUDGET_S:  # another round would overrun the budget
                break
    return 1e3 * min(times[0]), 1e3 * min(times[1])


def _choice_file(op: str, library: Path, shape: Tuple[int, ...], threads: int) -> Path:
    """``LIBRARY.OP.SHAPE.tTHREADS.torchVERSION.choice.json`` beside the library (one library serves several ops)."""
    size = 'x'.join(map(str, shape))
    return library.with_name(f'{library.stem}.{op}.{size}.t{threads}.torch{torch.__version__}.choice.json')


def _read_choice(path: Path) -> Optional[Choice]:
    try:
        data = json.loads(path.read_text())
        return Choice(bool(data['native']), 'measured earlier', data.get('native_ms'), data.get('torch_ms'),
                      data.get('measure_s'))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not measured yet, or a damaged file: measure again


def _write_choice(path: Path, choice: Choice) -> None:
    """Atomically, so that a concurrent reader sees the whole file or none; a read-only cache costs a re-measure."""
    partial = path.with_name(f'{path.name}.{os.getpid()}.partial')
    try:
        partial.write_text(json.dumps(asdict(choice)))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()


def _decide(op: str, library: Path, shape: Tuple[int, ...], candidates: Callable[[], Tuple[Call, Call]]) -> Choice:
    threads = torch.get_num_threads()
    key = (op, library, shape, threads)
    if key in _choices:
        return _choices[key]
    path = _choice_file(op, library, shape, threads)
    choice = _read_choice(path)
    if choice is None:
        began = time.perf_counter()
        native_ms, torch_ms = measure(*candidates())
        native = native_ms <= NATIVE_MARGIN * torch_ms
        choice = Choice(native, 'measured faster' if native else 'measured slower', native_ms, torch_ms,
                        time.perf_counter() - began)
        _write_choice(path, choice)
    _choices[key] = choice
    return choice


def choose(op: str, applicable: bool, library: Callable[[], Optional[Path]], shape: Tuple[int, ...],
           candidates: Callable[[], Tuple[Call, Call]]) -> bool:
    """Whether ``op`` runs its native kernel for inputs of ``shape``; the choice is recorded (:func:`recording`).

    Args:
        op: The op's name, as reports show it.
        applicable: Whether the kernel can compute this call at all (:func:`native_applicable` and the op's own
            conditions on shapes and arguments).
        library: Builds (on first use) and returns the path of the kernel's library, or None where it cannot be built.
        shape: What the choice depends on besides the library (the input's full shape).
        candidates: ``() -> (native call, torch call)`` on the real inputs, for a first measurement.
    """
    if torch.compiler.is_compiling():  # before anything the compiler would have to trace
        return applicable and _forced_native()
    if not applicable:
        choice = Choice(False, 'not applicable')
    elif mode() == 'torch':
        choice = Choice(False, f'{ENV_MODE}=0')
    else:
        path = library()
        if path is None:
            choice = Choice(False, 'not built')
        elif mode() == 'native':
            choice = Choice(True, f'{ENV_MODE}=1')
        else:
            choice = _decide(op, path, shape, candidates)
    if _records:
        _record(op, choice)
    return choice.native
