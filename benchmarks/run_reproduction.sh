#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md, in order of importance (finished runs are reused).
# Usage: JOBS=2 bash benchmarks/run_reproduction.sh [ITEM ...]
#   ITEM: an ablation of data_efficiency.py on digits at 16 px ('none' = the main comparison), or 'scenes'
#   (the main comparison on the 32 px digit-scenes ImageFolder). Default: everything.
set -euo pipefail
cd "$(dirname "$0")/.."
items=("$@")
[ ${#items[@]} -gt 0 ] || items=(none crop_pct fraction form init conv2d cos_reg placement kernel expansion scenes)
run() {  # NAME ARGS...: one invocation, its table also saved as benchmarks/results/NAME.txt
  local name=$1; shift
  nice -n 15 .venv/bin/python benchmarks/data_efficiency.py --seeds 3 --epochs 30 --jobs "${JOBS:-2}" "$@" \
    --json "benchmarks/results/$name.json" --plot "docs/img/reproduction_$name.png" 2>&1 \
    | tee "benchmarks/results/$name.txt"
}
for item in "${items[@]}"; do
  if [ "$item" = scenes ]; then
    [ -d runs/digit_scenes ] || .venv/bin/python benchmarks/make_digit_scenes.py runs/digit_scenes
    run scenes_main --data runs/digit_scenes --img-size 32 --work runs/data_efficiency_scenes
  else
    run "digits_${item/none/main}" --data digits --img-size 16 --ablation "$item"
  fi
done
