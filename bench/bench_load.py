"""Load and soak (issue 20, item 3): 64 concurrent gRPC clients, a Predict / Attribute / Visualize mix, 10 minutes.

The gateway runs as a subprocess, ``neuroexplain serve --backend torchserve`` (loopback only, port picked free), at
its configured caps: every ``Settings`` default (``max_concurrency`` 4, ``max_queue`` 64, ``max_calls_per_caller``
8, ``max_visualize_steps`` 4096, one TorchServe worker per model, both bundled models served) except the cache,
which is off (``--cache none``: every call is computed, so the soak loads the backend and not the cache). Each client
is its own caller (its own bearer token from a ``--tokens-file``; without tokens all loopback clients are one peer and
share the per-caller cap of 8) on its own channel, and sends its own scans (so no two clients' computations merge).

Each client, seeded, loops until the time is up: Predict (60 %), Attribute (25 %, ``gradient``), Visualize (15 %,
``class:lesion``, preset ``none``, 16 steps), each with a deadline (``--deadline``, default 120 s); after a
RESOURCE_EXHAUSTED or UNAVAILABLE it backs off 0.2-0.5 s. A sampler reads ``/proc`` every ``--sample-every`` seconds:
RSS, threads and open file descriptors of the gateway, TorchServe's Java frontend and each worker process.

Reported (``docs/soak.json``, ``docs/soak.png``, and ``bench/out/load.json``): p50/p95/p99 per RPC, the share of each
status code, the samples, and over the last 8 minutes (the last 80 % of a shorter run) the RSS drift of each process
(median of the window's last minute over median of its first minute, minus 1; and the least-squares slope) and the
growth of threads and file descriptors (median count of the window's last minute minus the median of its first
minute; the ranges and per-minute maxima beside it). Every call is logged in ``calls_log`` (start s, RPC, status,
seconds). ``--reanalyse docs/soak.json`` recomputes the per-process figures from the saved samples. Exit code 1
when a target is missed: >= 80 % OK and the rest RESOURCE_EXHAUSTED only; RSS drift <= 10 %; no thread or fd growth.

    flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench load            # 10 minutes (+ ~1 min start)
    .venv/bin/python -m bench.bench_load --seconds 60 --out /tmp/soak-short      # a short try
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import save

ROOT = Path(__file__).resolve().parent.parent
MODEL = "lesion"
MIX = (("Predict", 0.60), ("Attribute", 0.25), ("Visualize", 0.15))
VISUALIZE_STEPS = 16
SCANS_PER_CLIENT = 2
TARGET_OK_SHARE = 0.80
TARGET_DRIFT = 0.10
WINDOW_S = 480.0


# ---------------------------------------------------------------------------------------------------------------------
# /proc


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from every /proc/PID/stat."""
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if stat is None:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    return (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")


def proc_stats(pid: int) -> dict[str, float] | None:
    """RSS (MB), threads and open file descriptors of one process, or None when it is gone."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]), "fds": fds}


_WORKER_MODELS: dict[int, str] = {}


def processes(gateway: int) -> dict[str, int]:
    """Role -> pid: ``gateway``, ``java`` (TorchServe's frontend), ``worker:MODEL`` for each model's worker."""
    roles = {"gateway": gateway}
    java = None
    workers = []
    for pid in _descendants(gateway):
        cmd = _cmdline(pid)
        if "org.pytorch.serve.ModelServer" in cmd:
            roles["java"] = java = pid
        elif "model_service_worker" in cmd:
            workers.append((pid, cmd))
    for pid, cmd in workers:
        roles[f"worker:{_worker_model(pid, cmd, java)}"] = pid
    return roles


def _worker_model(pid: int, cmd: str, java: int | None) -> str:
    """The model a TorchServe worker serves: its socket's port (``--sock-name .../.ts.sock.PORT``) is named with the
    model in TorchServe's log (``W-PORT-MODEL_VERSION``), in the frontend's working directory."""
    if pid in _WORKER_MODELS:
        return _WORKER_MODELS[pid]
    port = re.search(r"\.ts\.sock\.(\d+)", cmd)
    name = f"port{port.group(1)}" if port else f"pid{pid}"
    if port and java is not None:
        try:
            logs = Path(os.readlink(f"/proc/{java}/cwd")) / "logs"
            text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))
        except OSError:
            text = ""
        found = re.search(rf"W-{port.group(1)}-([A-Za-z0-9][A-Za-z0-9-]*?)_\d", text)
        if found:
            name = found.group(1)
            _WORKER_MODELS[pid] = name
    return name


def fd_kinds(pid: int) -> dict[str, int]:
    """Open file descriptors of a process by kind (socket, pipe, anon_inode, file, ...)."""
    kinds: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"] += 1
    except OSError:
        pass
    return dict(kinds)


class Sampler:
    """Samples every process of the stack every ``every`` seconds in a thread."""

    def __init__(self, gateway: int, every: float, t0: float) -> None:
        self.gateway, self.every, self.t0 = gateway, every, t0
        self.samples: list[dict[str, Any]] = []
        self.pids_seen: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1)}
        for role, pid in processes(self.gateway).items():
            stats = proc_stats(pid)
            if stats is not None:
                row[role] = {"pid": pid, **stats, "fd_kinds": fd_kinds(pid)}
                self.pids_seen.setdefault(role, set()).add(pid)
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------------------------------------------------------------
# The gateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(tmp: Path, tokens_file: Path, log: Any) -> tuple[subprocess.Popen[str], int, int]:
    port, metrics_port = _free_port(), _free_port()
    store = tmp / "store"
    store.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroexplain.cli.main", "serve", "--backend", "torchserve", "--model-store", str(store),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--health-port", "-1",
         "--cache", "none", "--tokens-file", str(tokens_file), "--audit-log", str(tmp / "audit.log")],
        stdout=subprocess.PIPE, stderr=log, env=env, text=True, cwd=str(tmp), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready" once SERVING (archives built, TorchServe and its workers up)
    if line.strip() != "ready":
        proc.kill()
        raise SystemExit(f"bench load: the gateway did not become ready ({line.strip()!r}); see {log.name}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain anything else it prints
    return proc, port, metrics_port


def in_flight(metrics_port: int) -> dict[str, float]:
    """The gateway's in-flight gauges from /metrics (after the load they must be back to 0)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("neuroexplain_requests_in_flight", "neuroexplain_computations_in_flight"):
            if line.startswith(name):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The clients


def client_scans(n_clients: int) -> list[list[bytes]]:
    """Scans per client, all distinct (one synthetic lesion sample, rescaled per index), 2 mm MNI NIfTI."""
    from neuroexplain.lab.synthetic import Task, make_sample
    from neuroexplain.template import MNI_2MM
    from neuroexplain.volumes import nifti_bytes

    image = make_sample(Task.LESION, 1_000_001).image
    return [[nifti_bytes(image * (1.0 + 1e-3 * (c * SCANS_PER_CLIENT + k)), MNI_2MM.affine)
             for k in range(SCANS_PER_CLIENT)] for c in range(n_clients)]  # fmt: skip


class Client(threading.Thread):
    def __init__(self, index: int, target: str, token: str, scans: list[bytes], seed: int, stop_at: float,
                 deadline: float, t0: float) -> None:
        super().__init__(daemon=True, name=f"client{index:02d}")
        self.index, self.target, self.token, self.scans = index, target, token, scans
        self.rng = random.Random(seed * 1_000_003 + index)
        self.stop_at, self.deadline, self.t0 = stop_at, deadline, t0
        self.records: list[tuple[float, str, str, float]] = []  # (start t, rpc, status code, seconds)

    def run(self) -> None:
        from neuroexplain._proto import neuroexplain_pb2 as pb
        from neuroexplain._proto import neuroexplain_pb2_grpc as pb_grpc

        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.enable_http_proxy", 0),
                   ("grpc.use_local_subchannel_pool", 1)]  # its own connection, as a separate client has  # fmt: skip
        channel = grpc.insecure_channel(self.target, options=options)
        stub = pb_grpc.NeuroExplainStub(channel)
        metadata = (("authorization", f"Bearer {self.token}"),)
        names = [name for name, _ in MIX]
        weights = [weight for _, weight in MIX]
        n = 0
        try:
            while time.monotonic() < self.stop_at:
                rpc = self.rng.choices(names, weights)[0]
                scan = pb.Scan(data=self.scans[n % len(self.scans)], alignment=pb.ALIGNMENT_MNI)
                n += 1
                started = time.monotonic()
                code = "OK"
                try:
                    if rpc == "Predict":
                        stub.Predict(pb.PredictRequest(model=MODEL, scan=scan), timeout=self.deadline,
                                     metadata=metadata)
                    elif rpc == "Attribute":
                        stub.Attribute(pb.AttributeRequest(model=MODEL, scan=scan, method="gradient",
                                                           target="lesion"), timeout=self.deadline, metadata=metadata)
                    else:
                        last = None
                        for last in stub.Visualize(pb.VisualizeRequest(
                                model=MODEL, target="class:lesion", preset="none", steps=VISUALIZE_STEPS,
                                seed=self.rng.randrange(1 << 32)), timeout=self.deadline, metadata=metadata):
                            pass
                        if last is None or last.WhichOneof("event") != "result":
                            code = "NO_RESULT"
                except grpc.RpcError as exc:
                    code = exc.code().name
                took = time.monotonic() - started
                self.records.append((round(started - self.t0, 3), rpc, code, round(took, 4)))
                if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    time.sleep(self.rng.uniform(0.2, 0.5))
        finally:
            channel.close()


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def latency_summary(records: list[tuple[float, str, str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rpc, _ in MIX:
        mine = [r for r in records if r[1] == rpc]
        ok = [r[3] for r in mine if r[2] == "OK"]
        codes = Counter(r[2] for r in mine)
        out[rpc] = {"calls": len(mine), "codes": dict(codes),
                    **({f"p{q}_s": round(float(np.percentile(ok, q)), 3) for q in (50, 95, 99)} if ok else {}),
                    "max_s": round(max(ok), 3) if ok else None}  # fmt: skip
    return out


def window_figures(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Per process over the window: RSS drift (median of its last minute / median of its first minute - 1) and the
    least-squares RSS slope; growth of threads and fds (median count of the last minute - median of the first
    minute; the counts jitter by a few threads from sample to sample, so the maxima are reported beside it)."""
    inside = [s for s in samples if start <= s["t"] <= end]
    span = min(60.0, (end - start) / 4)
    roles = sorted({k for s in inside for k in s if k != "t"})
    out: dict[str, Any] = {}
    for role in roles:
        rows = [(s["t"], s[role]) for s in inside if role in s]
        if len(rows) < 2:
            continue
        head = [r for t, r in rows if t <= start + span]
        tail = [r for t, r in rows if t >= end - span]
        first, last = rows[0][1], rows[-1][1]
        rss_head, rss_tail = statistics.median(r["rss_mb"] for r in head), statistics.median(r["rss_mb"] for r in tail)
        slope = float(np.polyfit([t for t, _ in rows], [r["rss_mb"] for _, r in rows], 1)[0]) * 60
        out[role] = {
            "pids": sorted({r["pid"] for _, r in rows}),
            "rss_mb_first_minute": rss_head,
            "rss_mb_last_minute": rss_tail,
            "rss_drift": round(rss_tail / rss_head - 1, 4),
            "rss_slope_mb_per_min": round(slope, 2),
            "rss_mb_min": min(r["rss_mb"] for _, r in rows),
            "rss_mb_max": max(r["rss_mb"] for _, r in rows),
            **{f"{k}_first": first[k] for k in ("threads", "fds")},
            **{f"{k}_last": last[k] for k in ("threads", "fds")},
            **{f"{k}_range": [min(r[k] for _, r in rows), max(r[k] for _, r in rows)] for k in ("threads", "fds")},
            **{f"{k}_max_first_minute": max(r[k] for r in head) for k in ("threads", "fds")},
            **{f"{k}_max_last_minute": max(r[k] for r in tail) for k in ("threads", "fds")},
            **{f"{k}_growth": statistics.median(r[k] for r in tail) - statistics.median(r[k] for r in head)
               for k in ("threads", "fds")},
        }
    return out


def targets(share: dict[str, float], per_process: dict[str, Any], restarts: dict[str, int],
            after: dict[str, float]) -> dict[str, bool]:
    return {
        "ok_share_at_least_80pct": share.get("OK", 0.0) >= TARGET_OK_SHARE,
        "rest_resource_exhausted_only": set(share) - {"OK"} <= {"RESOURCE_EXHAUSTED"},
        "rss_drift_at_most_10pct": all(abs(p["rss_drift"]) <= TARGET_DRIFT for p in per_process.values()),
        "no_thread_growth": all(p["threads_growth"] <= 0 for p in per_process.values()),
        "no_fd_growth": all(p["fds_growth"] <= 0 for p in per_process.values()),
        "no_process_restart": not restarts,
        "nothing_in_flight_after": not any(after.values()),
    }


def reanalyse(path: Path) -> int:
    """Recompute the per-process figures and the targets of a saved ``soak.json`` from its samples (the per-call
    figures are kept as recorded); rewrites the file."""
    saved = json.loads(path.read_text())
    per_process = window_figures(saved["samples"], *saved["window_s"])
    saved["per_process"] = per_process
    saved["targets"] = targets(saved["status_share"], per_process, saved["process_restarts"], saved["in_flight_after"])
    saved["reanalysed"] = f"per-process figures recomputed from the samples by: python -m bench.bench_load --reanalyse {path}"
    path.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps({k: saved[k] for k in ("per_process", "targets")}, indent=2))
    return 0 if all(saved["targets"].values()) else 1


def plot(result: dict[str, Any], samples: list[dict[str, Any]], records: list[tuple[float, str, str, float]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    roles = sorted({k for s in samples for k in s if k != "t"})
    for ax, key, label in zip(axes[:3], ("rss_mb", "threads", "fds"), ("RSS (MB)", "threads", "open fds"),
                              strict=True):
        for role in roles:
            pts = [(s["t"], s[role][key]) for s in samples if role in s]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=role)
        ax.set_ylabel(label)
        ax.axvspan(result["window_s"][0], result["window_s"][1], color="0.93", zorder=-1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    bin_s = 15.0
    for rpc, _ in MIX:
        ends = [r for r in records if r[1] == rpc and r[2] == "OK"]
        if not ends:
            continue
        edges = np.arange(0, result["seconds"] + bin_s, bin_s)
        idx = np.digitize([r[0] for r in ends], edges)
        p95 = [(edges[i - 1] + bin_s / 2, float(np.percentile([r[3] for r, j in zip(ends, idx, strict=True) if j == i],
                                                               95)))
               for i in sorted(set(idx))]  # fmt: skip
        axes[3].plot([p[0] for p in p95], [p[1] for p in p95], marker=".", label=f"{rpc} p95")
    axes[3].set_ylabel(f"latency p95 per {bin_s:.0f} s (s)")
    axes[3].set_xlabel("seconds since the load started (shaded: the window the drift is measured over)")
    axes[3].legend(loc="upper left", fontsize=8)
    axes[3].grid(alpha=0.3)
    codes = result["status_share"]
    fig.suptitle(f"Soak: {result['clients']} clients, {result['seconds']:.0f} s, gateway -> TorchServe "
                 f"({MODEL}); OK {codes.get('OK', 0):.1%} of {result['calls']} calls", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------


def _log_errors(text: str, sigterm_at: datetime.datetime) -> dict[str, list[str]]:
    """The gateway's ERROR lines and tracebacks, split into before and after the SIGTERM that ended it."""
    out: dict[str, list[str]] = {"during_load": [], "after_sigterm": []}
    when = "during_load"
    for line in text.splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ", line)
        if stamp:
            logged = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
            when = "after_sigterm" if logged >= sigterm_at.replace(microsecond=0) else "during_load"
        if " ERROR " in line or "Traceback" in line:
            out[when].append(line[:300])
    return {k: v[:20] for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_load", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load runs (default 600)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices (default 0)")
    parser.add_argument("--deadline", type=float, default=120.0, help="deadline of each call in seconds (default 120)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between /proc samples (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder of soak.json and soak.png (docs/)")
    parser.add_argument("--reanalyse", type=Path, metavar="SOAK_JSON",
                        help="recompute the per-process figures and targets of a saved soak.json (no load is run)")
    args = parser.parse_args(argv)
    if args.reanalyse is not None:
        return reanalyse(args.reanalyse)
    if args.seconds <= 0 or args.clients < 1 or args.deadline <= 0 or args.sample_every <= 0:
        parser.error("--seconds, --clients, --deadline and --sample-every must be positive")

    scans = client_scans(args.clients)
    token_rng = random.Random(args.seed)
    tokens = [f"{token_rng.getrandbits(128):032x}" for _ in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="nx-bench-load-") as tmp_name:
        tmp = Path(tmp_name)
        tokens_file = tmp / "tokens"
        tokens_file.write_text("".join(f"client{i:02d}:{t}\n" for i, t in enumerate(tokens)))
        with open(tmp / "gateway.log", "w") as log:
            started = time.monotonic()
            proc, port, metrics_port = start_gateway(tmp, tokens_file, log)
            startup_s = time.monotonic() - started
            stack = set(processes(proc.pid).values()) - {proc.pid}
            try:
                result, samples, records = soak(args, proc.pid, port, metrics_port, scans, tokens)
            finally:
                stack |= set(processes(proc.pid).values()) - {proc.pid}
                sigterm_at = datetime.datetime.now()
                os.killpg(proc.pid, signal.SIGTERM)  # serve drains, then stops TorchServe
                try:
                    exit_code = proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    exit_code = proc.wait(10)
                for pid in stack:  # TorchServe and its workers, should serve not have stopped them
                    if any(mark in _cmdline(pid) for mark in ("org.pytorch.serve.ModelServer", "model_service_worker")):
                        os.kill(pid, signal.SIGKILL)
        errors = _log_errors((tmp / "gateway.log").read_text(errors="replace"), sigterm_at)
    result.update(startup_s=round(startup_s, 1), gateway_exit_code=exit_code, gateway_error_lines=errors)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, samples, records, args.out / "soak.png")
    full = {**result, "samples": samples, "calls_log": [list(r) for r in records]}
    (args.out / "soak.json").write_text(json.dumps(full, indent=1) + "\n")
    save("load", result)
    missed = [name for name, ok in result["targets"].items() if not ok]
    print(f"bench load: {'targets met' if not missed else 'targets missed: ' + ', '.join(missed)}; "
          f"{args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 1 if missed else 0


def soak(args: argparse.Namespace, gateway_pid: int, port: int, metrics_port: int, scans: list[list[bytes]],
         tokens: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[float, str, str, float]]]:
    t0 = time.monotonic()
    sampler = Sampler(gateway_pid, args.sample_every, t0)
    sampler.sample()
    sampler.start()
    stop_at = t0 + args.seconds
    clients = [Client(i, f"127.0.0.1:{port}", tokens[i], scans[i], args.seed, stop_at, args.deadline, t0)
               for i in range(args.clients)]  # fmt: skip
    for c in clients:
        c.start()
    for c in clients:
        c.join(args.seconds + args.deadline + 30)
    stragglers = sum(c.is_alive() for c in clients)
    ended = time.monotonic() - t0
    time.sleep(2 * args.sample_every)  # let the gateway settle, then one more sample and the in-flight gauges
    sampler.stop()
    sampler.sample()
    after = in_flight(metrics_port)
    records = sorted(r for c in clients for r in c.records)
    codes = Counter(r[2] for r in records)
    total = sum(codes.values())
    window = (max(0.0, args.seconds - min(WINDOW_S, 0.8 * args.seconds)), args.seconds)
    per_process = window_figures(sampler.samples, *window)
    worker_restarts = {role: len(pids) - 1 for role, pids in sampler.pids_seen.items() if len(pids) > 1}
    share = {code: round(n / total, 4) for code, n in codes.most_common()} if total else {}
    result: dict[str, Any] = {
        "command": "flock /tmp/neuroexplain-bench.lock .venv/bin/python -m bench load" if args.seconds == 600
        else f".venv/bin/python -m bench.bench_load --seconds {args.seconds:g}",
        "machine": platform.node(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "model": MODEL, "clients": args.clients, "seconds": args.seconds, "seed": args.seed,
        "deadline_s": args.deadline, "mix": dict(MIX), "visualize_steps": VISUALIZE_STEPS,
        "attribute_method": "gradient", "cache": "none",
        "caps": {"max_concurrency": 4, "max_queue": 64, "max_calls_per_caller": 8, "torchserve_workers": 1},
        "calls": total, "calls_per_s": round(total / args.seconds, 2), "status_share": share,
        "per_rpc": latency_summary(records), "window_s": list(window), "per_process": per_process,
        "process_restarts": worker_restarts, "clients_still_running": stragglers,
        "load_ended_after_s": round(ended, 1), "in_flight_after": after,
    }  # fmt: skip
    result["targets"] = targets(share, per_process, worker_restarts, after)
    return result, sampler.samples, records


if __name__ == "__main__":
    sys.exit(main())
