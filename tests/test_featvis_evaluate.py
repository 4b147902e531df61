"""The evaluation's metrics on volumes with known answers, and its resumable cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from neuroexplain.featvis.engine import PRIOR_FLOOR
from neuroexplain.lab import evaluate_featvis as ev


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    idx = np.indices(shape)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def test_hf_energy_ratio_separates_noise_from_smooth_volumes() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(32, 32, 32))
    smooth = ndimage.gaussian_filter(noise, 3.0)
    # White noise: the share of the frequency cube beyond 0.25 cycles/voxel (1 - 4/3*pi*0.25^3 = 0.93).
    assert ev.hf_energy_ratio(noise) == pytest.approx(1 - 4 / 3 * np.pi * 0.25**3, abs=0.02)
    assert ev.hf_energy_ratio(smooth) < 0.01
    assert ev.hf_energy_ratio(np.ones((8, 8, 8))) == 0.0


def test_top_mask_share_and_blobs() -> None:
    shape = (30, 30, 30)
    vol = np.zeros(shape)
    ball = _ball(shape, (10, 10, 10), 3.0)
    vol[ball] = 2.0
    vol[20, 20, 20] = 1.0
    top = ev.top_mask(vol, fraction=(ball.sum() + 1) / vol.size)
    assert top.sum() == ball.sum() + 1
    assert ev.share_inside(top, ball) == pytest.approx(ball.sum() / (ball.sum() + 1))
    d = np.sort(ev.blob_diameters_mm(top, voxel_mm=2.0))
    assert len(d) == 2
    assert d[0] == pytest.approx(2.0 * (6 / np.pi) ** (1 / 3))  # one voxel of 8 mm^3
    assert d[1] == pytest.approx(2.0 * (6 * ball.sum() / np.pi) ** (1 / 3))
    assert ev.share_inside(np.zeros(shape, dtype=bool), ball) == 0.0


def test_change_enrichment() -> None:
    shape = (20, 20, 20)
    brain = np.ones(shape, dtype=bool)
    region = np.zeros(shape, dtype=bool)
    region[:5] = True  # a quarter of the brain
    ref = np.zeros(shape)
    changed_inside = ref.copy()
    changed_inside[:5] = 1.0
    assert ev.change_enrichment(changed_inside, ref, region, brain) == pytest.approx(4.0)
    uniform = ref + 1.0
    assert ev.change_enrichment(uniform, ref, region, brain) == pytest.approx(1.0)
    assert ev.change_enrichment(ref, ref, region, brain) == 0.0


def test_correlation_and_table() -> None:
    a = np.arange(27.0).reshape(3, 3, 3)
    where = np.ones(a.shape, dtype=bool)
    assert ev.correlation(a, 2 * a + 1, where) == pytest.approx(1.0)
    assert ev.correlation(a, np.ones_like(a), where) == 0.0
    table = ev.markdown_table([{"run": "none", "x": 0.123456, "ok": True}], [("run", "run"), ("x", "X"), ("ok", "ok")])
    assert table.splitlines() == ["| run | X | ok |", "| --- | --- | --- |", "| none | 0.123 | yes |"]


def test_runs_are_cached_and_resumed(tmp_path: Path) -> None:
    from test_featvis import _tiny_model

    model = _tiny_model()
    run = ev.RunConfig("none", "none")
    first = ev.run_cached(model, run, "class:pattern", steps=3, seed=0, cache_dir=tmp_path, log=lambda _l: None)
    again = ev.run_cached(model, run, "class:pattern", steps=3, seed=0, cache_dir=tmp_path, log=lambda _l: None)
    other = ev.run_cached(model, run, "class:pattern", steps=3, seed=1, cache_dir=tmp_path, log=lambda _l: None)
    assert not first["cached"] and again["cached"] and not other["cached"]
    assert np.array_equal(first["volume"], again["volume"])
    assert first["curve"] == again["curve"] and first["final"] == again["final"]
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_cli_refuses_a_model_without_lesion_or_atrophy_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from test_featvis import _install_tiny_model

    from neuroexplain.cli.main import main

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    code = main(["evaluate-featvis", "--model", "tinyfv", "--docs", str(tmp_path / "docs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "'lesion' or 'atrophy' class" in err[0]


def test_departure_is_relative_to_the_anchor_and_zero_for_the_anchor_itself() -> None:
    anchor = np.array([[[0.0, 0.5, 1.0]]])
    assert np.allclose(ev.departure(anchor, anchor), 0.0)
    vol = np.array([[[0.2, 1.0, 1.5]]])
    assert np.allclose(ev.departure(vol, anchor), [[[0.2 / PRIOR_FLOOR, 1.0, 0.5]]])
    # A constant anchor ranks voxels as the raw volume does: the top-1% mask is unchanged.
    rng = np.random.default_rng(0)
    v = rng.normal(size=(10, 10, 10))
    assert np.array_equal(ev.top_mask(ev.departure(v, 0.5)), ev.top_mask(v))
    smooth = np.ones((9, 9, 9))
    assert np.allclose(ev.local(smooth, 2.0), 0.0)


def test_uses_template_follows_the_resolved_options() -> None:
    assert ev.uses_template(ev.RunConfig("full", "full"))
    assert ev.uses_template(ev.RunConfig("x", "none", {"prior": 1.0}))
    assert not ev.uses_template(ev.RunConfig("robust", "robust"))
    assert not ev.uses_template(ev.RunConfig("x", "full", {"anchor": "none"}))


# ---------------------------------------------------------------------------------------------------------------------
# The reviewer's protocol (issue 19): feature amplification of held-out scans, full's decay tuned on validation


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    shape = (24, 24, 24)
    brain = _ball(shape, (12, 12, 12), 10.0)
    scan = np.where(brain, 1.0, 0.0)
    mask = _ball(shape, (9, 12, 12), 2.0)
    dilated = ndimage.binary_dilation(mask, iterations=2) & brain
    return scan, mask, dilated, brain


def test_amplification_inside_the_mask_scores_one_and_a_uniform_one_scores_chance() -> None:
    from neuroexplain.lab.evaluate_attribution import chance_levels

    scan, mask, dilated, brain = _scene()
    inside = np.where(mask, 2.0 * scan, scan)
    m = ev.amplification_metrics(inside, scan, mask, dilated, brain)
    assert m["share"] == pytest.approx(1.0) and m["share_dilated"] == pytest.approx(1.0)
    assert m["rank_acc"] == pytest.approx(1.0) and m["max_change"] == pytest.approx(1.0)
    uniform = 1.1 * scan  # the same relative brightening everywhere in the brain
    u = ev.amplification_metrics(uniform, scan, mask, dilated, brain)
    chance = chance_levels(mask, dilated, brain)
    assert u["share"] == pytest.approx(chance["share"]) and u["share_dilated"] == pytest.approx(chance["share_dilated"])
    # a change outside the brain (background brightened) counts against the share
    spill = inside + np.where(brain, 0.0, 0.01)
    assert ev.amplification_metrics(spill, scan, mask, dilated, brain)["share"] < 0.5
    assert ev.amplification_metrics(scan, scan, mask, dilated, brain)["share"] == 0.0  # no change at all
    # atrophy darkens: a darkening inside the mask counts with change="absolute", not as a positive departure
    darker = np.where(mask, 0.5 * scan, scan)
    assert ev.amplification_metrics(darker, scan, mask, dilated, brain, "absolute")["share"] == pytest.approx(1.0)
    assert ev.amplification_metrics(darker, scan, mask, dilated, brain, "absolute")["rank_acc"] == pytest.approx(1.0)
    assert ev.amplification_metrics(darker, scan, mask, dilated, brain)["share"] == 0.0
    with pytest.raises(ValueError, match="'signed' is unknown"):
        ev.amplification_metrics(darker, scan, mask, dilated, brain, "signed")


def test_choose_takes_the_best_then_the_reference_candidate() -> None:
    assert ev.choose({"a": 0.1, "b": 0.3, "c": 0.2}, reference="c") == "b"
    assert ev.choose({"a": 0.3, "b": 0.3, "c": 0.3}, reference="b") == "b"
    assert ev.choose({"a": 0.3, "b": 0.3, "c": 0.1}, reference="c") == "a"
    with pytest.raises(ValueError, match="no candidate"):
        ev.choose({}, reference="a")


def test_protocol_tunes_on_validation_only_and_scores_test_and_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_featvis import GRID, _tiny_model

    from neuroexplain.lab.evaluate_attribution import _Case

    rng = np.random.default_rng(0)

    def case(seed: int) -> _Case:
        x = (0.5 + 0.2 * rng.random(GRID.shape)).astype(np.float32)
        mask = np.zeros(GRID.shape, dtype=bool)
        mask[8:12, 8:12, 8:12] = True
        return _Case(seed, x, mask, ndimage.binary_dilation(mask, iterations=1), np.ones(GRID.shape, dtype=bool))

    cases = {"validation": [case(1), case(3)], "test": [case(11)], "shift": [case(21), case(23)]}
    seen: list[tuple[str, int, str]] = []
    real = ev._amplify

    def spy(model, run, target, split, c, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((split, c.seed, run.name))
        return real(model, run, target, split, c, *args, **kwargs)

    monkeypatch.setattr(ev, "_amplify", spy)
    res = ev.run_featvis_protocol(_tiny_model(), "pattern", cases, steps=2, decays=(0.5, 1.0), log=lambda _l: None)
    t = res["tuning"]
    assert t["chosen"] == max(t["scores"], key=lambda k: (t["scores"][k], k == t["reference"]))
    assert t["seeds"] == [1, 3] and t["reference"] == "full, decay 1"
    # the choice is made before any test or shifted scan is touched; there only none, the chosen candidate and (when
    # it was not chosen) the reference are scored
    first_scored = next(i for i, s in enumerate(seen) if s[0] != "validation")
    assert {s[0] for s in seen[:first_scored]} == {"validation"} and len(seen[:first_scored]) == 4
    assert {s[2] for s in seen[first_scored:]} == {"none", t["chosen"], t["reference"]}
    assert set(res["test"]["rows"]) == {"none", t["chosen"], t["reference"], "chance (brain)"}
    assert res["test"]["seeds"] == [11] and res["shift"]["seeds"] == [21, 23]
    assert res["shift"]["rows"][t["chosen"]]["share"]["n"] == 2
    for name in ("none", t["chosen"], "chance (brain)"):
        for k in res["test"]["rows"][name]:
            drop = res["shift"]["rows"][name][k]["mean"] - res["test"]["rows"][name][k]["mean"]
            assert res["drop_shift_minus_test"][name][k] == pytest.approx(drop)
    table = ev.protocol_markdown(res, "cmd")
    assert "## Shifted test set (n = 2)" in table and f"**{t['chosen']}**" in table and "positive part" in table


def test_protocol_cli_refuses_a_model_without_synthetic_ground_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from test_featvis import _install_tiny_model

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    assert ev.main(["--model", "tinyfv", "--out-dir", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no synthetic ground truth" in err[0]
    assert not (tmp_path / "docs").exists()


def test_protocol_through_the_cli_refuses_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from test_featvis import _install_tiny_model

    from neuroexplain.cli.main import main

    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(_install_tiny_model(tmp_path)))
    assert main(["evaluate-featvis", "--protocol", "--model", "tinyfv", "--docs", str(tmp_path / "docs")]) == 1
    assert "no synthetic ground truth" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()
