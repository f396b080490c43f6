"""Turn per-scale networks into a `.plan` bundle (DESIGN section 2).

Each network ``f(warped, fixed, t)`` of each (stage, level) is written as TorchScript
(``networks/<stage>_L<l>.ts``) and ONNX (``networks/<stage>_L<l>.onnx``, opset >= 17, dynamic batch,
no grid sampling inside: networks only). The integrator schedule, model grid, normalisation and
provenance go into the manifest.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from msode_sdk.plan import load_plan, make_manifest, write_plan
from msode_sdk.transforms import Grid

__all__ = [
    "LevelSolver",
    "StageDef",
    "LevelFeatures",
    "PAPER_SCHEDULES",
    "export_torchscript",
    "export_onnx",
    "export_features_onnx",
    "build_plan",
    "level_grids",
]

ONNX_OPSET = 17


@dataclass(frozen=True)
class LevelSolver:
    """Solver of one level: ``euler``/``heun`` with ``step_size``, or ``adaptive_heun`` with ``tol``."""

    solver: str
    step_size: float | None = None
    tol: float | None = None
    max_steps: int = 1000


@dataclass(frozen=True)
class LevelFeatures:
    """A level's feature network for plan format 2: ``image (N, 1, D, H, W) -> (N, C, D', H', W')`` on
    ``grid``; ``warp``: the moving features are computed once per level and warped with the state
    (``feature_warp``), else recomputed from the warped image at every evaluation (exact)."""

    network: nn.Module
    grid: Grid
    warp: bool = False


@dataclass
class StageDef:
    """A stage to pack: its transform, parameters, and one :class:`LevelSolver` per level (coarse first)."""

    name: str
    transform: str
    schedule: Sequence[LevelSolver]
    params: dict = field(default_factory=dict)


# The paper's schedules (A = adaptive Heun with tolerance, F = Euler with fixed step).
PAPER_SCHEDULES: dict[str, tuple[LevelSolver, ...]] = {
    "rigid": (
        LevelSolver("adaptive_heun", step_size=0.1, tol=1e-3),
        LevelSolver("adaptive_heun", step_size=0.1, tol=1e-3),
        LevelSolver("euler", 0.1),
    ),
    "bspline": (LevelSolver("euler", 0.2), LevelSolver("euler", 0.2), LevelSolver("euler", 0.25)),
    "dense": (LevelSolver("euler", 0.2), LevelSolver("euler", 0.2), LevelSolver("euler", 0.5)),
}


def level_grids(model_grid: Grid, levels: int) -> list[Grid]:
    """Pyramid grids, coarse (level 1) to fine (level ``levels`` = the model grid), factor 2."""
    return [model_grid.downsampled(2 ** (levels - l)) for l in range(1, levels + 1)]


def _example_inputs(grid: Grid, batch: int = 1, channels: int = 1):
    shape = (batch, channels, *grid.shape_dhw)
    return torch.rand(shape), torch.rand(shape), torch.zeros(batch)


def export_torchscript(module: nn.Module) -> bytes:
    """``torch.jit.script`` (falls back to tracing only for modules that cannot be scripted)."""
    module = module.eval()
    try:
        scripted = torch.jit.script(module)
    except Exception as exc:  # pragma: no cover - depends on the module
        warnings.warn(f"torch.jit.script failed ({exc}); tracing instead")
        raise
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()


def export_onnx(module: nn.Module, grid: Grid, opset: int = ONNX_OPSET, channels: int = 1) -> bytes:
    """ONNX of a vector field with inputs ``warped``, ``fixed`` ``(N, C, D, H, W)`` (``C = channels``: 1 for
    images, the feature count for a format-2 level) and ``t`` ``(N,)``, output ``velocity``; dynamic batch.
    Checked with ``onnx.checker`` when onnx is installed."""
    return _to_onnx(module, _example_inputs(grid, channels=channels), ["warped", "fixed", "t"], "velocity", opset)


def export_features_onnx(module: nn.Module, grid: Grid, opset: int = ONNX_OPSET) -> bytes:
    """ONNX of a feature network: input ``image`` ``(N, 1, D, H, W)`` on the level ``grid``, output
    ``features`` ``(N, C, D', H', W')``; dynamic batch."""
    return _to_onnx(module, (torch.rand(1, 1, *grid.shape_dhw),), ["image"], "features", opset)


def _to_onnx(module: nn.Module, example: tuple, inputs: list, output: str, opset: int) -> bytes:
    """The TorchScript-based ONNX export of every plan network: named inputs, one output, the batch
    dimension dynamic; checked (:func:`_checked_onnx`)."""
    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            buf,
            opset_version=opset,
            dynamo=False,
            input_names=inputs,
            output_names=[output],
            dynamic_axes={**{name: {0: "N"} for name in inputs}, output: {0: "N"}},
        )
    return _checked_onnx(buf.getvalue())


def _checked_onnx(data: bytes) -> bytes:
    try:
        import onnx
    except ImportError:  # pragma: no cover
        return data
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    if "GridSample" in ops:
        raise ValueError("ONNX networks must not contain GridSample (TensorRT has no 3-D grid sample)")
    return data


def build_plan(
    path,
    name: str,
    model_grid: Grid,
    stages: Sequence[StageDef],
    networks: Mapping[tuple[str, int], nn.Module],
    formats: Sequence[str] = ("torchscript", "onnx"),
    analytic: bool = False,
    centre: str = "fov",
    normalization: dict | None = None,
    modalities: Sequence[str] = (),
    metrics: dict | None = None,
    training: dict | None = None,
    description: str = "",
    extra_members: Mapping[str, bytes] | None = None,
    features: Mapping[tuple[str, int], "LevelFeatures"] | None = None,
) -> Path:
    """Export every network and write a validated plan at ``path``; returns the path.

    ``networks[(stage_name, level)]`` for level 1 (coarse) .. L (fine); level ``l`` integrates over
    ``[l - 1, l]`` (the paper's L = T). ``features[(stage_name, level)]`` (:class:`LevelFeatures`) gives
    a level a feature network (plan format 2, :mod:`msode_sdk.loop`): its field then takes
    ``(moving features, fixed features, t)`` on the feature grid (e.g. :class:`msode_export.analytic.FeatureMap`
    and a field on its ``grid``).
    """
    features = dict(features or {})
    members: dict[str, bytes] = dict(extra_members or {})
    stage_dicts = []
    for st in stages:
        n_levels = len(st.schedule)
        grids = level_grids(model_grid, n_levels)
        scales = []
        for lv, (sched, grid) in enumerate(zip(st.schedule, grids), start=1):
            net = networks[(st.name, lv)]
            nets, feats = {}, {}
            field_grid, channels = grid, 1
            if (st.name, lv) in features:
                lf = features[(st.name, lv)]
                fnet, field_grid = lf.network, lf.grid
                with torch.no_grad():
                    probe = fnet.eval()(torch.rand(1, 1, *grid.shape_dhw))
                if tuple(probe.shape[2:]) != field_grid.shape_dhw:
                    raise ValueError(
                        f"feature network of {st.name} L{lv} gives {tuple(probe.shape)}, not the "
                        f"feature grid {field_grid.shape_dhw}"
                    )
                channels = int(probe.shape[1])
                if "torchscript" in formats:
                    feats["torchscript"] = f"networks/{st.name}_L{lv}.features.ts"
                    members[feats["torchscript"]] = export_torchscript(fnet)
                if "onnx" in formats:
                    feats["onnx"] = f"networks/{st.name}_L{lv}.features.onnx"
                    members[feats["onnx"]] = export_features_onnx(fnet, grid)
            if "torchscript" in formats:
                nets["torchscript"] = f"networks/{st.name}_L{lv}.ts"
                members[nets["torchscript"]] = export_torchscript(net)
            if "onnx" in formats:
                nets["onnx"] = f"networks/{st.name}_L{lv}.onnx"
                members[nets["onnx"]] = export_onnx(net, field_grid, channels=channels)
            scale = {
                "level": lv,
                "shape_xyz": list(grid.shape_xyz),
                "spacing_xyz_mm": list(grid.spacing_xyz),
                "solver": sched.solver,
                "t0": float(lv - 1),
                "t1": float(lv),
                "networks": nets,
                "max_steps": sched.max_steps,
            }
            if feats:
                scale["features"] = feats
                scale["feature_grid"] = {
                    "shape_xyz": list(field_grid.shape_xyz),
                    "spacing_xyz_mm": list(field_grid.spacing_xyz),
                    "channels": channels,
                }
                scale["feature_warp"] = bool(lf.warp)
            if sched.step_size is not None:
                scale["step_size"] = sched.step_size
            if sched.tol is not None:
                scale["tol"] = sched.tol
            scales.append(scale)
        stage_dicts.append({"name": st.name, "transform": st.transform, "params": dict(st.params), "scales": scales})
    manifest = make_manifest(
        name,
        {
            "shape_xyz": list(model_grid.shape_xyz),
            "spacing_xyz_mm": list(model_grid.spacing_xyz),
            "orientation": "RAS",
            "centre": centre,
        },
        stage_dicts,
        description=description,
        analytic=bool(analytic),
        normalization=normalization or {"method": "percentile", "low": 0.5, "high": 99.5},
        modalities=list(modalities),
        metrics=metrics or {},
        training=training or {},
    )
    write_plan(path, manifest, members)
    load_plan(path)  # round-trip check: what we wrote must load
    return Path(path)
