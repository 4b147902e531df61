"""Mixed precision (issue 21 item 4): the gate, the library's autocast, the runner's choice, and the served path.

The gate's records here are written by the tests (what a spec's ``mixed_precision`` holds); the bundled models'
records are measured by ``neuroexplain evaluate-precision`` (README -> Benchmarks, "Mixed precision").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from scipy.stats import spearmanr

from neuroexplain.errors import InvalidOptionError
from neuroexplain.precision import (
    PREDICT,
    Precision,
    describe,
    effective,
    reduced_operations,
    within_tolerance,
)

RECORD: dict[str, Any] = {"cpu": {
    "float16": {PREDICT: 0.0004, "methods": {"gradcam": 0.999, "gradient": 0.95, "lrp_alpha_beta": None}},
    "bfloat16": {PREDICT: 0.012, "methods": {"gradcam": 0.991}},
}}


def test_the_gate_allows_only_what_was_measured_within_tolerance() -> None:
    assert within_tolerance(RECORD, "cpu", Precision.FLOAT16, PREDICT)
    assert not within_tolerance(RECORD, "cpu", Precision.BFLOAT16, PREDICT)  # 0.012 > 1e-3
    assert within_tolerance(RECORD, "cpu", Precision.FLOAT16, "gradcam")
    assert not within_tolerance(RECORD, "cpu", Precision.FLOAT16, "gradient")  # Spearman 0.95 < 0.99
    assert not within_tolerance(RECORD, "cpu", Precision.FLOAT16, "lrp_alpha_beta")  # failed under autocast
    assert not within_tolerance(RECORD, "cpu", Precision.FLOAT16, "occlusion")  # never measured
    assert not within_tolerance(RECORD, "cuda", Precision.FLOAT16, PREDICT)  # measured on another device type
    assert not within_tolerance({}, "cpu", Precision.FLOAT16, PREDICT)
    assert not within_tolerance({"cpu": {"float16": {PREDICT: float("nan")}}}, "cpu", Precision.FLOAT16, PREDICT)
    assert not within_tolerance({"cpu": {"float16": {PREDICT: True}}}, "cpu", Precision.FLOAT16, PREDICT)
    assert effective(RECORD, "cpu", Precision.FLOAT16, PREDICT) is Precision.FLOAT16
    assert effective(RECORD, "cpu", Precision.FLOAT16, "gradient") is Precision.FLOAT32
    assert effective(RECORD, "cpu", Precision.FLOAT32, PREDICT) is Precision.FLOAT32
    assert reduced_operations(RECORD, "cpu", Precision.FLOAT16) == [PREDICT, "gradcam"]
    assert reduced_operations(RECORD, "cpu", Precision.BFLOAT16) == ["gradcam"]
    assert reduced_operations(RECORD, "cpu", Precision.FLOAT32) == []
    assert describe(RECORD, Precision.FLOAT16) == ("float16 on cpu: predict, gradcam; float32 for the rest and on "
                                                  "other devices")
    assert describe({}, Precision.FLOAT16) == "float16 never measured: float32 everywhere"


def test_an_unknown_precision_names_the_allowed_ones() -> None:
    assert Precision.parse(" Float16 ") is Precision.FLOAT16
    with pytest.raises(InvalidOptionError, match=r"precision 'fp8' is unknown; expected one of \['float32', "
                                                 r"'float16', 'bfloat16'\]"):
        Precision.parse("fp8")


@pytest.fixture(scope="module")
def lesion_input() -> Any:
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
    from neuroexplain.models import load_model
    from neuroexplain.predict import prepare
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import Alignment, Scan

    model = load_model("lesion")
    sample = make_sample(Task.LESION, HELD_OUT_SEED_START + 1)
    scan = Scan(sample.image, MNI_2MM.affine.copy(), "", "nifti1")
    return model, scan, prepare(scan, model, Alignment.MNI)


def test_predict_and_explain_run_the_precision_asked_for(lesion_input: Any) -> None:
    from neuroexplain.attribution import explain
    from neuroexplain.predict import predict_arrays

    model, scan, x = lesion_input
    (p32,) = predict_arrays(model, [x.array], 1, with_features=True)
    (p16,) = predict_arrays(model, [x.array], 1, with_features=True, precision=Precision.FLOAT16)
    assert p16.logits != p32.logits  # the float16 pass really ran
    np.testing.assert_allclose(list(p16.probabilities.values()), list(p32.probabilities.values()), atol=1e-2)
    assert len(p16.features) == len(p32.features) and all(np.isfinite(p16.features))
    m32 = explain(model, scan, "gradcam", prepared=x).model_map
    m16 = explain(model, scan, "gradcam", prepared=x, precision=Precision.FLOAT16).model_map
    assert m16.dtype == np.float32 and not np.array_equal(m16, m32)
    assert spearmanr(m16.ravel(), m32.ravel())[0] > 0.99


def test_the_runner_reduces_only_what_the_spec_allows(lesion_input: Any) -> None:
    from neuroexplain.models.registry import LoadedModel
    from neuroexplain.serving.runner import Runner, run_precision
    from neuroexplain.serving.types import AttributeRequest, CallContext, PredictRequest, ScanInput
    from neuroexplain.volumes import nifti_bytes

    model, scan, _x = lesion_input
    data = nifti_bytes(scan.data, scan.affine)
    measured = LoadedModel(spec=dataclasses.replace(model.spec, mixed_precision=RECORD), module=model.module,
                           device=model.device)
    never = LoadedModel(spec=dataclasses.replace(model.spec, mixed_precision={}), module=model.module,
                        device=model.device)
    assert run_precision(measured, Precision.FLOAT16, PREDICT) is Precision.FLOAT16
    assert run_precision(never, Precision.FLOAT16, PREDICT) is Precision.FLOAT32

    def answers(loaded: LoadedModel, precision: Precision) -> tuple[Any, Any, Any]:
        runner = Runner({"lesion": loaded})
        ref = ScanInput(data=data, digest="")
        predicted = runner.predict(PredictRequest(model="lesion", scan=ref, precision=precision))
        ctx = CallContext()
        maps = [runner.attribute(AttributeRequest(model="lesion", scan=ref, method=m, precision=precision), ctx).nifti
                for m in ("gradcam", "gradient")]
        return predicted.logits, maps[0], maps[1]

    logits32, gradcam32, gradient32 = answers(never, Precision.FLOAT32)
    assert answers(never, Precision.FLOAT16) == (logits32, gradcam32, gradient32)  # nothing measured: float32
    logits16, gradcam16, gradient16 = answers(measured, Precision.FLOAT16)
    assert logits16 != logits32 and gradcam16 != gradcam32  # measured within tolerance: reduced
    assert gradient16 == gradient32  # measured outside tolerance: float32


def test_the_bundled_specs_hold_a_measured_cpu_record() -> None:
    """``evaluate-precision --write-spec`` stored what it measured: both precisions, Predict and all 12 methods."""
    from neuroexplain.attribution.options import Method
    from neuroexplain.models.registry import BUNDLED_DIR
    from neuroexplain.models.spec import ModelSpec

    for name in ("lesion", "atrophy"):
        record = ModelSpec.load(BUNDLED_DIR / name / "spec.json").mixed_precision["cpu"]
        assert record["seeds"][0] == 5_000_000 and record["n_predict"] >= 12
        for precision in ("float16", "bfloat16"):
            assert 0 < record[precision][PREDICT] < 1
            assert set(record[precision]["methods"]) == {m.value for m in Method}


def test_the_setting_reads_the_flag_and_the_environment() -> None:
    import argparse

    from neuroexplain.cli.commands import serve
    from service.config import build_settings

    assert build_settings(environ={}).precision is Precision.FLOAT32
    assert build_settings(environ={"NEUROEXPLAIN_PRECISION": "float16"}).precision is Precision.FLOAT16
    with pytest.raises(InvalidOptionError, match=r"NEUROEXPLAIN_PRECISION='fp8' is not valid; allowed: \['float32', "
                                                 r"'float16', 'bfloat16'\]"):
        build_settings(environ={"NEUROEXPLAIN_PRECISION": "fp8"})
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--precision", "bfloat16"])
    flags = serve.overrides(args)
    assert build_settings(flags, environ={"NEUROEXPLAIN_PRECISION": "float16"}).precision is Precision.BFLOAT16
