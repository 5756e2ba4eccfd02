"""The attention cosine regulariser against a naive float64 loop, and the criterion choice."""
import math

import pytest
import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import refiner_vit
from refiner_vit.train.losses import AttentionCosineRegularizer, build_criterion


def _naive(maps, num_pairs, weight=0.1):
    """Cosine over the head axis at every (batch, query, key), by loops, in float64."""
    total = 0.
    for a, b in list(zip(maps[:-1], maps[1:]))[:num_pairs]:
        a, b = a.double(), b.double()
        B, H, N, _ = a.shape
        sims = []
        for i in range(B):
            for q in range(N):
                for k in range(N):
                    u, v = a[i, :, q, k], b[i, :, q, k]
                    norms = math.sqrt(float((u * u).sum()) * float((v * v).sum()))
                    sims.append(float((u * v).sum()) / max(norms, 1e-8))
        total += sum(sims) / len(sims)
    return weight * total / num_pairs


@pytest.mark.parametrize('name, kwargs', [
    ('test_refiner_vit', dict(img_size=16, patch_size=4, depth=4)),
    ('vit_tiny_patch16_224', dict(img_size=32, depth=3, embed_dim=24, num_heads=3)),
])
def test_cos_reg_matches_naive_reference(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    if name.startswith('vit'):
        refiner_vit.refine(model, init='random')
    seen = []
    def record(module, args, output):
        seen.append(args[1] if args[1] is not None else args[0])

    for block in model.blocks:
        block.attn.tap.register_forward_hook(record)
    reg = AttentionCosineRegularizer(model, num_pairs=2)
    model.train()
    reg.reset()
    model(torch.randn(2, 3, kwargs['img_size'], kwargs['img_size']))
    loss = reg.loss()
    assert loss.requires_grad
    assert loss.item() == pytest.approx(_naive([m.detach() for m in seen[:3]], 2), rel=1e-5)
    loss.backward()  # gradients reach the attention weights through the tapped maps
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_cos_reg_records_nothing_in_eval():
    model = timm.create_model('test_refiner_vit', img_size=16, patch_size=4)
    reg = AttentionCosineRegularizer(model, 1)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 16, 16))
    assert reg.loss() is None
    reg.remove()
    assert not any(b.attn.tap._forward_hooks for b in model.blocks)


def test_criterion_choice():
    assert isinstance(build_criterion(True, 0.1), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(False, 0.1), LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(False, 0.), torch.nn.CrossEntropyLoss)
    assert type(build_criterion(False, 0.1, token_labels=True)).__name__ == 'TokenLabelCriterion'
