"""Everything of the gateway that speaks gRPC: server factory, servicer, converters, the status table, interceptors
(metrics, errors — and security in ``service/security`` — all through :func:`service.grpc.wrap.wrap_handler`) and
health. The core below it (``service/core.py``) is transport-neutral."""
