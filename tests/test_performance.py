"""Fast paths against the plain stage-by-stage refiner, inference fusion, and the benchmark harness."""
import copy
import json
import warnings

import pytest
import timm
import torch
from helpers import randomise_batchnorms
from timm.layers import LayerScale
from torch import nn

import refiner_vit
from refiner_vit.cli import main as refiner_cli
from refiner_vit.layers import AttentionRefiner, FoldedRefiner
from refiner_vit.performance import (
    ISA_CAPS,
    _cpu_step_peak_bytes,
    count_flops,
    format_table,
    machine_info,
    prepare_case,
)


def _random_maps(B: int, H: int, N: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(B, H, N, N, generator=generator, dtype=torch.float64).softmax(-1)


@pytest.mark.parametrize('shortcut', [False, True])
@pytest.mark.parametrize('kernel_size,expansion_ratio', [(3, 3), (5, 2)])
def test_composed_refiner_equals_the_stages_forward_and_backward(shortcut, kernel_size, expansion_ratio):
    g = torch.Generator().manual_seed(0)
    refiner = AttentionRefiner(4, expansion_ratio, kernel_size, shortcut=shortcut).double()
    attn = _random_maps(2, 4, 11, g).requires_grad_()
    fast, plain = refiner(attn), refiner.forward_stages(attn)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    inputs = [attn, *refiner.parameters()]
    grads_fast = torch.autograd.grad((fast * upstream).sum(), inputs)
    grads_plain = torch.autograd.grad((plain * upstream).sum(), inputs)
    for name, a, b in zip(['attn', *dict(refiner.named_parameters())], grads_fast, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f'gradient of {name}')


@pytest.mark.parametrize('native', ['0', '1'])
def test_refined_attention_in_float32_equals_the_float64_stages_forward_and_backward(native, monkeypatch):
    """The model's path (composed weight, torch's or the native convolution) against the stage-by-stage refiner in
    float64."""
    monkeypatch.setenv('REFINER_NATIVE_KERNELS', native)
    g = torch.Generator().manual_seed(4)
    attention = timm.create_model('refined_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=1).blocks[0].attn
    x = torch.randn(2, 17, 192, generator=g)
    reference = copy.deepcopy(attention).double()
    reference.refiner.forward = reference.refiner.forward_stages
    fast_x, plain_x = x.clone().requires_grad_(), x.double().requires_grad_()
    fast, plain = attention(fast_x), reference(plain_x)
    torch.testing.assert_close(fast.double(), plain, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(fast.shape, generator=g)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), [fast_x, *attention.parameters()])
    plain_grads = torch.autograd.grad((plain * upstream.double()).sum(), [plain_x, *reference.parameters()])
    names = ['x', *dict(attention.named_parameters())]
    for name, a, b in zip(names, fast_grads, plain_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f'gradient of {name}')


def test_refined_attention_keeps_two_map_stacks_for_backward():
    """The softmax output (shared with the convolution's backward) and the refined maps (for ``refined @ v``).

    Recomputing the refined maps in backward instead saved one stack per layer (1348 -> 1289 MB for refined DeiT-S
    at batch 16) but cost training throughput once the convolution ran natively; docs/performance.md has the numbers.
    """
    model = timm.create_model('refined_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=1)
    tokens = 1 + (32 // 8) ** 2
    heads = model.blocks[0].attn.num_heads
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.blocks[0].attn(torch.randn(2, tokens, 192))
    maps = {t.data_ptr() for t in saved if t.shape[-2:] == (tokens, tokens) and t.numel() == 2 * heads * tokens ** 2}
    assert len(maps) == 2  # (matmul saves the refined maps as a (B * H, N, N) view)


@pytest.mark.parametrize('shortcut', [False, True])
def test_folded_released_refiner_equals_the_stages(shortcut):
    g = torch.Generator().manual_seed(1)
    refiner = AttentionRefiner(3, 3, 3, nn.BatchNorm2d, nn.ReLU6, shortcut, nn.BatchNorm2d).double()
    randomise_batchnorms(refiner, g)
    refiner.eval()
    attn = _random_maps(2, 3, 9, g)
    folded = refiner.fuse(output_scale=0.125)
    assert isinstance(folded, FoldedRefiner)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(attn), refiner.forward_stages(attn) * 0.125, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('refiner', [
    AttentionRefiner(2, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU),
    AttentionRefiner(2, norm_layer=lambda channels: nn.GroupNorm(1, channels), act_layer=nn.ReLU6),
], ids=['gelu', 'group norm'])
def test_a_refiner_without_a_folded_form_fuses_to_itself(refiner):
    """timm's re-parameterisation walk must not fail on such a refiner; it is left as it is."""
    assert refiner.fuse() is refiner


@pytest.mark.parametrize('name,kwargs', [
    ('test_refiner_vit', {}),
    ('refined_deit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2)),
])
def test_fuse_for_inference_equals_the_eval_model(name, kwargs):
    g = torch.Generator().manual_seed(2)
    model = timm.create_model(name, **kwargs)
    randomise_batchnorms(model, g)
    model.eval()
    size = kwargs.get('img_size', model.pretrained_cfg['input_size'][-1])
    x = torch.randn(3, 3, size, size, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = refiner_vit.fuse_for_inference(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, AttentionRefiner)) for m in fused.modules())
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('residual_scale', [0.5, 0.25])
def test_fused_blocks_fold_their_constant_factors(residual_scale):
    # LayerScales far from their 1e-5 init and affine LayerNorms: a wrong fold of either changes the output
    g = torch.Generator().manual_seed(4)
    model = timm.create_model('test_refiner_vit', residual_scale=residual_scale)
    randomise_batchnorms(model, g)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LayerScale, nn.LayerNorm)):
                for param in module.parameters():
                    param.copy_(1 + 0.5 * torch.randn(param.shape, generator=g))
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=g)
    fused = refiner_vit.fuse_for_inference(model)
    for block in fused.blocks:
        assert block.residual_scale == 1. and isinstance(block.mlp_scale, nn.Identity)
        assert block.attn.scale == 1. if block.sharing else block.attn.qk_scale == 1.
    assert model.blocks[0].residual_scale == residual_scale  # the original keeps its factors
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_refined_deit_folds_the_attention_scale():
    model = timm.create_model('refined_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=2).eval()
    fused = refiner_vit.fuse_for_inference(model)
    assert [block.attn.scale for block in fused.blocks] == [1., 1.]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_sharing_block_still_taps_the_map_multiplied_with_v():
    model = timm.create_model('test_refiner_vit').eval()
    fused = refiner_vit.fuse_for_inference(model)
    seen = {}
    for tag, net in (('plain', model), ('fused', fused)):
        net.blocks[1].attn.tap.register_forward_hook(lambda m, args, out, tag=tag: seen.__setitem__(tag, args))
        with torch.no_grad():
            net(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(seen['fused'][0], seen['plain'][0])
    torch.testing.assert_close(seen['fused'][1], seen['plain'][1], rtol=1e-5, atol=1e-7)


def test_cpu_peak_memory_follows_the_allocations():
    mb = 2 ** 20

    def step() -> None:
        a = torch.ones(4 * mb, dtype=torch.uint8)
        b = torch.ones(8 * mb, dtype=torch.uint8)  # 12 MB held here
        del a
        c = torch.ones(2 * mb, dtype=torch.uint8)  # 10 MB
        del b, c

    assert 12 * mb <= _cpu_step_peak_bytes(step) < 12 * mb + 64 * 1024
    kept = []
    _cpu_step_peak_bytes(lambda: kept.append(torch.ones(mb, dtype=torch.uint8)))
    kept.clear()  # freed outside any profiling session: must not shift the next measurement
    assert 12 * mb <= _cpu_step_peak_bytes(step) < 12 * mb + 64 * 1024


def test_benchmark_command_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    code = refiner_cli([
        'benchmark', '--model', 'test_refiner_vit', '--batch-size', '2', '--warmup', '0', '--repeats', '1',
        '--gemm-size', '128', '--fuse', '--output', str(out)])
    assert code == 0
    assert 'test_refiner_vit' in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {'gemm_peak_gflops', 'results', 'machine'} and report['gemm_peak_gflops'] > 0
    machine = report['machine']
    assert machine['cpu'] and isinstance(machine['isa'], list) and machine['threads'] >= 1
    assert machine['torch'] == torch.__version__ and machine['native_kernels'] in ('auto', '0', '1')
    rows = {row['mode']: row for row in report['results']}
    assert set(rows) == {'infer', 'train'}
    for row in rows.values():
        assert set(row) == {'model', 'mode', 'img_per_s', 'gflops_per_img', 'achieved_gflops', 'peak_mem_mb', 'ops'}
        assert row['img_per_s'] > 0 and row['gflops_per_img'] > 0
        assert row['achieved_gflops'] == pytest.approx(row['img_per_s'] * row['gflops_per_img'])
    # backward costs about twice the forward's matmul FLOPs (no input gradient for the first conv)
    assert 2.5 < rows['train']['gflops_per_img'] / rows['infer']['gflops_per_img'] < 3.05
    params_mb = sum(p.numel() for p in timm.create_model('test_refiner_vit').parameters()) * 4 / 2 ** 20
    assert rows['train']['peak_mem_mb'] > 2 * params_mb  # weights and their gradients at least
    assert rows['infer']['peak_mem_mb'] is None
    # fused for inference: the computing blocks' probabilities and the sharing blocks' folded refiners
    assert set(rows['infer']['ops']) == {'attention_probs', 'folded_refiner'}
    assert sum(rows['infer']['ops']['folded_refiner'].values()) == 2  # the 2 sharing blocks, one step
    # the released refiners' maps are too small for their training kernels; the probabilities' backward and the
    # stem's BatchNorm + ReLU are ops of their own
    assert set(rows['train']['ops']) == {'attention_probs', 'attention_probs_backward', 'batch_norm_relu'}


def test_flop_count_includes_the_cpu_fused_attention():
    """A ViT's fused attention (torch's CPU SDPA kernel) counts as its unfused matmuls do: the forward's two equally,
    the backward's five as the unfused four plus the recomputed scores."""
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2)
    x = torch.randn(2, 3, 32, 32)
    attn, tokens = model.blocks[0].attn, model.patch_embed.num_patches + model.num_prefix_tokens
    heads, head_dim = attn.num_heads, attn.head_dim
    scores = 2 * 2 * heads * tokens * tokens * head_dim  # one batched product of the maps' size, batch 2

    def counts(fused: bool) -> tuple:
        for block in model.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad():
            forward = count_flops(lambda: model(x))
        return forward, count_flops(lambda: model(x).sum().backward())

    (fused_forward, fused_step), (plain_forward, plain_step) = counts(True), counts(False)
    assert fused_forward == plain_forward
    assert fused_step == plain_step + len(model.blocks) * scores


def test_benchmark_report_names_the_isa_caps_on_torch(monkeypatch):
    """A run with torch's instruction set capped (an AVX-512 CPU measured as an AVX2 one) says so in its JSON and
    table; an uncapped run lists none."""
    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert machine_info()['isa_caps'] == {}
    monkeypatch.setenv('MKL_ENABLE_INSTRUCTIONS', 'AVX2')
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    machine = machine_info()
    assert machine['isa_caps'] == {'MKL_ENABLE_INSTRUCTIONS': 'AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}
    table = format_table({'gemm_peak_gflops': 1., 'results': [], 'machine': machine})
    assert table.splitlines()[-1].endswith('MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2')


@pytest.mark.parametrize('argv,match', [
    (['--model', 'no_such_model'], 'no_such_model: no such model'),
    (['--model', 'test_refiner_vit', '--repeats', '0'], '--repeats'),
])
def test_benchmark_command_names_bad_input(argv, match, capsys):
    assert refiner_cli(['benchmark', '--gemm-size', '64', *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize('name,kwargs,backend', [
    ('refined_deit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2, drop_path_rate=0.), 'inductor'),
    ('test_refiner_vit', dict(img_size=32), 'aot_eager'),  # the tracing is what is tested; inductor takes a minute
])
def test_torch_compile_matches_eager_forward_and_backward(name, kwargs, backend):
    """The refined models give the same training step compiled (the composed refiner's native operator inside the
    graph; Refiner-ViT's computing blocks adding the previous map), and Dynamo meets no call it cannot trace."""
    torch.manual_seed(0)
    eager = timm.create_model(name, **kwargs).train()
    compiled_copy = timm.create_model(name, **kwargs).train()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy, backend=backend)
    x = torch.randn(3, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for model in (eager, compiled):
            model(x).square().mean().backward()
    assert not [w for w in caught if 'does not know how to trace' in str(w.message)]
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_benchmark_times_the_compiled_model_with_the_eager_flops(monkeypatch):
    """The timed step runs the compiled graph; its FLOPs are those of the eager model, counted apart here."""
    from torch.utils.flop_counter import FlopCounterMode

    from refiner_vit import performance

    graph_calls = []

    def counting_backend(graph_module, example_inputs):
        def run(*args):
            graph_calls.append(1)
            return graph_module.forward(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(performance.torch, 'compile', lambda model: real_compile(model, backend=counting_backend))
    kwargs = dict(img_size=32, model_args=dict(patch_size=8, depth=1), batch_size=2)
    compiled = prepare_case('refined_deit_tiny_patch16_224', 'infer', label='compiled', torch_compile=True, **kwargs)
    before = len(graph_calls)
    compiled.step()
    assert compiled.label == 'compiled' and len(graph_calls) > before  # the compiled graph ran
    model = timm.create_model('refined_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=1).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(2, 3, 32, 32))
    assert compiled.flops == counter.get_total_flops() > 0


def test_benchmark_compares_settings_in_one_run(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert refiner_cli(['benchmark', '--model', 'test_refiner_vit', '--batch-size', '2', '--warmup', '0',
                        '--repeats', '1', '--gemm-size', '64', '--modes', 'train', '--kernels', 'auto', '0',
                        '--compare-kwargs', 'refiner_recompute=False', '--no-memory', '--output', str(out)]) == 0
    rows = json.loads(out.read_text())['results']
    assert [row['model'] for row in rows] == [
        'test_refiner_vit [kernels=auto]', 'test_refiner_vit [kernels=0]',
        'test_refiner_vit [kernels=auto, refiner_recompute=False]',
        'test_refiner_vit [kernels=0, refiner_recompute=False]']
    assert all(row['peak_mem_mb'] is None for row in rows)
    assert 'test_refiner_vit [kernels=0, refiner_recompute=False]' in capsys.readouterr().out
