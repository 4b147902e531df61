"""The plaintext, health-only port (``--health-port``, default 50052) for kubelet's gRPC probes.

Kubelet's built-in gRPC probe speaks neither TLS nor mutual TLS, so with TLS on the main port it cannot probe it.
This second server carries only ``grpc.health.v1.Health`` (Check and Watch) with the *same* servicer object as the
main port, so both ports always report the same status: liveness is the empty service name ``""``, readiness is
``neuroexplain.v1.NeuroExplain``. Any other method answers UNIMPLEMENTED; no scan, model or token ever travels
over it. Bind it where the kubelet reaches it (the pod IP) and keep it out of the Service that clients use.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from neuroexplain.errors import UnavailableError


def create_health_server(
    servicer: health.HealthServicer, *, host: str = "[::]", port: int = 50052, workers: int = 4
) -> tuple[grpc.Server, int]:
    """Build (not start) a server that serves only ``servicer`` on a plaintext port.

    Args:
        servicer: the main server's health servicer; statuses set on it show on both ports.
        host: address to bind.
        port: port to bind; 0 picks a free one.
        workers: handler threads (Watch streams hold one each while open).

    Returns:
        The server and the bound port.

    Raises:
        UnavailableError: the port cannot be bound.
    """
    # Tiny messages only: a probe never needs more than a few bytes, so nothing large is ever accepted here.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health"),
        options=[("grpc.max_receive_message_length", 4096), ("grpc.max_send_message_length", 4096)],
        maximum_concurrent_rpcs=4 * workers,
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise UnavailableError(f"cannot bind the health port {address}; choose another with --health-port")
    return server, bound
