"""Build TorchServe model archives (``.mar``) for neuroexplain models with torch-model-archiver.

An archive holds the custom handler (``handlers/neuroexplain_handler.py``), ``spec.json``, ``weights.pt``, the
architecture file for a user's model, and a model-config YAML (workers, batching, ``responseTimeout``,
``startupTimeout``). The handler imports the installed ``neuroexplain`` package, so the archive is small and the
worker runs the same library version as the gateway.

Each archive gets a sidecar ``.NAME.mar.json`` with a fingerprint of everything that went in (spec, weights digest,
handler sources, config, package version); :func:`ensure_bundled_archives` rebuilds only what changed. TorchServe
ignores the sidecars (it loads ``*.mar``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from neuroexplain import __version__
from neuroexplain.errors import InvalidInputError, InvalidOptionError, NotFoundError

HERE = Path(__file__).parent
HANDLER_FILE = HERE / "neuroexplain_handler.py"
METRICS_FILE = HERE / "metrics.yaml"
SERVING_DIR = HERE.parent / "neuroexplain" / "serving"  # the contract the handler runs (codec, runner, types)
_FINGERPRINTED = (HANDLER_FILE, *sorted(SERVING_DIR.glob("*.py")))


@dataclass(frozen=True)
class ArchiveConfig:
    """Per-model TorchServe settings written into the archive's model-config YAML.

    Attributes:
        min_workers / max_workers: worker processes for the model (each holds one copy of the model).
        batch_size: requests TorchServe may group into one ``handle`` call (predict is batched; 1 = no batching).
            StreamPredictions (Visualize) always runs with batch size 1.
        max_batch_delay_ms: how long TorchServe waits to fill a batch.
        response_timeout_s: a request running longer gets its worker restarted; must cover the longest Visualize.
        startup_timeout_s: time a worker may take to load and warm up.
    """

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 20
    response_timeout_s: int = 1800
    startup_timeout_s: int = 300

    def __post_init__(self) -> None:
        for name, low in (("min_workers", 1), ("max_workers", 1), ("batch_size", 1), ("response_timeout_s", 1),
                          ("startup_timeout_s", 1), ("max_batch_delay_ms", 0)):
            if getattr(self, name) < low:
                raise InvalidOptionError(f"{name} is {getattr(self, name)}; allowed: >= {low}")
        if self.max_workers < self.min_workers:
            raise InvalidOptionError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")

    def yaml(self) -> str:
        return (
            "# TorchServe model config (written by handlers/archive.py)\n"
            f"minWorkers: {self.min_workers}\n"
            f"maxWorkers: {self.max_workers}\n"
            f"batchSize: {self.batch_size}\n"
            f"maxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
            f"startupTimeout: {self.startup_timeout_s}\n"
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(spec_path: Path, weights_path: Path, model_file: Path | None, config: ArchiveConfig) -> str:
    """Digest of everything an archive is built from; a changed handler, spec, weights or config changes it."""
    h = hashlib.sha256()
    for part in (spec_path, weights_path, model_file, *_FINGERPRINTED):
        h.update(_sha256(part).encode() if part is not None and part.exists() else b"-")
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def _architecture_file(spec_path: Path, model_file: Path | None) -> Path | None:
    """The architecture file a spec needs (``file.py:Class``): the one given, else the spec's sibling."""
    from neuroexplain.models import ModelSpec

    module = ModelSpec.load(spec_path).architecture.partition(":")[0]
    if not module.endswith(".py") or model_file is not None:
        return model_file
    sibling = spec_path.parent / module
    if not sibling.is_file():
        raise InvalidInputError(f"the spec's architecture is in {module!r}; pass that file as the model file")
    return sibling


def _sidecar(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.json")


def build_archive(
    spec_path: Path,
    weights_path: Path,
    out: Path,
    *,
    model_file: Path | None = None,
    config: ArchiveConfig | None = None,
) -> Path:
    """Package one model as a TorchServe archive.

    The spec is loaded and the weights are checked against its ``weights_sha256`` and loaded into the architecture
    first, so a broken model fails here, not in a TorchServe worker.

    Args:
        spec_path: the model's ``spec.json``.
        weights_path: the state dict (``torch.save(model.state_dict(), ...)``).
        out: the archive to write (``NAME.mar``); its folder must exist. The served model name is the spec's name.
        model_file: the architecture file for a spec whose ``architecture`` is ``file.py:Class``.
        config: TorchServe settings for the model.

    Returns:
        ``out``.

    Raises:
        NotFoundError: an input file is missing.
        InvalidInputError: the model does not load (digest mismatch, wrong architecture) or ``out`` is not ``.mar``.
    """
    from neuroexplain.models import load_from_files

    config = config or ArchiveConfig()
    for label, path in (("spec", spec_path), ("weights", weights_path), ("model file", model_file)):
        if path is not None and not Path(path).is_file():
            raise NotFoundError(f"{label} file not found: {path}")
    if out.suffix != ".mar":
        raise InvalidInputError("the archive name must end in .mar")
    if not out.parent.is_dir():
        raise NotFoundError(f"output folder not found: {out.parent}")
    model_file = _architecture_file(spec_path, model_file)
    spec = load_from_files(spec_path, weights_path, model_file).spec  # validates digest + architecture

    with tempfile.TemporaryDirectory(prefix="nx-mar-") as tmp:
        stage = Path(tmp)
        # Fixed names inside the archive: the handler looks for spec.json and weights.pt in its model_dir.
        shutil.copyfile(spec_path, stage / "spec.json")
        shutil.copyfile(weights_path, stage / "weights.pt")
        (stage / "model-config.yaml").write_text(config.yaml())
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", spec.name,
            "--version", spec.version,
            "--serialized-file", str(stage / "weights.pt"),
            "--handler", str(HANDLER_FILE),
            "--extra-files", str(stage / "spec.json"),
            "--config-file", str(stage / "model-config.yaml"),
            "--export-path", str(stage),
            "--force",
        ]  # fmt: skip
        if model_file is not None:
            staged_model = stage / Path(spec.architecture.partition(":")[0]).name
            shutil.copyfile(model_file, staged_model)
            cmd += ["--model-file", str(staged_model)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InvalidInputError(f"torch-model-archiver failed: {done.stderr.strip()[-500:]}")
        tmp_out = out.with_name(f".{out.name}.partial")
        shutil.copyfile(stage / f"{spec.name}.mar", tmp_out)
        tmp_out.replace(out)  # atomic: a TorchServe scanning the store never sees half an archive
    _sidecar(out).write_text(
        json.dumps({"model": spec.name, "version": spec.version,
                    "fingerprint": fingerprint(spec_path, weights_path, model_file, config)}) + "\n"
    )  # fmt: skip
    return out


def ensure_bundled_archives(store: Path, config: ArchiveConfig | None = None,
                            model_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Build (or rebuild when stale) one archive per model the registry finds; return every archive in the store.

    Archives the user put in the store themselves (no sidecar) are left alone.

    Args:
        store: the model store folder (created if missing).
        config: TorchServe settings written into each archive.
        model_dirs: model folders besides the bundled ones (the gateway's one model-directories setting).
    """
    from neuroexplain.models.registry import model_folders  # name -> folder, same search order as load_model

    config = config or ArchiveConfig()
    store.mkdir(parents=True, exist_ok=True)
    for name, folder in model_folders(tuple(model_dirs)).items():
        spec_path, weights_path = folder / "spec.json", folder / "weights.pt"
        if not weights_path.is_file():
            continue
        archive = store / f"{name}.mar"
        wanted = fingerprint(spec_path, weights_path, _architecture_file(spec_path, None), config)
        try:
            current = json.loads(_sidecar(archive).read_text()).get("fingerprint")
        except (OSError, ValueError):
            current = None
        if archive.is_file() and current == wanted:
            continue
        build_archive(spec_path, weights_path, archive, config=config)
    return sorted(store.glob("*.mar"))


def main(argv: list[str] | None = None) -> int:
    """``python -m handlers.archive [STORE] [--model-dir D ...] [--workers N] [--batch-size N] [--batch-delay-ms N]
    [--response-timeout-s S] [--startup-timeout-s S]`` (``make models``, and the gateway, which runs this as a
    subprocess so that it never imports torch): build the registry's archives into STORE, print one path per line.

    Errors are one line on stderr with exit code 2.
    """
    parser = argparse.ArgumentParser(prog="python -m handlers.archive")
    parser.add_argument("store", nargs="?", default="model_store", type=Path)
    parser.add_argument("--model-dir", action="append", default=[], type=Path, dest="model_dirs")
    defaults = ArchiveConfig()
    parser.add_argument("--workers", type=int, default=defaults.min_workers)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--batch-delay-ms", type=int, default=defaults.max_batch_delay_ms)
    parser.add_argument("--response-timeout-s", type=int, default=defaults.response_timeout_s)
    parser.add_argument("--startup-timeout-s", type=int, default=defaults.startup_timeout_s)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = ArchiveConfig(min_workers=args.workers, max_workers=args.workers, batch_size=args.batch_size,
                               max_batch_delay_ms=args.batch_delay_ms, response_timeout_s=args.response_timeout_s,
                               startup_timeout_s=args.startup_timeout_s)
        archives = ensure_bundled_archives(args.store, config, tuple(args.model_dirs))
    except (InvalidInputError, NotFoundError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for archive in archives:
        print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
