"""Predict: scan -> model space -> logits, probabilities by class name, predicted class.

Probabilities are ``softmax(logits / T)`` with the temperature ``T`` stored in the model's spec
(:mod:`neuroexplain.calibration` fits it; 1.0 for a model never calibrated). Logits are returned as the model gave
them. On request the penultimate activations (the input of the model's last ``nn.Linear``) come back too: the input
check compares them with the training set's (:mod:`neuroexplain.inputcheck`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import _triple

from neuroexplain.models.registry import LoadedModel, structural_copy
from neuroexplain.precision import Precision, autocast
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
    return ModelInput(array=normalise(placement.scan_to_model(scan)), placement=placement)


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


def _pairwise_max_pool3d(self: nn.MaxPool3d, x: torch.Tensor) -> torch.Tensor:
    # 2x2x2 windows with stride 2 as three maxima of strided halves: max_pool3d on the CPU always computes the argmax
    # indices too (for a backward pass inference never runs), which made it 4x slower than this on conv1's output.
    if x.dim() != 5:
        return nn.MaxPool3d.forward(self, x)
    d, h, w = (n - n % 2 for n in x.shape[2:])
    x = x[:, :, :d, :h, :w]
    x = torch.maximum(x[..., 0::2], x[..., 1::2])
    x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(x[:, :, 0::2], x[:, :, 1::2])


def _is_pairwise_pool(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool3d and _triple(m.kernel_size) == (2, 2, 2) and _triple(m.stride) == (2, 2, 2)
            and _triple(m.padding) == (0, 0, 0) and _triple(m.dilation) == (1, 1, 1) and not m.ceil_mode
            and not m.return_indices)


def inference_module(model: LoadedModel) -> nn.Module:
    """The module :func:`predict_arrays` runs: on a CPU with oneDNN, a copy of ``model.module`` (sharing its weights)
    whose ``nn.Conv3d`` layers call oneDNN's convolution at any batch size and whose 2x2x2 max pooling skips the argmax
    indices (the same maxima); elsewhere ``model.module`` itself."""
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
                elif _is_pairwise_pool(m):
                    m.forward = types.MethodType(_pairwise_max_pool3d, m)  # type: ignore[method-assign]
            fast.eval()
            _INFERENCE[module] = fast
    return fast


@functools.lru_cache(maxsize=1)
def _openmp() -> Any:
    """The OpenMP runtime torch loaded (its ``omp_set_num_threads`` sets the calling thread's team size only), or
    None where torch has none in this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", line)}
        here = os.path.dirname(torch.__file__)  # another package's runtime (scikit-learn bundles a libgomp) is not it
        ranked = sorted(paths, key=lambda path: (not path.startswith(here), path))
        return ctypes.CDLL(ranked[0]) if ranked else None
    except (OSError, IndexError):  # not Linux, or a mapping that cannot be opened again
        return None


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run a batch-1 CPU forward pass on this thread's OpenMP team of one where OpenMP waits passively (as serving
    sets it, :mod:`neuroexplain.serving.tuning`): there, for the bundled models at batch 1, the second thread costs
    more in wake-ups than it gains (lesion 3.3 ms on one thread against 3.7 on two; from batch 2 on, two are faster).
    With OpenMP's default spinning wait two threads stay faster (2.9-3.1 ms against 3.9-4.5), so nothing changes
    there. The setting is the calling thread's own (``omp_set_num_threads``), not torch's process-wide
    ``set_num_threads``."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
    omp = _openmp() if device.type == "cpu" and passive else None
    if omp is None:
        yield
        return
    torch.get_num_threads()  # torch sets this thread's team size on its first call here: let it happen first
    before = omp.omp_get_max_threads()
    omp.omp_set_num_threads(1)
    try:
        yield
    finally:
        omp.omp_set_num_threads(before)


def predict_arrays(
    model: LoadedModel, arrays: Sequence[np.ndarray], batch_size: int = 4, *, with_features: bool = False,
    precision: Precision = Precision.FLOAT32,
) -> list[Prediction]:
    """Run the model on arrays already in model space (``grid.shape`` each), ``batch_size`` at a time.

    Args:
        model: the loaded model; its ``spec.temperature`` scales the probabilities.
        arrays: normalised volumes on the model grid.
        batch_size: scans per forward pass.
        with_features: also return each scan's penultimate activations (a forward pre-hook on the last
            ``nn.Linear``, removed afterwards; empty if the model has none).
        precision: the forward passes' number format (torch autocast; :mod:`neuroexplain.precision` says where a
            reduced one stays within tolerance). The oneDNN copy of the module runs only in float32: its direct
            convolution call would bypass autocast.
    """
    temperature = model.spec.temperature
    out: list[Prediction] = []
    captured: list[torch.Tensor] = []
    module = inference_module(model) if precision is Precision.FLOAT32 else model.module
    head = penultimate_layer(module) if with_features else None
    handle = (
        head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach().float().cpu()))
        if head is not None
        else None
    )
    try:
        with torch.inference_mode(), autocast(model.device.type, precision):
            for start in range(0, len(arrays), batch_size):
                captured.clear()
                batch = torch.from_numpy(np.stack(arrays[start : start + batch_size]))[:, None].to(model.device)
                with _one_thread(model.device) if len(batch) == 1 else contextlib.nullcontext():
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
