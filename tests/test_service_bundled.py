"""End to end through the bundled ``lesion`` model: a held-out synthetic scan over gRPC gives the library's answer."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_service_support import Running, start_gateway

from neuroexplain import RESEARCH_NOTICE
from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.models.registry import BUNDLED_DIR

pytestmark = pytest.mark.skipif(
    not (BUNDLED_DIR / "lesion" / "weights.pt").exists(), reason="the bundled lesion model is not in this checkout"
)


@pytest.fixture(scope="module")
def lesion_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from service.backends.inprocess import InProcessBackend

    backend = InProcessBackend(models=("lesion",))
    backend.start()
    running = start_gateway(backend, Path(tmp_path_factory.mktemp("bundled")))
    yield running
    running.stop()
    backend.close()


def test_bundled_lesion_over_grpc_matches_the_library(lesion_gateway: Running) -> None:
    from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
    from neuroexplain.models import load_model
    from neuroexplain.predict import predict
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes, read_scan

    sample = make_sample(Task.LESION, HELD_OUT_SEED_START + 7)
    raw = nifti_bytes(sample.image, MNI_2MM.affine)
    info = lesion_gateway.stub.GetModel(pb.GetModelRequest(name="lesion"))
    assert list(info.classes) == ["healthy", "lesion"] and tuple(info.grid_shape) == (80, 96, 80)
    got = lesion_gateway.stub.Predict(pb.PredictRequest(model="lesion", scan=pb.Scan(data=raw)))
    expected = predict(load_model("lesion"), [read_scan(raw)])[0]
    np.testing.assert_allclose(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert got.predicted_class == expected.predicted_class
    assert got.info.model_version == info.version and got.info.notice == RESEARCH_NOTICE
    attr = lesion_gateway.stub.Attribute(
        pb.AttributeRequest(model="lesion", scan=pb.Scan(digest=got.info.scan_digest), method="gradient")
    )
    assert attr.target == got.predicted_class and attr.info.model_version == info.version
    image = nib.Nifti1Image.from_bytes(gzip.decompress(attr.nifti))
    assert image.shape == (80, 96, 80) and np.allclose(image.affine, MNI_2MM.affine)
