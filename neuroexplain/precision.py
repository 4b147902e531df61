"""Mixed precision: which computations may run in float16 or bfloat16, and the autocast that runs them.

Reduced precision is offered only where it was measured to stay within tolerance of float32 for that model, on
that kind of device, on held-out scans (:mod:`neuroexplain.lab.evaluate_precision` measures it;
``neuroexplain evaluate-precision --write-spec`` stores the figures in the model's ``spec.json`` as ``mixed_precision``):

- Predict: every class probability within :data:`PROBABILITY_TOLERANCE` of float32's on every scan measured;
- an attribution method: Spearman's rank correlation of its map with float32's at least :data:`MIN_SPEARMAN` on
  every scan measured (a method that failed or gave non-finite values under autocast has no figure and never runs
  reduced).

Anything else runs in float32, whatever was asked for. A spec's ``mixed_precision`` record, per device type::

    {"cpu": {"seeds": [...], "torch": "2.13.0", "float16": {"predict": 0.00034, "methods": {"smoothgrad": 0.997,
     "lrp_alpha_beta": null, ...}}, "bfloat16": {...}}}

This module imports torch only inside :func:`autocast`, so the gateway (which never loads torch) shares the rule.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator, Mapping
from typing import Any

from neuroexplain.errors import InvalidOptionError

PROBABILITY_TOLERANCE = 1e-3
MIN_SPEARMAN = 0.99
PREDICT = "predict"  # the operation name beside the attribution methods' names


class Precision(enum.Enum):
    """The number format of a model's passes (the values are torch's dtype names)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @classmethod
    def parse(cls, value: Precision | str) -> Precision:
        """The precision named ``value``; raises InvalidOptionError naming the allowed ones."""
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidOptionError(f"precision {value!r} is unknown; expected one of {[p.value for p in cls]}",
                                     field="precision") from None


def within_tolerance(record: Mapping[str, Any], device_type: str, precision: Precision, operation: str) -> bool:
    """Whether ``record`` (a spec's ``mixed_precision``) shows ``operation`` (``predict`` or a method name) within
    tolerance at ``precision`` on ``device_type`` (``cpu``, ``cuda``). False wherever a figure is missing."""
    if precision is Precision.FLOAT32:
        return False
    measured = record.get(device_type, {}).get(precision.value, {})
    if operation == PREDICT:
        value = measured.get(PREDICT)
        return _finite(value) and value <= PROBABILITY_TOLERANCE
    value = measured.get("methods", {}).get(operation)
    return _finite(value) and value >= MIN_SPEARMAN


def effective(record: Mapping[str, Any], device_type: str, requested: Precision, operation: str) -> Precision:
    """``requested`` where :func:`within_tolerance` allows it, else float32."""
    return requested if within_tolerance(record, device_type, requested, operation) else Precision.FLOAT32


def reduced_operations(record: Mapping[str, Any], device_type: str, requested: Precision) -> list[str]:
    """The operations that run at ``requested`` (``predict`` first, then methods by name); [] for float32."""
    if requested is Precision.FLOAT32:
        return []
    methods = sorted(record.get(device_type, {}).get(requested.value, {}).get("methods", {}))
    return [op for op in (PREDICT, *methods) if within_tolerance(record, device_type, requested, op)]


def describe(record: Mapping[str, Any], requested: Precision) -> str:
    """One line for the log: what runs at ``requested`` on each device type the record measured."""
    if requested is Precision.FLOAT32:
        return "float32"
    parts = [f"on {device}: {', '.join(reduced_operations(record, device, requested)) or 'nothing'}"
             for device in sorted(record)]
    if not parts:
        return f"{requested.value} never measured: float32 everywhere"
    return f"{requested.value} {'; '.join(parts)}; float32 for the rest and on other devices"


@contextlib.contextmanager
def autocast(device_type: str, precision: Precision) -> Iterator[None]:
    """torch's autocast to ``precision`` on ``device_type``; nothing for float32."""
    if precision is Precision.FLOAT32:
        yield
        return
    import torch

    with torch.autocast(device_type, dtype=getattr(torch, precision.value)):
        yield


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
