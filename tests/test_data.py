"""msode_train.data: synthetic subjects, bank cache, motions, exact ground truth, metrics, BraTS loader.

Small grids only (4 mm subjects: 60x60x40; one 2 mm subject) so the whole file runs in seconds.
"""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from msode_sdk.io import array_to_tensor, sample_image_at_world, world_points
from msode_sdk.transforms import Grid, RigidTransform, TransformChain
from msode_sdk.warp import warp_chain
from msode_train import data as D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subj():
    return D.synthesize_subject(1, spacing=4.0)


@pytest.fixture(scope="module")
def subj2mm():
    return D.synthesize_subject(2, spacing=2.0)


# ------------------------------------------------------------------------------------------ anatomy


def test_template_is_packaged_in_nilearn():
    d = D.phantoms._template_dir()
    for name in D.phantoms._TEMPLATE_FILES.values():
        assert (d / name).is_file(), f"{name} is not shipped inside nilearn"
    t = D.load_template()
    assert t["gm"].shape == t["wm"].shape == t["mask"].shape == (197, 233, 189)
    assert 0.0 <= t["csf"].min() and t["csf"].max() <= 1.0
    assert 1.5e6 < t["mask"].sum() < 2.2e6  # ~1.9 l of brain at 1 mm


def test_subject_geometry_labels_and_masks(subj, subj2mm):
    assert subj.shape == (60, 60, 40) and subj.spacing == (4.0, 4.0, 4.0)
    assert subj2mm.shape == (120, 120, 80) and subj2mm.grid == Grid((120, 120, 80), (2.0, 2.0, 2.0))
    np.testing.assert_allclose(subj.centre_ras, D.TEMPLATE_CENTRE_RAS, atol=1e-9)
    np.testing.assert_allclose(subj2mm.centre_ras, D.TEMPLATE_CENTRE_RAS, atol=1e-9)
    for s in (subj, subj2mm):
        assert s.contrasts == D.CONTRASTS
        assert s.labels.dtype == np.uint8 and set(np.unique(s.labels)) <= {0, 1, 2, 3, 4, 5}
        assert set(np.unique(s.labels)) >= {0, 1, 2, 3, 4, 5}
        assert s.tumour.any() and not (s.tumour & ~s.brain).any()
        assert np.array_equal(s.brain, s.labels > 0)
        assert 0.05 < s.brain.mean() < 0.35
        for c, img in s.images.items():
            assert img.dtype == np.float32 and img.shape == s.shape
            assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
            assert np.all(img[~s.brain] < 0.6)  # background is (near) zero; partial-volume rim only
            assert img[~s.brain].mean() < 0.02
    # tumour volume in a plausible range (whole tumour of 13-27 mm radius, clipped by the brain)
    vol_ml = subj2mm.tumour.sum() * 8 / 1000
    assert 3 < vol_ml < 120


def _class_means(s, contrast):
    return {k: float(s.images[contrast][s.labels == k].mean()) for k in range(1, 6) if (s.labels == k).any()}


@pytest.mark.parametrize("seed", [1, 5, 9])
def test_contrasts_ordered_as_designed(seed, subj):
    s = subj if seed == 1 else D.synthesize_subject(seed, spacing=4.0)
    t1, t2, fl, pd = (_class_means(s, c) for c in ("t1", "t2", "flair", "pd"))
    csf, gm, wm, oed, core = 1, 2, 3, 4, 5
    assert t1[wm] > t1[gm] > t1[csf]
    assert t2[csf] > t2[gm] > t2[wm]
    assert fl[csf] < fl[wm] and fl[csf] < fl[gm] and fl[oed] > fl[gm]
    assert pd[csf] > pd[wm]
    assert t1[core] < t1[wm] and t2[oed] > t2[wm] and t2[core] > t2[wm]


def test_determinism_and_seed_independence(subj):
    again = D.synthesize_subject(1, spacing=4.0)
    for c in D.CONTRASTS:
        assert np.array_equal(again.images[c], subj.images[c])
    assert np.array_equal(again.labels, subj.labels)
    other = D.synthesize_subject(3, spacing=4.0)
    assert not np.array_equal(other.labels, subj.labels)
    # anatomy/tumour do not depend on the contrast subset or the spacing
    only_t2 = D.synthesize_subject(1, spacing=4.0, contrasts=("t2",))
    assert np.array_equal(only_t2.labels, subj.labels) and only_t2.contrasts == ("t2",)
    fine = D.synthesize_subject(1, spacing=8.0)
    assert fine.meta["tumour_centre_template_ras"] == subj.meta["tumour_centre_template_ras"]
    with pytest.raises(ValueError):
        D.synthesize_subject(1, spacing=4.0, contrasts=("t7",))


# --------------------------------------------------------------------------------------------- bank


def test_bank_caches_and_reloads(tmp_path, monkeypatch):
    bank = D.SubjectBank(tmp_path, n_subjects=2, seed=1, spacing=4.0)
    assert not bank.is_cached(0)
    s0 = bank[0]
    assert bank.is_cached(0) and not bank.is_cached(1)
    assert bank.path(0).name.startswith(f"msode_subj_v{D.GENERATOR_VERSION}_s1_sp4_")
    fresh = D.synthesize_subject(1, spacing=4.0)
    assert np.array_equal(s0.labels, fresh.labels)
    for c in D.CONTRASTS:
        assert np.abs(s0.images[c] - fresh.images[c]).max() <= 1.0 / 65535 + 1e-7
    # a new bank on the same root reads the file: synthesis must not run again
    monkeypatch.setattr(
        D.bank,
        "synthesize_subject",  # the name the bank calls
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-synthesised")),
    )
    again = D.SubjectBank(tmp_path, n_subjects=2, seed=1, spacing=4.0)[0]
    assert again.meta["cache_file"] == str(bank.path(0))
    for c in D.CONTRASTS:
        assert np.array_equal(again.images[c], s0.images[c])
    assert np.array_equal(again.labels, s0.labels) and np.allclose(again.affine, s0.affine)
    with pytest.raises(IndexError):
        bank[2]
    # key includes spacing: another spacing is another file
    assert D.SubjectBank(tmp_path, 1, seed=1, spacing=8.0).path(0) != bank.path(0)


def test_splits_never_share_subjects(tmp_path):
    train, test, val = (set(D.split_seeds(s, 10_000)) for s in ("train", "test", "val"))
    assert not (train & test) and not (train & val) and not (test & val)
    a = D.SubjectBank.for_split(tmp_path, "train", 5, spacing=4.0)
    b = D.SubjectBank.for_split(tmp_path, "test", 5, spacing=4.0)
    assert a.seeds == [0, 1, 2, 3, 4] and b.seeds[0] == 10_000
    D.assert_disjoint(a, b)
    with pytest.raises(ValueError):
        D.assert_disjoint(a, D.SubjectBank(tmp_path, 2, seed=3, spacing=4.0))
    assert D.SAMPLE_SEED not in train | test | val


# ------------------------------------------------------------------------------------------ motions


def _euler_deg(theta):
    """Euler angles (R = Rz @ Ry @ Rx) in degrees of SDK rigid parameters (rotation vectors)."""
    from msode_sdk.transforms import rigid_matrix

    r = rigid_matrix(theta.double())[:, :3, :3]
    ry = torch.asin(torch.clamp(-r[:, 2, 0], -1, 1))
    rx = torch.atan2(r[:, 2, 1], r[:, 2, 2])
    rz = torch.atan2(r[:, 1, 0], r[:, 0, 0])
    return torch.rad2deg(torch.stack((rx, ry, rz), -1))


def test_motion_distributions():
    rng = np.random.default_rng(0)
    th = D.sample_rigid(rng, 4000)
    assert th.shape == (4000, 6) and th.dtype == torch.float32
    deg = _euler_deg(th)
    assert deg.abs().max() <= 75.001 and deg.abs().max() > 74.0 and abs(float(deg.mean())) < 2.0
    from msode_sdk.transforms import rigid_matrix

    trans = rigid_matrix(th.double())[:, :3, 3]  # the motion's translation (x -> R x + trans)
    assert trans.abs().max() <= 20.0 + 1e-4 and trans.abs().max() > 19.8
    assert abs(float(deg.std()) - 75 / math.sqrt(3)) < 1.5  # uniform
    grid = Grid((60, 60, 40), (4.0, 4.0, 4.0))
    lat = D.motion_lattice(grid)
    assert lat.control_spacing == (40.0, 40.0, 40.0)
    c = D.sample_bspline(rng, lat, 200)
    assert c.shape == (200, *lat.coeff_shape)
    assert abs(float(c.std()) - 8.0) < 0.1 and abs(float(c.mean())) < 0.1
    cz = D.sample_bspline(rng, lat, 2, zero_border=True)
    assert (cz[:, :, 0] == 0).all() and (cz[:, :, :, -1] == 0).all() and (cz[..., 0] == 0).all()
    assert (cz[:, :, 1:-1, 1:-1, 1:-1] != 0).all()
    th_h, c_h = D.sample_hybrid(rng, lat, 2000)
    assert _euler_deg(th_h).abs().max() <= 40.001 and rigid_matrix(th_h.double())[:, :3, 3].abs().max() <= 10.0 + 1e-4
    assert abs(float(c_h.std()) - 8.0) < 0.1
    kinds = {k: [t.kind for t in D.sample_motion(rng, k, grid).transforms] for k in D.MOTION_KINDS}
    assert kinds == {"identity": ["rigid"], "rigid": ["rigid"], "bspline": ["bspline"], "hybrid": ["rigid", "bspline"]}
    # same seed, same motion
    assert torch.equal(D.sample_rigid(5, 3), D.sample_rigid(np.random.default_rng(5), 3))


# -------------------------------------------------------------------------------------------- pairs


def _scipy_pull(moving_xyz, grid, points_dhw3):
    """Independent trilinear sampling (scipy) of an (X, Y, Z) array at mm points (D, H, W, 3)."""
    pts = points_dhw3.double().numpy()
    idx = [pts[..., a] / grid.spacing_xyz[a] + (grid.shape_xyz[a] - 1) / 2.0 for a in range(3)]
    return map_coordinates(moving_xyz.astype(np.float64), np.stack(idx), order=1, mode="grid-constant", cval=0.0)


@pytest.mark.parametrize("kind", ["rigid", "bspline", "hybrid"])
def test_ground_truth_reproduces_fixed(subj, kind):
    rng = np.random.default_rng({"rigid": 1, "bspline": 2, "hybrid": 3}[kind])
    grid = subj.grid
    pair = D.make_pair(subj, "t1", "t1", kind, rng=rng)
    assert pair.fixed.shape == pair.moving.shape == (1, 1, *grid.shape_dhw)
    assert pair.fixed_labels.dtype == torch.uint8
    brain = pair.fixed_brain
    assert brain.any()
    # the SDK warp of the moving image through the ground-truth chain gives the fixed image
    warped = warp_chain(pair.moving, grid, pair.chain, grid)
    assert float((warped - pair.fixed).abs()[brain].max()) < 1e-5
    # ... and so does an independent trilinear implementation (scipy) at the chain's points
    ref = _scipy_pull(subj.images["t1"], grid, pair.gt_points()[0])  # (D, H, W)
    got = pair.fixed[0, 0].double().numpy()
    assert np.abs(ref - got)[brain[0, 0].numpy()].max() < 1e-4
    # ground-truth displacement helper agrees with the chain
    disp = pair.gt_displacement()
    assert disp.shape == (1, 3, *grid.shape_dhw)
    assert torch.allclose(disp.permute(0, 2, 3, 4, 1) + grid.points(), pair.gt_points(), atol=1e-4)
    # labels follow the same map: fixed labels = nearest agreement with warped moving labels
    assert D.dice(pair.fixed_brain, warp_chain(pair.moving_brain.float(), grid, pair.chain, grid) > 0.5) > 0.95


def test_translation_direction_fixed_to_moving(subj):
    """phi(x) = x + t maps fixed to moving points: fixed(x) = S(x + t) so the fixed brain's centre of
    mass is the moving one's minus t (the pull-back convention of transforms.py)."""
    t = torch.tensor([[0.0, 0.0, 0.0, 12.0, -8.0, 4.0]])
    pair = D.make_pair(subj, "t1", "t1", RigidTransform(t))
    pts = subj.grid.points(torch.float64)

    def com(mask):
        m = mask[0, 0].double()
        return (pts * m[..., None]).sum((0, 1, 2)) / m.sum()

    shift = com(pair.fixed_brain) - com(pair.moving_brain)
    assert torch.allclose(shift, -t[0, 3:].double(), atol=0.6)
    tshift = com(pair.fixed_tumour) - com(pair.moving_tumour)
    assert torch.allclose(tshift, -t[0, 3:].double(), atol=1.5)


def test_pair_identity_batch_contrasts_and_model_grid(subj):
    ident = D.make_pair(subj, "t2", "t1", "identity", rng=0)
    assert torch.equal(ident.moving_labels, ident.fixed_labels)
    assert torch.allclose(ident.moving, array_to_tensor(subj.images["t2"]))
    assert torch.allclose(ident.fixed, array_to_tensor(subj.images["t1"]), atol=1e-6)
    assert D.dice(ident.fixed_tumour[0, 0].numpy().transpose(2, 1, 0), subj.tumour) == 1.0
    # batch of motions on one subject, on a coarser model grid sharing the subject's centre
    model = Grid((30, 30, 20), (8.0, 8.0, 8.0))
    chain = D.sample_motion(np.random.default_rng(4), "hybrid", model, n=3)
    pair = D.make_pair(subj, "t1", "flair", chain, grid=model)
    assert pair.batch == 3 and pair.fixed.shape == (3, 1, 20, 30, 30)
    assert pair.gt_displacement().shape == (3, 3, 20, 30, 30)
    assert not torch.equal(pair.fixed[0], pair.fixed[1])
    assert torch.equal(pair.moving[0], pair.moving[2])
    assert pair.fixed_contrast == "flair" and pair.moving_contrast == "t1"
    with pytest.raises(ValueError):
        D.make_pair(subj, "t1", "t1", "shear", rng=0)


# ------------------------------------------------------------------------------------------ metrics


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert D.dice(a, b) == pytest.approx(0.5)
    assert D.dice(a, a) == 1.0 and D.dice(a, ~a) == 0.0
    assert D.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert D.dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        D.dice(a, b[:2])


def test_rmse_x_by_hand():
    a = np.zeros((2, 2, 2))
    b = np.zeros((2, 2, 2))
    b[0, 0, 0] = 0.8
    assert D.rmse_x(a, b) == pytest.approx(math.sqrt(0.64 / 8))
    m = np.zeros((2, 2, 2), bool)
    m[0, 0, :] = True
    assert D.rmse_x(a, b, m) == pytest.approx(math.sqrt(0.64 / 2))
    assert D.rmse_x(torch.ones(3), torch.ones(3)) == 0.0


def test_rmse_phi_by_hand():
    grid = Grid((8, 6, 4), (2.0, 2.0, 3.0))
    shift = RigidTransform(torch.tensor([[0.0, 0.0, 0.0, 3.0, 4.0, 0.0]]))
    ident = RigidTransform(torch.zeros(1, 6))
    assert D.rmse_phi(TransformChain([shift]), TransformChain([ident]), grid) == pytest.approx(5.0, abs=1e-9)
    assert D.rmse_phi(None, shift, grid) == pytest.approx(5.0, abs=1e-9)
    # rotation by 90 deg about z: |phi(x) - x| = sqrt(2) |x_xy|; checked on a one-voxel mask
    rot = TransformChain([RigidTransform(torch.tensor([[0.0, 0.0, math.pi / 2, 0.0, 0.0, 0.0]]))])
    mask = np.zeros(grid.shape_xyz, bool)
    mask[7, 0, 0] = True  # x = 7 mm, y = -5 mm
    assert D.rmse_phi(rot, None, grid, mask) == pytest.approx(math.sqrt(2 * (49 + 25)), rel=1e-6)
    mask_t = torch.from_numpy(mask.transpose(2, 1, 0).copy())[None, None]
    assert D.rmse_phi(rot, None, grid, mask_t) == pytest.approx(math.sqrt(2 * (49 + 25)), rel=1e-6)
    # batch and point-map inputs
    both = TransformChain([RigidTransform(torch.tensor([[0.0] * 6, [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]))])
    per = D.rmse_phi(both, None, grid, reduction="none")
    assert torch.allclose(per, torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert D.rmse_phi(both, None, grid) == pytest.approx(math.sqrt(2.0))
    assert D.rmse_phi(TransformChain([shift]).map_grid(grid), None, grid) == pytest.approx(5.0, abs=1e-5)
    with pytest.raises(ValueError):
        D.rmse_phi(None, shift, grid, np.zeros(grid.shape_xyz, bool))


# -------------------------------------------------------------------------------------------- BraTS


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def test_brats_folder_loader(tmp_path):
    shape = (12, 10, 8)
    lps_like = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS-style storage: x and y flipped
    lps_like[:3, 3] = [11.0, 9.0, 0.0]
    rng = np.random.default_rng(0)
    brain = np.zeros(shape, bool)
    brain[2:10, 2:8, 1:7] = True
    seg = np.zeros(shape, np.uint8)
    seg[3:5, 3:5, 2:4] = 1
    seg[5:7, 3:5, 2:4] = 2
    seg[7:8, 3:5, 2:4] = 4
    a = tmp_path / "BraTS_001"
    a.mkdir()
    for c in ("t1", "t1ce", "t2", "flair"):
        _write(a / f"BraTS_001_{c}.nii.gz", (brain * rng.uniform(100, 900, shape)).astype(np.int16), lps_like)
    _write(a / "BraTS_001_seg.nii.gz", seg, lps_like)
    b = tmp_path / "BraTS_002"  # no t1ce, no seg, plain .nii
    b.mkdir()
    for c in ("t1", "flair"):
        _write(b / f"BraTS_002_{c}.nii", (brain * rng.uniform(5, 50, shape)).astype(np.float32), np.eye(4))
    (tmp_path / "notes.txt").write_text("not a subject")
    (tmp_path / "empty").mkdir()

    subjects = list(D.load_brats_folder(tmp_path))
    assert [s.subject_id for s in subjects] == ["BraTS_001", "BraTS_002"]
    s1, s2 = subjects
    assert s1.contrasts == ("t1", "t1ce", "t2", "flair") and s2.contrasts == ("t1", "flair")
    assert nib.aff2axcodes(s1.affine) == ("R", "A", "S") and s1.meta["has_seg"] and not s2.meta["has_seg"]
    # canonical reorientation flips x and y: voxel (i, j, k) -> (11 - i, 9 - j, k)
    flip = lambda v: v[::-1, ::-1, :]  # noqa: E731
    assert np.array_equal(s1.labels == 5, flip(seg == 1))
    assert np.array_equal(s1.labels == 4, flip(seg == 2))
    assert np.array_equal(s1.labels == 6, flip(seg == 4))
    assert np.array_equal(s1.tumour, flip(seg > 0))
    assert np.array_equal(s1.brain, flip(brain)) and np.array_equal(s2.brain, brain)
    assert set(np.unique(s2.labels)) == {0, 7} and not s2.tumour.any()
    for s in subjects:
        for img in s.images.values():
            assert img.dtype == np.float32 and img.min() == 0.0 and img.max() == 1.0
            assert (img[~s.brain] == 0).all()
        assert s.grid.shape_xyz == shape
    with pytest.raises(FileNotFoundError):
        list(D.load_brats_folder(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------- sample


def test_sample_pair_files_match_truth():
    d = ROOT / "data" / "sample"
    if not (d / "truth.json").exists():
        pytest.skip("data/sample not generated (python scripts/make_sample_pair.py)")
    names = ["fixed_t1.nii.gz", "moving_t1.nii.gz", "moving_t2.nii.gz", "truth.json"]
    assert sum((d / n).stat().st_size for n in names) < 3_000_000
    truth = json.loads((d / "truth.json").read_text())
    m = np.asarray(truth["fixed_to_moving_world_ras"])
    fixed = nib.load(str(d / "fixed_t1.nii.gz"))
    moving = nib.load(str(d / "moving_t1.nii.gz"))
    assert not np.allclose(fixed.affine[:3, :3] / np.linalg.norm(fixed.affine[:3, :3], axis=0), np.eye(3))
    assert np.allclose(sorted(fixed.header.get_zooms()), [2.0, 2.0, 2.5])
    assert fixed.shape != moving.shape
    assert 12 < truth["motion"]["total_rotation_deg"] < 18 and 8 < truth["motion"]["total_translation_mm"] < 12
    f = np.asarray(fixed.dataobj, dtype=np.float32)
    pts = world_points(fixed.shape, fixed.affine, torch.float64)
    mt = torch.as_tensor(m)
    back = (
        sample_image_at_world(
            array_to_tensor(np.asarray(moving.dataobj, dtype=np.float32)), moving.affine, pts @ mt[:3, :3].T + mt[:3, 3]
        )[0, 0]
        .permute(2, 1, 0)
        .numpy()
    )
    brain = f > 0.05
    assert np.corrcoef(f[brain], back[brain])[0, 1] > 0.98
    # the identity instead of the truth is clearly worse
    ident = (
        sample_image_at_world(array_to_tensor(np.asarray(moving.dataobj, dtype=np.float32)), moving.affine, pts)[0, 0]
        .permute(2, 1, 0)
        .numpy()
    )
    assert np.corrcoef(f[brain], ident[brain])[0, 1] < 0.9
