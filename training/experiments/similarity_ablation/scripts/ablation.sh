#!/usr/bin/env bash
# Issue 4's ablation (the paper's Figure 4a, "no learned content loss (replaced by MI)"), CPU-sized:
# the same rigid MS-ODENet (config rigid_4mm_feature_gn: learned-feature Gauss-Newton fields, random
# start) trained twice, with L_sim = content (E_3D^c of the committed content encoder) and with
# L_sim = MI, same seed / pairs / steps; both plans and the untrained start evaluated on the same
# held-out pairs (msode-eval); report in training/experiments/similarity_ablation/reports/<TAG>/.
#   make similarity-ablation      # = bash training/experiments/similarity_ablation/scripts/ablation.sh
#                                   (L_sim on the 4 mm model grid)
#   TAG=loss_2mm EXTRA="--set loss.sim_spacing_mm=2" bash .../ablation.sh   # L_sim at 2 mm
#   STEPS=600 N=24 ...   SKIP_TRAIN=1 (export + evaluate saved states only)
#   CONTENT_ENCODER=content_phantom_v2 TAG=loss_4mm_v2 REUSE_MI=out/ablation/loss_4mm bash ...
#     (content arm with another encoder; the MI arm does not depend on the encoder, so REUSE_MI copies a
#      finished MI arm instead of training it again; the content arm then trains alone, with 2 threads)
# The two arms train side by side, one thread each (2 cores: ~45 min for 600 steps at 4 mm); re-running
# resumes from out/ablation/<TAG>/<arm>/state.pt, so an interrupted run loses at most 25 steps.
set -euo pipefail
cd "$(dirname "$0")/../../../.."  # the repository root
STEPS=${STEPS:-600}
N=${N:-24}
TAG=${TAG:-loss_4mm}
EXTRA=${EXTRA:-}
CONTENT_ENCODER=${CONTENT_ENCODER:-content_phantom_v1}
REUSE_MI=${REUSE_MI:-}
OUT=${OUT:-training/experiments/similarity_ablation/reports/$TAG}
WORK=${WORK:-out/ablation/$TAG}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}  # with the project installed (make demo)
train() {  # arm, then extra msode-train arguments
  local arm=$1; shift
  $PY -c "import sys; from msode_train.cli import main; sys.exit(main(sys.argv[1:]))" rigid_4mm_feature_gn \
    --out-dir "$WORK/$arm" --set "name=rigid_4mm_gn_$arm" --set train.progress=false $EXTRA "$@"
}
arm_args() {  # the only settings in which the arms differ
  if [ "$1" = content ]; then echo "--set loss.sim=content --set loss.sim_kwargs.encoder=$CONTENT_ENCODER"
  else echo "--set loss.sim=mi"; fi
}
mkdir -p "$WORK"
ARMS="content mi"
THREADS=1
if [ -n "$REUSE_MI" ]; then
  [ -d "$WORK/mi" ] || cp -r "$REUSE_MI/mi" "$WORK/mi"
  ARMS="content"
  THREADS=2
fi
if [ -z "${SKIP_TRAIN:-}" ]; then  # SKIP_TRAIN=1: export and evaluate the saved states only
  for arm in $ARMS; do
    # shellcheck disable=SC2046
    train "$arm" $(arm_args "$arm") --set train.threads=$THREADS --steps "$STEPS" --max-minutes 600 --no-plan \
      > "$WORK/$arm.log" 2>&1 &
  done
  wait
fi
for arm in content mi; do
  # shellcheck disable=SC2046
  train "$arm" $(arm_args "$arm") --steps "$STEPS" --export-only | tail -n 1
done
# the common starting point: the same config, zero steps (seeded initialisation)
train untrained --steps 0 --no-resume | tail -n 1
evaluate() {  # experiment name, then msode-eval arguments
  local name=$1; shift
  $PY -c "import sys; from msode_train.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))" \
    --plan "untrained=$WORK/untrained/rigid_4mm_gn_untrained.plan" \
    --plan "content=$WORK/content/rigid_4mm_gn_content.plan" \
    --plan "mi=$WORK/mi/rigid_4mm_gn_mi.plan" \
    --out "$OUT/$name" "$@" 2>&1 | grep -v "msode_sdk: stage" | tail -n 6
}
# the paper's rigid motions, every ordered contrast pair (random), and the training range
evaluate rigid_paper    --motion rigid --pairs random --n "$N" --baselines none
evaluate rigid_moderate --motion rigid --pairs random --n "$N" --baselines none --max-rot-deg 30 --max-trans-mm 15
evaluate rigid_t2_t1    --motion rigid --pairs t2:t1 --n 12 --baselines sitk
# where each similarity puts its optimum, at the loss's spacing
SP=$($PY -c "import yaml, sys; c = yaml.safe_load(open(sys.argv[1])); print(c['loss'].get('sim_spacing_mm') or c['model']['spacing_mm'])" "$WORK/content/config.yaml")
M=training.experiments.similarity_ablation.scripts  # this folder, as a package (run from the repository root)
[ -f "$WORK/optimum.json" ] || $PY -m $M.optimum --spacings "$SP" --pairs 8 \
  --encoder "$CONTENT_ENCODER" --json "$WORK/optimum.json"
$PY -m $M.report --work "$WORK" --out "$OUT" --tag "$TAG" --optimum "$WORK/optimum.json"
