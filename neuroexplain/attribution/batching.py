"""How many volumes one forward/backward pass of a batched attribution method evaluates (``internal_batch_size``).

Integrated gradients, SmoothGrad, GradientSHAP and occlusion evaluate the model on many perturbed copies of the scan;
``internal_batch_size`` says how many share one pass. A caller's own value is used as it is. ``0`` (the default,
``auto``) means:

- on the CPU, the fixed :data:`CPU_BATCH` of each method (a bigger batch is not faster there; it only costs memory);
- on a CUDA device, as many as half of the device's free memory holds, at most the method's number of evaluations
  and :data:`MAX_AUTO`, at least 1. Free memory is what the driver reports free plus what torch's caching allocator
  holds unused; the other half is left to requests running beside this one.

The memory one volume costs is measured on one forward pass of the scan itself (:func:`volume_bytes`): with gradients,
what autograd saves for the backward pass (seen by ``saved_tensors_hooks``), plus the gradients of the largest two
layer outputs and of the input, which the backward pass holds at once; without them, the largest two layer outputs
(seen by forward hooks) and two copies of the input; times :data:`MARGIN` for what no hook sees. It is cached per model structure,
input shape and device.

The maps do not depend on the batch size (the seeded methods draw their noise per sample), so ``auto`` changes the
speed and memory of a request, never its result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuroexplain.attribution.options import CPU_BATCH, Method

AUTO = 0
MAX_AUTO = 256
FREE_SHARE = 0.5  # of the device's free memory, for one request's batch
# Kernels' own workspaces and layout copies, which no hook sees: measured on the CPU by peak RSS per extra volume
# (python -m bench.bench_attribution_memory), one more volume cost 0.8-1.2x what the hooks count.
MARGIN = 1.5


def occlusion_corners(shape: Sequence[int], patch: int, stride: int) -> list[tuple[int, ...]]:
    """The corners of occlusion's patches, as captum places them: ceil((n - patch) / stride) + 1 per axis, the last
    one cut off by the volume's edge."""
    return list(itertools.product(*(range(0, -(-(n - patch) // stride) * stride + 1, stride) for n in shape)))


def evaluations(method: Method, o: dict[str, Any], shape: Sequence[int]) -> int:
    """Model evaluations the method batches, per scan: the most volumes one batch can usefully hold."""
    if method is Method.INTEGRATED_GRADIENTS:
        return int(o["n_steps"])
    if method is Method.SMOOTHGRAD:  # the IG base batches each noisy copy's steps
        return int(o["n_steps"] if o["base"] == "integrated_gradients" else o["nt_samples"])
    if method is Method.GRADIENT_SHAP:
        return int(o["n_samples"])
    if method is Method.OCCLUSION:
        return len(occlusion_corners(shape, int(o["patch"]), int(o["stride"])))
    raise ValueError(f"{method.value} does not batch its evaluations")


def auto_batch(per_volume: int, free: int, most: int) -> int:
    """Volumes of ``per_volume`` bytes that :data:`FREE_SHARE` of ``free`` bytes holds, in
    1 .. min(``most``, :data:`MAX_AUTO`)."""
    fits = int(free * FREE_SHARE) // per_volume if per_volume > 0 else MAX_AUTO
    return max(1, min(fits, int(most), MAX_AUTO))


def free_bytes(device: torch.device) -> int | None:
    """Bytes a CUDA ``device`` can still give this process (driver's free + torch's cached but unused); ``None``
    for any other device."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached_unused))


def volume_bytes(module: nn.Module, x: torch.Tensor, grad: bool) -> int:
    """Bytes one more volume shaped like ``x[0]`` adds to a pass (see the module doc; the weights are resident
    already, so nothing else grows with the batch)."""
    saved, outputs = _pass_bytes(module, x[:1])
    top2 = sum(sorted(outputs)[-2:])
    volume = x[0].numel() * x.element_size()
    # without gradients: the batch being evaluated and the copy of it the first layer reads, beside the largest two
    return int(MARGIN * (saved + top2 + volume if grad else top2 + 2 * volume))


_CACHE: dict[tuple[Any, ...], tuple[int, tuple[int, ...]]] = {}


def _pass_bytes(module: nn.Module, x1: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Bytes autograd saves for the backward pass of one forward over ``x1`` (each storage once, the weights not
    counted), and the bytes of every leaf module's output; cached per structure, shape, device and dtype."""
    key = (_structure(module), tuple(x1.shape), str(x1.device), x1.dtype)
    if key in _CACHE:
        return _CACHE[key]
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    saved: dict[int, int] = {}
    outputs: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def record(_m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(record) for m in module.modules() if next(m.children(), None) is None]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x1.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    _CACHE[key] = (sum(saved.values()), tuple(outputs))
    return _CACHE[key]


def _structure(module: nn.Module) -> tuple[Any, ...]:
    return tuple((type(m).__qualname__, tuple(p.shape for p in m.parameters(recurse=False)))
                 for m in module.modules())


def internal_batch(method: Method, o: dict[str, Any], module: nn.Module, x: torch.Tensor) -> int:
    """The ``internal_batch_size`` a batched method runs with on ``x`` (see the module doc)."""
    requested = int(o["internal_batch_size"])
    if requested != AUTO:
        return requested
    free = free_bytes(x.device)
    if free is None:
        return CPU_BATCH[method]
    per = volume_bytes(module, x, grad=method is not Method.OCCLUSION)
    return auto_batch(per, free, evaluations(method, o, x.shape[2:]))


def resolved(method: Method, o: dict[str, Any], module: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``o`` with the ``internal_batch_size`` the method runs with on ``x`` (methods that do not batch: ``o``)."""
    if method not in CPU_BATCH:
        return o
    return {**o, "internal_batch_size": internal_batch(method, o, module, x)}
