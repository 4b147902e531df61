"""Temperature scaling, ECE, NLL, and the temperature applied by predict (known answers, tiny real models)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from neuroexplain import calibration as cal
from neuroexplain.errors import InvalidInputError, InvalidOptionError
from neuroexplain.models import load_model
from neuroexplain.models.registry import LoadedModel
from neuroexplain.models.spec import FeatureStatistics, ModelSpec
from neuroexplain.predict import predict_arrays


def _draw(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, 3))
    p = softmax(logits / true_t, axis=1)
    labels = np.array([rng.choice(3, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with(true_t: float) -> None:
    logits, labels = _draw(4000, true_t)
    t = cal.fit_temperature(logits, labels)
    assert abs(t - true_t) / true_t < 0.1
    assert cal.nll(logits, labels, t) <= cal.nll(logits, labels, 1.0)


def test_ece_known_answer_and_scaling_reduces_it() -> None:
    # Two predictions at confidence 0.9 (one right), two at 0.6 (both right): bins differ by 0.4 each -> ECE 0.4.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    e = cal.expected_calibration_error(p, labels, n_bins=15, n_bootstrap=200)
    assert e.value == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert e.n == 4 and e.n_bins == 15 and e.low <= e.high
    logits, labels = _draw(3000, 3.0, seed=1)
    s = cal.summary(logits, labels, cal.fit_temperature(logits, labels), n_bootstrap=100)
    assert s["after"]["ece"] < s["before"]["ece"]
    assert s["after"]["nll"] < s["before"]["nll"]
    assert s["after"]["accuracy"] == s["before"]["accuracy"]  # temperature never changes the arg-max


def test_reliability_bins_count_every_prediction() -> None:
    logits, labels = _draw(500, 1.0)
    r = cal.reliability(cal.scaled_probabilities(logits), labels, n_bins=15)
    assert sum(r.count) == 500 and len(r.edges) == 16


@pytest.mark.parametrize(
    ("logits", "labels"),
    [(np.zeros((0, 2)), np.zeros(0)), (np.zeros((3, 2)), np.zeros(2)), (np.zeros((2, 2)), np.array([0, 2])),
     (np.array([[np.nan, 0.0]]), np.array([0])), (np.zeros(4), np.zeros(4))],
)
def test_bad_calibration_input_is_a_typed_error(logits: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(InvalidOptionError):
        cal.fit_temperature(logits, labels)


def test_predict_applies_the_spec_temperature_and_keeps_the_class(tiny_arrays: list[np.ndarray]) -> None:
    base = load_model("lesion")
    hot = LoadedModel(spec=replace(base.spec, temperature=3.0), module=base.module, device=base.device)
    plain = LoadedModel(spec=replace(base.spec, temperature=1.0), module=base.module, device=base.device)
    a, b = predict_arrays(plain, tiny_arrays), predict_arrays(hot, tiny_arrays)
    for x, y in zip(a, b):
        assert x.logits == y.logits and x.predicted_class == y.predicted_class
        expected = softmax(np.array(x.logits) / 3.0)
        assert list(y.probabilities.values()) == pytest.approx(list(expected), rel=1e-5)


def test_spec_round_trips_calibration_and_refuses_broken_statistics(tmp_path: Path) -> None:
    spec = load_model("lesion").spec
    stats = FeatureStatistics(mean=np.arange(3.0), precision=np.eye(3) * 2, n=7)
    new = replace(spec, temperature=1.7, evaluation="synthetic only", feature_statistics=stats,
                  input_check={"threshold": 2.0})
    new.save(tmp_path / "spec.json")
    d = json.loads((tmp_path / "spec.json").read_text())
    assert d["feature_statistics"]["precision"][1] == [0.0, 2.0, 0.0]
    back = ModelSpec.load(tmp_path / "spec.json")
    assert back.temperature == 1.7 and back.evaluation == "synthetic only" and back.input_check == {"threshold": 2.0}
    assert back.feature_statistics is not None and back.feature_statistics.n == 7
    assert np.array_equal(back.feature_statistics.precision, stats.precision)
    assert back.sha256() == new.sha256()
    d["feature_statistics"]["precision"] = [[1.0, 0.0]]
    (tmp_path / "spec.json").write_text(json.dumps(d))
    with pytest.raises(InvalidInputError, match="expected"):
        ModelSpec.load(tmp_path / "spec.json")
    d["feature_statistics"] = {"mean": [1.0]}
    (tmp_path / "spec.json").write_text(json.dumps(d))
    with pytest.raises(InvalidInputError, match="needs n, mean"):
        ModelSpec.load(tmp_path / "spec.json")


@pytest.fixture(scope="module")
def tiny_arrays() -> list[np.ndarray]:
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.volumes import normalise

    return [normalise(make_sample(Task.LESION, 1_000_000 + i).image) for i in range(2)]
