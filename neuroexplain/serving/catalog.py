"""The model catalog: :class:`~neuroexplain.serving.types.ModelInfo` from a model's ``spec.json`` and the library's
option tables, without importing torch (the gateway in front of TorchServe never loads it).

The option tables live in ``neuroexplain/attribution/options.py`` and ``neuroexplain/featvis/presets.py``; both are
torch-free, but their packages' ``__init__`` import the torch code. :func:`_torch_free_module` therefore loads such a
submodule under its own name without running the package ``__init__`` (when torch code later imports the package,
the ``__init__`` finds the submodule already loaded and reuses it: one table per process).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from neuroexplain.errors import InvalidInputError
from neuroexplain.serving.types import LayerSummary, MethodInfo, ModelInfo, OptionInfo

_ROOT = Path(__file__).resolve().parents[1]  # the neuroexplain package


def _torch_free_module(name: str) -> ModuleType:
    """Import ``neuroexplain.<pkg>.<mod>`` (a module that imports no torch) without its package's ``__init__``."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    path = _ROOT.joinpath(*name.split(".")[1:]).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships with the package
        raise ImportError(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def option_text(value: Any) -> str:
    """An option value as the wire and the CLI write it (``true``, ``0.05``; ``""`` = decided by the model)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value.value if hasattr(value, "value") else value)


def _option(o: Any, default: Any) -> OptionInfo:
    return OptionInfo(name=o.name, type=o.type, default=option_text(default), allowed=o.allowed(), description=o.doc)


@functools.cache
def attribution_methods() -> tuple[MethodInfo, ...]:
    """Attribution methods the library offers, with each option's default and allowed values."""
    table = _torch_free_module("neuroexplain.attribution.options").METHOD_OPTIONS
    return tuple(MethodInfo(name=method.value, options=tuple(_option(o, o.default) for o in options))
                 for method, options in table.items())


@functools.cache
def visualization_presets() -> tuple[MethodInfo, ...]:
    """Visualization presets with every option's value under that preset."""
    presets = _torch_free_module("neuroexplain.featvis.presets")
    return tuple(
        MethodInfo(name=preset.value, options=tuple(_option(o, values.get(o.name, o.default)) for o in presets.OPTIONS))
        for preset, values in presets.PRESETS.items()
    )


def model_info(spec: Mapping[str, Any], spec_sha256: str = "") -> ModelInfo:
    """:class:`ModelInfo` from a parsed ``spec.json`` (the library's ``ModelSpec.to_dict()`` form).

    Args:
        spec: the spec document.
        spec_sha256: hex SHA-256 of the spec file's bytes (part of every cache key).

    Raises:
        InvalidInputError: the document lacks a field or has one of the wrong shape.
    """
    try:
        affine = [[float(v) for v in row] for row in spec["grid"]["affine"]]
        if len(affine) != 4 or any(len(row) != 4 for row in affine):
            raise ValueError("affine")
        check = spec.get("input_check") or {}
        metrics = spec.get("metrics") or {}
        accuracy = metrics.get("held_out_accuracy")
        return ModelInfo(
            name=str(spec["name"]),
            version=str(spec["version"]),
            task=str(spec["task"]),
            classes=tuple(str(c) for c in spec["classes"]),
            grid_shape=tuple(int(s) for s in spec["grid"]["shape"]),  # type: ignore[arg-type]
            grid_affine=tuple(v for row in affine for v in row),
            voxel_mm=tuple(math.hypot(*(affine[r][c] for r in range(3))) for c in range(3)),  # type: ignore[arg-type]
            weights_sha256=str(spec.get("weights_sha256", "")),
            layers=tuple(LayerSummary(str(l["name"]), int(l["channels"]), tuple(int(s) for s in l["shape"]))  # type: ignore[arg-type]
                         for l in spec.get("layers", ())),
            attribution_methods=attribution_methods(),
            visualization_presets=visualization_presets(),
            held_out_accuracy=None if accuracy is None else float(accuracy),
            spec_sha256=spec_sha256,
            evaluation=str(spec.get("evaluation", "")),
            temperature=float(spec.get("temperature", 1.0)),
            has_feature_statistics=bool(check.get("statistics")),
            mixed_precision=dict(spec.get("mixed_precision") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        name = spec.get("name", "?") if isinstance(spec, Mapping) else "?"
        raise InvalidInputError(f"spec.json of model {str(name)[:64]!r} is malformed ({type(exc).__name__}: "
                                f"{exc})") from None


def model_info_from_bytes(raw: bytes) -> ModelInfo:
    """:class:`ModelInfo` from the bytes of a ``spec.json`` (digest taken over exactly these bytes)."""
    try:
        spec = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError("spec.json is not valid JSON") from None
    if not isinstance(spec, dict):
        raise InvalidInputError("spec.json must hold a JSON object")
    return model_info(spec, hashlib.sha256(raw).hexdigest())


def model_info_from_file(path: Path) -> ModelInfo:
    """:class:`ModelInfo` of the ``spec.json`` at ``path``."""
    return model_info_from_bytes(Path(path).read_bytes())
