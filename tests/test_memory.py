"""Training memory: what autograd keeps for the refiner and the attention maps, and that keeping less changes nothing
else (outputs, gradients, BatchNorm statistics), with and without grad checkpointing."""
import copy

import pytest
import timm
import torch
import yaml
from helpers import randomise_batchnorms
from torch import nn

from refiner_vit.layers import AttentionRefiner, recompute, released
from refiner_vit.ops import attention_probs


@pytest.fixture(autouse=True)
def fast_paths_for_small_maps(monkeypatch):
    """The tests' maps are small; the released path and the recompute apply from a size on (RELEASED_MIN_BYTES,
    RECOMPUTE_MIN_BYTES), here from any."""
    monkeypatch.setattr(released, 'RELEASED_MIN_BYTES', 0)
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', 0)


def _released(heads=4, seed=0, recompute=True, dtype=torch.float64, act_layer=nn.ReLU6) -> AttentionRefiner:
    """The released refiner (or, with another ``act_layer``, one that only the chunked recompute serves)."""
    torch.manual_seed(seed)
    refiner = AttentionRefiner(heads, norm_layer=nn.BatchNorm2d, act_layer=act_layer, shortcut=True,
                               out_norm_layer=nn.BatchNorm2d, recompute=recompute)
    randomise_batchnorms(refiner, torch.Generator().manual_seed(seed))
    return refiner.to(dtype).train()


def _maps(batch=3, heads=4, tokens=11, seed=1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, heads, tokens, tokens, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype).softmax(-1)


def _step(refiner: AttentionRefiner, maps: torch.Tensor, upstream: torch.Tensor, stages: bool = False):
    """Output, input gradient and parameter gradients of one training forward and backward (with ``stages``, of
    the autograd reference :meth:`AttentionRefiner.forward_stages`)."""
    x = maps.clone().requires_grad_()
    out = refiner.forward_stages(x) if stages else refiner(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *refiner.parameters()])
    return out.detach(), grads


def _saved_bytes(function, *args) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``function(*args)`` runs."""
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function(*args)
    return sum(saved.values())


@pytest.mark.parametrize('act_layer', [nn.ReLU6, nn.GELU], ids=['released', 'chunked'])
def test_recomputing_refiner_equals_the_autograd_stages_in_float64(act_layer):
    on, reference = _released(act_layer=act_layer), _released(act_layer=act_layer)
    maps = _maps()
    upstream = torch.randn(maps.shape, generator=torch.Generator().manual_seed(2), dtype=maps.dtype)
    out_on, grads_on = _step(on, maps, upstream)
    out_ref, grads_ref = _step(reference, maps, upstream, stages=True)
    torch.testing.assert_close(out_on, out_ref, rtol=1e-12, atol=1e-12)
    names = ['input', *dict(on.named_parameters())]
    for name, a, b in zip(names, grads_on, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f'gradient of {name}')
    for (name, a), b in zip(on.named_buffers(), reference.buffers()):  # running statistics: updated once, not twice
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)
    assert int(on.norm1.num_batches_tracked) == 1


@pytest.mark.parametrize('recompute', [True, False])
@pytest.mark.parametrize('act_layer', [nn.ReLU6, nn.GELU], ids=['released', 'chunked'])
def test_recomputing_refiner_under_bf16_autocast_is_as_close_as_the_stages(act_layer, recompute):
    """bf16 gradients through BatchNorms are far from float64's (the stages' own are 5-40 % off at the largest
    element); the training path's must be of the same order, in the same dtypes."""
    on = _released(dtype=torch.float32, act_layer=act_layer, recompute=recompute)
    reference = _released(dtype=torch.float32, act_layer=act_layer)
    exact = _released(dtype=torch.float64, act_layer=act_layer)
    maps = _maps(dtype=torch.float32, tokens=24)
    upstream = torch.randn(maps.shape, generator=torch.Generator().manual_seed(3))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_on, grads_on = _step(on, maps, upstream)
        out_ref, grads_ref = _step(reference, maps, upstream, stages=True)
    out_exact, grads_exact = _step(exact, maps.double(), upstream.double(), stages=True)
    assert out_on.dtype == out_ref.dtype

    def error(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    assert error(out_on, out_exact) < 2 * error(out_ref, out_exact) + 1e-3
    names = ['input', *dict(on.named_parameters())]
    for name, a, b, c in zip(names, grads_on, grads_ref, grads_exact):
        assert a.dtype == b.dtype, name
        if name != 'norm3.bias':  # its gradient is zero up to rounding (a per-head BatchNorm follows)
            assert error(a, c) < 3 * error(b, c) + 2e-2, f'gradient of {name}: {error(a, c):.3g} vs {error(b, c):.3g}'


@pytest.mark.parametrize('act_layer', [nn.ReLU6, nn.GELU], ids=['released', 'chunked'])
def test_recomputing_refiner_keeps_only_its_input_maps(act_layer):
    maps = _maps(batch=2, heads=4, tokens=17, dtype=torch.float32).requires_grad_()
    input_bytes = maps.numel() * maps.element_size()
    kept_on = _saved_bytes(_released(recompute=True, dtype=torch.float32, act_layer=act_layer), maps)
    kept_off = _saved_bytes(_released(recompute=False, dtype=torch.float32, act_layer=act_layer), maps)
    assert kept_on <= 2 * input_bytes
    assert kept_off > 10 * input_bytes  # three (released) or about seven stacks of three times as many maps


@pytest.mark.parametrize('act_layer, name', [(nn.ReLU6, '_ReleasedRefinerBackward'),
                                             (nn.GELU, '_RecomputingRefinerBackward')])
def test_recompute_steps_aside_in_eval_mode_without_grad_and_for_small_maps(monkeypatch, act_layer, name):
    refiner = _released(recompute=True, act_layer=act_layer)
    maps = _maps().requires_grad_()
    assert refiner(maps).grad_fn.name() == name
    assert refiner.eval()(maps).grad_fn.name() != name
    refiner.train()
    with torch.no_grad():
        torch.testing.assert_close(refiner(maps), _released(recompute=False, act_layer=act_layer)(maps))
    expanded_bytes = maps.numel() * maps.element_size() * refiner.expansion_ratio
    monkeypatch.setattr(recompute, 'RECOMPUTE_MIN_BYTES', expanded_bytes + 1)  # maps this small keep their stages
    assert _saved_bytes(refiner, maps) > 5 * maps.numel() * maps.element_size()


def test_computing_blocks_keep_one_stack_of_maps_and_the_same_gradients():
    """softmax(q k^T) + alpha * prev keeps its output and prev (kept by the model anyway), not the softmax too."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    prev = torch.rand(2, 3, 9, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    out = attention_probs(q, k, 0.3, prev=prev, alpha=0.7)
    reference = torch.add((0.3 * q @ k.transpose(-2, -1)).softmax(-1), prev, alpha=0.7)
    torch.testing.assert_close(out, reference)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * upstream).sum(), [q, k, prev]),
                    torch.autograd.grad((reference * upstream).sum(), [q, k, prev])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    maps_bytes = prev.numel() * prev.element_size()
    kept = _saved_bytes(lambda: attention_probs(q, k, 0.3, prev=prev, alpha=0.7))
    assert kept <= 2 * maps_bytes + 2 * q.numel() * q.element_size()  # the output, prev, q and k


def _train_step(model: nn.Module, x: torch.Tensor):
    loss = model(x).logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize('recompute', [True, False])
def test_grad_checkpointing_gives_the_same_loss_gradients_and_statistics(recompute):
    torch.manual_seed(0)
    plain = timm.create_model('test_refiner_vit', drop_path_rate=0.1, refiner_recompute=recompute).double().train()
    randomise_batchnorms(plain, torch.Generator().manual_seed(5))
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.manual_seed(7)  # the same drop-path draws for both
    loss_plain, grads_plain = _train_step(plain, x)
    torch.manual_seed(7)
    loss_ckpt, grads_ckpt = _train_step(checkpointed, x)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(plain.named_parameters(), grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(checkpointed.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # running statistics updated once


def test_grad_checkpointing_keeps_less_than_the_plain_blocks():
    model = timm.create_model('test_refiner_vit', img_size=128).train()
    tokens = torch.randn(2, 65, 64, requires_grad=True)
    plain = _saved_bytes(model.forward_tokens, tokens)
    model.set_grad_checkpointing(True)
    assert _saved_bytes(model.forward_tokens, tokens) < plain / 4


def test_refiner_train_grad_checkpointing_flag(tmp_path):
    from refiner_vit.cli import main
    from refiner_vit.train.config import parse_train_config
    from refiner_vit.train.model_builder import build_model

    model, _ = build_model(parse_train_config(['--grad-checkpointing', '--img-size', '16']), num_classes=10)
    assert model.grad_checkpointing
    out = tmp_path / 'run'
    assert main(['train', '--grad-checkpointing', '--epochs', '1', '--output', str(out), '--no-progress',
                 '--no-tensorboard', '--precise-bn-batches', '2']) == 0
    assert yaml.safe_load((out / 'config.yaml').read_text())['grad_checkpointing'] is True
