"""What feature visualization maximises: class logits, channels, neurons, whole layers, and combinations.

An :class:`Objective` reads the activations captured during one forward pass (``acts[layer]`` is the layer's output,
``acts[LOGITS]`` the model's output) and returns one value per sample in the batch, ``(B,)``: the engine maximises
their sum. Objectives combine with ``+``, ``-``, unary ``-`` and multiplication by a number (Olah et al., Distill 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from neuroexplain.errors import InvalidOptionError, NotFoundError
from neuroexplain.models.spec import ModelSpec

LOGITS = "<logits>"  # key of the model's output in the activation map

Activations = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A differentiable score to maximise.

    Attributes:
        fn: activations -> per-sample values ``(B,)``.
        layers: layer names the objective reads (``LOGITS`` for the model output); hooks capture exactly these.
        description: canonical text, e.g. ``channel:conv2:3`` or ``class:lesion - 0.5*channel:conv1:0``.
    """

    fn: Callable[[Activations], torch.Tensor]
    layers: frozenset[str]
    description: str

    def __call__(self, acts: Activations) -> torch.Tensor:  # (B,)
        return self.fn(acts)

    @property
    def needs_logits(self) -> bool:
        return LOGITS in self.layers

    def __add__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) + other(a), self.layers | other.layers,
                         f"{self.description} + {other.description}")

    def __sub__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) - other(a), self.layers | other.layers,
                         f"{self.description} - {other.description}")

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.description})")

    def __mul__(self, weight: float) -> Objective:
        w = float(weight)
        return Objective(lambda a: w * self(a), self.layers, f"{w:g}*{self.description}")

    __rmul__ = __mul__


def class_logit(index: int, name: str) -> Objective:
    """The pre-softmax logit of one class (softmax would also reward pushing the other classes down)."""
    return Objective(lambda a: a[LOGITS][:, index], frozenset({LOGITS}), f"class:{name}")


def channel(layer: str, c: int) -> Objective:
    """Mean activation of channel ``c`` of ``layer`` over all positions."""
    return Objective(lambda a: a[layer][:, c].flatten(1).mean(1), frozenset({layer}), f"channel:{layer}:{c}")


def neuron(layer: str, c: int, x: int, y: int, z: int) -> Objective:
    """Activation of channel ``c`` of ``layer`` at one position ``(x, y, z)`` of the layer's output grid."""
    return Objective(lambda a: a[layer][:, c, x, y, z], frozenset({layer}), f"neuron:{layer}:{c}:{x}:{y}:{z}")


def whole_layer(layer: str) -> Objective:
    """DeepDream: mean squared activation of every channel of ``layer``."""
    return Objective(lambda a: a[layer].pow(2).flatten(1).mean(1), frozenset({layer}), f"layer:{layer}")


def diversity(layer: str) -> Objective:
    """Negative mean cosine similarity between each sample's Gram matrix and the others' (Olah et al., 2017).

    Added with a weight to a batch of N > 1 samples, it pushes the samples apart so that they show different facets of
    the same feature. With one sample it is 0.
    """

    def fn(a: Activations) -> torch.Tensor:
        act = a[layer]  # (B, C, ...)
        b, c = act.shape[:2]
        if b < 2:
            return act.new_zeros(b)
        flat = act.reshape(b, c, -1)
        gram = torch.bmm(flat, flat.transpose(1, 2)).reshape(b, -1)  # (B, C*C)
        gram = gram / (gram.norm(dim=1, keepdim=True) + 1e-8)
        sim = gram @ gram.T  # (B, B)
        off_diag = sim.sum(1) - sim.diagonal()
        return -off_diag / (b - 1)

    return Objective(fn, frozenset({layer}), f"diversity:{layer}")


def _int(text: str, what: str, spec_text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidOptionError(f"{what} {text!r} in target {spec_text!r} is not an integer") from None


TARGET_FORMS = ("class:CLASS", "channel:LAYER:C", "neuron:LAYER:C:X:Y:Z", "layer:LAYER")


def parse_target(spec: ModelSpec, target: str) -> Objective:
    """Parse a target string against a model's spec.

    Args:
        spec: the model's spec (classes, layers with channel counts and output shapes).
        target: ``class:CLASS``, ``channel:LAYER:C``, ``neuron:LAYER:C:X:Y:Z`` or ``layer:LAYER``.

    Returns:
        The objective.

    Raises:
        InvalidOptionError: malformed target, unknown class, channel or position out of range (the message names
            what is allowed).
        NotFoundError: unknown layer (the message lists the model's layers).
    """
    if not isinstance(target, str) or not target:
        raise InvalidOptionError(f"target must be one of {list(TARGET_FORMS)}")
    kind, _, rest = target.partition(":")
    parts = rest.split(":") if rest else []
    expected = {"class": 1, "channel": 2, "neuron": 5, "layer": 1}
    if kind not in expected:
        raise InvalidOptionError(f"target kind {kind!r} is unknown; expected one of {list(TARGET_FORMS)}")
    if len(parts) != expected[kind]:
        form = next(f for f in TARGET_FORMS if f.startswith(kind + ":"))
        raise InvalidOptionError(f"target {target!r} is malformed; expected {form}")
    if kind == "class":
        return class_logit(spec.class_index(parts[0]), parts[0])
    layer_name = parts[0]
    if not spec.layers:
        raise NotFoundError(f"model {spec.name!r} declares no targetable layers; only class targets are possible")
    info = spec.layer(layer_name)
    if kind == "layer":
        return whole_layer(layer_name)
    c = _int(parts[1], "channel", target)
    if not 0 <= c < info.channels:
        raise InvalidOptionError(
            f"channel {c} is out of range for layer {layer_name!r} of model {spec.name!r}; "
            f"expected 0 to {info.channels - 1}"
        )
    if kind == "channel":
        return channel(layer_name, c)
    pos = [_int(p, "position", target) for p in parts[2:]]
    for axis, (p, size) in enumerate(zip(pos, info.shape)):
        if not 0 <= p < size:
            raise InvalidOptionError(
                f"position {tuple(pos)} is out of range for layer {layer_name!r} (output grid {tuple(info.shape)}); "
                f"axis {'XYZ'[axis]} allows 0 to {size - 1}"
            )
    return neuron(layer_name, c, *pos)
