"""Build hook: generate the gRPC stubs from ``proto/`` into ``neuroexplain/_proto`` (built, never committed).

``pyproject.toml`` holds the metadata; this file only adds the code generation step to ``build_py`` so that
``pip install .`` (the light client included) and ``pip install -e .`` produce importable stubs.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    """Run grpc_tools.protoc on every .proto under proto/neuroexplain/v1 (a no-op when the stubs are up to date)."""
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    src = ROOT / "proto" / "neuroexplain" / "v1"
    out = ROOT / "neuroexplain" / "_proto"
    protos = sorted(src.glob("*.proto"))
    stamp = out / "neuroexplain_pb2.py"
    if stamp.exists() and all(p.stat().st_mtime <= stamp.stat().st_mtime for p in protos):
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from proto/neuroexplain/v1 at build time; never edit."""\n')
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-Ineuroexplain/_proto={src}",  # import path of the stubs = neuroexplain._proto
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_stubs()
        # package discovery ran before the stubs existed on a fresh clone: add their package explicitly
        if self.packages is not None and "neuroexplain._proto" not in self.packages:
            self.packages.append("neuroexplain._proto")
        super().run()


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithProto})
elif __name__ == "neuroexplain_stubs":  # `make` calls generate_stubs() through runpy with this name
    generate_stubs()
