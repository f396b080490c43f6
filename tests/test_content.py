"""msode_train.content: translation networks, losses, trainer, E3D similarity and its invariance.

Tiny networks and 4 mm subjects keep this file fast; the invariance test uses the committed weights
on one held-out 2 mm subject.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from msode_sdk.transforms import Grid
from msode_train import content as C
from msode_train import data as D

TINY = C.ContentConfig(base_channels=8, content_dim=16, n_res=1, style_dim=4, critic_channels=8)


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory):
    bank = D.SubjectBank(tmp_path_factory.mktemp("bank"), n_subjects=2, seed=1, spacing=4.0)
    bank.ensure()
    return bank


def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return C.TranslationModel(cfg)


# ------------------------------------------------------------------------------------------ networks


def test_shapes():
    m = _model()
    x = torch.rand(3, 5, 32, 40)
    mod = torch.tensor([0, 1, 3])
    c = m.enc_c(x)
    s = m.enc_s(x, mod)
    assert c.shape == (3, TINY.content_dim, 8, 10)
    assert s.shape == (3, TINY.style_dim)
    y = m.gen(c, s, mod)
    assert y.shape == x.shape and 0.0 <= float(y.detach().min()) and float(y.detach().max()) <= 1.0
    assert C.Critic(TINY)(x, mod).shape == (3, 1, 4, 5)
    # translate pads odd sizes and crops back
    assert m.translate(torch.rand(1, 5, 30, 45), torch.rand(1, 5, 30, 45), "flair").shape == (1, 5, 30, 45)
    # fixed scale: every channel of the content code has zero mean, unit variance over the slice
    c = c.detach()
    torch.testing.assert_close(c.mean((2, 3)), torch.zeros(3, TINY.content_dim), atol=1e-4, rtol=0)
    assert float((c.var((2, 3), unbiased=False) - 1).abs().max()) < 0.05


@torch.no_grad()
def test_modality_conditioning():
    m = _model()
    x = torch.rand(2, 5, 32, 32)
    c = m.enc_c(x)
    s = torch.randn(2, TINY.style_dim)
    y0 = m.gen(c, s, torch.tensor([0, 0]))
    y1 = m.gen(c, s, torch.tensor([1, 1]))
    assert float((y0 - y1).abs().max()) > 1e-4, "the one-hot modality code must change the generator output"
    s0, s2 = m.enc_s(x, torch.tensor([0, 0])), m.enc_s(x, torch.tensor([2, 2]))
    assert float((s0 - s2).abs().max()) > 1e-6, "the one-hot modality code must change the style code"
    # the content encoder takes no modality: same input, same code
    torch.testing.assert_close(m.enc_c(x), c)


def test_finite_gradients_on_empty_slices():
    """All-zero stacks (slices outside the brain) must give finite, bounded content gradients."""
    m = _model(C.ContentConfig())
    z = torch.zeros(2, 5, 32, 32, requires_grad=True)
    loss = ((m.enc_c(z) - m.enc_c(torch.rand(2, 5, 32, 32))) ** 2).mean()
    loss.backward()
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().max()) < 1e3


# --------------------------------------------------------------------------------------------- losses


def test_loss_terms_finite_and_decreasing(tiny_bank):
    torch.manual_seed(0)
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=0, seed=0)
    batch = pool.draw(4, crop=32)
    m = _model()
    critic = C.Critic(TINY)
    w = C.LossWeights()
    out = C.translation_losses(m, *batch, w, critic)
    names = ("cycle", "content", "style", "image", "paired_content", "paired_translation", "adv", "total")
    for k in names:
        assert torch.isfinite(out[k]), k
    d = C.critic_loss(critic, batch[0], batch[1], batch[2], batch[3], out["x_ab"], out["x_ba"], w)
    assert all(torch.isfinite(v) for v in d.values())
    # a few generator steps on one batch (reconstruction terms, no adversary) must lower every L1 term
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    w0 = C.LossWeights(adv=0.0)
    first = {k: float(v.detach()) for k, v in C.translation_losses(m, *batch, w0).items() if k in names}
    for _ in range(25):
        o = C.translation_losses(m, *batch, w0)
        opt.zero_grad()
        o["total"].backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in C.translation_losses(m, *batch, w0).items() if k in names}
    assert last["total"] < 0.7 * first["total"], (first, last)
    for k in ("cycle", "image", "paired_translation"):
        assert last[k] < first[k], (k, first[k], last[k])


def test_gradient_penalty_is_one_for_a_unit_slope_critic():
    class Lin(torch.nn.Module):
        def forward(self, x, mod):  # D(x) = sum(x) / sqrt(numel): gradient norm exactly 1
            return x.flatten(1).sum(1) / math.sqrt(x[0].numel())

    real, fake = torch.rand(3, 5, 8, 8), torch.rand(3, 5, 8, 8)
    gp = C.gradient_penalty(Lin(), real, fake, torch.zeros(3, dtype=torch.long))
    assert float(gp) < 1e-8


def test_trainer_runs_checkpoints_and_resumes(tiny_bank, tmp_path):
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=0)
    cfg = C.TrainConfig(steps=4, batch=2, crop=32, ckpt_every=2, sample_every=0, log_every=1)
    val = C.validation_examples(tiny_bank[0])[:1]
    tr = C.ContentTrainer(pool, tmp_path, cfg, TINY, val_batch=val, progress=False)
    s = tr.run()
    assert s["steps"] == 4 and (tmp_path / "ckpt.pt").exists()
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    hist = tr.history
    assert len(hist) == 4 and all(math.isfinite(h["total"]) and math.isfinite(h["d_total"]) for h in hist)
    # resume: a new trainer picks up at step 4 and continues to 6
    cfg2 = C.TrainConfig(steps=6, batch=2, crop=32, ckpt_every=2, sample_every=0, log_every=1)
    tr2 = C.ContentTrainer(pool, tmp_path, cfg2, TINY, progress=False)
    assert tr2.step == 4
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(tr2.model.state_dict()[k], v)
    assert tr2.run()["steps"] == 6
    # weights file round trip (weights_only loadable)
    path = C.save_weights(tr2.model, tmp_path / "w.pt", {"steps": 6})
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "msode-content" and blob["meta"]["steps"] == 6
    m = C.load_translation_model(path)
    x = torch.rand(1, 5, 32, 32)
    torch.testing.assert_close(m.enc_c(x), tr2.model.eval().enc_c(x))


def test_slice_pool_pairs_are_aligned(tiny_bank):
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=0, gamma=0.0, seed=3)
    for axis in range(3):
        xa, a, xb, b = pool.draw(3, axis=axis, crop=None)
        assert xa.shape == xb.shape and xa.shape[1] == 5 and xa.shape[2] % 8 == 0 and xa.shape[3] % 8 == 0
        assert (a != b).all()
        # same anatomy: brain masks of both contrasts coincide (background is exactly 0 in both)
        ma, mb = xa > 0.02, xb > 0.02
        inter = (ma & mb).sum().item()
        union = (ma | mb).sum().item()
        assert inter / max(union, 1) > 0.8


def test_draw_batch_keeps_the_draw_stream_and_shifts_xa(tiny_bank):
    """``draw_batch(shift_vox=0)`` is ``draw``; with shifts, ``xa_plus``/``xa_minus`` are ``x_a`` moved by
    ``+-delta`` (identical flips and gamma), so their mean is close to ``x_a`` for small offsets."""
    p1 = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=4)
    p2 = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=4)
    for _ in range(4):
        xa, a, xb, b = p1.draw(2, crop=16)
        pb = p2.draw_batch(2, crop=16)
        assert pb.xa_plus is None and pb.delta_vox is None
        for u, v in ((xa, pb.xa), (a, pb.a), (xb, pb.xb), (b, pb.b)):
            torch.testing.assert_close(u, v)
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=0, seed=2)
    pb = pool.draw_batch(3, crop=16, shift_vox=0.5)
    assert pb.xa_plus.shape == pb.xa.shape == pb.xa_minus.shape and pb.delta_vox.shape == (3, 3)
    norms = pb.delta_vox.norm(dim=1)
    assert bool(((norms >= 0.125 - 1e-6) & (norms <= 0.5 + 1e-6)).all())
    assert float((pb.xa_plus - pb.xa_minus).abs().max()) > 1e-3  # really moved
    # small offsets of the same contrast: much closer to x_a than the other contrast is
    assert float((pb.xa_plus - pb.xa).abs().mean()) < 0.5 * float((pb.xb - pb.xa).abs().mean())


def test_shifted_stack_matches_integer_shifts():
    vol = torch.rand(12, 13, 14)
    win = (2, 3, 6, 7)
    for axis in range(3):
        ref = C.extract_stacks(vol[None, None], axis, torch.tensor([6]))[0]
        torch.testing.assert_close(C.slices._shifted_stack(vol, axis, 6, win, np.zeros(3)), ref[:, 2:8, 3:10])
        # +1 voxel along the stack axis = the stack one slice further
        d = np.zeros(3)
        d[axis] = 1.0
        ref7 = C.extract_stacks(vol[None, None], axis, torch.tensor([7]))[0]
        torch.testing.assert_close(C.slices._shifted_stack(vol, axis, 6, win, d), ref7[:, 2:8, 3:10])
        # +1 voxel along the first in-plane axis = the window one row further
        d = np.zeros(3)
        d[[ax for ax in range(3) if ax != axis][0]] = 1.0
        torch.testing.assert_close(C.slices._shifted_stack(vol, axis, 6, win, d), ref[:, 3:9, 3:10])
    # half a voxel: the mean of the two neighbours (trilinear)
    d = np.array([0.0, 0.0, 0.5])
    ref = C.extract_stacks(vol[None, None], 0, torch.tensor([6]))[0]
    torch.testing.assert_close(
        C.slices._shifted_stack(vol, 0, 6, win, d), 0.5 * (ref[:, 2:8, 3:10] + ref[:, 2:8, 4:11])
    )


def test_shift_symmetry_term():
    """``|d(+) - d(-)|``: zero for equal copies, positive when one side is closer, and differentiable."""
    m = _model()
    xb = torch.rand(2, 5, 16, 16)
    cb = m.enc_c(xb)
    same = torch.rand(2, 5, 16, 16)
    out = C.shift_symmetry(m.enc_c, cb, same, same.clone(), ca=m.enc_c(same))
    assert float(out["shift_symmetry"]) < 1e-7 and set(out) == {"shift_symmetry", "d_shift", "d_aligned", "shift_drift"}
    out = C.shift_symmetry(m.enc_c, cb, xb.clone(), torch.rand(2, 5, 16, 16))  # d(+) = 0, d(-) > 0
    torch.testing.assert_close(out["shift_symmetry"], out["d_shift"] * 2)
    out["shift_symmetry"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.enc_c.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.enc_c.parameters())


def test_shift_drift_is_slope_over_curvature():
    """A code linear in the shift, ``c(s) = s v``, against ``c_b = s* v``: ``d(s) = (s - s*)^2 |v|^2 / n``, a
    parabola with its minimum at ``s*``; the term must give ``|s*|`` back as ``shift_drift * delta / 2``."""
    identity = lambda x: x  # noqa: E731 - the codes are given directly
    v = torch.randn(3, 8)
    for s_star, delta in ((0.3, 1.0), (-0.2, 0.5), (0.0, 1.5)):
        cb = s_star * v
        out = C.shift_symmetry(identity, cb, delta * v, -delta * v, ca=0.0 * v)
        assert abs(float(out["shift_drift"]) * delta / 2 - abs(s_star)) < 1e-5
    # a code that does not see the shift has no curvature: the ratio is bounded by eps, not infinite
    flat = C.shift_symmetry(identity, v + 1.0, v.clone(), v.clone(), ca=v.clone())
    assert float(flat["shift_drift"]) == 0.0
    # no ca (no d(0)): only the slope and d_shift
    assert set(C.shift_symmetry(identity, cb, v, -v)) == {"shift_symmetry", "d_shift"}


def test_trainer_with_shift_symmetry_logs_the_term(tiny_bank, tmp_path):
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=0, seed=0)
    cfg = C.TrainConfig(
        steps=2,
        batch=2,
        crop=16,
        ckpt_every=10,
        sample_every=0,
        log_every=1,
        shift_vox=1.0,
        weights=C.LossWeights(shift_symmetry=5.0),
    )
    tr = C.ContentTrainer(pool, tmp_path, cfg, TINY, progress=False)
    tr.run()
    assert all(math.isfinite(h["shift_symmetry"]) and h["d_shift"] >= 0 for h in tr.history)
    # the slope-over-curvature term alone also draws the shifted copies and is logged
    cfg_d = C.TrainConfig(
        steps=2,
        batch=2,
        crop=16,
        ckpt_every=10,
        sample_every=0,
        log_every=1,
        shift_vox=1.0,
        weights=C.LossWeights(shift_drift=1.0),
    )
    tr_d = C.ContentTrainer(pool, tmp_path / "drift", cfg_d, TINY, progress=False)
    tr_d.run()
    assert all(math.isfinite(h["shift_drift"]) and h["shift_drift"] >= 0 for h in tr_d.history)
    # without the term, neither the copies nor the term appear
    cfg0 = C.TrainConfig(steps=1, batch=2, crop=16, ckpt_every=10, sample_every=0, log_every=1)
    tr0 = C.ContentTrainer(pool, tmp_path / "plain", cfg0, TINY, progress=False)
    tr0.run()
    assert "shift_symmetry" not in tr0.history[-1] and "g_norm" not in tr0.history[-1]


def test_trainer_clips_the_generator_gradient(tiny_bank, tmp_path):
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=0, seed=0)
    cfg = C.TrainConfig(steps=1, batch=2, crop=16, ckpt_every=10, sample_every=0, log_every=1, grad_clip=1e-3)
    tr = C.ContentTrainer(pool, tmp_path, cfg, TINY, progress=False)
    xa, a, xb, b = pool.draw(2, crop=16)
    logs = tr.train_step(xa, a, xb, b)
    assert logs["g_norm"] > 1e-3  # the raw norm is logged; what the optimiser saw was clipped
    grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) <= 1e-3 * 1.01


# ------------------------------------------------------------------------------------------ slicing


def test_extract_stacks_axes():
    vol = torch.arange(2 * 1 * 9 * 10 * 11, dtype=torch.float32).view(2, 1, 9, 10, 11)
    c = torch.tensor([3, 5])
    ax = C.extract_stacks(vol, 0, c)
    assert ax.shape == (4, 5, 10, 11)
    torch.testing.assert_close(ax[1], vol[0, 0, 3:8])  # sample 0, centre 5
    torch.testing.assert_close(ax[2], vol[1, 0, 1:6])  # sample 1, centre 3
    co = C.extract_stacks(vol, 1, c)
    assert co.shape == (4, 5, 9, 11)
    torch.testing.assert_close(co[0], vol[0, 0, :, 1:6, :].permute(1, 0, 2))
    sa = C.extract_stacks(vol, 2, c)
    assert sa.shape == (4, 5, 9, 10)
    torch.testing.assert_close(sa[3], vol[1, 0, :, :, 3:8].permute(2, 0, 1))


def test_slice_positions_deterministic_and_spread():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p1 = C.sample_slice_positions((80, 120, 120), 24, g1)
    p2 = C.sample_slice_positions((80, 120, 120), 24, g2)
    assert [a for a, _ in p1] == [0, 1, 2] and sum(c.numel() for _, c in p1) == 24
    for (a1, c1), (a2, c2) in zip(p1, p2):
        assert torch.equal(c1, c2)
    for axis, c in p1:
        n = (80, 120, 120)[axis]
        assert int(c.min()) >= 2 and int(c.max()) <= n - 3
        assert int(c.min()) >= int(n * 0.15) - 1 and int(c.max()) <= n - int(n * 0.15)
    p3 = C.sample_slice_positions((80, 120, 120), 24, torch.Generator().manual_seed(6))
    assert any(not torch.equal(x[1], y[1]) for x, y in zip(p1, p3))
    assert sum(c.numel() for _, c in C.sample_slice_positions((20, 20, 20), 7)) == 7


def test_e3d_deterministic_under_seed():
    enc = _model().enc_c
    torch.manual_seed(1)
    a, b = torch.rand(1, 1, 24, 28, 32), torch.rand(1, 1, 24, 28, 32)
    s1 = C.ContentSimilarity(enc, n_slices=6, seed=3)
    s2 = C.ContentSimilarity(enc, n_slices=6, seed=3)
    seq1 = [float(s1(a, b)) for _ in range(3)]
    seq2 = [float(s2(a, b)) for _ in range(3)]
    assert seq1 == seq2
    assert len(set(seq1)) == 3, "resample=True draws new positions each call"
    s1.reset()
    assert float(s1(a, b)) == seq1[0]
    fixed = C.ContentSimilarity(enc, n_slices=6, seed=3, resample=False)
    assert len({float(fixed(a, b)) for _ in range(3)}) == 1
    assert float(fixed(a, b)) == seq1[0]
    # an explicit generator overrides the internal sequence
    v1 = float(s1(a, b, generator=torch.Generator().manual_seed(9)))
    v2 = float(s2(a, b, generator=torch.Generator().manual_seed(9)))
    assert v1 == v2
    # identical images: zero distance; batch reduction 'none'
    assert float(s1(a, a)) == 0.0
    sn = C.ContentSimilarity(enc, n_slices=6, seed=3, reduction="none")
    out = sn(torch.cat([a, b]), torch.cat([b, b]))
    assert out.shape == (2,) and float(out[1]) == 0.0 and float(out[0]) > 0
    torch.testing.assert_close(out[0], C.ContentSimilarity(enc, n_slices=6, seed=3)(a, b))


def test_similarity_gradient_flows_to_warped_only():
    enc = _model().enc_c
    sim = C.ContentSimilarity(enc, n_slices=6, seed=0)
    torch.manual_seed(0)
    warped = torch.rand(2, 1, 20, 24, 28, requires_grad=True)
    fixed = torch.rand(2, 1, 20, 24, 28)
    loss = sim(warped, fixed)
    loss.backward()
    assert warped.grad is not None and torch.isfinite(warped.grad).all() and float(warped.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in sim.parameters())
    # through a differentiable warp: gradient w.r.t. rigid parameters
    from msode_sdk.transforms import RigidTransform, TransformChain
    from msode_sdk.warp import warp_chain

    grid = Grid((28, 24, 20), (2.0, 2.0, 2.0))
    theta = torch.zeros(1, 6, requires_grad=True)
    w = warp_chain(fixed[:1] * 0 + warped.detach()[:1], grid, TransformChain([RigidTransform(theta)]), grid)
    sim(w, fixed[:1]).backward()
    assert torch.isfinite(theta.grad).all() and float(theta.grad.abs().sum()) > 0


def test_spacing_resample_and_errors():
    enc = _model().enc_c
    sim = C.ContentSimilarity(enc, n_slices=3, seed=0, spacing_mm=4.0, trained_spacing_mm=2.0)
    a = torch.rand(1, 1, 10, 12, 14)
    assert tuple(sim._prepare(a).shape[2:]) == (20, 24, 28)
    assert torch.isfinite(sim(a, torch.rand_like(a)))
    with pytest.raises(ValueError):
        sim(a, torch.rand(1, 1, 10, 12, 15))
    with pytest.raises(ValueError):
        C.ContentSimilarity(enc, n_slices=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        C.content_similarity("no_such_weights")


# ----------------------------------------------------------------------------------- eval helpers


def test_mi_and_curve_helpers():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8, 8)
    mi_self = float(C.linear_binned_mi(x, x)[0])
    mi_inv = float(C.linear_binned_mi(x, 1 - x)[0])
    mi_rand = float(C.linear_binned_mi(x, torch.rand_like(x))[0])
    assert mi_self > 1.0 and abs(mi_self - mi_inv) < 0.05 and mi_rand < 0.5 * mi_self
    v = np.arange(-5, 6, 1.0)
    curve = (v - 0.3) ** 2
    assert abs(C.refine_minimum(v, curve) - 0.3) < 1e-9
    cap = C.capture_range(v, curve)
    assert cap["full"] and cap["left"] == 5 and cap["right"] == 5
    bumpy = np.abs(v).copy()
    bumpy[-2] = 0.5  # a dip at +4
    cap = C.capture_range(v, bumpy)
    assert cap["left"] == 5 and cap["right"] == 3 and cap["both"] == 3 and not cap["full"]


# -------------------------------------------------------------------------------------- invariance


def _weights_available():
    return (C.WEIGHTS_DIR / f"{C.DEFAULT_WEIGHTS}.pt").exists()


def test_committed_weights_small_and_loadable():
    if not _weights_available():
        pytest.skip("committed weights not present yet (train_content.py train, training/experiments/content_encoder)")
    path = C.WEIGHTS_DIR / f"{C.DEFAULT_WEIGHTS}.pt"
    assert path.stat().st_size < 5e6
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "msode-content" and blob["config"]["stack"] == 5
    sim = C.content_similarity(C.DEFAULT_WEIGHTS, n_slices=3)
    assert isinstance(sim, C.ContentSimilarity)
    assert C.content_similarity(str(path), n_slices=3).e3d.encoder is not None
    assert C.content_similarity(None, n_slices=3).name == C.DEFAULT_WEIGHTS  # None -> the default weights
    # every committed content encoder (the reports and ablations name them) is small and loads by name
    for f in sorted(C.WEIGHTS_DIR.glob("*.pt")):
        if torch.load(f, weights_only=True).get("format") != "msode-content":
            continue  # e.g. the tissue encoder
        assert f.stat().st_size < 5e6
        assert C.load_translation_model(f.stem).meta.get("name") == f.stem
    # the registration side's entry point (msode_train.losses.get_similarity) builds it too
    losses = pytest.importorskip("msode_train.losses")
    fn = losses.get_similarity("content")
    a = torch.rand(1, 1, 20, 24, 28)
    assert torch.isfinite(fn(a, torch.rand_like(a)))


@pytest.fixture(scope="module")
def heldout_2mm():
    return D.synthesize_subject(D.SPLIT_SEED_BASE["test"] + 7, spacing=2.0, contrasts=("t1", "t2", "flair"))


@pytest.mark.parametrize("pair,dof", [(("t1", "t2"), 3), (("t2", "flair"), 5)])
def test_invariance_minimum_at_truth(heldout_2mm, pair, dof):
    """Two contrasts of one held-out subject: the content distance is smallest at zero shift."""
    if not _weights_available():
        pytest.skip("committed weights not present yet (train_content.py train, training/experiments/content_encoder)")
    subj = heldout_2mm
    sim = C.content_similarity(n_slices=12, seed=0, resample=False)
    shifts = [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]
    land = C.similarity_landscape(subj.tensor(pair[0]), subj.tensor(pair[1]), subj.grid, sim, shifts, dof, chunk=7)
    d = np.asarray(land["content"])
    assert int(np.argmin(d)) == 3, d
    # monotone towards the truth over +-6 mm
    assert np.all(np.diff(d[:4]) < 0) and np.all(np.diff(d[3:]) > 0), d
    # and contrast-invariant: the aligned cross-contrast distance is well below a 6 mm misalignment
    assert d[3] < 0.7 * min(d[0], d[-1])


def test_one_downsampling_stage_halves_the_code_once(tiny_bank, tmp_path):
    """``n_down=1`` (4 mm code cells at 2 mm, the GPU-trained variant): codes at half the slice size,
    and the trainer runs, checkpoints and exports such a model."""
    cfg_m = C.ContentConfig(base_channels=8, content_dim=16, n_res=1, style_dim=4, critic_channels=8, n_down=1)
    m = C.TranslationModel(cfg_m)
    x = torch.rand(2, 5, 32, 24)
    assert m.enc_c(x).shape == (2, 16, 16, 12)
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=0)
    cfg = C.TrainConfig(
        steps=2, batch=2, crop=32, ckpt_every=2, sample_every=0, log_every=1, weights=C.LossWeights(shift_symmetry=1.0)
    )
    tr = C.ContentTrainer(pool, tmp_path, cfg, cfg_m, progress=False)
    assert tr.run()["steps"] == 2
    path = C.save_weights(tr.model, tmp_path / "w.pt", {"steps": 2})
    assert C.load_translation_model(path).cfg.n_down == 1
    # resuming it with another architecture names the difference (not load_state_dict's key lists)
    other = C.ContentConfig(base_channels=8, content_dim=16, n_res=1, style_dim=4, critic_channels=8, n_down=2)
    with pytest.raises(ValueError, match="n_down: checkpoint 1, asked 2"):
        C.ContentTrainer(pool, tmp_path, cfg, other, progress=False)
    assert C.ContentTrainer(pool, tmp_path, cfg, cfg_m, progress=False).step == 2
    # no architecture given: the checkpoint's own (what `train_content.py export` relies on)
    resumed = C.ContentTrainer(pool, tmp_path, cfg, None, progress=False)
    assert resumed.model.cfg.n_down == 1 and resumed.model.cfg.base_channels == 8 and resumed.step == 2
    assert C.ContentTrainer(pool, tmp_path / "fresh", cfg, None, progress=False).model.cfg == C.ContentConfig()


@pytest.mark.gpu
def test_trainer_resumes_on_cuda(tiny_bank, tmp_path):
    """A CUDA checkpoint resumes on CUDA (torch.load moved the CPU RNG state to the device: it once
    failed with 'RNG state must be a torch.ByteTensor') and on the CPU."""
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=0)
    cfg = C.TrainConfig(steps=2, batch=2, crop=32, ckpt_every=2, sample_every=0, log_every=1)
    assert C.ContentTrainer(pool, tmp_path, cfg, TINY, device="cuda", progress=False).run()["steps"] == 2
    cfg2 = C.TrainConfig(steps=3, batch=2, crop=32, ckpt_every=1, sample_every=0, log_every=1)
    assert C.ContentTrainer(pool, tmp_path, cfg2, TINY, device="cuda", progress=False).run()["steps"] == 3
    assert C.ContentTrainer(pool, tmp_path, cfg2, TINY, device="cpu", progress=False).step == 3


def _train_content_script():
    """training/experiments/content_encoder/scripts/train_content.py as a module."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "training/experiments/content_encoder/scripts/train_content.py"
    spec = importlib.util.spec_from_file_location("train_content_script", script)
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    return tc


def test_train_command_defaults_are_the_library_defaults():
    """`train_content.py train` takes its defaults from TrainConfig, LossWeights, ContentConfig and SlicePool
    (they once disagreed: steps, lr and crop)."""
    a = _train_content_script().build_parser().parse_args(["train"])
    tc, lw, mc = C.TrainConfig(), C.LossWeights(), C.ContentConfig()
    assert (
        a.steps,
        a.batch,
        a.crop or None,
        a.lr,
        a.n_critic,
        a.ckpt_every,
        a.sample_every,
        a.shift_vox,
        a.grad_clip,
        a.seed,
    ) == (
        tc.steps,
        tc.batch,
        tc.crop,
        tc.lr,
        tc.n_critic,
        tc.ckpt_every,
        tc.sample_every,
        tc.shift_vox,
        tc.grad_clip,
        tc.seed,
    )
    assert a.lr == tc.lr_critic  # the script trains both networks at one rate
    assert (
        a.w_adv,
        a.w_cycle,
        a.w_image,
        a.w_paired_content,
        a.w_paired_translation,
        a.w_shift_symmetry,
        a.w_shift_drift,
    ) == (lw.adv, lw.cycle, lw.image, lw.paired_content, lw.paired_translation, lw.shift_symmetry, lw.shift_drift)
    assert (a.channels, a.content_dim, a.n_down, a.spacing) == (
        mc.base_channels,
        mc.content_dim,
        mc.n_down,
        mc.spacing_mm,
    )
    # the committed weights' recipe (their train_meta.json)
    assert (tc.crop, tc.lr, tc.lr_critic) == (64, 3e-4, 3e-4)


def test_export_command_takes_the_architecture_from_the_checkpoint(tiny_bank, tmp_path, monkeypatch):
    """`train_content.py export` (training/experiments/content_encoder/scripts/) re-writes the weights of a
    run's checkpoint with no architecture flags (an n_down=1 run exported with the defaults once failed), and
    refuses flags that contradict it."""
    tc = _train_content_script()
    cfg_m = C.ContentConfig(
        base_channels=8, content_dim=16, n_res=1, style_dim=4, critic_channels=8, n_down=1, spacing_mm=4.0
    )
    run = tmp_path / "run"
    pool = C.SlicePool(tiny_bank, slots=2, refresh_every=3, seed=0)
    C.ContentTrainer(pool, run, C.TrainConfig(steps=1, batch=2, crop=32, sample_every=0), cfg_m, progress=False).run()
    monkeypatch.setattr(tc.D.SubjectBank, "for_split", lambda *a, **k: tiny_bank)  # no phantom generation
    out = tmp_path / "w.pt"
    tc.main(
        [
            "export",
            "--out",
            str(run),
            "--weights-out",
            str(out),
            "--report-dir",
            str(tmp_path / "rep"),
            "--spacing",
            "4",
        ]
    )
    model = C.load_translation_model(out)
    assert model.cfg.n_down == 1 and model.cfg.base_channels == 8
    meta = json.loads((tmp_path / "rep" / "train_meta.json").read_text())
    assert meta["name"] == "w" and meta["steps"] == 1 and meta["data"]["p_rotate"] is None
    with pytest.raises(ValueError, match="n_down: checkpoint 1, asked 2"):
        tc.main(
            [
                "export",
                "--out",
                str(run),
                "--weights-out",
                str(out),
                "--n-down",
                "2",
                "--channels",
                "8",
                "--content-dim",
                "16",
                "--report-dir",
                str(tmp_path / "rep"),
            ]
        )
    with pytest.raises(SystemExit, match="does not exist"):
        tc.main(["export", "--out", str(tmp_path / "nothing"), "--weights-out", str(out)])
