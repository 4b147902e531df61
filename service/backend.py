"""The Backend protocol and the transport-neutral domain types the gateway core and every backend share.

Nothing here knows gRPC or torch: the servicer converts wire messages to these types, the core validates them and
calls one backend method, and a backend (in-process library calls, or TorchServe) computes the result.

A backend receives the scan's bytes, its digest and — where the core already decoded it to validate it — the decoded
:class:`neuroexplain.volumes.Scan`, so an in-process backend does not decode twice while a remote backend can ship
the original bytes.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from neuroexplain import RESEARCH_NOTICE

if TYPE_CHECKING:
    from neuroexplain.volumes import Scan

NOTICE = RESEARCH_NOTICE


class Operation(enum.Enum):
    """What a request asks for; the ``operation`` label of metrics and part of every cache key."""

    PREDICT = "predict"
    ATTRIBUTE = "attribute"
    VISUALIZE = "visualize"


class StartKind(enum.Enum):
    """Where a visualization starts."""

    NOISE = "noise"
    TEMPLATE = "template"
    SCAN = "scan"


# ---------------------------------------------------------------------------------------------------------------------
# Model metadata


@dataclass(frozen=True)
class OptionInfo:
    """One option of an attribution method or visualization preset, for discovery (ListModels/GetModel)."""

    name: str
    type: str  # int | float | string | bool | enum
    default: str
    allowed: str = ""
    description: str = ""


@dataclass(frozen=True)
class MethodInfo:
    """An attribution method or a visualization preset and its options."""

    name: str
    description: str = ""
    options: tuple[OptionInfo, ...] = ()


@dataclass(frozen=True)
class LayerSummary:
    name: str
    channels: int
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about a served model.

    ``weights_sha256`` is part of every cache key, so a backend must report the digest of the weights it really runs.
    """

    name: str
    version: str
    task: str
    classes: tuple[str, ...]
    grid_shape: tuple[int, int, int]
    grid_affine: tuple[float, ...]  # 16 values, row-major
    voxel_mm: tuple[float, float, float]
    weights_sha256: str
    layers: tuple[LayerSummary, ...] = ()
    attribution_methods: tuple[MethodInfo, ...] = ()
    visualization_presets: tuple[MethodInfo, ...] = ()
    held_out_accuracy: float | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class ScanInput:
    """A scan as the core resolved it: bytes as received, their SHA-256 and reading options.

    Attributes:
        data: the file's bytes (NIfTI-1/-2, MGH/MGZ, optionally gzipped).
        digest: lower-case hex SHA-256 of ``data``; the only identifier logs, metrics and caches may use.
        volume_index: volume of a 4D scan, or None for 3D.
        alignment: ``auto`` | ``mni`` | ``center`` (``neuroexplain.volumes.Alignment`` values).
        nonfinite: ``reject`` | ``zero`` (``neuroexplain.volumes.NonFinite`` values).
        decoded: the validated volume when the core decoded it already (in-process use); backends that ship bytes
            elsewhere ignore it. Excluded from equality and hashing.
    """

    data: bytes
    digest: str
    volume_index: int | None = None
    alignment: str = "auto"
    nonfinite: str = "reject"
    decoded: Scan | None = field(default=None, compare=False, hash=False, repr=False)

    def options_key(self) -> dict[str, Any]:
        """Reading options that change the result (part of the cache key)."""
        return {"volume_index": self.volume_index, "alignment": self.alignment, "nonfinite": self.nonfinite}


@dataclass(frozen=True)
class PredictRequest:
    model: str
    scan: ScanInput


@dataclass(frozen=True)
class AttributeRequest:
    """Attribution of one scan. ``options`` are the caller's values as text; the library validates them."""

    model: str
    scan: ScanInput
    method: str
    target: str = ""  # class name; "" = predicted class
    options: Mapping[str, str] = field(default_factory=dict)
    png: bool = False


@dataclass(frozen=True)
class VisualizeRequest:
    """Feature visualization. ``target`` is ``class:C`` | ``channel:LAYER:C`` | ``neuron:LAYER:C:X:Y:Z``."""

    model: str
    target: str
    preset: str = "robust"
    steps: int = 0  # 0 = preset default
    seed: int = 0
    start: StartKind = StartKind.NOISE
    scan: ScanInput | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    preview_every: int = 0
    png: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Results (what the cache stores: plain data, picklable/JSON-able)


@dataclass(frozen=True)
class PredictResult:
    model: str
    model_version: str
    logits: tuple[float, ...]
    probabilities: dict[str, float]
    predicted_class: str


@dataclass(frozen=True)
class Cluster:
    peak_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    voxels: int
    volume_mm3: float
    relevance: float


@dataclass(frozen=True)
class AttributeResult:
    model: str
    model_version: str
    method: str
    target: str
    nifti: bytes  # signed map, float32, gzipped NIfTI on the scan's grid and affine
    total_positive: float
    total_negative: float
    clusters: tuple[Cluster, ...] = ()
    summary_json: str = "{}"
    png: bytes = b""


@dataclass(frozen=True)
class VisualizeResult:
    model: str
    model_version: str
    nifti: bytes  # model grid
    native_nifti: bytes = b""  # scan grid, with start=scan
    png: bytes = b""
    objective_curve: tuple[float, ...] = ()


@dataclass(frozen=True)
class Progress:
    """One finished optimisation step (1-based)."""

    step: int
    steps: int
    objective: float
    preview_png: bytes = b""


# ---------------------------------------------------------------------------------------------------------------------
# Per-call context


def new_job_id() -> str:
    """A random id for one computation (never derived from the input)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class CallContext:
    """What a backend gets besides the request: identity, deadline, cancellation and progress.

    Attributes:
        job_id: id of this computation (Visualize: the id the client sees in every event).
        deadline: ``time.monotonic()`` value after which the work is pointless, or None.
        is_cancelled: returns True once every caller waiting for this computation has gone (or the deadline passed);
            long computations must check it regularly (Visualize: every step) and raise
            ``neuroexplain.errors.CancelledError``.
        on_progress: receives a :class:`Progress` per finished step (Visualize only).
    """

    job_id: str = field(default_factory=new_job_id)
    deadline: float | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    on_progress: Callable[[Progress], None] = lambda _p: None


# ---------------------------------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class Backend(Protocol):
    """Where the computation happens. Implementations: ``service.backends.inprocess.InProcessBackend`` and
    ``service.backends.torchserve.TorchServeBackend``.

    Methods raise ``neuroexplain.errors`` exceptions only (``UnavailableError`` when the backend is down,
    ``CancelledError`` when ``ctx.is_cancelled()`` turned True, ``InvalidInputError``/``NotFoundError`` for bad
    requests); the gateway maps them to gRPC codes. Methods are called from many threads at once and must keep no
    per-request state on ``self``.

    A backend with a true ``decodes_scans`` attribute validates scans itself with the library's ``read_scan`` (so the
    same typed errors): the core then hands it the bytes undecoded (``ScanInput.decoded`` None) instead of decoding
    every scan twice. Without the attribute the core decodes first.
    """

    def start(self) -> None:
        """Load models / start and wait for the engine. Called once before serving."""

    def close(self) -> None:
        """Release everything; called once on shutdown after in-flight calls drained."""

    def ready(self) -> bool:
        """True while the backend can answer (readiness probe); False e.g. while TorchServe restarts."""

    def models(self) -> list[ModelInfo]:
        """Every served model."""

    def predict(self, request: PredictRequest, ctx: CallContext) -> PredictResult: ...

    def attribute(self, request: AttributeRequest, ctx: CallContext) -> AttributeResult: ...

    def visualize(self, request: VisualizeRequest, ctx: CallContext) -> VisualizeResult: ...
