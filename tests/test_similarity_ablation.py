"""Issue 4's similarity ablation: the learned-feature Gauss-Newton architectures it trains, the config's
two arms, and the paired comparison its report is built on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msode_export.analytic import RigidSSDField
from msode_export.pack import level_grids
from msode_sdk.transforms import Grid, RigidTransform, TransformChain
from msode_sdk.warp import warp_chain
from msode_train.evaluate import paired_comparison
from msode_train.models import LearnedFeatures, build_network
from msode_train.train import Trainer, load_config

GRID = Grid((24, 24, 16), (8.0, 8.0, 8.0))


def _blobs(grid: Grid, seed: int = 0) -> torch.Tensor:
    """A smooth random volume (N=1, C=1, D, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(1, 1, *grid.shape_dhw, generator=g)
    for _ in range(3):
        v = torch.nn.functional.avg_pool3d(v, 3, 1, 1)
    return (v - v.min()) / (v.max() - v.min())


def test_learned_features_shape_and_intensity_channel():
    feat = LearnedFeatures(width=4, channels=3, intensity_init=0.5)
    x = torch.rand(2, 1, 8, 10, 12)
    y = feat(x)
    assert y.shape == (2, 4, 8, 10, 12)
    torch.testing.assert_close(y[:, :1], 0.5 * x)


def test_feature_gn_with_silent_learned_channels_is_the_intensity_gauss_newton_step():
    """With the learned channels' output weights at zero and intensity gain 1, the features are
    (image, 0, 0, 0): zero channels add nothing to the normal equations, so the field must equal the
    analytic intensity-SSD field exactly."""
    lg = level_grids(GRID, 3)[2]
    net = build_network("rigid_feature_gn", lg, GRID, {}, width=4, channels=3, intensity_init=1.0)
    with torch.no_grad():
        net.residual.features.out.weight.zero_()
    ref = RigidSSDField(lg)
    fixed = _blobs(lg, 1)
    theta = torch.tensor([[0.05, -0.03, 0.02, 4.0, -3.0, 2.0]])
    warped = warp_chain(fixed, lg, TransformChain([RigidTransform(theta)]), lg)
    t = torch.zeros(1)
    torch.testing.assert_close(net(warped, fixed, t), ref(warped, fixed, t), rtol=1e-5, atol=1e-6)


def test_feature_gn_step_has_gradients_in_every_learned_layer():
    """The reason the learned channels do not start at zero: a Gauss-Newton step's derivative with respect
    to an identically zero feature channel is zero. At the shipped initialisation every parameter of the
    feature CNN gets a gradient from a loss on the step."""
    lg = level_grids(GRID, 3)[1]
    torch.manual_seed(0)
    net = build_network("rigid_feature_gn", lg, GRID, {}, width=4, channels=3, intensity_init=0.0)
    fixed = _blobs(lg, 2)
    warped = warp_chain(fixed, lg, TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, 0.1, 6.0, 0.0, 0.0]]))]), lg)
    v = net(warped, fixed, torch.zeros(1))
    assert torch.isfinite(v).all()
    (v**2).sum().backward()
    for name, p in net.named_parameters():
        if name.endswith("intensity_gain"):
            # the zero intensity channel is the documented exception: it stays off for good
            assert p.grad is not None and float(p.grad.abs().max()) == 0
        elif ".film.0." in name:
            # behind the zero-initialised FiLM output layer: wakes up once that layer has moved
            assert p.grad is not None
        else:
            assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    # with the intensity channel on, its gain learns too
    net = build_network("rigid_feature_gn", lg, GRID, {}, width=4, channels=3, intensity_init=1.0)
    (net(warped, fixed, torch.zeros(1)) ** 2).sum().backward()
    assert float(net.residual.features.intensity_gain.grad.abs()) > 0


@pytest.mark.parametrize("arch", ["rigid_feature_gn", "bspline_feature_gn"])
def test_feature_gn_moves_towards_the_truth_on_a_mono_contrast_pair(arch):
    """Untrained, with the intensity channel on, the step is a descent direction: one Euler step of the
    field reduces the motion of a small known translation."""
    lg = GRID
    params = {"control_spacing_mm": [40.0, 40.0, 40.0]}
    torch.manual_seed(0)
    net = build_network(arch, lg, GRID, params, intensity_init=1.0)
    fixed = _blobs(lg, 3)
    true = torch.tensor([[0.0, 0.0, 0.0, 5.0, -3.0, 2.0]])
    warped = warp_chain(fixed, lg, TransformChain([RigidTransform(true)]), lg)
    v = net(warped, fixed, torch.zeros(1)).detach()
    if arch == "rigid_feature_gn":
        # warped = fixed o (x + t): the velocity that undoes it points against t
        assert float((v[0, 3:] * true[0, 3:]).sum()) < 0
    else:
        mean_disp = v.mean(dim=(2, 3, 4))[0]  # control-point velocity (x, y, z), mm
        assert float((mean_disp * true[0, 3:]).sum()) < 0


def test_ablation_arms_differ_only_in_the_similarity(tmp_path):
    cfgs = {
        sim: load_config("rigid_4mm_feature_gn", [f"loss.sim={sim}", f"train.out_dir={tmp_path / sim}"])
        for sim in ("content", "mi")
    }
    a, b = cfgs["content"], cfgs["mi"]
    assert a["loss"]["sim"] == "content" and b["loss"]["sim"] == "mi"
    for c in (a, b):
        c["loss"].pop("sim")
        c["train"].pop("out_dir")
    assert a == b
    assert a["stages"][0]["arch"] == "rigid_feature_gn"
    assert a["loss"]["lambda_self"] == 0.0  # the similarity is the only training signal


def test_both_arms_start_from_the_same_weights_and_see_the_same_pairs(tmp_path, monkeypatch):
    """One step of each arm on a tiny grid: identical initial networks and batches, finite losses, and
    different parameter updates (the similarity is what differs)."""
    monkeypatch.setenv("MSODE_BANK", str(tmp_path / "bank"))
    trainers = {}
    for sim in ("content", "mi"):
        cfg = load_config(
            "rigid_4mm_feature_gn",
            [
                f"loss.sim={sim}",
                f"train.out_dir={tmp_path / sim}",
                "model.spacing_mm=16.0",
                "model.levels=2",
                "stages.0.schedule=[{solver: euler, step_size: 0.5}, {solver: euler, step_size: 0.5}]",
                "data.n_train=2",
                "train.batch_size=1",
                "train.progress=false",
                "export.plan=false",
            ],
        )
        trainers[sim] = Trainer(cfg, resume=False)
    sa, sb = (trainers[s].model.state_dict() for s in ("content", "mi"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = {s: tr.train_step() for s, tr in trainers.items()}
    assert rows["content"]["rmse_phi_mm"] == pytest.approx(rows["mi"]["rmse_phi_mm"])  # same pairs, same start
    for r in rows.values():
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    sa, sb = (trainers[s].model.state_dict() for s in ("content", "mi"))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------- paired comparison


def _multi_report(cols: dict, metric="rmse_phi_mm"):
    return {"rows": {m: [{"pair": i, metric: float(v)} for i, v in enumerate(vals)] for m, vals in cols.items()}}


def _report(a_vals, b_vals, metric="rmse_phi_mm"):
    return _multi_report({"a": a_vals, "b": b_vals}, metric)


def test_paired_comparison_counts_wins_ties_and_exact_sign_test():
    a = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    b = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.01, 2.03]  # a better by 1 mm on 8, tied (< 0.05) on 2
    c = paired_comparison(_report(a, b), "a", "b")
    assert (c.a_better, c.b_better, c.ties, c.n) == (8, 0, 2, 10)
    assert c.p_sign == pytest.approx(2 / 2**8)
    assert c.median_diff == pytest.approx(-1.0)
    assert c.p_wilcoxon is not None and c.p_wilcoxon < 0.05
    flipped = paired_comparison(_report(a, b), "b", "a")
    assert (flipped.a_better, flipped.b_better) == (0, 8)


def test_paired_comparison_dice_is_higher_is_better():
    c = paired_comparison(_report([0.9, 0.8, 0.7], [0.5, 0.5, 0.5], "dice_tumour"), "a", "b", "dice_tumour")
    assert c.higher_is_better and c.a_better == 3 and c.b_better == 0
    assert c.p_sign == pytest.approx(0.25)


def test_paired_comparison_identical_methods_and_errors():
    c = paired_comparison(_report([1.0, 2.0], [1.0, 2.0]), "a", "b")
    assert (c.ties, c.p_wilcoxon, c.p_sign) == (2, None, 1.0)
    with pytest.raises(KeyError, match="methods"):
        paired_comparison(_report([1.0], [1.0]), "a", "sitk")
    rep = _report([1.0, 2.0], [1.0, 2.0])
    rep["rows"]["b"][1]["pair"] = 5
    with pytest.raises(ValueError, match="same pairs"):
        paired_comparison(rep, "a", "b")


def test_similarity_at_a_finer_spacing_than_the_ode(tmp_path, monkeypatch):
    """``loss.sim_spacing_mm``: the ODE runs on the model grid, L_sim on the same pairs rendered at the
    finer spacing (same subjects, contrasts and motions; the rng sequence is untouched)."""
    monkeypatch.setenv("MSODE_BANK", str(tmp_path / "bank"))
    base = [
        "loss.sim=mi",
        "model.spacing_mm=16.0",
        "model.levels=2",
        "stages.0.schedule=[{solver: euler, step_size: 0.5}, {solver: euler, step_size: 0.5}]",
        "data.n_train=2",
        "train.batch_size=2",
        "train.progress=false",
    ]
    coarse = Trainer(load_config("rigid_4mm_feature_gn", base + [f"train.out_dir={tmp_path / 'a'}"]), resume=False)
    fine = Trainer(
        load_config("rigid_4mm_feature_gn", base + [f"train.out_dir={tmp_path / 'b'}", "loss.sim_spacing_mm=8.0"]),
        resume=False,
    )
    assert fine.sim_grid.shape_xyz == (30, 30, 20) and coarse.sim_grid == coarse.model_grid
    bc, bf = coarse.sample_batch(), fine.sample_batch()
    assert bc["sim_pairs"] == [] and len(bf["sim_pairs"]) == 2
    for pc, pf, ps in zip(bc["pairs"], bf["pairs"], bf["sim_pairs"]):
        assert (pc.subject_id, pc.moving_contrast, pc.fixed_contrast) == (
            ps.subject_id,
            ps.moving_contrast,
            ps.fixed_contrast,
        )
        assert torch.equal(pc.chain.transforms[0].state, pf.chain.transforms[0].state)
        assert torch.equal(ps.chain.transforms[0].state, pf.chain.transforms[0].state)
        assert tuple(ps.fixed.shape[2:]) == (20, 30, 30)
        torch.testing.assert_close(pc.moving, pf.moving)
    tc, tf = coarse.compute_losses(bc), fine.compute_losses(bf)
    assert torch.isfinite(tf["loss"]) and float(tf["sim"]) != float(tc["sim"])
    torch.testing.assert_close(tf["rmse_phi"], tc["rmse_phi"])  # the ODE itself saw the same 16 mm pairs


def test_signed_rank_null_distribution_matches_the_tables():
    from msode_train.evaluate import _signed_rank_cdf

    cdf = _signed_rank_cdf(10)
    assert cdf[-1] == pytest.approx(1.0) and len(cdf) == 56
    # n = 10: P(T+ <= 8) = 25 / 1024, P(T+ <= 9) = 33 / 1024 (the usual 5 % two-sided table value is 8)
    assert cdf[8] == pytest.approx(25 / 1024) and cdf[9] == pytest.approx(33 / 1024)
    assert cdf[0] == pytest.approx(1 / 1024)


def test_shift_estimate_known_answers():
    from msode_train.evaluate import shift_estimate

    d = np.arange(1.0, 11.0)  # symmetric about 5.5: the HL estimate is 5.5
    est, lo, hi = shift_estimate(d)
    i, j = np.triu_indices(10)
    walsh = np.sort((d[i] + d[j]) / 2)
    assert est == pytest.approx(5.5)
    assert (lo, hi) == (walsh[8], walsh[46])  # c = 8: the 9th smallest and 9th largest of 55
    est2, lo2, hi2 = shift_estimate(d + 3.0)  # equivariant under a shift
    assert (est2, lo2, hi2) == pytest.approx((est + 3, lo + 3, hi + 3))
    assert shift_estimate(d, 0.80)[1] > lo  # a lower level gives a narrower interval
    _, lo5, hi5 = shift_estimate(np.arange(5.0))  # n = 5: P(T+ = 0) = 1/32 > 2.5 %, no 95 % interval
    assert lo5 == -np.inf and hi5 == np.inf
    # large n: the normal approximation agrees with the exact interval at the switch-over
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 1.0, 301)
    _, lo_a, hi_a = shift_estimate(x)
    _, lo_e, hi_e = shift_estimate(x[:300])
    assert abs(lo_a - lo_e) < 0.05 and abs(hi_a - hi_e) < 0.05 and lo_a < 0.2 < hi_a
    with pytest.raises(ValueError):
        shift_estimate([1.0, np.nan])


def test_shift_interval_coverage_on_simulated_pairs():
    from msode_train.evaluate import shift_estimate

    rng = np.random.default_rng(1)
    hits = sum(lo <= 0.3 <= hi for _, lo, hi in (shift_estimate(rng.laplace(0.3, 1.0, 24)) for _ in range(400)))
    assert 0.92 <= hits / 400 <= 0.99  # nominal 95 %, exact interval is slightly conservative


def test_paired_comparison_reports_the_shift():
    a, b = [1.0, 1.2, 0.9, 1.4, 1.1, 1.3, 1.0, 0.8], [1.1, 1.25, 1.0, 1.5, 1.2, 1.35, 1.1, 0.9]
    c = paired_comparison(_report(a, b), "a", "b")
    assert c.shift == pytest.approx(-0.1, abs=0.03) and c.shift_lo <= c.shift <= c.shift_hi < 0
    failed = paired_comparison(_report(a, b[:-1] + [float("inf")]), "a", "b")  # counts still work, no shift
    assert failed.a_better == 8 and np.isnan(failed.shift)


def test_non_inferiority_pools_runs_and_checks_the_margin():
    from msode_train.evaluate import non_inferiority

    rng = np.random.default_rng(3)
    b0, b1 = rng.uniform(0.3, 0.6, 24), rng.uniform(0.3, 0.6, 24)
    # a is worse by 0.01 mm in one run and better by 0.01 in the other: averaged, no difference
    near = non_inferiority(
        _multi_report({"a0": b0 + 0.01, "b0": b0, "a1": b1 - 0.01, "b1": b1}), [("a0", "b0"), ("a1", "b1")]
    )
    assert near.holds and near.margin == 0.05 and near.n == 24
    assert near.shift == pytest.approx(0.0, abs=1e-12) and len(near.per_run) == 2
    assert near.per_run[0]["shift"] == pytest.approx(0.01)
    # worse by 0.2 mm everywhere: not within 0.05 mm
    far = non_inferiority(_multi_report({"a0": b0 + 0.2, "b0": b0}), [("a0", "b0")])
    assert not far.holds and far.shift == pytest.approx(0.2)
    # the same difference passes a wider margin; better everywhere passes any margin
    assert non_inferiority(_multi_report({"a0": b0 + 0.2, "b0": b0}), [("a0", "b0")], margin=0.3).holds
    assert non_inferiority(_multi_report({"a0": b0 - 0.5, "b0": b0}), [("a0", "b0")], margin=0.0).holds
    with pytest.raises(ValueError):
        non_inferiority(_multi_report({"a0": b0, "b0": b0}), [])
    with pytest.raises(KeyError):
        non_inferiority(_multi_report({"a0": b0, "b0": b0}), [("a0", "c")])


def test_seeds_report_reads_every_number_from_the_results(tmp_path, monkeypatch):
    """The seeds report (training/experiments/similarity_ablation/scripts/seeds_report.py, run as a module from
    the repository root) on synthetic msode-eval folders: content worse by a constant 0.2 mm on one set
    (outside the 0.05 mm margin), equal on average over two seeds on another."""
    import json
    import runpy
    import sys
    from pathlib import Path

    rng = np.random.default_rng(5)
    evs = (tmp_path / "eval_s0", tmp_path / "eval_s1")  # seed 1 evaluated later, in another folder
    for name, offsets in {"rigid_paper": (0.2, 0.2), "rigid_moderate": (0.01, -0.01)}.items():
        for s, off in enumerate(offsets):
            mi = rng.uniform(0.3, 0.6, 24)
            cols = {f"mi_s{s}": mi, f"content_s{s}": mi + off}
            rows = {
                m: [{"pair": i, "subject": f"synth{10000 + i}", "rmse_phi_mm": float(v)} for i, v in enumerate(vals)]
                for m, vals in cols.items()
            }
            summary = {m: {"success_rmse_phi_lt_2mm": 1.0} for m in cols}
            (evs[s] / name).mkdir(parents=True)
            (evs[s] / name / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the repository root, as `python -m`
    module = "training.experiments.similarity_ablation.scripts.seeds_report"
    out = tmp_path / "report"

    def run(*extra, runs=("content_s0:mi_s0", "content_s1:mi_s1")):
        monkeypatch.setattr(sys, "argv", [module, "--eval", *map(str, evs), "--runs", *runs, "--out", str(out), *extra])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__")
        return exit_info.value.code

    assert run() == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["margin_mm"] == 0.05
    paper, moderate = summary["sets"]["rigid_paper"]["headline"], summary["sets"]["rigid_moderate"]["headline"]
    assert paper["shift"] == pytest.approx(0.2) and not paper["holds"]
    assert moderate["shift"] == pytest.approx(0.0, abs=1e-9) and moderate["holds"]
    text = (out / "README.md").read_text()
    assert "rigid_t2_t1" in text and "not evaluated" in text  # a missing set is said, not skipped
    assert "Within the 0.05 mm margin on 1 of 2 evaluation sets** (rigid_moderate)" in text
    assert (out / "fig_differences.png").stat().st_size > 0
    # a later evaluation that drew other test pairs is refused, not silently paired
    bad = json.loads((evs[1] / "rigid_paper" / "results.json").read_text())
    bad["rows"]["mi_s1"][0]["subject"] = bad["rows"]["content_s1"][0]["subject"] = "synth99999"
    (evs[1] / "rigid_paper" / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="other test pairs"):
        run()
    # the same label in two folders: identical results merge, different ones are refused
    (evs[1] / "rigid_paper" / "results.json").unlink()
    (evs[1] / "rigid_moderate" / "results.json").write_text((evs[0] / "rigid_moderate" / "results.json").read_text())
    merged = runpy.run_module(module)["merged_results"]([e / "rigid_moderate" / "results.json" for e in evs])
    assert set(merged["rows"]) == {"mi_s0", "content_s0"}
    again = json.loads((evs[0] / "rigid_moderate" / "results.json").read_text())
    again["rows"]["mi_s0"][3]["rmse_phi_mm"] += 0.1
    (evs[1] / "rigid_moderate" / "results.json").write_text(json.dumps(again))
    with pytest.raises(ValueError, match="label the plans apart"):
        run(runs=("content_s0:mi_s0",))
