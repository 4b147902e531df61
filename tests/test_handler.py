"""The TorchServe custom handler, its wire contract and the archive builder — without starting TorchServe.

The handler is driven exactly as a TorchServe worker drives it (``initialize(context)``, ``handle(rows, context)``)
with tiny real models; TorchServe itself is exercised in ``tests/test_torchserve.py``.
"""

# ruff: noqa: F811  (pytest fixtures imported from torchserve_models are redefined as parameters)
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from torchserve_models import model_dirs, scan, scan_input  # noqa: F401  (fixtures)

from neuroexplain import errors
from neuroexplain.attribution.options import Method
from neuroexplain.serving import codec as env
from neuroexplain.serving.cancel import raise_flag
from neuroexplain.serving.types import (
    Alignment,
    AttributeRequest,
    AttributeResult,
    CallContext,
    Cluster,
    InputCheck,
    NonFinite,
    Operation,
    PredictRequest,
    PredictResult,
    Progress,
    Registration,
    ScanInput,
    StartKind,
    VisualizeRequest,
    VisualizeResult,
)

_scan = scan_input


@pytest.fixture(scope="module")
def models(model_dirs: Path) -> Path:
    return model_dirs


class FakeContext:
    """What a TorchServe worker passes to a handler (the attributes the handler reads)."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], request_ids: dict[int, str] | None = None) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": 0, "batch_size": 4}
        self.manifest = manifest
        self.request_ids = request_ids
        self.metrics = None


def _handler(model_dir: Path, model_file: str | None = None) -> Any:
    from handlers.neuroexplain_handler import NeuroExplainHandler

    handler = NeuroExplainHandler()
    manifest = {"model": {"modelName": model_dir.name, **({"modelFile": model_file} if model_file else {})}}
    handler.initialize(FakeContext(model_dir, manifest))
    return handler


@pytest.fixture(scope="module")
def handler(models: Path) -> Any:
    return _handler(models / "tinyles")


# ---------------------------------------------------------------------------------------------------------------------
# Wire contract


def test_every_domain_type_round_trips() -> None:
    scan = ScanInput(data=b"\x00scan", digest="d" * 64, volume_index=2, alignment=Alignment.MNI,
                     nonfinite=NonFinite.ZERO)
    series = ScanInput(data=b"", digest="e" * 64, instances=(b"\x00one", b"two"), series_uid="1.2.3")
    values = [
        PredictRequest("m", scan),
        PredictRequest("m", series, return_dicom=True, deidentify=True),
        AttributeRequest("m", series, method="gradient", return_dicom=True, dicom_extras=("seg", "sc")),
        PredictResult("m", "1.0.0", (0.5,), {"a": 1.0}, "a", alignment=Alignment.REGISTER,
                      input_check=InputCheck(False, 3.5, 2.0, "far from the training data", ("intensity",)),
                      registration=Registration(0.8, 1.5, tuple(float(i) for i in range(16)))),
        AttributeRequest("m", scan, method="gradient", target="lesion", options={"n_steps": "8"}, png=True),
        VisualizeRequest("m", "neuron:conv2:1:2:3:4", steps=7, seed=3, start=StartKind.SCAN, scan=scan,
                         options={"lr": "0.1"}, preview_every=2),
        VisualizeRequest("m", "class:lesion"),
        PredictResult("m", "1.0.0", (0.25, -1.5), {"healthy": 0.2, "lesion": 0.8}, "lesion"),
        AttributeResult("m", "1.0.0", "gradient", "lesion", nifti=b"N" * 99, total_positive=1.5, total_negative=-0.5,
                        clusters=(Cluster((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), 7, 8.0, 0.9),), png=b"P"),
        VisualizeResult("m", "1.0.0", nifti=b"V", native_nifti=b"W" * 5, objective_curve=(0.1, 0.2)),
        Progress(3, 9, 0.5, preview_png=b"png"),
    ]
    for value in values:
        answer = env.decode(env.encode(env.Kind.RESULT, value))
        assert env.load(type(value), answer.value, answer.blobs) == value
    task, back, job = env.decode_request(env.encode_request(Operation.VISUALIZE, values[5], job_id="job_1"))
    assert (task, back, job) == (Operation.VISUALIZE, values[5], "job_1")
    # The cache stores the same frames: a result round-trips through encode_result/decode_result by its own type.
    for value in values:
        if type(value).__name__.endswith("Result"):
            assert env.decode_result(env.encode_result(value)) == value


def test_scan_bytes_travel_outside_the_json() -> None:
    fields = env.encode_request(Operation.PREDICT, PredictRequest("m", _scan(b"\xff\xfe raw")))
    frame = env.decode(fields["request"])
    assert frame.blobs["scan.data"] == b"\xff\xfe raw"
    assert fields["request"].endswith(b"\xff\xfe raw")  # after the JSON header, raw
    assert b"raw" not in fields["request"][: -len(b"\xff\xfe raw")]


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"request": b"{}"}, errors.InvalidInputError),
        ({"task": b"explode", "request": b"{}"}, errors.InvalidOptionError),
        ({"task": b"predict", "request": b"{not json"}, errors.InvalidInputError),
        ({"task": b"predict"}, errors.InvalidInputError),
        ({"task": b"predict", "request": json.dumps({"model": "m", "scan": {"data": "x", "digest": "d"}}).encode()},
         errors.InvalidInputError),  # JSON is not a frame
        ({"task": b"predict", "request": env.encode(env.Kind.REQUEST, {"model": "m", "scan": {"data": "x", "digest": "d"},
                                                                       "extra": 1})}, errors.InvalidInputError),
        ({"task": b"predict", "request": env.encode(env.Kind.RESULT, {"model": "m"})}, errors.InvalidInputError),
        ({"task": b"predict", "request": env.encode(env.Kind.REQUEST, {"model": "m", "scan": {
            "data": "x", "digest": "d", "alignment": "sideways"}})}, errors.InvalidInputError),
        ({"task": bytearray(b"predict"), "request": env.encode(env.Kind.REQUEST, {"model": "m", "scan": {
            "data": "x", "digest": "d"}}), "job_id": b"../../etc/passwd"}, errors.InvalidOptionError),
    ],
)
def test_malformed_requests_are_refused(row: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        env.decode_request(row)


def test_job_ids_are_restricted_on_the_sending_side_too() -> None:
    with pytest.raises(errors.InvalidOptionError):
        env.encode_request(Operation.VISUALIZE, VisualizeRequest("m", "class:a"), job_id="a/b")


def test_error_envelopes_re_raise_the_same_class() -> None:
    class LibraryCancelled(errors.CancelledError):
        pass

    for exc in (errors.ScanFormatError("bad"), errors.LimitExceededError("big"), LibraryCancelled("gone")):
        with pytest.raises(type(exc).__mro__[0 if type(exc) is not LibraryCancelled else 1], match=str(exc)):
            env.raise_if_error(env.decode(env.encode_error(exc)))
    # Anything outside the project's tree leaves the worker as a generic message: no internals, no input data.
    with pytest.raises(RuntimeError, match="^internal error in the model worker$"):
        env.raise_if_error(env.decode(env.encode_error(KeyError("/secret/path.nii"))))


@pytest.mark.parametrize("raw", [b"", b"NXE", b"<html>500</html>", env.encode(env.Kind.RESULT, {"a": 1}) + b"x"])
def test_foreign_answers_are_unavailable(raw: bytes) -> None:
    with pytest.raises(errors.UnavailableError):
        env.decode(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Handler


def _result(cls: type, raw: bytes) -> Any:
    answer = env.raise_if_error(env.decode(raw))
    return env.load(cls, answer.value, answer.blobs)


def _predict_row(data: bytes, model: str = "tinyles") -> dict[str, Any]:
    # As TorchServe hands it over: field name -> bytearray.
    return {k: bytearray(v) for k, v in env.encode_request(Operation.PREDICT, PredictRequest(model, _scan(data))).items()}


def test_initialize_falls_back_to_cpu_without_cuda(handler: Any) -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert handler.device.type == expected
    assert next(handler.model.module.parameters()).device.type == expected


def test_a_batch_answers_each_request_on_its_own(handler: Any, models: Path, scan: bytes) -> None:
    from service.backends.inprocess import InProcessBackend

    rows = [_predict_row(scan), _predict_row(b"not a scan"), {"task": b"dance", "request": b"{}"}, _predict_row(scan)]
    answers = [env.decode(a) for a in handler.handle(rows, FakeContext(models / "tinyles", {}))]
    assert [a.kind for a in answers] == [env.Kind.RESULT, env.Kind.ERROR, env.Kind.ERROR, env.Kind.RESULT]
    with pytest.raises(errors.ScanFormatError):
        env.raise_if_error(answers[1])
    with pytest.raises(errors.InvalidOptionError):
        env.raise_if_error(answers[2])
    # Same numbers as the in-process backend computes for the same request.
    inprocess = InProcessBackend(model_dirs=(models,))
    inprocess.start()
    expected = inprocess.predict(PredictRequest("tinyles", _scan(scan)), CallContext())
    for answer in (answers[0], answers[3]):
        got = env.load(PredictResult, answer.value, answer.blobs)
        assert got.predicted_class == expected.predicted_class
        assert got.logits == pytest.approx(expected.logits, abs=1e-5)


def test_handler_keeps_no_per_request_state(handler: Any, models: Path, scan: bytes) -> None:
    before = {k: id(v) for k, v in vars(handler).items()}
    handler.handle([_predict_row(scan), _predict_row(b"junk")], FakeContext(models / "tinyles", {}))
    assert {k: id(v) for k, v in vars(handler).items()} == before


def test_a_model_the_worker_does_not_serve_is_not_found(handler: Any, models: Path, scan: bytes) -> None:
    [answer] = handler.handle([_predict_row(scan, model="other")], FakeContext(models / "tinyles", {}))
    with pytest.raises(errors.NotFoundError):
        env.raise_if_error(env.decode(answer))


def test_user_architecture_file_is_loaded_from_the_model_dir(models: Path, scan: bytes) -> None:
    handler = _handler(models / "mynet", model_file="mynet.py")
    [answer] = handler.handle([_predict_row(scan, model="mynet")], FakeContext(models / "mynet", {}))
    result = _result(PredictResult, answer)
    assert set(result.probabilities) == {"a", "b", "c"}


class FakeMetrics:
    """TorchServe's metrics cache as the handler uses it: every counter update, recorded."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, float, list[str]]] = []

    def get_metric(self, name: str, _kind: Any) -> Any:
        metrics = self

        class Counter:
            def add_or_update(self, value: float, dims: list[str]) -> None:
                metrics.updates.append((name, value, dims))

        return Counter()

    def cancels(self) -> list[list[str]]:
        from handlers.neuroexplain_handler import CANCELS_METRIC

        return [dims for name, _v, dims in self.updates if name == CANCELS_METRIC]


@pytest.fixture
def cancel_dir(handler: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cancel"
    folder.mkdir()
    monkeypatch.setattr(handler, "cancel_dir", folder)
    return folder


def test_visualize_streams_progress_and_stops_on_the_cancel_flag(
    handler: Any, models: Path, cancel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import handlers.neuroexplain_handler as module

    sent: list[Progress] = []

    def fake_send(messages: list[bytes], request_ids: dict[int, str], *_args: Any) -> None:
        assert request_ids == {0: "req-0"}
        answer = env.decode(messages[0])
        sent.append(env.load(Progress, answer.value, answer.blobs))
        if len(sent) == 2:  # the gateway raises the flag after the second step
            raise_flag(cancel_dir / "job-7", time.time())

    monkeypatch.setattr(module, "send_intermediate_predict_response", fake_send)
    request = VisualizeRequest("tinyles", "class:lesion", preset="robust", steps=50)
    row = env.encode_request(Operation.VISUALIZE, request, job_id="job-7")
    context = FakeContext(models / "tinyles", {}, request_ids={0: "req-0"})
    context.metrics = FakeMetrics()
    [answer] = handler.handle([row], context)
    with pytest.raises(errors.CancelledError):
        env.raise_if_error(env.decode(answer))
    assert len(sent) == 2, f"the worker ran {len(sent)} steps; it must stop at the first step after the flag"
    assert [p.step for p in sent] == [1, 2]
    # The report: no step finished after the flag was raised (it was raised between steps 2 and 3).
    assert context.metrics.cancels() == [["tinyles", "visualize", "0"]]
    assert not list(cancel_dir.iterdir()), "the worker removes the flag when the job ends"
    # The same worker serves the next request normally.
    [answer] = handler.handle(
        [env.encode_request(Operation.VISUALIZE, VisualizeRequest("tinyles", "class:lesion", steps=2), job_id="job-8")],
        FakeContext(models / "tinyles", {}),
    )
    result = _result(VisualizeResult, answer)
    assert len(result.objective_curve) == 2 and result.nifti[:2] == b"\x1f\x8b"


def _count_passes(handler: Any, raise_flag_at: int | None, flag: Path) -> tuple[list[int], Any]:
    """Counts the model's forward passes (attribution deep-copies the model, hooks included) and raises the job's
    cancel flag when pass ``raise_flag_at`` begins — from inside the computation, as a gateway would mid-run."""
    import time

    passes = [0]

    def pre_hook(_module: Any, _inputs: Any) -> None:
        passes[0] += 1
        if passes[0] == raise_flag_at:
            raise_flag(flag, time.time())

    return passes, handler.model.module.register_forward_pre_hook(pre_hook)


def test_attribute_stops_within_a_pass_of_the_cancel_flag(
    handler: Any, models: Path, cancel_dir: Path, scan: bytes
) -> None:
    # 64 integration steps, one pass each: the flag rises as pass 5 begins.
    request = AttributeRequest("tinyles", _scan(scan), method="integrated_gradients",
                               options={"n_steps": "64", "internal_batch_size": "1"})  # fmt: skip
    passes, hook = _count_passes(handler, 5, cancel_dir / "job-a")
    context = FakeContext(models / "tinyles", {})
    context.metrics = FakeMetrics()
    try:
        [answer] = handler.handle([env.encode_request(Operation.ATTRIBUTE, request, job_id="job-a")], context)
    finally:
        hook.remove()
    with pytest.raises(errors.CancelledError):
        env.raise_if_error(env.decode(answer))
    assert passes[0] == 5, f"the worker ran {passes[0]} passes; the flag rose during pass 5"
    assert context.metrics.cancels() == [["tinyles", "attribute", "0"]]
    assert not list(cancel_dir.iterdir())
    # Without a flag the same request runs to the end on the same worker.
    passes, hook = _count_passes(handler, None, cancel_dir / "job-b")
    try:
        [answer] = handler.handle([env.encode_request(Operation.ATTRIBUTE, request, job_id="job-b")], context)
    finally:
        hook.remove()
    assert _result(AttributeResult, answer).method == "integrated_gradients" and passes[0] >= 64


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_every_attribution_method_honours_a_raised_flag(
    handler: Any, models: Path, cancel_dir: Path, scan: bytes, method: str
) -> None:
    # Methods that call the model themselves (LRP, guided backprop, DeepLIFT, Grad-CAM) run one or two passes; the
    # library polls the flag before the first, so a raised flag stops every method before any attribution pass.
    import time

    raise_flag(cancel_dir / "job-m", time.time())
    passes, hook = _count_passes(handler, None, cancel_dir / "job-m")
    try:
        [answer] = handler.handle(
            [env.encode_request(Operation.ATTRIBUTE, AttributeRequest("tinyles", _scan(scan), method=method),
                                job_id="job-m")],
            FakeContext(models / "tinyles", {}),
        )  # fmt: skip
    finally:
        hook.remove()
    with pytest.raises(errors.CancelledError):
        env.raise_if_error(env.decode(answer))
    assert passes[0] == 1, "only the pass that computes the probabilities (before the first poll) may run"


# ---------------------------------------------------------------------------------------------------------------------
# Archives and the package command


def test_archive_holds_handler_spec_weights_and_model_config(models: Path, tmp_path: Path) -> None:
    from handlers.archive import ArchiveConfig, build_archive

    out = build_archive(models / "tinyles" / "spec.json", models / "tinyles" / "weights.pt", tmp_path / "t.mar",
                        config=ArchiveConfig(batch_size=4, response_timeout_s=77, startup_timeout_s=55))
    with zipfile.ZipFile(out) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        names = set(z.namelist())
    assert manifest["model"]["modelName"] == "tinyles" and manifest["model"]["modelVersion"] == "1.0.0"
    assert manifest["model"]["handler"] == "neuroexplain_handler.py"
    assert {"spec.json", "weights.pt", "neuroexplain_handler.py", "model-config.yaml"} <= names
    assert config == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 77,
                      "startupTimeout": 55}


def test_archive_refuses_weights_that_do_not_match_the_spec(models: Path, tmp_path: Path) -> None:
    from handlers.archive import build_archive

    with pytest.raises(errors.InvalidInputError, match="digest"):
        build_archive(models / "tinyles" / "spec.json", models / "mynet" / "weights.pt", tmp_path / "x.mar")
    assert not (tmp_path / "x.mar").exists()


def test_bundled_archives_are_rebuilt_only_when_stale(models: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from handlers.archive import ArchiveConfig, ensure_bundled_archives

    only = tmp_path / "dirs"
    only.mkdir()
    (only / "tinyles").symlink_to(models / "tinyles")
    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(only))
    store = tmp_path / "store"
    built = ensure_bundled_archives(store)
    assert store / "tinyles.mar" in built
    first = (store / "tinyles.mar").stat().st_mtime_ns
    ensure_bundled_archives(store)
    assert (store / "tinyles.mar").stat().st_mtime_ns == first  # up to date: not rebuilt
    ensure_bundled_archives(store, ArchiveConfig(batch_size=2))
    assert (store / "tinyles.mar").stat().st_mtime_ns != first  # config changed: rebuilt


def test_package_command_builds_a_users_archive(models: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from neuroexplain.cli.main import main

    folder = models / "mynet"
    out = tmp_path / "mynet.mar"
    code = main(["package", "--spec", str(folder / "spec.json"), "--weights", str(folder / "weights.pt"),
                 "--model-file", str(folder / "mynet.py"), "-o", str(out), "--batch-size", "2"])
    assert code == 0 and out.is_file()
    with zipfile.ZipFile(out) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelFile"] == "mynet.py"
    assert main(["package", "--spec", str(folder / "spec.json"), "--weights", str(folder / "weights.pt"),
                 "-o", str(tmp_path / "mynet.zip")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "neuroexplain package: error: the archive name must end in .mar"


def test_metrics_yaml_declares_what_the_handler_emits() -> None:
    from handlers import neuroexplain_handler as module

    declared = yaml.safe_load((Path(module.__file__).parent / "metrics.yaml").read_text())["model_metrics"]["counter"]
    dims = {m["name"]: m["dimensions"] for m in declared}
    assert dims[module.REQUESTS_METRIC] == ["ModelName", "Task", "Outcome"]
    assert dims[module.SECONDS_METRIC] == ["ModelName"]
    assert dims[module.CANCELS_METRIC] == ["ModelName", "Task", "AfterFlag"]


def test_the_cuda_benchmark_refuses_to_run_without_cuda() -> None:
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    done = subprocess.run([sys.executable, "-m", "bench.bench_torchserve", "--device", "cuda"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "bench torchserve --device cuda:" in done.stderr and ("CPU build" in done.stderr or "no CUDA" in done.stderr)
    assert done.stdout == ""  # nothing measured, nothing saved


def test_the_gateway_builds_archives_in_a_subprocess_with_the_settings_options(models: Path, tmp_path: Path) -> None:
    """The TorchServe backend never imports handlers or torch: it runs ``python -m handlers.archive`` with the
    Settings' workers, batch size, batch delay and timeouts, and the one model-directories setting."""
    from service.backends.torchserve import archive_command, build_archives
    from service.config import Settings

    only = tmp_path / "dirs"
    only.mkdir()
    (only / "tinyles").symlink_to(models / "tinyles")
    settings = Settings(model_dirs=(only,), torchserve_workers=2, torchserve_batch_size=3,
                        torchserve_batch_delay_ms=7, torchserve_response_timeout_s=99, torchserve_startup_timeout_s=44)
    store = tmp_path / "store"
    assert archive_command(settings, store)[1:4] == ["-m", "handlers.archive", str(store)]
    build_archives(settings, store)
    with zipfile.ZipFile(store / "tinyles.mar") as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert config == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 3, "maxBatchDelay": 7, "responseTimeout": 99,
                      "startupTimeout": 44}
    with pytest.raises(errors.InvalidInputError, match="building the model archives failed: .*batch_size"):
        build_archives(_BadBatch(settings), store)


class _BadBatch:
    """Settings whose archive options the archiver refuses (batch size 0), to see the one-line reason come back."""

    def __init__(self, settings: Any) -> None:
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        return 0 if name == "torchserve_batch_size" else getattr(self._settings, name)
