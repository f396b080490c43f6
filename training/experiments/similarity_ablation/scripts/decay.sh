#!/usr/bin/env bash
# Issue 4, learning-rate-decay variant of the seeds ablation: continue each seed's 450-step run folder
# 150 steps with the Adam lr falling 1e-3 -> 1e-5 on a cosine (train.lr_decay), the same for both arms.
# The run folders are copied first (out/ablation/decay/s<S>/<arm>/, state.pt + config.yaml + train_log.csv);
# a folder whose state is at 300 steps (seed 0, whose 450-step state was not kept) is run 300 -> 450 at
# constant lr first, since the decay starts at step 450 whatever the resumed step.
# Two queues side by side (one per arm, 1 thread each: the 2-core machine); then evaluate and report with
#   RUNS="content_s0:mi_s0 content_s1:mi_s1 content_s2:mi_s2" OUT=... EVAL=... \
#   bash training/experiments/similarity_ablation/scripts/seeds.sh content_s0=out/ablation/decay/s0/content ...
set -euo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
ROOT=${ROOT:-out/ablation/decay}
SEEDS=${SEEDS:-"0 1 2"}
START=${START:-450}
STEPS=${STEPS:-600}
FINAL=${FINAL:-1e-5}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # with the project installed (make demo)
queue() {  # arm
  local arm=$1 s dir name
  for s in $SEEDS; do
    dir=$ROOT/s$s/$arm
    name=rigid_4mm_gn_${arm}_s${s}_decay
    $PY -c "import sys; from msode_train.cli import main; sys.exit(main(sys.argv[1:]))" "$dir/config.yaml" \
      --out-dir "$dir" --steps "$STEPS" --no-plan --set "name=$name" --set train.threads=1 \
      --set "train.lr_decay={start: $START, final: $FINAL, shape: cosine}" > "$dir.log" 2>&1
    echo "$(date -u +%H:%M) $arm seed $s done: $(tail -n 1 "$dir.log")"
  done
}
queue content &
queue mi &
wait
