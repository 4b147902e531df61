"""Find and load models by name.

A model folder holds ``spec.json`` and ``weights.pt`` (a state dict). The bundled models live in
``neuroexplain/models/bundled/<name>/``; users add folders of their own through ``NEUROEXPLAIN_MODEL_DIRS``
(``:``-separated parent folders) or the ``model_dirs`` argument, or load files directly with :func:`load_from_files`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuroexplain.errors import InvalidInputError, NotFoundError
from neuroexplain.models.spec import ModelSpec

if TYPE_CHECKING:  # torch is imported where a model is loaded, so listing specs needs no torch
    import torch
    from torch import nn

BUNDLED_DIR = Path(__file__).parent / "bundled"
MODEL_DIRS_ENV = "NEUROEXPLAIN_MODEL_DIRS"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to run: spec plus the module in eval mode on ``device``."""

    spec: ModelSpec
    module: nn.Module
    device: torch.device

    def layer(self, name: str) -> nn.Module:
        """The module behind a targetable layer name (see ``spec.layers``)."""
        self.spec.layer(name)
        return dict(self.module.named_modules())[name]


def search_dirs(model_dirs: tuple[Path, ...] = ()) -> tuple[Path, ...]:
    env = tuple(Path(p) for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p)
    return (BUNDLED_DIR, *model_dirs, *env)


def model_folders(model_dirs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Folder of every model found, by name (the first folder holding a name wins; bundled first)."""
    found: dict[str, Path] = {}
    for parent in search_dirs(model_dirs):
        if not parent.is_dir():
            continue
        for spec_path in sorted(parent.glob("*/spec.json")):
            found.setdefault(ModelSpec.load(spec_path).name, spec_path.parent)
    return found


def list_specs(model_dirs: tuple[Path, ...] = ()) -> list[ModelSpec]:
    """Specs of every model found, bundled first."""
    return [ModelSpec.load(folder / "spec.json") for folder in model_folders(model_dirs).values()]


def load_model(name: str, *, device: str = "cpu", model_dirs: tuple[Path, ...] = ()) -> LoadedModel:
    """Load a model by name (cached per process: specs and weights are immutable for a version)."""
    folders = model_folders(model_dirs)
    if name not in folders:
        raise NotFoundError(f"model {name!r} not found; available models: {sorted(folders)}")
    folder = folders[name]
    return _load_cached(str(folder / "spec.json"), str(folder / "weights.pt"), None, device)


def load_from_files(
    spec_path: Path, weights_path: Path, model_file: Path | None = None, *, device: str = "cpu"
) -> LoadedModel:
    """Load a model from explicit files (a user's model, or what TorchServe unpacked from an archive)."""
    return _load_cached(str(spec_path), str(weights_path), str(model_file) if model_file else None, device)


@functools.lru_cache(maxsize=16)
def _load_cached(spec_path: str, weights_path: str, model_file: str | None, device: str) -> LoadedModel:
    import torch

    spec = ModelSpec.load(Path(spec_path))
    raw = Path(weights_path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if spec.weights_sha256 and digest != spec.weights_sha256:
        raise InvalidInputError(
            f"weights of model {spec.name!r} have digest {digest[:12]}…, but the spec expects "
            f"{spec.weights_sha256[:12]}…; rebuild the model or fix spec.json"
        )
    cls = _architecture(spec.architecture, Path(spec_path).parent, model_file)
    module = cls(**spec.architecture_kwargs)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    dev = torch.device(device)
    return LoadedModel(spec=spec, module=module.to(dev), device=dev)


def _architecture(reference: str, folder: Path, model_file: str | None) -> type[nn.Module]:
    module_name, _, class_name = reference.partition(":")
    if not class_name:
        raise InvalidInputError(f"architecture {reference!r} must look like 'package.module:Class' or 'file.py:Class'")
    if module_name.endswith(".py"):
        path = Path(model_file) if model_file else folder / module_name
        import_spec = importlib.util.spec_from_file_location(f"neuroexplain_user_{path.stem}", path)
        if import_spec is None or import_spec.loader is None:
            raise NotFoundError(f"architecture file {path.name} not found beside the spec")
        module = importlib.util.module_from_spec(import_spec)
        import_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise NotFoundError(f"class {class_name!r} not found in architecture module {module_name!r}")
    return cls  # type: ignore[no-any-return]


def structural_copy(module: nn.Module) -> nn.Module:
    """New module objects for ``module``'s whole tree, sharing its parameter and buffer tensors.

    Containers (hook tables, ``_parameters``, ``_buffers``, ``_modules``...) get their own copy, so adding a hook or
    replacing a child or a ``forward`` on the copy leaves the original as it was; the tensors in them stay shared.
    """
    clone = type(module).__new__(type(module))
    state = {k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
    state["_modules"] = {k: None if c is None else structural_copy(c) for k, c in module._modules.items()}
    object.__setattr__(clone, "__dict__", state)
    return clone


def describe_layers(module: nn.Module, grid_shape: tuple[int, int, int], names: list[str]) -> list[tuple[str, int, tuple[int, int, int]]]:
    """Channels and spatial shape of each named layer's output, found with one forward pass on zeros."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(module.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape)))
        for n in names
    ]
    try:
        with torch.inference_mode():
            module(torch.zeros((1, 1, *grid_shape)))
    finally:
        for h in handles:
            h.remove()
    return [(n, int(shapes[n][1]), tuple(int(s) for s in shapes[n][2:])) for n in names]  # type: ignore[misc]
