"""Summarise a plan report folder (``scripts/evaluate_bundled_plan.sh`` output) as the ``metrics`` a plan's
manifest records: ``python scripts/report_metrics.py training/reports/rigid_bspline [LABEL] > metrics.json``, then
``python scripts/build_rigid_bspline_plan.py --metrics metrics.json`` (the plan's rows are those labelled
with LABEL, default the folder's name, as the evaluation script labels them)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise(folder: Path, method: str | None = None) -> dict:
    method = method or folder.name
    out = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "results.json").exists()):
        res = json.loads((sub / "results.json").read_text())
        rows = res["rows"][method]
        proto = res["protocol"]
        err = [r["rmse_phi_mm"] for r in rows]
        out[sub.name] = {
            "pairs": proto["pairs"],
            "motion": proto["motion"],
            "stages": proto["stages"] or "all",
            "rmse_phi_mm_median": round(statistics.median(err), 3),
            "rmse_phi_mm_max": round(max(err), 3),
            "rmse_phi_mm_mean": round(statistics.fmean(err), 3),
            "dice_tumour_mean": round(statistics.fmean(r["dice_tumour"] for r in rows), 4),
            "success_lt_2mm": round(sum(e < 2.0 for e in err) / len(err), 3),
            "folding_frac_max": max(r.get("folding_frac", 0.0) for r in rows),
            "seconds_median": round(statistics.median(r["seconds"] for r in rows), 2),
        }
        seeds = proto["test_seeds"]
    out = {
        "protocol": (
            f"msode-eval Table-1 protocol, {len(seeds)} held-out synthetic subjects (test split seeds "
            f"{seeds[0]}-{seeds[-1]}), 2 mm, protocol seed {proto['seed']}, {proto['device']} "
            f"(times end to end from arrays); full report {folder}"
        ),
        **out,
    }
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "training/reports/rigid_bspline")
    print(json.dumps(summarise(folder, sys.argv[2] if len(sys.argv) > 2 else None), indent=1))
