#!/usr/bin/env bash
# Re-runs every table of docs/performance.md, on a quiet machine. Each benchmark times its rows round-robin in one
# process, so the ratios within a table are comparable; memory is counted from allocations and is exact.
# Usage: [OUT=runs/performance] [CC=cc] bash benchmarks/run_performance.sh [STEP ...]
#   STEP: targets (the issue's targets, normal build, AVX2 build and a whole AVX2 CPU), ops (each op alone, both
#   builds), first_use (what the first-use choices cost), memory (training memory), recompute (its throughput cost),
#   train (the three models' training steps at batch 16 and 32, both builds and the AVX2 CPU), train_ops (the released
#   refiner's training passes, bytes and GB/s, batch 16 and 32, both builds), profile (a Refiner-ViT-S training step by
#   part, batch 16 and 32, and by operator and shape, batch 16), compile (training under torch.compile, beside eager
#   in the same rounds' settings).
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
TRAIN=(--modes train --repeats 10 --no-memory --model deit_small_patch16_224 refined_deit_small_patch16_224
       refiner_vit_s_patch16_224)
# The kernels built for AVX2 only (what most users' CPUs run), in a cache of their own; on a CPU without AVX-512
# this is the normal build again. torch's own kernels still use AVX-512 here.
avx2() { CC="$CC -mno-avx512f" REFINER_KERNEL_CACHE="$OUT/kernels-avx2" "$@"; }
# An AVX2-only CPU as a whole: the AVX2 build, and torch's ATen operators, MKL GEMMs and oneDNN convolutions capped
# to AVX2 as well (a real AVX2 CPU runs those at AVX2 speed too); its own kernel cache, as the choices differ.
avx2_cpu() {
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
    CC="$CC -mno-avx512f" REFINER_KERNEL_CACHE="$OUT/kernels-avx2-cpu" "$@"
}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(targets ops first_use recompute memory train train_ops profile compile)
for step in "${steps[@]}"; do
  case $step in
    targets)  # the default (choices measured on first use) beside REFINER_NATIVE_KERNELS=0, in one run per build
      "${BENCH[@]}" --fuse --repeats 10 --kernels auto 0 --no-memory "${TARGETS[@]}" --output "$OUT/targets.json"
      avx2 "${BENCH[@]}" --fuse --repeats 10 --kernels auto 0 --no-memory "${TARGETS[@]}" \
        --output "$OUT/targets_avx2.json"
      avx2_cpu "${BENCH[@]}" --fuse --repeats 10 --kernels auto 0 --no-memory "${TARGETS[@]}" \
        --output "$OUT/targets_avx2_cpu.json" ;;
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
    train)  # share of the GEMM peak of each model's training step, in one run per build and batch size
      for batch in 16 32; do
        "${BENCH[@]}" "${TRAIN[@]}" --batch-size $batch --output "$OUT/train_b$batch.json"
        avx2 "${BENCH[@]}" "${TRAIN[@]}" --batch-size $batch --output "$OUT/train_b${batch}_avx2.json"
        avx2_cpu "${BENCH[@]}" "${TRAIN[@]}" --batch-size $batch --output "$OUT/train_b${batch}_avx2_cpu.json"
      done ;;
    train_ops)
      for batch in 16 32; do
        "$PY" benchmarks/refiner_micro.py --train --batch-size $batch --repeats 5 | tee "$OUT/train_ops_b$batch.txt"
        avx2 "$PY" benchmarks/refiner_micro.py --train --batch-size $batch --repeats 5 \
          | tee "$OUT/train_ops_b${batch}_avx2.txt"
      done ;;
    profile)
      for batch in 16 32; do
        "$PY" benchmarks/profile_forward.py --train --batch-size $batch --repeats 2 --rows 20 \
          | tee "$OUT/profile_train_b$batch.txt"
      done
      "$PY" benchmarks/profile_forward.py --train --by-shape --repeats 2 --rows 25 \
        | tee "$OUT/profile_train_b16_shapes.txt" ;;
    compile)  # compiled and eager training, one run each (compiling takes minutes per model)
      "${BENCH[@]}" "${TRAIN[@]}" --batch-size 16 --compile --output "$OUT/train_b16_compile.json"
      "${BENCH[@]}" "${TRAIN[@]}" --batch-size 16 --output "$OUT/train_b16_eager.json" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
