#!/usr/bin/env bash
# The evaluation report of the bundled multi-contrast plan (Table-1 protocol, held-out synthetic subjects,
# msode-eval), written to training/reports/rigid_bspline/. CPU, ~15 min on 2 cores.
#   bash scripts/evaluate_bundled_plan.sh [PLAN] [N_PAIRS]      (OUT_DIR=... writes elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:-sdk/msode_sdk/models/rigid_bspline.plan}
N=${2:-12}
OUT=${OUT_DIR:-training/reports/rigid_bspline}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # with the project installed (make demo)
mkdir -p "$OUT"
run() {  # name, then msode-eval arguments
  local name=$1; shift
  $PY -c "import sys; from msode_train.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))" \
    --plan "rigid_bspline=$PLAN" --out "$OUT/$name" "$@" 2>&1 | grep -v "msode_sdk: stage" | tail -n 4
}
# acceptance: T2 -> T1, the paper's motions, with the classical baseline on the rigid experiment
run rigid_t2_t1   --motion rigid   --pairs t2:t1 --n "$N" --baselines sitk --stages rigid
run bspline_t2_t1 --motion bspline --pairs t2:t1 --n "$N" --baselines none
run hybrid_t2_t1  --motion hybrid  --pairs t2:t1 --n "$N" --baselines none
# other contrast pairs
run rigid_other   --motion rigid   --pairs flair:t1,pd:t1,t1:t2,flair:t2 --n "$N" --baselines none --stages rigid --no-figures
run hybrid_other  --motion hybrid  --pairs flair:t1,pd:t1,t1:t2,flair:t2 --n "$N" --baselines none --no-figures
