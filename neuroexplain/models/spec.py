"""Model specs: everything about a model except its weights, stored as ``spec.json`` beside them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuroexplain.volumes import Grid


@dataclass(frozen=True)
class LayerInfo:
    """A layer feature visualization and Grad-CAM may target: its output channels and spatial shape."""

    name: str
    channels: int
    shape: tuple[int, int, int]


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
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
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

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
