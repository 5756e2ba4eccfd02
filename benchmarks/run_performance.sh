#!/usr/bin/env bash
# Re-runs every table of docs/performance.md (run it on a quiet machine; 24 minutes on 2 CPU cores at 23285fe).
# Each command times its rows round-robin in one process, so the ratios within a table are comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/performance}
mkdir -p "$OUT"
BENCH=("$PY" -m refiner_vit benchmark)
# The issue's three models, at batch 16 and 224 px.
TARGETS=(--batch-size 16 --models deit_small_patch16_224 refined_deit_small_patch16_224 refiner_vit_s_patch16_224)
# The digits configuration of docs/attention_demo.py (32 px, patch 4, dim 64, depth 4, batch 64), 1 thread.
DIGITS=(--modes train --batch-size 64 --img-size 32 --threads 1 --repeats 20
        --models vit_tiny_patch16_224 refined_deit_tiny_patch16_224
        --model-kwargs patch_size=4 embed_dim=64 depth=4 num_heads=4 mlp_ratio=3.0 num_classes=10)

# 1. The issue's targets: Refiner-ViT-S vs the GEMM peak, refined DeiT-S vs DeiT-S.
"${BENCH[@]}" --fuse --repeats 10 --json "$OUT/targets.json" "${TARGETS[@]}"

# 1a. The same with the native CPU kernels switched off (table J's right-hand columns).
REFINER_NATIVE_KERNELS=0 "${BENCH[@]}" --fuse --repeats 10 --json "$OUT/targets_no_native.json" "${TARGETS[@]}"

# 1b. The same under torch.compile (table G; compiling takes minutes on 2 cores).
"${BENCH[@]}" --fuse --compile --repeats 7 --json "$OUT/targets_compile.json" "${TARGETS[@]}"
# ... and Refiner-ViT-S inference compiled with inductor's freezing (weights as constants; table L).
TORCHINDUCTOR_FREEZING=1 "${BENCH[@]}" --fuse --compile --modes infer --batch-size 16 --repeats 10 \
    --json "$OUT/rvs_compile_freezing.json" --models refiner_vit_s_patch16_224

# 1c. Inference-only processes with and without keeping freed memory (table H), alternating.
for keep in 1 0 1 0; do
  REFINER_KEEP_FREED_MEMORY=$keep "${BENCH[@]}" --modes infer --fuse --repeats 7 "${TARGETS[@]}"
done

# 1d. Inference-only pairs (table K) and the unfused eval model with the native kernels on and off (optimisation 15).
for run in 1 2 3; do
  "${BENCH[@]}" --modes infer --batch-size 16 --repeats 10 --json "$OUT/infer_pair_run$run.json" \
      --models deit_small_patch16_224 refined_deit_small_patch16_224
done
for native in 1 0; do
  REFINER_NATIVE_KERNELS=$native "${BENCH[@]}" --modes infer --batch-size 16 --repeats 7 \
      --json "$OUT/unfused_eval_native$native.json" --models refiner_vit_s_patch16_224
done

# 2. Before/after of the refiner optimisations (plain stage-by-stage refiner vs fast vs fused).
$PY benchmarks/refiner_ablation.py --models refined_deit_small_patch16_224 refiner_vit_s_patch16_224 \
    --variants stages fast fused --batch-size 16 --repeats 5 --json "$OUT/ablation.json"

# 3. The digits configuration: with the native kernels, without them, and compiled.
"${BENCH[@]}" "${DIGITS[@]}" --json "$OUT/digits.json"
REFINER_NATIVE_KERNELS=0 "${BENCH[@]}" "${DIGITS[@]}" --json "$OUT/digits_no_native.json"
"${BENCH[@]}" "${DIGITS[@]}" --compile --json "$OUT/digits_compile.json"

# 4. The refiner alone (tables C and I: stages, oneDNN and native kernels).
$PY benchmarks/refiner_micro.py --repeats 8

# 5. Full-size exports with parity (deployment section), then where Refiner-ViT-S's inference time goes.
OUT="$OUT/export" bash benchmarks/export_check.sh
$PY benchmarks/profile_forward.py --model refiner_vit_s_patch16_224 --batch-size 16
