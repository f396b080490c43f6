#!/usr/bin/env bash
# ONE command for a 15-minute GPU session: train the rigid + B-spline MS-ODENet (~9 min), write the plan,
# the stage checkpoints, the training state and the logs under $OUT.
#
# 1. HERE (CPU machine, once): prepare what the device needs and cannot make itself
#
#      bash scripts/train_gpu.sh prepare
#
#    - the subject bank: the device image has no nibabel/nilearn (no ICBM template), so subjects are
#      synthesised here at 2 mm (4 contrasts, uint16, np.savez_compressed; ~2.2-2.6 MB each) into
#      out/gpu_bank/ (git-ignored). 20 training + 2 validation subjects ~ 50-55 MiB; with the tracked
#      tree (~3 MiB) and the nibabel wheel (~3.5 MiB) that stays under the 64 MiB carry limit. More
#      subjects do not fit: 4 contrasts x 2 mm is the densest useful format (1 mm subjects are ~20 MB
#      each); GPU_BANK_N=... changes the count, the script prints the total size;
#      Measured: 20 + 2 subjects = 51 MB (2.3 MB each), wheel 3.2 MB, tree 3.3 MB: 57.5 MB of 67.1 MB.
#    - the nibabel wheel (.whl/, git-ignored) via scripts/fetch_device_wheels.sh (msode_sdk imports it).
#
# 2. ON THE DEVICE (the `run` tool, timeout_s 600, carry [".whl", "out/gpu_bank"]):
#
#      bash scripts/train_gpu.sh run
#
#    trains CONFIG (default rigid_bspline_2mm; e.g. CONFIG=rigid_bspline_1mm_gpu for the 1 mm grid, which
#    samples the 2 mm bank onto 1 mm) with device cuda, batch 4, for TRAIN_MINUTES (default 8.5) and
#    copies to $OUT (at most 8 files of <= 16 MiB come back): <name>.plan, train_log.csv, val_log.csv,
#    rigid.ckpt, bspline.ckpt, train.log and state.pt split in 15 MiB parts (state.pt.part00, part01).
#    Evaluation against SimpleITK/ANTs runs afterwards
#    on the CPU machine: msode-eval --plan out/gpu/<name>.plan --motion hybrid --pairs random --n 16.
#    To continue training in a later session, put state.pt back into out/gpu_run/ and carry it too.
#    Plan v2 (issue 20): CONFIG=plan_v2_bspline_gpu bash scripts/train_gpu.sh run (the B-spline stage behind
#    the bundled rigid stage; no plan is written there: bspline.ckpt comes back), then here:
#    python scripts/build_rigid_bspline_plan.py --bspline-checkpoint out/gpu/bspline.ckpt OUT.plan
#    The dense stage likewise: CONFIG=plan_v2_dense_gpu (dense.ckpt comes back), then
#    python scripts/build_rigid_dense_plan.py --dense-checkpoint out/gpu/dense.ckpt OUT.plan
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
BANK_DIR="${GPU_BANK_DIR:-out/gpu_bank}"
N_TRAIN="${GPU_BANK_N:-20}"
N_VAL="${GPU_BANK_VAL:-2}"
CONFIG="${CONFIG:-rigid_bspline_2mm}"
TRAIN_MINUTES="${TRAIN_MINUTES:-8.5}"
DEVICE="${DEVICE:-cuda}"   # DEVICE=cpu TRAIN_MINUTES=0.2 bash scripts/train_gpu.sh run: a dry run of the flow here

if [ "$MODE" = "prepare" ]; then
  PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
  PYTHONPATH=sdk:export:training nice -n 10 "$PY" - "$BANK_DIR" "$N_TRAIN" "$N_VAL" <<'PYEOF'
import sys, time
from msode_train.data import SubjectBank
root, n_train, n_val = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for split, n in (("train", n_train), ("val", n_val)):
    bank = SubjectBank.for_split(root, split, n, spacing=2.0)
    t = time.time()
    bank.ensure(log=print)
    print(f"{split}: {n} subjects ready in {time.time() - t:.0f} s")
PYEOF
  bash scripts/fetch_device_wheels.sh >/dev/null || echo "WARNING: could not fetch the nibabel wheel"
  echo "bank: $(du -sh "$BANK_DIR" | cut -f1) in $BANK_DIR; wheels: $(du -sh .whl 2>/dev/null | cut -f1)"
  echo "tracked+untracked tree: $(git ls-files -co --exclude-standard | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1) bytes"
  echo "device call: run(command='bash scripts/train_gpu.sh run', carry=['.whl', '$BANK_DIR'], timeout_s=600)"
  exit 0
fi

OUT_DIR="${OUT:-out/gpu}"
RUN_DIR="${GPU_RUN_DIR:-out/gpu_run}"
mkdir -p "$OUT_DIR" "$RUN_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="sdk:export:training:${PYTHONPATH:-}"
export MSODE_BANK="$BANK_DIR"
n_bank=$(ls "$BANK_DIR"/msode_subj_*_s[0-9]_sp2_* "$BANK_DIR"/msode_subj_*_s[0-9][0-9]_sp2_* 2>/dev/null | wc -l)
echo "== train_gpu $(date -u +%FT%TZ): config $CONFIG, $n_bank carried training subjects, ${TRAIN_MINUTES} min"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, torchdiffeq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
case "$CONFIG" in  # plan v2's config is sized for a GPU itself; the older CNN configs get the GPU batch here
  plan_v2*) TUNE=() ;;
  *) TUNE=(--set train.batch_size=4 --set train.lr=2.0e-4) ;;
esac
timeout -k 30 -s TERM 570 "$PY" -m msode_train.cli "$CONFIG" \
  --device "$DEVICE" --out-dir "$RUN_DIR" --max-minutes "$TRAIN_MINUTES" \
  --set "data.n_train=${n_bank:-$N_TRAIN}" --set "data.n_val=$N_VAL" "${TUNE[@]}" \
  --set train.val_every=100 --set train.checkpoint_every=50 \
  --set train.progress=false --set export.eval_pairs=0 2>&1 | tee "$RUN_DIR/train.log"
rc=${PIPESTATUS[0]}
# at most 8 files of <= 16 MiB come back: state.pt (networks + Adam moments, ~18 MB for rigid+B-spline
# at width 16) travels in 15 MiB parts (cat state.pt.part* > state.pt); config.yaml is inside the plan.
for f in "$RUN_DIR"/*.plan "$RUN_DIR"/train_log.csv "$RUN_DIR"/val_log.csv \
         "$RUN_DIR"/rigid.ckpt "$RUN_DIR"/bspline.ckpt "$RUN_DIR"/dense.ckpt "$RUN_DIR"/train.log; do
  [ -f "$f" ] && cp "$f" "$OUT_DIR"/
done
[ -f "$RUN_DIR/state.pt" ] && split -b 15m -d "$RUN_DIR/state.pt" "$OUT_DIR/state.pt.part"
echo "== exit $rc; files in $OUT_DIR:"; ls -l "$OUT_DIR"
exit $rc
