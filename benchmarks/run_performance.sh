#!/usr/bin/env bash
# Re-runs every table of docs/performance.md, on a quiet machine. Each benchmark times its rows round-robin in one
# process, so the ratios within a table are comparable; memory is counted from allocations and is exact.
# Usage: [OUT=runs/performance] [CC=cc] bash benchmarks/run_performance.sh [STEP ...]
#   STEP: targets (the issue's targets, normal build and AVX2 build), ops (each op alone, both builds),
#   first_use (what the first-use choices cost), memory (training memory), recompute (its throughput cost).
#   Default: all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/performance}
CC=${CC:-cc}
mkdir -p "$OUT"
BENCH=("$PY" -m refiner_vit benchmark)
TARGETS=(--batch-size 16 --model deit_small_patch16_224 refined_deit_small_patch16_224 refiner_vit_s_patch16_224)
MEMORY=(--modes train --repeats 1 --warmup 0 --gemm-size 512)
# The kernels built for AVX2 only (what most users' CPUs run), in a cache of their own; on a CPU without AVX-512
# this is the normal build again.
avx2() { CC="$CC -mno-avx512f" REFINER_KERNEL_CACHE="$OUT/kernels-avx2" "$@"; }
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(targets ops first_use recompute memory)
for step in "${steps[@]}"; do
  case $step in
    targets)  # the default (choices measured on first use) beside REFINER_NATIVE_KERNELS=0, in one run per build
      "${BENCH[@]}" --fuse --repeats 10 --kernels auto 0 --no-memory "${TARGETS[@]}" --output "$OUT/targets.json"
      avx2 "${BENCH[@]}" --fuse --repeats 10 --kernels auto 0 --no-memory "${TARGETS[@]}" \
        --output "$OUT/targets_avx2.json" ;;
    ops)
      "$PY" benchmarks/refiner_micro.py --repeats 8 | tee "$OUT/ops.txt"
      avx2 "$PY" benchmarks/refiner_micro.py --repeats 8 | tee "$OUT/ops_avx2.txt" ;;
    first_use) "$PY" benchmarks/first_use.py | tee "$OUT/first_use.txt" ;;
    recompute)  # the released refiners' recompute against keeping their maps, Refiner-ViT-S training
      "${BENCH[@]}" --modes train --repeats 10 --no-memory --batch-size 16 --model refiner_vit_s_patch16_224 \
        --compare-kwargs refiner_recompute=False --output "$OUT/recompute.json" ;;
    memory)
      "${BENCH[@]}" "${MEMORY[@]}" --batch-size 16 --model deit_small_patch16_224 refiner_vit_s_patch16_224 \
        --output "$OUT/memory_s.json"
      "${BENCH[@]}" "${MEMORY[@]}" --batch-size 16 --model refiner_vit_s_patch16_224 \
        --model-kwargs refiner_recompute=False --output "$OUT/memory_s_no_recompute.json"
      "${BENCH[@]}" "${MEMORY[@]}" --batch-size 16 --grad-checkpointing \
        --model deit_small_patch16_224 refiner_vit_s_patch16_224 --output "$OUT/memory_s_ckpt.json"
      "${BENCH[@]}" "${MEMORY[@]}" --batch-size 1 --model refiner_vit_l_patch16_448 \
        --output "$OUT/memory_l448_b1.json"
      "${BENCH[@]}" "${MEMORY[@]}" --batch-size 1 --model refiner_vit_l_patch16_448 \
        --model-kwargs refiner_recompute=False --output "$OUT/memory_l448_b1_no_recompute.json"
      # batch 2: the profiled count outgrows 23 GB here, so the peak resident memory of one step instead
      for args in "1" "2" "2 --grad-checkpointing"; do
        # shellcheck disable=SC2086
        "$PY" benchmarks/peak_rss.py refiner_vit_l_patch16_448 $args
      done | tee "$OUT/memory_l448_rss.txt" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
