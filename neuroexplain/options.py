"""One option of a method or preset: its type, default, allowed values and doc, and how a caller's value is parsed.

Attribution methods (:mod:`neuroexplain.attribution.options`) and feature-visualization presets
(:mod:`neuroexplain.featvis.presets`) describe their options with :class:`OptionSpec`; the gateway publishes the same
descriptions in GetModel. Values arrive as strings from the command line and the wire, or as Python values.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from neuroexplain.errors import InvalidOptionError


@dataclass(frozen=True)
class OptionSpec:
    """One option.

    Attributes:
        name: the key (``n_steps``).
        type: ``int``, ``float``, ``str``, ``bool``, ``enum`` (a ``str`` with ``choices``) or ``layer`` (the name of a
            targetable layer; checked by the caller against the model).
        default: value used when the caller does not send the option.
        doc: one line for help texts and GetModel.
        minimum: inclusive lower bound for numbers, else ``None``.
        maximum: inclusive upper bound for numbers, else ``None``.
        choices: allowed values for strings, else ``None``.
    """

    name: str
    type: str
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        """Human-readable allowed values, for error messages, help and GetModel."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.type == "bool":
            return "true or false"
        if self.type == "layer":
            return "a targetable layer of the model"
        if self.minimum is not None or self.maximum is not None:
            return f"{'an integer' if self.type == 'int' else 'a number'} from {_fmt(self.minimum)} to {_fmt(self.maximum)}"
        return f"a {self.type}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "choices": list(self.choices) if self.choices is not None else None,
            "doc": self.doc,
        }

    def parse(self, raw: str | float | bool | enum.Enum, where: str = "") -> Any:
        """Typed, range-checked value of ``raw``; raises InvalidOptionError saying what is allowed.

        ``where`` names the option in messages (default ``option 'name'``).
        """
        where = where or f"option {self.name!r}"
        text = raw.value if isinstance(raw, enum.Enum) else raw
        text = text.strip() if isinstance(text, str) else text
        try:
            if self.type == "bool":
                value: Any = _parse_bool(text)
            elif self.type == "int":
                if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
                    raise ValueError
                value = int(text) if not isinstance(text, str) else int(text, 10)
            elif self.type == "float":
                if isinstance(text, bool):
                    raise ValueError
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = str(text)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"{where} must be {self.allowed()}; got {_show(raw)}") from None
        if self.choices is not None and value not in self.choices:
            raise InvalidOptionError(f"{where} must be {self.allowed()}; got {_show(raw)}")
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise InvalidOptionError(f"{where} must be {self.allowed()}; got {_show(raw)}")
        return value


def _fmt(x: float | None) -> str:
    if x is None:
        return "unbounded"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show(raw: object) -> str:
    # Option values are the caller's own parameters, never scan content; still, cap their length in messages.
    text = repr(raw.value if isinstance(raw, enum.Enum) else raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ValueError(value)
