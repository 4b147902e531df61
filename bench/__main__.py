"""``make bench``: run every ``bench/bench_*.py`` in its own process (so peak RSS is per benchmark).

Pass names to run a subset: ``python -m bench predict attribution``. Results are printed and saved as JSON under
``bench/out/``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = [n for n in names if not argv or n in argv]
    unknown = set(argv) - set(names)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; available: {names}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n== bench {name} ==", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.bench_{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
