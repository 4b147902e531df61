"""TorchServe's gRPC client, generated at build time from the protos inside the installed torchserve package.

``inference.proto`` and ``management.proto`` ship in ``ts/frontend/model-server.jar`` (folder ``proto/``). :func:`generate` extracts them and runs ``grpc_tools.protoc`` into
``service/gen/torchserve/`` (git-ignored, never committed); ``make models`` and ``make serve`` call it, and
:func:`load` generates on first use when the stubs are missing or older than the jar.

``inference.proto`` imports ``google/rpc/status.proto``; that one is not compiled again but taken from
googleapis-common-protos (the gateway's dependency for ``google.rpc`` status details), so one process never holds
two definitions of ``google.rpc.Status``.
"""

from __future__ import annotations

import importlib
import threading
import types
import zipfile
from pathlib import Path

import ts

from neuroexplain.errors import UnavailableError

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
GEN_PACKAGE = "service.gen.torchserve"
GEN_DIR = Path(__file__).resolve().parent.parent / "gen" / "torchserve"
_lock = threading.Lock()


def _stale() -> bool:
    stamp = GEN_DIR / "inference_pb2_grpc.py"
    # Also stale when this generator changed (how the stubs are made is part of what they are).
    return not stamp.exists() or stamp.stat().st_mtime < max(JAR.stat().st_mtime, Path(__file__).stat().st_mtime)


def generate(force: bool = False) -> Path:
    """Extract the protos from TorchServe's jar and compile them; a no-op when the stubs are current.

    Returns:
        The folder of the generated package.

    Raises:
        UnavailableError: grpcio-tools is not installed or protoc failed.
    """
    if not force and not _stale():
        return GEN_DIR
    try:
        import google.rpc.status_pb2 as google_status
        from grpc_tools import protoc
    except ImportError:
        raise UnavailableError("generating TorchServe's gRPC client needs grpcio-tools and googleapis-common-protos "
                               "(the [full] extra)") from None
    import tempfile

    google_protos = Path(google_status.__file__).resolve().parents[2]  # holds google/rpc/status.proto

    with tempfile.TemporaryDirectory(prefix="nx-tsproto-") as tmp:
        root = Path(tmp)
        src = root / "service" / "gen" / "torchserve"
        src.mkdir(parents=True)
        with zipfile.ZipFile(JAR) as jar:
            for name in ("inference", "management"):
                (src / f"{name}.proto").write_bytes(jar.read(f"proto/{name}.proto"))
        include = Path(protoc.__file__).parent / "_proto"
        out = GEN_DIR.parent.parent.parent  # the folder that holds the ``service`` package
        GEN_DIR.mkdir(parents=True, exist_ok=True)
        (GEN_DIR / "rpc_status_pb2.py").unlink(missing_ok=True)  # the private copy earlier versions compiled
        for parent in (GEN_DIR.parent, GEN_DIR):
            init = parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated at build time; never edit, never commit."""\n')
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{google_protos}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *(str(src / f) for f in ("inference.proto", "management.proto")),
        ]
        if protoc.main(args) != 0:
            raise UnavailableError("protoc failed on TorchServe's inference.proto/management.proto")
    return GEN_DIR


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """The generated ``inference_pb2`` and ``inference_pb2_grpc`` modules (generated first if needed)."""
    with _lock:
        if _stale():
            generate()
        pb2 = importlib.import_module(f"{GEN_PACKAGE}.inference_pb2")
        pb2_grpc = importlib.import_module(f"{GEN_PACKAGE}.inference_pb2_grpc")
    return pb2, pb2_grpc


if __name__ == "__main__":
    print(generate(force=True))
