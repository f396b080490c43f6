#!/usr/bin/env python
"""Write the demo data of ``data/sample/`` from one held-out synthetic subject (seed ``SAMPLE_SEED``).

Files (NIfTI, int16 with ``scl_slope``; together well under 3 MB):

* ``fixed_t1.nii.gz``  - the subject's T1 on an *oblique* grid (rotated 10 deg about world z) with
  anisotropic 2 x 2 x 2.5 mm voxels;
* ``moving_t1.nii.gz`` / ``moving_t2.nii.gz`` - the same subject moved by a known rigid motion
  (about 15 deg and 10 mm), on a differently sized and positioned 2 mm grid stored x-flipped (LAS);
* ``truth.json`` - the ground truth: the 4x4 world RAS matrix ``M`` with ``p_moving = M @ p_fixed``
  for every anatomical point (the convention of ``RegistrationResult.matrix``), its LPS (ITK) form,
  its inverse, how it was made, and both grids.

The subject is synthesised at 2 mm (``msode_train.data.synthesize_subject``), its world space is
MNI-like RAS mm. Images are resampled from it with the SDK's trilinear ``sample_points``: the fixed
image at each fixed voxel's world point ``p``, the moving image at ``M^-1 y`` for each moving voxel's
world point ``y`` (so moving(M p) = subject(p) = fixed(p)).

Usage (with the project installed, e.g. ``.venv/bin/python``):
``python scripts/make_sample_pair.py [--out data/sample]``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from msode_sdk.io import array_to_tensor, ras_to_lps_matrix, sample_image_at_world, world_points
from msode_sdk.transforms import euler_to_rigid, rigid_matrix
from msode_sdk.warp import sample_points
from msode_train.data import GENERATOR_VERSION, SAMPLE_SEED, synthesize_subject

ROOT = Path(__file__).resolve().parents[1]  # the repository root (the default output folder)

SPACING_MM = 2.0
FIXED_SHAPE = (120, 120, 64)  # 240 x 240 x 160 mm
FIXED_SPACING = (2.0, 2.0, 2.5)
FIXED_OBLIQUE_DEG_Z = 10.0
FIXED_CENTRE_OFFSET = (3.0, -4.0, 2.0)  # mm from the subject centre
MOVING_SHAPE = (108, 126, 84)  # 216 x 252 x 168 mm
MOVING_SPACING = 2.0
MOVING_CENTRE_OFFSET = (4.0, -6.0, 2.0)
MOTION_ROT_DEG = (8.0, -6.0, 10.0)  # about x, y, z (R = Rz @ Ry @ Rx), through the subject centre
MOTION_TRANS_MM = (6.0, -5.0, 6.0)


def _affine(direction: np.ndarray, spacing, shape, centre) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = direction @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2.0)
    return a


def _rz(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _sample(subject, contrast: str, world: torch.Tensor) -> np.ndarray:
    """Subject contrast at world RAS points ``(D, H, W, 3)`` -> ``(X, Y, Z)`` array."""
    pts = (world - torch.as_tensor(subject.centre_ras, dtype=world.dtype)).float()
    vol = sample_points(subject.tensor(contrast), subject.grid, pts[None])[0, 0]
    return np.ascontiguousarray(vol.permute(2, 1, 0).numpy())


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(np.clip(arr, 0.0, 1.0).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.set_data_dtype(np.int16)  # nibabel picks scl_slope / scl_inter for the float data
    img.header["descrip"] = b"msode synthetic sample (see truth.json)"
    nib.save(img, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data" / "sample"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    subject = synthesize_subject(SAMPLE_SEED, spacing=SPACING_MM, contrasts=("t1", "t2"))
    c = subject.centre_ras

    # ground truth: M p = R (p - c) + c + t  (fixed world point -> moving world point)
    theta = euler_to_rigid(
        torch.tensor([np.deg2rad(MOTION_ROT_DEG)], dtype=torch.float64),
        torch.tensor([MOTION_TRANS_MM], dtype=torch.float64),
    )
    rot = rigid_matrix(theta)[0, :3, :3].numpy()
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + np.asarray(MOTION_TRANS_MM)
    m_inv = np.linalg.inv(m)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rot) - 1.0) / 2.0))))

    fixed_aff = _affine(_rz(FIXED_OBLIQUE_DEG_Z), FIXED_SPACING, FIXED_SHAPE, c + np.asarray(FIXED_CENTRE_OFFSET))
    moving_aff = _affine(
        np.diag([-1.0, 1.0, 1.0]), (MOVING_SPACING,) * 3, MOVING_SHAPE, c + np.asarray(MOVING_CENTRE_OFFSET)
    )

    fixed_world = world_points(FIXED_SHAPE, fixed_aff, torch.float64)
    moving_world = world_points(MOVING_SHAPE, moving_aff, torch.float64)
    m_inv_t = torch.as_tensor(m_inv)
    moving_src = moving_world @ m_inv_t[:3, :3].T + m_inv_t[:3, 3]  # subject point shown at y: M^-1 y

    files = {
        "fixed_t1.nii.gz": (_sample(subject, "t1", fixed_world), fixed_aff),
        "moving_t1.nii.gz": (_sample(subject, "t1", moving_src), moving_aff),
        "moving_t2.nii.gz": (_sample(subject, "t2", moving_src), moving_aff),
    }
    for name, (arr, aff) in files.items():
        _save(arr, aff, out / name)

    # self-check: moving resampled at M p reproduces the fixed image inside the brain
    fixed = np.asarray(nib.load(str(out / "fixed_t1.nii.gz")).dataobj, dtype=np.float32)
    mov = nib.load(str(out / "moving_t1.nii.gz"))
    mov_t = array_to_tensor(np.asarray(mov.dataobj, dtype=np.float32))
    m_t = torch.as_tensor(m)
    back = sample_image_at_world(mov_t, mov.affine, fixed_world @ m_t[:3, :3].T + m_t[:3, 3])[0, 0]
    back = back.permute(2, 1, 0).numpy()
    brain = fixed > 0.05
    corr = float(np.corrcoef(fixed[brain], back[brain])[0, 1])
    rmse = float(np.sqrt(np.mean((fixed[brain] - back[brain]) ** 2)))

    truth = {
        "description": (
            "One held-out synthetic subject (msode_train.data.synthesize_subject, seed "
            f"{SAMPLE_SEED}, 2 mm). fixed_t1 shows it on an oblique anisotropic grid; moving_t1 "
            "and moving_t2 show it moved by a known rigid motion on another grid."
        ),
        "fixed": "fixed_t1.nii.gz",
        "moving": ["moving_t1.nii.gz", "moving_t2.nii.gz"],
        "fixed_to_moving_world_ras": m.tolist(),
        "convention": (
            "world RAS mm (nibabel): p_moving = M @ p_fixed for the same anatomical point, the "
            "convention of msode RegistrationResult.matrix; moving(M p) = fixed(p)"
        ),
        "fixed_to_moving_world_lps": ras_to_lps_matrix(m).tolist(),
        "moving_to_fixed_world_ras": m_inv.tolist(),
        "motion": {
            "rotation_deg_xyz": list(MOTION_ROT_DEG),
            "rotation_composition": "Euler angles, R = Rz @ Ry @ Rx (msode_sdk.transforms.euler_to_rigid)",
            "rotation_centre_ras": c.tolist(),
            "translation_mm": list(MOTION_TRANS_MM),
            "total_rotation_deg": angle,
            "total_translation_mm": float(np.linalg.norm(MOTION_TRANS_MM)),
            "formula": "M p = R (p - centre) + centre + t",
        },
        "fixed_grid": {
            "shape": list(FIXED_SHAPE),
            "spacing_mm": list(FIXED_SPACING),
            "oblique_rotation_deg_about_z": FIXED_OBLIQUE_DEG_Z,
            "affine": fixed_aff.tolist(),
        },
        "moving_grid": {
            "shape": list(MOVING_SHAPE),
            "spacing_mm": [MOVING_SPACING] * 3,
            "orientation": "LAS (x flipped)",
            "affine": moving_aff.tolist(),
        },
        "subject": {
            "seed": SAMPLE_SEED,
            "generator_version": GENERATOR_VERSION,
            "spacing_mm": SPACING_MM,
            "centre_ras": c.tolist(),
            "tumour_core_radius_mm": subject.meta["tumour_core_radius_mm"],
            "tumour_oedema_radius_mm": subject.meta["tumour_oedema_radius_mm"],
        },
        "self_check": {"corr_fixed_vs_moving_at_Mp": corr, "rmse_fixed_vs_moving_at_Mp": rmse},
        "made_by": "scripts/make_sample_pair.py",
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    total = sum((out / n).stat().st_size for n in [*files, "truth.json"])
    for n in [*files, "truth.json"]:
        print(f"{out / n}: {(out / n).stat().st_size / 1024:.0f} KiB")
    print(
        f"total {total / 1e6:.2f} MB; rotation {angle:.1f} deg, translation "
        f"{np.linalg.norm(MOTION_TRANS_MM):.1f} mm; self-check corr {corr:.4f}, rmse {rmse:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
