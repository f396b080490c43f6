"""``msode-train`` under torchrun: DistributedDataParallel on 2 CPU processes (gloo) against one process.

Design under test (``msode_train.train``'s docstring): every rank draws the step's global batch from the
one seeded numpy stream and trains on its slice, the gradients are averaged by DistributedDataParallel;
so 2 ranks with ``train.batch_size`` B train on the same samples, with the same loss normalisation (a
mean over the global batch), as one process with 2B.

Tolerance: the all-reduce adds the two ranks' float32 gradients in another order (and each rank
convolves a batch of B, not 2B), so weights agree to rounding, not bitwise. Measured on the tiny config
below: largest difference 2.7e-7 absolute, 1.1e-6 of the tensor's largest weight, after 3 Adam steps.
Asserted: ``rtol=1e-4, atol=1e-5``; the weights move by ~3e-3 per step (lr), 300x the tolerance, and
the test checks they did move. The numpy data stream (the batches drawn) must be *identical*.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from msode_train.train import Trainer, load_config

RTOL, ATOL = 1e-4, 1e-5
MIN_MOVE = 1e-3  # every trained network must have moved at least this far from its initial weights


def _cfg_dict(tmp_path, batch_size: int, out_dir) -> dict:
    return {
        "name": "tiny_ddp",
        "model": {"spacing_mm": 16.0, "levels": 2, "integrator": "torchdiffeq"},
        "stages": [
            {
                "name": "rigid",
                "transform": "rigid",
                "arch": "rigid_convfc",
                "arch_kwargs": {"width": 4, "hidden": 16},
                "schedule": [{"solver": "euler", "step_size": 0.5}, {"solver": "heun", "step_size": 0.5}],
            }
        ],
        "data": {
            "bank_dir": str(tmp_path.parent / "bank16"),
            "n_train": 3,
            "n_val": 1,
            "pairs": "random",
            "contrasts": ["t1", "t2", "flair"],
            "motion": "rigid",
            "motion_kwargs": {"max_rot_deg": 10.0, "max_trans_mm": 15.0},
        },
        "loss": {"sim": "ncc", "lambda_self": 1.0, "lambda_sup": 0.5, "self_points": 512},
        "train": {
            "steps": 3,
            "batch_size": batch_size,
            "lr": 3e-3,
            "out_dir": str(out_dir),
            "checkpoint_every": 1,
            "progress": False,
            "device": "cpu",
            "max_minutes": 5,
        },
        "export": {"formats": ["torchscript"], "eval_pairs": 0},
    }


def _weights(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items() if v.is_floating_point()}


def _assert_close_weights(got: dict, ref: dict, init: dict):
    assert got.keys() == ref.keys()
    moved = {}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=k)
        moved[k.split(".")[1]] = max(moved.get(k.split(".")[1], 0.0), float((got[k] - init[k]).abs().max()))
    assert moved and all(v > MIN_MOVE for v in moved.values()), moved  # training did something


def _torchrun(cfg_path, *args, timeout=240):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "msode_train.cli",
        str(cfg_path),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_rank_slices_of_the_global_batch_are_the_single_process_batch(tmp_path):
    """No process group needed: two trainers told they are ranks 0 and 1 of 2 (batch 1 each) render the
    halves of the batch of 2 one process draws, and all three leave the data stream in the same state."""
    one = Trainer(load_config(_cfg_dict(tmp_path, 2, tmp_path / "one")), resume=False)
    ranks = [Trainer(load_config(_cfg_dict(tmp_path, 1, tmp_path / f"r{r}")), resume=False) for r in range(2)]
    for r, tr in enumerate(ranks):
        tr.rank, tr.world_size = r, 2
    for _ in range(2):  # two steps: the stream advances by the global batch on every rank
        ref = one.sample_batch()
        parts = [tr.sample_batch() for tr in ranks]
        for kind in ("pairs", "self"):
            got = [p for part in parts for p in part[kind]]
            assert len(got) == len(ref[kind]) == 2
            for a, b in zip(got, ref[kind]):
                assert torch.equal(a.moving, b.moving) and torch.equal(a.fixed, b.fixed)
                assert torch.equal(a.chain.transforms[0].state, b.chain.transforms[0].state)
        states = [json.dumps(t.rng.bit_generator.state) for t in (one, *ranks)]
        assert len(set(states)) == 1
    assert ranks[0].global_batch_size == 2


def test_torchrun_two_cpu_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    """Acceptance (issue 22): 2 gloo ranks with batch 1 give the weights of one process with batch 2 (see the
    module docstring for the tolerance); a torchrun run resumes (under torchrun and in one process), only
    rank 0 writes, and rank 0 exports the plan."""
    # one process, batch 2: the reference at steps 2 and 3
    ref_tr = Trainer(load_config(_cfg_dict(tmp_path, 2, tmp_path / "single")), resume=False)
    init = _weights(ref_tr.model.state_dict())
    ref_tr.fit(steps=2)
    ref2, rng2 = _weights(ref_tr.model.state_dict()), ref_tr.rng.bit_generator.state
    ref_tr.fit(steps=3)
    ref3, rng3 = _weights(ref_tr.model.state_dict()), ref_tr.rng.bit_generator.state
    hist = ref_tr.history

    # torchrun, 2 ranks, batch 1 per rank: 2 steps from scratch
    run = tmp_path / "ddp"
    cfg_path = tmp_path / "tiny_ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(tmp_path, 1, run)))
    _torchrun(cfg_path, "--steps", "2", "--no-plan")
    st = torch.load(run / "state.pt", weights_only=True)
    assert st["step"] == 2 and st["world_size"] == 2
    assert json.loads(st["rng_numpy_json"]) == rng2  # the same batches were drawn
    _assert_close_weights(_weights(st["model"]), ref2, init)
    # rank 0 alone wrote: exactly what one process writes with --no-plan (loss.png where matplotlib is)
    wrote = sorted(p.name for p in run.iterdir() if p.name != "loss.png")
    assert wrote == ["config.yaml", "rigid.ckpt", "state.pt", "train_log.csv"]

    # the torchrun state resumed by one process with the doubled batch ...
    solo = tmp_path / "ddp_then_single"
    shutil.copytree(run, solo)
    tr = Trainer(load_config(_cfg_dict(tmp_path, 2, solo)), resume=True)
    assert tr.step == 2
    tr.fit(steps=3)
    _assert_close_weights(_weights(tr.model.state_dict()), ref3, init)

    # ... and by torchrun, which then exports the plan from rank 0
    proc = _torchrun(cfg_path, "--steps", "3")
    st = torch.load(run / "state.pt", weights_only=True)
    assert st["step"] == 3 and json.loads(st["rng_numpy_json"]) == rng3
    _assert_close_weights(_weights(st["model"]), ref3, init)
    out = json.loads(proc.stdout.strip().splitlines()[-1])  # one JSON line: rank 0's
    assert out["step"] == 3 and os.path.exists(out["plan"])
    from msode_sdk.plan import load_plan

    training = load_plan(out["plan"]).manifest.training
    assert training["distributed"] == {"world_size": 2, "global_batch_size": 2}

    # rank 0 logs the global batch's mean losses: those of the one process
    rows = (run / "train_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4
    for line, ref_row in zip(rows[1:], hist):
        row = dict(zip(header, line.split(",")))
        for k in ("loss", "sim", "self", "sup", "rmse_phi_mm", "grad_norm"):
            assert float(row[k]) == pytest.approx(ref_row[k], rel=1e-4, abs=1e-6), (k, row["step"])
