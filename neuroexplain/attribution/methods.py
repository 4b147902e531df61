"""Attribution maps in model space, built on captum.

:func:`attribute_tensor` runs one method on a batch of volumes already on the model grid. It works on the module it
is given and leaves it as it found it: every hook captum (or this module) registers, and every LRP ``rule``
attribute, is removed in a ``finally`` block, also when the method raises or is cancelled. Callers that share a
model between requests pass a private copy (:func:`private_copy`): hook-based methods (guided backprop, DeepLIFT,
Grad-CAM, LRP) change how a module behaves while they run, and LRP changes its weights, so they must never touch the
cached model that concurrent requests use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from neuroexplain.attribution import lrp
from neuroexplain.attribution.options import Method
from neuroexplain.errors import CancelledError, InvalidOptionError, NotFoundError
from neuroexplain.volumes import Grid

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_LRP_ATTRIBUTES = ("rule", "activations", "activation")


Target = int | Sequence[int]


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy for one request: methods may register hooks on it and LRP rewrites its weights."""
    clone = copy.deepcopy(module)
    clone.eval()
    return clone


class HookGuard:
    """Context manager that removes every hook and LRP attribute added to ``module``'s tree while it was active."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._before: dict[int, dict[str, set[int]]] = {}
        self._attrs: dict[int, set[str]] = {}

    def __enter__(self) -> Self:
        for m in self._module.modules():
            self._before[id(m)] = {name: set(getattr(m, name, {}).keys()) for name in _HOOK_DICTS}
            self._attrs[id(m)] = {a for a in _LRP_ATTRIBUTES if a in m.__dict__}
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self._module.modules():
            before = self._before.get(id(m), {})
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if hooks is None:
                    continue
                for key in list(hooks.keys()):
                    if key not in before.get(name, set()):
                        del hooks[key]
            if not m._backward_hooks and not m._backward_pre_hooks:
                m._is_full_backward_hook = None
            for attr in _LRP_ATTRIBUTES:
                if attr in m.__dict__ and attr not in self._attrs.get(id(m), set()):
                    delattr(m, attr)


def added_hooks(module: nn.Module) -> int:
    """Number of hooks of any kind registered anywhere in ``module``'s tree (tests and sanity checks)."""
    return sum(len(getattr(m, name, {})) for m in module.modules() for name in _HOOK_DICTS)


class _Forward:
    """The model as captum's ``forward_func``, checking for cancellation before every pass."""

    def __init__(self, module: nn.Module, should_cancel: Callable[[], bool] | None) -> None:
        self.module = module
        self.should_cancel = should_cancel
        self.passes = 0

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError(f"attribution cancelled by the caller after {self.passes} model passes")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B, n_classes)
        self.check()
        self.passes += 1
        return self.module(x)


def baseline_volume(kind: str, x: torch.Tensor, grid: Grid, blur_sigma_mm: float) -> torch.Tensor:
    """Reference volumes for path and perturbation methods, shaped like ``x`` ``(B, 1, D, H, W)``."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "blur":
        sigma = [blur_sigma_mm / z for z in grid.zooms]
        arr = x.detach().cpu().numpy()
        out = np.stack([ndimage.gaussian_filter(v[0], sigma, mode="constant")[None] for v in arr])
        return torch.from_numpy(out.astype(np.float32)).to(x.device)
    if kind == "template":
        from neuroexplain.template import anatomy

        t1 = torch.from_numpy(anatomy(grid).t1).to(x.device)
        if tuple(t1.shape) != tuple(x.shape[2:]):
            raise InvalidOptionError(f"baseline 'template' needs input on the model grid {grid.shape}")
        return t1[None, None].expand_as(x).contiguous()
    raise InvalidOptionError(f"baseline {kind!r} is unknown; expected one of ['zeros', 'blur', 'template']")


def default_layer(module: nn.Module, layer_names: Sequence[str]) -> str:
    """The last targetable layer (``spec.layers``), else the last Conv module in the network."""
    if layer_names:
        return layer_names[-1]
    convs = [name for name, m in module.named_modules() if isinstance(m, lrp.CONV)]
    if not convs:
        raise InvalidOptionError("method 'gradcam' needs a convolution layer; this model has none")
    return convs[-1]


def attribute_tensor(
    module: nn.Module,
    x: torch.Tensor,
    method: Method,
    target: Target,
    opts: dict[str, Any],
    *,
    grid: Grid,
    layer_names: Sequence[str] = (),
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Signed relevance of every input voxel for ``target``, same shape as ``x``.

    Args:
        module: the network, in eval mode; hooks and LRP rules are added to it and removed before returning.
            Pass :func:`private_copy` of a shared model.
        x: ``(B, 1, D, H, W)`` volumes on the model grid, normalised as the model expects.
        method: which attribution method.
        target: class index per volume (one int for all).
        opts: typed options from :func:`~neuroexplain.attribution.options.parse_options`.
        grid: the model grid (voxel size for blur baselines, the template baseline).
        layer_names: the model's targetable layers; Grad-CAM accepts only these (any conv module if empty).
        should_cancel: polled before every model pass; when it returns True, :class:`CancelledError` is raised.

    Raises:
        InvalidOptionError, NotFoundError: bad layer or an LRP method on a model with layers LRP has no rule for.
        CancelledError: ``should_cancel`` returned True.
    """
    if x.dim() != 5 or x.shape[1] != 1:
        raise InvalidOptionError(f"input must be (batch, 1, D, H, W); got {tuple(x.shape)}")
    fwd = _Forward(module, should_cancel)
    tgt: Any = target if isinstance(target, int) else list(target)
    with HookGuard(module), torch.enable_grad():
        fwd.check()
        x = x.detach().clone().requires_grad_(True)
        out = _dispatch(module, fwd, x, method, tgt, opts, grid, layer_names)
    return out.detach().float()


def _dispatch(
    module: nn.Module, fwd: _Forward, x: torch.Tensor, method: Method, tgt: Any, o: dict[str, Any],
    grid: Grid, layer_names: Sequence[str],
) -> torch.Tensor:
    from captum import attr as ca

    def base(kind: str | None = None, inp: torch.Tensor | None = None) -> torch.Tensor:
        return baseline_volume(kind or o["baseline"], x if inp is None else inp, grid, o.get("blur_sigma_mm", 8.0))

    if method is Method.GRADIENT:
        return ca.Saliency(fwd).attribute(x, target=tgt, abs=False)
    if method is Method.GRADIENT_X_INPUT:
        return ca.InputXGradient(fwd).attribute(x, target=tgt)
    if method is Method.INTEGRATED_GRADIENTS:
        return ca.IntegratedGradients(fwd).attribute(
            x, baselines=base(), target=tgt, n_steps=o["n_steps"], internal_batch_size=o["internal_batch_size"]
        )
    if method is Method.SMOOTHGRAD:
        return _smoothgrad(fwd, x, tgt, o, base)
    if method is Method.GRADIENT_SHAP:
        return _gradient_shap(fwd, x, tgt, o, base)
    if method is Method.GUIDED_BACKPROP:
        _require_relu_modules(module, method)
        return ca.GuidedBackprop(module).attribute(x, target=tgt)
    if method is Method.DEEPLIFT:
        _require_relu_modules(module, method)
        return ca.DeepLift(module, multiply_by_inputs=o["multiply_by_inputs"]).attribute(
            x, baselines=base(), target=tgt
        )
    if method is Method.GRADCAM:
        return _gradcam(module, fwd, x, tgt, o, layer_names)
    if method is Method.OCCLUSION:
        p, s = o["patch"], o["stride"]
        if any(p > n for n in x.shape[2:]):
            raise InvalidOptionError(f"option 'patch' of method 'occlusion' must be at most {min(x.shape[2:])} here")
        with torch.no_grad():
            return ca.Occlusion(fwd).attribute(
                x.detach(), sliding_window_shapes=(1, p, p, p), strides=(1, s, s, s), baselines=base(),
                target=tgt, perturbations_per_eval=o["internal_batch_size"],
            )
    if method in (Method.LRP_EPSILON, Method.LRP_ALPHA_BETA, Method.LRP_COMPOSITE):
        lrp.canonise(module)
        lrp.set_rules(module, method, o)
        fwd.passes += 2  # captum's LRP runs two forward passes itself
        return ca.LRP(module).attribute(x, target=tgt)
    raise InvalidOptionError(f"attribution method {method.value!r} is not implemented")  # pragma: no cover


def _intensity_range(x: torch.Tensor) -> float:
    return float((x.max() - x.min()).item()) or 1.0


def _smoothgrad(fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]) -> torch.Tensor:
    from captum import attr as ca

    stdev = o["stdev"] * _intensity_range(x)
    # A private RNG stream: seeded noise that neither disturbs nor depends on the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o["seed"])
        if o["base"] == "gradient":
            return ca.NoiseTunnel(ca.Saliency(fwd)).attribute(
                x, nt_type="smoothgrad", nt_samples=o["nt_samples"], stdevs=stdev, target=tgt, abs=False,
                nt_samples_batch_size=o["internal_batch_size"],
            )
        # One noisy copy at a time: integrated gradients then batches its own steps by internal_batch_size.
        return ca.NoiseTunnel(ca.IntegratedGradients(fwd)).attribute(
            x, nt_type="smoothgrad", nt_samples=o["nt_samples"], stdevs=stdev, target=tgt, nt_samples_batch_size=1,
            baselines=base(), n_steps=o["n_steps"], internal_batch_size=o["internal_batch_size"],
        )


def _gradient_shap(fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]) -> torch.Tensor:
    from captum import attr as ca

    kinds = ("zeros", "blur", "template") if o["baseline"] == "all" else (o["baseline"],)
    # (K, 1, D, H, W): captum draws each sample's baseline from this set; one scan's baselines at a time.
    total = torch.zeros_like(x)
    stdev = o["stdev"] * _intensity_range(x)
    n, chunk = o["n_samples"], o["internal_batch_size"]
    shap = ca.GradientShap(fwd)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o["seed"])
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            refs = torch.cat([base(k, xi.detach()) for k in kinds])
            ti = tgt if isinstance(tgt, int) else [tgt[i]]
            done = 0
            # captum expands all n_samples at once; chunks of internal_batch_size bound memory (same expectation).
            while done < n:
                k = min(chunk, n - done)
                part = shap.attribute(xi, baselines=refs, n_samples=k, stdevs=stdev, target=ti)
                total[i : i + 1] += part.detach() * k
                done += k
    return total / n


def _gradcam(
    module: nn.Module, fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], layer_names: Sequence[str]
) -> torch.Tensor:
    from captum import attr as ca

    name = o["layer"] or default_layer(module, layer_names)
    modules = dict(module.named_modules())
    allowed = list(layer_names) or [n for n, m in modules.items() if isinstance(m, lrp.CONV)]
    if name not in allowed or name not in modules:
        raise NotFoundError(f"layer {name!r} not found for method 'gradcam'; layers: {allowed}")
    cam = ca.LayerGradCam(fwd, modules[name]).attribute(x, target=tgt, relu_attributions=o["relu"])
    if not isinstance(cam, torch.Tensor) or cam.dim() != 5:
        raise InvalidOptionError(f"layer {name!r} does not produce a 3D feature map; choose a conv layer: {allowed}")
    mode = o["interpolation"]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, **kwargs)  # (B, 1, D, H, W)


def _require_relu_modules(module: nn.Module, method: Method) -> None:
    # Both methods override the backward pass of nn.ReLU modules; a functional relu would silently be ignored.
    if not any(isinstance(m, nn.ReLU) for m in module.modules()):
        raise InvalidOptionError(
            f"method {method.value!r} needs ReLU activations as nn.ReLU modules; this model has none "
            "(use gradient, integrated_gradients or occlusion)"
        )
