"""Run one TorchServe (Java 17) under the gateway's supervision.

Each supervisor owns one TorchServe: its own working directory (config, logs, Java temp dir with the workers' Unix
sockets, cancel flags), its own free loopback ports, its own process group. So two ``serve`` instances on one host
never collide — which is also why we start the Java frontend ourselves instead of through the ``torchserve``
launcher script: that script keeps one global pid file in ``/tmp`` and refuses a second instance.

Security decisions:

- every TorchServe port (REST inference, management, metrics, gRPC inference and management) binds ``127.0.0.1``;
  the management API is never reachable from outside (CVE-2023-43654, "ShellTorch"), model registration from URLs
  is confined to the model store (``allowed_urls``) and the model-control API stays off;
- token authorization is **on** (``token_auth``, the default): loopback ports alone would let any local user call
  TorchServe's inference and management APIs past the gateway's authentication and audit. TorchServe writes
  ``key_file.json`` (mode 600) into its working directory, with an inference and a management key that expire
  after ``token_expiration_min`` and an API key that does not. :class:`TorchServeKeys` reads that file (again
  whenever it changes, e.g. after a restart); a key about to expire, or one TorchServe refuses, is renewed with the
  API key (``/token?type=inference|management`` on the management API, which rewrites the file) and read again.
  ``token_auth=False`` runs with ``--disable-token-auth`` (then any local user reaches TorchServe directly).

If TorchServe exits, :meth:`ready` turns False at once, a monitor thread restarts it with exponential backoff
(1 s, 2 s, 4 s ... capped at 30 s, reset after a minute of healthy running), and ``generation`` increments so the
client reconnects. If one of its Python workers dies (TorchServe restarts workers itself), a second thread sees the
process gone within ``WORKER_POLL_S`` and :meth:`ready` is False until every model has a READY worker again; the
backend also checks at once when a call fails (:meth:`workers_lost`), so the failed call is UNAVAILABLE, not
"queue full". :meth:`close` stops the whole process group (frontend and Python workers); nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import ts

from neuroexplain.errors import UnavailableError
from neuroexplain.serving.tuning import process_env

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
        jvm_args: JVM options (small heap, serial GC: the frontend only shuffles bytes). C2 stays on: C1 alone is
            cheaper only while C2 warms up, and slows TorchServe's REST path twofold (README -> TorchServe backend,
            "JVM").
        number_of_gpu: GPUs TorchServe hands to workers (``gpu_id``; the handler then runs on CUDA when torch has
            it); None = TorchServe's default, every visible GPU; 0 = CPU only.
        token_auth: TorchServe's key authorization on its inference and management APIs (see the module doc).
        token_expiration_min: lifetime of TorchServe's inference and management keys (minutes, fractions allowed).
        workers_per_model: the archives' worker count; several workers split the cores' torch threads between
            them (:func:`neuroexplain.serving.tuning.process_env`).
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
    token_auth: bool = True
    token_expiration_min: float = 60.0
    workers_per_model: int = 1


KEY_FILE = "key_file.json"
WORKER_POLL_S = 0.2  # how often the worker processes are checked
RENEW_MARGIN_S = 10.0  # a key expiring sooner than this (or than a quarter of its lifetime) is renewed before use
_REFUSED_HTTP = (400, 401, 403)  # how TorchServe's REST APIs answer a missing, wrong or expired key


class TorchServeKeys:
    """TorchServe's keys, from the ``key_file.json`` it writes (``{"management"|"inference": {"key", "expiration
    time"}, "API": {"key"}}``); re-read whenever the file changes, renewed through the API key when they expire.

    Args:
        path: the key file (in TorchServe's working directory).
        management_url: the current management API address (the renewal endpoint ``/token`` lives there).
    """

    def __init__(self, path: Path, management_url: Callable[[], str], lifetime_s: float = 3600.0) -> None:
        self.path = path
        self._management_url = management_url
        self.margin_s = min(RENEW_MARGIN_S, lifetime_s / 4)
        self._lock = threading.Lock()
        self._renew_lock = threading.Lock()  # one renewal at a time: a second would invalidate the first's key
        self._stat: tuple[int, int, int] | None = None
        self._doc: dict[str, dict[str, str]] = {}
        self.renewals = 0

    def forget(self) -> None:
        """Drop the keys read so far (TorchServe restarts and writes new ones)."""
        with self._lock:
            self._stat, self._doc = None, {}

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stat == self._stat:
                return self._doc
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being rewritten: read again next time
        if not isinstance(doc, dict):
            return {}
        with self._lock:
            self._stat, self._doc = stat, doc
        return doc

    def key(self, kind: str) -> str | None:
        """The current ``inference`` or ``management`` key (renewed first when it is about to expire); None before
        TorchServe has written its key file."""
        entry = self._read().get(kind) or {}
        key = entry.get("key")
        if key and _expires_within(entry.get("expiration time"), self.margin_s):
            key = self.renew(kind, stale=key) or key
        return key or None

    def renew(self, kind: str, stale: str | None) -> str | None:
        """A fresh ``kind`` key: read the file again; if it still holds ``stale``, ask TorchServe for a new one
        (``/token?type=kind`` with the API key, which rewrites the file). Returns None when that fails (TorchServe
        down or restarting: the caller's next try reads the new run's file). Concurrent callers share one renewal."""
        with self._renew_lock:
            return self._renew(kind, stale)

    def _renew(self, kind: str, stale: str | None) -> str | None:
        with self._lock:
            self._stat = None
        doc = self._read()
        key = (doc.get(kind) or {}).get("key")
        if key and key != stale and not _expires_within((doc.get(kind) or {}).get("expiration time"), self.margin_s):
            return key
        api = (doc.get("API") or {}).get("key")
        if not api:
            return None
        try:
            request = urllib.request.Request(f"{self._management_url()}/token?type={kind}",
                                             headers={"Authorization": f"Bearer {api}"})
            with _OPENER.open(request, timeout=5) as resp:
                resp.read()
        except (OSError, UnavailableError):
            return None
        self.renewals += 1
        with self._lock:
            self._stat = None
        return (self._read().get(kind) or {}).get("key") or None

    def header(self, kind: str) -> dict[str, str]:
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}


def _expires_within(when: object, seconds: float) -> bool:
    if not isinstance(when, str) or not when:
        return False
    try:
        # Java's Instant.toString: 2026-12-02T22:41:08.123456789Z (nanoseconds; Python takes microseconds at most)
        expires = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", when))
    except ValueError:
        return False  # an unknown format: renew only when TorchServe refuses the key
    if expires.tzinfo is None:
        return False
    return expires.timestamp() - time.time() < seconds


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
        self._worker_monitor: threading.Thread | None = None
        self._workers_lock = threading.Lock()
        self._workers_ok = threading.Event()
        self._workers_ok.set()
        self._known_workers: set[int] = set()
        self._lost_workers: set[int] = set()
        self.generation = 0
        self.restarts = 0
        self.worker_deaths = 0
        self.keys: TorchServeKeys | None = (
            TorchServeKeys(self.work_dir / KEY_FILE, self._current_management, 60 * options.token_expiration_min)
            if options.token_auth else None
        )

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
        """True while TorchServe runs and its models have ready workers; False from the moment the Java process or a
        worker process is gone, until it is back."""
        return self._ready.is_set() and self.alive() and self._workers_ok.is_set()

    def worker_pids(self) -> set[int]:
        """Process ids of TorchServe's Python workers (children of the Java frontend)."""
        proc = self._proc
        if proc is None:
            return set()
        pids = set()
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any("model_service_worker" in part for part in child.cmdline()):
                        pids.add(child.pid)
        except psutil.Error:
            return set()
        return pids

    def workers_lost(self) -> bool:
        """Check the workers now: True when one died since they were last seen all ready (readiness is off until
        TorchServe has restarted it and every model has a READY worker again)."""
        with self._workers_lock:
            if not self._ready.is_set():
                self._known_workers = set()
                return False
            current = self.worker_pids()
            if self._closing.is_set():  # close() set it before stopping the group: vanishing workers are expected
                return False
            if self._workers_ok.is_set() and self._known_workers - current:
                self._workers_ok.clear()
                self.worker_deaths += 1
                self._lost_workers = set(self._known_workers)
                log.error("a TorchServe worker process died; readiness is off until TorchServe has replaced it")
            if self._workers_ok.is_set():
                self._known_workers = current
                return False
            endpoints = self._endpoints
            expected = {p.stem for p in self.options.model_store.glob("*.mar")}
            # Back when as many worker processes run as before, none of them one that was there when a worker died
            # (TorchServe's management API may still call the dead one READY for a moment), and every model has a
            # READY worker.
            replaced = len(current) >= len(self._lost_workers) and not current & self._lost_workers
            if replaced and endpoints is not None and self._all_workers_ready(endpoints, expected):
                self._known_workers = self.worker_pids()
                self._workers_ok.set()
                log.info("TorchServe workers are ready again")
                return False
            return True

    def _watch_workers(self) -> None:
        while not self._closing.wait(WORKER_POLL_S):
            try:
                self.workers_lost()
            except Exception:  # the watcher must outlive any surprise; readiness stays as it was
                log.exception("checking TorchServe's workers failed")

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
        self._worker_monitor = threading.Thread(target=self._watch_workers, name="torchserve-workers", daemon=True)
        self._worker_monitor.start()

    def close(self) -> None:
        """Stop TorchServe and its workers (SIGTERM, then SIGKILL after 15 s); remove a temporary work dir."""
        self._closing.set()
        self._set_ready(False)
        self._stop_group(self._proc)
        if self._monitor is not None:
            self._monitor.join(timeout=20)
        if self._worker_monitor is not None:
            self._worker_monitor.join(timeout=5)
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

    def inference_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for TorchServe's inference API: ``authorization: Bearer <inference key>`` (none without
        token authorization)."""
        if self.keys is None:
            return ()
        key = self.keys.key("inference")
        return (("authorization", f"Bearer {key}"),) if key else ()

    def inference_key_refused(self, used: tuple[tuple[str, str], ...]) -> bool:
        """TorchServe refused the inference key in ``used`` (PERMISSION_DENIED): renew it. True when a new key is
        there to retry with."""
        if self.keys is None:
            return False
        stale = used[0][1].removeprefix("Bearer ") if used else None
        return self.keys.renew("inference", stale) not in (None, stale)

    def _current_management(self) -> str:
        endpoints = self._endpoints
        if endpoints is None:
            raise UnavailableError("the model server (TorchServe) is not running")
        return endpoints.management

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
            "disable_token_authorization": "false" if self.options.token_auth else "true",
            "token_expiration_min": repr(float(self.options.token_expiration_min)),
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
            *(() if self.options.token_auth else ("--disable-token-auth",)),
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
            # libgomp threads that sleep instead of spinning, the cores split between workers, one malloc arena that
            # keeps its pages (serving.tuning)
            **process_env(os.environ, self.options.workers_per_model),
            **self.options.extra_env,
        }
        env.pop("TS_CONFIG_FILE", None)
        if self.keys is not None:  # never use the previous run's keys: TorchServe writes new ones as it starts
            (self.work_dir / KEY_FILE).unlink(missing_ok=True)
            self.keys.forget()
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
        with self._workers_lock:
            self._known_workers = self.worker_pids()
            self._workers_ok.set()
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

    def _get_json(self, url: str) -> dict:  # type: ignore[type-arg]
        """GET from the management API with the management key; a refused key is renewed and the call tried again."""
        for attempt in range(2):
            headers = self.keys.header("management") if self.keys is not None else {}
            try:
                with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=5) as resp:
                    return json.loads(resp.read())  # type: ignore[no-any-return]
            except urllib.error.HTTPError as exc:
                if self.keys is None or exc.code not in _REFUSED_HTTP or attempt:
                    raise
                self.keys.renew("management", headers.get("Authorization", "").removeprefix("Bearer ") or None)
        raise AssertionError("unreachable")

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
