"""Attribution methods and their options: one table used to validate requests and to describe them (GetModel).

Options arrive as strings from the command line (``--option key=value``) and the wire, or as numbers from Python
callers. :func:`parse_options` turns them into typed values, fills in defaults and rejects anything unknown or out
of range with an :class:`~neuroexplain.errors.InvalidOptionError` that names what is allowed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from neuroexplain.errors import InvalidOptionError
from neuroexplain.options import OptionSpec


class Method(enum.Enum):
    """Canonical attribution method names (the values travel on the wire and on the command line)."""

    INTEGRATED_GRADIENTS = "integrated_gradients"
    SMOOTHGRAD = "smoothgrad"
    GRADIENT = "gradient"
    GRADIENT_X_INPUT = "gradient_x_input"
    GUIDED_BACKPROP = "guided_backprop"
    GRADCAM = "gradcam"
    OCCLUSION = "occlusion"
    LRP_EPSILON = "lrp_epsilon"
    LRP_ALPHA_BETA = "lrp_alpha_beta"
    LRP_COMPOSITE = "lrp_composite"
    DEEPLIFT = "deeplift"
    GRADIENT_SHAP = "gradient_shap"

    @classmethod
    def parse(cls, value: Method | str) -> Method:
        """The method named ``value``; raises InvalidOptionError naming the allowed methods."""
        if isinstance(value, Method):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidOptionError(
                f"attribution method {value!r} is unknown; expected one of {[m.value for m in cls]}"
            ) from None


BASELINES = ("zeros", "blur", "template")
_SEED = OptionSpec("seed", "int", 0, "seed of the random noise / baselines (results are deterministic per seed)", 0, 2**31 - 1)


# ``internal_batch_size`` 0 (auto) on the CPU, per batched method (neuroexplain.attribution.batching).
CPU_BATCH = {Method.INTEGRATED_GRADIENTS: 4, Method.SMOOTHGRAD: 4, Method.GRADIENT_SHAP: 4, Method.OCCLUSION: 8}


def _batch(method: Method) -> OptionSpec:
    return OptionSpec(
        "internal_batch_size", "int", 0,
        f"volumes evaluated per forward/backward pass; bounds memory (about 20 MB per volume on the 2 mm grid); "
        f"0 = auto: {CPU_BATCH[method]} on the CPU, on a GPU as many as half its free memory holds", 0, 64,
    )


def _baseline(default: str = "zeros", choices: tuple[str, ...] = BASELINES) -> OptionSpec:
    return OptionSpec(
        "baseline", "str", default,
        "reference volume: zeros (background), blur (the scan smoothed by blur_sigma_mm) or template (MNI152 T1)",
        choices=choices,
    )


_BLUR = OptionSpec("blur_sigma_mm", "float", 8.0, "Gaussian sigma of the blurred-scan baseline, in mm", 0.5, 50.0)

METHOD_OPTIONS: dict[Method, tuple[OptionSpec, ...]] = {
    Method.INTEGRATED_GRADIENTS: (
        OptionSpec("n_steps", "int", 32, "steps of the Riemann/Gauss-Legendre path integral", 1, 512),
        _baseline(), _BLUR, _batch(Method.INTEGRATED_GRADIENTS),
    ),
    Method.SMOOTHGRAD: (
        OptionSpec("base", "str", "gradient", "attribution averaged over noisy copies", choices=("gradient", "integrated_gradients")),
        OptionSpec("nt_samples", "int", 16, "noisy copies averaged", 1, 256),
        OptionSpec("stdev", "float", 0.15, "noise standard deviation as a fraction of the input's intensity range", 0.0, 1.0),
        OptionSpec("n_steps", "int", 8, "integration steps per copy (base integrated_gradients only)", 1, 256),
        _baseline(), _BLUR, _batch(Method.SMOOTHGRAD), _SEED,
    ),
    Method.GRADIENT: (),
    Method.GRADIENT_X_INPUT: (),
    Method.GUIDED_BACKPROP: (),
    Method.GRADCAM: (
        OptionSpec("layer", "str", None, "conv layer to explain, one of the model's layers (default: the last)"),
        OptionSpec("relu", "bool", True, "keep only the positive part, as in Grad-CAM (false: signed map)"),
        OptionSpec("interpolation", "str", "trilinear", "upsampling to the input grid", choices=("trilinear", "nearest")),
    ),
    Method.OCCLUSION: (
        OptionSpec("patch", "int", 16, "edge of the cubic occluding patch, in model-grid voxels (2 mm each)", 1, 64),
        OptionSpec("stride", "int", 16, "step between patches, in model-grid voxels", 1, 64),
        _baseline(), _BLUR, _batch(Method.OCCLUSION),
    ),
    Method.LRP_EPSILON: (
        OptionSpec(
            "epsilon", "float", 1000.0,
            "stabiliser in units of each layer's output std (<= 0.01: gradient x input; large: only the strongest "
            "evidence paths keep relevance, sparser maps)", 0.0, 1e4,
        ),
    ),
    Method.LRP_ALPHA_BETA: (),  # captum 0.9 implements alpha=1, beta=0 only (Alpha1_Beta0_Rule)
    Method.LRP_COMPOSITE: (
        OptionSpec("gamma", "float", 0.25, "gamma rule on convolutions (favours positive contributions)", 0.0, 100.0),
        OptionSpec("epsilon", "float", 0.25, "epsilon rule on the fully connected layers, in units of their output std", 0.0, 1e4),
    ),
    Method.DEEPLIFT: (
        _baseline(), _BLUR,
        OptionSpec("multiply_by_inputs", "bool", True, "global attribution (x - baseline) * multiplier; false: multipliers only"),
    ),
    Method.GRADIENT_SHAP: (
        OptionSpec("n_samples", "int", 16, "random baseline/noise samples averaged", 1, 512),
        OptionSpec("stdev", "float", 0.1, "noise standard deviation as a fraction of the input's intensity range", 0.0, 1.0),
        _baseline("all", (*BASELINES, "all")), _BLUR, _batch(Method.GRADIENT_SHAP), _SEED,
    ),
}


def parse_options(method: Method | str, options: Mapping[str, str | int | float | bool] | None) -> dict[str, Any]:
    """Typed options of ``method`` with every default filled in (the canonical form, e.g. for cache keys).

    Args:
        method: a :class:`Method` or its name.
        options: ``name -> value``; strings (``"32"``, ``"true"``) as they come from the CLI or the wire, or numbers.

    Raises:
        InvalidOptionError: unknown method or option, a value of the wrong type, out of range or not a choice.
    """
    m = Method.parse(method)
    specs = {o.name: o for o in METHOD_OPTIONS[m]}
    given = dict(options or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        allowed = sorted(specs) or "none"
        raise InvalidOptionError(f"method {m.value!r} has no option {unknown[0]!r}; its options: {allowed}")
    return {name: (spec.parse(given[name], f"option {name!r} of method {m.value!r}") if name in given else spec.default) for name, spec in specs.items()}


def parse_option_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["n_steps=32", "baseline=blur"]`` -> ``{"n_steps": "32", "baseline": "blur"}`` (the CLI's ``--option``)."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidOptionError(f"option {pair!r} must look like key=value, e.g. n_steps=32")
        if key.strip() in out:
            raise InvalidOptionError(f"option {key.strip()!r} is given twice")
        out[key.strip()] = value.strip()
    return out
