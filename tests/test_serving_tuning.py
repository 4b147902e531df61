"""The OpenMP and allocator settings of the processes that run models (neuroexplain.serving.tuning)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroexplain.serving.tuning import ALLOCATOR_ENV, THREAD_ENV, process_env, tune_allocator, usable_cores

DEFAULTS = {**THREAD_ENV, **ALLOCATOR_ENV}


def test_the_defaults_apply_where_the_environment_is_silent_and_the_operator_wins() -> None:
    assert process_env({}) == DEFAULTS
    assert DEFAULTS["OMP_WAIT_POLICY"] == "PASSIVE" and DEFAULTS["MALLOC_ARENA_MAX"] == "1"
    own = {"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_ARENA_MAX": "4", "PATH": "/bin"}
    assert process_env(own) == {k: v for k, v in DEFAULTS.items() if k not in own}


def test_workers_split_the_cores() -> None:
    assert process_env({}, workers=2, cores=2) == {**DEFAULTS, "OMP_NUM_THREADS": "1"}
    assert process_env({}, workers=3, cores=16)["OMP_NUM_THREADS"] == "5"
    assert process_env({}, workers=4, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert process_env({"OMP_NUM_THREADS": "8"}, workers=2, cores=2) == DEFAULTS
    assert "OMP_NUM_THREADS" not in process_env({}, workers=1, cores=16)  # one worker: torch's own choice
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


# Threads that allocate, then glibc's own count of its arenas (malloc_stats() prints one "Arena N:" block each).
_ARENAS = """
import ctypes, os, sys, threading
sys.path.insert(0, {root!r})
from neuroexplain.serving.tuning import tune_allocator
if sys.argv[1] == "tuned":
    print(sorted(tune_allocator({{}})))
def work():
    for _ in range(50):
        bytearray(1 << 20)
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.stdout.flush()
os.dup2(1, 2)  # malloc_stats writes to stderr
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    code = _ARENAS.format(root=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code, mode], check=True, capture_output=True, text=True, env=env,
                         timeout=60).stdout
    return out.splitlines()[0] if mode == "tuned" else "", out.count("Arena ")


@pytest.mark.skipif(not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="mallopt settings are glibc's")
def test_tune_allocator_keeps_every_thread_on_one_arena() -> None:
    applied, tuned = _arenas("tuned")
    assert applied == str(sorted(ALLOCATOR_ENV))
    _none, default = _arenas("default")
    assert tuned == 1
    assert default > 1  # the control: without the setting the threads get arenas of their own
    assert tune_allocator(dict(ALLOCATOR_ENV)) == {}  # the operator's variables: nothing applied


def test_serve_sets_them_before_torch_loads() -> None:
    # The in-process backend's models load torch after `serve` starts; the setting must be in place by then.
    # The server itself is replaced by a print of what it would start with (the real one is tested elsewhere).
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('MALLOC_ARENA_MAX', None); "
            "import neuroexplain.serving.tuning as t; tune = t.tune_allocator; "
            "t.tune_allocator = lambda env: print(len(tune(env))) or {}; "
            "import service.grpc.server as s; s.serve = lambda settings: print(os.environ.get('OMP_WAIT_POLICY'), "
            "os.environ.get('MALLOC_ARENA_MAX'), 'torch' in sys.modules) or 0; "
            "from neuroexplain.cli.main import main; sys.exit(main(['serve', '--insecure']))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(len(ALLOCATOR_ENV)), "PASSIVE", "1", "False"]  # mallopt, then the env
