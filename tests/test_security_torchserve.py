"""Patient-data hygiene through the TorchServe backend: TorchServe's own logs (access, model, worker, metrics) and the
results hold no header text or file name from a scan, on success and on the error paths.

Needs Java 17 and TorchServe (a failure, not a skip, with ``CI=true``); one TorchServe start (~30-60 s).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import require_binary
from test_security_gateway import PATIENT, _Records, assert_no_patient, expand, identifying_scan
from torchserve_models import tiny_scan_cnn

from neuroexplain import errors
from neuroexplain.serving.types import AttributeRequest, CallContext, PredictRequest, ScanInput

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from handlers.archive import build_archive
    from service.backends.torchserve import TorchServeBackend
    from service.config import Settings

    require_binary("java", "TorchServe needs Java 17")
    root = tmp_path_factory.mktemp("ts-hygiene")
    folder = tiny_scan_cnn(root / "models" / "tinyles")
    store = root / "store"
    store.mkdir()
    build_archive(folder / "spec.json", folder / "weights.pt", store / "tinyles.mar")
    backend = TorchServeBackend(Settings(model_store=store, torchserve_startup_timeout_s=240.0),
                                build_archives=False)
    backend.start()
    try:
        yield backend
    finally:
        backend.close()


def test_torchserve_logs_and_results_hold_no_patient_data(torchserve: Any) -> None:
    raw = identifying_scan()
    assert PATIENT.encode() in expand(raw)
    scan = ScanInput(data=raw, digest=hashlib.sha256(raw).hexdigest())
    logs = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logs)
    try:
        predicted = torchserve.predict(PredictRequest("tinyles", scan), CallContext())
        attributed = torchserve.attribute(AttributeRequest("tinyles", scan, method="gradient", png=True),
                                          CallContext())
        # Error paths inside the worker: a bad option, and a header that breaks decoding after the name was read.
        with pytest.raises(errors.InvalidOptionError) as bad_option:
            torchserve.attribute(AttributeRequest("tinyles", scan, method="integrated_gradients",
                                                  options={"n_steps": "-3"}), CallContext())
        broken = raw[:-200]  # truncated gzip: the header (with the name) decodes, the data does not
        with pytest.raises(errors.NeuroExplainError) as truncated:
            torchserve.predict(PredictRequest("tinyles", ScanInput(broken, hashlib.sha256(broken).hexdigest())),
                               CallContext())
        ts_files = {p: p.read_bytes() for p in torchserve.supervisor.work_dir.rglob("*") if p.is_file()}
        ts_metrics = torchserve.supervisor.metrics_text()
    finally:
        root.removeHandler(logs)
        root.setLevel(old_level)

    assert predicted.predicted_class in ("healthy", "lesion")
    assert_no_patient(attributed.nifti, "the attribution NIfTI")
    assert_no_patient(attributed.png, "the attribution PNG")
    assert_no_patient(attributed.summary_json.encode(), "the attribution summary")
    for exc in (bad_option.value, truncated.value):
        assert_no_patient(str(exc).encode(), "an error message from a worker")
    logs_dir = [p for p in ts_files if "logs" in p.parts]
    assert logs_dir, "TorchServe wrote no logs; the check below would be empty"
    for path, blob in ts_files.items():
        if path.suffix in (".mar", ".pt"):
            continue
        assert_no_patient(path.name.encode(), f"a TorchServe file name ({path.name})")
        assert_no_patient(blob, f"TorchServe's {path.relative_to(torchserve.supervisor.work_dir)}")
    assert_no_patient(ts_metrics.encode(), "TorchServe's metrics")
    assert_no_patient("\n".join(logs.texts).encode(), "the gateway process's logs")
