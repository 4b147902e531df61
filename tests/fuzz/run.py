"""``make fuzz``: the long fuzz run. Seeded cases (``cases.py``) through a real gateway in its own process, on each
backend, judged by the oracle (``harness.py``); prints counts per status code, hangs, oracle failures, worker deaths
and the peak RSS of each process (gateway, TorchServe's java, its workers: ``VmHWM`` from ``/proc``, polled).

Usage::

    .venv/bin/python tests/fuzz/run.py --cases inprocess=4000,torchserve=6000 [--seed 1] [--save-failures]
    .venv/bin/python tests/fuzz/run.py --replay 1:123      # rebuild one case and print it (and what it gives)

Each backend gets its own range of case indices (the cases differ). A case that breaks the oracle is printed with
its ``SEED:INDEX`` and, with ``--save-failures``, written to ``tests/fuzz/regressions/`` (replayed by ``make test``).
Exit status 1 if any case broke the oracle, a worker died or the backend was not ready at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

MiB = 1 << 20


def _gateway_process(kind: str, workdir: str, conn: Connection) -> None:
    """The gateway under test, in its own process: a real server on a free loopback port, every interceptor."""
    import logging
    import warnings

    sys.path[:0] = [str(HERE), str(HERE.parent)]
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING, filename=str(Path(workdir) / "gateway.log"))
    import torch
    from prometheus_client import CollectorRegistry
    from test_service_support import make_backend_for, write_tiny_model

    from service.config import Settings
    from service.grpc.server import create_server

    torch.set_num_threads(1)
    models = write_tiny_model(Path(workdir) / "models")
    backend = make_backend_for(kind, models)
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, health_port=-1, cache="disk",
                        cache_dir=Path(workdir) / "cache", workers=16)
    server, port = create_server(settings, backend, registry=CollectorRegistry())
    server.start()
    conn.send(port)
    conn.recv()  # the runner says stop
    server.stop(5).wait()
    server.close()
    backend.close()
    conn.send("closed")


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a process in bytes (``VmHWM``), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Watch:
    """Polls the gateway's process tree: the peak RSS of each process, the workers seen and lost."""

    gateway_pid: int
    peaks: dict[str, int] = field(default_factory=dict)  # role -> peak bytes over every process of that role
    workers_seen: set[int] = field(default_factory=set)
    workers_lost: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def role(self, proc: object) -> str:
        import psutil

        assert isinstance(proc, psutil.Process)
        if proc.pid == self.gateway_pid:
            return "gateway"
        try:
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            return "other"
        if "java" in name:
            return "torchserve java"
        if "model_service_worker" in cmdline:
            return "torchserve worker"
        return "other: " + name

    def poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.gateway_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        alive_workers = set()
        for proc in procs:
            role = self.role(proc)
            peak = _vm_hwm(proc.pid)
            if peak is not None:
                self.peaks[role] = max(self.peaks.get(role, 0), peak)
            if role == "torchserve worker":
                alive_workers.add(proc.pid)
        self.workers_lost |= self.workers_seen - alive_workers
        self.workers_seen |= alive_workers

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()


def _ready(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.grpc.server import SERVICE_NAME

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                           timeout=10)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def fuzz_backend(kind: str, seed: int, first: int, count: int, deadline_s: float, save: bool,
                 visualize_every: int = 0) -> bool:
    import grpc
    from cases import make_case, save_case
    from harness import Tally, send
    from test_service_support import TINY

    from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{kind}-") as workdir:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_gateway_process, args=(kind, workdir, child), daemon=False)
        started = time.monotonic()
        proc.start()
        if not parent.poll(300):
            proc.kill()
            raise SystemExit(f"{kind}: the gateway did not start within 300 s")
        port = parent.recv()
        print(f"{kind}: gateway pid {proc.pid} on port {port}, started in {time.monotonic() - started:.1f} s",
              flush=True)
        watch = Watch(proc.pid)
        watch.poll()
        poller = threading.Thread(target=watch.run, daemon=True)
        poller.start()
        options = [("grpc.max_receive_message_length", 256 * MiB), ("grpc.max_send_message_length", 256 * MiB)]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        stub = pb_grpc.NeuroExplainStub(channel)
        tally = Tally()
        began = time.monotonic()
        for index in range(first, first + count):
            case = make_case(seed, index)
            if visualize_every and index % visualize_every == 0:
                case = dataclasses.replace(case, rpc="visualize", return_dicom=False)
            verdict = send(stub, case, TINY, deadline_s)
            tally.add(verdict)
            if verdict.problem:
                print(f"  FAIL {verdict.case}: {verdict.code.name} {verdict.message[:300]!r} ({verdict.problem})",
                      flush=True)
                if save:
                    path = HERE / "regressions" / f"fuzz-{seed}-{index}.bin"
                    save_case(case, path, "")
                    print(f"  saved {path.relative_to(HERE.parent.parent)}", flush=True)
            done = index - first + 1
            if done % 500 == 0:
                rate = done / (time.monotonic() - began)
                print(f"  {kind}: {done}/{count} cases, {rate:.1f}/s, {dict(tally.codes)}", flush=True)
        elapsed = time.monotonic() - began
        time.sleep(1.5)  # a worker that died on the last case is noticed by the next polls
        watch.poll()
        ready = _ready(port)
        watch.stop.set()
        channel.close()
        parent.send("stop")
        parent.poll(60)
        proc.join(30)
        if proc.is_alive():
            proc.kill()

    print(f"\n== {kind}: {tally.cases} cases (seed {seed}, indices {first}..{first + count - 1}) in {elapsed:.0f} s "
          f"({tally.cases / elapsed:.1f}/s), slowest answer {tally.slowest_s:.2f} s (deadline {deadline_s:g} s)")
    for code, n in sorted(tally.codes.items(), key=lambda kv: -kv[1]):
        print(f"   {code:<20} {n:>6}")
    internal = tally.codes.get("INTERNAL", 0) + tally.codes.get("UNKNOWN", 0)
    print(f"   INTERNAL/UNKNOWN {internal}, hangs {tally.hangs}, oracle failures {len(tally.failures)}, "
          f"worker deaths {len(watch.workers_lost)} (workers seen {len(watch.workers_seen)}), "
          f"ready at the end: {ready}")
    for code in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"):
        reasons = [(m, n) for (c, m), n in tally.messages.most_common() if c == code]
        for message, n in reasons[:8]:
            print(f"   {code} {n:>5}x  {message}")
    for role, peak in sorted(watch.peaks.items()):
        print(f"   peak RSS {role:<18} {peak / MiB:8.0f} MiB")
    return not tally.failures and not watch.workers_lost and ready


def _replay(spec: str) -> int:
    from cases import make_case

    seed, index = (int(v) for v in spec.split(":"))
    case = make_case(seed, index)
    size = len(case.data) if not case.is_dicom else sum(len(i) for i in case.instances)
    print(f"{case.name}\n  rpc {case.rpc}, return_dicom {case.return_dicom}, "
          f"{len(case.instances) or 1} blob(s), {size} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="inprocess=4000,torchserve=6000",
                        help="cases per backend, e.g. inprocess=4000,torchserve=6000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds each call may take")
    parser.add_argument("--save-failures", action="store_true", help="write failing cases to tests/fuzz/regressions")
    parser.add_argument("--visualize-every", type=int, default=0, metavar="K",
                        help="send every K-th case as a Visualize started from the scan (0: none)")
    parser.add_argument("--replay", metavar="SEED:INDEX")
    args = parser.parse_args(argv)
    if args.replay:
        return _replay(args.replay)
    plan = [(kind, int(n)) for kind, n in (item.split("=") for item in args.cases.split(","))]
    print(f"fuzz: {sum(n for _, n in plan)} cases, seed {args.seed}, pid {os.getpid()}", flush=True)
    clean, first = True, 0
    for kind, count in plan:
        clean &= fuzz_backend(kind, args.seed, first, count, args.deadline, args.save_failures,
                              args.visualize_every)
        first += count
    print("\nfuzz: " + ("clean" if clean else "FAILED"))
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
