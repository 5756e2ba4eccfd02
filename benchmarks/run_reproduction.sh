#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md, in order of importance (finished runs are reused).
# Usage: [JOBS=2] [WORK=runs/reproduction] [RESULTS=DIR] [PLOTS=DIR] bash benchmarks/run_reproduction.sh [ITEM ...]
#   ITEM: an ablation of data_efficiency.py on digits at 16 px ('none' = the main comparison),
#   'fraction_same_epochs' (the fraction curve at equal epochs), 'kernel_retuned' (the kernel ablation with a
#   sweep per setting) or 'scenes' (the main comparison on the 32 px digit-scenes ImageFolder). Default: all.
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
[ ${#items[@]} -gt 0 ] || items=(none lr_grid crop_pct fraction fraction_crop_pct fraction_same_epochs form init conv2d cos_reg
                                 placement kernel kernel_retuned expansion scenes)
run() {  # NAME ARGS...: one invocation, its table also saved as RESULTS/NAME.txt
  local name=$1; shift
  nice -n 15 "$PYTHON" benchmarks/data_efficiency.py --seeds 3 --epochs 30 --jobs "${JOBS:-2}" "$@" \
    --json "$RESULTS/$name.json" --plot "$PLOTS/reproduction_$name.png" 2>&1 \
    | tee "$RESULTS/$name.txt"
}
digits=(--data digits --img-size 16 --work "$WORK/digits")
for item in "${items[@]}"; do
  case $item in
    scenes)
      [ -d runs/digit_scenes ] || "$PYTHON" benchmarks/make_digit_scenes.py runs/digit_scenes
      run scenes_main --data runs/digit_scenes --img-size 32 --work "$WORK/scenes" ;;
    fraction_same_epochs) run digits_fraction_same_epochs "${digits[@]}" --ablation fraction --fraction-budget epochs ;;
    kernel_retuned) run digits_kernel_retuned "${digits[@]}" --ablation kernel --retune-ablations ;;
    *) run "digits_${item/none/main}" "${digits[@]}" --ablation "$item" ;;
  esac
done
