# Two commands do all set-up on a fresh machine:
#   make demo   registers the bundled sample pair with the bundled plan on CPU (writes out/demo/)
#   make test   lint, format and type checks, then the test suite (fast default; `make test-slow` adds slow tests)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.msode-installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench cpp-demo analytic-plan tissue-encoder rigid-bspline-plan rigid-dense-plan plan-v2 plan-v2-dense plan-report similarity-ablation clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 CPU: on these machines pip takes it from local disk (other versions download GBs)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,export,plots,train]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/msode register data/sample/moving_t2.nii.gz data/sample/fixed_t1.nii.gz \
		-o out/demo --device cpu --preview
	$(PY) scripts/check_demo.py out/demo data/sample/truth.json

LINTED := sdk export training scripts tests

# lint (ruff), format check (ruff format), type check of msode_sdk (mypy), then the suite
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m msode_sdk.bench --device cpu --json out/bench.json

# Rebuild the bundled analytic plan (SSD gradient-descent stand-in networks).
analytic-plan: $(STAMP)
	$(PY) scripts/build_analytic_plan.py sdk/msode_sdk/models/analytic_ssd.plan

# Retrain the tissue encoders (~13 min on 2 CPU cores), rebuild the bundled multi-contrast plans, re-evaluate them.
tissue-encoder: $(STAMP)
	$(PY) -m msode_train.tissue --width 8 --steps 16=1500,8=1500,4=1000 \
		--report training/reports/tissue_encoder/history.json
# (the bundled files also record their report's figures: --metrics, from scripts/report_metrics.py)
rigid-bspline-plan: $(STAMP)
	$(PY) scripts/build_rigid_bspline_plan.py sdk/msode_sdk/models/rigid_bspline.plan
	$(PY) scripts/build_rigid_bspline_plan.py --bspline-field gn sdk/msode_sdk/models/rigid_bspline_v1.plan
rigid-dense-plan: $(STAMP)
	$(PY) scripts/build_rigid_dense_plan.py sdk/msode_sdk/models/rigid_dense.plan
# Plan v2's B-spline stage trained end to end through the loop behind the bundled rigid stage (issue 20; 2 CPU
# cores: 400 steps, ~6.5 s each, ~45 min; interrupted or stopped by train.max_minutes, run it again to resume;
# progress bar, out/train/plan_v2_bspline/loss.png), then the plan built from it:
# out/train/plan_v2_bspline/rigid_bspline_trained.plan (its report: `bash scripts/evaluate_bundled_plan.sh PLAN`).
# One NVIDIA GPU: make plan-v2 PLAN_V2_CONFIG=plan_v2_bspline_gpu
PLAN_V2_CONFIG ?= plan_v2_bspline
plan-v2: $(STAMP)
	$(VENV)/bin/msode-train $(PLAN_V2_CONFIG) --no-plan
	$(PY) scripts/build_rigid_bspline_plan.py --bspline-checkpoint out/train/$(PLAN_V2_CONFIG)/bspline.ckpt \
		--name rigid_bspline_trained out/train/$(PLAN_V2_CONFIG)/rigid_bspline_trained.plan
# rigid_dense.plan's dense stage trained the same way (the dense fields on MIND + learned maps; not yet run to the
# end here: ~7 s a step on 2 CPU cores, so ~47 min for 400 steps; resumable as plan-v2), then its plan:
# out/train/plan_v2_dense/rigid_dense_trained.plan. One NVIDIA GPU: make plan-v2-dense PLAN_V2_DENSE_CONFIG=plan_v2_dense_gpu
PLAN_V2_DENSE_CONFIG ?= plan_v2_dense
plan-v2-dense: $(STAMP)
	$(VENV)/bin/msode-train $(PLAN_V2_DENSE_CONFIG) --no-plan
	$(PY) scripts/build_rigid_dense_plan.py --dense-checkpoint out/train/$(PLAN_V2_DENSE_CONFIG)/dense.ckpt \
		--name rigid_dense_trained out/train/$(PLAN_V2_DENSE_CONFIG)/rigid_dense_trained.plan
# both bundled plans' held-out reports -> training/reports/<plan>/ (~25 min; rigid_dense shares the rigid
# stage, so its rigid set runs without the SimpleITK baseline)
plan-report: $(STAMP)
	PY=$(PY) bash scripts/evaluate_bundled_plan.sh
	PY=$(PY) RIGID_BASELINES=none bash scripts/evaluate_bundled_plan.sh sdk/msode_sdk/models/rigid_dense.plan

# Research (issue 4, not part of the SDK): the same rigid MS-ODENet trained with L_sim = content and with
# L_sim = MI, evaluated side by side (~55-75 min on 2 CPU cores)
# -> training/experiments/similarity_ablation/reports/loss_4mm/ (see docs/experiments/similarity-ablation.md)
similarity-ablation: $(STAMP)
	PY=$(PY) bash training/experiments/similarity_ablation/scripts/ablation.sh

clean:
	rm -rf out build cpp_demo/build .pytest_cache

# Build the C++ embedding (LibTorch from the pip torch wheel) into cpp_demo/build/msode_register.
cpp-demo: $(STAMP)
	cmake -S cpp_demo -B cpp_demo/build -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build cpp_demo/build -j2
