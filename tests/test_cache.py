"""Result cache: keys, value encoding, the disk LRU, and Redis shared by two gateways (a real redis-server)."""

# ruff: noqa: F811  (pytest fixtures imported from test_service_support are redefined as parameters)
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_binary
from test_service_support import (  # noqa: F401  (fixtures)
    TINY,
    GatedBackend,
    backend,
    gated,
    make_scan,
    scan_msg,
    start_gateway,
    tiny_model_dir,
)

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain.serving import codec
from neuroexplain.serving.types import AttributeResult, Cluster, Operation, PredictResult, Progress, VisualizeResult
from service.cache import CacheError, DiskCache, RedisCache, cache_key, decode, encode

KEY_ARGS = {"operation": Operation.ATTRIBUTE, "model": "lesion", "model_version": "1.0.0", "weights_sha256": "a" * 64,
            "scan": {"digest": "b" * 64, "volume_index": None, "alignment": "auto", "nonfinite": "reject"},
            "options": {"method": "gradient", "options": {}}}


def test_keys_change_with_everything_that_changes_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    base = cache_key(**KEY_ARGS)  # type: ignore[arg-type]
    assert len(base) == 64 and base == cache_key(**KEY_ARGS)  # type: ignore[arg-type]
    variants = [
        {**KEY_ARGS, "operation": Operation.PREDICT},
        {**KEY_ARGS, "model_version": "1.0.1"},
        {**KEY_ARGS, "weights_sha256": "c" * 64},
        {**KEY_ARGS, "spec_sha256": "e" * 64},  # a recalibrated spec with the same weights
        {**KEY_ARGS, "scan": {**KEY_ARGS["scan"], "digest": "d" * 64}},  # type: ignore[dict-item]
        {**KEY_ARGS, "scan": {**KEY_ARGS["scan"], "alignment": "mni"}},  # type: ignore[dict-item]
        {**KEY_ARGS, "options": {"method": "gradient", "options": {"x": "1"}}},
    ]
    keys = {cache_key(**v) for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) and base not in keys
    monkeypatch.setattr("service.cache.__version__", "99.0.0")
    assert cache_key(**KEY_ARGS) != base  # type: ignore[arg-type]  # an upgrade never serves stale results


@pytest.mark.parametrize(
    "result",
    [
        PredictResult("m", "1.0.0", (0.5, -1.25), {"a": 0.8, "b": 0.2}, "a"),
        AttributeResult("m", "1.0.0", "gradient", "a", b"\x1f\x8bNIFTI", 2.5, -1.0,
                        (Cluster((1.0, 2.0, 3.0), (1.5, 2.5, 3.5), 7, 56.0, 1.25),), '{"k": 1}', b"\x89PNG"),
        VisualizeResult("m", "1.0.0", b"vol", b"", b"png", (0.1, 0.2)),
    ],
    ids=["predict", "attribute", "visualize"],
)
def test_values_round_trip_without_pickle(result: object) -> None:
    raw = encode(result)  # type: ignore[arg-type]
    assert decode(raw) == result
    assert b"pickle" not in raw and raw[:4] == codec.MAGIC  # the serving contract's one codec


@pytest.mark.parametrize("raw", [b"", b"NXE1", b"XXXX\x00\x00\x00\x00", encode(VisualizeResult("m", "1", b"abc"))[:-1],
                                 codec.encode(codec.Kind.PROGRESS, Progress(1, 2, 0.5)),
                                 codec.encode_error(ValueError("not a result"))])
def test_malformed_values_are_cache_errors(raw: bytes) -> None:
    with pytest.raises(CacheError):
        decode(raw)


def test_disk_lru_respects_its_cap_and_survives_a_restart(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=3000)
    keys = [f"{i:064x}" for i in range(4)]
    for k in keys[:3]:
        cache.put(k, b"x" * 1000)
    assert cache.get(keys[0]) == b"x" * 1000  # now the most recently used
    cache.put(keys[3], b"y" * 1000)  # evicts keys[1], the least recently used
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.total_bytes <= 3000
    reopened = DiskCache(tmp_path, max_bytes=3000)
    assert reopened.get(keys[3]) == b"y" * 1000 and reopened.get(keys[1]) is None
    assert reopened.total_bytes == 3000
    smaller = DiskCache(tmp_path, max_bytes=1000)  # a smaller cap evicts at start
    assert smaller.total_bytes <= 1000
    assert len(list(tmp_path.glob("*/*.bin"))) == 1


def test_disk_cache_skips_oversized_values_and_refuses_odd_keys(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000, max_value_bytes=100)
    cache.put("e" * 64, b"z" * 101)
    assert cache.get("e" * 64) is None
    with pytest.raises(CacheError):
        cache.put("../../etc/passwd", b"x")


# ---------------------------------------------------------------------------------------------------------------------
# Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = require_binary("redis-server", "Redis cache tests start a real redis-server")
    server = RedisServer(binary, tmp_path)
    yield server
    server.kill()


@pytest.mark.redis
def test_redis_cache_expires_and_bounds_values(redis_server: RedisServer) -> None:
    cache = RedisCache(redis_server.url, ttl_s=1, max_value_bytes=10)
    cache.put("1" * 64, b"small")
    cache.put("2" * 64, b"far too large for the cap")
    assert cache.get("1" * 64) == b"small" and cache.get("2" * 64) is None
    import redis

    ttl = redis.Redis.from_url(redis_server.url).ttl("neuroexplain:result:" + "1" * 64)
    assert 0 < ttl <= 1


@pytest.mark.redis
def test_two_gateways_share_one_redis(redis_server: RedisServer, gated: GatedBackend, tmp_path: Path) -> None:
    a = start_gateway(gated, tmp_path / "a", cache=redis_server.url)
    b = start_gateway(gated, tmp_path / "b", cache=redis_server.url)
    try:
        request = pb.AttributeRequest(model=TINY, scan=scan_msg(make_scan(40)), method="gradient")
        first = a.stub.Attribute(request)
        second = b.stub.Attribute(request)
        assert not first.info.cached and second.info.cached and second.nifti == first.nifti
        assert b.sample("neuroexplain_backend_duration_seconds_count", operation="attribute", model=TINY) == 0
        assert b.sample("neuroexplain_cache_hits_total", operation="attribute") == 1
    finally:
        a.stop()
        b.stop()


@pytest.mark.redis
def test_redis_killed_mid_run_slows_requests_but_never_fails_them(
    redis_server: RedisServer, gated: GatedBackend, tmp_path: Path
) -> None:
    gw = start_gateway(gated, tmp_path, cache=redis_server.url)
    try:
        before = pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(41)))
        assert not gw.stub.Predict(before).info.cached
        assert gw.stub.Predict(before).info.cached
        redis_server.kill()
        after = gw.stub.Predict(pb.PredictRequest(model=TINY, scan=scan_msg(make_scan(42))))
        assert not after.info.cached and after.predicted_class in ("healthy", "lesion")
        again = gw.stub.Predict(before)  # was cached in Redis, which is gone: computed again
        assert not again.info.cached
        # each request failed one read and one write
        assert gw.sample("neuroexplain_cache_errors_total", operation="predict") == 4
        assert gw.sample("neuroexplain_requests_total", rpc="Predict", model=TINY, code="OK") == 4
    finally:
        gw.stop()
