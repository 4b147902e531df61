"""Attribution: which voxels of *this* scan drove *this* decision, as a map on the scan's own grid.

Public API (used by the CLI, the TorchServe handler and the gateway):

- :class:`Method` — canonical method names; :data:`METHOD_OPTIONS` — each method's options (name, type, default,
  range or choices, one-line doc); :func:`parse_options` — validate wire/CLI options and fill in defaults.
- :func:`explain` — scan in, :class:`AttributionResult` out (model-space map, native map + affine, summary, NIfTI
  bytes, optional PNG).
"""

from neuroexplain.attribution.api import AttributionResult, explain
from neuroexplain.attribution.options import METHOD_OPTIONS, Method, OptionSpec, parse_option_pairs, parse_options

__all__ = [
    "METHOD_OPTIONS",
    "AttributionResult",
    "Method",
    "OptionSpec",
    "explain",
    "parse_option_pairs",
    "parse_options",
]
