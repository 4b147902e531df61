"""neuroexplain: predictions, attributions and feature visualizations for 3D neuroimaging CNNs."""

__version__ = "0.1.0"

RESEARCH_NOTICE = "research use only — not for diagnosis"
