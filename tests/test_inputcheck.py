"""Input check: in-distribution scans pass, the listed out-of-distribution cases are flagged with a reason a person
understands, models without statistics say which checks ran, and the feature hook never leaks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroexplain import inputcheck as ic
from neuroexplain.lab.ood import OodCase, cases
from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
from neuroexplain.models import load_model
from neuroexplain.models.registry import LoadedModel
from neuroexplain.models.zoo import ScanCNN
from neuroexplain.predict import penultimate_layer, predict_arrays, prepare
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import Alignment, Scan


def _scan(data: np.ndarray) -> Scan:
    return Scan(data=data, affine=MNI_2MM.affine.copy(), digest="", format="nifti1")


@pytest.fixture(scope="module")
def lesion() -> LoadedModel:
    return load_model("lesion")


@pytest.fixture(scope="module")
def ood() -> dict[str, OodCase]:
    return {c.name: c for c in cases(Task.LESION)}


def test_bundled_models_carry_their_calibration() -> None:
    for name, version in (("lesion", "1.1.0"), ("atrophy", "1.2.0")):
        spec = load_model(name).spec
        assert spec.version == version
        assert spec.feature_statistics is not None and spec.feature_statistics.mean.shape == (64,)
        assert set(spec.input_check["centre"]) == set(ic.CHECKS)
        assert spec.temperature > 0 and "synthetic" in spec.evaluation
        assert (spec.temperature != 1.0) == (name == "lesion")  # atrophy: no validation error, T not identifiable
        ranges = spec.input_check["seed_ranges"]
        used = [tuple(ranges[k]) for k in ("calibration", "validation", "test")]
        assert len({r[0] for r in used}) == 3  # disjoint starts ...
        assert all(a[1] < b[0] or b[1] < a[0] for i, a in enumerate(used) for b in used[i + 1 :])  # ... and ranges


@pytest.mark.parametrize("seed", [HELD_OUT_SEED_START + 3, HELD_OUT_SEED_START + 8])
def test_in_distribution_test_scans_pass(lesion: LoadedModel, seed: int) -> None:
    prepared = prepare(_scan(make_sample(Task.LESION, seed).image), lesion, Alignment.MNI)
    check = ic.check_input(lesion, prepared, predict_arrays(lesion, [prepared.array], with_features=True)[0])
    assert check.in_distribution, check.reason
    assert check.score <= check.threshold
    assert [c.name for c in check.checks] == list(ic.CHECKS)
    assert check.reason.startswith("looks like the training scans")


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("constant", "signal outside the template's brain"),
        ("uniform_noise", "signal outside the template's brain"),
        ("inverted", "contrast unlike T1"),
        ("skull_shell", "signal outside the template's brain"),
        ("misregistered_30mm", "does not match the template after alignment"),
        ("misregistered_20deg", "does not match the template after alignment"),
        ("slab_8_slices", "field of view too small"),
        ("binary_mask", "contrast unlike T1"),
        ("t2_like", "contrast unlike T1"),
        ("cropped_fov", "field of view too small"),
        ("nibabel_anatomical", "template"),
        ("nibabel_example4d_vol0", "contrast unlike T1"),
    ],
)
def test_every_listed_case_read_as_mni_is_flagged_with_a_reason(lesion: LoadedModel, ood: dict[str, OodCase], case: str, words: str) -> None:
    c = ood[case]
    prepared = prepare(c.scan, lesion, Alignment.MNI)
    check = ic.check_input(lesion, prepared)  # no prediction given: the check runs the forward pass itself
    assert not check.in_distribution
    assert check.score > check.threshold
    assert words in check.reason


def test_model_without_statistics_runs_image_checks_and_says_so(lesion: LoadedModel, ood: dict[str, OodCase]) -> None:
    bare = LoadedModel(spec=replace(lesion.spec, input_check={}, feature_statistics=None), module=lesion.module,
                       device=lesion.device)
    c = ood["skull_shell"]
    check = ic.check_input(bare, prepare(c.scan, bare, Alignment.MNI))
    assert [r.name for r in check.checks] == list(ic.IMAGE_CHECKS)
    assert "feature check not run" in check.reason and "default calibration" in check.reason
    assert not check.in_distribution


def test_features_are_the_input_of_the_last_linear_layer(lesion: LoadedModel) -> None:
    x = prepare(_scan(make_sample(Task.LESION, HELD_OUT_SEED_START + 1).image), lesion, Alignment.MNI).array
    p = predict_arrays(lesion, [x], with_features=True)[0]
    m = lesion.module
    assert isinstance(m, ScanCNN)
    with torch.inference_mode():
        t = torch.from_numpy(x)[None, None]
        t = m.pool3(m.conv3(m.pool2(m.conv2(m.pool1(m.conv1(t))))))
        pooled = torch.flatten(m.global_pool(m.conv4(t)), 1)[0]
    assert np.allclose(p.features, pooled.numpy(), atol=1e-5)
    assert predict_arrays(lesion, [x])[0].features == ()


def test_feature_hook_is_removed_when_the_forward_pass_raises(lesion: LoadedModel) -> None:
    head = penultimate_layer(lesion.module)
    assert head is not None
    before = len(head._forward_pre_hooks)
    with pytest.raises(RuntimeError):
        predict_arrays(lesion, [np.zeros((4, 4, 4), dtype=np.float32)], with_features=True)  # wrong shape
    assert len(head._forward_pre_hooks) == before


def test_check_says_mni_misregistration_but_center_alignment_fixes_a_shift(lesion: LoadedModel, ood: dict[str, OodCase]) -> None:
    c = ood["misregistered_30mm"]
    assert not ic.check_input(lesion, prepare(c.scan, lesion, Alignment.MNI)).in_distribution
    # The same scan with its centre of mass aligned (a pure translation) is in distribution again.
    assert ic.check_input(lesion, prepare(c.scan, lesion, Alignment.CENTER)).in_distribution


def test_reject_mode_answers_failed_precondition_with_the_reason(lesion: LoadedModel, ood: dict[str, OodCase]) -> None:
    from neuroexplain.errors import FailedPreconditionError, InvalidOptionError

    c = ood["inverted"]
    flagged = ic.check_input(lesion, prepare(c.scan, lesion, Alignment.MNI))
    ic.enforce(flagged, ic.InputCheckMode.WARN)  # warn answers
    with pytest.raises(FailedPreconditionError, match="contrast unlike T1") as err:
        ic.enforce(flagged, ic.InputCheckMode.parse("reject"))
    assert err.value.code == "FAILED_PRECONDITION"
    ok = ic.check_input(lesion, prepare(_scan(make_sample(Task.LESION, HELD_OUT_SEED_START).image), lesion,
                                         Alignment.MNI))
    ic.enforce(ok, ic.InputCheckMode.REJECT)
    with pytest.raises(InvalidOptionError, match="warn"):
        ic.InputCheckMode.parse("strict")
    assert set(ok.to_dict()) == {"in_distribution", "score", "threshold", "reason"}
    assert set(ok.to_dict(detail=True)["checks"]) == set(ic.CHECKS)


def test_spec_digest_changes_with_the_calibration(lesion: LoadedModel) -> None:
    spec = lesion.spec
    assert spec.sha256() == replace(spec).sha256()
    assert replace(spec, temperature=spec.temperature + 0.1).sha256() != spec.sha256()
    assert replace(spec, input_check={**spec.input_check, "threshold": 0.0}).sha256() != spec.sha256()


def test_evaluate_input_check_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from neuroexplain.cli.main import main

    assert main(["evaluate-input-check", "--model", "lesion", "--n", "5"]) == 1
    assert "--n 5 is out of range" in capsys.readouterr().err
    assert main(["evaluate-input-check", "--model", "mine"]) == 1


def test_default_calibration_passes_test_scans_and_flags_the_shell(lesion: LoadedModel, ood: dict[str, OodCase]) -> None:
    bare = LoadedModel(spec=replace(lesion.spec, input_check={}, feature_statistics=None), module=lesion.module,
                       device=lesion.device)
    scan = _scan(make_sample(Task.LESION, HELD_OUT_SEED_START + 5).image)
    assert ic.check_input(bare, prepare(scan, bare, Alignment.MNI)).in_distribution
    assert not ic.check_input(bare, prepare(ood["skull_shell"].scan, bare, Alignment.MNI)).in_distribution


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40_000), kind=st.sampled_from(["uniform", "ties", "skewed", "half zero", "constant"]),
       seed=st.integers(0, 2**32 - 1))
def test_contrast_quantiles_are_those_of_the_sorted_values_bit_for_bit(n: int, kind: str, seed: int) -> None:
    # The contrast check's quantiles come from bucketed order statistics, not a full sort: they must be what
    # interpolating the sorted values gives (np.quantile's linear method), exactly, whatever the values look like.
    rng = np.random.default_rng(seed)
    v = {"uniform": lambda: rng.random(n), "ties": lambda: rng.integers(0, 30, n),
         "skewed": lambda: rng.exponential(1.0, n) ** 3,
         "half zero": lambda: np.concatenate([np.zeros(n // 2), rng.random(n - n // 2)]),
         "constant": lambda: np.full(n, 0.7)}[kind]().astype(np.float32)
    s = np.sort(v).astype(np.float64)
    pos = ic._QUANTILES * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    np.testing.assert_array_equal(ic._quantiles(v), s[lo] + (s[hi] - s[lo]) * (pos - lo))
    np.testing.assert_allclose(ic._quantiles(v), np.quantile(v.astype(np.float64), ic._QUANTILES), rtol=1e-12)
