"""Tiny real models on disk for the handler and TorchServe tests (8 mm MNI grid, a few hundred parameters), and the
fixtures both test modules share (import them: ``from torchserve_models import model_dirs, scan``)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neuroexplain.models.registry import describe_layers
from neuroexplain.models.spec import LayerInfo, ModelSpec
from neuroexplain.models.zoo import ScanCNN
from neuroexplain.serving.types import ScanInput
from neuroexplain.volumes import Grid, nifti_bytes

# An 8 mm grid over the bundled models' MNI box: the template resamples onto it, so alignment works as in production.
GRID = Grid((20, 24, 20), np.array([[8.0, 0, 0, -80], [0, 8.0, 0, -112], [0, 0, 8.0, -72], [0, 0, 0, 1]]))

USER_ARCHITECTURE = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """A user's own architecture, outside the neuroexplain package."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
'''


def _save(folder: Path, module: torch.nn.Module, spec: ModelSpec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), folder / "weights.pt")
    digest = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
    layers = describe_layers(module.eval(), GRID.shape, [l.name for l in spec.layers])
    spec = ModelSpec.from_dict({**spec.to_dict(), "weights_sha256": digest,
                                "layers": [{"name": n, "channels": c, "shape": list(s)} for n, c, s in layers]})
    spec.save(folder / "spec.json")
    return folder


def tiny_scan_cnn(folder: Path, name: str = "tinyles", seed: int = 0) -> Path:
    """A ScanCNN (the bundled architecture) with 2 channels per block, random weights, saved as a model folder."""
    torch.manual_seed(seed)
    module = ScanCNN(channels=(2, 2, 2, 2), hidden=4)
    spec = ModelSpec(
        name=name, version="1.0.0", task="lesion", classes=("healthy", "lesion"), grid=GRID,
        architecture="neuroexplain.models.zoo:ScanCNN",
        architecture_kwargs={"channels": [2, 2, 2, 2], "hidden": 4},
        layers=tuple(LayerInfo(f"conv{i}", 2, (1, 1, 1)) for i in range(1, 5)),
    )
    return _save(folder, module, spec)


def tiny_archive_store(root: Path) -> Path:
    """A TorchServe model store under ``root`` holding one archive, ``tinyles.mar`` (:func:`tiny_scan_cnn`)."""
    from handlers.archive import build_archive

    folder = tiny_scan_cnn(root / "models" / "tinyles")
    store = root / "store"
    store.mkdir()
    build_archive(folder / "spec.json", folder / "weights.pt", store / "tinyles.mar")
    return store


def user_model(folder: Path, name: str = "mynet") -> Path:
    """A user's model: architecture in ``mynet.py`` beside the spec (``mynet.py:MyNet``), three classes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mynet.py").write_text(USER_ARCHITECTURE)
    namespace: dict[str, object] = {}
    exec(compile(USER_ARCHITECTURE, "mynet.py", "exec"), namespace)  # noqa: S102 - our own test source
    torch.manual_seed(1)
    module = namespace["MyNet"]()  # type: ignore[operator]
    spec = ModelSpec(
        name=name, version="0.3.0", task="custom", classes=("a", "b", "c"), grid=GRID,
        architecture="mynet.py:MyNet", layers=(LayerInfo("features", 3, (20, 24, 20)),),
    )
    return _save(folder, module, spec)


def scan_bytes(seed: int = 1_000_001) -> bytes:
    """A synthetic lesion scan resampled onto the 8 mm grid, as gzipped NIfTI bytes."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    from neuroexplain.template import anatomy

    t1 = anatomy(GRID).t1.astype(np.float32)
    image = ndimage.gaussian_filter(t1, 0.5) * (600 + 50 * rng.random()) + rng.normal(0, 5, t1.shape)
    return nifti_bytes(image.astype(np.float32), GRID.affine)


def scan_input(data: bytes) -> ScanInput:
    """The scan as the gateway's core hands it to a backend: bytes and their digest."""
    return ScanInput(data=data, digest=hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tinyles`` (the bundled architecture) and ``mynet`` (a user's architecture file) under one folder."""
    root = tmp_path_factory.mktemp("models")
    tiny_scan_cnn(root / "tinyles")
    user_model(root / "mynet")
    return root


@pytest.fixture(scope="module")
def scan() -> bytes:
    return scan_bytes()


def cancel_reports(backend: Any, model: str, task: str) -> dict[str, float]:
    """The handler's ``NeuroExplainCancels`` counters for ``model``/``task`` as the gateway re-exports them:
    AfterFlag label -> count."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    for collector in backend.collectors():
        registry.register(collector)
    return {
        s.labels["AfterFlag"]: s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "NeuroExplainCancels_total" and s.labels.get("ModelName") == model and s.labels.get("Task") == task
    }


def next_cancel_report(backend: Any, model: str, task: str, before: dict[str, float], timeout: float = 30.0) -> int:
    """Waits for the one cancel the worker reports after ``before`` (TorchServe parses the worker's metric lines
    asynchronously) and returns its AfterFlag: the steps or passes that still ran after the flag was raised."""
    deadline = time.monotonic() + timeout
    while True:
        now = cancel_reports(backend, model, task)
        grown = [label for label, count in now.items() if count > before.get(label, 0.0)]
        if sum(now.values()) >= sum(before.values()) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(now.values()) == sum(before.values()) + 1 and len(grown) == 1, (before, now)
    return 10 if grown[0].endswith("+") else int(grown[0])
