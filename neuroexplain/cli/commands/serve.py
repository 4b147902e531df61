"""``neuroexplain serve``: run the gRPC gateway (prints ``ready`` once SERVING; SIGTERM drains and exits)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run the gRPC gateway. Every flag also reads a NEUROEXPLAIN_* environment variable "
        "(flag > environment > default), e.g. NEUROEXPLAIN_PORT, NEUROEXPLAIN_CACHE.",
    )
    p.add_argument("--host", default=None,
                   help="address to bind (default localhost: loopback only, 127.0.0.1 and [::1]); any other "
                   "address needs --tls-cert/--tls-key and --tokens-file, or --insecure")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback --host without TLS and tokens (plaintext, no authentication)")
    p.add_argument("--metrics-host", default=None, help="address /metrics binds to (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default 9464; -1 = off)")
    p.add_argument("--health-port", type=int, default=None,
                   help="plaintext grpc.health.v1-only port for kubelet probes (default 50052; -1 = off)")
    p.add_argument("--backend", choices=["torchserve", "inprocess"], default=None,
                   help="where models run (default torchserve)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", type=Path, default=None,
                       help="folder of the on-disk result cache (default ~/.cache/neuroexplain)")
    cache.add_argument("--cache", default=None, metavar="URL",
                       help="redis://[:password@]host:port/db for a cache shared by replicas, or 'none'")
    p.add_argument("--cache-max-bytes", type=int, default=None, help="disk cache size cap (default 2 GiB)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="computations at once; beyond it and the queue: RESOURCE_EXHAUSTED (default 4)")
    p.add_argument("--max-message-bytes", type=int, default=None, help="gRPC max message size (default 256 MiB)")
    p.add_argument("--device", default=None, help="torch device of the in-process backend (default cpu)")
    p.add_argument("--model-store", type=Path, default=None,
                   help="TorchServe backend: folder of .mar archives to serve; missing bundled ones are built "
                   "(default ./model_store)")
    sec = p.add_argument_group("security", "see the README's Security section; every flag also has its "
                               "NEUROEXPLAIN_* variable (e.g. NEUROEXPLAIN_TLS_CERT)")
    sec.add_argument("--tls-cert", default=None, metavar="F",
                     help="PEM certificate chain of the main port: turns TLS on (reloaded when the file changes)")
    sec.add_argument("--tls-key", default=None, metavar="F", help="PEM private key of --tls-cert (unencrypted)")
    sec.add_argument("--tls-client-ca", default=None, metavar="F",
                     help="PEM CA bundle: every client must present a certificate it signed (mutual TLS)")
    sec.add_argument("--tokens-file", default=None, metavar="F",
                     help="'name:token' lines; calls need 'authorization: Bearer <token>'; reloaded when the file "
                     "changes (alternative: NEUROEXPLAIN_TOKENS=name:token,name:token)")
    sec.add_argument("--audit-log", default=None, metavar="TARGET",
                     help="one JSON line per call to stderr (default), stdout, a file path, or 'off'")
    sec.add_argument("--max-calls-per-caller", type=int, default=None, metavar="N",
                     help="calls one caller may have in flight (default 8; 0 = no cap)")
    sec.add_argument("--redis-password-file", default=None, metavar="F",
                     help="file holding the Redis password, kept out of the --cache URL "
                     "(alternative: NEUROEXPLAIN_REDIS_PASSWORD)")
    sec.add_argument("--scan-store-key-file", default=None, metavar="F",
                     help="AES keys of the scan store in Redis (hex or base64, one per line; the last encrypts)")
    sec.add_argument("--deidentify-key-file", default=None, metavar="F",
                     help="key (16-4096 bytes) of the UID remapping of de-identified DICOM results; without it, "
                     "deidentify requests are refused")
    p.add_argument("--input-check", choices=["warn", "reject"], default=None,
                   help="a scan unlike the model's training data: answer with the check in the result (warn, the "
                   "default) or refuse it with FAILED_PRECONDITION (reject)")
    p.add_argument("--precision", choices=["float32", "float16", "bfloat16"], default=None,
                   help="number format of Predict and attribution (default float32); a reduced one runs only what "
                   "the model's spec measured within tolerance on the device it runs on (neuroexplain "
                   "evaluate-precision), everything else in float32")
    p.set_defaults(func=run)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given on the command line, as ``Settings`` field names (None = not given)."""
    from neuroexplain.precision import Precision
    from service.config import BackendKind

    return {
        "host": args.host,
        "insecure": args.insecure,
        "metrics_host": args.metrics_host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "health_port": args.health_port,
        "backend": BackendKind(args.backend) if args.backend else None,
        "cache_dir": args.cache_dir,
        "cache": args.cache if args.cache else ("disk" if args.cache_dir else None),
        "cache_max_bytes": args.cache_max_bytes,
        "max_concurrency": args.max_concurrency,
        "max_message_bytes": args.max_message_bytes,
        "device": args.device,
        "model_store": args.model_store,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "tokens_file": args.tokens_file,
        "audit_log": args.audit_log,
        "max_calls_per_caller": args.max_calls_per_caller,
        "redis_password_file": args.redis_password_file,
        "deidentify_key_file": args.deidentify_key_file,
        "scan_store_key_file": args.scan_store_key_file,
        "input_check": args.input_check,
        "precision": Precision(args.precision) if args.precision else None,
    }


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from neuroexplain.serving.tuning import process_env, tune_allocator

    tune_allocator(os.environ)  # this process, before its threads exist (and before the variables below are set)
    if "torch" not in sys.modules:  # OpenMP reads these once, when torch loads (the in-process backend's models)
        os.environ.update(process_env(os.environ))
    from service.config import build_settings
    from service.grpc.server import serve

    return serve(build_settings(overrides(args)))
