"""Training of the translation model (:class:`ContentTrainer`: resumable, logged, with translation figures)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from msode_export.checkpoint import atomic_torch_save

from .losses import LossWeights, critic_loss, shift_symmetry, translation_losses
from .networks import STACK, ContentConfig, Critic, TranslationModel, _pad_to
from .pool import SlicePool
from .slices import extract_stacks

__all__ = ["TrainConfig", "ContentTrainer", "translation_figure", "validation_examples"]


@dataclass
class TrainConfig:
    """Content-trainer settings. The defaults are the recipe of the committed weights (64 x 64 crops,
    Adam 3e-4 for both networks; ``train_meta.json`` of training/experiments/content_encoder/reports/) and
    the defaults of ``train_content.py train``, which reads them from here."""

    steps: int = 20000
    batch: int = 4
    crop: int | None = 64
    lr: float = 3e-4
    lr_critic: float = 3e-4
    n_critic: int = 1
    max_minutes: float | None = None
    ckpt_every: int = 50
    sample_every: int = 200
    log_every: int = 10
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)
    shift_vox: float = 1.0  # max offset of the shift-symmetry copies (used when weights.uses_shifts)
    grad_clip: float | None = None  # max L2 norm of the generator-side gradient (rare near-empty batches spike)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


class ContentTrainer:
    """Trains the translation model on a :class:`SlicePool`.

    ``out_dir`` receives ``ckpt.pt`` (model, critic, optimisers, step, history; written atomically
    every ``ckpt_every`` steps and at the end, and read back by ``resume=True``), ``log.jsonl`` (one
    line of losses every ``log_every`` steps) and ``samples/step_XXXXXX.png`` (translations of a fixed
    validation batch). Stops after ``steps`` or ``max_minutes`` (total over resumes), whichever first.
    ``model_cfg=None`` takes the resumed checkpoint's architecture (the default one without a
    checkpoint); a given ``model_cfg`` that differs from the checkpoint's raises a ``ValueError``.
    """

    def __init__(
        self,
        pool: SlicePool,
        out_dir,
        cfg: TrainConfig | None = None,
        model_cfg: ContentConfig | None = None,
        device="cpu",
        val_batch=None,
        resume: bool = True,
        progress: bool = True,
    ):
        self.pool = pool
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(device)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        ckpt = self.out / "ckpt.pt"
        saved = torch.load(ckpt, map_location=self.device, weights_only=False) if resume and ckpt.exists() else None
        saved_cfg = (
            ContentConfig.from_dict(saved["model_cfg"])
            if saved is not None and saved.get("model_cfg") is not None
            else None
        )
        if model_cfg is None:  # the resumed checkpoint's architecture, else the default one
            model_cfg = saved_cfg if saved_cfg is not None else ContentConfig()
        elif saved_cfg is not None:
            have, want = saved_cfg.to_dict(), model_cfg.to_dict()
            diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
            if diff:  # a clear message instead of load_state_dict's missing / unexpected keys
                raise ValueError(
                    f"{ckpt}: its model differs from the one asked for ("
                    + ", ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in diff.items())
                    + "); pass the checkpoint's architecture settings, or start afresh"
                )
        self.model = TranslationModel(model_cfg).to(self.device)
        self.critic = Critic(self.model.cfg).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.lr_critic, betas=(0.0, 0.9))
        self.step = 0
        self.elapsed = 0.0
        self.history: list = []
        self.progress = progress
        self.val_batch = val_batch
        if saved is not None:
            self._load_state(saved)

    # -- checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "critic": self.critic.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "model_cfg": self.model.cfg.to_dict(),
            "train_cfg": json.loads(json.dumps(self.cfg.to_dict())),
            "torch_rng": torch.get_rng_state(),
            "pool_rng": self.pool.rng.bit_generator.state,
        }

    def save(self, path=None) -> Path:
        path = Path(path or self.out / "ckpt.pt")
        return atomic_torch_save(self.state(), path)

    def load(self, path) -> None:
        self._load_state(torch.load(path, map_location=self.device, weights_only=False))

    def _load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.critic.load_state_dict(st["critic"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.step, self.elapsed, self.history = int(st["step"]), float(st["elapsed"]), list(st["history"])
        torch.set_rng_state(st["torch_rng"].cpu())  # map_location moved it to the device (CUDA resume)
        try:
            self.pool.rng.bit_generator.state = st["pool_rng"]
        except Exception:  # pragma: no cover - a different pool
            pass

    # -- one step
    def train_step(self, xa, a, xb, b, xa_plus=None, xa_minus=None) -> dict:
        w = self.cfg.weights
        xa, a, xb, b = (t.to(self.device) for t in (xa, a, xb, b))
        use_adv = w.adv > 0
        # generator-side forward (critic frozen for this backward)
        for p in self.critic.parameters():
            p.requires_grad_(False)
        out = translation_losses(self.model, xa, a, xb, b, w, self.critic if use_adv else None)
        if w.uses_shifts and xa_plus is not None:
            sym = shift_symmetry(
                self.model.enc_c, out["c_b"], xa_plus.to(self.device), xa_minus.to(self.device), ca=out["c_a"]
            )
            out.update(sym)
            out["total"] = out["total"] + w.shift_symmetry * sym["shift_symmetry"] + w.shift_drift * sym["shift_drift"]
        self.opt_g.zero_grad(set_to_none=True)
        out["total"].backward()
        g_norm = None
        if self.cfg.grad_clip:
            g_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt_g.step()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        logs = {k: float(v.detach()) for k, v in out.items() if k not in ("x_ab", "x_ba", "c_a", "c_b")}
        if g_norm is not None:
            logs["g_norm"] = g_norm  # before clipping
        if use_adv:
            for i in range(self.cfg.n_critic):
                if i == 0:
                    fab, fba = out["x_ab"].detach(), out["x_ba"].detach()
                else:
                    xa, a, xb, b = (t.to(self.device) for t in self.pool.draw(self.cfg.batch, crop=self.cfg.crop))
                    with torch.no_grad():
                        ca, cb = self.model.enc_c(xa), self.model.enc_c(xb)
                        fab = self.model.gen(ca, self.model.enc_s(xb, b), b)
                        fba = self.model.gen(cb, self.model.enc_s(xa, a), a)
                d = critic_loss(self.critic, xa, a, xb, b, fab, fba, w)
                self.opt_d.zero_grad(set_to_none=True)
                d["d_total"].backward()
                self.opt_d.step()
            logs.update({k: float(v.detach()) for k, v in d.items()})
        return logs

    def run(self, log: Callable | None = None) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        base_elapsed = self.elapsed
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="content", mininterval=5.0)
        logf = open(self.out / "log.jsonl", "a")
        stopped = "steps"
        try:
            while self.step < cfg.steps:
                if cfg.max_minutes is not None and self.elapsed >= cfg.max_minutes * 60.0:
                    stopped = "time"
                    break
                shift = cfg.shift_vox if cfg.weights.uses_shifts else 0.0
                pb = self.pool.draw_batch(cfg.batch, crop=cfg.crop, shift_vox=shift)
                self.model.train()
                logs = self.train_step(pb.xa, pb.a, pb.xb, pb.b, pb.xa_plus, pb.xa_minus)
                self.step += 1
                self.elapsed = base_elapsed + time.perf_counter() - t_start
                if self.step % cfg.log_every == 0 or self.step == 1:
                    rec = {
                        "step": self.step,
                        "elapsed_s": round(self.elapsed, 1),
                        **{k: round(v, 5) for k, v in logs.items()},
                    }
                    self.history.append(rec)
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    shown = ("total", "paired_content", "paired_translation", "cycle", "shift_symmetry")
                    bar.set_postfix({k: f"{logs[k]:.3f}" for k in shown if k in logs})
                bar.update(1)
                if self.step % cfg.ckpt_every == 0:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.val_batch is not None:
                    self.sample_png(self.out / "samples" / f"step_{self.step:06d}.png")
        finally:
            bar.close()
            logf.close()
        self.save()
        if self.val_batch is not None:
            self.sample_png(self.out / "samples" / f"step_{self.step:06d}.png")
        summary = {
            "steps": self.step,
            "elapsed_s": self.elapsed,
            "stopped": stopped,
            "last": self.history[-1] if self.history else {},
        }
        if log:
            log(json.dumps(summary))
        return summary

    @torch.no_grad()
    def sample_png(self, path) -> Path:
        """Translations of the validation batch (a list of ``(stacks (4, 5, h, w), title)``):
        rows = input contrast, columns = output contrast (diagonal: reconstruction), middle slice."""
        self.model.eval()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = translation_figure(self.model, self.val_batch, title=f"step {self.step}")
        fig.savefig(path, dpi=50)
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.model.train()
        return path


def translation_figure(model: TranslationModel, examples, title: str = ""):
    """A matplotlib figure: for each example ``(stacks (M, 5, h, w) of all M contrasts, label)``, an
    M x (M + 1) block: column 0 the real image, columns 1..M the translations from that row's contrast
    into each contrast (style from the real target stack); middle slice of each stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = model.cfg.modalities
    m = len(mods)
    rows = m * len(examples)
    fig, axes = plt.subplots(rows, m + 1, figsize=(1.6 * (m + 1), 1.6 * rows), squeeze=False)
    dev = next(model.parameters()).device
    for e, (st, label) in enumerate(examples):
        st = st.to(dev)
        for i in range(m):
            r = e * m + i
            src = st[i : i + 1]
            axes[r, 0].imshow(st[i, STACK // 2].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{label}\n{mods[i]}", fontsize=7)
            for j in range(m):
                out = model.translate(src, st[j : j + 1], j)
                axes[r, j + 1].imshow(out[0, STACK // 2].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    axes[r, j + 1].set_title(f"-> {mods[j]}", fontsize=8)
        axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def validation_examples(subject, modalities=("t1", "t2", "flair", "pd"), spacing_positions=None) -> list:
    """Three examples (axial, coronal, sagittal middle stacks) of a subject for :func:`translation_figure`;
    coronal/sagittal stacks are flipped so the vertex is up."""
    vol = torch.cat([subject.tensor(m) for m in modalities], dim=1)  # (1, M, D, H, W)
    out = []
    names = ("axial", "coronal", "sagittal")
    for axis in range(3):
        n = vol.shape[2 + axis]
        c = torch.tensor([n // 2 if axis != 0 else int(n * 0.55)])
        st = extract_stacks(vol, axis, c).view(
            len(modalities), STACK, *vol.shape[2:][:axis], *vol.shape[2:][axis + 1 :]
        )
        if axis != 0:
            st = st.flip(-2)
        st, _ = _pad_to(st, 8)
        out.append((st, names[axis]))
    return out
