"""Ship TensorRT engines inside a plan: ``engines/<gpu>-sm<cc>-trt<version>/<stage>_L<l>.engine``.

Engines are only valid for the GPU model (compute capability) and TensorRT version that built them; the
SDK's TensorRT backend uses shipped engines when they match and otherwise builds from the ONNX members
into its cache (:mod:`msode_sdk.backends._tensorrt`). Shipping them saves the first-run build time on
a known deployment target. Building needs TensorRT >= 10 and a CUDA GPU (verified only where TensorRT is
installed; this module has no CPU fallback by nature).

The manifest gains ``engines[<dir>] = {gpu, compute_capability, tensorrt, precision, max_batch,
onnx_sha256: {engine member: sha256 of the ONNX it was built from}}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from msode_sdk.backends._tensorrt import (
    HardwareKey,
    TensorRTBackend,
    _effective_precision,
    _import_trt,
    build_engine,
    engine_member_name,
)
from msode_sdk.errors import BackendUnavailable
from msode_sdk.plan import load_plan, write_plan

__all__ = ["add_tensorrt_engines"]


def add_tensorrt_engines(
    plan_path, precision: str = "fp32", max_batch: int = 4, device: str = "cuda", out_path=None
) -> Path:
    """Build an engine for every ONNX network of the plan on this machine's GPU and add them to the plan
    (rewritten atomically at ``out_path``, default in place). Raises :class:`BackendUnavailable` without
    TensorRT or CUDA."""
    dev = torch.device(device)
    reason = TensorRTBackend.unavailable_reason(dev)
    if reason:
        raise BackendUnavailable(f"cannot build TensorRT engines: {reason}")
    trt = _import_trt()
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    precision = _effective_precision(trt, precision)
    hw = HardwareKey.current(dev, trt.__version__)
    plan = load_plan(plan_path)
    members = {name: plan.read(name) for name in plan.member_names()}
    shas = {}
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(dev):
        for st in plan.manifest.stages:
            for sc in st.scales:
                onnx_member = sc.networks.get("onnx")
                if onnx_member is None:
                    continue
                engine_member = engine_member_name(hw, onnx_member)
                members[engine_member] = build_engine(
                    trt, plan.read(onnx_member), precision, max_batch, logger, onnx_member
                )
                shas[engine_member] = plan.manifest.members[onnx_member]["sha256"]
    if not shas:
        raise BackendUnavailable(f"plan {plan.manifest.name!r} has no ONNX networks to build engines from")
    manifest = dict(plan.manifest.raw)
    manifest.pop("members", None)
    engines = dict(manifest.get("engines") or {})
    engines[hw.dir_name] = {
        "gpu": hw.gpu,
        "compute_capability": f"{hw.compute_capability[0]}.{hw.compute_capability[1]}",
        "tensorrt": hw.trt_version,
        "precision": precision,
        "max_batch": int(max_batch),
        "onnx_sha256": shas,
    }
    manifest["engines"] = engines
    target = Path(out_path) if out_path is not None else Path(os.fspath(plan_path))
    write_plan(target, manifest, members)
    return target
