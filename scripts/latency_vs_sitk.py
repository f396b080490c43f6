"""CPU latency of the bundled plan against SimpleITK on the same 1 mm pairs, in one run:
``python scripts/latency_vs_sitk.py [PAIR_DIR ...] [--repeats 3] [--json out.json]``.

Pairs: folders from ``scripts/make_latency_pairs.py`` (240x240x160 1 mm T2 -> T1, paper rigid motions,
``truth.json``); default ``out/latency_pairs/pair*``. For each pair, in this process:

* msode: a warm ``Registrar`` (loaded once; one unmeasured registration first), ``register`` from host
  arrays, rigid stage only and all stages (rigid + B-spline or rigid + dense), median of ``--repeats`` calls, with the load / stage /
  output split that ``RegistrationResult.timings`` reports;
* SimpleITK: the multi-resolution Mattes-MI rigid registration of ``msode-eval``'s baseline
  (``msode_train.evaluate.run_sitk``: shrink 4/2/1, smoothing 2/1/0 voxels, 10 % random sampling, regular
  step gradient descent) on the same arrays, one call;
* accuracy: RMSE of the estimated fixed -> moving map against the truth over the fixed brain (voxels of the
  fixed image above 0.05 after the plan's normalisation), in mm.

Torch uses its default intra-op threads (printed); SimpleITK its default threads. Benchmarks measure;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import torch

from msode_sdk import Registrar
from msode_sdk.transforms import Grid, RigidTransform, TransformChain
from msode_train.data import rmse_phi
from msode_train.evaluate import run_sitk


def _load(folder: Path):
    out = []
    for name in ("moving_t2", "fixed_t1"):
        img = nib.load(str(folder / f"{name}.nii.gz"))
        out.append((np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="*")
    ap.add_argument("--plan", default="rigid_bspline.plan")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sitk", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folders = [Path(p) for p in (args.pairs or sorted(glob.glob("out/latency_pairs/pair*")))]
    if not folders:
        raise SystemExit("no pairs: run scripts/make_latency_pairs.py first")
    reg = Registrar.load(args.plan, device="cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; plan {reg.name}")
    rows = []
    for folder in folders:
        mov, fix = _load(folder)
        truth = TransformChain(
            [RigidTransform(torch.tensor([json.loads((folder / "truth.json").read_text())["theta_model_frame"]]))]
        )
        _, _, fix_t = reg.prepare(fix, "fixed")
        mask = fix_t > 0.05
        row = {"pair": str(folder), "shape": list(fix[0].shape)}
        reg.register(mov, fix)  # warm-up
        full = "_".join(reg.stage_names)  # "rigid_bspline", "rigid_dense"
        for label, stages in (("rigid", ["rigid"]), (full, None)):
            times, parts = [], {}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = reg.register(mov, fix, stages=stages)
                times.append(time.perf_counter() - t0)
                for k, v in res.timings.items():
                    parts.setdefault(k, []).append(v)
            err = float(rmse_phi(TransformChain(res.model_grid.chain.transforms[:1]), truth, reg.model_grid, mask=mask))
            row[label] = {
                "seconds_median": statistics.median(times),
                "seconds": times,
                "split_median": {k: statistics.median(v) for k, v in parts.items()},
                "rigid_rmse_phi_mm": err,
                "nfe": res.nfe,
            }
        if not args.no_sitk:
            grid = Grid(fix[0].shape, tuple(float(s) for s in np.linalg.norm(fix[1][:3, :3], axis=0)))
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0)))[None, None]  # noqa: E731
            lo, hi = (np.percentile(a, [0.5, 99.5]) for a in (mov[0], fix[0]))
            pair = SimpleNamespace(
                grid=grid,
                moving=to_t(np.clip((mov[0] - lo[0]) / (lo[1] - lo[0]), 0, 1)),
                fixed=to_t(np.clip((fix[0] - hi[0]) / (hi[1] - hi[0]), 0, 1)),
            )
            pts, secs, _ = run_sitk(pair, deformable=False)
            gt = truth.map_grid(grid)
            fmask = torch.from_numpy(np.ascontiguousarray((pair.fixed[0, 0].numpy() > 0.05)))
            err = float((((pts[0] - gt[0]) ** 2).sum(-1)[fmask]).mean().sqrt())
            row["sitk_rigid"] = {"seconds": secs, "rmse_phi_mm": err}
        rows.append(row)
        r, rb, last = row["rigid"], row[full], reg.stage_names[-1]
        line = (
            f"{folder.name}: msode rigid {r['seconds_median']:.2f} s ({r['rigid_rmse_phi_mm']:.2f} mm; "
            f"load {r['split_median']['load']:.2f} rigid {r['split_median']['rigid']:.2f} output "
            f"{r['split_median']['output']:.2f}), {' + '.join(reg.stage_names)} {rb['seconds_median']:.2f} s ({last} "
            f"{rb['split_median'][last]:.2f}, output {rb['split_median']['output']:.2f})"
        )
        if "sitk_rigid" in row:
            s = row["sitk_rigid"]
            line += (
                f"; SimpleITK rigid {s['seconds']:.1f} s ({s['rmse_phi_mm']:.2f} mm) -> "
                f"{s['seconds'] / r['seconds_median']:.1f}x"
            )
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
