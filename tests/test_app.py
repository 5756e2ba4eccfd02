"""``refiner app`` without a browser: its maps against ``refiner attention``'s, the handlers (uploads refused for
size, pixels and content; clicks and heads reuse the maps), the default model on a fresh cache, the command's
errors. The browser test is tests/test_app_browser.py."""
import json
import struct
import sys
import zlib

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import one_error_line, randomise_batchnorms
from PIL import Image
from safetensors.torch import save_file

from refiner_vit.analysis import attention_maps
from refiner_vit.app import AppHandlers, AttentionSession, UploadLimits, default_model_source, example_images
from refiner_vit.app.default_model import ENV_CACHE
from refiner_vit.app.handlers import MEAN_OF_HEADS
from refiner_vit.app.render import PICTURE_SIZE
from refiner_vit.app.session import class_names_of
from refiner_vit.cli import main
from refiner_vit.commands.attention import load_image
from refiner_vit.models.resolve import resolve_model


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """A random-weights test_refiner_vit (BatchNorms randomised: the released refiners are not near identity),
    saved so that the app and ``refiner attention`` load the same weights, and an image."""
    folder = tmp_path_factory.mktemp('app')
    torch.manual_seed(0)
    model = randomise_batchnorms(timm.create_model('test_refiner_vit'), torch.Generator().manual_seed(1))
    save_file(model.state_dict(), str(folder / 'weights.safetensors'))
    pixels = (torch.rand(48, 60, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / 'image.png')
    return folder


@pytest.fixture(scope='module')
def handlers(inputs):
    resolved = resolve_model('test_refiner_vit', checkpoint=str(inputs / 'weights.safetensors'))
    session = AttentionSession(resolved, 'test_refiner_vit')
    return AppHandlers(session, example_images(max(session.input_size)), UploadLimits(max_bytes=50_000,
                                                                                      max_pixels=512 * 512))


def test_maps_and_metrics_equal_refiner_attention(inputs, handlers, tmp_path, capsys):
    weights, image = str(inputs / 'weights.safetensors'), inputs / 'image.png'
    assert main(['attention', '--model', 'test_refiner_vit', '--checkpoint', weights, '--image', str(image),
                 '--output', str(tmp_path)]) == 0
    expected = json.loads((tmp_path / 'attention_stats.json').read_text())
    state, view = handlers.upload(str(image), None)
    assert view.message == ''
    assert state.analysis.stats == expected['layers']
    assert list(state.analysis.grid) == expected['grid']

    # the maps themselves: the command's preprocessing and attention_maps() on the same model
    session = handlers.session
    x, _ = load_image(str(image), session.data_config)
    reference = attention_maps(session.model, x)
    assert [r['kind'] for r in state.analysis.records] == ['computing', 'sharing', 'computing', 'sharing']
    for got, want in zip(state.analysis.records, reference):
        assert torch.equal(got['raw'], want['raw'])
        assert (got['refined'] is None) == (want['refined'] is None)
        if want['refined'] is not None:
            assert torch.equal(got['refined'], want['refined'])


def test_query_maps_are_rows_of_the_maps(inputs, handlers):
    state, _ = handlers.upload(str(inputs / 'image.png'), None)
    analysis = state.analysis
    rows, cols = analysis.grid
    assert analysis.prefix == 1 and analysis.default_query == 0
    query = analysis.query_of_patch(2, 1)
    assert analysis.patch_of_query(query) == (2, 1) and analysis.patch_of_query(0) is None
    for head in (None, 3):
        for layer, record in zip(handlers.session.query_maps(analysis, query, head), analysis.records):
            for name in ('raw', 'refined'):
                if record[name] is None:
                    assert getattr(layer, name) is None
                    continue
                row = record[name][0, :, 1 + 2 * cols + 1, 1:]  # row 2, column 1, after the class token
                want = row.mean(dim=0) if head is None else row[head]
                np.testing.assert_allclose(getattr(layer, name), want.reshape(rows, cols).numpy(), rtol=1e-6)


@torch.no_grad()
def test_expanded_maps_against_the_stages_in_float64(inputs, handlers):
    state, _ = handlers.upload(str(inputs / 'image.png'), None)
    session, analysis = handlers.session, state.analysis
    assert session.refined_blocks == [1, 3]
    block, head, query = 3, 2, 5
    weights, maps = session.expanded_maps(analysis, block, head, query)

    refiner = session.refiners[analysis.records[block]['name']]
    m = analysis.refiner_inputs[block].double()

    def bn(x, norm):
        shape = (1, -1, 1, 1)
        return ((x - norm.running_mean.double().view(shape)) / (norm.running_var.double().view(shape) + norm.eps).sqrt()
                * norm.weight.double().view(shape) + norm.bias.double().view(shape))

    x = bn(F.conv2d(m, refiner.expand.weight.double()), refiner.norm1).clamp(0, 6)
    x = bn(F.conv2d(x, refiner.conv.weight.double(), padding=1, groups=x.shape[1]), refiner.norm2).clamp(0, 6)
    reduce = refiner.reduce.weight[head, :, 0, 0].double()
    order = reduce.abs().argsort(descending=True)
    rows, cols = analysis.grid
    want = x[0, :, query, 1:].reshape(-1, rows, cols)[order]
    assert maps.shape == (refiner.num_heads * refiner.expansion_ratio, rows, cols)
    np.testing.assert_allclose(maps, want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights, reduce[order].numpy(), rtol=1e-6)
    assert (np.diff(np.abs(weights)) <= 0).all()


def test_clicks_and_heads_reuse_the_maps(inputs, handlers, monkeypatch):
    state, view = handlers.upload(str(inputs / 'image.png'), None)
    assert len(view.prediction) == 5 and abs(sum(view.prediction.values()) - 1) < 0.5
    assert view.picture.shape == (PICTURE_SIZE, PICTURE_SIZE, 3) and view.metrics is None  # they come next:
    same, metrics = handlers.metrics(state)
    assert same is state and [list(table.columns) for table in metrics.metrics] == [['block', 'value', 'map']] * 3
    assert set(metrics.metrics[0]['map']) == {'raw', 'refined'} and metrics.maps is None
    monkeypatch.setattr(handlers.session, 'analyse', lambda image: pytest.fail('the model ran again'))
    clicked, after = handlers.click(state, PICTURE_SIZE - 1, 0, (PICTURE_SIZE, PICTURE_SIZE))
    assert clicked.query == 1 + 3 and clicked.analysis is state.analysis  # row 0, last column of the 4x4 grid
    assert not np.array_equal(after.maps, view.maps) and after.prediction is None and after.metrics is None
    assert 'row 0, column 3' in after.caption
    headed, head_view = handlers.choose_head(clicked, 'head 2')
    assert headed.head == 2 and 'head 2' in head_view.caption and not np.array_equal(head_view.maps, after.maps)
    back, _ = handlers.choose_head(headed, MEAN_OF_HEADS)
    assert back.head is None
    expanded, expanded_view = handlers.choose_expanded(headed, 'block 1')
    assert expanded.expanded_block == 1 and expanded_view.expanded.shape[0] > 1
    reset, reset_view = handlers.class_token(expanded)
    assert reset.query == 0 and 'class token' in reset_view.caption
    off, off_view = handlers.choose_expanded(reset, 'off')
    assert off.expanded_block is None and off_view.expanded.shape == (1, 1, 3)  # blank replaces the last
    assert handlers.class_token(off)[1].expanded is None  # left as it is
    with pytest.raises(ValueError, match='block 2 has no released refiner'):
        handlers.choose_expanded(headed, 'block 2')


def test_examples_suit_the_model(handlers):
    names = list(handlers.examples)
    assert names[0].startswith('drawn:') and any(name.startswith('digit') for name in names)  # 64 px model
    assert all(name.startswith('digit') for name in example_images(16))
    state, view = handlers.example(names[0], None)
    assert view.message == '' and state is not None
    same, refused = handlers.example('/etc/passwd', state)
    assert same is state and 'not one of the examples' in refused.message and refused.maps is None


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` grey pixels, with (almost) no pixel data: a bomb's header."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                     + chunk(b'IEND', b''))
    return path


def test_refused_uploads_leave_the_page_serving(inputs, handlers, tmp_path):
    good, _ = handlers.upload(str(inputs / 'image.png'), None)
    noise = (np.random.default_rng(0).random((200, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / 'large.png')  # ~120 kB of incompressible pixels > 50 kB
    (tmp_path / 'notes.png').write_text('not an image, whatever its name says')
    Image.new('L', (600, 600)).save(tmp_path / 'wide.png')  # 360,000 > 512 * 512 pixels in a few bytes
    (tmp_path / 'cut.png').write_bytes((inputs / 'image.png').read_bytes()[:300])
    cases = {
        'large.png': 'bytes are more than the 50,000 an upload may have',
        'notes.png': 'notes.png: not an image',
        'wide.png': 'wide.png: 600x600 pixels are more than the 262,144',
        'bomb.png': 'bomb.png: 9000x9000 pixels are more than',
        'cut.png': 'cut.png: a damaged or unsupported image',
    }
    _png_header_only(tmp_path / 'bomb.png', 9000, 9000)  # below Pillow's own limit, above ours
    for name, message in cases.items():
        state, view = handlers.upload(str(tmp_path / name), good)
        assert state is good, name
        assert view.message.startswith('Refused: ') and message in view.message, view.message
        assert str(tmp_path) not in view.message  # no server paths in the page
        assert view.maps is None and view.prediction is None
    again, view = handlers.upload(str(inputs / 'image.png'), good)
    assert view.message == '' and again is not good


def test_pillows_own_bomb_limit_is_a_message(handlers, tmp_path):
    """Above Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS) the header alone is refused, whatever our limit."""
    lenient = AppHandlers(handlers.session, {}, UploadLimits(max_pixels=10 ** 12))
    _, view = lenient.upload(str(_png_header_only(tmp_path / 'bomb.png', 100_000, 100_000)), None)
    assert view.message.startswith('Refused: bomb.png: refused as a decompression bomb')


def test_imagenet_models_name_their_classes():
    resolved = resolve_model('test_refiner_vit', model_kwargs={'num_classes': 1000})
    names = class_names_of(resolved, 1000)
    assert names[1].startswith('goldfish') and len(names) == 1000
    resolved.class_names = [f'class {i}' for i in range(1000)]
    assert class_names_of(resolved, 1000)[1] == 'class 1'
    assert class_names_of(resolved, 7) == [str(i) for i in range(7)]


@pytest.mark.slow
def test_default_model_trains_once_into_a_fresh_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / 'cache'))
    absent = tmp_path / 'runs' / 'demo'
    args = ['--epochs', '1', '--model-kwargs', 'depth=2', '--precise-bn-batches', '2', '--no-progress',
            '--no-tensorboard']
    source = default_model_source(args, demo_run=absent)
    assert source == str(tmp_path / 'cache' / 'demo')
    assert 'training the digits demo once into' in capsys.readouterr().err
    summary = (tmp_path / 'cache' / 'demo' / 'summary.json').stat().st_mtime_ns
    assert default_model_source(args, demo_run=absent) == source  # cached: not trained again
    assert (tmp_path / 'cache' / 'demo' / 'summary.json').stat().st_mtime_ns == summary
    assert 'training' not in capsys.readouterr().err
    session = AttentionSession(resolve_model(source), source)
    assert session.class_names == [str(i) for i in range(10)] and session.grid == (4, 4)
    absent.mkdir(parents=True)
    assert default_model_source(args, demo_run=absent) == str(absent)  # runs/demo wins when it exists


def test_failed_default_training_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / 'cache'))
    with pytest.raises(RuntimeError, match='training the digits demo into .* failed'):
        default_model_source(['--epochs', '-1'], demo_run=tmp_path / 'absent')


def test_command_without_gradio_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'gradio', None)  # import gradio raises ImportError
    line = one_error_line(capsys, ['app', '--model', 'test_refiner_vit'])
    assert "pip install 'refiner-vit[app]'" in line


def test_command_serves_the_model_on_localhost(monkeypatch, capsys):
    import refiner_vit.app.page as page

    served = []
    monkeypatch.setattr(page, 'launch', lambda handlers, host, port: served.append((handlers, host, port)))
    threads = torch.get_num_threads()
    try:
        assert main(['app', '--model', 'test_refiner_vit', '--port', '7999']) == 0
        assert torch.get_num_threads() == 1  # --threads 1 by default
    finally:
        torch.set_num_threads(threads)
    (handlers, host, port), = served
    assert (host, port) == ('127.0.0.1', 7999) and handlers.session.label == 'test_refiner_vit'
    assert 'http://127.0.0.1:7999' in capsys.readouterr().out


def test_command_refuses_weights_without_a_model(capsys):
    line = one_error_line(capsys, ['app', '--checkpoint', 'weights.pth'])
    assert '--checkpoint, --pretrained and --use-ema need --model' in line


def test_page_builds_with_the_handlers(handlers):
    from refiner_vit.app.page import build_page

    page = build_page(handlers)
    assert page.title == 'Refiner: attention'
