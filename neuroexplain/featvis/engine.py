"""The activation-maximization engine: optimise a volume so that a class, channel, neuron or layer fires.

One call of :func:`visualize` runs Adam on a parametrized volume (voxels or 3D Fourier), with optional regularizers
(L1, L2, total variation, periodic blur, brain mask, intensity clamp) and transformation robustness, reports progress
every step, checks for cancellation every step, and returns the volume on the model grid as an array, NIfTI and PNG.

The shared model is never modified: its parameters already have ``requires_grad=False`` and it stays in eval mode;
the only thing attached to it are forward hooks on the layers the objective reads, which act only inside this call's
context (so concurrent calls on the same model do not see each other's activations) and are removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from neuroexplain.errors import CancelledError, InvalidOptionError
from neuroexplain.featvis.objectives import LOGITS, Objective, diversity, parse_target
from neuroexplain.featvis.param import Parametrization
from neuroexplain.featvis.presets import Param, Preset, RangeMap, Settings, check_steps, resolve
from neuroexplain.featvis.render import render_png
from neuroexplain.featvis.transforms import Robustness
from neuroexplain.models.registry import LoadedModel
from neuroexplain.volumes import Placement, Scan, nifti_bytes

MAX_SEED = 2**63 - 1
NOISE_MEAN = 0.5  # noise start: mid-grey in normalised units (brain 99th percentile = 1)
PRIOR_FLOOR = 0.1  # denominator floor of the relative departure from the template (0 outside the brain, >= 0.3 in it)


@dataclass(frozen=True)
class Progress:
    """One optimisation step done.

    Attributes:
        step: steps completed (1 to ``total``).
        total: steps requested.
        objective: the target objective on this step's (transformed) input, mean over the batch.
        preview_png: a PNG of the current volume every ``preview_every`` steps (and at the last step), else ``None``.
    """

    step: int
    total: int
    objective: float
    preview_png: bytes | None = None


class VisualizationCancelled(CancelledError):
    """The caller's ``should_cancel`` returned True; ``step`` is the number of steps completed."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"feature visualization cancelled after {step} of {total} steps")
        self.step = step
        self.total = total


@dataclass(frozen=True)
class FeatvisResult:
    """What a visualization produced.

    Attributes:
        volume: the (first) generated volume, model grid shape, float32, normalised intensity units.
        samples: every sample of the batch, ``(N, *grid.shape)``; ``samples[0] is volume``.
        affine: the model grid's voxel -> world affine (MNI mm for the bundled models).
        nifti: gzipped NIfTI of ``volume`` (4D ``(X, Y, Z, N)`` when the batch has N > 1 samples).
        png: orthogonal slices + axial mosaic of ``volume``.
        curve: the target objective at every step (on that step's transformed input).
        objective_final: the target objective on the final, untransformed ``volume``.
        target: the canonical objective text.
        preset: the preset used.
        settings: every resolved option (canonical, for cache keys and provenance).
        seed: the seed.
        native_nifti: with a scan start, ``volume`` resampled onto the scan's own grid and affine; else ``None``.
    """

    volume: np.ndarray
    samples: np.ndarray
    affine: np.ndarray
    nifti: bytes
    png: bytes
    curve: list[float]
    objective_final: float
    target: str
    preset: str
    settings: dict[str, Any]
    seed: int
    native_nifti: bytes | None = None
    objective_finals: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Activation capture


class _StopForward(Exception):
    """Raised by a hook once every activation the objective needs is captured: the rest of the forward is waste."""


@dataclass
class _Capture:
    needed: frozenset[str]
    stop_early: bool
    acts: dict[str, torch.Tensor] = field(default_factory=dict)


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("neuroexplain_featvis_capture", default=None)


def _make_hook(name: str) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        capture = _CAPTURE.get()
        if capture is None or name not in capture.needed:
            return  # another call's forward (or a plain predict) on the shared model
        capture.acts[name] = output
        if capture.stop_early and capture.needed <= capture.acts.keys():
            raise _StopForward

    return hook


@contextlib.contextmanager
def _hooks(model: LoadedModel, layers: frozenset[str]) -> Iterator[None]:
    handles = []
    try:
        for name in sorted(layers - {LOGITS}):
            handles.append(model.layer(name).register_forward_hook(_make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _activations(model: LoadedModel, x: torch.Tensor, needed: frozenset[str]) -> dict[str, torch.Tensor]:
    """Run the model on ``x`` and return the activations ``needed`` (hooks must be installed)."""
    capture = _Capture(needed=needed, stop_early=LOGITS not in needed)
    token = _CAPTURE.set(capture)
    try:
        try:
            out = model.module(x)
        except _StopForward:
            pass
        else:
            capture.acts[LOGITS] = out
    finally:
        _CAPTURE.reset(token)
    missing = needed - capture.acts.keys()
    if missing:
        raise InvalidOptionError(f"layers {sorted(missing)} produced no output in the forward pass")
    return capture.acts


# ---------------------------------------------------------------------------------------------------------------------
# Regularizers


def _tv3d(v: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B,)
    dd = (v[:, :, 1:] - v[:, :, :-1]).abs().flatten(1).mean(1)
    dh = (v[:, :, :, 1:] - v[:, :, :, :-1]).abs().flatten(1).mean(1)
    dw = (v[:, :, :, :, 1:] - v[:, :, :, :, :-1]).abs().flatten(1).mean(1)
    return dd + dh + dw


def relative_departure(volume: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``(volume - template) / max(template, PRIOR_FLOOR)``: the change a lesion makes (a relative hyperintensity);
    what the data prior penalises and what the evaluation measures lesion-likeness on."""
    return (volume - template) / template.clamp(min=PRIOR_FLOOR)


def _penalty(d: torch.Tensor, ref: torch.Tensor, s: Settings, volume: torch.Tensor,
             prior: torch.Tensor | None = None) -> torch.Tensor:  # (B,)
    """Regularizers on the parametrized image ``d`` (the volume, or with anchor=template its relative change) and
    the data prior on the volume itself."""
    v = d
    total = v.new_zeros(v.shape[0])
    if prior is not None:
        total = total + s["prior"] * relative_departure(volume, prior).pow(2).flatten(1).mean(1)
    if s["l1"]:
        total = total + s["l1"] * (v - ref).abs().flatten(1).mean(1)
    if s["l2"]:
        total = total + s["l2"] * (v - ref).pow(2).flatten(1).mean(1)
    if s["tv"]:
        total = total + s["tv"] * _tv3d(v)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# The engine


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as 0 on this thread while optimising: tiny gradients (e.g. of a template-anchored volume
    far from the maximum) otherwise hit the CPU's slow path and made a step ~30 % slower. Torch's default (off) is
    restored afterwards."""
    enabled = torch.set_flush_denormal(True)  # False where the CPU does not support it: nothing to restore
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _start_volume(model: LoadedModel, start: str | Scan, s: Settings, gen: torch.Generator
                  ) -> tuple[np.ndarray | None, Placement | None]:
    """The starting volume on the model grid (``None`` for noise) and, for a scan, its placement."""
    if isinstance(start, Scan):
        from neuroexplain.predict import prepare

        prepared = prepare(start, model)
        return prepared.array, prepared.placement
    if start == "template":
        from neuroexplain.template import anatomy

        return anatomy(model.spec.grid).t1, None
    if start == "noise":
        return None, None
    raise InvalidOptionError(f"start {start!r} is unknown; expected 'noise', 'template' or a scan")


def _brain_mask(model: LoadedModel) -> torch.Tensor:  # (1, 1, D, H, W)
    from neuroexplain.template import anatomy

    return torch.from_numpy(anatomy(model.spec.grid).brain.astype(np.float32))[None, None]


def visualize(
    model: LoadedModel,
    target: str | Objective,
    preset: Preset | str = Preset.ROBUST,
    steps: int = 256,
    seed: int = 0,
    start: str | Scan = "noise",
    options: Mapping[str, str | int | float | bool] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    preview_every: int = 0,
) -> FeatvisResult:
    """Generate a volume that maximises ``target`` (activation maximization).

    Args:
        model: a loaded model; it is shared and never modified.
        target: ``class:CLASS``, ``channel:LAYER:C``, ``neuron:LAYER:C:X:Y:Z``, ``layer:LAYER``, or an
            :class:`Objective` built with the functions of :mod:`neuroexplain.featvis.objectives`.
        preset: ``none``, ``paper``, ``robust`` or ``full`` (see :data:`~neuroexplain.featvis.presets.PRESETS`).
        steps: optimisation steps, 1 to 4096.
        seed: seeds the noise start and every random transform; same seed, same volume (on CPU).
        start: ``noise``, ``template`` (the MNI152 T1 on the model grid) or a :class:`~neuroexplain.volumes.Scan`
            (feature amplification: push a real scan towards the target).
        options: overrides of the preset's options (see :data:`~neuroexplain.featvis.presets.OPTIONS`).
        progress: called after every step.
        should_cancel: checked before every step; when it returns True the call raises
            :class:`VisualizationCancelled` (a :class:`~neuroexplain.errors.CancelledError`).
        preview_every: attach a PNG preview to every k-th progress report (0 = never).

    Returns:
        The volume on the model grid with its NIfTI, PNG, objective curve and, for a scan start, the volume mapped
        back onto the scan's grid.

    Raises:
        InvalidOptionError: unknown target/class/option, values out of range, contradictory options.
        NotFoundError: unknown layer.
        LimitExceededError: more steps than allowed.
        CancelledError: ``should_cancel`` returned True.
    """
    spec = model.spec
    steps = check_steps(steps)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidOptionError(f"seed must be an integer from 0 to {MAX_SEED}")
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
        raise InvalidOptionError("preview_every must be an integer >= 0 (0 = no previews)")
    preset_enum = Preset.parse(preset)
    layer_names = tuple(info.name for info in spec.layers)
    s = resolve(preset_enum, options, layer_names)
    objective = target if isinstance(target, Objective) else parse_target(spec, target)

    full = objective
    div_weight = float(s["diversity"])
    if div_weight > 0:
        div_layer = s["diversity_layer"] or _default_diversity_layer(objective, layer_names)
        full = objective + div_weight * diversity(div_layer)

    gen = torch.Generator().manual_seed(seed)
    batch = int(s["batch"])
    shape = spec.grid.shape
    start_np, placement = _start_volume(model, start, s, gen)
    lo, hi = float(s["range_min"]), float(s["range_max"])
    anchored = s["anchor"] == "template"
    anchor_np = None  # with a scan start the scan is the anchor: feature amplification as a relative change of it
    if anchored:
        anchor_np = start_np if placement is not None else None
        start_np = None if start_np is None else np.zeros(shape, dtype=np.float32)  # no change yet
    noise_level = 0.0 if anchored else NOISE_MEAN
    if start_np is None:
        start_t = torch.full((batch, 1, *shape), noise_level)  # noise is added in parameter space below
        ref = torch.zeros_like(start_t)
    else:
        start_t = torch.from_numpy(np.ascontiguousarray(start_np, dtype=np.float32))[None, None].repeat(batch, 1, 1, 1, 1)
        if batch > 1:  # distinct samples from one scan need distinct starting points
            start_t = start_t + torch.randn(start_t.shape, generator=gen) * float(s["noise_std"]) * 0.1
        ref = start_t.clone()
    mask = _brain_mask(model) if s["brain_mask"] else None
    if mask is not None:
        start_t = start_t * mask
        ref = ref * mask
    range_map = RangeMap(s["range_map"])
    if range_map is RangeMap.SIGMOID or s["clamp"]:
        start_t = start_t.clamp(lo, hi)
    param = Parametrization(Param(s["param"]), start_t.to(model.device), range_map, lo, hi, float(s["decay"]),
                            float(s["cutoff"]))
    if start_np is None:
        param.add_noise_(float(s["noise_std"]), gen)
    ref = ref.to(model.device)
    mask_d = mask.to(model.device) if mask is not None else None
    template = None
    if anchored or s["prior"]:
        from neuroexplain.template import anatomy

        template = torch.from_numpy(anatomy(spec.grid).t1)[None, None].to(model.device)  # 0 outside the brain
    prior = template if s["prior"] else None
    if anchor_np is not None:
        template = torch.from_numpy(np.ascontiguousarray(anchor_np, dtype=np.float32))[None, None].to(model.device)
    clamp_in_forward = bool(s["clamp"]) and Param(s["param"]) is Param.FOURIER
    robust = Robustness(int(s["pad"]), int(s["jitter"]), float(s["scale"]), float(s["rotate"]))
    bank = robust.bank(shape, gen, device=model.device) if robust.active else None
    optimizer = torch.optim.Adam(param.parameters(), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]),
                                 fused=True)  # one kernel instead of ~10 passes over 614k voxel parameters

    def current() -> tuple[torch.Tensor, torch.Tensor]:  # the parametrized image and the volume, (B, 1, D, H, W)
        d = param.volume()
        if clamp_in_forward:
            d = d.clamp(lo, hi)
        if mask_d is not None:
            d = d * mask_d
        if anchored:
            assert template is not None
            return d, torch.addcmul(template, template, d)  # anchor * (1 + d): 0 where the anchor is 0
        return d, d

    curve: list[float] = []
    with _hooks(model, full.layers), _flush_denormals():
        for step in range(steps):
            if should_cancel is not None and should_cancel():
                raise VisualizationCancelled(step, steps)
            optimizer.zero_grad(set_to_none=True)
            d, v = current()
            acts = _activations(model, bank.apply(v, gen) if bank is not None else v, full.layers)
            target_values = objective(acts)  # (B,)
            total = full(acts) if full is not objective else target_values
            loss = -(total - _penalty(d, ref, s, v, prior)).sum()
            loss.backward()
            optimizer.step()
            if s["clamp"]:
                param.clamp_()
            if s["blur_every"] and (step + 1) % int(s["blur_every"]) == 0:
                param.blur_(float(s["blur_sigma"]))
            value = float(target_values.detach().mean())
            if not math.isfinite(value):
                raise InvalidOptionError(f"the objective diverged at step {step + 1}; lower lr (now {s['lr']:g})")
            curve.append(value)
            if progress is not None:
                preview = None
                if preview_every and ((step + 1) % preview_every == 0 or step + 1 == steps):
                    with torch.no_grad():
                        preview = render_png(current()[1][0, 0].detach().cpu().numpy())
                progress(Progress(step + 1, steps, value, preview))
        with torch.no_grad():
            final = current()[1].detach()
            finals = objective(_activations(model, final, objective.layers)).cpu().tolist()

    samples = final[:, 0].cpu().numpy().astype(np.float32)  # (B, D, H, W)
    volume = samples[0]
    affine = np.asarray(spec.grid.affine, dtype=np.float64)
    nifti = nifti_bytes(volume if batch == 1 else np.moveaxis(samples, 0, -1), affine)
    native = None
    if placement is not None and isinstance(start, Scan):
        native = nifti_bytes(placement.to_native(volume), start.affine)
    return FeatvisResult(
        volume=volume,
        samples=samples,
        affine=affine,
        nifti=nifti,
        png=render_png(volume),
        curve=curve,
        objective_final=float(finals[0]),
        target=objective.description,
        preset=preset_enum.value,
        settings=s.canonical(),
        seed=seed,
        native_nifti=native,
        objective_finals=[float(f) for f in finals],
    )


def _default_diversity_layer(objective: Objective, layer_names: tuple[str, ...]) -> str:
    own = sorted(objective.layers - {LOGITS})
    if own:
        return own[0]
    if not layer_names:
        raise InvalidOptionError("the diversity term needs a targetable layer; the model declares none")
    return layer_names[-1]
