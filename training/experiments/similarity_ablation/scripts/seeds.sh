#!/usr/bin/env bash
# Issue 4's headline ablation over training seeds: evaluate the content- and MI-trained plans of several
# seeds on the same held-out pairs (msode-eval, protocol seed 2021) and write the non-inferiority report
# (training/experiments/similarity_ablation/scripts/seeds_report.py).
#   RUNS="content_s0:mi_s0 content_s1:mi_s1" EXTRA="content_s0_600:mi_s0_600" \
#   OUT=training/experiments/similarity_ablation/reports/headline_nd1 EVAL=out/ablation/headline_eval \
#   bash training/experiments/similarity_ablation/scripts/seeds.sh content_s0=RUN_DIR_OR.plan mi_s0=... ...
# A run folder (msode-train --out-dir, with config.yaml + state.pt) is exported to a plan first
# (msode-train CONFIG --export-only); a .plan is used as it is. Training logs of run folders are plotted.
# Train the runs with ablation.sh's command (same folder) and `--set train.seed=S`.
set -euo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
: "${RUNS:?RUNS=\"content_s0:mi_s0 ...\" (one content:mi pair per seed)}"
EXTRA=${EXTRA:-}
OUT=${OUT:-training/experiments/similarity_ablation/reports/headline}
EVAL=${EVAL:-out/ablation/headline_eval}
CRITERION=${CRITERION:-}
TITLE=${TITLE:-headline}
MERGE=${MERGE:-}  # more msode-eval folders (same test pairs) merged into the report, e.g. earlier seeds' plans
LOGS=${LOGS:-}  # more training logs to plot, "label=train_log.csv ..." (e.g. runs resumed in another folder)
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # with the project installed (make demo)
plan_args=()
log_args=()
for spec in $LOGS; do log_args+=("$spec"); done
for spec in "$@"; do
  label=${spec%%=*}
  path=${spec#*=}
  if [ -d "$path" ]; then  # the plan msode-train writes: <out-dir>/<name>.plan
    name=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$path/config.yaml")
    plan=$path/$name.plan
    if [ ! -f "$plan" ]; then
      $PY -c "import sys; from msode_train.cli import main; sys.exit(main(sys.argv[1:]))" "$path/config.yaml" \
        --export-only | tail -n 1
    fi
    [ -f "$path/train_log.csv" ] && log_args+=("$label=$path/train_log.csv")
  else
    plan=$path
  fi
  plan_args+=(--plan "$label=$plan")
done
evaluate() {  # evaluation set, then msode-eval arguments
  local name=$1; shift
  [ -f "$EVAL/$name/results.json" ] && return 0  # done before (delete it to re-run)
  $PY -c "import sys; from msode_train.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))" \
    "${plan_args[@]}" --out "$EVAL/$name" "$@" 2>&1 | grep -v "msode_sdk: stage" | tail -n 4
}
evaluate rigid_paper    --motion rigid --pairs random --n 24 --baselines none
evaluate rigid_moderate --motion rigid --pairs random --n 24 --baselines none --max-rot-deg 30 --max-trans-mm 15
evaluate rigid_t2_t1    --motion rigid --pairs t2:t1 --n 12 --baselines none
report_args=(--eval "$EVAL" $MERGE --out "$OUT" --title "$TITLE" --runs $RUNS)
[ -n "$EXTRA" ] && report_args+=(--extra $EXTRA)
[ ${#log_args[@]} -gt 0 ] && report_args+=(--log "${log_args[@]}")
[ -n "$CRITERION" ] && report_args+=(--criterion "$CRITERION")
$PY -m training.experiments.similarity_ablation.scripts.seeds_report "${report_args[@]}"
