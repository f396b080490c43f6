"""Shared fixtures: an analytic (SSD gradient-descent) plan and analytic phantoms with exact truth.

The phantom is a continuous object O(p) in world RAS mm (a sum of Gaussian blobs inside an ellipsoid),
so images of it can be sampled exactly on any grid, and a pair with a known fixed->moving map phi is
``fixed(p) = O(phi(p))``, ``moving(q) = O(q)`` with no interpolation error in the truth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msode_sdk.transforms import Grid

MODEL_GRID = Grid((48, 56, 40), (3.5, 3.5, 3.5))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Phantom:
    """Continuous textured head-like object; ``value(points (..., 3) RAS mm) -> (...)``."""

    def __init__(self, seed: int = 0, n_blobs: int = 400, radii=(60.0, 75.0, 55.0), centre=(2.0, -8.0, 5.0)):
        g = torch.Generator().manual_seed(seed)
        self.radii = torch.tensor(radii, dtype=torch.float64)
        self.centre = torch.tensor(centre, dtype=torch.float64)
        u = torch.rand(n_blobs, 3, generator=g, dtype=torch.float64) * 2 - 1
        u = u[(u**2).sum(-1) < 1]
        self.mu = self.centre + u * self.radii * 0.9
        self.sigma = 4.0 + 5.0 * torch.rand(len(self.mu), generator=g, dtype=torch.float64)
        self.amp = 0.2 + 0.8 * torch.rand(len(self.mu), generator=g, dtype=torch.float64)

    def value(self, points: torch.Tensor, contrast: str = "a") -> torch.Tensor:
        p = points.to(torch.float64).reshape(-1, 3)
        out = torch.zeros(p.shape[0], dtype=torch.float64)
        amp = self.amp if contrast == "a" else 1.0 - 0.8 * self.amp  # "b": another contrast, same anatomy
        for s in range(0, p.shape[0], 1 << 16):
            q = p[s : s + (1 << 16)]
            d2 = ((q[:, None, :] - self.mu[None]) ** 2).sum(-1)
            out[s : s + (1 << 16)] = (amp * torch.exp(-0.5 * d2 / self.sigma**2)).sum(-1)
        r = (((p - self.centre) / self.radii) ** 2).sum(-1)
        envelope = torch.sigmoid((1.0 - r) * 12.0)
        return (0.3 * envelope + 0.5 * out * envelope).reshape(points.shape[:-1])


def affine_from(spacing, rot_deg=(0.0, 0.0, 0.0), shape=(32, 32, 32), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel->RAS affine with given spacing, direction from Euler angles (deg, xyz), FOV centre at ``centre``."""
    ax, ay, az = (math.radians(a) for a in rot_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def voxel_world_points(shape, affine) -> torch.Tensor:
    """``(X, Y, Z, 3)`` RAS points of every voxel (NIfTI array order)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return torch.from_numpy(idx @ affine[:3, :3].T + affine[:3, 3])


def render(phantom: Phantom, shape, affine, world_map=None, contrast="a") -> np.ndarray:
    """Image ``(X, Y, Z)`` float32 of the phantom on a grid; ``world_map(p) -> q`` pulls back (fixed image)."""
    pts = voxel_world_points(shape, affine)
    if world_map is not None:
        pts = world_map(pts)
    return phantom.value(pts, contrast).numpy().astype(np.float32)


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return Phantom()


@pytest.fixture(scope="session")
def analytic_plan(tmp_path_factory):
    """Rigid + B-spline analytic plan on :data:`MODEL_GRID` (paper schedules)."""
    from msode_export.analytic import build_analytic_plan

    path = tmp_path_factory.mktemp("plans") / "analytic_rb.plan"
    build_analytic_plan(path, MODEL_GRID, stages=("rigid", "bspline"), control_spacing_mm=(21.0, 21.0, 21.0))
    return path
