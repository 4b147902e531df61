"""Model zoo: specs, registry, user models, and the bundled models' held-out accuracy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroexplain.errors import InvalidInputError, NotFoundError
from neuroexplain.lab.synthetic import HELD_OUT_SEED_START, Task, make_sample
from neuroexplain.models import list_specs, load_from_files, load_model
from neuroexplain.models.spec import ModelSpec
from neuroexplain.predict import predict, predict_arrays
from neuroexplain.volumes import Alignment, Grid, nifti_bytes, normalise, read_scan

TARGETS = {"lesion": 0.95, "atrophy": 0.90}
USER_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.conv(x)).mean((2, 3, 4)), 1))
'''


def _user_model(folder: Path, tamper: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "tiny.py").write_text(USER_MODEL)
    namespace: dict[str, object] = {}
    exec(USER_MODEL, namespace)  # noqa: S102 - the same class the registry will import from the file
    torch.manual_seed(0)
    module = namespace["Tiny"](width=2)  # type: ignore[operator]
    torch.save(module.state_dict(), folder / "weights.pt")
    digest = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
    spec = {
        "name": "tiny", "version": "0.1.0", "task": "test", "classes": ["a", "b", "c"],
        "grid": {"shape": [12, 14, 10], "affine": np.diag([4.0, 4.0, 4.0, 1.0]).tolist()},
        "architecture": "tiny.py:Tiny", "architecture_kwargs": {"width": 2},
        "layers": [{"name": "conv", "channels": 2, "shape": [12, 14, 10]}],
        "weights_sha256": "0" * 64 if tamper else digest,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


def test_user_model_found_through_env_and_predicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_model(tmp_path / "models" / "tiny")
    monkeypatch.setenv("NEUROEXPLAIN_MODEL_DIRS", str(tmp_path / "models"))
    assert "tiny" in [s.name for s in list_specs()]
    model = load_model("tiny")
    assert model.spec.classes == ("a", "b", "c")
    assert model.layer("conv").out_channels == 2
    rng = np.random.default_rng(0)
    scan = read_scan(nifti_bytes(rng.random((30, 30, 30)) + 0.1, np.diag([2.0, 2.0, 2.0, 1.0])))
    (pred,) = predict(model, [scan], alignment=Alignment.MNI)  # noise: auto would (rightly) refuse to register it
    assert set(pred.probabilities) == {"a", "b", "c"}
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    assert pred.predicted_class == max(pred.probabilities, key=pred.probabilities.__getitem__)


def test_tampered_weights_refused(tmp_path: Path) -> None:
    folder = _user_model(tmp_path / "bad", tamper=True)
    with pytest.raises(InvalidInputError, match="digest"):
        load_from_files(folder / "spec.json", folder / "weights.pt")


def test_unknown_model_and_layer_name_what_exists() -> None:
    with pytest.raises(NotFoundError, match=r"model 'nope' not found; available models: \[.*'lesion'"):
        load_model("nope")
    model = load_model("lesion")
    with pytest.raises(NotFoundError, match=r"layers: \['conv1', 'conv2', 'conv3', 'conv4'\]"):
        model.layer("fc9")


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = load_model("lesion").spec
    spec.save(tmp_path / "spec.json")
    again = ModelSpec.load(tmp_path / "spec.json")
    assert again.to_dict() == spec.to_dict()
    assert again.grid == Grid(spec.grid.shape, spec.grid.affine)


def test_predict_is_deterministic_and_batch_independent() -> None:
    model = load_model("lesion")
    arrays = [normalise(make_sample(Task.LESION, HELD_OUT_SEED_START + i).image) for i in range(3)]
    one_by_one = [predict_arrays(model, [a])[0].logits for a in arrays]
    batched = [p.logits for p in predict_arrays(model, arrays, batch_size=3)]
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-4)
    assert predict_arrays(model, arrays[:1])[0] == predict_arrays(model, arrays[:1])[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bundled_model_meets_accuracy_on_fresh_held_out_scans(name: str) -> None:
    model = load_model(name)
    assert model.spec.metrics["held_out_n"] >= 200
    assert model.spec.metrics["held_out_accuracy"] >= TARGETS[name]
    # Fresh seeds, past the range the spec's own evaluation used; through the full bytes -> predict path.
    start = model.spec.metrics["held_out_seeds"][1] + 1
    samples = [make_sample(Task(name), seed) for seed in range(start, start + 40)]
    scans = [read_scan(nifti_bytes(s.image, model.spec.grid.affine)) for s in samples]
    predictions = predict(model, scans)
    accuracy = np.mean([p.predicted_class == model.spec.classes[s.label] for p, s in zip(predictions, samples)])
    assert accuracy >= TARGETS[name] - 0.05, f"{name}: {accuracy:.3f} on 40 fresh held-out scans"
