"""Layer-wise relevance propagation rules on captum: canonisation and one rule per layer.

captum 0.9 has no default rule for Conv3d, BatchNorm3d or 3D pooling, so :func:`set_rules` assigns one to every leaf
module explicitly. Batch norm is folded into the convolution before it (:func:`canonise`), as zennit does.

The epsilon rule's stabiliser is *relative*: ``epsilon`` is a multiple of the standard deviation of the layer's
pre-activations on this scan (:class:`RelativeEpsilonRule`), so one value means the same for every layer and every
model, whatever the scale of its activations. Small values (≤ 0.01) give gradient x input; large values absorb all
but the strongest evidence paths, which gives sparse maps that concentrate on the features that decided the output
(Montavon et al., "Layer-wise relevance propagation: an overview", 2019). Relevance is then no longer conserved;
the map's total is not the logit.

``lrp_epsilon`` runs in a single forward and backward pass (:func:`epsilon_map`); the other LRP methods use captum's
:class:`LRP` (two forward passes, relevance hooks on every layer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import LRP as _CaptumLRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
from torch import nn

from neuroexplain.attribution.options import Method
from neuroexplain.errors import InvalidOptionError

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.Tanh)  # captum propagates relevance through these unchanged


class _Stabilised:
    """Mixin for captum's rules: the relevance hook on a layer's output divides by a stabilised denominator built
    once in the forward pass (captum recomputes ``sign`` and patches its zeros in every backward)."""

    STABILITY_FACTOR: float
    relevance_output: dict[torch.device, torch.Tensor]

    def _epsilon(self, outputs: torch.Tensor) -> float | torch.Tensor:
        return self.STABILITY_FACTOR

    def denominator(self, outputs: torch.Tensor) -> torch.Tensor:
        """``z + eps * sign(z)``, with sign(0) counted as +, as in captum."""
        eps = self._epsilon(outputs)
        return outputs + torch.where(outputs >= 0, eps, -eps)

    def _create_backward_hook_output(self, outputs: torch.Tensor) -> Any:
        denominator = self.denominator(outputs)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.relevance_output[grad.device] = grad.data
            return grad / denominator

        return hook


class RelativeEpsilonRule(_Stabilised, EpsilonRule):
    """LRP-epsilon with ``epsilon`` in units of the standard deviation of the layer's output, per sample
    (``relative=False``: an absolute epsilon, captum's rule)."""

    def __init__(self, epsilon: float, relative: bool = True) -> None:
        super().__init__(epsilon)
        self.relative = relative

    def _epsilon(self, outputs: torch.Tensor) -> float | torch.Tensor:
        if not self.relative:
            return super()._epsilon(outputs)
        return self.STABILITY_FACTOR * outputs.std(dim=tuple(range(1, outputs.dim())), keepdim=True) + 1e-9


class _GammaRule(_Stabilised, GammaRule):
    pass


class _AlphaBetaRule(_Stabilised, Alpha1_Beta0_Rule):
    pass


class LRP(_CaptumLRP):
    """captum's LRP with its first pass (which only records activations and adjusts weights) run without autograd:
    its output is used as a number only, so building a graph there cost time and memory for nothing."""

    def _compute_output_and_change_weights(self, *args: Any) -> torch.Tensor:
        with torch.no_grad():
            return super()._compute_output_and_change_weights(*args)


def epsilon_map(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """LRP with epsilon-type rules only (``lrp_epsilon``) in one forward and one backward pass.

    With the epsilon rule at every layer, relevance is the input times a modified gradient: each layer's output
    gradient is scaled by ``z / (z + eps * sign(z))`` (Ancona et al., ICLR 2018). That gives captum's LRP numbers
    (tested) without its second forward pass and per-layer relevance hooks. ``module`` must already be canonised and
    carry its rules (:func:`set_rules`); ``forward`` is the model call (cancellation checks); ``targets``: ``(B,)``.
    """
    def scale(m: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        z = out.detach()
        factor = z / m.rule.denominator(z)  # type: ignore[union-attr,operator]  # set_rules put a rule on m
        out.register_hook(lambda grad: grad * factor)

    for m in module.modules():
        if isinstance(getattr(m, "rule", None), RelativeEpsilonRule):
            m.register_forward_hook(scale)  # removed with the request copy's other hooks (HookGuard)
    xg = x.detach().requires_grad_(True)
    out = forward(xg)
    grad = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), xg)[0]
    return xg.detach() * grad


def canonise(module: nn.Module) -> None:
    """Fold every BatchNorm that directly follows a convolution in a Sequential into that convolution.

    LRP rules are defined for linear layers; batch norm in eval mode is an affine map, so folding it into the
    preceding convolution gives the same function with one layer fewer (what zennit calls canonisation).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.children())
        kept: list[nn.Module] = []
        i = 0
        changed = False
        while i < len(children):
            here = children[i]
            nxt = children[i + 1] if i + 1 < len(children) else None
            if isinstance(here, CONV) and isinstance(nxt, BATCHNORM) and nxt.track_running_stats:
                kept.append(fuse_conv_bn_eval(here.eval(), nxt.eval()))
                i += 2
                changed = True
            else:
                kept.append(here)
                i += 1
        if changed:
            for key in list(seq._modules):
                del seq._modules[key]
            for j, child in enumerate(kept):
                seq.add_module(str(j), child)


def set_rules(module: nn.Module, method: Method, o: dict[str, Any]) -> None:
    """Give every leaf of ``module`` the rule ``method`` prescribes (``o``: its parsed options).

    ``lrp_epsilon``: relative epsilon everywhere. ``lrp_alpha_beta``: alpha=1, beta=0 on convolutions and linear
    layers. ``lrp_composite``: gamma on convolutions, relative epsilon on the fully connected layers.
    """
    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    for name, m in leaves:
        if isinstance(m, _PASS_THROUGH):
            continue
        if isinstance(m, CONV):
            if method is Method.LRP_EPSILON:
                m.rule = RelativeEpsilonRule(o["epsilon"])
            elif method is Method.LRP_ALPHA_BETA:
                m.rule = _AlphaBetaRule()
            else:
                m.rule = _GammaRule(gamma=o["gamma"])
        elif isinstance(m, nn.Linear):
            if method is Method.LRP_ALPHA_BETA:
                m.rule = _AlphaBetaRule()
            else:
                m.rule = RelativeEpsilonRule(o["epsilon"])
        elif isinstance(m, _POOL + BATCHNORM):
            # Pooling (and any batch norm that could not be folded) passes relevance on like a linear map.
            m.rule = RelativeEpsilonRule(1e-9, relative=False)
        else:
            raise InvalidOptionError(
                f"method {method.value!r} has no LRP rule for layer {name!r} ({type(m).__name__}); "
                "LRP supports Conv, Linear, BatchNorm, pooling, ReLU, Tanh and Dropout layers — "
                "use gradient, integrated_gradients or occlusion for this model"
            )
