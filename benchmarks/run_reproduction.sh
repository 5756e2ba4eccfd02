#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md, in order of importance (finished runs are reused).
# Usage: [JOBS=2] [WORK=runs/reproduction] [RESULTS=DIR] [PLOTS=DIR] bash benchmarks/run_reproduction.sh [ITEM ...]
#   ITEM, the studies of the decomposition (docs/reproduction.md, "Commands for the long runs"):
#     'decomposition_4x4'  the main comparison and the decomposition on digits at 16 px, patch 4
#     'decomposition_7x7'  the same at 28 px, patch 4
#     'grids'              the main comparison and the decomposition at 28 px with patch 4 and 2 (7x7, 14x14),
#                          10 epochs, 2 seeds, a three-rate sweep, and the grid summary
#     'mnist5k'            the main comparison and the decomposition on mnist5k at 28 px, patch 4, 3 seeds
#     'mnist5k_main'       its main comparison alone, with a three-rate sweep (the part that fits under an hour)
#     'mnist5k_short'      the main comparison and the decomposition with that sweep (3 seeds)
#     'rivals'             the refiner beside talking heads, re-attention, kernel 1 and expansion 1 on the plain and
#                          the conv-stem ViT (--ablation rivals) on digits and on mnist5k at 28 px, patch 4 (7x7), with
#                          the recipes of 'decomposition_7x7' and 'mnist5k' (their work folders: shared runs reused)
#     'depth'              vit, refiner, talking heads and re-attention at depth 12 (--ablation rivals_depth) on digits
#                          at 28 px, patch 4, with a three-rate sweep
#     'rivals_short'       'rivals' on digits with the recipe of 'grids' (10 epochs, 2 seeds, a three-rate sweep),
#                          then on mnist5k with that sweep and seeds at its 12 epochs: what fits two hours on two cores
#     'depth_short'        'depth' with that recipe
#     'grids_long'         the decomposition at 14x14 (28 px, patch 2) with 30 epochs, 3 seeds and a three-rate sweep:
#                          the longer schedule of the grid study
#   or an item of the earlier results (4x4 grid, 30 epochs, one warm-up epoch, as they were measured): an
#   ablation of data_efficiency.py on digits at 16 px ('none' = the main comparison), 'fraction_same_epochs'
#   (the fraction curve at equal epochs), 'kernel_retuned' (the kernel ablation with a sweep per setting) or
#   'scenes' (the main comparison on the 32 px digit-scenes ImageFolder). Default: the four decomposition items.
# Tables and JSON go to RESULTS, pictures to PLOTS (default for both: WORK/results), so a run never writes over
# the tracked benchmarks/results/* and docs/img/*; to refresh those, give RESULTS=benchmarks/results PLOTS=docs/img.
# Runs found in WORK are reused; a run that other code trained is reported as stale (use a fresh WORK).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/reproduction}
RESULTS=${RESULTS:-$WORK/results}
PLOTS=${PLOTS:-$RESULTS}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$RESULTS" "$PLOTS"
items=("$@")
[ ${#items[@]} -gt 0 ] || items=(decomposition_4x4 decomposition_7x7 mnist5k grids)
run() {  # NAME ARGS...: one invocation, its tables also saved as RESULTS/NAME.txt
  local name=$1; shift
  nice -n 15 "$PYTHON" benchmarks/data_efficiency.py --jobs "${JOBS:-2}" "$@" \
    --json "$RESULTS/$name.json" --plot "$PLOTS/reproduction_$name.png" 2>&1 \
    | tee "$RESULTS/$name.txt"
}
earlier=(--seeds 3 --epochs 30 --warmup-epochs 1)        # the recipe of the earlier results
digits=("${earlier[@]}" --data digits --img-size 16 --patch-sizes 4 --work "$WORK/digits")
both=(--ablation none decomposition --seeds 3 --warmup-epochs 1)  # main comparison and decomposition
mnist=(--epochs 12 --data mnist5k --img-size 28 --patch-sizes 4 --work "$WORK/mnist5k")
short=(--warmup-epochs 1 --lrs 5e-4 1e-3 2e-3 "${mnist[@]}")    # mnist5k with a three-rate sweep
quick_sweep=(--seeds 2 --warmup-epochs 1 --lrs 5e-4 1e-3 2e-3)  # the grid study's short recipe, epochs aside
quick=("${quick_sweep[@]}" --epochs 10 --data digits --img-size 28 --patch-sizes 4)
for item in "${items[@]}"; do
  case $item in
    decomposition_4x4) run digits_4x4 "${both[@]}" --epochs 30 --data digits --img-size 16 --patch-sizes 4 \
                         --work "$WORK/digits16" ;;
    decomposition_7x7) run digits_7x7 "${both[@]}" --epochs 30 --data digits --img-size 28 --patch-sizes 4 \
                         --work "$WORK/digits28" ;;
    grids) run digits_grids --ablation none decomposition --seeds 2 --epochs 10 --warmup-epochs 1 \
             --lrs 5e-4 1e-3 2e-3 --data digits --img-size 28 --patch-sizes 4 2 --work "$WORK/digits28" ;;
    mnist5k) run mnist5k "${both[@]}" "${mnist[@]}" ;;
    mnist5k_main) run mnist5k_main --ablation none --seeds 3 "${short[@]}" ;;
    mnist5k_short) run mnist5k_short --ablation none decomposition --seeds 3 "${short[@]}" ;;
    rivals) run digits_rivals_7x7 --ablation rivals --seeds 3 --epochs 30 --warmup-epochs 1 --data digits \
              --img-size 28 --patch-sizes 4 --work "$WORK/digits28"
            run mnist5k_rivals --ablation rivals --seeds 3 --warmup-epochs 1 "${mnist[@]}" ;;
    depth) run digits_depth12 --ablation rivals_depth --depth 12 --seeds 3 --epochs 30 --warmup-epochs 1 \
             --lrs 5e-4 1e-3 2e-3 --data digits --img-size 28 --patch-sizes 4 --work "$WORK/digits28_depth12" ;;
    rivals_short) run digits_rivals_short --ablation rivals "${quick[@]}" --work "$WORK/digits28_short"
                  run mnist5k_rivals_short --ablation rivals "${quick_sweep[@]}" --epochs 12 --data mnist5k \
                    --img-size 28 --patch-sizes 4 --work "$WORK/mnist5k_short" ;;
    depth_short) run digits_depth12_short --ablation rivals_depth --depth 12 "${quick[@]}" \
                   --work "$WORK/digits28_depth12_short" ;;
    grids_long) run digits_grids_long_14x14 --ablation decomposition --seeds 3 --epochs 30 --warmup-epochs 1 \
                  --lrs 5e-4 1e-3 2e-3 --data digits --img-size 28 --patch-sizes 2 --work "$WORK/digits28" ;;
    scenes)
      [ -d runs/digit_scenes ] || "$PYTHON" benchmarks/make_digit_scenes.py runs/digit_scenes
      run scenes_main "${earlier[@]}" --data runs/digit_scenes --img-size 32 --patch-sizes 8 --work "$WORK/scenes" ;;
    fraction_same_epochs) run digits_fraction_same_epochs "${digits[@]}" --ablation fraction --fraction-budget epochs ;;
    kernel_retuned) run digits_kernel_retuned "${digits[@]}" --ablation kernel --retune-ablations ;;
    *) run "digits_${item/none/main}" "${digits[@]}" --ablation "$item" ;;
  esac
done
