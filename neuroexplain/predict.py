"""Predict: scan -> model space -> logits, probabilities by class name, predicted class.

Probabilities are ``softmax(logits / T)`` with the temperature ``T`` stored in the model's spec
(:mod:`neuroexplain.calibration` fits it; 1.0 for a model never calibrated). Logits are returned as the model gave
them. On request the penultimate activations (the input of the model's last ``nn.Linear``) come back too: the input
check compares them with the training set's (:mod:`neuroexplain.inputcheck`).
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from neuroexplain.models.registry import LoadedModel, structural_copy
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
    """One scan's answer.

    Attributes:
        logits: raw model outputs in class order.
        probabilities: ``softmax(logits / spec.temperature)`` by class name.
        predicted_class: the arg-max class (temperature never changes it).
        features: penultimate activations when asked for (``with_features=True``), else empty.
    """

    logits: tuple[float, ...]
    probabilities: dict[str, float]
    predicted_class: str
    features: tuple[float, ...] = field(default=(), repr=False)


def prepare(scan: Scan, model: LoadedModel, alignment: Alignment = Alignment.AUTO) -> ModelInput:
    """Resample a scan onto the model's grid and normalise it as the model was trained."""
    grid = model.spec.grid
    placement = place(scan, grid, anatomy(grid).com_mm, alignment)
    return ModelInput(array=normalise(to_model(placement, scan.data)), placement=placement)


def to_model(placement: Placement, data: np.ndarray) -> np.ndarray:
    """``placement.to_model(data)`` (trilinear), faster where the scan's voxel axes run along the model grid's (no
    rotation or shear: ``mni`` and ``center`` placements of scans stored in RAS/LAS/... orientation, e.g. a 1 mm MNI
    scan onto a 2 mm grid). Trilinear interpolation is then separable: three passes of 1D linear interpolation, one
    per axis, each shrinking the volume — the same samples and the same edge rule (0 outside ``[0, n-1]`` along any
    axis) as the scipy reference, in a fraction of the time of the 3D ``grid_sample`` (which runs on one thread for
    one volume). Other placements go to ``placement.to_model``."""
    if placement.world is not None or placement.model_mask is not None:
        return placement.to_model(data)
    t = np.eye(4)
    t[:3, 3] = placement.shift_mm
    m = np.linalg.inv(placement.scan_affine) @ np.linalg.inv(t) @ placement.grid.affine  # model voxel -> scan voxel
    linear = m[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-9 * np.abs(linear).max() or data.ndim != 3:
        return placement.to_model(data)
    return _separable_trilinear(data, m, tuple(placement.grid.shape))


def _separable_trilinear(data: np.ndarray, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``out[o] = data[m @ o]`` with trilinear weights for a diagonal ``m``; 0 where a sample falls outside
    ``[0, n-1]`` along any axis (scipy's ``mode="constant"``, ``cval=0``)."""
    out = torch.from_numpy(np.asarray(data, dtype=np.float32))
    # The axis that shrinks the volume most goes first: every later pass reads less.
    order = sorted(range(3), key=lambda a: shape[a] / max(int(data.shape[a]), 1))
    for axis in order:
        n = int(data.shape[axis])
        strided = _strided_lerp(out, axis, n, float(m[axis, axis]), float(m[axis, 3]), int(shape[axis]))
        if strided is not None:
            out = strided
            continue
        pos = m[axis, axis] * np.arange(shape[axis], dtype=np.float64) + m[axis, 3]
        inside = (pos >= 0) & (pos <= n - 1)
        p = np.clip(pos, 0, n - 1)
        lo = np.minimum(np.floor(p).astype(np.int64), max(n - 2, 0))
        hi = np.minimum(lo + 1, n - 1)
        w_hi = np.where(inside, p - lo, 0.0).astype(np.float32)
        w_lo = np.where(inside, 1.0 - (p - lo), 0.0).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = -1
        a = out.index_select(axis, torch.from_numpy(lo))
        b = out.index_select(axis, torch.from_numpy(hi))
        out = a.mul_(torch.from_numpy(w_lo).view(view)).add_(b.mul_(torch.from_numpy(w_hi).view(view)))
    return np.ascontiguousarray(out.numpy())


def _strided_lerp(x: torch.Tensor, axis: int, n: int, step: float, offset: float, size: int) -> torch.Tensor | None:
    """One axis of :func:`_separable_trilinear` where the samples are ``step * j + offset`` with a positive whole
    ``step`` (e.g. 1 mm onto 2 mm): every sample has the same fractional position, so the two neighbours are strided
    views (no gather); None for any other step."""
    k = round(step)
    if k < 1 or abs(step - k) > 1e-9:
        return None
    j = np.arange(size, dtype=np.float64)
    pos = step * j + offset
    valid = np.flatnonzero((pos >= 0) & (pos <= n - 1))
    out_shape = list(x.shape)
    out_shape[axis] = size
    out = torch.zeros(out_shape, dtype=x.dtype)
    if valid.size == 0:
        return out
    j0, count = int(valid[0]), int(valid.size)
    first = float(pos[j0])
    lo = int(np.floor(first))
    frac = first - lo
    if abs(frac) <= 1e-9 * max(1.0, abs(first)):  # samples on voxel centres: a strided copy
        frac = 0.0
    a = x.narrow(axis, lo, k * (count - 1) + 1)[(slice(None),) * axis + (slice(None, None, k),)]
    target = out.narrow(axis, j0, count)
    if frac == 0.0:
        target.copy_(a)
        return out
    b = x.narrow(axis, lo + 1, k * (count - 1) + 1)[(slice(None),) * axis + (slice(None, None, k),)]
    torch.add(a.mul(1.0 - frac), b, alpha=frac, out=target)
    return out


def penultimate_layer(module: nn.Module) -> nn.Linear | None:
    """The model's last ``nn.Linear`` (its input is what the feature check compares), or None if it has none."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


# Conv3d at batch 1 on the CPU: PyTorch's dispatcher picks oneDNN (mkldnn) only from batch 2 on (or for large
# planes) and runs ``slow_conv3d`` (im2col + GEMM) for a single scan, channels-last input included; calling oneDNN's
# convolution directly is the fastest path measured for the bundled models at batch 1 and gives the same numbers
# (within 1e-5; README -> Benchmarks, "Conv3d at batch 1"). ``predict_arrays`` runs such a copy of the model;
# attribution and feature visualization keep the module as loaded.
_INFERENCE: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
_INFERENCE_LOCK = threading.Lock()


def _onednn_conv3d(self: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5:
        return nn.Conv3d.forward(self, x)
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), self.weight, self.bias, list(self.padding),
                                             list(self.stride), list(self.dilation), self.groups)


def inference_module(model: LoadedModel) -> nn.Module:
    """The module :func:`predict_arrays` runs: on a CPU with oneDNN, a copy of ``model.module`` (sharing its weights)
    whose ``nn.Conv3d`` layers call oneDNN's convolution at any batch size; elsewhere ``model.module`` itself."""
    module = model.module
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return module
    with _INFERENCE_LOCK:
        fast = _INFERENCE.get(module)
        if fast is None:
            fast = structural_copy(module)
            for m in fast.modules():
                if (type(m) is nn.Conv3d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
                        and m.weight.dtype == torch.float32):
                    m.forward = types.MethodType(_onednn_conv3d, m)  # type: ignore[method-assign]
            fast.eval()
            _INFERENCE[module] = fast
    return fast


def predict_arrays(
    model: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int = 4, *, with_features: bool = False
) -> list[Prediction]:
    """Run the model on arrays already in model space (``grid.shape`` each), ``batch_size`` at a time.

    Args:
        model: the loaded model; its ``spec.temperature`` scales the probabilities.
        arrays: normalised volumes on the model grid.
        batch_size: scans per forward pass.
        with_features: also return each scan's penultimate activations (a forward pre-hook on the last
            ``nn.Linear``, removed afterwards; empty if the model has none).
    """
    temperature = model.spec.temperature
    out: list[Prediction] = []
    captured: list[torch.Tensor] = []
    module = inference_module(model)
    head = penultimate_layer(module) if with_features else None
    handle = (
        head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach().float().cpu()))
        if head is not None
        else None
    )
    try:
        with torch.inference_mode():
            for start in range(0, len(arrays), batch_size):
                captured.clear()
                batch = torch.from_numpy(np.stack(arrays[start : start + batch_size]))[:, None].to(model.device)
                logits = module(batch).float().cpu()  # (B, n_classes)
                probs = torch.softmax(logits / temperature, dim=1)
                feats = captured[-1].reshape(len(logits), -1).tolist() if captured else [[]] * len(logits)
                for lg, pr, ft in zip(logits.tolist(), probs.tolist(), feats):
                    best = int(np.argmax(lg))
                    out.append(
                        Prediction(
                            logits=tuple(lg),
                            probabilities=dict(zip(model.spec.classes, pr)),
                            predicted_class=model.spec.classes[best],
                            features=tuple(ft),
                        )
                    )
    finally:
        if handle is not None:
            handle.remove()
    return out


def predict(model: LoadedModel, scans: Sequence[Scan], batch_size: int = 4, alignment: Alignment = Alignment.AUTO) -> list[Prediction]:
    """Predict each scan; deterministic (eval mode, no dropout, inference mode)."""
    return predict_arrays(model, [prepare(s, model, alignment).array for s in scans], batch_size)
