#!/usr/bin/env bash
# One GPU check of refiner-vit, under 8 minutes on one GPU:
#   1. the tests marked `cuda` (refiner forward/backward, the recomputing refiner, bf16/fp16 training steps, fused
#      models, grad checkpointing);
#   2. `refiner benchmark --device cuda --amp bf16` at batch 64 for DeiT-S, refined DeiT-S and Refiner-ViT-S
#      (peak memory from torch.cuda.max_memory_allocated), then the training step of Refiner-ViT-S with its refiners'
#      recompute on and off in the same rounds, at batch 64 and at the authors' 32 per GPU, and the three models'
#      training step with grad checkpointing;
#   3. a 2-epoch digits training on CUDA.
# It runs from the source tree with the python that has torch (no install): PYTHON (default python3).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [OUT]     (OUT default runs/gpu_check: logs and JSON)
#   --dry-run: the same steps on the CPU at toy sizes, to check the script and its commands where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"

if [ $dry = 1 ]; then
  device=cpu; batch=2; repeats=1; warmup=0; epochs=1; models=(test_refiner_vit); released=test_refiner_vit
  sizes=(--img-size 64 --gemm-size 256); train_data=(--img-size 16)
else
  device=cuda; batch=64; repeats=10; warmup=2; epochs=2; sizes=(); train_data=()
  models=(deit_small_patch16_224 refined_deit_small_patch16_224 refiner_vit_s_patch16_224)
  released=refiner_vit_s_patch16_224
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --dry-run")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
"$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)' | tee "$OUT/versions.txt"

echo "== 1/3 tests marked cuda"
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"

echo "== 2/3 benchmark (bf16 autocast, batch $batch)"
benchmark=("$PY" -m refiner_vit benchmark --device "$device" --amp bf16 --repeats "$repeats" --warmup "$warmup"
           "${sizes[@]}")
bench=("${benchmark[@]}" --batch-size "$batch")
"${bench[@]}" --fuse --model "${models[@]}" --output "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
# the recompute on and off in one run (rows "MODEL" and "MODEL [refiner_recompute=False]"), at two batch sizes
"${bench[@]}" --modes train --model "$released" --compare-kwargs refiner_recompute=False \
  --output "$OUT/bench_no_recompute.json" 2>&1 | tee "$OUT/bench_no_recompute.txt"
"${benchmark[@]}" --batch-size $((batch / 2)) --modes train --model "$released" --compare-kwargs refiner_recompute=False \
  --output "$OUT/bench_recompute_half_batch.json" 2>&1 | tee "$OUT/bench_recompute_half_batch.txt"
"${bench[@]}" --modes train --grad-checkpointing --model "${models[@]}" --output "$OUT/bench_ckpt.json" 2>&1 \
  | tee "$OUT/bench_ckpt.txt"

echo "== 3/3 digits, $epochs epochs on $device"
"$PY" -m refiner_vit train --device "$device" --epochs "$epochs" --output "$OUT/digits" "${train_data[@]}" --no-progress \
  --no-tensorboard 2>&1 | tee "$OUT/train.txt"
echo "gpu_check: done; results in $OUT"
