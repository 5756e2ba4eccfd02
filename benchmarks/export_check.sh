#!/usr/bin/env bash
# Full-size export check (not in the test suite: minutes on 2 CPU cores): Refiner-ViT-S and refined DeiT-S,
# fused, to torch.export (.pt2) and ONNX (.onnx) with a dynamic batch; each line reports the relative error
# max|exported - eager| / max|eager| on a batch of 3 (traced at 2). Random weights unless CHECKPOINT_* are set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/export}
mkdir -p "$OUT"
for model in refiner_vit_s_patch16_224 refined_deit_small_patch16_224; do
    for suffix in pt2 onnx; do
        $PY -m refiner_vit export --model "$model" --output "$OUT/$model.$suffix" 2>&1 | grep -v '^\[torch.onnx\]'
    done
done
