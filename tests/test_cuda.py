"""On a CUDA GPU: the refiner, its recomputing training path, mixed-precision training steps and fused models.

Marked ``cuda``: the default run deselects them (see pyproject.toml), ``benchmarks/gpu_check.sh`` runs them with
``pytest -m cuda`` on a machine with a GPU.
"""
import copy

import pytest
import timm
import torch
from helpers import randomise_batchnorms

import refiner_vit
from refiner_vit.layers import AttentionRefiner, recompute, released

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (run by benchmarks/gpu_check.sh)'),
]
CUDA = torch.device('cuda')


def _maps(batch=4, heads=6, tokens=65, seed=0) -> torch.Tensor:
    return torch.randn(batch, heads, tokens, tokens, generator=torch.Generator().manual_seed(seed)).softmax(-1)


@pytest.mark.parametrize('form', ['linear', 'released'])
def test_refiner_forward_and_backward_on_cuda_match_float64_on_the_cpu(form):
    torch.manual_seed(0)
    refiner = AttentionRefiner(6) if form == 'linear' else AttentionRefiner.released(6)
    randomise_batchnorms(refiner, torch.Generator().manual_seed(1))
    reference = copy.deepcopy(refiner).double()
    maps = _maps()
    upstream = torch.randn(maps.shape, generator=torch.Generator().manual_seed(2))
    outputs = []
    for model, x, device in ((refiner.to(CUDA), maps.to(CUDA), CUDA), (reference, maps.double(), 'cpu')):
        x = x.clone().requires_grad_()
        out = model(x)
        grads = torch.autograd.grad((out * upstream.to(device, out.dtype)).sum(), [x, *model.parameters()])
        outputs.append([out.detach().cpu().double(), *(g.cpu().double() for g in grads)])
    for actual, expected in zip(*outputs):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


def test_recomputing_released_refiner_on_cuda_equals_the_autograd_stages(monkeypatch):
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', 0)  # the test's maps are small
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', 0)
    torch.manual_seed(0)
    on = AttentionRefiner.released(6).to(CUDA).train()
    off = copy.deepcopy(on)
    off.recompute = False
    maps = _maps().to(CUDA)
    results = []
    for refiner in (on, off):
        x = maps.clone().requires_grad_()
        out = refiner(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *refiner.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(on.buffers(), off.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_test_refiner_vit_amp_training_step_on_cuda(dtype):
    torch.manual_seed(0)
    model = timm.create_model('test_refiner_vit').to(CUDA).train()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    target = torch.randint(0, 10, (8,), device=CUDA)
    with torch.autocast('cuda', dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(loss)
    reference_loss = torch.nn.functional.cross_entropy(reference(x), target)
    torch.testing.assert_close(loss.float(), reference_loss, rtol=5e-2, atol=5e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize('name,kwargs', [
    ('test_refiner_vit', {}),
    ('refined_deit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2)),
])
def test_fused_model_on_cuda_equals_the_eval_model(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    randomise_batchnorms(model, torch.Generator().manual_seed(3))
    model = model.to(CUDA).eval()
    fused = refiner_vit.fuse_for_inference(model)
    size = kwargs.get('img_size', 64)
    x = torch.randn(4, 3, size, size, device=CUDA)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_grad_checkpointing_on_cuda_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = timm.create_model('test_refiner_vit').to(CUDA).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(model(x).square().mean(), list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
