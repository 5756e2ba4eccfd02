"""The checks of timm's own ``tests/test_models.py``, applied to every model this package registers.

timm's suite parametrises over its registry; these are the same assertions written for our models: eval forward,
backward with a gradient for every parameter, the non-standard cfg checks, intermediates (with grad checkpointing),
the feature getter, FX tracing forward and backward, and timm's ``device='meta'`` / ``dtype=`` factory arguments.
Each entry point is built at a tiny size of its own architecture (``TINY``), so that all of them stay fast.
"""
import math

import pytest
import timm
import torch
from timm.models import FeatureInfo
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import refiner_vit  # noqa: F401  (registers the models)

# Every entry point of our model families (timm names a family by its module); a test fails if one is missing.
MODELS = sorted(name for module in ('refiner_vit', 'refined_deit') for name in timm.list_models(module=module))
TINY = dict(img_size=32, embed_dim=32, depth=4, num_heads=2)


def _create(model_name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(model_name, **{**TINY, **kwargs})


def _input(model: torch.nn.Module, batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, TINY['img_size'], TINY['img_size'])


def test_every_family_is_covered():
    assert {'refiner_vit_l_patch16_448', 'refiner_vit_digits', 'refined_deit_base_patch16_224'} <= set(MODELS)
    assert len(MODELS) >= 12


def _fx_model(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    ).train(train)


def _assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward(model_name):
    model = _create(model_name).eval()
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (1, model.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_backward(model_name):
    model = _create(model_name, num_classes=42).train()
    out = model(_input(model, batch_size=2))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 42)
    out.mean().backward()
    _assert_every_parameter_has_a_gradient(model)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_default_cfgs_non_std(model_name):
    model = _create(model_name).eval()
    assert model.num_classes > 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape[-1] == model.num_features
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        assert _create(model_name, num_classes=0).eval()(x).shape == (1, model.num_features)
    state_dict = _create(model_name).state_dict()
    classifiers = model.pretrained_cfg['classifier']
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        assert f'{name}.weight' in state_dict
    assert f"{model.pretrained_cfg['first_conv']}.weight" in state_dict


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates(model_name):
    model = _create(model_name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _input(model)
    size = x.shape[-1]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        assert len(intermediates) == len(info.channels()) >= 3
        for channels, reduction, feat in zip(info.channels(), info.reduction(), intermediates):
            assert feat.shape[:2] == (1, channels)
            assert feat.shape[-1] <= math.ceil(size / reduction) + 1
            assert torch.isfinite(feat).all()
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        model.set_grad_checkpointing()
        checkpointed, _ = model.forward_intermediates(x, output_fmt='NCHW')
        torch.testing.assert_close(final, checkpointed, rtol=1e-4, atol=1e-5)
        tokens = model.forward_intermediates(x, indices=[0, -1], output_fmt='NLC', intermediates_only=True)
        assert len(tokens) == 2 and tokens[0].ndim == 3


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates_features(model_name):
    model = _create(model_name, features_only=True, feature_cls='getter').eval()
    x = _input(model)
    with torch.no_grad():
        outputs = model(x)
    assert len(outputs) == len(model.feature_info.channels())
    for channels, reduction, out in zip(model.feature_info.channels(), model.feature_info.reduction(), outputs):
        assert out.shape[1] == channels
        assert out.shape[-1] <= math.ceil(x.shape[-1] / reduction) + 1
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_fx(model_name):
    model = _create(model_name).eval()
    x = _input(model)
    with torch.inference_mode():
        eager = model(x)
        traced = tuple(_fx_model(model, train=False)(x).values())[0]
    assert torch.equal(traced, eager)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_backward_fx(model_name):
    model = _create(model_name, num_classes=42).train()
    traced = _fx_model(model, train=True)
    out = torch.cat(tuple(traced(_input(model, batch_size=2)).values()))
    assert out.shape[-1] == 42
    out.mean().backward()
    _assert_every_parameter_has_a_gradient(traced)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_factory_arguments(model_name):
    """timm's device= / dtype= reach every parameter and buffer (device='meta' allocates nothing)."""
    meta = _create(model_name, device='meta')
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {'meta'}
    half = _create(model_name, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half(_input(half).bfloat16()).dtype == torch.bfloat16
