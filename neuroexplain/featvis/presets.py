"""Options of the feature-visualization engine, their documented ranges, and the named presets.

Every option has a type, a default, an allowed range and a one-line doc (:data:`OPTIONS`); the gateway publishes the
same table in GetModel. A preset (:class:`Preset`) is a named set of values for these options (:data:`PRESETS`);
options passed by the caller override the preset's.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuroexplain.errors import InvalidOptionError, LimitExceededError
from neuroexplain.options import OptionSpec

MAX_STEPS = 4096
MAX_BATCH = 8


class Preset(enum.Enum):
    """Named regularization strategies (see :data:`PRESETS` for their parameters)."""

    NONE = "none"  # plain gradient ascent on voxels: the unregularized baseline
    PAPER = "paper"  # voxel + L2 (Adam weight decay) + Gaussian blur, after Eitel et al. (2022)
    ROBUST = "robust"  # 3D Fourier parametrization + transformation robustness (jitter, scale, rotate)
    FULL = "full"  # robust + data prior: a relative change of the MNI152 template (anchor=template), decay 1.0
    AMPLIFY = "amplify"  # full with decay 0.5: feature amplification of a scan (--start SCAN), tuned on validation

    @classmethod
    def parse(cls, value: Preset | str) -> Preset:
        if isinstance(value, Preset):
            return value
        try:
            return cls(value)
        except ValueError:
            raise InvalidOptionError(f"preset {value!r} is unknown; expected one of {[p.value for p in cls]}") from None


class Param(enum.Enum):
    """How the volume is parametrized during optimisation."""

    VOXEL = "voxel"  # one free value per voxel
    FOURIER = "fourier"  # 3D spectrum (rfftn) scaled by 1/f^decay: low frequencies move first


class RangeMap(enum.Enum):
    """Optional mapping of the parametrization into an intensity range."""

    NONE = "none"
    SIGMOID = "sigmoid"  # range_min + (range_max - range_min) * sigmoid(raw)


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("param", "enum", Param.VOXEL.value, "parametrization: one value per voxel, or a 3D Fourier spectrum",
               choices=tuple(p.value for p in Param)),
    OptionSpec("decay", "float", 1.0, "Fourier only: spectrum scaled by 1/f^decay (higher = smoother)", 0.0, 3.0),
    OptionSpec("cutoff", "float", 0.5, "Fourier only: free coefficients up to this frequency (cycles/voxel) along "
               "each axis; 0.5 = all. Lower = band-limited and cheaper; the start's higher frequencies stay as they are",
               0.05, 0.5),
    OptionSpec("range_map", "enum", RangeMap.NONE.value,
               "map the parametrization into [range_min, range_max] with a sigmoid",
               choices=tuple(r.value for r in RangeMap)),
    OptionSpec("range_min", "float", 0.0, "lower intensity bound (normalised units: brain 99th percentile = 1)",
               -10.0, 10.0),
    OptionSpec("range_max", "float", 1.5, "upper intensity bound (normalised units)", -10.0, 10.0),
    OptionSpec("clamp", "bool", False, "clamp intensities into [range_min, range_max] at every step"),
    OptionSpec("lr", "float", 0.05, "Adam learning rate", 1e-5, 10.0),
    OptionSpec("weight_decay", "float", 0.0, "Adam weight decay on the parameters (an L2 pull towards 0)", 0.0, 1.0),
    OptionSpec("l1", "float", 0.0, "weight of the mean |volume - start| penalty (start = 0 for noise)", 0.0, 100.0),
    OptionSpec("l2", "float", 0.0, "weight of the mean (volume - start)^2 penalty (start = 0 for noise)", 0.0, 100.0),
    OptionSpec("anchor", "enum", "none", "template: optimise a relative change d of the MNI152 template (of the scan, "
               "with a scan start), volume = template * (1 + d) (lesions are hyperintense relative to their tissue); "
               "l1/l2/tv, clamp and range_map then act on d, and noise starts around d = 0",
               choices=("none", "template")),
    OptionSpec("prior", "float", 0.0, "weight of the mean squared relative departure from the MNI152 template, "
               "((volume - template) / max(template, 0.1))^2: a data prior that pulls the volume towards normal "
               "anatomy and makes brightening cheapest where tissue is bright (0 = off)", 0.0, 10000.0),
    OptionSpec("tv", "float", 0.0, "weight of the 3D total-variation penalty (mean |gradient|)", 0.0, 100.0),
    OptionSpec("blur_sigma", "float", 0.0, "Gaussian blur of the parameters every blur_every steps, in voxels", 0.0, 5.0),
    OptionSpec("blur_every", "int", 0, "blur period in steps (0 = never)", 0, MAX_STEPS),
    OptionSpec("pad", "int", 0, "> 0: what a transform moves in from outside the box is 0 (background); 0: the box's "
               "edge voxels repeat", 0, 32),
    OptionSpec("jitter", "int", 0, "random shift per step, up to this many voxels along each axis", 0, 32),
    OptionSpec("scale", "float", 0.0, "random isotropic scaling per step, by a factor in [1 - scale, 1 + scale]",
               0.0, 0.5),
    OptionSpec("rotate", "float", 0.0, "random rotation per step about each of the three axes, up to this many degrees",
               0.0, 45.0),
    OptionSpec("brain_mask", "bool", False, "keep everything outside the template's brain mask at 0"),
    OptionSpec("noise_std", "float", 0.1, "noise start: standard deviation around mid-grey 0.5 (white for voxel, 1/f-coloured for Fourier)", 0.0, 1.0),
    OptionSpec("batch", "int", 1, f"number of samples optimised together (1 to {MAX_BATCH})", 1, MAX_BATCH),
    OptionSpec("diversity", "float", 0.0, "weight of the diversity term between the samples of a batch", 0.0, 100.0),
    OptionSpec("diversity_layer", "layer", "", "layer whose Gram matrices the diversity term compares "
               "(default: the target's layer, or the last targetable layer for class targets)"),
)
_BY_NAME = {o.name: o for o in OPTIONS}

_PAPER = {"param": "voxel", "lr": 0.05, "weight_decay": 0.01, "blur_sigma": 1.0, "blur_every": 4}
# Fourier steps reach every voxel at once, so robust uses a smaller lr than the voxel presets; decay 1.5 keeps the
# 1/f-coloured noise start smooth. Transforms are milder than lucid's 2D defaults: with global max pooling, larger ones
# left the lesion logit flat within 40 steps on our models (see the README's feature-visualization section). Only the
# coefficients up to 0.25 cycles/voxel (8 mm wavelength at 2 mm; the bundled models' stem samples at 4 mm) are free:
# the inverse transform costs about half as much, and the high frequencies were noise anyway.
_ROBUST = {"param": "fourier", "decay": 1.5, "cutoff": 0.25, "lr": 0.02, "pad": 2, "jitter": 2, "scale": 0.05,
           "rotate": 5.0}
_FULL = {**_ROBUST, "decay": 1.0, "anchor": "template"}
PRESETS: Mapping[Preset, Mapping[str, Any]] = {
    Preset.NONE: {"param": "voxel", "lr": 0.05},
    Preset.PAPER: _PAPER,
    Preset.ROBUST: _ROBUST,
    # robust + the data prior: the volume is the template times (1 + a Fourier-parametrized relative change), so
    # what the model adds is a change of normal anatomy; decay 1.0 lets blob-sized detail through (1.5 kept the lesion
    # class's changes too smooth to sit in white matter). Best lesion-likeness in docs/featvis_lesion.md.
    Preset.FULL: _FULL,
    # full for feature amplification (a scan as the anchor): decay 0.5 was chosen from {0.5, 1, 1.5} on the validation
    # scans of both bundled models and scored on their test and shifted sets (docs/featvis_protocol_<model>.md);
    # full's 1.0 was chosen for noise and template starts.
    Preset.AMPLIFY: {**_FULL, "decay": 0.5},
}


@dataclass(frozen=True)
class Settings:
    """Resolved options of one visualization (preset, then the caller's overrides), all validated."""

    values: Mapping[str, Any]
    explicit: frozenset[str]  # options the caller set (for contradiction checks)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def canonical(self) -> dict[str, Any]:
        """Every option's value, sorted: stable input for cache keys."""
        return dict(sorted(self.values.items()))


def resolve(preset: Preset | str, options: Mapping[str, Any] | None, layer_names: tuple[str, ...]) -> Settings:
    """Merge defaults, the preset and the caller's options; validate ranges and contradictions.

    Args:
        preset: the preset name or enum.
        options: the caller's overrides (values as ``str``, ``int``, ``float`` or ``bool``).
        layer_names: the model's targetable layers (allowed values of ``diversity_layer``).

    Raises:
        InvalidOptionError: unknown option, value out of range, or options that contradict each other.
    """
    p = Preset.parse(preset)
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    values.update(PRESETS[p])
    explicit = dict(options or {})
    for name, raw in explicit.items():
        spec = _BY_NAME.get(name)
        if spec is None:
            raise InvalidOptionError(f"option {name!r} is unknown; options: {sorted(_BY_NAME)}")
        if name == "diversity_layer":
            if raw not in layer_names:
                raise InvalidOptionError(f"option diversity_layer={raw!r} is not a layer of the model; "
                                         f"layers: {list(layer_names)}")
            values[name] = str(raw)
        else:
            values[name] = spec.parse(raw)
    s = Settings(values, frozenset(explicit))
    _check_contradictions(s)
    return s


def _check_contradictions(s: Settings) -> None:
    if s["range_min"] >= s["range_max"]:
        raise InvalidOptionError(f"range_min ({s['range_min']:g}) must be below range_max ({s['range_max']:g})")
    for name in ("decay", "cutoff"):
        if name in s.explicit and s["param"] != Param.FOURIER.value:
            raise InvalidOptionError(f"option {name} applies to param=fourier only; set param=fourier or drop {name}")
    if s.explicit & {"blur_sigma", "blur_every"} and (s["blur_sigma"] > 0) != (s["blur_every"] > 0):
        raise InvalidOptionError("blur needs both blur_sigma > 0 and blur_every > 0 (or both 0 to turn it off)")
    if (s["diversity"] > 0 or "diversity_layer" in s.explicit) and s["batch"] < 2:
        raise InvalidOptionError("the diversity term compares samples of a batch; set batch to 2 or more")
    if s["anchor"] == "template" and s["range_map"] == RangeMap.SIGMOID.value and not s["range_min"] < 0 < s["range_max"]:
        raise InvalidOptionError("with anchor=template the range bounds the relative change d, which starts at 0: "
                                 f"range_map=sigmoid needs range_min < 0 < range_max (now {s['range_min']:g} to "
                                 f"{s['range_max']:g})")
    if "clamp" in s.explicit and s["clamp"] and s["range_map"] == RangeMap.SIGMOID.value:
        raise InvalidOptionError("clamp and range_map=sigmoid both bound intensities; choose one")


def check_steps(steps: int) -> int:
    """Validate the number of optimisation steps (1 to :data:`MAX_STEPS`)."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidOptionError(f"steps must be an integer; expected 1 to {MAX_STEPS}")
    if steps < 1:
        raise InvalidOptionError(f"steps={steps} is out of range; expected 1 to {MAX_STEPS}")
    if steps > MAX_STEPS:
        raise LimitExceededError(f"steps={steps} exceeds the limit of {MAX_STEPS}")
    return steps


def describe_presets() -> dict[str, dict[str, Any]]:
    """Each preset's full option values (defaults filled in), for docs and GetModel."""
    return {p.value: {o.name: PRESETS[p].get(o.name, o.default) for o in OPTIONS} for p in Preset}
