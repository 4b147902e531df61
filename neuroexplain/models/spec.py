"""Model specs: everything about a model except its weights, stored as ``spec.json`` beside them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
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

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStatistics:
        from neuroexplain.errors import InvalidInputError

        try:
            mean = np.asarray(d["mean"], dtype=np.float64)
            precision = np.asarray(d["precision"], dtype=np.float64)
            n = int(d["n"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError("spec.json feature_statistics needs n, mean (F numbers) and precision "
                                    "(F x F numbers)") from None
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or not np.isfinite(precision).all():
            raise InvalidInputError(f"spec.json feature_statistics have mean {mean.shape} and precision "
                                    f"{precision.shape}; expected (F,) and (F, F), finite")
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
        mixed_precision: float16/bfloat16 measured against float32, per device type (:mod:`neuroexplain.precision`);
            empty for a model never measured (everything then runs in float32).
        feature_statistics: training-set statistics of the penultimate activations (the input check's feature
            check); None for a model without them.
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
    mixed_precision: dict[str, Any] = field(default_factory=dict)
    feature_statistics: FeatureStatistics | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("feature_statistics", None)
        if self.feature_statistics is not None:
            d["feature_statistics"] = self.feature_statistics.to_dict()
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
            mixed_precision=dict(d.get("mixed_precision", {})),
            feature_statistics=FeatureStatistics.from_dict(d["feature_statistics"]) if d.get("feature_statistics")
            else None,
        )

    def sha256(self) -> str:
        """Digest of the spec's canonical JSON (the feature statistics enter through their digest in
        ``input_check``): what cache keys carry, so a recalibrated model never serves stale answers."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def save(self, path: Path) -> None:
        """Write ``spec.json``: indented, with each row of the feature statistics on one line."""
        d = self.to_dict()
        stats = d.pop("feature_statistics", None)
        text = json.dumps(d, indent=2)
        if stats is not None:
            rows = ",\n      ".join(json.dumps(r) for r in stats["precision"])
            block = (f',\n  "feature_statistics": {{\n    "n": {stats["n"]},\n    "mean": {json.dumps(stats["mean"])},'
                     f'\n    "precision": [\n      {rows}\n    ]\n  }}\n}}')
            text = text[: text.rindex("}")].rstrip() + block
        path.write_text(text + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))

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
