"""How fast ``refiner app``'s page answers, measured in Chromium: from the user's action to the new maps shown.

For each model the app is served as ``refiner app`` serves it, Playwright drives the system's Chromium (``make
browser``), and three actions are timed, each ``--repeats`` times, alternating between two example images so that
every answer draws something new:

* **new image**: a file is uploaded; the model runs once (prediction, every block's maps, their metrics);
* **click a patch**: another query; the stored maps are sliced and redrawn;
* **choose a head**: the same, for one head instead of the mean (from the click on the head in the open list).

An answer counts as arrived when the maps picture shows the new image (loaded, not only sent). The same actions
are also timed inside the server, in the handler alone, to tell the model's part from Gradio's and the browser's,
and so is **metrics**: the per-block metrics of a new image, which the page computes and plots after it has shown
the maps (no page time: the row says how much later the plots follow).

Usage: ``python benchmarks/app_latency.py --model runs/demo refiner_vit_s_patch16_224 --repeats 5``
(``--no-browser``: the handlers alone; ``--threads N``: the model's threads, as ``refiner app --threads``); without
``--model`` the app's default model (``runs/demo``, else the cached digits demo). Model names without weights run
with random weights: the time does not depend on them.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from refiner_vit.app import AppHandlers, AttentionSession, default_model_source, example_images
from refiner_vit.app.browser import open_page, serve
from refiner_vit.app.render import PICTURE_SIZE
from refiner_vit.models.resolve import resolve_model
from refiner_vit.utils.allocator import keep_freed_memory

NEW_MAPS = """(old) => { const i = document.querySelector('#maps img');
                         return i && i.src !== old && i.complete && i.naturalWidth > 0; }"""


def _timed(page, action, *args) -> float:
    """Seconds from ``action(*args)`` to the new maps picture shown."""
    old = page.evaluate("() => { const i = document.querySelector('#maps img'); return i ? i.src : ''; }")
    start = time.perf_counter()
    action(*args)
    page.wait_for_function(NEW_MAPS, arg=old, timeout=60_000)
    return time.perf_counter() - start


def _new_image(page, path: Path) -> None:
    clear = page.locator('#upload button[aria-label="Clear"]')
    if clear.count():
        clear.first.click()
    page.locator('#upload input[type=file]').set_input_files(str(path))


def _click(page, fraction_x: float, fraction_y: float) -> None:
    box = page.locator('#picture img').bounding_box()
    page.mouse.click(box['x'] + box['width'] * fraction_x, box['y'] + box['height'] * fraction_y)


def _pick(page, option: str) -> None:
    page.get_by_role('option', name=option, exact=True).click()


def _browser_times(handlers: AppHandlers, images: List[Path], repeats: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {'new image': [], 'click a patch': [], 'choose a head': []}
    with serve(handlers) as url, open_page(url) as page:
        _timed(page, _new_image, page, images[-1])  # warm-up: first page load, first forward
        for i in range(repeats):
            times['new image'].append(_timed(page, _new_image, page, images[i % 2]))
            times['click a patch'].append(_timed(page, _click, page, *((0.1, 0.9) if i % 2 else (0.9, 0.1))))
            page.locator('#head input').click()  # the list opens; the choice is timed
            times['choose a head'].append(_timed(page, _pick, page, f'head {i % 2}'))
    return times


def _handler_times(handlers: AppHandlers, images: List[Path], repeats: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {'new image': [], 'metrics': [], 'click a patch': [], 'choose a head': []}
    state, _ = handlers.upload(str(images[-1]), None)
    for i in range(repeats):
        start = time.perf_counter()
        state, _ = handlers.upload(str(images[i % 2]), state)
        times['new image'].append(time.perf_counter() - start)
        start = time.perf_counter()
        handlers.metrics(state)
        times['metrics'].append(time.perf_counter() - start)
        start = time.perf_counter()
        state, _ = handlers.click(state, PICTURE_SIZE - 1 if i % 2 == 0 else 0, 0, (PICTURE_SIZE, PICTURE_SIZE))
        times['click a patch'].append(time.perf_counter() - start)
        start = time.perf_counter()
        state, _ = handlers.choose_head(state, f'head {i % 2}')
        times['choose a head'].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', nargs='+', default=None, metavar='SOURCE', help='model sources (default: the '
                        "app's default model)")
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1, help="the model's CPU threads, as refiner app --threads")
    parser.add_argument('--no-browser', action='store_true', help='time the handlers alone (no Chromium needed)')
    args = parser.parse_args()
    keep_freed_memory()  # as `refiner app` does
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for source in args.model or [default_model_source()]:
        torch.manual_seed(0)
        session = AttentionSession(resolve_model(source), source)
        examples = example_images(max(session.input_size))
        handlers = AppHandlers(session, examples)
        with tempfile.TemporaryDirectory() as folder:
            images = []
            for name in list(examples)[:2]:
                images.append(Path(folder) / f'{len(images)}.png')
                examples[name].save(images[-1])
            server = _handler_times(handlers, images, args.repeats)
            browser = {} if args.no_browser else _browser_times(handlers, images, args.repeats)
        size = 'x'.join(map(str, session.input_size))
        for action in server:
            page = (f'{statistics.median(browser[action]):.2f} | {max(browser[action]):.2f}' if action in browser
                    else '- | -')
            rows.append(f'| {source} | {size} | {action} | {page} | {statistics.median(server[action]):.3f} |')
    print('| model | input | action | page answer, median (s) | page answer, max (s) | handler alone, median (s) |')
    print('|---|---|---|---|---|---|')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
