"""Issue 4's headline ablation over several training seeds: is the registration trained with L_sim =
content at least as good as the one trained with L_sim = MI, within a stated margin?

    python -m training.experiments.similarity_ablation.scripts.seeds_report --eval out/ablation/headline_eval \\
        --runs content_s0:mi_s0 content_s1:mi_s1 --extra content_s0_600:mi_s0_600 \\
        --log content_s0=out/.../train_log.csv ... --criterion out/ablation/PREREGISTERED.md \\
        --out training/experiments/similarity_ablation/reports/headline_nd1

``--eval`` holds one ``msode-eval`` folder per evaluation set (``rigid_paper``, ``rigid_moderate``,
``rigid_t2_t1``), each evaluated with the plans named in ``--runs`` / ``--extra``; several ``--eval``
folders (e.g. a seed evaluated later) are merged per set after checking they ran the same test pairs.
Headline: per test pair, content - MI averaged over the ``--runs`` seeds; Hodges-Lehmann shift with its 95 %
interval (``msode_train.evaluate.non_inferiority``); content is "at least as good" on a set when the
interval's upper end is <= the margin (default: the protocol's RMSE(phi) tie tolerance, 0.05 mm).
Every number in the README is read from the files; ``notes.md`` in ``--out`` is appended verbatim.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

import numpy as np

from msode_train.evaluate import non_inferiority, paired_comparison

from .report import fmt_p, read_log, rolling_median  # the single-seed report's

SETS = {
    "rigid_paper": "the paper's U(±75°), U(±20 mm), random ordered contrast pairs",
    "rigid_moderate": "U(±30°), U(±15 mm) (the training range), random ordered contrast pairs",
    "rigid_t2_t1": "the paper's U(±75°), U(±20 mm), T2 → T1",
}


def _pairs(specs) -> list[tuple[str, str]]:
    out = []
    for s in specs or []:
        a, sep, b = s.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"error: expected CONTENT_METHOD:MI_METHOD, got {s!r}")
        out.append((a, b))
    return out


def _figures(out: Path, per_set: dict, logs: dict, margin: float) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if per_set:
        fig, axes = plt.subplots(1, len(per_set), figsize=(4.6 * len(per_set), 4.0), squeeze=False)
        for ax, (name, v) in zip(axes[0], per_set.items()):
            d = np.asarray(v["headline"]["diffs"])
            order = np.argsort(d)
            ax.plot(np.arange(d.size), d[order], "o", ms=4, label="per test pair (mean over seeds)")
            ni = v["headline"]
            ax.axhspan(ni["shift_lo"], ni["shift_hi"], color="tab:orange", alpha=0.3,
                       label=f"HL shift {ni['shift']:+.3f}, 95 % CI")
            ax.axhline(0.0, color="k", lw=0.8)
            ax.axhline(margin, color="tab:red", ls="--", lw=1.0, label=f"margin +{margin:g} mm")
            if np.abs(d).max() > 1.0:  # a pair one arm failed would flatten the rest
                ax.set_yscale("symlog", linthresh=0.25)
            ax.set_title(f"{name}: content − MI")
            ax.set_xlabel("test pairs (sorted)")
            ax.set_ylabel("RMSE(φ) difference / mm")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fig_differences.png", dpi=110)
        plt.close(fig)
        made.append("fig_differences.png")
    if logs:
        fig, ax = plt.subplots(figsize=(6.5, 4.0))
        for label, lg in logs.items():
            ax.plot(lg["step"], rolling_median(lg["rmse_phi_mm"]), label=label,
                    ls="-" if label.startswith("content") else "--")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training-pair RMSE(φ) / mm (rolling median 25)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "fig_training.png", dpi=110)
        plt.close(fig)
        made.append("fig_training.png")
    return made


def merged_results(paths: list[Path]) -> dict | None:
    """The methods of several results.json of one evaluation set in one report; None if none exists.
    Raises ValueError when they did not run the same protocol on the same test pairs."""
    found = [p for p in paths if p.exists()]
    if not found:
        return None
    reps = [json.loads(p.read_text()) for p in found]
    merged = {"protocol": reps[0].get("protocol"), "rows": {}, "summary": {}}

    def key(rep):  # the test pairs, as the protocol drew them
        rows = next(iter(rep["rows"].values()))
        return [(r["pair"], r.get("subject"), r.get("moving"), r.get("fixed")) for r in rows]

    for p, rep in zip(found, reps):
        if key(rep) != key(reps[0]):
            raise ValueError(f"{p}: other test pairs than {found[0]}; evaluate with the same protocol")
        for m, rows in rep["rows"].items():
            if m in merged["rows"]:  # the same label in two folders must be the same results (e.g. identity;
                # equal to rounding: another thread count may sum in another order)
                here, before = ([float(r.get("rmse_phi_mm", np.nan)) for r in rr] for rr in (rows, merged["rows"][m]))
                if not np.allclose(here, before, rtol=1e-6, atol=1e-6, equal_nan=True):
                    raise ValueError(f"{p}: method {m!r} is also in an earlier folder with other results; "
                                     "label the plans apart")
                continue
            merged["rows"][m] = rows
            merged["summary"][m] = rep.get("summary", {}).get(m, {})
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, nargs="+",
                    help="folder(s) with one msode-eval output per evaluation set (merged per set)")
    ap.add_argument("--runs", nargs="+", required=True, metavar="CONTENT:MI",
                    help="the headline: one content:mi method pair per training seed")
    ap.add_argument("--extra", nargs="*", default=[], metavar="CONTENT:MI", help="secondary pairs (reported)")
    ap.add_argument("--log", nargs="*", default=[], metavar="METHOD=train_log.csv", help="training logs to plot")
    ap.add_argument("--margin", type=float, help="non-inferiority margin, mm (default: the tie tolerance)")
    ap.add_argument("--criterion", help="a file stating the criterion and when it was fixed (quoted)")
    ap.add_argument("--title", default="headline")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs, extra = _pairs(args.runs), _pairs(args.extra)
    evs, out = [Path(e) for e in args.eval], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = {}
    for spec in args.log:
        label, _, path = spec.partition("=")
        logs[label] = read_log(Path(path))
        shutil.copyfile(path, out / f"train_log_{label}.csv")
    summary = {"date": date.today().isoformat(), "runs": runs, "extra": extra, "sets": {},
               "train_steps": {k: int(v["step"][-1]) for k, v in logs.items()}}
    lines = [f"# Similarity ablation, {args.title}: content vs MI over training seeds", "",
             "Written by `training/experiments/similarity_ablation/scripts/seeds_report.py` on "
             f"{summary['date']} from the `msode-eval` "
             f"results in {', '.join(f'`{e}`' for e in evs)}. Headline runs (content : MI, one pair per training seed): "
             + ", ".join(f"`{a}` : `{b}`" for a, b in runs)
             + (". Secondary: " + ", ".join(f"`{a}` : `{b}`" for a, b in extra) if extra else "") + ".", ""]
    if args.criterion:
        lines += ["## Criterion", ""] + ["> " + ln for ln in Path(args.criterion).read_text().strip().splitlines()]
        lines.append("")
    lines += ["## Result", "",
              "RMSE(φ) in mm over the fixed brain; Δ = content − MI per test pair (negative: content better); "
              "HL: Hodges-Lehmann estimate of Δ with its distribution-free 95 % interval (inverts the Wilcoxon "
              "signed-rank test); better / worse: pairs where content is better / worse by more than the tie "
              "tolerance (for the seed-to-seed and secondary rows: the first / the second run named).", "",
              "| evaluation set | comparison | median content / MI | HL Δ [95 % CI] | content better / worse / tied "
              "| Wilcoxon p | within margin |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    per_set = {}
    margin = None
    for name, desc in SETS.items():
        rep = merged_results([e / name / "results.json" for e in evs])
        if rep is None:
            lines.append(f"| `{name}` | not evaluated (no {name}/results.json) | | | | | |")
            continue
        ni = non_inferiority(rep, runs, margin=args.margin)
        margin = ni.margin
        rows = rep["rows"]
        d_mean = np.asarray(ni.diffs)
        med_c = float(np.median(np.mean([[r["rmse_phi_mm"] for r in rows[a]] for a, _ in runs], axis=0)))
        med_m = float(np.median(np.mean([[r["rmse_phi_mm"] for r in rows[b]] for _, b in runs], axis=0)))
        n = ni.n
        try:
            from scipy.stats import wilcoxon
            p_head = fmt_p(float(wilcoxon(d_mean).pvalue)) if np.any(d_mean != 0) else "n/a"
        except ImportError:
            p_head = "n/a"
        over = f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
        lines.append(f"| `{name}` ({n} pairs) | **headline: mean over {over}** | {med_c:.2f} / {med_m:.2f} "
                     f"| **{ni.shift:+.3f} [{ni.shift_lo:+.3f}, {ni.shift_hi:+.3f}]** "
                     f"| {int((d_mean < -ni.margin).sum())} / {int((d_mean > ni.margin).sum())} / "
                     f"{int((np.abs(d_mean) <= ni.margin).sum())} | {p_head} | **{'yes' if ni.holds else 'no'}** |")
        comps = {}
        for a, b in runs + extra:  # each run alone, by the same test
            one = non_inferiority(rep, [(a, b)], margin=args.margin)
            c = one.per_run[0]
            comps[f"{a}:{b}"] = c
            lines.append(f"| | `{a}` vs `{b}` | {c['median_a']:.2f} / {c['median_b']:.2f} "
                         f"| {c['shift']:+.3f} [{c['shift_lo']:+.3f}, {c['shift_hi']:+.3f}] | {c['a_better']} / "
                         f"{c['b_better']} / {c['ties']} | {fmt_p(c['p_wilcoxon'])} | {'yes' if one.holds else 'no'} |")
        # the same similarity, another training seed: the scale the content - MI differences compare with
        for k in (0, 1):
            for i in range(len(runs)):
                for j in range(i + 1, len(runs)):
                    a, b = runs[i][k], runs[j][k]
                    c = paired_comparison(rep, a, b)
                    comps[f"{a}:{b}"] = asdict(c)
                    lines.append(f"| | seed to seed: `{a}` vs `{b}` | {c.median_a:.2f} / {c.median_b:.2f} "
                                 f"| {c.shift:+.3f} [{c.shift_lo:+.3f}, {c.shift_hi:+.3f}] | {c.a_better} / "
                                 f"{c.b_better} / {c.ties} | {fmt_p(c.p_wilcoxon)} | |")
        success = {m: f"{round(rep['summary'][m]['success_rmse_phi_lt_2mm'] * n)}/{n}" for m in rows
                   if m in rep["summary"] and "success_rmse_phi_lt_2mm" in rep["summary"][m]}
        per_set[name] = {"description": desc, "n_pairs": n, "headline": asdict(ni), "comparisons": comps,
                         "success_lt_2mm": success}
    summary["sets"] = per_set
    summary["margin_mm"] = margin
    lines.append("")
    for name, v in per_set.items():
        lines.append(f"- `{name}`: {v['description']}; success (< 2 mm): "
                     + ", ".join(f"{m} {s}" for m, s in v["success_lt_2mm"].items() if m != "identity") + ".")
    if per_set:
        held = [k for k, v in per_set.items() if v["headline"]["holds"]]
        lines += ["", f"**Within the {margin:g} mm margin on {len(held)} of {len(per_set)} evaluation sets**"
                  + (f" ({', '.join(held)})" if held else "") + ".", ""]
    for fig in _figures(out, per_set, logs, margin if margin is not None else 0.05):
        lines += [f"![{fig}]({fig})", ""]
    if logs:
        lines += ["Training steps: " + ", ".join(f"{k} {v}" for k, v in summary["train_steps"].items())
                  + "; training-pair RMSE(φ), median of the last 50 steps: "
                  + ", ".join(f"{k} {np.median(v['rmse_phi_mm'][-50:]):.2f} mm" for k, v in logs.items()) + ".", ""]
    notes = out / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"wrote {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
