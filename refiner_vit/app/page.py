"""The Gradio page of ``refiner app``: the handlers of :mod:`.handlers` wired to components.

Gradio's analytics are off (nothing leaves the machine) and the theme uses the system's fonts, so the page needs
no network. Events run through Gradio's queue one at a time: several users at once wait their turn. The queue is
the only way in (no open REST routes, no API page). Uploads above the byte limit are refused by Gradio's server
before they are stored, and again by :mod:`.uploads`.
"""
import os
from typing import Any, List, Optional, Tuple

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402

from .handlers import MEAN_OF_HEADS, NO_EXPANDED, AppHandlers, PageState, View  # noqa: E402
from .render import METRICS, PICTURE_SIZE  # noqa: E402

__all__ = ['build_page', 'launch']

QUEUE_SIZE = 64  # users waiting at once; more get "queue full" instead of piling up memory
INTRO = """# Refiner: raw and refined attention
Model: `{label}`. Upload an image or pick an example. The maps show what the **query** token attends to in every
block: the **raw** map (softmax attention) and the **refined** map (the one that multiplies V). Click a patch of the
picture to make it the query; the button goes back to the class token."""


def _theme() -> gr.themes.Base:
    system = ['ui-sans-serif', 'system-ui', 'sans-serif']
    return gr.themes.Default(font=system, font_mono=['ui-monospace', 'monospace'])


def _outputs(state: Any, view: View, show_expanded: Optional[bool] = None) -> Tuple[Any, ...]:
    """The handler's state and view as the page's outputs, in the order of ``build_page``'s list; with
    ``show_expanded``, the expanded maps' picture is shown or hidden as well."""
    expanded = view.expanded
    if show_expanded is not None:
        expanded = gr.update(value=expanded, visible=True) if show_expanded else gr.update(visible=False)
    parts = (view.message, view.picture, view.prediction, view.maps, expanded, view.caption)
    metrics = view.metrics or (None,) * len(METRICS)
    return (state,) + tuple(gr.skip() if part is None else part for part in parts + tuple(metrics))


def build_page(handlers: AppHandlers) -> gr.Blocks:
    """The page for ``handlers``' model (not launched)."""
    with gr.Blocks(title='Refiner: attention', analytics_enabled=False) as page:
        state = gr.State(None)
        gr.Markdown(INTRO.format(label=handlers.session.label))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label='Upload an image', type='filepath', elem_id='upload')
                example = gr.Dropdown(choices=list(handlers.examples), value=None, label='or an example',
                                      elem_id='example')
                message = gr.Markdown(elem_id='message')
                prediction = gr.Label(num_top_classes=5, label='Top-5 prediction', elem_id='prediction')
            with gr.Column(scale=1):
                picture = gr.Image(label='Click a patch to make it the query', interactive=False, format='png',
                                   height=PICTURE_SIZE + 40, elem_id='picture')
                with gr.Row():
                    class_token = gr.Button('Back to the class token', elem_id='class-token')
                    head = gr.Dropdown(choices=handlers.head_choices, value=MEAN_OF_HEADS, label='Head',
                                       elem_id='head')
                    expanded_block = gr.Dropdown(
                        choices=handlers.expanded_choices or [NO_EXPANDED], value=NO_EXPANDED,
                        label='Released refiner: expanded maps of', visible=bool(handlers.expanded_choices),
                        elem_id='expanded-block')
                caption = gr.Markdown(elem_id='caption')
        maps = gr.Image(label='Every block: raw map (top), refined map (bottom)', interactive=False, format='png',
                        elem_id='maps')
        expanded = gr.Image(label="Expanded maps of the refiner (H' = H x r), strongest for the head first",
                            interactive=False, format='png', visible=False, elem_id='expanded')
        gr.Markdown('Metrics per block (`refiner_vit.analysis`, over all heads and queries), raw against refined maps')
        with gr.Row(elem_id='metrics'):
            metrics = [gr.LinePlot(x='block', y='value', color='map', title=title, x_title='block', y_title='',
                                   height=260, show_label=False) for _, title in METRICS]
        outputs: List[Any] = [state, message, picture, prediction, maps, expanded, caption, *metrics]

        def on_upload(path: str, current: PageState):
            return _outputs(*handlers.upload(path, current))

        def on_example(name: str, current: PageState):
            return _outputs(*handlers.example(name, current))

        def on_click(current: PageState, event: gr.SelectData):
            x, y = event.index
            return _outputs(*handlers.click(current, x, y, (PICTURE_SIZE, PICTURE_SIZE)))

        def on_class_token(current: PageState):
            return _outputs(*handlers.class_token(current))

        def on_head(current: PageState, choice: str):
            return _outputs(*handlers.choose_head(current, choice))

        def on_expanded(current: PageState, choice: str):
            return _outputs(*handlers.choose_expanded(current, choice), show_expanded=choice != NO_EXPANDED)

        def on_metrics(current: PageState):
            tables = handlers.metrics(current)[1].metrics
            return tuple(gr.skip() for _ in metrics) if tables is None else tables

        # the plots follow the maps; only they wait for the metrics, the picture can be clicked meanwhile
        upload.upload(on_upload, [upload, state], outputs).then(on_metrics, [state], metrics)
        example.input(on_example, [example, state], outputs).then(on_metrics, [state], metrics)
        picture.select(on_click, [state], outputs)
        class_token.click(on_class_token, [state], outputs)
        head.input(on_head, [state, head], outputs)
        expanded_block.input(on_expanded, [state, expanded_block], outputs)
    return page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE, api_open=False)


def launch(handlers: AppHandlers, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Serve the page on ``host:port``; with ``block=False`` return at once (the server runs in a thread)."""
    page = build_page(handlers)
    page.launch(server_name=host, server_port=port, max_file_size=handlers.limits.max_bytes, theme=_theme(),
                share=False, ssr_mode=False, mcp_server=False, footer_links=['gradio'], prevent_thread_lock=not block,
                quiet=not block)
    return page
