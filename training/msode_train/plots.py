"""The loss plot of a training run: ``<out_dir>/loss.png`` from its ``train_log.csv`` and ``val_log.csv``."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

__all__ = ["write_loss_plot"]

_log = logging.getLogger("msode_train")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing median over ``window`` steps (single pairs are noisy and a failed pair is an outlier; the
    trend is what the plot is for)."""
    import statistics

    return [statistics.median(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def write_loss_plot(out_dir, name: str = "") -> Path | None:
    """Plot the total loss and the training pairs' RMSE(phi) per step (raw and a trailing median), and the
    validation RMSE(phi) median / max, to ``out_dir/loss.png``. Returns the path, or None when there is
    nothing to plot or matplotlib is not installed (logged)."""
    out_dir = Path(out_dir)
    train = _rows(out_dir / "train_log.csv")
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.info("matplotlib not installed: no loss plot (pip install 'msode[plots]')")
        return None
    steps = [int(float(r["step"])) for r in train]
    window = max(1, min(25, len(steps) // 10))
    val = _rows(out_dir / "val_log.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "rmse_phi_mm", "training pairs RMSE(phi), mm")):
        ys = [float(r[key]) for r in train]
        ax.plot(steps, ys, color="0.75", lw=0.8, label="per step")
        ax.plot(steps, _smooth(ys, window), color="C0", lw=1.8, label=f"median of {window}")
        ax.set_xlabel("step")
        ax.set_title(label)
        # a few failed pairs (e.g. a prior stage that missed) would flatten the curve: clip the view
        finite = sorted(v for v in ys if v == v and abs(v) != float("inf"))
        if len(finite) >= 20:
            lo, hi = finite[0], finite[int(0.97 * (len(finite) - 1))]
            if finite[-1] > hi:
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))
                ax.set_title(f"{label} (view clipped; max {finite[-1]:.3g})")
    if val:
        vs = [int(float(r["step"])) for r in val]
        axes[1].plot(vs, [float(r["val_rmse_phi_median"]) for r in val], "o-", color="C3", label="validation median")
        axes[1].plot(vs, [float(r["val_rmse_phi_max"]) for r in val], "s--", color="C1", label="validation max")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if name:
        fig.suptitle(name)
    fig.tight_layout()
    path = out_dir / "loss.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
