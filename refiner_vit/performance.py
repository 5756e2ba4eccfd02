"""Throughput, FLOPs and memory of models, next to the machine's own fp32 matmul rate.

A refined attention layer must materialise its maps, so its speed is a question of how close to the
matmul rate the whole model runs. :func:`run_benchmark` therefore measures, in one process run:

* ``gemm_peak_gflops``: the fp32 rate of a large square matmul, the practical ceiling on this device;
* per model and mode (``infer``: eval forward under ``inference_mode``; ``train``: forward, cross-entropy,
  backward and an SGD step): images/s as the median over timed steps after warm-up, GFLOPs per image
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions only, forward
  plus backward in training), and achieved GFLOP/s = GFLOPs per image x images/s;
* ``peak_mem_mb`` (train only): parameters, buffers and input, plus the largest amount of memory a
  training step holds above that at any moment. On CUDA this is ``torch.cuda.max_memory_allocated``; on
  CPU, where no allocator statistics exist, it is read from the allocation events the torch profiler
  records with ``profile_memory=True`` (the running total of bytes allocated through torch's CPU
  allocator), which counts exactly the tensors torch holds and nothing of the process' RSS noise.

All steps (the GEMM included) are timed round-robin, one of each per round, so that a shared machine's drifting
load hits them alike: ratios between the rows of one run are meaningful even when absolute numbers are not.
"""
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError
from .ops import ENV_MODE, mode_set, recording
from .ops.build import cpu_flags

__all__ = ['BenchResult', 'Case', 'MODES', 'count_flops', 'format_table', 'prepare_case', 'run_benchmark', 'run_cases']

MODES = ('infer', 'train')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class BenchResult:
    """One row of the benchmark: a model in one mode."""

    model: str
    mode: str
    img_per_s: float
    gflops_per_img: float
    achieved_gflops: float
    peak_mem_mb: Optional[float]
    ops: Dict[str, Dict[str, int]] = field(default_factory=dict)


# Instruction sets that decide which kernels and which of torch's code paths can run (x86 and ARM names).
ISA_FLAGS = ('avx512f', 'avx512_bf16', 'amx_tile', 'avx2', 'fma', 'avx', 'sse4_2', 'asimd', 'sve')
# The environment variables that cap the instruction set torch's own kernels use (ATen's vectorised operators, MKL's
# GEMMs, oneDNN's convolutions): set together, an AVX-512 CPU runs torch as an AVX2-only CPU would.
ISA_CAPS = ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'ONEDNN_MAX_CPU_ISA')


def machine_info() -> Dict[str, Any]:
    """What a result depends on besides the code: CPU model, its instruction sets, threads, torch, kernel settings."""
    import timm

    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            model = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), model)
    except OSError:
        pass
    flags = set(cpu_flags().split())
    return {
        'cpu': model, 'isa': [f for f in ISA_FLAGS if f in flags],
        'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(),
        'torch': torch.__version__, 'timm': timm.__version__,
        'native_kernels': os.environ.get(ENV_MODE, 'auto'), 'kernel_cc': os.environ.get('CC') or 'cc',
        'isa_caps': {name: os.environ[name] for name in ISA_CAPS if name in os.environ},
    }


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(x)
    nn.functional.cross_entropy(out, target).backward()
    optimizer.step()


def _count_cpu_flash_attention() -> None:
    """Make ``FlopCounterMode`` count the CPU's fused attention as torch counts the GPUs' (its forward's two batched
    matmuls; its backward's five, the recomputed scores among them, as a refiner's recompute is counted).

    torch registers formulas for the CUDA kernels of ``scaled_dot_product_attention`` only; its CPU kernel counted
    zero, so DeiT-S's attention matmuls (9 % of its training FLOPs) were missing from its share of the GEMM peak,
    while a refined model's materialised attention counts in full."""
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # already takes shapes


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of ``step()`` as torch's ``FlopCounterMode`` counts them (matrix products and convolutions), timm's fused
    attention on the CPU included (:func:`_count_cpu_flash_attention`)."""
    _count_cpu_flash_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _state_bytes(model: nn.Module, x: torch.Tensor) -> int:
    tensors = list(model.parameters()) + list(model.buffers()) + [x]
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_step_peak_bytes(step: Callable[[], None]) -> int:
    """Largest number of bytes held through torch's CPU allocator during ``step`` above those held before it."""
    from torch._C._profiler import _EventType  # the event kinds torch's own memory profiler reads

    # Kineto otherwise logs "ERROR ... gpuGetDeviceCount failed" on machines without a GPU; nothing is wrong.
    os.environ.setdefault('KINETO_LOG_LEVEL', '5')
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    events = []
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    if not events:
        return 0
    events.sort()
    # The running total carries over from earlier profiling sessions (frees between sessions go unreported),
    # so measure from the total just before this step's first event.
    _, first_total, first_size = events[0]
    return max(total for _, total, _ in events) - (first_total - first_size)


def train_peak_memory_mb(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """Memory of one training step from zeroed gradients: model state + input + the step's peak above that."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    model.zero_grad(set_to_none=True)
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        _train_step(model, x, target, optimizer)
        torch.cuda.synchronize(x.device)
        extra = torch.cuda.max_memory_allocated(x.device) - before
    else:
        extra = _cpu_step_peak_bytes(lambda: _train_step(model, x, target, optimizer))
    return (_state_bytes(model, x) + extra) / 2 ** 20


def _create_model(name: str, img_size: Optional[int], device: torch.device, model_args: Dict[str, Any],
                  source_options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model a ``--model`` entry names (any source :func:`refiner_vit.models.resolve.resolve_model` takes;
    ``source_options``: its ``checkpoint`` / ``pretrained``)."""
    from .models.resolve import resolve_model

    resolved = resolve_model(name, model_kwargs=model_args, img_size=img_size, **(source_options or {}))
    return resolved.model.to(device)


@dataclass
class Case:
    """A prepared measurement: one step of one model in one mode, with its FLOPs and memory already counted."""

    label: str
    mode: str
    step: Callable[[], None]
    batch_size: int
    flops: float
    peak_mem_mb: Optional[float]
    ops: Dict[str, Dict[str, int]]


def _ops_used(step: Callable[[], None]) -> Dict[str, Dict[str, int]]:
    """Which implementation each op of ``step`` ran, and why: ``{op: {'native (measured faster)': calls, ...}}``."""
    with recording() as record:
        step()
    return {op: dict(counts) for op, counts in sorted(record.items())}


def prepare_case(
        name: str,
        mode: str,
        batch_size: int,
        img_size: Optional[int] = None,
        device: Optional[torch.device] = None,
        prepare: Optional[Callable[[nn.Module, str], nn.Module]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        label: Optional[str] = None,
        amp: Optional[str] = None,
        torch_compile: bool = False,
        kernels: Optional[str] = None,
        grad_checkpointing: bool = False,
        count_memory: bool = True,
        source_options: Optional[Dict[str, Any]] = None,
) -> Case:
    """Build ``name`` for ``mode``, let ``prepare(model, mode)`` transform it, count its FLOPs and memory.

    ``amp`` (``'bf16'`` or ``'fp16'``) runs the step under autocast to that dtype (matmuls and convolutions in it,
    softmax and norms in fp32). ``grad_checkpointing`` trains with ``model.set_grad_checkpointing(True)``.
    ``torch_compile`` times ``torch.compile(model)``, compiled here by one untimed step. FLOPs are counted on
    the eager model (the same function), so compiled and eager rows stay comparable. ``kernels`` sets
    ``REFINER_NATIVE_KERNELS`` around every step of the case (None: the process's setting). ``count_memory=False``
    skips the training step's memory count (on the CPU a profiled replay of the step: minutes for large models).
    """
    device = device or torch.device('cpu')
    model = _create_model(name, img_size, device, model_args or {}, source_options).train(mode == 'train')
    if grad_checkpointing and mode == 'train':
        model.set_grad_checkpointing(True)
    if prepare is not None:
        model = prepare(model, mode)
    size = model.pretrained_cfg['input_size'][1:] if img_size is None else (img_size, img_size)
    x = torch.randn(batch_size, 3, *size, device=device)
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp is not None)
    num_classes = getattr(model, 'num_classes', 0) or 1
    target = torch.randint(0, num_classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def make_step(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            if mode == 'infer':
                with torch.inference_mode(), autocast, mode_set(kernels):
                    module(x)
            else:
                with autocast, mode_set(kernels):
                    _train_step(module, x, target, optimizer)
        return step

    flops = count_flops(make_step(model))
    if torch_compile:
        model = torch.compile(model)
    # an untimed step: compiles, and makes the ops' first-use choices outside the timed and memory-counted steps
    ops = _ops_used(make_step(model))
    peak_mem = None
    if mode == 'train' and count_memory:
        with autocast, mode_set(kernels):
            peak_mem = train_peak_memory_mb(model, x, target)
    return Case(label or name, mode, make_step(model), batch_size, flops, peak_mem, ops)


def interleaved_medians(
        steps: Sequence[Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Median seconds of each step, timed round-robin (one step of each per round).

    On a shared machine the load drifts; timing the cases in turn exposes them all to the same drift, so
    their ratios stay meaningful even when the absolute numbers do not.
    """
    for step in steps:
        for _ in range(warmup):
            step()
    times: List[List[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def run_cases(
        cases: Sequence[Case], device: torch.device, warmup: int = 2, repeats: int = 10, gemm_size: int = 4096,
) -> Dict[str, object]:
    """Time a ``gemm_size`` square fp32 matmul and ``cases`` interleaved; returns the report dict."""
    a = torch.randn(gemm_size, gemm_size, device=device)
    b = torch.randn(gemm_size, gemm_size, device=device)
    seconds = interleaved_medians([lambda: torch.mm(a, b)] + [c.step for c in cases], device, warmup, repeats)
    rows = []
    for case, sec in zip(cases, seconds[1:]):
        img_per_s = case.batch_size / sec
        gflops = case.flops / case.batch_size / 1e9
        rows.append(asdict(BenchResult(case.label, case.mode, img_per_s, gflops, gflops * img_per_s, case.peak_mem_mb,
                                       case.ops)))
    return {'gemm_peak_gflops': 2 * gemm_size ** 3 / seconds[0] / 1e9, 'results': rows}


def run_benchmark(
        models: Sequence[str],
        modes: Sequence[str] = MODES,
        batch_size: int = 16,
        img_size: Optional[int] = None,
        device: str = 'cpu',
        warmup: int = 2,
        repeats: int = 10,
        gemm_size: int = 4096,
        prepare: Optional[Callable[[nn.Module, str], nn.Module]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        amp: Optional[str] = None,
        torch_compile: bool = False,
        kernels: Sequence[Optional[str]] = (None,),
        grad_checkpointing: bool = False,
        variant_kwargs: Sequence[Dict[str, Any]] = ({},),
        count_memory: bool = True,
        source_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, object]:
    """Benchmark ``models`` in ``modes``; returns ``{"gemm_peak_gflops": float, "results": [row, ...], "machine":
    {...}}`` (:func:`machine_info`); each row says which implementation each op ran (``ops``).

    ``model_args`` go to every ``timm.create_model`` call (e.g. a small config of a registered family);
    ``prepare(model, mode)`` transforms each model before it is measured (e.g. :func:`fuse_for_inference`);
    ``amp`` (``'bf16'``, ``'fp16'``) measures under autocast (the GEMM peak stays fp32); ``grad_checkpointing`` trains
    with the models' gradient checkpointing (rows ``NAME+ckpt``); ``torch_compile`` measures
    ``torch.compile(model)`` instead of the eager model (rows labelled ``NAME+compile``); each of ``kernels``
    (``REFINER_NATIVE_KERNELS`` values, None for the process's own) and each of ``variant_kwargs`` (model arguments
    added to ``model_args``) gives every model its own rows, labelled ``NAME [kernels=V]`` / ``NAME [K=V]`` when
    there are several, timed in the same rounds. ``count_memory=False`` skips the training memory count.
    ``source_options`` (``checkpoint``, ``pretrained``) go to every model's resolver call.

    Raises:
        ConfigError: an unknown mode, ``device='cuda'`` without CUDA, or a model that cannot be built as asked.
        WeightsError: a model source or its weights that cannot be used (:func:`~refiner_vit.models.resolve_model`).
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ConfigError(f'unknown mode(s) {unknown}; choose from {MODES}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ConfigError('--device cuda: no CUDA device is available')
    dev = torch.device(device)
    torch.manual_seed(0)
    cases = [prepare_case(name, mode, batch_size, img_size, dev, prepare, {**(model_args or {}), **extra},
                          label=_label(name, torch_compile, grad_checkpointing and mode == 'train',
                                       setting if len(kernels) > 1 else None, extra if len(variant_kwargs) > 1 else {}),
                          amp=amp, torch_compile=torch_compile, kernels=setting, grad_checkpointing=grad_checkpointing,
                          count_memory=count_memory, source_options=source_options)
             for name in models for mode in modes for extra in variant_kwargs for setting in kernels]
    report = run_cases(cases, dev, warmup, repeats, gemm_size)
    report['machine'] = machine_info()
    return report


def _label(name: str, torch_compile: bool, grad_checkpointing: bool, kernels: Optional[str],
           extra: Dict[str, Any]) -> str:
    settings = ([] if kernels is None else [f'kernels={kernels}']) + [f'{k}={v}' for k, v in extra.items()]
    return (name + ('+compile' if torch_compile else '') + ('+ckpt' if grad_checkpointing else '')
            + (f" [{', '.join(settings)}]" if settings else ''))


def format_table(report: Dict[str, object]) -> str:
    """The report as a fixed-width text table, with achieved GFLOP/s also as a share of the GEMM peak, then the
    machine and the implementation each op ran."""
    peak = report['gemm_peak_gflops']
    width = max([len('model')] + [len(row['model']) for row in report['results']])
    lines = [
        f'fp32 GEMM peak: {peak:.1f} GFLOP/s',
        f"{'model':<{width}} {'mode':<6} {'img/s':>9} {'GFLOPs/img':>11} {'GFLOP/s':>9} {'% peak':>7} {'peak MB':>9}",
    ]
    for row in report['results']:
        mem = '-' if row['peak_mem_mb'] is None else f"{row['peak_mem_mb']:.0f}"
        lines.append(
            f"{row['model']:<{width}} {row['mode']:<6} {row['img_per_s']:>9.2f} {row['gflops_per_img']:>11.3f} "
            f"{row['achieved_gflops']:>9.1f} {100 * row['achieved_gflops'] / peak:>6.1f}% {mem:>9}"
        )
    machine = report.get('machine')
    if machine:
        lines.append(f"machine: {machine['cpu']} ({', '.join(machine['isa']) or 'no listed ISA flags'}), "
                     f"{machine['threads']} threads, torch {machine['torch']}, "
                     f"REFINER_NATIVE_KERNELS={machine['native_kernels']}, CC={machine['kernel_cc']}"
                     + ''.join(f', {name}={value}' for name, value in machine.get('isa_caps', {}).items()))
    for row in report['results']:
        if row.get('ops'):
            used = '; '.join(f'{op} ' + ', '.join(f'{how} x{calls}' for how, calls in counts.items())
                             for op, counts in row['ops'].items())
            lines.append(f"ops of {row['model']} {row['mode']}: {used}")
    return '\n'.join(lines)
