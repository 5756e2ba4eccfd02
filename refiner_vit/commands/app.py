"""``refiner app``: a page in the browser that shows a model's raw and refined attention for an image.

Pick or upload an image; the page shows the top-5 prediction and, for every block, the raw map and the refined
map (the one that multiplies V) of the query token, the class token until a patch of the picture is clicked, for
one head or the mean over heads, and the blocks' metrics (head diversity, locality, similarity to the previous
block), raw against refined. For the authors' released refiner it also shows the expanded maps of a block.

The model is fixed at launch (the page cannot name files on the server). Without --model: runs/demo when it
exists, else the digits demo, trained once (1-2 minutes) into ~/.cache/refiner_vit/app/demo
($REFINER_APP_CACHE overrides the folder). Needs the app extra: pip install 'refiner-vit[app]'.
"""
import argparse

from ..errors import UsageError
from .model_source import SOURCE_HELP, add_model_options, load_model

EXAMPLE = """examples:
  refiner app --model refiner_vit_s_patch16_224 --checkpoint weights.pth
  refiner app --model local-dir:weights/refiner_vit_l_448     # the authors' weights after refiner convert
  refiner app                                   # runs/demo (make demo), else the digits demo; http://127.0.0.1:7860
  refiner app --model runs/demo --port 7861
"""
INSTALL = "pip install 'refiner-vit[app]'"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'app', help='explore raw and refined attention maps of a model in a browser (Gradio)', description=__doc__,
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    add_model_options(p, model='optional', use_ema=True,
                      model_help=f'{SOURCE_HELP}; default: runs/demo, else the digits demo trained once')
    p.add_argument('--host', default='127.0.0.1',
                   help='address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network)')
    p.add_argument('--port', type=int, default=7860, help='port to listen on (default: 7860)')
    p.add_argument('--threads', type=int, default=1, metavar='N',
                   help='CPU threads for the model (default 1: on a busy 2-core CPU one thread answers sooner and '
                        'leaves a core to the browser; 0: PyTorch\'s default)')
    p.set_defaults(func=run, runs_models=True)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UsageError(f'the app needs Gradio: {INSTALL} (or, in a checkout, pip install -e \'.[app]\')') from e
    import torch

    from ..app import AppHandlers, AttentionSession, default_model_source, example_images
    from ..app.page import launch

    if args.threads < 0:
        raise UsageError(f'--threads {args.threads}: give 0 (PyTorch\'s default) or more')
    if args.threads:
        torch.set_num_threads(args.threads)

    source = args.model
    if source is None:
        if args.checkpoint or args.pretrained or args.use_ema:
            raise UsageError('--checkpoint, --pretrained and --use-ema need --model')
        try:
            source = default_model_source()
        except RuntimeError as e:
            raise UsageError(str(e)) from e
    resolved = load_model(args, source, args.checkpoint, args.model_kwargs)
    session = AttentionSession(resolved, source)
    handlers = AppHandlers(session, example_images(max(session.input_size)))
    print(f'refiner app: {source} on http://{args.host}:{args.port} (Ctrl-C stops it)')
    launch(handlers, args.host, args.port)
    return 0
