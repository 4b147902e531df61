"""``neuroexplain attribute`` and ``evaluate-attribution`` through the real entry point, on a tiny model folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from neuroexplain.attribution import Method
from neuroexplain.cli.commands.attribute import METHOD_NAMES
from neuroexplain.cli.main import main
from neuroexplain.models.registry import MODEL_DIRS_ENV
from neuroexplain.models.spec import LayerInfo, ModelSpec
from neuroexplain.models.zoo import ScanCNN
from neuroexplain.volumes import Grid, nifti_bytes

AFFINE = np.array([[2.0, 0, 0, -16.0], [0, 2.0, 0, -16.0], [0, 0, 2.0, -16.0], [0, 0, 0, 1]])


@pytest.fixture()
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models" / "clitiny"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = ScanCNN(channels=(2, 2, 4, 4), hidden=4)
    torch.save(net.state_dict(), folder / "weights.pt")
    spec = ModelSpec(
        name="clitiny", version="0.0.1", task="test", classes=("healthy", "lesion"), grid=Grid((16, 16, 16), AFFINE),
        architecture="neuroexplain.models.zoo:ScanCNN",
        architecture_kwargs={"channels": [2, 2, 4, 4], "hidden": 4},
        layers=tuple(LayerInfo(f"conv{i}", c, (16 >> (i - 1),) * 3) for i, c in zip(range(1, 5), (2, 2, 4, 4))),
        weights_sha256=hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest(),
    )
    spec.save(folder / "spec.json")
    monkeypatch.setenv(MODEL_DIRS_ENV, str(tmp_path / "models"))
    return folder


@pytest.fixture()
def scan_path(tmp_path: Path) -> Path:
    """An LAS, anisotropic scan (12 x 16 x 20 voxels) covering the tiny model's field of view."""
    rng = np.random.default_rng(0)
    affine = np.array([[-2.5, 0, 0, 14.0], [0, 2.0, 0, -16.0], [0, 0, 1.6, -16.0], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(nifti_bytes(rng.uniform(100, 400, (12, 16, 20)).astype(np.float32), affine))
    return path


def test_cli_method_names_match_the_library() -> None:
    assert list(METHOD_NAMES) == [m.value for m in Method]


def test_attribute_writes_map_png_and_summary(model_dir: Path, scan_path: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out, png, summary = tmp_path / "map.nii.gz", tmp_path / "map.png", tmp_path / "s.json"
    code = main([
        "attribute", str(scan_path), "--model", "clitiny", "--method", "integrated_gradients", "--target", "lesion",
        "--option", "n_steps=2", "--option", "baseline=blur", "-o", str(out), "--png", str(png),
        "--summary", str(summary), "--alignment", "mni", "--local",
    ])
    assert code == 0
    img, src = nib.load(out), nib.load(scan_path)
    assert img.shape == src.shape and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    assert png.read_bytes()[:4] == b"\x89PNG"
    s = json.loads(summary.read_text())
    assert s["method"] == "integrated_gradients" and s["target"] == "lesion" and s["model"] == "clitiny"
    assert s["options"]["n_steps"] == 2 and s["options"]["baseline"] == "blur"
    assert s["notice"] == "research use only — not for diagnosis"
    assert "scan.nii.gz" not in json.dumps(s)  # no file names in results
    assert "map.nii.gz" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "magic"], "method 'magic' is unknown; expected one of"),
        (["--method", "gradient", "--option", "n_steps=3"], "has no option 'n_steps'; its options: none"),
        (["--method", "gradcam", "--option", "layer=conv9"], "layer 'conv9' not found"),
        (["--method", "gradient", "--target", "tumour"], "class 'tumour' is unknown"),
        (["--method", "gradient", "--option", "oops"], "must look like key=value"),
    ],
)
def test_attribute_errors_are_one_line_on_stderr(
    model_dir: Path, scan_path: Path, tmp_path: Path, capsys, argv: list[str], message: str  # type: ignore[no-untyped-def]
) -> None:
    code = main(["attribute", str(scan_path), "--model", "clitiny", "-o", str(tmp_path / "o.nii.gz"), "--local",
                 "--alignment", "center", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o.nii.gz").exists()


def test_evaluate_attribution_refuses_a_model_without_ground_truth(model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["evaluate-attribution", "--model", "clitiny", "--scans", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "has no synthetic ground truth" in err and "'lesion' and 'atrophy'" in err


def test_evaluate_attribution_protocol_runs_from_the_cli(tmp_path: Path) -> None:
    # The smallest protocol (one scan per split): epsilon chosen on validation, the tables and JSON written.
    code = main(["evaluate-attribution", "--protocol", "--model", "lesion", "--validation-scans", "1",
                 "--test-scans", "1", "--shift-scans", "1", "--cascade-scans", "1", "--out-dir", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "attribution-protocol-lesion.json").read_text())
    tuning = res["tuning"]["lrp_epsilon"]
    assert tuning["seeds"] == [3000001] and str(tuning["chosen"]) in tuning["scores"]
    assert "## Test split" in (tmp_path / "attribution-protocol-lesion.md").read_text()
