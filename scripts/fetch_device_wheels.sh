#!/usr/bin/env bash
# Download, HERE (a machine with a package index), the wheels the GPU device image lacks, into .whl/
# (ignored by .gitignore: /.whl/). A device run carries them (`carry: [".whl"]`) and
# scripts/gpu_check.sh installs them with `pip install --no-index --target /tmp/site .whl/*.whl`.
#
# The device image (Python 3.12, torch 2.11+cu130; list in /work/.library/device/KINDS.md) already has
# numpy, packaging, typing-extensions, scipy, onnx, onnxruntime (CPU), pytest, hypothesis, matplotlib,
# ninja and nvcc. It lacks nibabel, which msode_sdk imports: nibabel is pure Python and its requirements
# (numpy, packaging, importlib-resources on Python < 3.12, typing-extensions on Python < 3.13) are all
# there, so nibabel is the only wheel needed.
#
# Usage: bash scripts/fetch_device_wheels.sh            (nibabel at the version of .venv, else 5.4.2)
#        NIBABEL_VERSION=5.3.2 bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
NIBABEL_VERSION="${NIBABEL_VERSION:-$($PY -c 'import nibabel; print(nibabel.__version__)' 2>/dev/null || echo 5.4.2)}"
mkdir -p .whl
rm -f .whl/nibabel-*.whl  # one version of each package only (two stop the whole install there)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "nibabel==${NIBABEL_VERSION}"
ls -l .whl
