"""The in-process backend's decode ahead: the volume a request gets is the one decoding it then would give."""

from __future__ import annotations

import gzip
import time
from typing import Any

import numpy as np
import pytest
from test_service_support import make_scan

from neuroexplain import volumes
from neuroexplain.errors import ScanFormatError
from neuroexplain.serving.runner import decode
from neuroexplain.serving.types import ScanInput
from neuroexplain.template import MNI_2MM
from neuroexplain.volumes import digest_bytes
from service.backends.inprocess import DecodeAhead


class Counting:
    """The real decoder, recording which bytes objects it decoded."""

    def __init__(self) -> None:
        self.decoded: list[int] = []

    def __call__(self, scan: ScanInput, onto: Any = None) -> Any:
        self.decoded.append(id(scan.data))
        return decode(scan, onto)


def _inline(raw: bytes, digest: str = "") -> ScanInput:
    return ScanInput(data=raw, digest=digest)


def test_the_request_takes_the_volume_decoded_ahead_with_its_own_digest() -> None:
    raw = make_scan(1)
    decoder = Counting()
    ahead = DecodeAhead(decoder)
    try:
        ahead.start(_inline(raw))
        scan = ahead.take(_inline(raw, digest_bytes(raw)))
    finally:
        ahead.close()
    assert decoder.decoded == [id(raw)]  # once, ahead
    assert scan.digest == digest_bytes(raw)
    np.testing.assert_array_equal(scan.data, decode(_inline(raw, digest_bytes(raw))).data)


def test_other_bytes_are_decoded_anew() -> None:
    raw, other = make_scan(2), make_scan(3)
    decoder = Counting()
    ahead = DecodeAhead(decoder)
    try:
        ahead.start(_inline(raw))
        scan = ahead.take(_inline(other, digest_bytes(other)))  # drops (or cancels) the one decoded ahead
        assert decoder.decoded.count(id(other)) == 1
        np.testing.assert_array_equal(scan.data, decode(_inline(other, "x" * 64)).data)
        ahead.start(_inline(raw))
        copy = bytes(bytearray(raw))  # equal bytes, another object: not compared byte by byte, decoded again
        assert ahead.take(_inline(copy, digest_bytes(copy))).digest == digest_bytes(raw)
        assert decoder.decoded.count(id(copy)) == 1
    finally:
        ahead.close()


def test_a_scan_that_fails_ahead_fails_its_request_with_the_same_error() -> None:
    broken = gzip.compress(make_scan(4))[:-200]  # a truncated gzip stream
    with pytest.raises(ScanFormatError) as direct:
        decode(_inline(broken, digest_bytes(broken)))
    ahead = DecodeAhead(decode)
    try:
        ahead.start(_inline(broken))
        with pytest.raises(ScanFormatError) as taken:
            ahead.take(_inline(broken, digest_bytes(broken)))
    finally:
        ahead.close()
    assert str(taken.value) == str(direct.value)


def test_a_scan_decoded_ahead_onto_a_grid_serves_only_a_request_onto_that_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The volume decoded ahead was resampled onto the model's grid as it decoded; a request for another grid (or
    # none) decodes anew, and what each gets is what decoding it then would give.
    monkeypatch.setattr(volumes, "_PIECE", 4096)  # this small scan in many pieces: resampled as it decodes
    raw = make_scan(5)  # a gzipped NIfTI
    grid = MNI_2MM
    decoder = Counting()
    ahead = DecodeAhead(decoder)
    try:
        ahead.start(_inline(raw), grid)
        scan = ahead.take(_inline(raw, digest_bytes(raw)), grid)
        assert decoder.decoded == [id(raw)]
        assert scan.resampled is not None and scan.resampled.array.shape == grid.shape
        ahead.start(_inline(raw), grid)
        # Wait until that decode has begun: a take for another grid cancels one that has not started (it would then
        # not be counted), and this test is about what the take gets, not about that race.
        deadline = time.monotonic() + 30
        while len(decoder.decoded) < 2:
            assert time.monotonic() < deadline, "the decode ahead never started"
            time.sleep(0.001)
        plain = ahead.take(_inline(raw, digest_bytes(raw)), None)
        assert decoder.decoded == [id(raw)] * 3 and plain.resampled is None
    finally:
        ahead.close()
    direct = decode(_inline(raw, digest_bytes(raw)), grid)
    np.testing.assert_array_equal(scan.resampled.array, direct.resampled.array)
    np.testing.assert_array_equal(scan.data, plain.data)
