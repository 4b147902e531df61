"""The attribution evaluation protocol's logic (issue 19): splits, correct-only filter, chance inside the brain,
the cascade's order. Small hand-made inputs, no model run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuroexplain.errors import InvalidOptionError
from neuroexplain.lab import evaluate_attribution as ev
from neuroexplain.lab.synthetic import HELD_OUT_SEED_START
from neuroexplain.lab.train import TRAIN_SEED_STRIDE, TrainConfig, train_seed_range


def test_splits_are_disjoint_positive_and_outside_training() -> None:
    val = set(ev.split_seeds("validation", 100))
    test = set(ev.split_seeds("test", 100))
    assert len(val) == len(test) == 100
    assert not val & test
    assert all(s % 2 == 1 for s in val | test)  # positives of the generator (seed % 2 == 1)
    assert min(val | test) >= HELD_OUT_SEED_START
    assert max(train_seed_range(TrainConfig())) < HELD_OUT_SEED_START
    assert max(test) < ev.TEST_SEED_START + ev.SEED_RANGE_SIZE <= ev.VALIDATION_SEED_START
    # The shift split's small seeds come from the other generator's own stream; they are not the tuning seeds.
    assert not set(ev.split_seeds("shift", 100)) & val
    assert TRAIN_SEED_STRIDE > 0


def test_split_refuses_unknown_split_and_too_many_scans() -> None:
    with pytest.raises(InvalidOptionError):
        ev.split_seeds("train", 3)
    with pytest.raises(InvalidOptionError):
        ev.split_seeds("test", 101)
    with pytest.raises(InvalidOptionError):
        ev.split_seeds("test", 0)


def test_correct_only_keeps_correct_records() -> None:
    recs = [{"seed": 1, "correct": True, "share": 0.9}, {"seed": 3, "correct": False, "share": 0.0},
            {"seed": 5, "correct": True, "share": 0.5}]
    assert [r["seed"] for r in ev.correct_only(recs)] == [1, 5]
    raw = {"split": "test", "seeds": [1, 3, 5], "records": {"m": recs},
           "chance": [ev.chance_levels(np.ones(2, bool), np.ones(2, bool), np.ones(2, bool))] * 3,
           "cascade_steps": [], "cascade": {}}
    for r in recs:
        r.update(share_dilated=r["share"], pointing=r["share"], pointing_dilated=r["share"], rank_acc=r["share"])
    s = ev.summarise_split(raw)
    assert s["rows"]["m"]["all"]["share"]["mean"] == pytest.approx(1.4 / 3)
    assert s["rows"]["m"]["correct"]["share"]["mean"] == pytest.approx(0.7)
    assert s["rows"]["m"]["correct"]["share"]["n"] == 2
    assert s["accuracy"]["mean"] == pytest.approx(2 / 3)


def test_chance_is_the_mask_share_of_the_brain_not_the_volume() -> None:
    shape = (20, 20, 20)
    brain = np.zeros(shape, bool)
    brain[5:15, 5:15, 5:15] = True  # 1000 voxels of 8000
    mask = np.zeros(shape, bool)
    mask[8:10, 8:10, 8:10] = True  # 8 voxels
    dilated = np.zeros(shape, bool)
    dilated[7:11, 7:11, 7:11] = True  # 64 voxels
    c = ev.chance_levels(mask, dilated, brain)
    assert c["share"] == pytest.approx(8 / 1000)  # not 8 / 8000
    assert c["share_dilated"] == pytest.approx(64 / 1000)
    assert c["pointing"] == c["rank_acc"] == c["share"]
    # A uniform map over the brain scores the chance level, and random maps average to it.
    case = ev._Case(0, np.ones(shape, np.float32), mask, dilated, brain)
    uniform = ev.localisation_both(brain.astype(np.float32), case)
    assert uniform["share"] == pytest.approx(c["share"])
    assert uniform["share_dilated"] == pytest.approx(c["share_dilated"])
    rng = np.random.default_rng(0)
    shares = [ev.localisation_both(np.where(brain, rng.random(shape), 0), case)["share"] for _ in range(20)]
    assert np.mean(shares) == pytest.approx(c["share"], rel=0.2)


def test_undilated_and_dilated_figures_differ_for_a_rim_map() -> None:
    shape = (20, 20, 20)
    brain = np.ones(shape, bool)
    mask = np.zeros(shape, bool)
    mask[9:11, 9:11, 9:11] = True
    dilated = np.zeros(shape, bool)
    dilated[8:12, 8:12, 8:12] = True
    rel = np.zeros(shape, np.float32)
    rel[8, 9, 9] = 1.0  # peaks on the rim: in the dilated mask, not in the mask
    r = ev.localisation_both(rel, ev._Case(0, rel, mask, dilated, brain))
    assert r["pointing"] == 0.0 and r["pointing_dilated"] == 1.0
    assert r["share"] == 0.0 and r["share_dilated"] == 1.0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 2, 3)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv3d(2, 2, 3)
        self.fc = nn.Linear(2, 2)


def test_cascade_is_top_first_and_cumulative() -> None:
    steps = ev.cascade_steps(_Net())
    assert steps == [["fc"], ["fc", "conv2"], ["fc", "conv2", "conv1"]]  # the ReLU has no parameters
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ev.randomise(net, steps[0], seed=1)
    after = net.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["conv2.weight"], after["conv2.weight"])


def test_mean_ci_brackets_the_mean() -> None:
    r = ev.mean_ci([0.0, 1.0, 0.5, 0.25])
    assert r["low"] <= r["mean"] <= r["high"] and r["n"] == 4
    assert ev.mean_ci([])["n"] == 0
