"""`msode` command line.

    msode register MOVING FIXED -o OUT [--plan P] [--device D] [--backend B] [--stages S,..] [--preview]
    msode plan info PLAN          # print a plan's manifest summary
    msode plan list               # bundled plans

Errors print one line to stderr and exit with status 2 (bad input, plan or unavailable backend) or
1 (unexpected internal error); nothing partial is left in OUT on failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import MsodeError

DEFAULT_PLAN = "rigid_bspline.plan"


def _default_plan() -> str:
    from .registrar import bundled_plans
    plans = bundled_plans()
    if DEFAULT_PLAN in plans or not plans:
        return DEFAULT_PLAN
    return plans[0]


def _cmd_register(args) -> int:
    from .registrar import Registrar
    plan = args.plan or _default_plan()
    reg = Registrar.load(plan, device=args.device, backend=args.backend)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    _info(args, f"msode: plan {reg.name} ({'ANALYTIC SSD gradient descent, not a trained model' if reg.plan.manifest.analytic else 'trained'}), "
                f"backend {reg.backend.name} {reg.backend.providers()}, device {reg.device}")
    res = reg.register(args.moving, args.fixed, stages=stages)
    files = res.save(args.output, preview=args.preview)
    _info(args, f"msode: total    {res.timings['total'] * 1000:8.1f} ms (load {res.timings['load'] * 1000:.1f}, "
                f"output {res.timings['output'] * 1000:.1f})")
    print(json.dumps({"outputs": {k: str(v) for k, v in files.items()}, "timings_s": res.timings, "nfe": res.nfe}))
    return 0


def _cmd_plan_info(args) -> int:
    from .plan import load_plan, plan_summary
    from .registrar import resolve_plan_path
    print(plan_summary(load_plan(resolve_plan_path(args.plan))))
    return 0


def _cmd_plan_list(args) -> int:
    from .registrar import MODELS_DIR, bundled_plans
    for name in bundled_plans():
        print(MODELS_DIR / name)
    return 0


def _info(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msode", description="Multi-scale neural-ODE 3-D image registration")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register MOVING onto FIXED (NIfTI files)")
    r.add_argument("moving")
    r.add_argument("fixed")
    r.add_argument("-o", "--output", required=True, help="output directory")
    r.add_argument("--plan", default=None, help=f"plan path or bundled name (default {DEFAULT_PLAN}, else the first bundled)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    r.add_argument("--stages", default=None, help="comma-separated subset of the plan's stages")
    r.add_argument("--preview", action="store_true", help="also write preview.png")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    r.set_defaults(func=_cmd_register)
    pl = sub.add_parser("plan", help="inspect plans")
    plsub = pl.add_subparsers(dest="plan_command", required=True)
    info = plsub.add_parser("info", help="print a plan's manifest summary")
    info.add_argument("plan")
    info.set_defaults(func=_cmd_plan_info)
    lst = plsub.add_parser("list", help="list bundled plans")
    lst.set_defaults(func=_cmd_plan_list)
    try:  # the export package adds `msode export` when installed
        from msode_export.cli import add_export_command
    except ImportError:
        pass
    else:
        add_export_command(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="msode: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except MsodeError as exc:
        print(f"msode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msode: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # keep the one-line contract even for bugs; the type helps a report
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"msode: internal error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
