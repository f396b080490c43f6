"""Write a similarity-ablation report folder (README.md + summary.json, fig_training.png) from the two
training runs of ablation.sh (same folder) and its msode-eval experiments. From the repository root:

    python -m training.experiments.similarity_ablation.scripts.report --work out/ablation/loss_4mm \\
        --out training/experiments/similarity_ablation/reports/loss_4mm

Every number in the README is read from the runs' files (train_log.csv, config.yaml, results.json);
``notes.md`` in the output folder, when present, is appended verbatim (the discussion).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np
import yaml

from msode_train.evaluate import paired_comparison

ARMS = ("content", "mi")
EXPERIMENTS = {
    "rigid_paper": "rigid, the paper's U(±75°), U(±20 mm); random ordered contrast pairs",
    "rigid_moderate": "rigid, U(±30°), U(±15 mm) (the training range); random ordered contrast pairs",
    "rigid_t2_t1": "rigid, the paper's U(±75°), U(±20 mm); T2 → T1 (with SimpleITK Mattes-MI)",
}


def read_log(path: Path) -> dict:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.asarray([float(r[k]) for r in rows]) for k in ("step", "sim", "rmse_phi_mm", "sec_per_step")}


def rolling_median(v: np.ndarray, w: int = 25) -> np.ndarray:
    return np.asarray([np.median(v[max(0, i - w + 1): i + 1]) for i in range(len(v))])


def training_figure(logs: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 1 + len(logs), figsize=(5 * (1 + len(logs)), 3.8))
    for arm, lg in logs.items():
        axes[0].plot(lg["step"], rolling_median(lg["rmse_phi_mm"]), label=f"L_sim = {arm}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training-pair RMSE(φ) / mm (rolling median 25)")
    axes[0].set_title("registration error of the training pairs\n(measured, never a loss term)")
    axes[0].legend()
    for ax, (arm, lg) in zip(axes[1:], logs.items()):
        ax.plot(lg["step"], lg["sim"], lw=0.5, alpha=0.4)
        ax.plot(lg["step"], rolling_median(lg["sim"]), lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(f"L_sim = {arm} (the training loss)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def fmt_p(p) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else "<0.001")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/ablation")
    ap.add_argument("--out", default="training/experiments/similarity_ablation/reports/loss_4mm")
    ap.add_argument("--tag", default="loss_4mm", help="the variant's name (title)")
    ap.add_argument("--optimum", help="JSON of optimum.py (same folder) to include")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs, cfgs = {}, {}
    for arm in ARMS:
        logs[arm] = read_log(work / arm / "train_log.csv")
        cfgs[arm] = yaml.safe_load((work / arm / "config.yaml").read_text())
        shutil.copyfile(work / arm / "train_log.csv", out / f"train_log_{arm}.csv")
    training_figure(logs, out / "fig_training.png")

    def strip(cfg):  # what may differ between the arms
        c = json.loads(json.dumps(cfg))
        c.pop("name", None)
        c["loss"].pop("sim", None)
        c["loss"].pop("sim_kwargs", None)
        c["train"].pop("out_dir", None)
        c["train"].pop("threads", None)  # CPU threads: scheduling only (a reused MI arm trained with 1)
        return c
    same_config = strip(cfgs["content"]) == strip(cfgs["mi"])
    steps = {arm: int(logs[arm]["step"][-1]) for arm in ARMS}
    sim_sp = cfgs["content"]["loss"].get("sim_spacing_mm")
    model_sp = float(cfgs["content"]["model"]["spacing_mm"])
    loss_where = (f"on the same pairs rendered at {float(sim_sp):g} mm (the ODE runs on the {model_sp:g} mm grid)"
                  if sim_sp and abs(float(sim_sp) - model_sp) > 1e-9 else f"on the {model_sp:g} mm model grid")
    # runs from before the encoder was recorded in the config used content_phantom_v1, the only one then
    content_kwargs = cfgs["content"]["loss"].get("sim_kwargs") or {}
    encoder = content_kwargs.get("encoder") or "content_phantom_v1"
    n_stacks = int(content_kwargs.get("n_slices", 24))  # 24: content_similarity's default
    summary = {"date": date.today().isoformat(), "tag": args.tag, "config": "rigid_4mm_feature_gn", "steps": steps,
               "content_encoder": encoder, "content_stacks_per_call": n_stacks,
               "loss_spacing_mm": float(sim_sp or model_sp),
               "configs_equal_but_loss_sim": same_config,
               "train_seconds": {arm: float(logs[arm]["sec_per_step"].sum()) for arm in ARMS},
               "final_train_rmse_phi_median_last50": {arm: float(np.median(logs[arm]["rmse_phi_mm"][-50:]))
                                                      for arm in ARMS},
               "first_train_rmse_phi_median_first50": {arm: float(np.median(logs[arm]["rmse_phi_mm"][:50]))
                                                       for arm in ARMS},
               "experiments": {}}
    lines = [f"# Similarity ablation `{args.tag}`: registration trained with L_sim = content vs L_sim = MI", "",
             "Produced by `bash training/experiments/similarity_ablation/scripts/ablation.sh` (report: "
             f"`report.py` in the same folder) on {summary['date']}, CPU (2 cores, torch {torch_version()}). "
             "The paper's Figure 4a ablation \"no learned content loss (replaced by MI)\", at CPU scale.", "",
             "## Set-up", "",
             "- Model: config `rigid_4mm_feature_gn` — rigid MS-ODENet, 4 mm model grid, L = T = 3 (levels 16 / 8 / "
             "4 mm, Euler 0.2 per level). Each level's vector field is a Gauss-Newton step on the SSD of learned "
             "features (`rigid_feature_gn`: a small 3-D CNN with contrast FiLM, 4 learned channels + the image "
             "times a learned gain that starts at 0). Start: seeded random weights, identical for both arms.",
             f"- L_sim = content uses the content encoder `{encoder}` (E_3D^c, {n_stacks} random 5-slice stacks "
             "per call).",
             f"- Training: only the similarity loss, computed {loss_where} (lambda_self = 0, so L_sim is the only "
             "signal), Adam 1e-3, "
             "2 multi-contrast pairs per step (random ordered pairs of T1/T2/FLAIR/PD), rigid motions U(±30°), "
             "U(±15 mm), 40 training subjects; the same pairs in the same order for both arms (same seed).",
             "- The two runs' resolved configs are identical except `loss.sim` (+ its `sim_kwargs`), the name and "
             f"the CPU thread count: **{same_config}**. "
             f"Steps: content {steps['content']}, MI {steps['mi']}; training time "
             f"{summary['train_seconds']['content'] / 60:.0f} / {summary['train_seconds']['mi'] / 60:.0f} min "
             "(wall time on the shared 2-core machine; see the notes for how the arms were scheduled).",
             "- Evaluation: `msode-eval` through `Registrar.register` from arrays, held-out test subjects "
             "(seeds 10000+), 2 mm images, protocol seed 2021; the plans' rigid stage runs the multistart "
             "initialiser (`init: multistart`, the same for all three plans). `untrained` is the common start "
             "(zero steps).", "",
             "## Training", "",
             "![training](fig_training.png)", "",
             "Training-pair RMSE(φ) (median of the first / last 50 steps; measured against the simulated truth, not "
             "used by the loss): " + "; ".join(
                 f"{arm} {summary['first_train_rmse_phi_median_first50'][arm]:.2f} → "
                 f"{summary['final_train_rmse_phi_median_last50'][arm]:.2f} mm" for arm in ARMS) + ".", "",
             "## Held-out evaluation", ""]
    for name, desc in EXPERIMENTS.items():
        res = out / name / "results.json"
        if not res.exists():
            lines += [f"### `{name}`: not run ({res} missing)", ""]
            continue
        rep = json.loads(res.read_text())
        s = rep["summary"]
        n = rep["protocol"]["n_pairs"]
        lines += [f"### `{name}`: {desc}, {n} pairs", "",
                  "| method | RMSE(φ) median / mean / worst, mm | success (< 2 mm) | Dice tumour % | Dice tissue % | time / s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m, v in s.items():
            phi = v["rmse_phi_mm"]
            lines.append(f"| {m} | {phi['median']:.2f} / {phi['mean']:.2f} / {phi['max']:.2f} "
                         f"| {round(v['success_rmse_phi_lt_2mm'] * n)}/{n} | {100 * v['dice_tumour']['mean']:.1f} "
                         f"| {100 * v['dice_tissue']['mean']:.1f} | {v['seconds']['mean']:.2f} |")
        comps = {}
        for metric in ("rmse_phi_mm", "dice_tumour"):
            c = paired_comparison(rep, "content", "mi", metric)
            comps[metric] = asdict(c)
            lines.append("")
            lines.append(f"Paired, content vs MI, {metric}: content better on {c.a_better}, MI better on {c.b_better}, "
                         f"tied (±{c.tie_tol:g}) on {c.ties}; median difference (content − MI) {c.median_diff:+.3f}; "
                         f"Wilcoxon p = {fmt_p(c.p_wilcoxon)}, sign test p = {fmt_p(c.p_sign)}.")
        summary["experiments"][name] = {"n_pairs": n, "summary": s, "content_vs_mi": comps}
        lines.append("")
    if args.optimum and Path(args.optimum).exists():
        opt = json.loads(Path(args.optimum).read_text())
        summary["optimum_drift"] = opt["results"]
        lines += ["## Where each similarity puts its optimum", "",
                  "`training/experiments/similarity_ablation/scripts/optimum.py`: held-out pairs with a known rigid "
                  "motion, minimise L_sim over the "
                  "6 rigid parameters starting AT the truth (Adam, the similarity's own slice sampling included); "
                  "the drift is RMSE(φ) between the optimum and the truth over the fixed brain — the floor a "
                  "registration trained on that similarity is pulled towards.", "",
                  "| similarity @ spacing | drift median / mean / worst, mm | pairs |", "| --- | --- | --- |"]
        for k, v in opt["results"].items():
            lines.append(f"| {k} | {v['median']:.2f} / {v['mean']:.2f} / {v['max']:.2f} | {len(v['drift_mm'])} "
                         f"({', '.join(v['pairs'])}) |")
        lines.append("")
    notes = out / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'README.md'}")
    return 0


def torch_version() -> str:
    import torch
    return torch.__version__.split("+")[0]


if __name__ == "__main__":
    sys.exit(main())
