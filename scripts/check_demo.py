"""After `make demo`: compare the registration with the sample's ground truth and print the errors.

Usage: python scripts/check_demo.py OUT_DIR TRUTH_JSON. Exits non-zero when the outputs are missing
or the rigid error over the head exceeds 2 mm (the demo must actually register, not just run).
"""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

out, truth_path = Path(sys.argv[1]), Path(sys.argv[2])
report = json.loads((out / "report.json").read_text())
truth = json.loads(truth_path.read_text())
m_true = np.asarray(truth["fixed_to_moving_world_ras"], dtype=np.float64)
m_est = np.asarray(report["matrix_ras"], dtype=np.float64)
fixed = nib.load(str(truth_path.parent / truth["fixed"]))
arr = np.asarray(fixed.dataobj, dtype=np.float32)
idx = np.argwhere(arr > np.percentile(arr, 60)).astype(np.float64)
pts = idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
err = np.sqrt((((pts @ m_est[:3, :3].T + m_est[:3, 3]) - (pts @ m_true[:3, :3].T + m_true[:3, 3])) ** 2).sum(1))
before = np.sqrt((((pts @ m_true[:3, :3].T + m_true[:3, 3]) - pts) ** 2).sum(1))
disp = nib.load(str(out / "displacement.nii.gz"))
print(
    f"demo: plan {report['plan']} ({'ANALYTIC stand-in' if report['analytic_plan'] else report.get('plan_kind', 'trained')}), "
    f"backend {report['backend']} on {report['device']}, total {report['timings_s']['total']:.2f} s, NFE {report['nfe']}"
)
print(
    f"demo: rigid map error over the head: before {before.mean():.2f} mm -> after median {np.median(err):.3f} mm, "
    f"max {err.max():.3f} mm; displacement field {disp.shape}, outputs in {out}/"
)
sys.exit(0 if np.median(err) < 2.0 else 1)
