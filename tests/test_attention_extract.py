"""timm's attention tool, ``timm.utils.AttentionExtract``, on this package's models with both of its methods: one
map per block, the map that multiplies V (sharing blocks included), equal to what ``attn.tap`` shows."""
import pytest
import timm
import torch
from timm.utils import AttentionExtract

from refiner_vit import attention_maps

# both families, at input sizes that keep the test quick (the maps do not depend on the size)
MODELS = {
    'refiner_vit_s_patch16_224': dict(img_size=64),
    'refined_deit_small_patch16_224': dict(img_size=64),
    'test_refiner_vit': {},
}


@pytest.fixture(scope='module', params=sorted(MODELS))
def model_and_images(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, **MODELS[request.param]).eval()
    return model, torch.randn(2, 3, *model.patch_embed.img_size)


def _map_multiplied_with_v(record, previous):
    """The map a block multiplies with V, from its tap: the refined map where it refines; a computing block's
    softmax plus s times the map the previous computing block handed on."""
    if record['refined'] is not None:
        return record['refined']
    if previous is None:
        return record['raw']
    return record['raw'] + record['scale'] * previous


@pytest.mark.parametrize('method', ['fx', 'hook'])
def test_attention_extract_returns_the_map_each_block_multiplies_with_v(model_and_images, method):
    model, images = model_and_images
    with torch.no_grad():
        maps = AttentionExtract(model, method=method)(images)
    suffix = '.attn.softmax' if method == 'fx' else '.attn.attn_drop'
    assert list(maps) == [f'blocks.{i}{suffix}' for i in range(len(model.blocks))]

    records = attention_maps(model, images)
    handed_on = None
    for record, (name, extracted) in zip(records, maps.items()):
        attn = model.get_submodule(record['name'])
        record['scale'] = getattr(attn, 'scale', 1.)
        if record['kind'] == 'sharing':  # the tap shows the received map normalised; V meets refiner(M) * s
            expected = record['refined']
        else:
            expected = _map_multiplied_with_v(record, handed_on)
            if record['kind'] == 'computing':
                handed_on = expected
        torch.testing.assert_close(extracted, expected, msg=name)


def test_attention_extract_leaves_the_outputs_unchanged(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        before = model(images)
        AttentionExtract(model, method='hook')(images)
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)
