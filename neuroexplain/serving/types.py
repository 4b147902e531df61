"""The serving contract's types: what the gateway, the in-process backend and the TorchServe worker exchange.

Frozen dataclasses and enums only — no torch, numpy, grpc or protobuf — so every process imports them. The gateway's
servicer converts wire messages to these types (``service/grpc/convert.py``), the core validates them and calls one
backend method, and :mod:`neuroexplain.serving.runner` turns them into library calls wherever the model runs. The one
codec for them is :mod:`neuroexplain.serving.codec`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.precision import Precision

NOTICE = RESEARCH_NOTICE
MiB = 1 << 20
GiB = 1 << 30


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


class Alignment(enum.Enum):
    """How a scan is placed on the model grid (the library's ``neuroexplain.volumes.Alignment`` plus ``register``).

    ``auto`` resolves to ``mni`` or ``register`` per scan; results report the alignment actually used.
    """

    AUTO = "auto"
    MNI = "mni"
    CENTER = "center"
    REGISTER = "register"


class NonFinite(enum.Enum):
    """What to do with NaN or infinite voxels (the library's ``neuroexplain.volumes.NonFinite``)."""

    REJECT = "reject"
    ZERO = "zero"


# ---------------------------------------------------------------------------------------------------------------------
# Model metadata (the catalog: neuroexplain.serving.catalog builds these without torch)


@dataclass(frozen=True)
class OptionInfo:
    """One option of an attribution method or visualization preset, for discovery (ListModels/GetModel)."""

    name: str
    type: str  # int | float | str | bool | enum | layer
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
    """A targetable layer: output channels and spatial shape."""

    name: str
    channels: int
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about a served model.

    ``weights_sha256`` and ``spec_sha256`` are part of every cache key, so a backend must report the digests of the
    weights and the spec it really runs (a recalibrated spec never serves a stale answer).
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
    spec_sha256: str = ""
    evaluation: str = ""  # how accuracy and calibration were measured (synthetic data, which seeds)
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); 1.0 = never calibrated
    has_feature_statistics: bool = False  # the spec names the feature statistics the input check compares against
    # float16/bfloat16 against float32 as the spec measured it, per device type (neuroexplain.precision)
    mixed_precision: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class ReadLimits:
    """The gateway's caps on one scan, sent with every request so the process that decodes it applies them (the
    worker never falls back to defaults). Mirrors ``neuroexplain.volumes.ScanLimits``."""

    max_input_bytes: int = 256 * MiB
    max_decompressed_bytes: int = 1 * GiB
    max_voxels: int = 64 * MiB
    max_header_bytes: int = 16 * MiB


@dataclass(frozen=True)
class ScanInput:
    """A scan as the core resolved it: the bytes as received (one file, or a DICOM series), their digest, the reading
    options and the limits to decode it with.

    Attributes:
        data: the file's bytes (NIfTI-1/-2, MGH/MGZ, optionally gzipped); empty for a DICOM series.
        digest: lower-case hex SHA-256 (of ``data``, or of a DICOM series independent of instance order); the only
            identifier logs, metrics and caches may use. Computed once, by the core.
        instances: the DICOM series' instances (Part 10 files), or ``()`` for a file scan.
        series_uid: which series of ``instances`` to read (``""``: the only one).
        volume_index: volume of a 4D scan or multi-volume series, or None for 3D.
        alignment: how to place the scan on the model grid.
        nonfinite: what to do with NaN/Inf voxels.
        limits: the caps the decoder applies before allocating.
    """

    data: bytes
    digest: str
    instances: tuple[bytes, ...] = ()
    series_uid: str = ""
    volume_index: int | None = None
    alignment: Alignment = Alignment.AUTO
    nonfinite: NonFinite = NonFinite.REJECT
    limits: ReadLimits = field(default_factory=ReadLimits)

    @property
    def is_dicom(self) -> bool:
        return bool(self.instances)

    def options_key(self) -> dict[str, Any]:
        """Reading options that change the result (part of the cache key; limits only refuse, never change it)."""
        return {"volume_index": self.volume_index, "alignment": self.alignment.value,
                "nonfinite": self.nonfinite.value, "series_uid": self.series_uid}


@dataclass(frozen=True)
class PredictRequest:
    """Class probabilities for one scan. ``return_dicom``/``deidentify`` ask the gateway for DICOM results (built
    after the result, never cached, never sent to the worker's cache key)."""

    model: str
    scan: ScanInput
    return_dicom: bool = False
    deidentify: bool = False
    # Set by the core from ``serve --precision``: the runner uses it only where the model's spec measured it within
    # tolerance on the device it runs on (neuroexplain.precision), else float32. In the cache key when reduced.
    precision: Precision = Precision.FLOAT32


@dataclass(frozen=True)
class AttributeRequest:
    """Attribution of one scan. ``options`` are the caller's values as text; the library validates them."""

    model: str
    scan: ScanInput
    method: str
    target: str = ""  # class name; "" = predicted class
    options: Mapping[str, str] = field(default_factory=dict)
    png: bool = False
    return_dicom: bool = False
    dicom_extras: tuple[str, ...] = ()
    deidentify: bool = False
    # Set by the core from ``serve --input-check reject``: the runner refuses a flagged scan before attributing it
    # (FAILED_PRECONDITION) instead of spending the attribution on it. Never part of the cache key.
    reject_flagged: bool = False
    precision: Precision = Precision.FLOAT32  # as PredictRequest's, per method


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
# Results (what the cache stores: plain data, through the one codec)


@dataclass(frozen=True)
class InputCheck:
    """Whether a scan looks like what the model was trained on (``in_distribution`` is ``score <= threshold``)."""

    in_distribution: bool
    score: float
    threshold: float
    reason: str = ""
    checks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Registration:
    """How an ``register`` alignment went: final similarity metric, seconds, 4x4 row-major scan -> model transform."""

    metric: float
    seconds: float
    transform: tuple[float, ...] = ()


@dataclass(frozen=True)
class DicomObject:
    """One DICOM result object (Part 10 bytes), built by the gateway per response and never cached."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class PredictResult:
    model: str
    model_version: str
    logits: tuple[float, ...]
    probabilities: dict[str, float]
    predicted_class: str
    alignment: Alignment | None = None  # the placement used (auto resolved); None where not reported
    input_check: InputCheck | None = None
    registration: Registration | None = None


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
    alignment: Alignment | None = None
    input_check: InputCheck | None = None
    registration: Registration | None = None
    predicted_class: str = ""  # the model's arg-max class (``target`` is the class explained)
    probabilities: dict[str, float] = field(default_factory=dict)


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


Result = PredictResult | AttributeResult | VisualizeResult
RESULT_TYPES: dict[Operation, type] = {Operation.PREDICT: PredictResult, Operation.ATTRIBUTE: AttributeResult,
                                       Operation.VISUALIZE: VisualizeResult}
REQUEST_TYPES: dict[Operation, type] = {Operation.PREDICT: PredictRequest, Operation.ATTRIBUTE: AttributeRequest,
                                        Operation.VISUALIZE: VisualizeRequest}


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
            long computations check it regularly (Visualize: every step) and raise
            ``neuroexplain.errors.CancelledError``.
        on_progress: receives a :class:`Progress` per finished step (Visualize only).
    """

    job_id: str = field(default_factory=new_job_id)
    deadline: float | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    on_progress: Callable[[Progress], None] = lambda _p: None
