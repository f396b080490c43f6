#!/usr/bin/env python
"""Train the multi-slice translation model whose content encoder is msode's similarity, and report on it.

From the repository root, with the project installed (``make demo``; or ``.venv/bin/python``), and
S=training/experiments/content_encoder/scripts/train_content.py, R=training/experiments/content_encoder/reports:

    # train (CPU or GPU), resumable; writes out/content/<run>/{ckpt.pt,log.jsonl,samples/} and, at the
    # end, the weights file training/msode_train/weights/<name>.pt (+ train_meta.json, loss_curves.png in
    # --report-dir)
    nice -n 10 python $S train --max-minutes 43 --crop 64 --batch 4 --threads 1
    # (the committed content_phantom_v1 came from this recipe, in two phases; see its report's note)

    # content_phantom_v2: v1's checkpoint fine-tuned with the registration-aware shift-symmetry term
    python $S train --init-from out/content/run/ckpt.pt --out out/content/v2 \
        --name content_phantom_v2 --report-dir $R/v2 --max-minutes 71 --threads 2 \
        --w-shift-symmetry 30 --shift-vox 1.5 --w-paired-content 4
    # content_phantom_v5: v2's checkpoint, 25 min with the slope-over-curvature term (shift_drift 2,
    # shift-symmetry 10), then 25 min more from that checkpoint with --w-shift-drift 8 --w-shift-symmetry 0
    python $S train --init-from out/content/v2/ckpt_phase1.pt --out out/content/v4 \
        --weights-out out/content/v4/content_phantom_v4.pt --max-minutes 96 --threads 2 --grad-clip 10 \
        --w-shift-symmetry 10 --w-shift-drift 2 --shift-vox 1.5 --w-paired-content 4
    python $S train --init-from out/content/v4/ckpt.pt --out out/content/v5 \
        --name content_phantom_v5 --report-dir $R/v5 --max-minutes 121 --threads 2 \
        --grad-clip 10 --w-shift-symmetry 0 --w-shift-drift 8 --shift-vox 1.5 --w-paired-content 4

    # evaluate committed weights: translations figure, shift/rotation landscapes vs mutual information
    # on held-out subjects (SubjectBank test split), markdown + JSON + PNG under $R/v1/
    python $S report --weights content_phantom_v1

Every run is deterministic in ``--seed``. On the project's shared 2-core CPU use ``nice -n 10`` and
``--threads 1`` (two threads under contention are many times slower).
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from msode_train import content as C
from msode_train import data as D

ROOT = Path(__file__).resolve().parents[4]  # the repository root (default paths only)
REPORTS = ROOT / "training" / "experiments" / "content_encoder" / "reports"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- train


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    dev = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init_from and not (out / "ckpt.pt").exists():
        shutil.copyfile(args.init_from, out / "ckpt.pt")
        src_log = Path(args.init_from).with_name("log.jsonl")
        if src_log.exists():  # the log up to the checkpoint's step (the source run may have gone on)
            step = int(torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["step"])
            rows = [ln for ln in src_log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            (out / "log.jsonl").write_text("".join(ln + "\n" for ln in rows))
        _log(f"fine-tuning from {args.init_from}")
    bank = D.SubjectBank.for_split(args.bank_root, "train", args.subjects, spacing=args.spacing)
    _log(f"bank: {args.subjects} training subjects at {args.spacing:g} mm in {args.bank_root}")
    bank.ensure(log=_log)
    val_subject = D.SubjectBank.for_split(args.bank_root, "val", 1, spacing=args.spacing)[0]
    pool = C.SlicePool(bank, slots=args.slots, refresh_every=args.refresh_every, p_rotate=args.p_rotate,
                       max_rot_deg=args.max_rot_deg, seed=args.seed)
    weights = C.LossWeights(adv=args.w_adv, cycle=args.w_cycle, image=args.w_image,
                            paired_content=0.0 if args.unpaired else args.w_paired_content,
                            paired_translation=0.0 if args.unpaired else args.w_paired_translation,
                            shift_symmetry=0.0 if args.unpaired else args.w_shift_symmetry,
                            shift_drift=0.0 if args.unpaired else args.w_shift_drift)
    cfg = C.TrainConfig(steps=args.steps, batch=args.batch, crop=args.crop or None, lr=args.lr,
                        lr_critic=args.lr, n_critic=args.n_critic, max_minutes=args.max_minutes,
                        ckpt_every=args.ckpt_every, sample_every=args.sample_every, seed=args.seed,
                        weights=weights, shift_vox=args.shift_vox, grad_clip=args.grad_clip)
    model_cfg = C.ContentConfig(base_channels=args.channels, content_dim=args.content_dim,
                                n_down=args.n_down, spacing_mm=args.spacing)
    trainer = C.ContentTrainer(pool, out, cfg, model_cfg, device=dev,
                               val_batch=C.validation_examples(val_subject), resume=not args.fresh,
                               progress=True)
    _log(f"device {dev}, threads {torch.get_num_threads()}, start at step {trainer.step} "
         f"({trainer.elapsed / 60:.1f} min so far); params E^c {C.n_parameters(trainer.model.enc_c)}, "
         f"E^s {C.n_parameters(trainer.model.enc_s)}, G {C.n_parameters(trainer.model.gen)}, "
         f"critic {C.n_parameters(trainer.critic)}")
    summary = trainer.run(log=_log)
    export(trainer, args, summary, dev)


def _final_losses(history: list, n: int = 20) -> dict:
    last = history[-n:]
    keys = [k for k in last[-1] if k not in ("step", "elapsed_s")] if last else []
    return {k: float(np.mean([h[k] for h in last if k in h])) for k in keys}


def export(trainer, args, summary: dict, dev) -> None:
    name = args.name
    if args.weights_out and name == C.DEFAULT_WEIGHTS:  # --weights-out alone names the weights by its file
        name = Path(args.weights_out).stem
    meta = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "steps": trainer.step,
        "train_seconds": round(trainer.elapsed, 1),
        "stopped": summary.get("stopped"),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "torch": torch.__version__,
        # `export` re-writes a checkpoint: the training run's data settings are not in it (None: unknown)
        "data": {"kind": "msode_train.data synthetic phantoms", "split": "train",
                 "subjects": args.subjects if args.func is cmd_train else None,
                 "spacing_mm": trainer.model.cfg.spacing_mm, "generator_version": D.GENERATOR_VERSION,
                 "contrasts": list(D.CONTRASTS), "p_rotate": getattr(args, "p_rotate", None),
                 "max_rot_deg": getattr(args, "max_rot_deg", None)},
        "train_config": json.loads(json.dumps(trainer.cfg.to_dict())),
        "final_losses_mean_last_20_logs": _final_losses(trainer.history),
    }
    dest = C.WEIGHTS_DIR / f"{args.name}.pt" if not args.weights_out else Path(args.weights_out)
    C.save_weights(trainer.model, dest, meta)
    _log(f"weights -> {dest} ({dest.stat().st_size / 1e6:.2f} MB)")
    rep = Path(args.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "train_meta.json").write_text(json.dumps(meta, indent=2))
    plot_losses(rep, trainer.out / "log.jsonl")  # the per-step log itself stays in the run folder


def cmd_export(args) -> None:
    """Re-export the weights file from a run's checkpoint (e.g. after a stop)."""
    bank = D.SubjectBank.for_split(args.bank_root, "train", min(args.subjects, 2), spacing=args.spacing)
    pool = C.SlicePool(bank, slots=1, refresh_every=0)
    if not (Path(args.out) / "ckpt.pt").exists():
        raise SystemExit(f"error: {Path(args.out) / 'ckpt.pt'} does not exist (train first, or pass --out)")
    given = {k: v for k, v in (("base_channels", args.channels), ("content_dim", args.content_dim),
                               ("n_down", args.n_down)) if v is not None}
    # no architecture flags: the checkpoint's own; any given: checked against it (a clear error)
    model_cfg = C.ContentConfig(**given, spacing_mm=args.spacing) if given else None
    trainer = C.ContentTrainer(pool, args.out, resume=True, progress=False, model_cfg=model_cfg)
    export(trainer, args, {"stopped": "export"}, torch.device("cpu"))


# -------------------------------------------------------------------------------------------- report


PAIRS = (("t1", "t2"), ("t1", "flair"), ("t2", "flair"))


def cmd_report(args) -> None:
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = Path(args.out)
    rep.mkdir(parents=True, exist_ok=True)
    model = C.load_translation_model(args.weights)
    meta = model.meta
    bank = D.SubjectBank.for_split(args.bank_root, "test", args.subjects, spacing=model.cfg.spacing_mm)
    bank.ensure(log=_log)

    if args.replot:  # markdown and figures again from the saved JSON (no evaluation)
        saved = json.loads((rep / "landscapes.json").read_text())
        summ = json.loads((rep / "summary.json").read_text())
        args.n_slices, args.seed = saved["n_slices"], saved["seed"]
        plot_landscapes(saved["results"], rep, plt)
        write_markdown(rep, args, meta, model, saved["results"], summ["translation_l1"],
                       summ.get("eval_seconds", float("nan")))
        _log(f"report -> {rep / 'README.md'} (replotted)")
        return

    if args.wide:  # supplementary wide sweep: where the capture ranges actually end
        results = run_landscapes(bank, args, np.arange(-args.wide_shift, args.wide_shift + 1e-9, args.wide_shift_step),
                                 np.arange(-args.wide_angle, args.wide_angle + 1e-9, args.wide_angle_step))
        (rep / "landscapes_wide.json").write_text(json.dumps({"weights": args.weights, "n_slices": args.n_slices,
                                                              "seed": args.seed, "results": results}))
        plot_landscapes(results, rep, plt, name="landscapes_wide.png")
        args.replot = True
        return cmd_report(args)

    # 1. translations
    fig = C.translation_figure(model, C.validation_examples(bank[0])[:3],
                               title=f"{args.weights}: translations, held-out subject {bank[0].subject_id}")
    fig.savefig(rep / "translations.png", dpi=90)
    plt.close(fig)
    trans_err = translation_errors(model, bank)
    _log(f"translation L1 errors: {json.dumps(trans_err)}")

    # 2. landscapes
    shifts = np.arange(-args.max_shift, args.max_shift + 1e-9, args.step)
    angles = np.arange(-args.max_angle, args.max_angle + 1e-9, args.step)
    t0 = time.perf_counter()
    results = run_landscapes(bank, args, shifts, angles)
    (rep / "landscapes.json").write_text(json.dumps({"weights": args.weights, "n_slices": args.n_slices,
                                                     "seed": args.seed, "results": results}))
    plot_landscapes(results, rep, plt)
    write_markdown(rep, args, meta, model, results, trans_err, time.perf_counter() - t0)
    _log(f"report -> {rep / 'README.md'}")


def run_landscapes(bank, args, shifts, angles) -> list:
    sim = C.content_similarity(args.weights, n_slices=args.n_slices, seed=args.seed, resample=False)
    results = []
    t0 = time.perf_counter()
    for si in range(len(bank)):
        subj = bank[si]
        for mov_c, fix_c in PAIRS:
            moving, fixed = subj.tensor(mov_c), subj.tensor(fix_c)
            sim.reset()
            for dof in range(6):
                vals = angles if dof < 3 else shifts
                land = C.similarity_landscape(moving, fixed, subj.grid, sim, vals, dof)
                rec = {"subject": subj.subject_id, "moving": mov_c, "fixed": fix_c, "dof": C.DOF_NAMES[dof],
                       **land}
                for key in ("content", "neg_mi"):
                    rec[f"{key}_min"] = C.refine_minimum(land["values"], land[key])
                    rec[f"{key}_capture"] = C.capture_range(land["values"], land[key])
                results.append(rec)
            _log(f"{subj.subject_id} {mov_c}->{fix_c} done ({time.perf_counter() - t0:.0f} s)")
    return results


@torch.no_grad()
def translation_errors(model, bank) -> dict:
    """Mean L1 of paired translations (middle stacks, all axes) on the test subjects, per target contrast,
    against the identity baseline ``|x_a - x_b|`` (what translation must beat)."""
    mods = model.cfg.modalities
    errs = {m: [] for m in mods}
    base = {m: [] for m in mods}
    for subj in bank:
        for st, _ in C.validation_examples(subj):
            for i in range(len(mods)):
                for j in range(len(mods)):
                    if i == j:
                        continue
                    out = model.translate(st[i:i + 1], st[j:j + 1], j)
                    errs[mods[j]].append(float((out - st[j:j + 1]).abs().mean()))
                    base[mods[j]].append(float((st[i:i + 1] - st[j:j + 1]).abs().mean()))
    return {m: {"translation_l1": float(np.mean(errs[m])), "identity_l1": float(np.mean(base[m]))} for m in mods}


def plot_landscapes(results, rep: Path, plt, name: str = "landscapes.png") -> None:
    pairs = sorted({(r["moving"], r["fixed"]) for r in results}, key=lambda p: PAIRS.index(p))
    subjects = sorted({r["subject"] for r in results})
    fig, axes = plt.subplots(len(pairs), 6, figsize=(18, 3.0 * len(pairs)), squeeze=False)
    for pi, pair in enumerate(pairs):
        for dof in range(6):
            ax = axes[pi, dof]
            ax2 = ax.twinx()
            for si, s in enumerate(subjects):
                r = next(x for x in results if x["subject"] == s and (x["moving"], x["fixed"]) == pair
                         and x["dof"] == C.DOF_NAMES[dof])
                v = np.asarray(r["values"])
                c = np.asarray(r["content"])
                m = np.asarray(r["neg_mi"])
                ax.plot(v, c, "-", color="C0", alpha=0.8, lw=1.2, label="content distance" if si == 0 else None)
                ax2.plot(v, m, "--", color="C3", alpha=0.8, lw=1.2, label="-MI" if si == 0 else None)
            ax.axvline(0, color="k", lw=0.5)
            unit = "deg" if dof < 3 else "mm"
            ax.set_xlabel(f"{C.DOF_NAMES[dof]} ({unit})")
            if dof == 0:
                ax.set_ylabel(f"{pair[0]} -> {pair[1]}\ncontent distance", color="C0")
            if dof == 5:
                ax2.set_ylabel("-MI (nats)", color="C3")
            ax.tick_params(axis="y", colors="C0", labelsize=7)
            ax2.tick_params(axis="y", colors="C3", labelsize=7)
            if pi == 0 and dof == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    fig.suptitle("Similarity vs known motion of the moving contrast (truth = 0), held-out subjects "
                 f"({', '.join(subjects)}); solid: content distance, dashed: -MI", fontsize=10)
    fig.tight_layout()
    fig.savefig(rep / name, dpi=80)
    plt.close(fig)


def _fmt(x, nd=2):
    return f"{x:.{nd}f}"


def write_markdown(rep: Path, args, meta: dict, model, results, trans_err, eval_seconds: float) -> None:
    lines = []
    fl = meta.get("final_losses_mean_last_20_logs", {})
    on_cpu = meta.get("device") == "cpu"  # meta records "cpu" or the GPU's name
    lines += [f"# Content-encoder similarity `{args.weights}`", "",
              "Generated by `python training/experiments/content_encoder/scripts/train_content.py report` "
              "(see `msode_train/content/`).", "",
              "## Model and training", "",
              f"- weights: `training/msode_train/weights/{Path(meta.get('path', args.weights)).name}`, "
              f"{Path(meta['path']).stat().st_size / 1e6:.2f} MB; E^c {C.n_parameters(model.enc_c)}, "
              f"E^s {C.n_parameters(model.enc_s)}, G {C.n_parameters(model.gen)} parameters",
              f"- trained {meta.get('steps')} steps in {meta.get('train_seconds', 0) / 60:.1f} min on "
              f"{meta.get('device')} ({'CPU, ' if on_cpu else 'GPU; '}{meta.get('threads')} CPU thread(s)"
              f"{', shared machine' if on_cpu else ''}); stopped by "
              f"{meta.get('stopped')}",
              f"- data: {json.dumps(meta.get('data', {}))}",
              f"- train config: {json.dumps(meta.get('train_config', {}))}",
              *([f"- note: {meta['notes']}"] if meta.get("notes") else []),
              "- final losses (mean of the last 20 logged steps): "
              + ", ".join(f"{k} {v:.4g}" for k, v in fl.items()), "",
              "Loss curves: `loss_curves.png` (dashed: phase boundaries, see the note; the log of every 10th "
              "step, `log.jsonl`, stays in the training run's folder); weights metadata: `train_meta.json`.", "",
              "## API (for the registration loss)", "",
              "```python",
              "from msode_train.content import content_similarity",
              f"sim = content_similarity('{args.weights}', n_slices=24, seed=0)  # frozen E^c, deterministic positions",
              "loss = sim(warped, fixed)   # (N, 1, D, H, W) on one grid, [0, 1] intensities, 2 mm spacing",
              "loss.backward()             # gradients reach `warped` (and whatever produced it)",
              "sim_4mm = content_similarity(n_slices=24, spacing_mm=4.0)  # coarser levels: resampled to 2 mm",
              "```", "",
              "Each call draws new slice positions (a deterministic sequence from `seed`; `sim.reset()` "
              "restarts it; `resample=False` keeps one draw; `sim(w, f, generator=g)` uses `g`); `reduction="
              "'none'` gives one value per batch member. Scale: 0 for identical codes, ~2 for uncorrelated "
              "codes (every code channel is standardised over its slice).", "",
              "## Translations", "",
              "![translations](translations.png)", "",
              "Rows: input contrast; columns: translation into each contrast with the style code of the real "
              "target stack (diagonal: mono-modal reconstruction). Held-out subject, middle slice of 5.", "",
              "Paired translation L1 on the held-out subjects (middle stacks on the three axes), vs the L1 of "
              "the untranslated input against the target:", "",
              "| target | translation L1 | input-vs-target L1 |", "|---|---|---|"]
    for m, e in trans_err.items():
        lines.append(f"| {m} | {e['translation_l1']:.4f} | {e['identity_l1']:.4f} |")
    subjects = sorted({r["subject"] for r in results})
    lines += ["", "## Similarity landscapes", "",
              f"Held-out subjects {', '.join(subjects)} (test split, {model.cfg.spacing_mm:g} mm grid). The "
              "moving contrast is warped by a rigid motion with one parameter set (rotations about the grid "
              "centre in degrees, translations in mm; truth 0) and compared with the other contrast, unmoved. "
              f"Content distance: `content_similarity('{args.weights}', n_slices={args.n_slices}, "
              f"seed={args.seed}, resample=False)` (the same slice positions for every motion); MI: 32-bin "
              "joint histogram with linear binning over every voxel (classical MI, as unmasked tools use it). "
              f"Sampling step {args.step:g}; minimum refined by a parabola through the best sample and its "
              "neighbours. Capture range: from the curve's minimum, how far the curve keeps rising on each side "
              "(monotone), min of both sides; 'full' = the whole sampled interval "
              f"(+-{args.max_angle:g} deg / +-{args.max_shift:g} mm).", "",
              "![landscapes](landscapes.png)", "",
              "| pair | dof | content argmin | -MI argmin | content capture (L/R) | MI capture (L/R) |",
              "|---|---|---|---|---|---|"]
    pairs = [p for p in PAIRS if any((r["moving"], r["fixed"]) == p for r in results)]
    summary = {"content": {"min_ok": 0, "n": 0, "capture_ge_mi": 0}, "neg_mi": {"min_ok": 0, "n": 0}}
    worst = []
    for pair in pairs:
        for dof in C.DOF_NAMES:
            rs = [r for r in results if (r["moving"], r["fixed"]) == pair and r["dof"] == dof]
            cmin = [r["content_min"] for r in rs]
            mmin = [r["neg_mi_min"] for r in rs]
            ccap = [r["content_capture"] for r in rs]
            mcap = [r["neg_mi_capture"] for r in rs]
            for r in rs:
                for key in ("content", "neg_mi"):
                    summary[key]["n"] += 1
                    summary[key]["min_ok"] += abs(r[f"{key}_min"]) <= 1.0
                summary["content"]["capture_ge_mi"] += r["content_capture"]["both"] >= r["neg_mi_capture"]["both"]
                worst.append((abs(r["content_min"]), r["subject"], pair, dof))
            cap = lambda cs: "; ".join(f"{c['left']:.0f}/{c['right']:.0f}" for c in cs)  # noqa: E731
            lines.append(f"| {pair[0]}->{pair[1]} | {dof} | {', '.join(_fmt(v) for v in cmin)} | "
                         f"{', '.join(_fmt(v) for v in mmin)} | {cap(ccap)} | {cap(mcap)} |")
    n = summary["content"]["n"]
    c_both = [r["content_capture"]["both"] for r in results]
    m_both = [r["neg_mi_capture"]["both"] for r in results]
    lines += ["", "(one value per held-out subject, in the order "
              f"{', '.join(subjects)}; units deg for r*, mm for t*)", "",
              "## Summary", "",
              f"- curves: {n} ({len(subjects)} subjects x {len(pairs)} pairs x 6 dof)",
              f"- content-distance minimum within 1 mm / 1 deg of the truth: {summary['content']['min_ok']}/{n}; "
              f"-MI minimum within 1 mm / 1 deg: {summary['neg_mi']['min_ok']}/{n}",
              f"- largest content-minimum error: {max(worst)[0]:.2f} ({max(worst)[1]}, {max(worst)[2][0]}->"
              f"{max(worst)[2][1]}, {max(worst)[3]})",
              f"- capture range (min of both sides) of the content distance >= that of MI: "
              f"{summary['content']['capture_ge_mi']}/{n}; median content {np.median(c_both):.1f}, median MI "
              f"{np.median(m_both):.1f}; content covers the full sampled interval in "
              f"{sum(r['content_capture']['full'] for r in results)}/{n}, MI in "
              f"{sum(r['neg_mi_capture']['full'] for r in results)}/{n}",
              f"- evaluation time {eval_seconds / 60:.1f} min ({args.threads} thread(s), shared CPU)", ""]
    wide = rep / "landscapes_wide.json"
    if wide.exists():
        lines += wide_section(json.loads(wide.read_text()))
    aligned = [r["content"][r["values"].index(0.0)] for r in results if 0.0 in r["values"]]
    far = [max(r["content"][0], r["content"][-1]) for r in results]
    gains = [100.0 * (1.0 - e["translation_l1"] / max(e["identity_l1"], 1e-12)) for e in trans_err.values()] or [0.0]
    lines += ["## Findings and caveats", "",
              f"- Contrast invariance: two aligned contrasts of a held-out subject are {np.median(aligned):.3f} "
              f"apart (median over curves; range {min(aligned):.3f}-{max(aligned):.3f}), against "
              f"{np.median(far):.3f} at the ends of the requested sweep (15 mm / 20 deg).",
              f"- The content curve is smooth and rounded at the optimum (the code lives on a {2 ** model.cfg.n_down}x "
              f"coarser grid, {model.cfg.spacing_mm * 2 ** model.cfg.n_down:g} mm cells at {model.cfg.spacing_mm:g} mm); "
              "-MI has a cusp at 0, partly the interpolation effect (at the truth the moving image "
              "is not resampled, everywhere else it is trilinearly blurred), which flatters MI's minimum. Both minima "
              "are within 1 mm / 1 deg everywhere; the content minimum is less sharp (largest error above).",
              f"- The translations are blurry: {meta.get('train_seconds', 0) / 60:.0f} min of "
              f"{'CPU' if on_cpu else 'GPU'} training of small networks. Their L1 is "
              f"{min(gains):.0f}-{max(gains):.0f} % below the untranslated input's, not a production image "
              "translator; only E^c is used for registration.",
              "- The paired terms (paired content / paired translation) are beyond the paper; how much of the "
              "invariance they provide is not measured: the paper's unpaired recipe (`--unpaired`) was not "
              "trained for lack of time, so there is no ablation.",
              "- Evaluated on the 2 mm grid only; at coarser pyramid levels the volume is resampled to 2 mm "
              "(`spacing_mm=`), not evaluated here. PD is trained on but not among the evaluated pairs.", ""]
    (rep / "README.md").write_text("\n".join(lines))
    (rep / "summary.json").write_text(json.dumps({
        "weights": args.weights, "curves": n,
        "content_min_within_1": summary["content"]["min_ok"], "mi_min_within_1": summary["neg_mi"]["min_ok"],
        "content_capture_ge_mi": summary["content"]["capture_ge_mi"],
        "median_capture_content": float(np.median(c_both)), "median_capture_mi": float(np.median(m_both)),
        "eval_seconds": eval_seconds,
        "translation_l1": trans_err}, indent=2))
    plot_losses(rep)


def wide_section(saved: dict) -> list:
    res = saved["results"]
    subjects = sorted({r["subject"] for r in res})
    v_rot = next(r["values"] for r in res if r["dof"].startswith("r"))
    v_tr = next(r["values"] for r in res if r["dof"].startswith("t"))
    lines = ["## Beyond the requested range (supplementary)", "",
             f"Both similarities capture the whole requested interval, so the same comparison on a wider, coarser "
             f"sweep shows where each capture range ends: rotations {v_rot[0]:g}..{v_rot[-1]:g} deg (step "
             f"{v_rot[1] - v_rot[0]:g}), translations {v_tr[0]:g}..{v_tr[-1]:g} mm (step {v_tr[1] - v_tr[0]:g}), "
             f"subjects {', '.join(subjects)}, same slice positions (n_slices={saved['n_slices']}). "
             "Capture = min over both sides of the monotone range around the minimum (per subject).", "",
             "![wide landscapes](landscapes_wide.png)", "",
             "| pair | dof | content capture (per subject) | MI capture (per subject) | content argmin | MI argmin |",
             "|---|---|---|---|---|---|"]
    wins = ties = losses = 0
    for pair in PAIRS:
        for dof in C.DOF_NAMES:
            rs = [r for r in res if (r["moving"], r["fixed"]) == pair and r["dof"] == dof]
            if not rs:
                continue
            cc = [r["content_capture"]["both"] for r in rs]
            mc = [r["neg_mi_capture"]["both"] for r in rs]
            for a, b in zip(cc, mc):
                wins += a > b
                ties += a == b
                losses += a < b
            ca = ", ".join(f"{r['content_capture']['argmin']:g}" for r in rs)
            ma = ", ".join(f"{r['neg_mi_capture']['argmin']:g}" for r in rs)
            lines.append(f"| {pair[0]}->{pair[1]} | {dof} | {', '.join(f'{x:g}' for x in cc)} | "
                         f"{', '.join(f'{x:g}' for x in mc)} | {ca} | {ma} |")
    n = wins + ties + losses
    lines += ["", f"Content capture range wider than MI's in {wins}/{n} curves, equal in {ties}/{n}, narrower in "
              f"{losses}/{n}.", ""]
    return lines


def plot_losses(rep: Path, log: Path | None = None) -> None:
    """``rep/loss_curves.png`` from a run's ``log.jsonl`` (default: a ``train_log.jsonl`` kept in ``rep``)."""
    log = Path(log) if log else rep / "train_log.jsonl"
    if not log.exists():
        return
    import matplotlib.pyplot as plt
    hist = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    meta_path = rep / "train_meta.json"
    phases = json.loads(meta_path.read_text()).get("phase_boundaries", []) if meta_path.exists() else []
    keys = ["paired_content", "paired_translation", "cycle", "image", "content", "style", "adv", "wdist"]
    if any("shift_symmetry" in h for h in hist):  # the registration-aware fine-tune's term and its diagnostics
        keys += ["shift_symmetry", "shift_drift", "d_aligned", "d_shift"]
    fig, axes = plt.subplots(2, len(keys) // 2, figsize=(3.5 * len(keys) // 2, 5.5))
    steps = np.array([h["step"] for h in hist])
    for ax, k in zip(axes.ravel(), keys):
        y = np.array([h.get(k, np.nan) for h in hist], dtype=float)
        ax.plot(steps, y, lw=0.6, alpha=0.5)
        if len(y) >= 10:
            kern = np.ones(10) / 10
            ax.plot(steps[9:], np.convolve(y, kern, mode="valid"), lw=1.5)
        for b in phases:
            ax.axvline(b, color="k", lw=0.6, ls="--")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(rep / "loss_curves.png", dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    # defaults come from the library's dataclasses (one source): the trainer, the losses, the model, the pool
    tc, lw, mc = C.TrainConfig(), C.LossWeights(), C.ContentConfig()
    pool_defaults = {k: v.default for k, v in inspect.signature(C.SlicePool).parameters.items()}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--bank-root", default=str(ROOT / "out" / "bank"), help="subject bank cache folder")
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train (resumes from OUT/ckpt.pt unless --fresh)")
    common(t)
    t.add_argument("--out", default=str(ROOT / "out" / "content" / "run"))
    t.add_argument("--name", default=C.DEFAULT_WEIGHTS, help="weights name (training/msode_train/weights/NAME.pt)")
    t.add_argument("--weights-out", default=None, help="write the weights here instead")
    t.add_argument("--report-dir", default=str(REPORTS / "v1"))
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=tc.steps)
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    t.add_argument("--batch", type=int, default=tc.batch)
    t.add_argument("--crop", type=int, default=tc.crop or 0, help="in-plane crop (0 = whole slices)")
    t.add_argument("--subjects", type=int, default=32)
    t.add_argument("--spacing", type=float, default=mc.spacing_mm)
    t.add_argument("--slots", type=int, default=pool_defaults["slots"])
    t.add_argument("--refresh-every", type=int, default=pool_defaults["refresh_every"])
    t.add_argument("--p-rotate", type=float, default=pool_defaults["p_rotate"])
    t.add_argument("--max-rot-deg", type=float, default=pool_defaults["max_rot_deg"])
    t.add_argument("--channels", type=int, default=mc.base_channels)
    t.add_argument("--content-dim", type=int, default=mc.content_dim)
    t.add_argument("--n-down", type=int, default=mc.n_down,
                   help="stride-2 stages of E^c: the code's cell is spacing * 2^n_down (2: 8 mm at 2 mm)")
    t.add_argument("--lr", type=float, default=tc.lr, help="Adam learning rate of both networks")
    t.add_argument("--n-critic", type=int, default=tc.n_critic)
    t.add_argument("--w-adv", type=float, default=lw.adv)
    t.add_argument("--w-cycle", type=float, default=lw.cycle)
    t.add_argument("--w-image", type=float, default=lw.image)
    t.add_argument("--w-paired-content", type=float, default=lw.paired_content)
    t.add_argument("--w-paired-translation", type=float, default=lw.paired_translation)
    t.add_argument("--w-shift-symmetry", type=float, default=lw.shift_symmetry,
                   help="weight of the registration-aware shift-symmetry term (content.shift_symmetry)")
    t.add_argument("--w-shift-drift", type=float, default=lw.shift_drift,
                   help="weight of the slope-over-curvature term (content.shift_symmetry's shift_drift)")
    t.add_argument("--shift-vox", type=float, default=tc.shift_vox, help="max offset (voxels) of its shifted copies")
    t.add_argument("--grad-clip", type=float, default=tc.grad_clip, help="clip the generator-side gradient norm")
    t.add_argument("--init-from", default=None,
                   help="fine-tune: start from this checkpoint's networks and optimisers (copied into --out "
                        "when --out has none; its step count and training time carry on)")
    t.add_argument("--unpaired", action="store_true", help="the paper's unpaired recipe (no paired terms)")
    t.add_argument("--ckpt-every", type=int, default=tc.ckpt_every)
    t.add_argument("--sample-every", type=int, default=tc.sample_every)
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write the weights file from OUT/ckpt.pt")
    common(e)
    for a, d in (("--out", str(ROOT / "out" / "content" / "run")), ("--name", C.DEFAULT_WEIGHTS),
                 ("--weights-out", None), ("--report-dir", str(REPORTS / "v1"))):
        e.add_argument(a, default=d)
    e.add_argument("--subjects", type=int, default=32)
    e.add_argument("--spacing", type=float, default=mc.spacing_mm)
    e.add_argument("--channels", type=int, default=None, help="default: the checkpoint's")
    e.add_argument("--content-dim", type=int, default=None, help="default: the checkpoint's")
    e.add_argument("--n-down", type=int, default=None, help="default: the checkpoint's")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="evaluate weights on held-out subjects")
    common(r)
    r.add_argument("--weights", default=C.DEFAULT_WEIGHTS)
    r.add_argument("--out", default=str(REPORTS / "v1"))
    r.add_argument("--subjects", type=int, default=3)
    r.add_argument("--n-slices", type=int, default=24)
    r.add_argument("--max-shift", type=float, default=15.0)
    r.add_argument("--max-angle", type=float, default=20.0)
    r.add_argument("--step", type=float, default=1.0)
    r.add_argument("--replot", action="store_true", help="only redo figures and markdown from the saved JSON")
    r.add_argument("--wide", action="store_true", help="add the supplementary wide, coarse sweep")
    r.add_argument("--wide-shift", type=float, default=60.0)
    r.add_argument("--wide-shift-step", type=float, default=4.0)
    r.add_argument("--wide-angle", type=float, default=90.0)
    r.add_argument("--wide-angle-step", type=float, default=5.0)
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
