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
from neuroexplain.attribution.batching import occlusion_corners, resolved
from neuroexplain.attribution.options import Method
from neuroexplain.errors import CancelledError, InvalidOptionError, NotFoundError
from neuroexplain.models.registry import structural_copy
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


# Methods that rewrite weights while they run (captum's LRP rules assign ``weight.data``; canonisation fuses layers).
WRITES_WEIGHTS = frozenset({Method.LRP_EPSILON, Method.LRP_ALPHA_BETA, Method.LRP_COMPOSITE})


def private_copy(module: nn.Module, method: Method | None = None) -> nn.Module:
    """A copy of ``module`` for one request, in eval mode.

    Without ``method`` the copy is deep (``copy.deepcopy``): the caller may do anything with it (the randomisation
    test re-initialises its layers). With a method, the copy is structural: new module objects with their own hook
    tables and children, so hooks and replaced layers never reach ``module``; a method in :data:`WRITES_WEIGHTS`
    (LRP) also gets its own parameter and buffer tensors, any other method shares them read-only. Either costs a
    fraction of a millisecond instead of a deep copy's milliseconds.
    """
    if method is None:
        clone = copy.deepcopy(module)
    else:
        clone = structural_copy(module)
        if method in WRITES_WEIGHTS:
            for m in clone.modules():
                m._parameters = {
                    k: None if v is None else nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
                    for k, v in m._parameters.items()
                }
                m._buffers = {k: None if v is None else v.clone() for k, v in m._buffers.items()}
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
        opts = resolved(method, opts, module, x)  # internal_batch_size 0 (auto): a size for this device
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
        return _deeplift(module, fwd, x, tgt, o, base)
    if method is Method.GRADCAM:
        # The input needs no gradient: Grad-CAM backpropagates only down to the explained layer.
        return _gradcam(module, fwd, x.detach(), tgt, o, layer_names)
    if method is Method.OCCLUSION:
        p = o["patch"]
        if any(p > n for n in x.shape[2:]):
            raise InvalidOptionError(f"option 'patch' of method 'occlusion' must be at most {min(x.shape[2:])} here")
        if o["stride"] > p:  # voxels between patches would get no relevance at all
            raise InvalidOptionError(f"option 'stride' of method 'occlusion' must be at most patch ({p}); got {o['stride']}")
        return _occlusion(fwd, x.detach(), tgt, o, base)
    if method in (Method.LRP_EPSILON, Method.LRP_ALPHA_BETA, Method.LRP_COMPOSITE):
        lrp.canonise(module)
        lrp.set_rules(module, method, o)
        if method is Method.LRP_EPSILON:
            return lrp.epsilon_map(module, fwd, x, _targets(tgt, x.shape[0], x.device))
        fwd.passes += 2  # captum's LRP runs two forward passes itself
        return lrp.LRP(module).attribute(x, target=tgt)
    raise InvalidOptionError(f"attribution method {method.value!r} is not implemented")  # pragma: no cover


def _intensity_range(x: torch.Tensor) -> float:
    return float((x.max() - x.min()).item()) or 1.0


def _target_of(tgt: Any, i: int) -> int:
    return int(tgt) if isinstance(tgt, int) else int(tgt[i])


def _targets(tgt: Any, b: int, device: torch.device) -> torch.Tensor:
    """The class index of each of ``b`` volumes, ``(b,)``."""
    return torch.as_tensor([_target_of(tgt, i) for i in range(b)], device=device)


def _input_gradient(fwd: _Forward, points: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient of the ``target`` logit with respect to each of ``points`` ``(k, 1, D, H, W)``: one pass."""
    points = points.detach().requires_grad_(True)
    out = fwd(points)[:, target].sum()  # samples are independent: the gradient of the sum is each one's gradient
    return torch.autograd.grad(out, points)[0]


def _generator(seed: int, device: torch.device) -> torch.Generator:
    # A private RNG stream: seeded noise that neither disturbs nor depends on the global generators.
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _noise_into(buf: torch.Tensor, g: torch.Generator, stdev: float) -> torch.Tensor:
    """Fill ``buf`` ``(k, 1, D, H, W)`` with N(0, stdev) noise, one sample at a time (the same draws in any chunks)."""
    for j in range(buf.shape[0]):
        torch.randn(buf.shape[1:], generator=g, out=buf[j])
    return buf.mul_(stdev)


def _smoothgrad(fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]) -> torch.Tensor:
    from captum import attr as ca

    if o["base"] != "gradient":
        stdev = o["stdev"] * _intensity_range(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o["seed"])
            # One noisy copy at a time: integrated gradients then batches its own steps by internal_batch_size.
            return ca.NoiseTunnel(ca.IntegratedGradients(fwd)).attribute(
                x, nt_type="smoothgrad", nt_samples=o["nt_samples"], stdevs=stdev, target=tgt, nt_samples_batch_size=1,
                baselines=base(), n_steps=o["n_steps"], internal_batch_size=o["internal_batch_size"],
            )
    # SmoothGrad over the gradient (Smilkov et al. 2017): the mean gradient at nt_samples noisy copies of each scan.
    # Written out rather than captum's NoiseTunnel, which also accumulates squares for its variance modes and draws
    # its noise through the global generator; the result is the same estimator, seeded per scan.
    n, chunk = o["nt_samples"], o["internal_batch_size"]
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach()
        stdev = o["stdev"] * _intensity_range(xi)
        g = _generator(o["seed"], x.device)
        for done in range(0, n, chunk):
            k = min(chunk, n - done)
            points = _noise_into(torch.empty((k, *xi.shape[1:]), dtype=x.dtype, device=x.device), g, stdev).add_(xi)
            out[i] += _input_gradient(fwd, points, _target_of(tgt, i)).sum(0)
    return out / n


def _gradient_shap(fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]) -> torch.Tensor:
    # GradientSHAP (Lundberg & Lee 2017, as captum defines it): the mean over n_samples of
    # grad(b + a (x' - b)) * (x' - b), with b drawn from the baselines, a ~ U(0, 1) and x' = x + N(0, stdev).
    # Written out rather than captum's GradientShap, which draws b and a from numpy's global generator (not
    # reproducible per seed) and expands every sample at once; here each sample's draws come from a generator
    # seeded per scan, one sample at a time, so the map does not depend on internal_batch_size.
    kinds = ("zeros", "blur", "template") if o["baseline"] == "all" else (o["baseline"],)
    n, chunk = o["n_samples"], o["internal_batch_size"]
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach()
        refs = torch.cat([base(k, xi) for k in kinds])  # (K, 1, D, H, W)
        stdev = o["stdev"] * _intensity_range(xi)
        g = _generator(o["seed"], x.device)
        which = torch.randint(len(kinds), (n,), generator=g, device=x.device).tolist()
        alpha = torch.rand((n,), generator=g, device=x.device, dtype=torch.float64).tolist()
        diffs = xi - refs  # (K, 1, D, H, W): x - b for each baseline
        t = _target_of(tgt, i)
        for done in range(0, n, chunk):
            k = min(chunk, n - done)
            delta = torch.empty((k, *xi.shape[1:]), dtype=x.dtype, device=x.device)  # x' - b per sample
            points = torch.empty_like(delta)  # b + a (x' - b)
            for j in range(k):
                w, a = which[done + j], alpha[done + j]
                torch.randn(delta.shape[1:], generator=g, out=delta[j]).mul_(stdev).add_(diffs[w])
                torch.add(refs[w], delta[j], alpha=a, out=points[j])
            grads = _input_gradient(fwd, points, t)
            for j in range(k):
                out[i].addcmul_(grads[j], delta[j])
    return out / n


def _occlusion(fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014) with cubic patches, as captum's Occlusion defines it.

    A voxel's relevance is the mean, over the patches that cover it, of the drop of the target logit when the patch
    is replaced by the baseline (stride <= patch, so every voxel is covered). Written out rather than captum's Occlusion, which
    builds every perturbed batch from scratch (masks, stacks, sums over the whole volume): here one working batch
    holds copies of the scan, a patch is pasted in before a pass and restored after it.
    """
    p, s, per_eval = o["patch"], o["stride"], o["internal_batch_size"]
    shape = tuple(x.shape[2:])
    corners = occlusion_corners(shape, p, s)
    out = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi, t = x[i, 0], _target_of(tgt, i)
            ref = base(inp=x[i : i + 1])[0, 0]
            initial = fwd(x[i : i + 1])[0, t]
            total = torch.zeros_like(xi)
            count = torch.zeros_like(xi)
            work = xi.expand(min(per_eval, len(corners)), 1, *shape).clone()  # (b, 1, D, H, W)
            for start in range(0, len(corners), per_eval):
                boxes = [tuple(slice(c, c + p) for c in corner) for corner in corners[start : start + per_eval]]
                for j, box in enumerate(boxes):
                    work[j, 0][box] = ref[box]
                drops = initial - fwd(work[: len(boxes)])[:, t]
                for j, box in enumerate(boxes):
                    total[box] += drops[j]
                    count[box] += 1
                    work[j, 0][box] = xi[box]
            out[i, 0] = total / count
    return out


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
    if o["interpolation"] == "nearest":
        return F.interpolate(cam, size=tuple(x.shape[2:]), mode="nearest")
    d, h, w = x.shape[2:]
    return upsample_trilinear(cam, (d, h, w))  # (B, 1, D, H, W)


def upsample_trilinear(v: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``F.interpolate(v, size, mode="trilinear", align_corners=False)`` as three 1D passes (same values).

    Trilinear interpolation is separable; one axis at a time, with the longest pass last and writing the result in
    place, it takes about a third of the time of the 3D kernel on the 2 mm grid.
    """
    b, c, d, h, w = v.shape  # (B, C, d, h, w)
    big_d, big_h, big_w = size
    n = b * c
    v = F.interpolate(v.reshape(n, d, h * w).transpose(1, 2), size=big_d, mode="linear", align_corners=False)
    v = v.transpose(1, 2).reshape(n * big_d, h, w).transpose(1, 2)  # (n * D, w, h)
    v = F.interpolate(v, size=big_h, mode="linear", align_corners=False).transpose(1, 2).reshape(n, big_d * big_h, w)
    return F.interpolate(v, size=big_w, mode="linear", align_corners=False).reshape(b, c, big_d, big_h, big_w)


def _require_relu_modules(module: nn.Module, method: Method) -> None:
    # Both methods override the backward pass of nn.ReLU modules; a functional relu would silently be ignored.
    if not any(isinstance(m, nn.ReLU) for m in module.modules()):
        raise InvalidOptionError(
            f"method {method.value!r} needs ReLU activations as nn.ReLU modules; this model has none "
            "(use gradient, integrated_gradients or occlusion)"
        )


# ---------------------------------------------------------------------------------------------------------------------
# DeepLIFT (rescale rule), as captum's DeepLift computes it, without its per-module hooks


_DEEPLIFT_EPS = 1e-10  # captum's default: below this |x - x_ref| the rule falls back to the gradient


class _RescaleFn(torch.autograd.Function):
    """ReLU whose backward multiplies by delta_out / delta_in (the rescale rule) on a batch ``[inputs; references]``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:  # (2B, ...) -> (2B, ...)
        out = torch.relu(z)
        pair = z.shape[0] // 2
        zz, oo = z.view(2, pair, *z.shape[1:]), out.view(2, pair, *z.shape[1:])
        d_in = zz[0] - zz[1]
        small = d_in.abs() < _DEEPLIFT_EPS
        ratio = (oo[0] - oo[1]) / d_in  # inf or nan where d_in == 0: replaced just below
        # Both halves get the same multiplier; where the two inputs (almost) coincide, each its own gradient.
        mult = torch.empty_like(z)
        torch.where(small, zz[0] > 0, ratio, out=mult[:pair])  # half by half: a broadcast where is slower
        torch.where(small, zz[1] > 0, ratio, out=mult[pair:])
        ctx.save_for_backward(mult)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (mult,) = ctx.saved_tensors
        return grad * mult


class _RescaleMaxPoolFn(torch.autograd.Function):
    """Max pooling with captum's DeepLIFT rule for it on a batch ``[inputs; references]``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, pool: Any) -> torch.Tensor:  # pool: nn.MaxPool2d | nn.MaxPool3d
        fn: Any = F.max_pool2d if z.dim() == 4 else F.max_pool3d
        out, idx = fn(z, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True)
        ctx.save_for_backward(z, out, idx)
        ctx.pool = pool
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, out, idx = ctx.saved_tensors
        pool = ctx.pool
        n = z.dim() - 2
        k, s, p, d = (_tuple(v, n) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
        if k == s and not any(p) and all(v == 1 for v in d):
            return _maxpool_rule_disjoint(z, out, idx, grad), None
        pair = z.shape[0] // 2
        unpool, regular_grad = (
            (F.max_unpool2d, torch.ops.aten.max_pool2d_with_indices_backward) if z.dim() == 4
            else (F.max_unpool3d, torch.ops.aten.max_pool3d_with_indices_backward)
        )
        o, o_ref = out[:pair], out[pair:]
        xmax = torch.max(o, o_ref)
        d_out = torch.cat([xmax - o_ref, o - xmax])
        spread = unpool(grad * d_out, idx, pool.kernel_size, pool.stride, pool.padding, list(z.shape))
        d_in = z[:pair] - z[pair:]
        small = d_in.abs() < _DEEPLIFT_EPS
        rescaled = (spread[:pair] + spread[pair:]) / d_in  # inf or nan where d_in == 0: replaced below
        if not small.any():
            return torch.cat([rescaled, rescaled]), None
        regular = regular_grad(grad, z, k, s, p, d, pool.ceil_mode, idx)  # the ordinary gradient, per half
        torch.where(small, regular[:pair], rescaled, out=regular[:pair])
        torch.where(small, regular[pair:], rescaled, out=regular[pair:])
        return regular, None


def _maxpool_rule_disjoint(z: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """captum's DeepLIFT max-pooling rule for windows that do not overlap, computed on the pooled grid.

    The rule's input gradient is ``(unpool(g * d_out, idx) + unpool(g_ref * d_out_ref, idx_ref)) / d_in``, each half
    falling back to its ordinary gradient where ``|d_in| < eps``. With disjoint windows it is non-zero only at the
    two argmax positions of each window, so everything is computed there (1/8 of the voxels for 2x2x2 windows) and
    scattered once, instead of unpooling and dividing on the full input grid.
    """
    pair = z.shape[0] // 2
    o0, o1, i0, i1, g0, g1 = out[:pair], out[pair:], idx[:pair], idx[pair:], grad[:pair], grad[pair:]
    z0, z1 = z[:pair].flatten(2), z[pair:].flatten(2)  # (B, C, voxels)
    xmax = torch.max(o0, o1)
    c0 = g0 * (xmax - o1)  # what each half's unpooled term puts at its own argmax
    c1 = g1 * (o0 - xmax)
    same = i0 == i1
    d_at_i0 = o0 - z1.gather(2, i0.flatten(2)).view_as(o0)  # d_in at the scan's argmax
    d_at_i1 = z0.gather(2, i1.flatten(2)).view_as(o1) - o1  # d_in at the reference's argmax
    r0 = torch.where(same, c0 + c1, c0) / d_at_i0
    r1 = c1 / d_at_i1
    small0 = d_at_i0.abs() < _DEEPLIFT_EPS
    small1 = (d_at_i1.abs() < _DEEPLIFT_EPS) | same
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    result = torch.zeros_like(z)
    r_in, r_ref = result[:pair].flatten(2), result[pair:].flatten(2)  # views: scatter writes into result
    # At the scan's argmax: the rescaled sum, or each half's ordinary gradient (the reference's only if its
    # argmax is the same voxel).
    r_in.scatter_add_(2, i0.flatten(2), torch.where(small0, g0, r0).flatten(2))
    r_ref.scatter_add_(2, i0.flatten(2), torch.where(small0, torch.where(same, g1, zero), r0).flatten(2))
    # At the reference's argmax, where it differs from the scan's.
    keep1 = ~same
    r_in.scatter_add_(2, i1.flatten(2), torch.where(small1, zero, r1).flatten(2))
    r_ref.scatter_add_(2, i1.flatten(2), torch.where(small1, torch.where(keep1, g1, zero), r1).flatten(2))
    return result


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


class _RescaleReLU(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _RescaleFn.apply(z)


class _RescaleMaxPool(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _RescaleMaxPoolFn.apply(z, self.pool)


_MAXPOOL = (nn.MaxPool2d, nn.MaxPool3d)


def _deeplift_fast_path(module: nn.Module) -> bool:
    """True when every non-linearity captum's DeepLift treats specially is a ReLU or a max pooling."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    special = tuple(SUPPORTED_NON_LINEAR)
    return all(type(m) in (nn.ReLU, *_MAXPOOL) for m in module.modules() if type(m) in special)


def _deeplift(
    module: nn.Module, fwd: _Forward, x: torch.Tensor, tgt: Any, o: dict[str, Any], base: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), the same numbers as captum's ``DeepLift``.

    captum registers three hooks on every non-linear module and clones every activation in Python hooks; here a
    structural copy of the network has its ReLU and max-pooling modules swapped for autograd functions that keep
    the multipliers from the forward pass, so one forward of ``[x; baseline]`` and one backward give the map. Models
    with other non-linearities (ELU, sigmoid, softmax...) go through captum.
    """
    from captum import attr as ca

    ref = base()
    if not _deeplift_fast_path(module):
        return ca.DeepLift(module, multiply_by_inputs=o["multiply_by_inputs"]).attribute(x, baselines=ref, target=tgt)
    swapped = structural_copy(module)
    lrp.canonise(swapped)  # batch norm folded into its convolution: the same affine map, one layer fewer per pass
    for parent in list(swapped.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is nn.ReLU:
                parent._modules[name] = _RescaleReLU()
            elif child is not None and type(child) in _MAXPOOL:
                parent._modules[name] = _RescaleMaxPool(child)
    run = _Forward(swapped, fwd.should_cancel)
    b = x.shape[0]
    xg = x.detach().requires_grad_(True)
    out = run(torch.cat([xg, ref.detach()]))  # (2B, n_classes): the scans, then their baselines
    fwd.passes += run.passes
    t = _targets(tgt, b, x.device).repeat(2)
    # As captum: the target logits of scans and baselines summed, differentiated with respect to the scans.
    grads = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xg)[0]
    return (x.detach() - ref) * grads if o["multiply_by_inputs"] else grads
