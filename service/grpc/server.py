"""Server factory and entry point: wiring only.

:func:`create_server` builds core, cache, metrics, interceptors, health and reflection around a backend and binds the
port; :func:`serve` (``neuroexplain serve``) picks the backend, starts everything, prints ``ready`` once SERVING, and
on SIGTERM/SIGINT stops accepting, drains in-flight calls and exits.

Hooks for the other parts of the service:
    * security: pass ``credentials`` (TLS/mTLS) and ``extra_interceptors`` (tokens, audit) to :func:`create_server`;
      register ``GatewayServer.health`` on the plaintext health-only port;
    * backends declare their Prometheus collectors (``Backend.collectors()``, e.g. TorchServe's re-export); they
      are registered on the same registry as the gateway's metrics, so one ``/metrics`` shows both.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from neuroexplain._proto import neuroexplain_pb2 as pb
from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc
from neuroexplain.errors import InvalidOptionError, UnavailableError
from neuroexplain.precision import Precision, describe
from service.backend import Backend
from service.cache import CacheError, ResultCache, open_cache
from service.config import BackendKind, Settings
from service.core import Core
from service.grpc.metrics import MetricsInterceptor
from service.grpc.servicer import NeuroExplainServicer
from service.grpc.status import ErrorInterceptor, status_code
from service.metrics import Metrics
from service.scans import redis_password

log = logging.getLogger("neuroexplain.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NeuroExplain"].full_name  # "neuroexplain.v1.NeuroExplain"
LIVENESS = ""  # grpc.health.v1: the empty service name is the process itself
HEALTH_POLL_S = 1.0


@dataclass(eq=False)
class GatewayServer:
    """A started-or-startable gateway: the gRPC server plus what it owns.

    Attributes:
        grpc_server: the underlying ``grpc.Server``.
        core: the transport-neutral core (backend, cache, scan store, singleflight).
        metrics: the metrics (``metrics.registry`` is what ``/metrics`` exposes).
        health: the grpc.health.v1 servicer; register it on a health-only port as well.
    """

    grpc_server: grpc.Server
    core: Core
    metrics: Metrics
    health: health.HealthServicer
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    def start(self) -> None:
        self.grpc_server.start()
        self.update_health()
        self._watcher = threading.Thread(target=self._watch, name="health-watch", daemon=True)
        self._watcher.start()

    def update_health(self) -> bool:
        """Set liveness SERVING and readiness from the backend; returns readiness."""
        try:
            ready = bool(self.core.backend.ready())
        except Exception:  # a probe must never kill the watcher
            log.exception("backend readiness check failed")
            ready = False
        if ready and not self.core.model_names():
            try:
                self.core.refresh_models()
            except Exception:
                log.exception("listing the backend's models failed")
                ready = False
        status = health_pb2.HealthCheckResponse
        self.health.set(LIVENESS, status.SERVING)
        self.health.set(SERVICE_NAME, status.SERVING if ready else status.NOT_SERVING)
        self.metrics.backend_ready.set(1 if ready else 0)
        return ready

    def _watch(self) -> None:
        while not self._stop.wait(HEALTH_POLL_S):
            self.update_health()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop accepting, let in-flight calls finish for ``grace`` seconds, then cancel the rest."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        done = self.grpc_server.stop(grace)
        return done

    def close(self) -> None:
        """After :meth:`stop`: stop the core's workers and the cache."""
        self.core.close(wait=False)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def create_server(
    settings: Settings,
    backend: Backend,
    *,
    registry: CollectorRegistry | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    cache: ResultCache | None = None,
) -> tuple[GatewayServer, int]:
    """Build the gateway around ``backend`` and bind ``settings.host:settings.port`` (not started).

    Args:
        settings: configuration.
        backend: an implementation of ``service.backend.Backend`` (already started or starting).
        registry: where metrics go (a fresh ``CollectorRegistry`` in tests; the serve command passes the one its
            ``/metrics`` server exposes). Default: a new registry.
        extra_interceptors: run inside the metrics and error interceptors (so their refusals are counted and mapped):
            authentication, audit.
        credentials: TLS/mTLS server credentials; None binds a plaintext port.
        cache: a result cache; default: the one ``settings.cache`` names.

    Returns:
        The server and the bound port (useful with ``settings.port == 0``).
    """
    metrics = Metrics(registry)
    for collector in backend.collectors():  # TorchServe: its own metrics, re-exported
        metrics.registry.register(collector)
    if cache is None:
        try:
            cache = open_cache(settings.cache, settings.cache_dir, settings.cache_max_bytes, settings.cache_ttl_s,
                               settings.cache_max_value_bytes, password=redis_password(settings))
        except (CacheError, ValueError) as exc:
            from service.security.redact import redact_url

            shown = settings.cache if settings.cache in ("disk", "none") else redact_url(settings.cache)  # no password
            raise InvalidOptionError(f"cache {shown!r} cannot be opened: {exc}") from None
    core = Core(settings, backend, cache, metrics)
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(metrics, core.model_names),
        ErrorInterceptor(),
        *extra_interceptors,
    ]
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[*settings.grpc_options, ("grpc.so_reuseport", 0)],
        # A last-resort guard only: the core's own limit (running + queued computations) must be reached first, so
        # that refusals pass the interceptors (audited, counted, with the core's message).
        maximum_concurrent_rpcs=2 * settings.grpc_threads,
    )
    pb_grpc.add_NeuroExplainServicer_to_server(NeuroExplainServicer(core), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise UnavailableError(f"cannot bind the gRPC port {address}; is it in use?")
    return GatewayServer(grpc_server=server, core=core, metrics=metrics, health=health_servicer), port




# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def make_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names."""
    if settings.backend is BackendKind.INPROCESS:
        from service.backends.inprocess import InProcessBackend

        return InProcessBackend(model_dirs=settings.model_dirs, device=settings.device)
    try:
        from service.backends.torchserve import TorchServeBackend
    except ImportError:
        raise UnavailableError(
            "the TorchServe backend is not available in this build (torchserve is not installed); use --backend "
            "inprocess"
        ) from None
    return TorchServeBackend(settings)


def serve(
    settings: Settings,
    *,
    out: Callable[[str], None] = lambda line: print(line, flush=True),
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Run the gateway until SIGTERM/SIGINT; prints ``ready`` once readiness is SERVING. Returns the exit code."""
    from prometheus_client import start_http_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from service.security.setup import build_security, start_health_port

    # Certificates, keys and tokens are checked before anything slow starts: a bad file fails at once.
    security = build_security(settings, status_of=status_code)
    log.info(security.describe())
    from service.config import is_loopback

    if is_loopback(settings.host):
        log.info("listening on loopback only (%s): other machines cannot connect; to serve them, give --host with "
                 "TLS and tokens (or --insecure)", settings.host)
    elif settings.insecure:
        log.warning("--insecure: listening on %s without TLS or tokens; anyone who reaches it can call it",
                    settings.host)
    registry = CollectorRegistry()
    backend = make_backend(settings)
    backend.start()
    gateway, port = create_server(settings, backend, registry=registry,
                                  extra_interceptors=[security.interceptor, *extra_interceptors],
                                  credentials=credentials or security.credentials)
    health_port: tuple[grpc.Server, int] | None = None
    metrics_server: Any = None
    if settings.metrics_port >= 0:
        metrics_server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: draining for up to %.0f s", signal.Signals(signum).name, settings.grace_s)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        gateway.start()
        health_port = start_health_port(settings, gateway.health)  # plaintext, grpc.health.v1 only (kubelet)
        log.info("gRPC on port %d (backend %s, cache %s)", port, settings.backend.value,
                 "redis" if settings.cache.startswith("redis") else settings.cache)
        while not stopping.is_set():
            if gateway.update_health():
                if settings.precision is not Precision.FLOAT32:
                    for info in gateway.core.models():
                        log.info("precision of model %s: %s", info.name, describe(info.mixed_precision,
                                                                                settings.precision))
                out("ready")
                break
            stopping.wait(0.5)
        stopping.wait()
        gateway.stop(settings.grace_s).wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        gateway.close()
        backend.close()
        if health_port is not None:
            health_port[0].stop(None)
        security.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped")
    return 0
