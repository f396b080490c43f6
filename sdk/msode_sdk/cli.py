"""`msode` command line.

    msode register MOVING FIXED -o OUT [--plan P] [--device D] [--backend B] [--stages S,..] [--init I] [--preview]
    msode plan info PLAN          # print a plan's manifest summary
    msode plan list               # bundled plans

Errors print exactly one line to stderr, ``msode: error: <what is wrong>``, and exit with status 2
(bad input or arguments, bad plan, unavailable device/backend, out of memory, diverged registration,
unwritable output), or ``msode: internal error: <type>: <message>`` with status 1 for anything
unexpected (a bug); control characters in messages (e.g. from file names) are escaped. Input files
are validated before the plan is loaded. Without ``-q``, progress lines (and the analytic-plan warning)
precede the error line; with ``-q`` only errors are printed, so a failure prints one line in all. On
failure nothing partial is left in OUT (directories the run created are removed again).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import MsodeError

DEFAULT_PLAN = "rigid_bspline.plan"


def _default_plan() -> str:
    from .registrar import bundled_plans

    plans = bundled_plans()
    if DEFAULT_PLAN in plans or not plans:
        return DEFAULT_PLAN
    return plans[0]


def _one_line(text: object) -> str:
    """Newlines and other control characters (e.g. from file names) cannot break the one-line contract."""
    text = " ".join(str(text).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; keep the one-line contract
        self.exit(2, f"msode: error: {_one_line(message)} (see: {self.prog} --help)\n")


def _cmd_register(args) -> int:
    from . import io as _io
    from .registrar import Registrar

    t_start = time.perf_counter()
    out = Path(args.output)
    _io.check_output_dir(out)  # before any work
    moving = _io.load_image(args.moving, "moving")  # cheap, and before the plan is loaded
    fixed = _io.load_image(args.fixed, "fixed")
    t_read = time.perf_counter()
    plan = args.plan or _default_plan()
    reg = Registrar.load(plan, device=args.device, backend=args.backend)
    t_plan = time.perf_counter()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    _info(
        args,
        f"msode: plan {reg.name} ({'ANALYTIC SSD gradient descent, not a trained model' if reg.plan.manifest.analytic else reg.plan.manifest.kind}), "
        f"backend {reg.backend.name} {reg.backend.providers()}, device {reg.device}",
    )
    res = reg.register(moving, fixed, stages=stages, init=args.init)
    # the whole command, not only the registration (report.json gets what is known before it is written)
    res.timings["read"] = t_read - t_start
    res.timings["load_plan"] = t_plan - t_read
    t_save = time.perf_counter()
    files = res.save(out, preview=args.preview)
    res.timings["save"] = time.perf_counter() - t_save
    res.timings["wall"] = time.perf_counter() - t_start
    ms = {k: v * 1000 for k, v in res.timings.items()}
    _info(
        args,
        f"msode: wall {ms['wall']:8.1f} ms: read {ms['read']:.1f}, plan {ms['load_plan']:.1f}, registration "
        f"{ms['total']:.1f} (load {ms['load']:.1f}, output {ms['output']:.1f}), save {ms['save']:.1f}",
    )
    print(
        json.dumps(
            {
                "outputs": {k: str(v) for k, v in files.items()},
                "timings_s": res.timings,
                "nfe": res.nfe,
                "plan": reg.name,
                "analytic_plan": bool(reg.plan.manifest.analytic),
            }
        )
    )
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
    p = _Parser(prog="msode", description="Multi-scale neural-ODE 3-D image registration")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="register MOVING onto FIXED (NIfTI files)")
    r.add_argument("moving")
    r.add_argument("fixed")
    r.add_argument("-o", "--output", required=True, help="output directory")
    r.add_argument(
        "--plan", default=None, help=f"plan path or bundled name (default {DEFAULT_PLAN}, else the first bundled)"
    )
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt")
    r.add_argument("--stages", default=None, help="comma-separated subset of the plan's stages")
    r.add_argument(
        "--init",
        default=None,
        choices=["none", "moments", "multistart"],
        help="how rigid stages start (default: the plan's choice; rigid_bspline.plan: multistart)",
    )
    r.add_argument("--preview", action="store_true", help="also write preview.png")
    r.add_argument("-q", "--quiet", action="store_true", help="print only errors on stderr (no progress, no warnings)")
    r.set_defaults(func=_cmd_register)
    b = sub.add_parser(
        "batch",
        help="register many pairs (CSV or two folders) into OUT/<id>/ + summary.csv",
        description="Register a cohort; see msode_sdk.batch. Exit status 3 when some pairs failed.",
    )
    from .batch import add_arguments, run as run_batch

    add_arguments(b)
    b.set_defaults(func=run_batch)
    pl = sub.add_parser("plan", help="inspect plans")
    plsub = pl.add_subparsers(dest="plan_command", required=True)
    info = plsub.add_parser("info", help="print a plan's manifest summary")
    info.add_argument("plan")
    info.set_defaults(func=_cmd_plan_info)
    lst = plsub.add_parser("list", help="list bundled plans")
    lst.set_defaults(func=_cmd_plan_list)
    _add_plugin_commands(sub)
    return p


CLI_ENTRY_POINT_GROUP = "msode.cli"


def _add_plugin_commands(sub) -> None:
    """Subcommands installed packages declare in the ``msode.cli`` entry-point group (e.g. ``msode export``
    from msode_export): each entry point is a function called with the sub-parser set. The SDK never
    imports a higher package by name; one that fails to load is logged and left out, never fatal."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=CLI_ENTRY_POINT_GROUP):
        try:
            ep.load()(sub)
        except Exception as exc:  # a broken or half-installed plugin must not break `msode register`
            logging.getLogger("msode_sdk").warning(
                "msode: command %r (%s) unavailable: %s",
                ep.name,
                ep.value,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, args.func)


def run_command(args, func) -> int:
    """Run a command with the CLI's contract: logging to stderr (``-q``: errors only), a one-line
    ``msode: error: ...`` and exit 2 for every :class:`MsodeError`, exit 1 with ``internal error`` for bugs,
    130 on Ctrl-C."""
    logging.basicConfig(
        level=logging.ERROR if getattr(args, "quiet", False) else logging.INFO,
        format="msode: %(message)s",
        stream=sys.stderr,
    )
    sdk_log = logging.getLogger("msode_sdk")
    previous_level = sdk_log.level
    if getattr(args, "quiet", False):  # basicConfig does nothing when logging is already configured
        sdk_log.setLevel(logging.ERROR)
    # nibabel's header checks log through a handler of their own and then propagate: each message came out
    # twice, before the error line that already says it. Here they go through the CLI's handler once (none
    # with -q: one line on failure)
    from nibabel import imageglobals

    nib_log = imageglobals.logger
    nib_state = (list(nib_log.handlers), nib_log.level)
    for handler in nib_state[0]:
        nib_log.removeHandler(handler)
    if getattr(args, "quiet", False):
        nib_log.setLevel(logging.CRITICAL + 1)
    try:
        return int(func(args) or 0)
    except MsodeError as exc:
        print(f"msode: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msode: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # keep the one-line contract even for bugs; the type helps a report
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"msode: internal error: {type(exc).__name__}: {_one_line(msg)}", file=sys.stderr)
        return 1
    finally:
        sdk_log.setLevel(previous_level)
        nib_log.setLevel(nib_state[1])
        for handler in nib_state[0]:
            nib_log.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
