"""Command lines: ``msode-train CONFIG.yaml`` and ``msode-eval``.

``msode-train CONFIG [--set key.path=value ...] [--steps N] [--max-minutes M] [--out-dir DIR]
[--device DEV] [--no-resume] [--export-only] [--eval-pairs N]``

    Trains (resuming from ``OUT_DIR/state.pt`` when it exists), then writes one stage checkpoint per
    stage (``<stage>.ckpt``) and the plan ``OUT_DIR/<name>.plan``. With ``--eval-pairs N`` (or
    ``export.eval_pairs`` in the config) the plan is evaluated through ``msode_sdk.Registrar`` on N
    held-out pairs and the metrics are written into the plan's manifest. ``CONFIG`` is a path or the
    name of a bundled config (``rigid_2mm``, ``rigid_4mm``, ``bspline_2mm``, ``rigid_bspline_2mm``,
    ``*_1mm_gpu``). ``--export-only`` skips training (plan from the saved state).

``msode-eval --plan [LABEL=]PATH ... [--motion rigid|bspline|hybrid] [--pairs t2:t1,flair:t1 | random]
[--n N] [--spacing MM] [--bank-dir DIR] [--baselines sitk,ants] [--out DIR] [--device DEV]``

    The paper's Table 1 protocol (see :mod:`msode_train.evaluate`).

Under torchrun (``python -m torch.distributed.run --standalone --nproc-per-node=K -m msode_train.cli
CONFIG ...``) ``msode-train`` trains with DistributedDataParallel (``train.batch_size`` per rank; see
:mod:`msode_train.train`); after training every rank meets at a barrier, the ranks other than 0 leave
(exit 0, nothing written) and rank 0 alone writes the checkpoints, evaluates and exports the plan.

Exit status 0 on success, 2 on a usage or configuration error, 1 on a failure during the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="msode-train", description="Train an MS-ODENet plan from a YAML config.")
    ap.add_argument("config", help="YAML config path or bundled config name")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (YAML-parsed), e.g. --set loss.sim=ncc; repeatable",
    )
    ap.add_argument("--steps", type=int, help="total steps (overrides train.steps)")
    ap.add_argument("--max-minutes", type=float, help="wall-clock limit of this invocation (train.max_minutes)")
    ap.add_argument("--out-dir", help="output directory (train.out_dir)")
    ap.add_argument("--device", help="auto | cpu | cuda[:n] (train.device)")
    ap.add_argument("--no-resume", action="store_true", help="start afresh even if OUT_DIR/state.pt exists")
    ap.add_argument("--export-only", action="store_true", help="no training: export the saved state")
    ap.add_argument("--eval-pairs", type=int, help="held-out pairs to evaluate into the plan's metrics")
    ap.add_argument("--no-plan", action="store_true", help="do not write the plan")
    return ap


def main(argv=None) -> int:
    _setup_logging()
    args = train_parser().parse_args(argv)
    from .train import Trainer, load_config

    ov = list(args.overrides)
    if args.steps is not None:
        ov.append(f"train.steps={args.steps}")
    if args.max_minutes is not None:
        ov.append(f"train.max_minutes={args.max_minutes}")
    if args.out_dir:
        ov.append(f"train.out_dir={args.out_dir}")
    if args.device:
        ov.append(f"train.device={args.device}")
    if args.eval_pairs is not None:
        ov.append(f"export.eval_pairs={args.eval_pairs}")
    try:
        cfg = load_config(args.config, ov)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"msode-train: error: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("msode_train").info
    state = Path(cfg["train"]["out_dir"]).expanduser() / "state.pt"
    if args.export_only and not state.exists():
        print(f"msode-train: error: --export-only needs a saved state, {state} does not exist", file=sys.stderr)
        return 2
    trainer = None
    ok = False
    try:
        trainer = Trainer(cfg, resume=not args.no_resume, log=log)
        if not args.export_only:
            trainer.fit()
        if trainer.world_size > 1:  # torchrun: training is over on every rank; rank 0 alone exports
            trainer.close()
            if not trainer.is_main:
                ok = True
                return 0
        if args.no_plan or not cfg["export"].get("plan", True):
            trainer.save_stage_checkpoints()
            return 0
        plan = trainer.export_plan()
        metrics = {}
        n_eval = int(cfg["export"].get("eval_pairs") or 0)
        if n_eval > 0:
            from .evaluate import evaluate_plans, EvalConfig

            ec = EvalConfig(
                motion=cfg["data"]["motion"],
                n_pairs=n_eval,
                spacing_mm=trainer.bank_spacing,
                fov_mm=tuple(cfg["model"]["fov_mm"]),
                bank_dir=str(trainer.bank_dir),
                pairs=cfg["data"]["pairs"],
                contrasts=tuple(cfg["data"]["contrasts"]),
                baselines=(),
                device="cpu",
            )
            report = evaluate_plans({cfg["name"]: plan}, ec, out_dir=trainer.out_dir / "eval")
            metrics = report["summary"][cfg["name"]]
            metrics["protocol"] = report["protocol"]
            plan = trainer.export_plan(metrics=metrics)
        trainer.save_stage_checkpoints(metrics)
        log(f"plan written: {plan}")
        print(json.dumps({"plan": str(plan), "step": trainer.step, "metrics": metrics}, default=str))
        ok = True
        return 0
    except KeyboardInterrupt:
        return 1
    except Exception as exc:  # one line, non-zero exit
        logging.getLogger("msode_train").exception("training failed")
        print(f"msode-train: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close(barrier=ok)  # leaves the process group (torchrun; a no-op otherwise)


def eval_main(argv=None) -> int:
    _setup_logging()
    from .evaluate import main as _main

    return _main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
