"""The OpenMP settings of the processes that run models (neuroexplain.serving.threads)."""

from __future__ import annotations

import os
import subprocess
import sys

from neuroexplain.serving.threads import THREAD_ENV, thread_env, usable_cores


def test_the_defaults_apply_where_the_environment_is_silent_and_the_operator_wins() -> None:
    assert thread_env({}) == {"OMP_WAIT_POLICY": "PASSIVE"} == THREAD_ENV
    assert thread_env({"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"}) == {}


def test_workers_split_the_cores() -> None:
    assert thread_env({}, workers=2, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert thread_env({}, workers=3, cores=16)["OMP_NUM_THREADS"] == "5"
    assert thread_env({}, workers=4, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert thread_env({"OMP_NUM_THREADS": "8"}, workers=2, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "OMP_NUM_THREADS" not in thread_env({}, workers=1, cores=16)  # one worker: torch's own choice
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_serve_sets_them_before_torch_loads() -> None:
    # The in-process backend's models load torch after `serve` starts; the setting must be in place by then.
    # The server itself is replaced by a print of what it would start with (the real one is tested elsewhere).
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); "
            "import service.grpc.server as s; s.serve = lambda settings: print(os.environ.get('OMP_WAIT_POLICY'), "
            "'torch' in sys.modules) or 0; "
            "from neuroexplain.cli.main import main; sys.exit(main(['serve', '--insecure']))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PASSIVE", "False"]
