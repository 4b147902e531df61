"""Model zoo: architectures, specs and the registry that loads bundled and user models by name."""

from neuroexplain.models.registry import LoadedModel, list_specs, load_from_files, load_model
from neuroexplain.models.spec import LayerInfo, ModelSpec

__all__ = ["LayerInfo", "LoadedModel", "ModelSpec", "list_specs", "load_from_files", "load_model"]
