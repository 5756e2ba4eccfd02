"""``refiner app``: raw and refined attention of any model the resolver accepts, in a browser.

The pieces have one job each and, except :mod:`.page`, need no Gradio: :mod:`.session` runs the model once per
image and slices the maps, :mod:`.uploads` refuses unsafe files, :mod:`.render` draws the pictures,
:mod:`.examples` makes offline example images, :mod:`.default_model` finds or trains the default model,
:mod:`.handlers` is what each user action does, and :mod:`.page` wires the handlers to a Gradio page.
"""
from .default_model import app_cache, default_model_source
from .examples import example_images
from .handlers import AppHandlers, PageState, View
from .session import Analysis, AttentionSession, LayerMaps
from .uploads import UploadLimits, open_upload

__all__ = ['Analysis', 'AppHandlers', 'AttentionSession', 'LayerMaps', 'PageState', 'UploadLimits', 'View',
           'app_cache', 'default_model_source', 'example_images', 'open_upload']
