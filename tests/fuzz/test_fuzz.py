"""The short fuzz run of ``make test``: seeded, structure-aware malformed scans through the full gRPC path (a real
gateway with every interceptor, on both backends), judged by the oracle in ``harness.py``; every saved regression
case replayed; and a hypothesis property over single NIfTI-1 header fields.

``make fuzz`` runs the long version (``tests/fuzz/run.py``, >= 10,000 cases, peak RSS per process). A case that
fails either run is saved under ``tests/fuzz/regressions/`` and replayed here from then on.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import dataclasses
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from cases import NIFTI1_FIELDS, Case, file_seeds, load_case, make_case
from harness import Tally, send
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service_support import TINY, Running, backend, start_gateway, tiny_model_dir  # noqa: F401

REGRESSIONS = Path(__file__).parent / "regressions"
SEED = 20
CASES_PER_BACKEND = 50  # two backends: 100 seeded cases, plus the Visualize ones, the regressions and hypothesis
VISUALIZE_PER_BACKEND = 20
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def fuzz_gateway(backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_gateway(backend, tmp_path_factory.mktemp("fuzz"))
    yield running
    running.stop()


def _workers(backend: Any) -> tuple[set[int], int] | None:
    supervisor = getattr(backend, "supervisor", None)
    return None if supervisor is None else (supervisor.worker_pids(), supervisor.worker_deaths)


def _assert_clean(tally: Tally) -> None:
    report = "\n".join(f"{v.case}: {v.code.name} {v.message[:200]!r} ({v.problem})" for v in tally.failures)
    assert not tally.failures, f"{len(tally.failures)} of {tally.cases} cases broke the oracle:\n{report}"


def _assert_backend_kept(backend: Any, before: tuple[set[int], int] | None) -> None:
    assert backend.ready(), "the backend is no longer ready after the fuzz cases"
    if before is not None:  # TorchServe: the same worker processes, no death noticed
        assert _workers(backend) == before, "a TorchServe worker died or was replaced during the fuzz cases"


def test_seeded_cases_get_only_allowed_answers(fuzz_gateway: Running, backend: Any) -> None:
    before = _workers(backend)
    tally = Tally()
    for index in range(CASES_PER_BACKEND):
        tally.add(send(fuzz_gateway.stub, make_case(SEED, index), TINY, DEADLINE_S))
    _assert_clean(tally)
    assert tally.hangs == 0
    # the mutations reach past the first check: some scans are still answered, most are refused
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0, dict(tally.codes)
    _assert_backend_kept(backend, before)


def test_seeded_cases_as_visualize_start_scans_get_only_allowed_answers(fuzz_gateway: Running, backend: Any) -> None:
    before = _workers(backend)
    tally = Tally()
    for index in range(VISUALIZE_PER_BACKEND):
        case = dataclasses.replace(make_case(SEED + 1, index), rpc="visualize", return_dicom=False)
        tally.add(send(fuzz_gateway.stub, case, TINY, DEADLINE_S))
    _assert_clean(tally)
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0, dict(tally.codes)
    _assert_backend_kept(backend, before)


def _regressions() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.bin"))


@pytest.mark.parametrize("path", _regressions(), ids=lambda p: p.stem)
def test_saved_regression_cases_are_refused_cleanly(fuzz_gateway: Running, backend: Any, path: Path) -> None:
    case, expected = load_case(path)
    verdict = send(fuzz_gateway.stub, case, TINY, DEADLINE_S)
    assert not verdict.problem, f"{case.name}: {verdict.code.name} {verdict.message!r} ({verdict.problem})"
    if expected:  # the file names the status the fixed code gives
        assert verdict.code.name == expected, verdict.message


def test_there_are_regression_cases() -> None:
    assert len(_regressions()) >= 4


_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.integers(min_value=-(2 ** 31), max_value=2 ** 31 - 1))


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([f for f in NIFTI1_FIELDS if not f[2].endswith("s")]), index=st.integers(0, 7),
       value=_VALUES, gzipped=st.booleans())
def test_any_single_nifti1_header_field_value_is_answered_or_refused(
        fuzz_gateway: Running, field: tuple[str, int, str, int], index: int, value: float, gzipped: bool) -> None:
    import gzip

    name, offset, fmt, count = field
    raw = bytearray(file_seeds()["nifti1"])
    item = struct.calcsize("<" + fmt)
    if fmt in "fd":
        packed = struct.pack("<" + fmt, float(value))
    else:
        lo, hi = {"B": (0, 255), "h": (-32768, 32767), "i": (-(2 ** 31), 2 ** 31 - 1)}[fmt]
        packed = struct.pack("<" + fmt, min(hi, max(lo, int(value))) if isinstance(value, int) else 0)
    raw[offset + (index % count) * item: offset + (index % count) * item + item] = packed
    data = gzip.compress(bytes(raw), compresslevel=1, mtime=0) if gzipped else bytes(raw)
    verdict = send(fuzz_gateway.stub, Case(f"hypothesis/{name}[{index % count}]={value!r}", data=data), TINY,
                   DEADLINE_S)
    assert not verdict.problem, f"{verdict.case}: {verdict.code.name} {verdict.message!r} ({verdict.problem})"
    assert verdict.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
