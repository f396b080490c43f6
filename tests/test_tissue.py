"""The contrast-agnostic tissue encoder (msode_train.tissue): shapes, export, a tiny training run that
learns, and the committed weights' contrast invariance on a held-out subject."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msode_train import data as D
from msode_train import tissue as T


def test_encoder_shapes_probabilities_and_script():
    net = T.TissueEncoder(8).eval()
    x = torch.rand(2, 1, 10, 12, 14)
    p = net(x)
    assert p.shape == (2, T.N_CLASSES, 10, 12, 14)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 10, 12, 14))
    ts = torch.jit.script(net)
    torch.testing.assert_close(ts(x), p)
    # scripted on CPU without gradients the convolutions call oneDNN directly (msode_train.models.Conv3d):
    # the same numbers to float32 rounding, for one image too (PyTorch's dispatch uses its native kernel)
    with torch.no_grad():
        torch.testing.assert_close(ts(x[:1]), net(x[:1]), rtol=1e-5, atol=1e-6)
    assert [k for k in net.state_dict() if k.startswith("c1.")] == ["c1.weight", "c1.bias"]
    # the global-context path: the same voxel neighbourhood gets other probabilities in another image
    net.film[2].weight.data.normal_(0, 0.5)
    a = net(torch.cat((x[:1], x[:1] * 0.3)))
    assert float((a[0] - a[1]).abs().max()) > 1e-3


def test_weights_round_trip_and_errors(tmp_path):
    nets = {16.0: T.TissueEncoder(8), 8.0: T.TissueEncoder(8)}
    p = T.save_encoders(tmp_path / "w.pt", {s: n.state_dict() for s, n in nets.items()}, {"width": 8})
    encs, meta = T.load_encoders(p)
    assert sorted(encs) == [8.0, 16.0] and meta["width"] == 8
    x = torch.rand(1, 1, 6, 6, 6)
    torch.testing.assert_close(encs[8.0](x), nets[8.0].eval()(x))
    with pytest.raises(FileNotFoundError):
        T.load_encoders(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="msode-tissue-encoder"):
        T.load_encoders(tmp_path / "bad.pt")


def test_random_contrast_rendering_keeps_background_zero():
    lab = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    lab[..., 2:6, 2:6, 2:6] = 2
    lab[..., 3:5, 3:5, 3:5] = 3
    onehot = F.one_hot(lab[:, 0], T.N_CLASSES).permute(0, 4, 1, 2, 3).float()
    img = T._render_random_contrast(onehot, np.random.default_rng(0))
    assert img.shape == (1, 1, 8, 8, 8)
    assert float(img[..., 0, 0, 0]) == 0.0 and float(img[..., 4, 4, 4]) > 0.0


def test_tiny_training_run_learns(tmp_path):
    ds = T.make_dataset(8, n_subjects=2, split="train", seed=0, spacings=(16.0,), bank_dir=tmp_path, log=lambda m: None)
    x, y = ds[16.0]
    assert x.shape[0] == 8 and y.shape[1] == T.N_CLASSES
    torch.testing.assert_close(y.float().sum(1), torch.ones_like(y[:, 0].float()), atol=2e-2, rtol=0)

    def ce(state):
        net = T.TissueEncoder(8)
        net.load_state_dict(state)
        with torch.no_grad():
            return float(T._soft_ce(net.logits(x), y.float()))

    torch.manual_seed(0)
    before = ce(T.TissueEncoder(8).state_dict())
    states, hist = T.train_encoders(ds, ds, {16.0: 100}, batch=4, lr=3e-3, width=8, log=lambda m: None)
    after = ce(states[16.0])
    assert after < 0.8 * before, (before, after)
    assert hist[16.0][-1]["step"] == 100


@pytest.fixture(scope="module")
def held_out_subject(tmp_path_factory):
    return D.SubjectBank.for_split(tmp_path_factory.mktemp("bank"), "test", 1, spacing=2.0)[0]


def test_committed_encoders_are_contrast_invariant(held_out_subject):
    """On a held-out subject, the SSD between the tissue probabilities of T2 / FLAIR / PD and those of T1
    shifted by k coarse voxels along each axis is smallest at k = 0 (the property the Gauss-Newton fields
    need), and the arg-max classes agree with the labels."""
    from msode_sdk.io import normalise_intensity
    from msode_sdk.registrar import Registrar

    encs, meta = T.load_encoders()
    assert {16.0, 8.0} <= set(encs)
    subj = held_out_subject
    grid = subj.grid
    lab = subj.labels_tensor().long().clamp(max=T.N_CLASSES - 1)
    onehot = F.one_hot(lab[:, 0], T.N_CLASSES).permute(0, 4, 1, 2, 3).float()
    for sp, enc in encs.items():
        lg = grid.downsampled(int(round(sp / 2.0)))
        frac = Registrar._downsample(onehot, grid, lg)
        probs = {}
        with torch.no_grad():
            for c in D.CONTRASTS:
                img = Registrar._downsample(normalise_intensity(subj.tensor(c), 0.5, 99.5), grid, lg)
                probs[c] = enc(img)
        for c in ("t2", "flair", "pd"):
            for dim in (2, 3, 4):
                ssd = [
                    float(((probs[c] - torch.roll(probs["t1"], k, dims=dim)) ** 2).mean()) for k in (-2, -1, 0, 1, 2)
                ]
                assert int(np.argmin(ssd)) == 2, (sp, c, dim, ssd)
        brain = frac[:, 0] < 0.5
        for c in D.CONTRASTS:  # hard labels agree with the fractions' arg-max over most of the brain
            agree = (probs[c].argmax(1) == frac.argmax(1))[brain].float().mean()
            assert float(agree) > 0.6, (sp, c, float(agree))
