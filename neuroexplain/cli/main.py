"""Entry point. Each module in ``neuroexplain.cli.commands`` adds one subcommand through ``register(subparsers)``.

Errors from the project's exception tree, file-system errors (a path that cannot be read or written), a command that
needs the full install run from the light one, and bad arguments print one line on stderr and exit non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from neuroexplain import __version__
from neuroexplain.cli import commands
from neuroexplain.errors import NeuroExplainError

EXIT_ERROR = 1
EXIT_USAGE = 2
# What the [full] extra adds that the light client lacks (a missing one is the install's fault, not a bug).
FULL_INSTALL_MODULES = frozenset({"numpy", "torch", "scipy", "nibabel", "nilearn", "captum", "matplotlib", "pydicom",
                                  "highdicom", "SimpleITK", "prometheus_client", "redis", "ts", "yaml"})


class CliError(Exception):
    """A usage problem found after parsing (missing file, contradictory flags); printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroexplain",
        description="Predictions, attributions and feature visualizations for 3D neuroimaging CNNs. "
        "Research use only — not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"neuroexplain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (NeuroExplainError, CliError) as exc:
        print(f"neuroexplain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:  # the light install (no extras) running a command that needs the library
        if (exc.name or "").split(".")[0] not in FULL_INSTALL_MODULES:
            raise
        print(f"neuroexplain {args.command}: error: this needs the full install ({exc.name} is not installed): "
              "pip install 'neuroexplain[full]', or drop --local and ask a server (--server H:P)", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # an unreadable input or an unwritable -o/--png/--summary: the user's own path
        where = f" {exc.filename}" if exc.filename else ""
        print(f"neuroexplain {args.command}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"neuroexplain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
