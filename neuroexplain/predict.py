"""Predict: scan -> model space -> logits, probabilities by class name, predicted class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neuroexplain.models.registry import LoadedModel
from neuroexplain.template import anatomy
from neuroexplain.volumes import Alignment, Placement, Scan, normalise, place


@dataclass(frozen=True)
class ModelInput:
    """A scan mapped into a model's space, with what is needed to map results back onto the scan."""

    array: np.ndarray  # grid.shape float32, normalised
    placement: Placement

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:  # (1, 1, D, H, W)
        return torch.from_numpy(self.array)[None, None].to(device)


@dataclass(frozen=True)
class Prediction:
    logits: tuple[float, ...]
    probabilities: dict[str, float]
    predicted_class: str


def prepare(scan: Scan, model: LoadedModel, alignment: Alignment = Alignment.AUTO) -> ModelInput:
    """Resample a scan onto the model's grid and normalise it as the model was trained."""
    grid = model.spec.grid
    placement = place(scan, grid, anatomy(grid).com_mm, alignment)
    return ModelInput(array=normalise(placement.to_model(scan.data)), placement=placement)


def predict_arrays(model: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int = 4) -> list[Prediction]:
    """Run the model on arrays already in model space (``grid.shape`` each), ``batch_size`` at a time."""
    out: list[Prediction] = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch_size):
            batch = torch.from_numpy(np.stack(arrays[start : start + batch_size]))[:, None].to(model.device)
            logits = model.module(batch).float().cpu()  # (B, n_classes)
            probs = torch.softmax(logits, dim=1)
            for lg, pr in zip(logits.tolist(), probs.tolist()):
                best = int(np.argmax(lg))
                out.append(
                    Prediction(
                        logits=tuple(lg),
                        probabilities=dict(zip(model.spec.classes, pr)),
                        predicted_class=model.spec.classes[best],
                    )
                )
    return out


def predict(model: LoadedModel, scans: Sequence[Scan], batch_size: int = 4, alignment: Alignment = Alignment.AUTO) -> list[Prediction]:
    """Predict each scan; deterministic (eval mode, no dropout, inference mode)."""
    return predict_arrays(model, [prepare(s, model, alignment).array for s in scans], batch_size)
