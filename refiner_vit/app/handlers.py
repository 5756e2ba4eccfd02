"""What the page does on each user action, as plain functions of plain values (no Gradio: tested directly).

Each handler takes the page's state (a :class:`PageState`, None before the first image) and the user's input, and
returns the new state and a :class:`View`: the parts of the page to redraw, None for a part left as it is. Only
a new image runs the model; a click on a patch, another head or another refiner block slice the stored maps. The
metrics of a new image come from a handler of their own, which the page calls after showing the maps.
Refused uploads and failures put a message in the page and leave the rest as it was, so the app keeps serving.
The page can choose among the examples by name and upload files; it cannot name a file or a model on the server.
"""
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import UploadError
from .render import describe_query, expanded_picture, input_picture, maps_picture, metric_tables, top_labels
from .session import Analysis, AttentionSession
from .uploads import UploadLimits, open_upload

__all__ = ['AppHandlers', 'MEAN_OF_HEADS', 'NO_EXPANDED', 'PageState', 'View']

MEAN_OF_HEADS = 'mean of heads'
NO_EXPANDED = 'off'


@dataclass(frozen=True)
class PageState:
    """One user's page: the analysed image and what is chosen on it."""

    analysis: Analysis
    query: int
    head: Optional[int] = None  # None: the mean over heads
    expanded_block: Optional[int] = None  # a released refiner's block whose expanded maps are shown


@dataclass
class View:
    """Parts of the page to redraw; None leaves a part as it is."""

    message: Optional[str] = None
    picture: Optional[np.ndarray] = None
    prediction: Optional[Dict[str, float]] = None
    maps: Optional[np.ndarray] = None
    metrics: Optional[Tuple[Any, ...]] = None  # a table per plotted metric (render.metric_tables)
    expanded: Optional[np.ndarray] = None
    caption: Optional[str] = None


class AppHandlers:
    """The handlers of one app: a session (the model), its examples and the upload limits."""

    def __init__(self, session: AttentionSession, examples: Dict[str, Image.Image],
                 limits: Optional[UploadLimits] = None) -> None:
        self.session = session
        self.examples = examples
        self.limits = limits or UploadLimits()
        self.heads = session.heads
        self.refined_blocks = session.refined_blocks

    # ------------------------------------------------------------------------------------------ choices
    @property
    def head_choices(self) -> List[str]:
        return [MEAN_OF_HEADS] + [f'head {h}' for h in range(self.heads)]

    @property
    def expanded_choices(self) -> List[str]:
        """``off`` and the blocks with a released refiner (empty list: the model has none)."""
        return [NO_EXPANDED] + [f'block {b}' for b in self.refined_blocks] if self.refined_blocks else []

    # ------------------------------------------------------------------------------------------ new images
    def upload(self, path: Optional[str], state: Optional[PageState]) -> Tuple[Optional[PageState], View]:
        """An uploaded file: analysed if it is an acceptable image, else a message naming the reason."""
        if not path:
            return state, View()
        try:
            image = open_upload(path, self.limits)
        except UploadError as e:
            return state, View(message=f'Refused: {e}')
        return self._show(image, state)

    def example(self, name: Optional[str], state: Optional[PageState]) -> Tuple[Optional[PageState], View]:
        """One of the examples, by name."""
        if name not in self.examples:
            return state, View(message=f'Refused: {name!r} is not one of the examples' if name else None)
        return self._show(self.examples[name], state)

    def _show(self, image: Image.Image, state: Optional[PageState]) -> Tuple[Optional[PageState], View]:
        try:
            analysis = self.session.analyse(image)
        except (ValueError, RuntimeError, OSError) as e:
            return state, View(message=f'Could not analyse this image: {e}')
        new = PageState(analysis, analysis.default_query, state.head if state else None,
                        state.expanded_block if state else None)
        view = self._redraw(new)
        view.message = ''
        view.prediction = top_labels(analysis.top)
        return new, view

    def metrics(self, state: Optional[PageState]) -> Tuple[Optional[PageState], View]:
        """The metrics of the image's maps, per block: the page asks for them after it shows the maps."""
        return state, View() if state is None else View(metrics=metric_tables(state.analysis.stats))

    # ------------------------------------------------------------------------------------------ choices on it
    def click(self, state: Optional[PageState], x: int, y: int, size: Tuple[int, int]) -> Tuple[Any, View]:
        """A click at pixel ``(x, y)`` of the input picture of ``size`` (width, height): that patch is the query."""
        if state is None:
            return state, View(message='Upload an image or choose an example first.')
        rows, cols = state.analysis.grid
        row = min(max(int(y) * rows // size[1], 0), rows - 1)
        col = min(max(int(x) * cols // size[0], 0), cols - 1)
        return self._update(state, query=state.analysis.query_of_patch(row, col))

    def class_token(self, state: Optional[PageState]) -> Tuple[Any, View]:
        """Back to the default query (the class token)."""
        if state is None:
            return state, View()
        return self._update(state, query=state.analysis.default_query)

    def choose_head(self, state: Optional[PageState], choice: str) -> Tuple[Any, View]:
        head = None if choice == MEAN_OF_HEADS else int(choice.split()[-1])
        if head is not None and not 0 <= head < self.heads:
            raise ValueError(f'head {head}: the model has {self.heads} heads')
        return (None, View()) if state is None else self._update(state, head=head)

    def choose_expanded(self, state: Optional[PageState], choice: str) -> Tuple[Any, View]:
        block = None if choice in (None, NO_EXPANDED) else int(choice.split()[-1])
        if block is not None and block not in self.refined_blocks:
            raise ValueError(f'block {block} has no released refiner')
        if state is None:
            return None, View()
        new, view = self._update(state, expanded_block=block)
        if block is None:
            view.expanded = np.full((1, 1, 3), 255, np.uint8)  # turned off: a blank picture replaces the last one
        return new, view

    def _update(self, state: PageState, **changes: Any) -> Tuple[PageState, View]:
        new = replace(state, **changes)
        return new, self._redraw(new)

    def _redraw(self, state: PageState) -> View:
        """The picture, the maps, the expanded maps and the caption for the state's query and head."""
        analysis = state.analysis
        patch = analysis.patch_of_query(state.query)
        layers = self.session.query_maps(analysis, state.query, state.head)
        head_text = MEAN_OF_HEADS if state.head is None else f'head {state.head}'
        caption = f'Query: {describe_query(patch)}; {head_text}.'
        expanded = None
        if state.expanded_block is not None:
            head = 0 if state.head is None else state.head
            weights, maps = self.session.expanded_maps(analysis, state.expanded_block, head, state.query)
            expanded = expanded_picture(analysis.image, weights, maps, analysis.grid, patch)
            caption += (f' Expanded maps of block {state.expanded_block}, ordered by the weight head {head} reads '
                        f'them with{" (pick a head; head 0 shown)" if state.head is None else ""}.')
        return View(picture=input_picture(analysis.image, analysis.grid, patch),
                    maps=maps_picture(analysis.image, layers, analysis.grid, patch), expanded=expanded,
                    caption=caption)
