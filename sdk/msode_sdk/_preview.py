"""preview.png: fixed / moving / warped mid-slices on three axes and a fixed-warped checkerboard."""

from __future__ import annotations

import numpy as np
import torch

from . import io as _io
from .errors import InputError


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("preview.png needs matplotlib: pip install 'msode[plots]'") from None
    return plt


def _robust(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def write_preview(path, result) -> None:
    plt = _require_matplotlib()
    fix = result.fixed_image
    warped = np.asarray(result.warped.dataobj, dtype=np.float32)
    # moving before registration, resampled into the fixed grid (identity world map) for comparison
    pts = _io.world_points(fix.shape, fix.affine, torch.float64)
    mov_t = _io.array_to_tensor(result.moving_image.array)
    moving = _io.sample_image_at_world(mov_t, result.moving_image.affine, pts)[0, 0].permute(2, 1, 0).numpy()
    vols = {"fixed": _robust(fix.array), "moving (before)": _robust(moving), "warped (after)": _robust(warped)}
    centre = [n // 2 for n in fix.shape]
    spacing = fix.spacing
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for row, axis in enumerate(range(3)):
        sl = [slice(None)] * 3
        sl[axis] = centre[axis]
        a, b = [k for k in range(3) if k != axis]
        aspect = float(spacing[b] / spacing[a])  # rot90: rows run along axis b, columns along axis a
        for col, (title, vol) in enumerate(vols.items()):
            axes[row, col].imshow(np.rot90(vol[tuple(sl)]), cmap="gray", vmin=0, vmax=1, aspect=aspect)
            axes[row, col].set_title(title if row == 0 else "")
        f2, w2 = np.rot90(vols["fixed"][tuple(sl)]), np.rot90(vols["warped (after)"][tuple(sl)])
        tile = max(min(f2.shape) // 8, 1)
        yy, xx = np.indices(f2.shape)
        check = np.where(((yy // tile + xx // tile) % 2) == 0, f2, w2)
        axes[row, 3].imshow(check, cmap="gray", vmin=0, vmax=1, aspect=aspect)
        axes[row, 3].set_title("checkerboard fixed/warped" if row == 0 else "")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"msode {result.plan_name} ({result.plan_kind}), {result.timings['total']:.2f} s on {result.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
