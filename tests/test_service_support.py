"""Shared helpers of the gateway tests: a tiny real model, small scans, a gateway on a free port, a gated backend.

The ``backend`` fixture is parametrised by backend kind so that the TorchServe work can add ``"torchserve"`` to
``BACKEND_KINDS`` (and a branch in :func:`make_backend_for`) and run every end-to-end test against it too.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from neuroexplain.client import Client
from neuroexplain.models.registry import describe_layers
from neuroexplain.models.zoo import ScanCNN
from neuroexplain.serving.types import CallContext, Progress
from neuroexplain.template import anatomy
from neuroexplain.volumes import Grid, nifti_bytes
from service.config import Settings
from service.grpc.server import GatewayServer, create_server

TINY = "tiny"
TINY_GRID = (18, 22, 18)  # 4 mm voxels over the MNI box
TINY_KWARGS = {"channels": [2, 2, 2, 2], "hidden": 4}
BACKEND_KINDS = ["inprocess", "torchserve"]
# A mixed-precision record written for the tests (the bundled models' are measured): float16 within tolerance for
# predict and gradient_x_input on the CPU, outside it for gradient.
TINY_PRECISION = {"cpu": {"float16": {"predict": 0.0, "methods": {"gradient_x_input": 1.0, "gradient": 0.5}}}}


def test_tiny_model_loads(tiny_model_dir: Path) -> None:
    from neuroexplain.models import load_model

    model = load_model(TINY, model_dirs=(tiny_model_dir,))
    assert model.spec.grid.shape == TINY_GRID
    assert [layer.name for layer in model.spec.layers] == ["conv1", "conv2", "conv3", "conv4"]


def write_tiny_model(parent: Path) -> Path:
    """A real ScanCNN with 2 channels per block on a 4 mm grid: runs in milliseconds."""
    folder = parent / TINY
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)  # a seed whose ReLUs stay alive on template-like scans (gradients non-zero)
    module = ScanCNN(channels=tuple(TINY_KWARGS["channels"]), hidden=4).eval()  # type: ignore[arg-type]
    torch.save(module.state_dict(), folder / "weights.pt")
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-36.0, -44.0, -30.0]
    layers = describe_layers(module, TINY_GRID, ["conv1", "conv2", "conv3", "conv4"])
    spec = {
        "name": TINY, "version": "0.1.0", "task": "test", "classes": ["healthy", "lesion"],
        "grid": {"shape": list(TINY_GRID), "affine": affine.tolist()},
        "architecture": "neuroexplain.models.zoo:ScanCNN", "architecture_kwargs": TINY_KWARGS,
        "layers": [{"name": n, "channels": c, "shape": list(s)} for n, c, s in layers],
        "weights_sha256": hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest(),
        "metrics": {"held_out_accuracy": 0.5},
        "mixed_precision": TINY_PRECISION,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return parent


def make_scan(seed: int = 0, shape: tuple[int, int, int] = (30, 36, 30), voxel_mm: float = 2.5) -> bytes:
    """A small brain in MNI space (the skull-stripped MNI152 template on a box around the tiny model's grid, plus
    seeded noise and a dim background), gzipped NIfTI: ``auto`` alignment takes it as ``mni``, as it should."""
    rng = np.random.default_rng(seed)
    centre = (np.array(shape) - 1) / 2
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -centre * voxel_mm + np.array([0.0, 0.0, 5.0])  # the tiny grid spans z -30..42 mm
    data = 100.0 * anatomy(Grid(shape, affine)).t1 + rng.normal(0, 5, shape) + 10
    return nifti_bytes(np.clip(data, 0, None).astype(np.float32), affine)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models"))


def make_backend_for(kind: str, model_dir: Path) -> Any:
    if kind == "inprocess":
        from service.backends.inprocess import InProcessBackend

        backend = InProcessBackend(model_dirs=(model_dir,), models=(TINY,))
        backend.start()
        return backend
    if kind == "torchserve":  # the same end-to-end tests against a real TorchServe (one start per session)
        from conftest import require_binary

        from handlers.archive import build_archive
        from service.backends.torchserve import TorchServeBackend

        require_binary("java", "the TorchServe backend needs Java 17")
        store = model_dir.parent / f"{model_dir.name}-torchserve-store"
        store.mkdir(exist_ok=True)
        build_archive(model_dir / TINY / "spec.json", model_dir / TINY / "weights.pt", store / f"{TINY}.mar")
        backend = TorchServeBackend(Settings(model_store=store, torchserve_startup_timeout_s=240.0),
                                    build_archives=False)
        backend.start()
        return backend
    raise ValueError(kind)


@pytest.fixture(scope="session", params=BACKEND_KINDS)
def backend(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[Any]:
    b = make_backend_for(request.param, tiny_model_dir)
    yield b
    b.close()


class GatedBackend:
    """A real backend with test controls: hold computations at a gate, slow visualization steps, go down, raise.

    Everything it computes comes from the wrapped backend; it only adds waiting and failures.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.step_delay_s = 0.0
        self.down = False
        self.fail_with: BaseException | None = None
        self.stopped_after_cancel: list[int] = []
        self.ahead: list[str] = []  # a digest of the bytes of each decode_ahead hint the core gave

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def ready(self) -> bool:
        return not self.down and bool(self.inner.ready())

    def models(self) -> list[Any]:
        return list(self.inner.models())

    def collectors(self) -> list[Any]:
        return []  # the wrapped backend's collectors are not re-registered per gateway

    def _enter(self) -> None:
        self.entered.release()
        if not self.gate.wait(30):
            raise TimeoutError("test gate never opened")
        if self.fail_with is not None:
            raise self.fail_with

    def decode_ahead(self, scan: Any, model: str) -> None:
        self.ahead.append(hashlib.sha256(scan.data).hexdigest())
        self.inner.decode_ahead(scan, model)

    def predict(self, request: Any, ctx: CallContext) -> Any:
        self._enter()
        return self.inner.predict(request, ctx)

    def attribute(self, request: Any, ctx: CallContext) -> Any:
        self._enter()
        return self.inner.attribute(request, ctx)

    def visualize(self, request: Any, ctx: CallContext) -> Any:
        self._enter()

        def slow(p: Progress) -> None:
            ctx.on_progress(p)
            time.sleep(self.step_delay_s)

        return self.inner.visualize(request, CallContext(job_id=ctx.job_id, deadline=ctx.deadline,
                                                         is_cancelled=ctx.is_cancelled, on_progress=slow))


@dataclass
class Running:
    server: GatewayServer
    port: int
    registry: CollectorRegistry
    channel: grpc.Channel
    stub: pb_grpc.NeuroExplainStub
    client: Client

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.01)

    def stop(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(0).wait()
        self.server.close()


def start_gateway(backend: Any, tmp: Path, **settings: Any) -> Running:
    """A gateway on a free loopback port with every interceptor installed and a fresh metrics registry."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "health_port": -1,
                              "cache": "disk", "cache_dir": tmp / "cache", "workers": 16}
    values.update(settings)
    registry = CollectorRegistry()
    server, port = create_server(Settings(**values), backend, registry=registry)
    server.start()
    target = f"127.0.0.1:{port}"
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    channel = grpc.insecure_channel(target, options=options)
    return Running(server, port, registry, channel, pb_grpc.NeuroExplainStub(channel), Client(target))


@pytest.fixture()
def gated(backend: Any) -> GatedBackend:
    return GatedBackend(backend)


@pytest.fixture()
def gateway(gated: GatedBackend, tmp_path: Path) -> Iterator[Running]:
    running = start_gateway(gated, tmp_path)
    yield running
    gated.gate.set()
    running.stop()


def scan_msg(data: bytes) -> pb.Scan:
    return pb.Scan(data=data)
