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
