"""Model specs: everything about a model except its weights, stored as ``spec.json`` beside them."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.volumes import Grid


@dataclass(frozen=True)
class LayerInfo:
    """A layer feature visualization and Grad-CAM may target: its output channels and spatial shape."""

    name: str
    channels: int
    shape: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """Mean and precision (inverse shrunk covariance) of penultimate activations over training scans."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F)
    n: int

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype(np.float64), precision=self.precision.astype(np.float64),
                 n=np.array(self.n))
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path, sha256: str = "") -> FeatureStatistics:
        from neuroexplain.errors import InvalidInputError

        try:
            raw = Path(path).read_bytes()
        except OSError:
            raise InvalidInputError(f"feature statistics file {Path(path).name} named by the spec is missing") from None
        if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
            raise InvalidInputError(f"feature statistics file {Path(path).name} does not match the spec's digest; "
                                    "recalibrate the model or fix spec.json")
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                mean, precision, n = np.asarray(z["mean"]), np.asarray(z["precision"]), int(z["n"])
        except (OSError, ValueError, KeyError):
            raise InvalidInputError(f"feature statistics file {Path(path).name} is not a readable .npz with "
                                    "mean, precision and n") from None
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
            raise InvalidInputError(f"feature statistics have mean {mean.shape} and precision {precision.shape}; "
                                    "expected (F,) and (F, F)")
        return cls(mean=mean, precision=precision, n=n)


@dataclass(frozen=True)
class ModelSpec:
    """A model's identity and contract.

    Attributes:
        name: registry name (``lesion``, ``atrophy``, or a user's).
        version: semantic version, bumped when the weights change.
        task: what the model was trained for.
        classes: class names in logit order.
        grid: input grid (shape and affine); MNI152 2 mm for the bundled models.
        normalisation: intensity normalisation applied in model space (``p99``: foreground 99th percentile -> 1).
        architecture: ``package.module:Class`` or ``file.py:Class`` (relative to the spec's folder).
        architecture_kwargs: constructor arguments.
        layers: targetable layers with channel counts.
        weights_sha256: digest of the weights file; loading refuses a mismatch.
        training: provenance (command, seeds, sample counts, epochs, duration, library versions).
        metrics: held-out metrics (accuracy, n, seeds).
        temperature: probabilities are ``softmax(logits / temperature)`` (1.0: never calibrated).
        input_check: the input check's calibration (per-check centres and scales, the threshold, seed ranges, the
            statistics file's name and digest); empty for a model never calibrated (the check then uses defaults).
        evaluation: one sentence on where accuracy and calibration were measured (synthetic data, which seeds).
        feature_statistics: training-set statistics of the penultimate activations, read from the file that
            ``input_check["statistics"]`` names beside ``spec.json``; not part of ``to_dict`` (its digest is).
    """

    name: str
    version: str
    task: str
    classes: tuple[str, ...]
    grid: Grid
    architecture: str
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    normalisation: str = "p99"
    layers: tuple[LayerInfo, ...] = ()
    weights_sha256: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    input_check: dict[str, Any] = field(default_factory=dict)
    evaluation: str = ""
    feature_statistics: FeatureStatistics | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("feature_statistics", None)
        d["grid"] = self.grid.to_dict()
        d["classes"] = list(self.classes)
        d["layers"] = [{"name": l.name, "channels": l.channels, "shape": list(l.shape)} for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            name=d["name"],
            version=d["version"],
            task=d["task"],
            classes=tuple(d["classes"]),
            grid=Grid.from_dict(d["grid"]),
            architecture=d["architecture"],
            architecture_kwargs=dict(d.get("architecture_kwargs", {})),
            normalisation=d.get("normalisation", "p99"),
            layers=tuple(LayerInfo(l["name"], int(l["channels"]), tuple(l["shape"])) for l in d.get("layers", [])),
            weights_sha256=d.get("weights_sha256", ""),
            training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})),
            temperature=float(d.get("temperature", 1.0)),
            input_check=dict(d.get("input_check", {})),
            evaluation=str(d.get("evaluation", "")),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        """Read ``spec.json`` and, if its input check names one, the feature-statistics file beside it."""
        spec = cls.from_dict(json.loads(Path(path).read_text()))
        name = spec.input_check.get("statistics")
        if not name:
            return spec
        stats = FeatureStatistics.load(Path(path).parent / str(name), spec.input_check.get("statistics_sha256", ""))
        return replace(spec, feature_statistics=stats)

    def layer(self, name: str) -> LayerInfo:
        from neuroexplain.errors import NotFoundError

        for info in self.layers:
            if info.name == name:
                return info
        raise NotFoundError(f"layer {name!r} not found in model {self.name!r}; layers: {[l.name for l in self.layers]}")

    def class_index(self, name: str) -> int:
        from neuroexplain.errors import InvalidOptionError

        try:
            return self.classes.index(name)
        except ValueError:
            raise InvalidOptionError(
                f"class {name!r} is unknown for model {self.name!r}; classes: {list(self.classes)}"
            ) from None
