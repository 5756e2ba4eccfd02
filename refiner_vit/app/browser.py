"""The app in a real browser, for the browser test and the latency benchmark: serve it, open Chromium on it.

Playwright drives the system's Chromium (Debian's ``chromium`` package: ``make browser`` installs it), not a
browser of its own: Playwright's download needs the network. ``$REFINER_CHROMIUM`` names another executable.
"""
import os
import shutil
import socket
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

from .handlers import AppHandlers

__all__ = ['CHROMIUM_INSTALL', 'chromium_path', 'open_page', 'serve']

CHROMIUM_INSTALL = 'make browser (as root: apt-get install chromium)'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


def chromium_path() -> Optional[str]:
    """The Chromium to drive: ``$REFINER_CHROMIUM``, else ``chromium`` on the PATH; None when there is none."""
    return os.environ.get('REFINER_CHROMIUM') or shutil.which('chromium')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def serve(handlers: AppHandlers) -> Iterator[str]:
    """The app served on a free local port while the block runs; yields its URL."""
    from .page import launch

    port = _free_port()
    page = launch(handlers, '127.0.0.1', port, block=False)
    try:
        yield f'http://127.0.0.1:{port}/'
    finally:
        page.close()


@contextmanager
def open_page(url: str, viewport: Tuple[int, int] = (1400, 1300)) -> Iterator[object]:
    """A Playwright page of the system's Chromium on ``url``, loaded."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError(f'no Chromium: {CHROMIUM_INSTALL}')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': viewport[0], 'height': viewport[1]})
            page.goto(url)
            page.wait_for_selector('#upload')
            yield page
        finally:
            browser.close()
