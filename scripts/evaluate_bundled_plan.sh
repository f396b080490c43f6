#!/usr/bin/env bash
# The evaluation report of a bundled plan (Table-1 protocol, held-out synthetic subjects, msode-eval),
# written to training/reports/<plan name>/. CPU, ~15 min on 2 cores (the SimpleITK baseline is most of it).
#   bash scripts/evaluate_bundled_plan.sh [PLAN] [N_PAIRS]      (default: rigid_bspline.plan, 12 pairs)
#   OUT_DIR=...       write elsewhere
#   RIGID_BASELINES=  baselines of the rigid T2 -> T1 set (default sitk; "none" skips it)
#   SETS="a b"        only these sets (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:-sdk/msode_sdk/models/rigid_bspline.plan}
N=${2:-12}
LABEL=$(basename "$PLAN" .plan)
OUT=${OUT_DIR:-training/reports/$LABEL}
SETS=${SETS:-rigid_t2_t1 rigid_full_t2_t1 bspline_t2_t1 hybrid_t2_t1 rigid_other rigid_full_other hybrid_other}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # with the project installed (make demo)
OTHER=flair:t1,pd:t1,t1:t2,flair:t2
mkdir -p "$OUT"
run() {  # name, then msode-eval arguments
  local name=$1; shift
  case " $SETS " in *" $name "*) ;; *) return 0 ;; esac
  $PY -c "import sys; from msode_train.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))" \
    --plan "$LABEL=$PLAN" --out "$OUT/$name" "$@" 2>&1 | grep -v "msode_sdk: stage" | tail -n 4
}
# acceptance: T2 -> T1, the paper's motions, with the classical baseline on the rigid experiment
run rigid_t2_t1      --motion rigid   --pairs t2:t1 --n "$N" --baselines "${RIGID_BASELINES:-sitk}" --stages rigid
# purely rigid motions through every stage: what the deformable stage adds to a rigid problem
run rigid_full_t2_t1 --motion rigid   --pairs t2:t1 --n "$N" --baselines none --no-figures
run bspline_t2_t1    --motion bspline --pairs t2:t1 --n "$N" --baselines none
run hybrid_t2_t1     --motion hybrid  --pairs t2:t1 --n "$N" --baselines none
# other contrast pairs
run rigid_other      --motion rigid   --pairs "$OTHER" --n "$N" --baselines none --stages rigid --no-figures
run rigid_full_other --motion rigid   --pairs "$OTHER" --n "$N" --baselines none --no-figures
run hybrid_other     --motion hybrid  --pairs "$OTHER" --n "$N" --baselines none --no-figures
