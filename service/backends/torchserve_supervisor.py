"""Run one TorchServe (Java 17) under the gateway's supervision.

Each supervisor owns one TorchServe: its own working directory (config, logs, Java temp dir with the workers' Unix
sockets, cancel flags), its own free loopback ports, its own process group. So two ``serve`` instances on one host
never collide — which is also why we start the Java frontend ourselves instead of through the ``torchserve``
launcher script: that script keeps one global pid file in ``/tmp`` and refuses a second instance.

Security decisions:

- every TorchServe port (REST inference, management, metrics, gRPC inference and management) binds ``127.0.0.1``;
  the management API is never reachable from outside (CVE-2023-43654, "ShellTorch"), model registration from URLs
  is confined to the model store (``allowed_urls``) and the model-control API stays off;
- token authorization is **disabled** (``--disable-token-auth``): the ports are loopback-only, the gateway in front
  does authentication, and TorchServe's keys expire after 60 minutes, which would need a refresh loop for no gain.

If TorchServe exits, :meth:`ready` turns False at once, a monitor thread restarts it with exponential backoff
(1 s, 2 s, 4 s ... capped at 30 s, reset after a minute of healthy running), and ``generation`` increments so the
client reconnects. :meth:`close` stops the whole process group (frontend and Python workers); nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ts

from neuroexplain.errors import UnavailableError

log = logging.getLogger(__name__)

TS_HOME = Path(ts.__file__).resolve().parent.parent
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds the ``service``, ``handlers`` and ``neuroexplain`` packages
CANCEL_DIR_ENV = "NEUROEXPLAIN_CANCEL_DIR"
LOOPBACK = "127.0.0.1"
# Loopback calls must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class EngineOptions:
    """How to run TorchServe.

    Attributes:
        model_store: folder of ``.mar`` archives; every archive in it is loaded.
        work_dir: TorchServe's working directory; None = a fresh temporary folder, removed on close.
        max_message_bytes: TorchServe's ``max_request_size`` and ``max_response_size`` (the gateway's limit).
        startup_timeout_s: how long to wait for TorchServe and every model's workers to be ready.
        java: the java executable (JAVA_HOME/bin/java, else ``java`` on PATH).
        job_queue_size: requests queued per model before TorchServe refuses (mapped to RESOURCE_EXHAUSTED).
        restart_backoff_s: first restart delay; doubles on each quick failure up to ``restart_backoff_max_s``.
        jvm_args: JVM options (small heap, serial GC: the frontend only shuffles bytes).
        number_of_gpu: GPUs TorchServe hands to workers (``gpu_id``; the handler then runs on CUDA when torch has
            it); None = TorchServe's default, every visible GPU; 0 = CPU only.
    """

    model_store: Path
    work_dir: Path | None = None
    max_message_bytes: int = 256 << 20
    startup_timeout_s: float = 300.0
    java: str = ""
    job_queue_size: int = 100
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    jvm_args: tuple[str, ...] = ("-Xmx1g", "-XX:+UseSerialGC", "-XX:-UsePerfData")
    extra_env: dict[str, str] = field(default_factory=dict)
    number_of_gpu: int | None = None


@dataclass(frozen=True)
class Endpoints:
    """Loopback addresses of one TorchServe run."""

    grpc_inference: str
    grpc_management: str
    rest_inference: str
    management: str
    metrics: str


def find_java(configured: str = "") -> str:
    """The java executable to use.

    Raises:
        UnavailableError: no Java found; says how to install it.
    """
    candidates = [configured] if configured else []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates.append(shutil.which("java") or "")
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise UnavailableError(
        "Java 17 is needed to run TorchServe but was not found (set JAVA_HOME or install openjdk-17-jre-headless); "
        "or run `neuroexplain serve --backend inprocess`"
    )


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TorchServeSupervisor:
    """Start, watch, restart and stop one TorchServe.

    Args:
        options: how to run it.
        on_state: called with True when TorchServe becomes ready and False when it goes away (readiness).
    """

    def __init__(self, options: EngineOptions, on_state: Callable[[bool], None] | None = None) -> None:
        self.options = options
        self._on_state = on_state or (lambda _ready: None)
        self._own_work_dir = options.work_dir is None
        self.work_dir = Path(options.work_dir or tempfile.mkdtemp(prefix="nx-ts-"))
        self.cancel_dir = self.work_dir / "cancel"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoints: Endpoints | None = None
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self.generation = 0
        self.restarts = 0

    # -- public ------------------------------------------------------------------------------------------------------

    @property
    def endpoints(self) -> Endpoints:
        """Addresses of the current run.

        Raises:
            UnavailableError: TorchServe is not running (starting, restarting or closed).
        """
        endpoints = self._endpoints
        if endpoints is None or not self.ready():
            raise UnavailableError("the model server (TorchServe) is restarting; retry shortly")
        return endpoints

    def ready(self) -> bool:
        """True while TorchServe runs and its models were ready; False from the moment the process is gone."""
        return self._ready.is_set() and self.alive()

    def alive(self) -> bool:
        """Whether the Java frontend runs. Not ``Popen.poll()``: it answers None while the monitor thread waits."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return False
        try:
            return bool(psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def start(self) -> None:
        """Start TorchServe and wait until every model in the store has a ready worker; then watch it.

        Raises:
            UnavailableError: Java is missing, or TorchServe did not become ready within ``startup_timeout_s``
                (the last lines of its log are in the gateway's log).
        """
        for sub in ("logs", "tmp", "cancel"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._launch_and_wait()
        except BaseException:
            if self._own_work_dir:
                log.error("TorchServe did not start; its log was: %s", self._log_tail(20))
                shutil.rmtree(self.work_dir, ignore_errors=True)
            raise
        self._monitor = threading.Thread(target=self._watch, name="torchserve-supervisor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        """Stop TorchServe and its workers (SIGTERM, then SIGKILL after 15 s); remove a temporary work dir."""
        self._closing.set()
        self._set_ready(False)
        self._stop_group(self._proc)
        if self._monitor is not None:
            self._monitor.join(timeout=20)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the Java frontend only, as a crash would (tests, chaos drills); the monitor restarts it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def models(self) -> list[dict[str, object]]:
        """TorchServe's description of every registered model (management API)."""
        listing = self._get_json(f"{self.endpoints.management}/models")
        return [self._get_json(f"{self.endpoints.management}/models/{m['modelName']}")[0] for m in listing["models"]]

    def metrics_text(self) -> str:
        """TorchServe's Prometheus exposition (loopback metrics port); empty while it is down."""
        try:
            with _OPENER.open(f"{self.endpoints.metrics}/metrics", timeout=5) as resp:
                return str(resp.read().decode())
        except (UnavailableError, OSError):
            return ""

    # -- internals ---------------------------------------------------------------------------------------------------

    def _config(self, ports: list[int]) -> tuple[Path, Endpoints]:
        rest, mgmt, metrics, grpc_inf, grpc_mgmt = ports
        store = self.options.model_store.resolve()
        handlers_dir = PROJECT_ROOT / "handlers"
        lines = {
            "inference_address": f"http://{LOOPBACK}:{rest}",
            "management_address": f"http://{LOOPBACK}:{mgmt}",
            "metrics_address": f"http://{LOOPBACK}:{metrics}",
            "grpc_inference_address": LOOPBACK,
            "grpc_inference_port": str(grpc_inf),
            "grpc_management_address": LOOPBACK,
            "grpc_management_port": str(grpc_mgmt),
            "model_store": str(store),
            "load_models": "all",
            "max_request_size": str(self.options.max_message_bytes),
            "max_response_size": str(self.options.max_message_bytes),
            "job_queue_size": str(self.options.job_queue_size),
            "metrics_mode": "prometheus",
            "metrics_config": str(handlers_dir / "metrics.yaml"),
            "disable_token_authorization": "true",
            "enable_model_api": "false",
            "allowed_urls": f"file://{store}/.*",
            "install_py_dep_per_model": "false",
            "enable_envvars_config": "false",
            "disable_system_metrics": "true",
            "default_workers_per_model": "1",
            "vmargs": " ".join(self.options.jvm_args),
        }
        if self.options.number_of_gpu is not None:
            lines["number_of_gpu"] = str(self.options.number_of_gpu)
        path = self.work_dir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        endpoints = Endpoints(
            grpc_inference=f"{LOOPBACK}:{grpc_inf}",
            grpc_management=f"{LOOPBACK}:{grpc_mgmt}",
            rest_inference=f"http://{LOOPBACK}:{rest}",
            management=f"http://{LOOPBACK}:{mgmt}",
            metrics=f"http://{LOOPBACK}:{metrics}",
        )
        return path, endpoints

    def _command(self, config: Path) -> list[str]:
        java = find_java(self.options.java)
        return [
            java,
            f"-Dmodel_server_home={TS_HOME}",
            f"-Djava.io.tmpdir={self.work_dir / 'tmp'}",  # the workers' Unix sockets live here: per instance
            *self.options.jvm_args,
            "-cp",
            f".:{TS_HOME / 'ts' / 'frontend'}/*",
            "org.pytorch.serve.ModelServer",
            "--python", sys.executable,
            "-f", str(config),
            "-s", str(self.options.model_store.resolve()),
            "-ncs",
            "--disable-token-auth",
        ]  # fmt: skip

    def _launch_and_wait(self) -> None:
        if not self.options.model_store.is_dir():
            raise UnavailableError(f"model store not found: {self.options.model_store}")
        config, endpoints = self._config(_free_ports(5))
        # The workers import ``handlers`` and ``neuroexplain`` from the same tree as the gateway (editable or not).
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "LOG_LOCATION": str(self.work_dir / "logs"),
            "METRICS_LOCATION": str(self.work_dir / "logs"),
            CANCEL_DIR_ENV: str(self.cancel_dir),
            **self.options.extra_env,
        }
        env.pop("TS_CONFIG_FILE", None)
        out = open(self.work_dir / "logs" / "torchserve.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                self._command(config), cwd=self.work_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: close() stops the workers too
            )  # fmt: skip
        finally:
            out.close()
        with self._lock:
            self._proc, self._endpoints = proc, endpoints
        try:
            self._wait_ready(proc, endpoints)
        except BaseException:
            self._stop_group(proc)
            raise
        self.generation += 1
        self._set_ready(True)
        log.info("TorchServe ready (generation %d, grpc %s)", self.generation, endpoints.grpc_inference)

    def _wait_ready(self, proc: subprocess.Popen[bytes], endpoints: Endpoints) -> None:
        expected = {p.stem for p in self.options.model_store.glob("*.mar")}
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UnavailableError(f"TorchServe exited with code {proc.returncode} while starting; {self._log_tail()}")
            if self._closing.is_set():
                raise UnavailableError("shutting down")
            if self._all_workers_ready(endpoints, expected):
                return
            time.sleep(0.25)
        raise UnavailableError(
            f"TorchServe was not ready after {self.options.startup_timeout_s:.0f} s; {self._log_tail()}"
        )

    def _all_workers_ready(self, endpoints: Endpoints, expected: set[str]) -> bool:
        try:
            listing = self._get_json(f"{endpoints.management}/models")
            names = {m["modelName"] for m in listing.get("models", [])}
            if not expected <= names:
                return False
            for name in names:
                described = self._get_json(f"{endpoints.management}/models/{name}")[0]
                workers = described.get("workers", [])
                if not workers or not any(w.get("status") == "READY" for w in workers):
                    return False
            return True
        except (OSError, ValueError, KeyError, IndexError):
            return False

    @staticmethod
    def _get_json(url: str) -> dict:  # type: ignore[type-arg]
        with _OPENER.open(url, timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def _log_tail(self, lines: int = 5) -> str:
        path = self.work_dir / "logs" / "torchserve.out"
        with contextlib.suppress(OSError):
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
            return "last log lines: " + " | ".join(tail)
        return "no log"

    def _watch(self) -> None:
        backoff = self.options.restart_backoff_s
        while not self._closing.is_set():
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            proc.wait()
            if self._closing.is_set():
                return
            self._set_ready(False)
            self._stop_group(proc)  # workers of the dead frontend
            log.error("TorchServe exited with code %s; restarting in %.1f s", proc.returncode, backoff)
            if time.monotonic() - started > 60:
                backoff = self.options.restart_backoff_s
            while not self._closing.is_set():
                if self._closing.wait(backoff):
                    return
                backoff = min(backoff * 2, self.options.restart_backoff_max_s)
                try:
                    self._launch_and_wait()
                    self.restarts += 1
                    break
                except UnavailableError as exc:
                    log.error("TorchServe restart failed: %s", exc)

    def _set_ready(self, ready: bool) -> None:
        if ready == self._ready.is_set():
            return
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        with contextlib.suppress(Exception):
            self._on_state(ready)

    @staticmethod
    def _stop_group(proc: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> None:
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = proc.pid  # leader gone; the group id stays the leader's pid while members live
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
