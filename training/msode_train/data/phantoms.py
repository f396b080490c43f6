"""Synthetic multi-contrast subjects from the ICBM 2009 template shipped in nilearn: :func:`synthesize_subject`
(the steps are described under "Anatomy" and "Subjects" in :mod:`msode_train.data`)."""

from __future__ import annotations

import functools
import importlib.util
import math
import time
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from msode_sdk.io import array_to_tensor
from msode_sdk.transforms import BSplineLattice, BSplineTransform, Grid
from msode_sdk.warp import sample_points

from .subject import Subject

__all__ = [
    "GENERATOR_VERSION",
    "CONTRASTS",
    "FOV_MM",
    "CLASS_MEANS",
    "TEMPLATE_CENTRE_RAS",
    "GENERATION_SECONDS",
    "load_template",
    "synthesize_subject",
]

# Bump whenever synthesis output changes: it is part of every bank cache key.
GENERATOR_VERSION = 1

CONTRASTS = ("t1", "t2", "flair", "pd")
FOV_MM = (240, 240, 160)

# Mean intensity per class (csf, gm, wm, oedema, tumour core) before bias/noise/normalisation.
# T1: WM > GM > CSF, core dark. T2: CSF > GM > WM, oedema/core bright. FLAIR: T2-like with dark CSF,
# oedema brightest. PD: flat-ish, CSF bright-ish.
CLASS_MEANS = {
    "t1": (0.25, 0.55, 0.80, 0.45, 0.30),
    "t2": (0.95, 0.55, 0.38, 0.80, 0.68),
    "flair": (0.10, 0.55, 0.42, 0.90, 0.62),
    "pd": (0.85, 0.72, 0.60, 0.82, 0.75),
}
_CLASS_JITTER = 0.05

# World (MNI RAS mm) point at the centre of every synthetic subject's grid.
TEMPLATE_CENTRE_RAS = (0.0, -17.0, 10.0)

_ANAT_CONTROL_SPACING_MM = 40.0
_ANAT_STD_MM = 5.0
_ANAT_SCALE = (0.94, 1.06)
_TUMOUR_NOISE_SPACING_MM = 10.0
_BIAS_SPACING_MM = 60.0

# Wall-clock seconds of synthesize_subject (all four contrasts) measured on the project's 2 shared
# CPU cores, torch 2.13 CPU (shared with other jobs); indicative only.
GENERATION_SECONDS = {1.0: 10.0, 2.0: 0.7, 4.0: 0.08}


# ------------------------------------------------------------------------------------------ template


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: it carries the ICBM 2009 template (pip install nilearn)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@functools.lru_cache(maxsize=1)
def load_template() -> dict:
    """The packaged 1 mm ICBM 2009 maps as float32 ``(X, Y, Z)`` arrays in [0, 1]: ``t1``, ``gm``,
    ``wm``, ``mask`` (T1 > 0.2), ``csf`` (mask - GM - WM, clipped at 0), and ``affine`` (RAS)."""
    d = _template_dir()
    out = {}
    affine = None
    for key, name in _TEMPLATE_FILES.items():
        path = d / name
        if path.exists():
            img = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
            arr /= max(float(arr.max()), 1e-6)
        else:  # a nilearn layout we do not know: its own loaders (they read packaged files too)
            from nilearn import datasets

            loader = {
                "t1": datasets.load_mni152_template,
                "gm": datasets.load_mni152_gm_template,
                "wm": datasets.load_mni152_wm_template,
            }[key]
            img = loader(resolution=1)
            arr = np.asarray(img.get_fdata(), dtype=np.float32)
        if not np.allclose(np.abs(img.affine[:3, :3]), np.diag(np.abs(np.diag(img.affine[:3, :3])))) or np.any(
            np.diag(img.affine[:3, :3]) <= 0
        ):
            img = nib.as_closest_canonical(img)
            arr = np.asarray(img.dataobj, dtype=np.float32) / max(float(np.max(img.dataobj)), 1e-6)
        affine = img.affine if affine is None else affine
        out[key] = np.clip(arr, 0.0, 1.0)
    out["mask"] = (out["t1"] > 0.2).astype(np.float32)
    out["csf"] = np.clip(out["mask"] - out["gm"] - out["wm"], 0.0, 1.0)
    out["affine"] = np.asarray(affine, dtype=np.float64)
    return out


@functools.lru_cache(maxsize=4)
def _template_volume(factor: int):
    """``(1, 3, D, H, W)`` [gm, wm, mask] box-averaged by ``factor``, its Grid, and the world point of
    that grid's centre."""
    t = load_template()
    vol = torch.cat([array_to_tensor(t[k]) for k in ("gm", "wm", "mask")], dim=1)
    if factor > 1:
        vol = F.avg_pool3d(vol, factor, stride=factor)
    shape_xyz = (vol.shape[4], vol.shape[3], vol.shape[2])
    spacing = np.diag(t["affine"][:3, :3])
    grid = Grid(shape_xyz, tuple(float(s) * factor for s in spacing))
    # pooled voxel i covers original voxels factor*i .. factor*i+factor-1
    centre_vox = np.array([factor * (n - 1) / 2.0 + (factor - 1) / 2.0 for n in shape_xyz])
    centre = t["affine"][:3, :3] @ centre_vox + t["affine"][:3, 3]
    return vol.contiguous(), grid, centre


@functools.lru_cache(maxsize=1)
def _tumour_centre_candidates() -> np.ndarray:
    """World RAS points of template voxels with WM > 0.9, inside the mask, above MNI z = -10."""
    t = load_template()
    ijk = np.argwhere((t["wm"] > 0.9) & (t["mask"] > 0.5))
    world = ijk @ t["affine"][:3, :3].T + t["affine"][:3, 3]
    return world[world[:, 2] > -10.0]


def _grid_affine(shape_xyz, spacing: float, centre) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = np.asarray(centre, dtype=np.float64) - spacing * (np.asarray(shape_xyz, dtype=np.float64) - 1) / 2.0
    return a


def _smooth_noise(rng: np.random.Generator, grid: Grid, spacing_mm: float, channels: int) -> torch.Tensor:
    """``(1, C, D, H, W)`` smooth noise of unit std: cubic B-spline of N(0, 1) control values."""
    lat = BSplineLattice(grid, (spacing_mm,) * 3)
    coeffs = torch.from_numpy(rng.standard_normal((1, channels, *lat.coeff_shape[1:])).astype(np.float32))
    f = lat.displacement_on(coeffs, grid)
    return f / f.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)


def _blur(vol: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``(1, C, D, H, W)`` (sigma in voxels)."""
    radius = max(1, int(math.ceil(3.0 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=vol.dtype)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    k = k / k.sum()
    c = vol.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        weight = k.reshape(shape).expand(c, *shape[1:]).contiguous()
        vol = F.conv3d(F.pad(vol, pad, mode="replicate"), weight, groups=c)
    return vol


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def synthesize_subject(
    seed: int, grid_shape=FOV_MM, spacing: float = 1.0, contrasts: Sequence[str] = CONTRASTS, tumour: bool = True
) -> Subject:
    """Synthesise one multi-contrast subject (see the module docstring for every step).

    ``grid_shape`` is the grid at 1 mm, i.e. the field of view in mm (default BraTS-like 240x240x160);
    the arrays have shape ``round(grid_shape / spacing)`` (2 mm -> 120x120x80), generated directly at
    that spacing. Deterministic in ``seed``; the anatomy, tumour and bias of a seed are the same at
    every spacing and for every subset of ``contrasts`` (only the noise realisation differs).
    """
    t_start = time.perf_counter()
    spacing = float(spacing)
    if not (0.25 <= spacing <= 16.0):
        raise ValueError(f"spacing must be in [0.25, 16] mm, got {spacing}")
    contrasts = tuple(contrasts)
    unknown = [c for c in contrasts if c not in CLASS_MEANS]
    if unknown or not contrasts:
        raise ValueError(f"unknown contrasts {unknown}; synthetic contrasts are {list(CLASS_MEANS)}")
    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    streams = np.random.SeedSequence([seed, GENERATOR_VERSION]).spawn(8)
    rng_anat, rng_int, rng_tum, rng_tnoise, rng_bias, rng_noise = (np.random.default_rng(s) for s in streams[:6])

    shape = tuple(max(2, int(round(n / spacing))) for n in grid_shape)
    grid = Grid(shape, (spacing,) * 3)
    centre = np.asarray(TEMPLATE_CENTRE_RAS, dtype=np.float64)
    factor = max(1, int(round(spacing)))
    tvol, tgrid, tcentre = _template_volume(factor)

    # 1. anatomical variation: q(x) = (x + u(x)) / s, template-relative to the subject centre.
    scale = rng_anat.uniform(*_ANAT_SCALE, size=3)
    lat = BSplineLattice(grid, (_ANAT_CONTROL_SPACING_MM,) * 3)
    coeffs = torch.from_numpy(rng_anat.normal(0.0, _ANAT_STD_MM, (1, *lat.coeff_shape)).astype(np.float32))
    with torch.no_grad():
        q = BSplineTransform(coeffs, lat).map_grid(grid)[0]  # (D, H, W, 3)
        q /= torch.tensor(scale, dtype=torch.float32)

        # 2. tumour geometry (template coordinates relative to the subject centre).
        cands = _tumour_centre_candidates()
        tc = cands[rng_tum.integers(len(cands))] + rng_tum.uniform(-0.5, 0.5, 3) - centre
        r_core = rng_tum.uniform(8.0, 15.0)
        r_oed = r_core + rng_tum.uniform(5.0, 12.0)
        axes = rng_tum.uniform(0.8, 1.25, 3)
        rot = _random_rotation(rng_tum)
        mass = rng_tum.uniform(0.1, 0.4)
        core_amp, oed_amp = 0.25, 0.3
        tnoise = _smooth_noise(rng_tnoise, grid, _TUMOUR_NOISE_SPACING_MM, 3)[0]  # (3, D, H, W)

        # 3. intensity means per subject (drawn for every known contrast, in a fixed order).
        jitter = rng_int.uniform(-_CLASS_JITTER, _CLASS_JITTER, (len(CLASS_MEANS), 5))
        means = {c: np.asarray(CLASS_MEANS[c]) + jitter[i] for i, c in enumerate(CLASS_MEANS)}

        if tumour:
            v = q - torch.tensor(tc, dtype=torch.float32)
            # ellipsoid distance: rotate into the tumour frame, divide by the axis ratios
            a_mat = torch.tensor((rot / axes[None, :]).astype(np.float32))  # v @ rot / axes
            rho = torch.linalg.vector_norm(v @ a_mat, dim=-1)
            r_k = r_core * (1.0 + core_amp * tnoise[0]).clamp(0.5, 1.6)
            r_o = r_oed * (1.0 + oed_amp * tnoise[1]).clamp(0.5, 1.6)
            pk = ((r_k - rho) / spacing + 0.5).clamp(0.0, 1.0)
            po_region = ((r_o - rho) / spacing + 0.5).clamp(0.0, 1.0)
            # mass effect: the template is sampled closer to the tumour centre
            r2 = (v * v).sum(-1, keepdim=True)
            q = torch.tensor(tc, dtype=torch.float32) + v * (1.0 - mass * torch.exp(-r2 / (2.0 * r_oed**2)))
            del v, r2, rho, r_k, r_o

        # sample [gm, wm, mask] of the template at C + q
        q += torch.tensor(centre - tcentre, dtype=torch.float32)
        probs = sample_points(tvol, tgrid, q[None])[0]  # (3, D, H, W)
        del q
        g, w, b = probs[0], probs[1], probs[2]
        s = g + w
        fix = torch.where(s > b, b / s.clamp_min(1e-6), torch.ones_like(s))
        g, w = g * fix, w * fix
        c = (b - g - w).clamp_min(0.0)
        if tumour:
            keep = 1.0 - pk
            k = b * pk
            g, w, c = g * keep, w * keep, c * keep
            po = (po_region - pk).clamp_min(0.0)
            e = po * (g + w)
            g, w = g * (1.0 - po), w * (1.0 - po)
        else:
            k = e = torch.zeros_like(b)
        fracs = torch.stack((c, g, w, e, k))  # (5, D, H, W), sums to b
        brain = b > 0.5
        labels = torch.where(brain, fracs.argmax(0) + 1, torch.zeros((), dtype=torch.long)).to(torch.uint8)

        # 3. tissue-mixture intensities, texture inside the core
        mu = torch.tensor(np.stack([means[cn] for cn in contrasts]).astype(np.float32))  # (C, 5)
        img = torch.einsum("ck,kdhw->cdhw", mu, fracs)
        img += (0.15 * k * tnoise[2])[None] * mu[:, 4, None, None, None]
        del fracs, g, w, c, e, k, tnoise
        # 4. partial-volume smoothing
        img = _blur(img[None], 0.5)
        # 5. bias field (one per known contrast, in a fixed order)
        bias_all = _smooth_noise(rng_bias, grid, _BIAS_SPACING_MM, len(CLASS_MEANS))
        amp_all = rng_bias.uniform(0.05, 0.08, len(CLASS_MEANS))
        idx = [list(CLASS_MEANS).index(cn) for cn in contrasts]
        amp = torch.tensor(amp_all[idx].astype(np.float32))[None, :, None, None, None]
        img = img * torch.exp(amp * bias_all[:, idx])
        del bias_all
        # 6. Rician noise inside the brain only
        sig_all = rng_noise.uniform(0.01, 0.03, len(CLASS_MEANS))
        out = {}
        inside = (b / 0.5).clamp(0.0, 1.0)
        brain_np = None
        for ci, cn in enumerate(contrasts):
            clean = img[0, ci]
            sig = float(sig_all[idx[ci]]) * float(clean.max())
            n1 = torch.from_numpy(rng_noise.standard_normal(clean.shape, dtype=np.float32))
            n2 = torch.from_numpy(rng_noise.standard_normal(clean.shape, dtype=np.float32))
            noisy = torch.sqrt((clean + sig * n1) ** 2 + (sig * n2) ** 2)
            vol = clean + (noisy - clean) * inside
            del n1, n2, noisy
            # 7. normalise: 99.5th percentile inside the brain -> 1
            arr = np.ascontiguousarray(vol.permute(2, 1, 0).numpy())
            if brain_np is None:
                brain_np = np.ascontiguousarray(brain.permute(2, 1, 0).numpy())
            hi = float(np.percentile(arr[brain_np], 99.5)) if brain_np.any() else float(arr.max())
            np.multiply(arr, 1.0 / max(hi, 1e-6), out=arr)
            np.clip(arr, 0.0, 1.0, out=arr)
            out[cn] = arr
        labels_np = np.ascontiguousarray(labels.permute(2, 1, 0).numpy())

    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "spacing_mm": spacing,
        "fov_mm": [float(n) for n in grid_shape],
        "template": "ICBM 2009c nonlinear symmetric (nilearn packaged, 1 mm)",
        "anat_scale": scale.tolist(),
        "tumour": bool(tumour),
        "tumour_centre_template_ras": (np.asarray(tc) + centre).tolist(),
        "tumour_core_radius_mm": float(r_core),
        "tumour_oedema_radius_mm": float(r_oed),
        "mass_effect": float(mass),
        "class_means": {cn: means[cn].tolist() for cn in contrasts},
        "noise_sigma_frac": {cn: float(sig_all[idx[i]]) for i, cn in enumerate(contrasts)},
        "bias_amplitude": {cn: float(amp_all[idx[i]]) for i, cn in enumerate(contrasts)},
        "seconds": time.perf_counter() - t_start,
    }
    return Subject(
        images=out,
        labels=labels_np,
        affine=_grid_affine(shape, spacing, centre),
        subject_id=f"synth{seed:05d}",
        seed=seed,
        meta=meta,
    )
