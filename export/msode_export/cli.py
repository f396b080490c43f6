"""`msode export`: pack trained checkpoints (or the analytic stand-in) into a `.plan`.

    msode export CHECKPOINT [CHECKPOINT ...] -o NAME.plan [--name N] [--formats torchscript,onnx]
                 [--no-registrar-ts] [--import MODULE] [--tensorrt-engines [--precision fp32|fp16]]
    msode export --analytic --model-grid 120,120,80 --spacing 2 -o NAME.plan
                 [--stages rigid,bspline] [--control-spacing 20]

Checkpoints (:mod:`msode_export.checkpoint`) are stages cascaded in the order given (e.g. the rigid one,
then the B-spline one). Every plan gets TorchScript and ONNX networks and, unless
``--no-registrar-ts``, the whole loop as ``registrar.ts``; ``--tensorrt-engines`` also builds TensorRT
engines for this machine's GPU into the plan (needs TensorRT and CUDA). ``msode_sdk.cli`` adds this
command when msode_export is importable; errors follow its one-line / exit status 2 contract.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["add_export_command", "main"]


def _ints3(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 integers like 120,120,80, got {text!r}") from None
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected 3 positive integers like 120,120,80, got {text!r}")
    return vals  # type: ignore[return-value]


def _floats3(text: str) -> tuple[float, float, float]:
    parts = [p for p in text.split(",") if p.strip()]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 3 numbers like 2,2,2.5, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(0 < v < 1e3 for v in vals):
        raise argparse.ArgumentTypeError(f"expected a positive number or 3 positive numbers, got {text!r}")
    return vals  # type: ignore[return-value]


def _cmd_export(args) -> int:
    from msode_sdk.errors import InputError

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = [f for f in formats if f not in ("torchscript", "onnx")]
    if bad or not formats:
        raise InputError(f"unknown network format(s) {bad or formats}; valid: ['onnx', 'torchscript']")
    for mod in args.imports or ():
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise InputError(f"--import {mod}: {exc}") from None
    registrar_ts = not args.no_registrar_ts and "torchscript" in formats
    if args.analytic:
        if args.checkpoints:
            raise InputError("--analytic takes no checkpoints")
        if args.model_grid is None:
            raise InputError("--analytic needs --model-grid X,Y,Z (and --spacing MM)")
        from msode_sdk.transforms import Grid

        from .analytic import build_analytic_plan

        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        bad = [s for s in stages if s not in ("rigid", "bspline", "dense")]
        if bad or not stages or len(set(stages)) != len(stages):
            raise InputError(f"--stages must be distinct names from rigid, bspline, dense; got {args.stages!r}")
        path = build_analytic_plan(
            args.output,
            Grid(args.model_grid, args.spacing),
            stages=stages,
            control_spacing_mm=args.control_spacing,
            formats=formats,
            name=args.name or Path(args.output).name.removesuffix(".plan"),
            registrar_ts=registrar_ts,
        )
    else:
        if not args.checkpoints:
            raise InputError("give one or more CHECKPOINT files (or --analytic)")
        from .checkpoint import export_checkpoints

        path = export_checkpoints(
            args.checkpoints,
            args.output,
            name=args.name,
            formats=formats,
            registrar_ts=registrar_ts,
            description=args.description or "",
        )
    if args.tensorrt_engines:
        from .engines import add_tensorrt_engines

        add_tensorrt_engines(path, precision=args.precision)
    from msode_sdk.plan import load_plan, plan_summary

    summary = plan_summary(load_plan(path))
    if not args.quiet:
        print(summary, file=sys.stderr)
    print(path)
    return 0


def add_export_command(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to an ``argparse`` sub-parser set (called by :func:`msode_sdk.cli.build_parser`)."""
    e = subparsers.add_parser(
        "export", help="pack checkpoints (or --analytic) into a .plan", description=__doc__.split("\n\n")[0]
    )
    e.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="one per stage, in cascade order")
    e.add_argument("-o", "--output", required=True, help="plan file to write (NAME.plan)")
    e.add_argument("--name", default=None, help="plan name (default: the output file's stem)")
    e.add_argument("--description", default=None)
    e.add_argument("--formats", default="torchscript,onnx", help="network formats (default torchscript,onnx)")
    e.add_argument("--no-registrar-ts", action="store_true", help="do not embed the whole loop as registrar.ts")
    e.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import MODULE first (it registers network architectures); repeatable",
    )
    e.add_argument(
        "--tensorrt-engines",
        action="store_true",
        help="also build TensorRT engines for this GPU into the plan (needs TensorRT + CUDA)",
    )
    e.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="TensorRT engine precision")
    a = e.add_argument_group("analytic plan (SSD gradient-descent stand-in networks, no training)")
    a.add_argument("--analytic", action="store_true")
    a.add_argument("--model-grid", type=_ints3, default=None, metavar="X,Y,Z", help="model grid voxels")
    a.add_argument(
        "--spacing",
        type=_floats3,
        default=(2.0, 2.0, 2.0),
        metavar="MM",
        help="model grid spacing in mm: one value or x,y,z (default 2)",
    )
    a.add_argument("--stages", default="rigid,bspline", help="comma-separated stages (default rigid,bspline)")
    a.add_argument(
        "--control-spacing",
        type=_floats3,
        default=(20.0, 20.0, 20.0),
        metavar="MM",
        help="B-spline control point spacing in mm (default 20)",
    )
    e.add_argument("-q", "--quiet", action="store_true", help="no plan summary on stderr")
    e.set_defaults(func=_cmd_export)
    return e


def main(argv=None) -> int:
    """``python -m msode_export.cli ...`` == ``msode export ...``."""
    from msode_sdk.cli import main as sdk_main

    return sdk_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
