"""Train three tiny ViTs on scikit-learn's digits and draw their attention with `refiner attention`.

Produces the pictures and the table of docs/attention.md. The three models share one size (dim 64, 4
blocks, 4 heads, 32 px input, 4-px patches: one patch per digit pixel, an 8x8 token grid) and one
training recipe (AdamW, cosine schedule, no augmentation); they differ only in the attention:

* ``plain``: timm's ViT (``vit_tiny_patch16_224`` architecture, resized);
* ``refined``: the same ViT with the paper-form refiner in every block (``refined_deit_tiny_patch16_224``);
* ``refiner``: the authors' Refiner-ViT architecture (``test_refiner_vit``, conv stem, computing /
  sharing blocks, aux head).

Each trained model is saved as a timm local-dir folder (config.json + model.safetensors) under
``--work``, so ``refiner attention --model FOLDER`` loads it. Run from the repository root:

    .venv/bin/python docs/attention_demo.py
"""
import argparse
import shutil
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import refiner_vit
from refiner_vit.analysis import layer_stats, token_grid
from refiner_vit.cli import main as refiner_cli
from refiner_vit.models.local_dir import save_local_dir

IMG_SIZE = 32
SHARED_ARGS = dict(img_size=IMG_SIZE, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=3.0)
MODELS = {
    'plain': ('vit_tiny_patch16_224', SHARED_ARGS),
    'refined': ('refined_deit_tiny_patch16_224', SHARED_ARGS),
    'refiner': ('test_refiner_vit', SHARED_ARGS),
}
DATA_CONFIG = {'input_size': (3, IMG_SIZE, IMG_SIZE), 'crop_pct': 1.0, 'interpolation': 'bicubic',
               'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}


def digits_as_images() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 32x32 RGB in [0, 1] (each 8x8 pixel becomes a 4x4 block), split 80/20 stratified."""
    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    images = F.interpolate(images, scale_factor=IMG_SIZE // 8, mode='nearest').expand(-1, 3, -1, -1)
    labels = torch.from_numpy(digits.target).long()
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0)
    return images[train], labels[train], images[test], labels[test]


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.5


def train(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    architecture, args = MODELS[name]
    model = timm.create_model(architecture, **args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(x) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(normalise(x[batch])), y[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(normalise(x)).argmax(-1) == y).float().mean().item()


def save_model(model: torch.nn.Module, name: str, folder: Path) -> None:
    """The trained model as a timm local dir (``refiner attention --model FOLDER`` reads it)."""
    save_local_dir(model, folder, model_args=MODELS[name][1], label_names=[str(d) for d in range(10)],
                   data_config=DATA_CONFIG, overwrite=True)


def test_set_metrics(model: torch.nn.Module, x: torch.Tensor) -> List[Dict]:
    """Per-layer metrics averaged over the whole test split (the CLI shows one image)."""
    records = refiner_vit.attention_maps(model, normalise(x))
    return layer_stats(records, token_grid(model, x.shape[-2:]))


def print_table(metrics: Dict[str, List[Dict]]) -> None:
    keys = ('mean_distance', 'head_similarity', 'layer_similarity', 'entropy')
    print('| model | layer | kind | maps | ' + ' | '.join(keys) + ' |')
    print('|---|---|---|---|' + '---|' * len(keys))
    for name, layers in metrics.items():
        for layer in layers:
            for which in ('raw', 'refined'):
                if layer[which] is None:
                    continue
                values = [layer[which][k] for k in keys]
                cells = ' | '.join('—' if v is None else f'{v:.3f}' for v in values)
                print(f'| {name} | {layer["block"]} | {layer["kind"]} | {which} | {cells} |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', default='runs/attention_demo', help='folder for the trained models and CLI output')
    parser.add_argument('--img-dir', default='docs/img', help='where the pictures for the docs are copied')
    parser.add_argument('--epochs', type=int, default=8, help='training epochs per model')
    parser.add_argument('--seed', type=int, default=0, help='seed of initialisation and batch order')
    parser.add_argument('--digit', type=int, default=3, help='index (in the test split) of the pictured digit')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (1: these models are too small to gain from more on a busy machine)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work, img_dir = Path(args.work), Path(args.img_dir)
    x_train, y_train, x_test, y_test = digits_as_images()

    metrics = {}
    for name in MODELS:
        start = time.perf_counter()
        model = train(name, x_train, y_train, args.epochs, args.seed)
        print(f'{name}: test accuracy {accuracy(model, x_test, y_test):.3f} ({len(y_test)} images), '
              f'trained in {time.perf_counter() - start:.0f} s')
        save_model(model, name, work / name)
        metrics[name] = test_set_metrics(model, x_test)
    print_table(metrics)

    image = work / f'digit_{y_test[args.digit].item()}.png'
    pixels = (x_test[args.digit].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(image)
    img_dir.mkdir(parents=True, exist_ok=True)
    for name in ('refiner', 'refined'):
        out = work / f'figures_{name}'
        code = refiner_cli(['attention', '--model', str(work / name), '--image', str(image),
                            '--output', str(out), '--compare', str(work / 'plain')])
        if code:
            raise SystemExit(code)
        shutil.copyfile(out / 'attention.png', img_dir / f'attention_{name}.png')
        shutil.copyfile(out / 'metrics.png', img_dir / f'metrics_{name}_vs_plain.png')
    out = work / 'figures_plain'
    refiner_cli(['attention', '--model', str(work / 'plain'), '--image', str(image), '--output', str(out)])
    shutil.copyfile(out / 'attention.png', img_dir / 'attention_plain.png')


if __name__ == '__main__':
    main()
