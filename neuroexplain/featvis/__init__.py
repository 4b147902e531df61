"""Feature visualization for 3D CNNs: activation maximization of classes, channels, neurons and layers.

Public API::

    from neuroexplain.featvis import visualize, parse_target, Preset, PRESETS, OPTIONS

    result = visualize(model, "class:lesion", preset="robust", steps=256, seed=0)
    result.nifti, result.png, result.curve

See :func:`visualize` for the arguments and :data:`OPTIONS` for every option with its default and range.
"""

from neuroexplain.featvis.engine import FeatvisResult, Progress, VisualizationCancelled, visualize
from neuroexplain.featvis.objectives import (
    TARGET_FORMS,
    Objective,
    channel,
    class_logit,
    diversity,
    neuron,
    parse_target,
    whole_layer,
)
from neuroexplain.featvis.presets import (
    MAX_BATCH,
    MAX_STEPS,
    OPTIONS,
    PRESETS,
    OptionSpec,
    Param,
    Preset,
    RangeMap,
    check_steps,
    describe_presets,
    resolve,
)
from neuroexplain.featvis.render import render_png

__all__ = [
    "MAX_BATCH",
    "MAX_STEPS",
    "OPTIONS",
    "PRESETS",
    "TARGET_FORMS",
    "FeatvisResult",
    "Objective",
    "OptionSpec",
    "Param",
    "Preset",
    "Progress",
    "RangeMap",
    "VisualizationCancelled",
    "channel",
    "check_steps",
    "class_logit",
    "describe_presets",
    "diversity",
    "neuron",
    "parse_target",
    "render_png",
    "resolve",
    "visualize",
    "whole_layer",
]
