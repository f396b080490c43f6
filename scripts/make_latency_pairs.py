"""Write held-out 1 mm T2 -> T1 pairs for latency measurements: ``python scripts/make_latency_pairs.py [OUT] [--n N]``.

Each pair ``OUT/pair<k>/`` holds ``moving_t2.nii.gz`` and ``fixed_t1.nii.gz`` on a 240x240x160 1 mm RAS grid
(the size scanners and BraTS hand over) and ``truth.json``: the model-frame ground truth (rigid parameters,
SDK convention) of the paper's rigid motion U(+-75 deg), U(+-20 mm). Subjects are synthesised at 1 mm from
seeds 95000 + k (outside the train / test / val splits: ``msode_train.data.split_seeds``), ~30 s each on a
2-core CPU. Both images share one grid, so the model frames of the two images coincide and the estimate
``RegistrationResult.model_grid.chain`` is compared with the truth directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from msode_sdk.io import tensor_to_array
from msode_train.data import make_pair, synthesize_subject

SEED_BASE = 95_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="out/latency_pairs")
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args(argv)
    for k in range(args.n):
        folder = Path(args.out) / f"pair{k}"
        if (folder / "truth.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        subject = synthesize_subject(SEED_BASE + k, spacing=1.0, contrasts=("t1", "t2"))
        pair = make_pair(subject, "t2", "t1", "rigid", rng=np.random.default_rng(SEED_BASE + k))
        for name, t in (("moving_t2", pair.moving), ("fixed_t1", pair.fixed)):
            img = nib.Nifti1Image(tensor_to_array(t).astype(np.float32), subject.affine)
            img.set_qform(subject.affine, code=1)
            img.set_sform(subject.affine, code=1)
            nib.save(img, str(folder / f"{name}.nii.gz"))
        theta = pair.chain.transforms[0].state[0].tolist()
        (folder / "truth.json").write_text(
            json.dumps(
                {
                    "seed": SEED_BASE + k,
                    "motion": "rigid U(+-75 deg), U(+-20 mm)",
                    "theta_model_frame": theta,
                    "convention": "msode_sdk.transforms.RigidTransform: fixed model-frame mm -> moving model-frame mm",
                },
                indent=2,
            )
        )
        print(folder, [round(v, 3) for v in theta])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
