"""``refiner app`` in Chromium, driven by Playwright: upload, prediction and maps, a click on a patch, expanded maps,
a non-image, two users at once.

Needs Debian's ``chromium`` (``make browser`` installs it, as root, and runs this test); without it the test skips
with one line naming that command. ``REFINER_APP_SCREENSHOT=docs/img/app.png`` keeps the page's screenshot there.
"""
import hashlib
import os
import time
from pathlib import Path

import pytest

from refiner_vit.app import AppHandlers, AttentionSession, default_model_source, example_images
from refiner_vit.app.browser import CHROMIUM_INSTALL, chromium_path, open_page, serve
from refiner_vit.app.default_model import ENV_CACHE
from refiner_vit.models.resolve import resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium_path() is None, reason=f'no Chromium: {CHROMIUM_INSTALL}')]

TIMEOUT_MS = 30_000


def _pixels(page, selector: str) -> str:
    """A digest of what the browser shows in an element (its screenshot), to tell whether it changed."""
    return hashlib.sha256(page.locator(selector).screenshot()).hexdigest()


def _wait_until_changed(page, selector: str, before: str) -> str:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        page.wait_for_timeout(200)
        now = _pixels(page, selector)
        if now != before:
            return now
    raise AssertionError(f'{selector} did not change')


@pytest.fixture(scope='module')
def handlers(tmp_path_factory):
    """The default model's path on a fresh cache, with a 2-epoch demo (the real one trains for 30)."""
    cache = tmp_path_factory.mktemp('app-cache')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CACHE, str(cache))
        source = default_model_source(['--epochs', '2', '--no-progress', '--no-tensorboard'],
                                      demo_run=cache / 'no-runs-demo')
    session = AttentionSession(resolve_model(source), 'runs/demo (2 epochs)')
    return AppHandlers(session, example_images(max(session.input_size)))


def test_page_in_chromium(handlers, tmp_path):
    digit = tmp_path / 'digit.png'
    next(iter(handlers.examples.values())).resize((64, 64)).save(digit)
    (tmp_path / 'notes.png').write_text('not an image, whatever its name says')

    with serve(handlers) as url, open_page(url) as page:
        page.locator('#upload input[type=file]').set_input_files(str(digit))
        page.wait_for_selector('#maps img', timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#caption').innerText.includes('class token')",
                               timeout=TIMEOUT_MS)
        prediction = page.locator('#prediction').inner_text()
        assert '%' in prediction and sum(str(d) in prediction for d in range(10)) >= 5, prediction
        maps = _pixels(page, '#maps img')

        box = page.locator('#picture img').bounding_box()
        page.mouse.click(box['x'] + box['width'] * 0.9, box['y'] + box['height'] * 0.1)  # top-right patch
        page.wait_for_function("document.querySelector('#caption').innerText.includes('row 0, column 3')",
                               timeout=TIMEOUT_MS)
        _wait_until_changed(page, '#maps img', maps)
        page.locator('#expanded-block input').click()  # the released refiner's expanded maps of block 1
        page.get_by_role('option', name='block 1', exact=True).click()
        page.wait_for_selector('#expanded img', timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#caption').innerText.includes('Expanded maps of block 1')",
                               timeout=TIMEOUT_MS)
        shot = Path(os.environ.get('REFINER_APP_SCREENSHOT') or tmp_path / 'app.png')
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        page.locator('#upload button[aria-label="Clear"]').first.click()
        page.locator('#upload input[type=file]').set_input_files(str(tmp_path / 'notes.png'))
        page.wait_for_function("document.querySelector('#message').innerText.includes('not an image')",
                               timeout=TIMEOUT_MS)
        assert 'Refused: notes.png: not an image' in page.locator('#message').inner_text()
        assert 'row 0, column 3' in page.locator('#caption').inner_text()  # the last image's maps stay

        # two users at once: the queue takes their images in turn, both get their maps
        pages = [page.context.browser.new_page() for _ in range(2)]
        for other in pages:
            other.goto(url)
            other.wait_for_selector('#upload')
        for other in pages:
            other.locator('#upload input[type=file]').set_input_files(str(digit))
        for other in pages:
            other.wait_for_function("document.querySelector('#caption').innerText.includes('class token')",
                                    timeout=TIMEOUT_MS)
            assert other.locator('#message').inner_text().strip() == ''
