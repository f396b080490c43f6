"""Contrast-agnostic tissue encoder: the learned, modality-independent features of the bundled plan.

Why. A Gauss-Newton flow on a *same-contrast* SSD captures the paper's large rigid motions (U(+-75)
deg, U(+-20) mm) from a 16 mm pyramid level (6/6 held-out pairs, see ``scripts/build_analytic_plan.py``),
but T2 -> T1 pairs have no common intensities. Hand-made modality-independent features measured on
the same 6 T2 -> T1 pairs (msode-eval, 4-level rigid GN): MIND-SSC 2/6 captured, a soft brain mask 3/6
(the brain outline is nearly symmetric; what disambiguates large rotations is the inside: ventricles,
GM/WM, tumour). So the coarse levels get *learned* features: this encoder maps a normalised image of
any contrast to tissue-class probabilities (background, CSF, GM, WM, oedema, tumour core), which are
the same for every contrast of a subject; the plan's fields then run Gauss-Newton on their SSD.

The encoder (:class:`TissueEncoder`, ``(N, 1, D, H, W) -> (N, K, D, H, W)``, softmax over K) is a
small 3-D CNN with a *global context* path: which intensity is CSF depends on the contrast (dark in
T1/FLAIR, bright in T2/PD), and a local CNN cannot tell; the mean and mean square of early features
over the whole volume (a learned intensity-histogram summary) modulate the later features (FiLM).
One encoder per pyramid spacing (16, 8, 4 mm by default) - the images look different at each.

Training data (:func:`make_dataset`): subjects of the ``train`` split at 2 mm (the model spacing),
moved by random rigid motions up to +-90 deg / +-25 mm (70 %; so the encoder sees every orientation) or
the paper's hybrid motions (20 %), one
contrast per sample drawn from the four synthetic contrasts *or* a random tissue-mixture contrast
rendered from the labels (random class means, blur, bias, Rician-like noise: contrasts never seen in
the generator, against over-fitting to four intensity orderings); normalised exactly as the SDK
normalises inputs (0.5-99.5 percentiles) and downsampled with the SDK's own pyramid
(``Registrar._downsample``). Targets: the one-hot labels pushed through the same warp and pyramid,
i.e. class *fractions* at each level. Loss: soft cross-entropy. Validation: held-out ``val`` subjects.

Weights: ``msode_train/weights/tissue_encoder_v1.pt`` (``{"meta", "levels": {spacing: state_dict}}``,
``torch.load(weights_only=True)``), loaded by :func:`load_encoders`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msode_sdk.io import normalise_intensity
from msode_sdk.registrar import Registrar
from msode_sdk.warp import warp_chain

from .models import Conv3d, ContextTrunk

__all__ = [
    "TissueEncoder",
    "N_CLASSES",
    "CLASS_NAMES",
    "DEFAULT_SPACINGS",
    "WEIGHTS_DIR",
    "DEFAULT_WEIGHTS",
    "make_dataset",
    "train_encoders",
    "load_encoders",
    "main",
]

CLASS_NAMES = ("background", "csf", "gm", "wm", "oedema", "tumour_core")
N_CLASSES = len(CLASS_NAMES)
DEFAULT_SPACINGS = (16.0, 8.0, 4.0)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "tissue_encoder_v1.pt"
FORMAT = "msode-tissue-encoder"


class TissueEncoder(ContextTrunk):
    """Normalised image ``(N, 1, D, H, W)`` (any contrast, intensities ~[0, 1]) -> tissue-class
    probabilities ``(N, K, D, H, W)`` (softmax over ``CLASS_NAMES``), on the input's own grid.

    conv3 -> conv3 -> FiLM(global mean and mean square of those features) -> conv3 (dilation 2) ->
    conv3 -> conv1 (:class:`ContextTrunk`, then ``c4``, ``out``). LeakyReLU(0.2); no batch-dependent
    normalisation; TorchScript / ONNX exportable.
    """

    def __init__(self, width: int = 16, n_classes: int = N_CLASSES):
        super().__init__(width)
        self.c4 = Conv3d(self.width, self.width, 3, padding=1)
        self.out = Conv3d(self.width, int(n_classes), 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.leaky_relu(self.c4(self.trunk(x)), 0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


# ------------------------------------------------------------------------------------------- data


def _render_random_contrast(labels_onehot: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random tissue-mixture contrast from one-hot labels ``(1, K, D, H, W)`` (class 0 = background
    stays 0): random class means, partial-volume blur, multiplicative smooth bias, Rician-like noise."""
    k = labels_onehot.shape[1]
    means = torch.tensor(np.concatenate(([0.0], rng.uniform(0.05, 1.0, k - 1))), dtype=torch.float32)
    img = torch.einsum("k,nkdhw->ndhw", means, labels_onehot)[:, None]
    img = F.avg_pool3d(F.pad(img, (1,) * 6, mode="replicate"), 3, stride=1) * 0.5 + img * 0.5
    d, h, w = img.shape[2:]
    bias = torch.from_numpy(rng.normal(0.0, 1.0, (1, 1, 4, 4, 4)).astype(np.float32))
    bias = F.interpolate(bias, size=(d, h, w), mode="trilinear", align_corners=True)
    img = img * torch.exp(float(rng.uniform(0.0, 0.1)) * bias)
    brain = 1.0 - labels_onehot[:, :1]
    sig = float(rng.uniform(0.005, 0.04)) * float(img.max())
    n1 = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
    n2 = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
    noisy = torch.sqrt((img + sig * n1) ** 2 + (sig * n2) ** 2)
    return img + (noisy - img) * brain


def make_dataset(
    n_samples: int,
    n_subjects: int = 40,
    split: str = "train",
    seed: int = 0,
    spacings=DEFAULT_SPACINGS,
    bank_dir="~/.cache/msode/bank",
    p_random_contrast: float = 0.4,
    max_rot_deg: float = 90.0,
    max_trans_mm: float = 25.0,
    log=print,
) -> dict:
    """``{spacing: (images (M, 1, ...) float32, fractions (M, K, ...) float16)}`` for each spacing (see
    the module docstring). Deterministic in ``seed``."""
    from . import data as D

    rng = np.random.default_rng(seed)
    bank = D.SubjectBank.for_split(Path(bank_dir).expanduser(), split, n_subjects, spacing=2.0)
    grid = bank.grid
    level_grids = {float(s): grid.downsampled(int(round(s / 2.0))) for s in spacings}
    out = {s: ([], []) for s in level_grids}
    t0 = time.perf_counter()
    for i in range(n_samples):
        subj = bank[int(rng.integers(len(bank)))]
        lab = subj.labels_tensor().long()
        onehot = F.one_hot(lab[:, 0].clamp(max=N_CLASSES - 1), N_CLASSES).permute(0, 4, 1, 2, 3).float()
        if rng.uniform() < p_random_contrast:
            img = _render_random_contrast(onehot, rng)
        else:
            img = subj.tensor(D.CONTRASTS[int(rng.integers(len(D.CONTRASTS)))])
        vol = torch.cat((img, onehot), dim=1)
        u = rng.uniform()
        chain = None
        if u < 0.7:
            chain = D.sample_motion(rng, "rigid", grid, max_rot_deg=max_rot_deg, max_trans_mm=max_trans_mm)
        elif u < 0.9:
            chain = D.sample_motion(rng, "hybrid", grid)
        if chain is not None:
            with torch.no_grad():
                vol = warp_chain(vol, grid, chain, grid)
        img = normalise_intensity(vol[:, :1], 0.5, 99.5)
        frac = vol[:, 1:]
        # voxels mapped from outside the volume have no class: background
        frac = torch.cat((frac[:, :1] + (1.0 - frac.sum(1, keepdim=True)).clamp(min=0.0), frac[:, 1:]), dim=1)
        for s, lg in level_grids.items():
            with torch.no_grad():
                out[s][0].append(Registrar._downsample(img, grid, lg))
                out[s][1].append(Registrar._downsample(frac, grid, lg).half())
        if (i + 1) % 50 == 0:
            log(f"dataset {i + 1}/{n_samples} ({time.perf_counter() - t0:.0f} s)")
    return {s: (torch.cat(a), torch.cat(b)) for s, (a, b) in out.items()}


# ------------------------------------------------------------------------------------------ train


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def _dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean soft Dice over the classes present in ``target``."""
    inter = (prob * target).sum(dim=(0, 2, 3, 4))
    den = prob.sum(dim=(0, 2, 3, 4)) + target.sum(dim=(0, 2, 3, 4))
    present = target.sum(dim=(0, 2, 3, 4)) > 1.0
    return (2 * inter / den.clamp(min=1e-6))[present].mean()


def train_encoders(
    train: dict, val: dict, steps: dict, batch: int = 4, lr: float = 2e-3, width: int = 16, seed: int = 0, log=print
) -> tuple[dict, dict]:
    """Train one :class:`TissueEncoder` per spacing; returns ``(state_dicts, history)``."""
    torch.manual_seed(seed)
    states, history = {}, {}
    for s, (x, y) in train.items():
        net = TissueEncoder(width)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        n_steps = int(steps[s])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps, pct_start=0.1)
        g = torch.Generator().manual_seed(seed)
        hist = []
        t0 = time.perf_counter()
        for it in range(n_steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            xb = x[idx]
            # photometric augmentation on top: gamma and a global gain (the SDK normalisation leaves both)
            gam = torch.exp(torch.randn(batch, 1, 1, 1, 1, generator=g) * 0.25)
            xb = xb.clamp(min=0.0) ** gam * (1.0 + 0.1 * torch.randn(batch, 1, 1, 1, 1, generator=g))
            loss = _soft_ce(net.logits(xb), y[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (it + 1) % 50 == 0 or it + 1 == n_steps:
                with torch.no_grad():
                    xv, yv = val[s]
                    pv = torch.cat([net(xv[i : i + 8]) for i in range(0, xv.shape[0], 8)])
                    yvf = yv.float()
                    vce = float(-(yvf * pv.clamp(min=1e-6).log()).sum(1).mean())
                    vd = float(_dice(pv, yvf))
                hist.append(
                    {
                        "step": it + 1,
                        "train_ce": float(loss),
                        "val_ce": vce,
                        "val_dice": vd,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                log(
                    f"{s:g} mm step {it + 1}/{n_steps} ce {float(loss):.4f} val ce {vce:.4f} dice {vd:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
        states[s] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        history[s] = hist
    return states, history


def save_encoders(path, states: dict, meta: dict) -> Path:
    from msode_export.checkpoint import atomic_torch_save

    payload = {
        "format": FORMAT,
        "version": 1,
        "meta": json.dumps(meta),
        "levels": {f"{s:g}": st for s, st in states.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, path)
    return path


def load_encoders(path=DEFAULT_WEIGHTS) -> tuple[dict, dict]:
    """``({spacing_mm: TissueEncoder (eval)}, meta)`` from a weights file (``weights_only`` load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tissue-encoder weights not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    meta = json.loads(payload["meta"])
    encs = {}
    for key, st in payload["levels"].items():
        net = TissueEncoder(int(meta.get("width", 16)))
        net.load_state_dict(st)
        encs[float(key)] = net.eval()
    return encs, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the contrast-agnostic tissue encoders (one per spacing).")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--n-train", type=int, default=480, help="training samples (rotated subject + contrast)")
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--steps", default="16=1500,8=1500,4=800", help="spacing=steps,...")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--bank-dir", default="~/.cache/msode/bank")
    ap.add_argument("--report", help="write the training history (JSON) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {float(k): int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    t0 = time.perf_counter()
    train = make_dataset(args.n_train, args.subjects, "train", 0, tuple(steps), args.bank_dir)
    val = make_dataset(args.n_val, 4, "val", 1, tuple(steps), args.bank_dir, p_random_contrast=0.0)
    t_data = time.perf_counter() - t0
    states, history = train_encoders(train, val, steps, args.batch, args.lr, args.width)
    meta = {
        "width": args.width,
        "classes": list(CLASS_NAMES),
        "spacings_mm": sorted(steps),
        "n_train": args.n_train,
        "n_val": args.n_val,
        "subjects": args.subjects,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "data_seconds": round(t_data, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "final": {f"{s:g}": h[-1] for s, h in history.items()},
        "torch": torch.__version__,
    }
    save_encoders(args.out, states, meta)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(
            json.dumps({"meta": meta, "history": {f"{s:g}": h for s, h in history.items()}}, indent=1)
        )
    print(json.dumps(meta["final"]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
