"""``neuroexplain pacs-bridge``: a DICOM node that sends received series to the service and results to the PACS."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from neuroexplain import errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bridge's flags (DESIGN.md "PACS bridge") plus the client connection flags."""
    from neuroexplain.client import add_client_arguments

    p.add_argument("--ae-title", default="NEUROEXPLAIN", help="this node's AE title (default NEUROEXPLAIN)")
    p.add_argument("--host", default="0.0.0.0", help="address of the DICOM port (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112; 0 = any free port)")
    p.add_argument("--allow-ae", action="append", default=[], metavar="AE",
                   help="calling AE title allowed to store (repeatable; none = every association rejected)")
    p.add_argument("--model", default="lesion", help="model to run (default lesion)")
    p.add_argument("--method", action="append", default=[], help="attribution method (repeatable; none = predict)")
    p.add_argument("--dicom-extra", action="append", default=[], choices=["seg", "sc"],
                   help="extra result objects of each Attribute")
    p.add_argument("--send-to", default=None, metavar="AE@HOST:PORT", help="where results are C-STOREd")
    p.add_argument("--stow-url", default=None, metavar="URL", help="DICOMweb base URL for STOW-RS instead")
    p.add_argument("--spool", type=Path, required=True, metavar="DIR", help="spool folder (a persistent volume)")
    p.add_argument("--spool-max-bytes", type=int, default=10 << 30, help="beyond it stores are refused (10 GiB)")
    p.add_argument("--max-associations", type=int, default=32,
                   help="associations accepted at once (default 32); more are rejected, the sender retries")
    p.add_argument("--quiet-seconds", type=float, default=10.0, help="a series is complete after S quiet seconds")
    p.add_argument("--failed-retention-days", type=float, default=30.0, help="how long failed/ keeps a series")
    p.add_argument("--modality", action="append", default=None, help="modalities analysed (default MR and CT)")
    p.add_argument("--min-slices", type=int, default=8, help="smaller series are skipped (default 8)")
    p.add_argument("--skip-image-type", action="append", default=None,
                   help="ImageType values skipped (default LOCALIZER SCOUT DERIVED)")
    p.add_argument("--max-tries", type=int, default=8, help="tries of a transient failure before failed/")
    p.add_argument("--retry-base-seconds", type=float, default=2.0, help="first backoff (doubles, with jitter)")
    p.add_argument("--retry-max-seconds", type=float, default=300.0, help="longest backoff (default 300)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics and /ready")
    p.add_argument("--metrics-port", type=int, default=9465, help="port of /metrics and /ready (default 9465)")
    p.add_argument("--dicom-tls-cert", default=None, metavar="F", help="DICOM TLS certificate (turns TLS on)")
    p.add_argument("--dicom-tls-key", default=None, metavar="F", help="key of --dicom-tls-cert")
    p.add_argument("--dicom-tls-ca", default=None, metavar="F", help="CA of the calling nodes' certificates (mTLS)")
    add_client_arguments(p)


def register(sub: Any) -> None:
    """Register the sub-command (the lead adds this to ``cli/main.py``)."""
    p = sub.add_parser("pacs-bridge", help="DICOM node between a PACS and the service",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM/SIGINT; prints ``ready`` when it accepts associations."""
    from neuroexplain.client import client_from_args
    from neuroexplain.pacs.bridge import Bridge, Config, grpc_analyse

    if getattr(args, "local", False):
        raise errors.InvalidOptionError("pacs-bridge talks to a server: --local is not allowed")
    if bool(args.dicom_tls_cert) != bool(args.dicom_tls_key):
        raise errors.InvalidOptionError("--dicom-tls-cert and --dicom-tls-key go together")
    for name in ("quiet_seconds", "retry_base_seconds", "retry_max_seconds"):
        if not getattr(args, name) >= 0:
            raise errors.InvalidOptionError(f"--{name.replace('_', '-')} must be >= 0")
    if args.spool_max_bytes < 1 or args.max_tries < 1 or args.min_slices < 1 or args.max_associations < 1:
        raise errors.InvalidOptionError(
            "--spool-max-bytes, --max-tries, --min-slices and --max-associations must be >= 1")
    config = Config(
        spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port, allow_ae=args.allow_ae,
        model=args.model, methods=args.method, send_to=args.send_to, stow_url=args.stow_url,
        quiet_seconds=args.quiet_seconds, max_associations=args.max_associations, spool_max_bytes=args.spool_max_bytes,
        failed_retention_days=args.failed_retention_days, modalities=args.modality or ("MR", "CT"),
        min_slices=args.min_slices, skip_image_types=args.skip_image_type or ("LOCALIZER", "SCOUT", "DERIVED"),
        max_tries=args.max_tries, retry_base_seconds=args.retry_base_seconds,
        retry_max_seconds=args.retry_max_seconds, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port, tls_cert=args.dicom_tls_cert, tls_key=args.dicom_tls_key,
        tls_ca=args.dicom_tls_ca, extras=args.dicom_extra,
    )
    client = client_from_args(args)
    bridge = Bridge(config, grpc_analyse(client, config.model, config.methods, config.extras))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    bridge.start()
    print("ready", flush=True)
    done.wait()
    bridge.stop()
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m neuroexplain.pacs``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="neuroexplain pacs-bridge", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except errors.NeuroExplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
